"""Fifteenth review round: a practitioner checking the *correctness* of generation and model outputs (generate,
eval, merge, export): chat templates, BOS handling, stopping, batched decoding.

Each test fails on the code it was written against (tiny random models only; nothing trains)."""

from __future__ import annotations

import warnings

import torch

GEMMA_STYLE_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def gemma_style_tokenizer():
    """A tokenizer that adds BOS itself and whose chat template starts with {{ bos_token }}, as Gemma's, Llama 3's
    and Mistral's do."""
    from tokenizers.processors import TemplateProcessing

    from slimtune.models import tiny_tokenizer

    tok = tiny_tokenizer(["food pizza place user model"], extra_words=("<bos>",))
    tok.add_special_tokens({"bos_token": "<bos>",
                            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    tok.chat_template = GEMMA_STYLE_TEMPLATE
    return tok


def test_chat_prompts_get_bos_once_in_generate():
    """`slimtune generate --chat` (and chat `messages` files) render with the chat template, which already writes
    BOS; decode._encode then puts bos_prefix in front again: the model sees <bos><bos><start_of_turn>... (Gemma's
    outputs degrade noticeably with a doubled BOS; HF's chat-template docs warn about exactly this)."""
    from slimtune.generation.decode import DecodeSettings, _encode
    from slimtune.generation.prompts import render_prompts

    tok = gemma_style_tokenizer()
    prompts = render_prompts(["food pizza"], tok, chat=True)
    ids = _encode(tok, prompts, DecodeSettings(), "cpu")["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1, tok.convert_ids_to_tokens(ids)


def test_chat_training_and_eval_examples_get_bos_once():
    """The same doubling in training and `slimtune eval` on chat (`messages`) data: token_ids prefixes the rendered
    prompt (which starts with BOS) with BOS again, so the adapter is trained and scored on a format the model never
    sees elsewhere (llama.cpp / Ollama after export render the template once)."""
    from slimtune.generation.data import rows_to_examples, generation_task
    from slimtune.generation.objective import token_ids

    tok = gemma_style_tokenizer()
    rows = [(1, {"messages": [{"role": "user", "content": "food"}, {"role": "assistant", "content": "pizza"}]})]
    example = rows_to_examples(rows, generation_task(), "chat.jsonl", tok)[0]
    prompt, _, _ = token_ids(tok, example, 64)
    assert prompt.count(tok.bos_token_id) == 1, tok.convert_ids_to_tokens(prompt)


def test_generation_stops_at_the_models_end_of_turn_tokens():
    """Chat checkpoints end a turn with a token other than tokenizer.eos_token (Gemma 3: <end_of_turn>, id 106, in
    generation_config.eos_token_id = [1, 106]; Qwen2.5: [<|im_end|>, <|endoftext|>]). decode._generate passes
    eos_token_id=tokenizer.eos_token_id, overriding the model's generation_config: the model ends its turn, keeps
    going into an invented next turn, and skip_special_tokens hides the markers, so that text lands in the output."""
    from slimtune.generation.decode import DecodeSettings, generate_texts
    from slimtune.models.loading import tiny_model

    tok = gemma_style_tokenizer()
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id)
    end_of_turn, pizza = tok.convert_tokens_to_ids("<end_of_turn>"), tok.convert_tokens_to_ids("pizza")
    model.generation_config.eos_token_id = [tok.eos_token_id, end_of_turn]
    calls = []

    def force(module, args, output):  # first step: end the turn; after that: "pizza" forever
        calls.append(1)
        output = output.clone()
        output[..., end_of_turn if len(calls) == 1 else pizza] += 1e4
        return output

    model.lm_head.register_forward_hook(force)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = generate_texts(model, tok, ["food"], DecodeSettings(max_new_tokens=5))
    assert out == [""], out


def test_left_truncated_long_prompts_keep_their_bos():
    """--max-length keeps a long prompt's last tokens, but BOS is glued on as text *before* truncating, so it is cut
    away with the prompt's head: a Gemma-style model decodes a prompt with no BOS at all (its outputs without BOS
    are garbage), while a prompt one token shorter gets it. The same in training (token_ids: prompt[-keep:])."""
    from slimtune.generation.decode import DecodeSettings, _encode
    from slimtune.generation.data import GenerationExample
    from slimtune.generation.objective import token_ids

    tok = gemma_style_tokenizer()
    long_prompt = " ".join(["food pizza place"] * 10)
    ids = _encode(tok, [long_prompt], DecodeSettings(max_length=8), "cpu")["input_ids"][0].tolist()
    assert len(ids) == 8 and ids[0] == tok.bos_token_id, tok.convert_ids_to_tokens(ids)
    prompt, _, _ = token_ids(tok, GenerationExample(long_prompt, "pizza"), 16)
    assert prompt[0] == tok.bos_token_id, tok.convert_ids_to_tokens(prompt)

"""Text generation with `transformers.generate`: batched, left-padded prompts, greedy by default (beam search on
request), stopping at EOS or after `max_new_tokens`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune.models.loading import keep_last, left_padded, pad_id, prompt_ids, prompt_room


@dataclass
class DecodeSettings:
    max_new_tokens: int = 64
    num_beams: int = 1  # 1: greedy
    batch_size: int = 16
    max_length: int = 256  # prompt tokens kept (from the left)


def _encode(tokenizer, prompts: list[str], settings: DecodeSettings, device: str, model=None, cut: list | None = None):
    """Left-padded, left-truncated prompts (BOS first where the model expects it): at most --max-length tokens, and
    no more than leave room for the new tokens within `model`'s positions. `cut` gets one (tokens, kept) per prompt
    that was cut."""
    keep = settings.max_length if model is None else prompt_room(model, settings.max_length, settings.max_new_tokens)
    whole = [prompt_ids(tokenizer, p) for p in prompts]
    if cut is not None:
        cut += [(len(w), keep) for w in whole if len(w) > keep]
    ids, mask = left_padded([keep_last(tokenizer, w, keep) for w in whole], pad_id(tokenizer))
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def say_cut(cut: list, total: int) -> None:
    """One warning line when prompts lost their beginning to --max-length (or to the room --max-new-tokens leaves
    within the model's positions): the completions are of the cut prompts."""
    if cut:
        import warnings
        longest, keep = max(cut)
        warnings.warn(f"{len(cut)} of {total} prompts are longer than the {keep} tokens kept (--max-length, and room "
                      f"for --max-new-tokens within the model's positions; the longest has {longest}): their "
                      "beginnings were cut", stacklevel=3)


def stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and the model's own end tokens (generation_config.eos_token_id: Gemma 3's <end_of_turn>,
    Qwen's <|im_end|>): a model that ends its turn stops there instead of inventing the next one."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    return sorted({tokenizer.eos_token_id, *configured} - {None})


def _generate(model, tokenizer, enc, settings: DecodeSettings, **extra) -> torch.Tensor:
    """Greedy or beam search (no sampling), stopping at EOS: the generated token ids only."""
    out = model.generate(**enc, max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                         do_sample=False, eos_token_id=stop_ids(model, tokenizer), pad_token_id=pad_id(tokenizer),
                         temperature=None, top_p=None, top_k=None, **extra)
    return out[:, enc["input_ids"].shape[1]:]


@torch.inference_mode()
def generate_texts(model, tokenizer, prompts: list[str], settings: DecodeSettings = DecodeSettings(),
                   device: str = "cpu") -> list[str]:
    """The completion of each prompt (new tokens only, special tokens removed, whitespace stripped)."""
    was_training = model.training
    model.eval()
    outputs, cut = [], []
    for i in range(0, len(prompts), settings.batch_size):
        enc = _encode(tokenizer, prompts[i:i + settings.batch_size], settings, device, model, cut)
        new = _generate(model, tokenizer, enc, settings)
        outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    model.train(was_training)
    say_cut(cut, len(prompts))
    return outputs


def stream_generate(model, tokenizer, prompt: str, settings: DecodeSettings, device: str = "cpu") -> str:
    """Generate one completion, printing tokens to stdout as they come (transformers' TextStreamer)."""
    from transformers import TextStreamer

    model.eval()
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cut = []
    enc = _encode(tokenizer, [prompt], settings, device, model, cut)
    say_cut(cut, 1)
    with torch.inference_mode():
        new = _generate(model, tokenizer, enc, settings, streamer=streamer)
    return tokenizer.decode(new[0], skip_special_tokens=True).strip()

"""Review 31: a careless user of generate / eval / train (chat data) and plan. Each test fails on the code it was
written against."""

from __future__ import annotations

import json

from test_bad_input_table import TINY, assert_one_line, cli

ASSISTANT_ONLY = json.dumps({"messages": [{"role": "assistant", "content": "hello"}]}) + "\n"


def test_generate_assistant_only_conversation_is_one_line_error(tmp_path):
    """A `messages` row with only the assistant's turn leaves nothing to prompt with: generate crashed with 'internal
    error (ValueError: Cannot apply chat template to an empty conversation)', exit 1, after loading the model."""
    data = tmp_path / "chat.jsonl"
    data.write_text(ASSISTANT_ONLY)
    res = cli("generate", *TINY, "--input", data, "--max-new-tokens", "2", "--output", tmp_path / "o.jsonl")
    assert_one_line(res, f"{data}:1")
    assert not (tmp_path / "o.jsonl").exists()


def test_eval_generation_assistant_only_conversation_is_one_line_error(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(ASSISTANT_ONLY)
    res = cli("eval", "--data", data, *TINY, "--task", "generation", "--max-new-tokens", "2")
    assert_one_line(res, f"{data}:1")


def test_train_generation_assistant_only_conversation_is_one_line_error(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(ASSISTANT_ONLY * 4)
    out = tmp_path / "out"
    res = cli("train", "--data", data, *TINY, "--task", "generation", "--steps", "1", "--batch-size", "1", "--quiet",
              "--out", out)
    assert_one_line(res, f"{data}:1")
    assert not out.exists()


def test_generate_input_column_with_conversations_is_refused(tmp_path):
    """--template and --chat are refused for a file of conversations; --input-column was silently ignored (exit 0),
    as train/eval refuse it (generation/data.py _refuse_unused)."""
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    res = cli("generate", *TINY, "--input", data, "--input-column", "question", "--max-new-tokens", "2",
              "--output", tmp_path / "o.jsonl")
    assert_one_line(res, "--input-column")
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_explicit_input_column_input_is_not_ignored(tmp_path):
    """`--input-column input` on rows holding both `prompt` and `input`: the prompt column was used and the flag
    silently ignored (generation/prompts.py _read keys on column == 'input', not on whether the flag was given)."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "AAA", "input": "BBB"}) + "\n")
    out = tmp_path / "o.jsonl"
    res = cli("generate", *TINY, "--input", data, "--input-column", "input", "--max-new-tokens", "1", "--output", out)
    if res.exit_code == 0:  # either the column asked for is used ...
        assert json.loads(out.read_text())["prompt"] == "BBB"
    else:  # ... or the flag is refused by name
        assert_one_line(res, "--input-column")


def test_plan_config_with_negative_layers_names_the_config(tmp_path):
    """plan --model CONFIG.json with num_hidden_layers -2 blamed '--fo-layers 2: must be between 1 and the model's -2
    blocks' (a flag the user never gave) instead of the file's field."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": -2, "vocab_size": 100,
                               "num_attention_heads": 4, "intermediate_size": 10}))
    res = cli("plan", "--model", cfg)
    assert_one_line(res, "num_hidden_layers")

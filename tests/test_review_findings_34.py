"""Review 34: a careless practitioner using slimtune from Python and with Hugging Face tools (ZOTrainer, plain peft),
then merge / export / generate / eval on what was saved. Each test failed on the code it was written against."""

import json

import pytest

from test_bad_input_table import TINY, cli
from test_generation_prompt_record import _prompts, gen_run  # noqa: F401  (an adapter with a recorded template)


def test_generate_uses_the_template_a_generation_adapter_recorded(gen_run, tmp_path):
    """`slimtune generate --adapter RUN/adapter --input qa.tsv --input-column question` sent the bare questions
    ("what is two and two") to a model trained on "Q: {question} A:": the adapter's slimtune.json records its
    template and input column, `eval --adapter` adopts them (docs/how-to/generation.md), but generate never reads the
    record (GenerateSettings has no adopt step), so its completions come from a prompt the adapter never saw,
    without a word."""
    data, out = gen_run
    pred = tmp_path / "g.jsonl"
    res = cli("generate", *TINY, "--adapter", out / "adapter", "--input", data, "--input-column", "question",
              "--max-new-tokens", "2", "--output", pred)
    assert res.exit_code == 0, res.output
    assert _prompts(pred)[0] == "Q: what is two and two A:", _prompts(pred)


def test_generate_takes_the_recorded_input_column_when_left_out(gen_run, tmp_path):
    """Without --input-column, generate looks for a column `input` and fails (`no column input`), though the
    adapter records `input_column: question`, which eval takes when left out."""
    data, out = gen_run
    pred = tmp_path / "g.jsonl"
    res = cli("generate", *TINY, "--adapter", out / "adapter", "--input", data, "--max-new-tokens", "2",
              "--output", pred)
    assert res.exit_code == 0, res.output
    assert _prompts(pred)[0] == "Q: what is two and two A:", _prompts(pred)


def _tiny_model():
    from slimtune.models import load_model_and_tokenizer
    return load_model_and_tokenizer("tiny-llama", texts=["hello world good bad nice movie"])


@pytest.mark.parametrize("first, second", [("lora", "svfit"), ("adapter", "adapter"), ("lora", "lora")])
def test_apply_peft_refuses_a_model_that_already_has_an_adapter(first, second):
    """A notebook cell run twice, or "let me try SVFit now" on the same `model` variable: apply_peft wrapped the
    other layers of an adapted model and froze the first adapter's weights without a word (lora then svfit: the
    LoRA weights stop training, and every save_peft / ZOTrainer.save_model writes only the LoRA, so the SVFit values
    trained are lost: the reloaded model gives other outputs); lora then lora said "cannot guess target layers for
    this model; pass --target-modules", which sends the user the wrong way. One line saying the model already
    carries an adapter is what a Python caller needs."""
    import slimtune
    from slimtune import SlimtuneError

    model, _ = _tiny_model()
    adapted = slimtune.apply_peft(model, first, r=2)
    with pytest.raises(SlimtuneError, match="already"):
        slimtune.apply_peft(adapted, second, r=2)


def test_a_stacked_adapter_saved_and_read_back_gives_the_same_outputs(tmp_path):
    """The silent result of the above: lora, then svfit on the same model, trained (here: scaled) and saved with
    write_adapter (what ZOTrainer.save_model calls for a model with SVFit layers) reloads as the LoRA alone."""
    import torch

    import slimtune
    from slimtune import SlimtuneError
    from slimtune.peft import read_adapter
    from slimtune.peft.registry import adapter_meta_of, write_adapter

    model, tok = _tiny_model()
    try:
        model = slimtune.apply_peft(slimtune.apply_peft(model, "lora", r=2), "svfit", r=2)
    except SlimtuneError:
        return  # refused: nothing silently lost
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    ids = tok(["hello world good bad nice movie"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**ids).logits
    write_adapter(model, tok, tmp_path / "adapter", meta=adapter_meta_of(model))
    loaded, _ = read_adapter(tmp_path / "adapter", "tiny-llama")
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**ids).logits, expected, atol=1e-5)


@pytest.mark.parametrize("kwargs, keyword", [(dict(target_modules=["nope"]), "target_modules"),
                                             (dict(r=100, method="pissa"), "r")])
def test_apply_peft_errors_name_the_keyword_not_the_cli_flag(kwargs, keyword):
    """apply_peft checks its keywords in Python terms ("slimtune.apply_peft: r 0: must be >= 1"), but the checks
    that need the model speak the CLI: "--target-modules nope: no such layer ...", "--r 100: PiSSA takes r singular
    vectors ... give --r 32 or less". In Python there is no --r; settings.python.in_python_terms exists for this."""
    import slimtune
    from slimtune import SlimtuneError

    model, _ = _tiny_model()
    method = kwargs.pop("method", "lora")
    with pytest.raises(SlimtuneError) as info:
        slimtune.apply_peft(model, method, **kwargs)
    message = str(info.value)
    assert message.startswith("slimtune.apply_peft") and "--" not in message and keyword in message, message


def test_merge_of_a_bf16_run_keeps_its_dtype(tmp_path):
    """`slimtune train --dtype bf16` records dtype bfloat16 in adapter/slimtune.json, and read_adapter rebuilds the run
    in bf16 "so that a bf16 run is evaluated in bf16"; `slimtune merge` reads it dense (float32), merges, and writes
    a float32 checkpoint (config.json dtype float32, twice the size of the base) whose slimtune.json no longer records
    a dtype: `eval --model merged/` then scores another model than the run evaluated, and nothing says so (peft's
    merge_and_unload keeps the base's dtype)."""
    from safetensors import safe_open

    from test_bad_input_table import TRAIN

    run = tmp_path / "run"
    res = cli("train", "--data", TRAIN, *TINY, "--dtype", "bf16", "--steps", "2", "--batch-size", "4", "--quiet",
              "--eval-every", "0", "--r", "2", "--out", run)
    assert res.exit_code == 0, res.output
    assert json.loads((run / "adapter" / "slimtune.json").read_text())["dtype"] == "bfloat16"
    res = cli("merge", run / "adapter", *TINY, "--out", tmp_path / "merged")
    assert res.exit_code == 0, res.output
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {"BF16"}, dtypes


def test_merge_refuses_a_record_whose_input_column_is_not_text(gen_run, tmp_path):
    """read_adapter_meta checked the classification prompt's keys only: merge copied a generation record's
    input_column 5 into the merged checkpoint, where eval then refused it naming the merged file."""
    import shutil
    _, out = gen_run
    adapter = tmp_path / "run" / "adapter"
    shutil.copytree(out / "adapter", adapter)
    meta = {**json.loads((adapter / "slimtune.json").read_text()), "input_column": 5}
    (adapter / "slimtune.json").write_text(json.dumps(meta))
    res = cli("merge", adapter, *TINY, "--out", tmp_path / "merged")
    assert res.exit_code == 2 and "slimtune.json" in res.output and "input_column" in res.output, res.output
    assert not (tmp_path / "merged").exists()

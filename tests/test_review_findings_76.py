"""Review 76: the documentation's code blocks and examples/, run as a practitioner copies them (tiny-llama, demo data,
a few steps). Only blocks that fail as written are here."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)


def test_hugging_face_trl_block_runs_on_cpu_as_written(tmp_path, monkeypatch, hf_offline):
    """docs/how-to/hugging-face.md:32: `SFTConfig(output_dir="out", max_steps=2000)` with TRL's default bf16=True
    raises `ValueError: Your setup doesn't support bf16/gpu. You need to assign use_cpu ...` on a CPU machine (the
    machine the project targets); examples/trl_sft_zo_e2e.py passes use_cpu=True, the doc block does not."""
    pytest.importorskip("trl")
    import datasets

    from slimtune.models import load_model_and_tokenizer

    block = next(b for b in python_blocks("docs/how-to/hugging-face.md") if "SFTConfig" in b)
    block = block.replace("max_steps=2000", "max_steps=2")  # a few steps; nothing else changed
    pairs = datasets.Dataset.from_list([{"prompt": f"Describe: name[R{i}]\nDescription:",
                                         "completion": f" R{i} is a restaurant."} for i in range(8)])
    model, tokenizer = load_model_and_tokenizer("tiny-llama", texts=list(pairs["prompt"]) + list(pairs["completion"]))
    monkeypatch.chdir(tmp_path)
    env = {"model": model, "tokenizer": tokenizer, "pairs": pairs}
    exec(compile(block, "hugging-face.md", "exec"), env)  # noqa: S102 - the documented block itself
    assert env["trainer"].state.global_step == 2


def test_eval_of_an_adapter_needs_no_model_flag(tmp_path):
    """(lead, from review 76's note) An adapter records its base (slimtune.json): eval, like peft's
    adapter_config.json, takes it when --model is left out (it assumed smollm2 and refused a tiny-llama adapter)."""
    from conftest import cli
    demo = Path(__file__).resolve().parents[1] / "slimtune" / "data" / "demo"
    run = tmp_path / "run"
    res = cli("train", "--model", "tiny-llama", "--data", demo / "sst2_demo_train.tsv", "--steps", 1,
              "--batch-size", 4, "--eval-every", 0, "--quiet", "--out", run)
    assert res.exit_code == 0, res.output[-800:]
    res = cli("eval", "--data", demo / "sst2_demo_dev.tsv", "--adapter", run / "adapter")
    assert res.exit_code == 0, res.output[-800:]

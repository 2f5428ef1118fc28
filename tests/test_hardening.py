"""Hardening (issue 17): every bad input is one line on stderr with exit code 2, no silent no-ops, merges that load.

The table below runs the real CLI on a tiny model; each row is an input that used to give a traceback or to be
accepted silently.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from slimtune.cli import app

runner = CliRunner()


def train_cli(tmp_path, demo_paths, name, *extra, steps="2"):
    out = tmp_path / name
    optimizer = [] if "--optimizer" in extra else ["--optimizer", "adamw"]  # a flag may be given once
    res = runner.invoke(app, ["train", "--data", demo_paths[0], "--eval-data", demo_paths[1], "--model", "tiny-llama",
                              *optimizer, "--lr", "1e-2", "--steps", steps, "--eval-every", "1",
                              "--batch-size", "4", "--out", str(out), "--quiet", *extra])
    return res, out


def assert_one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """One trained adapter per PEFT method (tiny-llama, 2 AdamW steps, --save last)."""
    demo = Path(__file__).resolve().parents[1] / "slimtune" / "data" / "demo"
    root = tmp_path_factory.mktemp("adapters")
    paths = (str(demo / "sst2_demo_train.tsv"), str(demo / "sst2_demo_dev.tsv"))
    out = {}
    for method in ("lora", "pissa", "svfit", "adapter", "none"):
        rank = () if method == "none" else ("--r", "2")  # a rank does not apply to full fine-tuning
        res, run = train_cli(root, paths, method, "--peft", method, *rank, "--save", "last")
        assert res.exit_code == 0, res.output
        out[method] = run
    return out


BAD_TRAIN = [
    (["--peft", "lora", "--r", "0"], ["--r 0", ">= 1"]),
    (["--peft", "pissa", "--r", "-1"], ["--r -1", ">= 1"]),
    (["--peft", "adapter", "--r", "-1"], ["--r -1", ">= 1"]),
    (["--peft", "adapter", "--r", "0"], ["--r 0"]),
    (["--peft", "svfit", "--r", "0"], ["--r 0", ">= 1"]),
    (["--peft", "svfit", "--r", "-1"], ["--r -1"]),
    (["--peft", "lora", "--target-modules", "nope"], ["--target-modules nope", "q_proj"]),
    (["--peft", "svfit", "--target-modules", "q_proj,nope"], ["--target-modules nope"]),
    (["--peft", "adapter", "--target-modules", "nope"], ["--target-modules nope"]),
    (["--lr-scheduler", "warmup"], ["--lr-scheduler"]),
    (["--save", "final"], ["--save"]),
    (["--optimizer", "dpzero", "--accountant", "moments"], ["--accountant"]),
    (["--steps", "0"], ["--steps"]),
    (["--optimizer", "dpzero", "--clipping", "sometimes"], ["--clipping"]),
]


@pytest.mark.parametrize("extra,needles", BAD_TRAIN, ids=[" ".join(e) for e, _ in BAD_TRAIN])
def test_bad_train_settings_are_one_line_errors(tmp_path, demo_paths, extra, needles):
    res, out = train_cli(tmp_path, demo_paths, "run", *extra)
    assert_one_line_error(res, *needles)
    assert not (out / "checkpoint").exists()


def eval_cli(adapter, demo_paths, model="tiny-llama"):
    return runner.invoke(app, ["eval", "--data", demo_paths[1], "--model", model, "--adapter", str(adapter)])


def test_incomplete_or_malformed_adapters_are_one_line_errors(tmp_path, demo_paths, adapters):
    lora = tmp_path / "lora"
    shutil.copytree(adapters["lora"] / "adapter", lora)
    (lora / "adapter_model.safetensors").unlink()
    assert_one_line_error(eval_cli(lora, demo_paths), "adapter_model.safetensors")

    svfit = tmp_path / "svfit"
    shutil.copytree(adapters["svfit"] / "adapter", svfit)
    (svfit / "slimtune_adapter.safetensors").unlink()
    assert_one_line_error(eval_cli(svfit, demo_paths), "slimtune_adapter.safetensors")

    broken = tmp_path / "broken"
    shutil.copytree(adapters["svfit"] / "adapter", broken)
    (broken / "slimtune_adapter_config.json").write_text("{not json")
    assert_one_line_error(eval_cli(broken, demo_paths), "slimtune_adapter_config.json")


def test_an_adapter_whose_tensors_match_nothing_is_refused(tmp_path, demo_paths, adapters):
    for method in ("svfit", "adapter"):
        renamed = tmp_path / method
        shutil.copytree(adapters[method] / "adapter", renamed)
        weights = load_file(str(renamed / "slimtune_adapter.safetensors"))
        save_file({"elsewhere." + k: v for k, v in weights.items()}, str(renamed / "slimtune_adapter.safetensors"))
        assert_one_line_error(eval_cli(renamed, demo_paths), "does not match")


def test_an_adapter_on_another_architecture_is_refused(demo_paths, adapters):
    assert_one_line_error(eval_cli(adapters["lora"] / "adapter", demo_paths, model="tiny-gpt2"), "base model")


def test_bottleneck_adapters_refuse_to_merge(tmp_path, adapters):
    res = runner.invoke(app, ["merge", str(adapters["adapter"] / "adapter"), "--model", "tiny-llama",
                              "--out", str(tmp_path / "merged")])
    assert_one_line_error(res, "non-linear")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("method", ["lora", "pissa", "svfit", "none"])
def test_merged_checkpoints_load_with_plain_transformers(tmp_path, demo_paths, adapters, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft import load_peft

    adapter = adapters[method] / "adapter"
    res = runner.invoke(app, ["merge", str(adapter), "--model", "tiny-llama", "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    base, _ = load_model_and_tokenizer("tiny-llama", tokenizer_dir=str(adapter))
    adapted = load_peft(base, adapter)
    ids = torch.tensor([tok.encode("a fine film it was great")])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, adapted(ids).logits, atol=1e-5)


def test_eval_rebuilds_the_trained_tiny_base(demo_paths, adapters):
    """The run's last evaluation and `slimtune eval --adapter` see the same model (same tokenizer, same base)."""
    for method in ("lora", "svfit", "none"):
        res = eval_cli(adapters[method] / "adapter", demo_paths)
        assert res.exit_code == 0, res.output
        final = [json.loads(l) for l in (adapters[method] / "metrics.jsonl").read_text().splitlines()][-1]
        assert json.loads(res.stdout)["loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


def test_a_stale_pissa_init_does_not_touch_a_later_lora_adapter(tmp_path, demo_paths):
    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft import PeftSettings, apply_peft, load_peft

    out = tmp_path / "run"
    model, _ = load_model_and_tokenizer("tiny-llama", texts=["a b c"])
    apply_peft(model, PeftSettings("pissa", r=2), work_dir=out)  # what a PiSSA run that failed early leaves behind
    assert (out / "pissa_init").exists()
    res = runner.invoke(app, ["train", "--data", demo_paths[0], "--eval-data", demo_paths[1], "--model", "tiny-llama",
                              "--optimizer", "adamw", "--lr", "1e-2", "--peft", "lora", "--r", "2", "--steps", "3",
                              "--eval-every", "3", "--batch-size", "4", "--save", "last", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    final = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    evaluated = json.loads(eval_cli(out / "adapter", demo_paths).stdout)
    assert evaluated["loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


def test_multi_token_label_words_and_trailing_template_space_warn(tmp_path):
    from slimtune.data import get_task
    from slimtune.train.classification import label_token_ids

    with pytest.warns(UserWarning, match="ends with whitespace"):
        task = get_task("custom", template="{sentence} It was ", label_words="0=bad,1=good")
    assert not task.template.endswith(" ")
    tok = _gpt2_like_tokenizer()
    multi = get_task("custom", template="{sentence} It was", label_words="0=abysmal,1=good")
    with pytest.warns(UserWarning, match="scored by its first token"):
        label_token_ids(tok, multi)


def _gpt2_like_tokenizer():
    """A byte-level BPE tokenizer trained here (no hub) in which ' abysmal' is several tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["it was good", "it was bad", " good good good", " abs", " mal"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def test_adapter_bytes_report_what_is_written(adapters):
    for method in ("lora", "svfit", "adapter"):
        summary = json.loads((adapters[method] / "summary.json").read_text())
        weights = next(Path(adapters[method] / "adapter").glob("*.safetensors"))
        assert summary["adapter_bytes"] <= weights.stat().st_size < summary["adapter_bytes"] + 64 * 1024
    svfit = json.loads((adapters["svfit"] / "summary.json").read_text())
    assert svfit["adapter_bytes"] > 10 * svfit["trainable_bytes"]  # U and V are saved too

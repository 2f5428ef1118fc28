"""Review of the one adapter loader (peft/registry.py: write_adapter, read_adapter), the base fingerprint, the one
"--eval-data is the training data" rule and the hostile rows' full-dev verdict (fifth review round).

Each test failed on the code before its fix."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from test_federated import InProcessGrid, make_cfg, task_identity  # noqa: F401 (fixture)
from slimtune import SlimtuneError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"
TRAIN, DEV = str(DEMO / "sst2_demo_train.tsv"), str(DEMO / "sst2_demo_dev.tsv")
SMOLLM2_CONFIG = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30}


def tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A tiny-llama saved as a plain transformers checkpoint (config.json, model.safetensors, tokenizer)."""
    from slimtune.models.loading import tiny_model, tiny_tokenizer
    tok = tiny_tokenizer(["a great movie"])
    tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id, seed=seed).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def lora_adapter(directory: Path, meta: dict) -> Path:
    """An adapter directory as check_adapter sees it: the LoRA config, and slimtune.json recording `meta`."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text("{}")
    (directory / "slimtune.json").write_text(json.dumps(meta))
    return directory


# -- the base fingerprint --------------------------------------------------------------------------------------------
def test_a_path_to_a_builtins_own_checkpoint_is_that_builtin(tmp_path, monkeypatch):
    """`--model smollm2` loads the cached checkpoint ~/.cache/slimtune/smollm2-135m-instruct; an adapter trained with
    `--model smollm2` was refused by `eval --model ~/.cache/slimtune/smollm2-135m-instruct` (or a copy of it) as
    'another model', and one trained on that path was refused by `eval --model smollm2`. Another checkpoint of the
    same architecture is still another base."""
    from slimtune.models.loading import base_fingerprint
    from slimtune.peft.registry import adapter_meta, check_adapter

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "smollm2-135m-instruct"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    (cached / "model.safetensors").write_bytes(os.urandom(300_000))
    copy = tmp_path / "elsewhere" / "smollm2"
    shutil.copytree(cached, copy)

    by_name = lora_adapter(tmp_path / "by-name", adapter_meta("smollm2"))
    by_path = lora_adapter(tmp_path / "by-path", adapter_meta(str(cached)))
    for model in (str(cached), str(copy)):
        check_adapter(by_name, model)  # raised "--model ... is another model"
        check_adapter(by_path, model)
    check_adapter(by_path, "smollm2")  # raised too
    other = tmp_path / "fine-tuned-smollm2"
    shutil.copytree(cached, other)
    (other / "model.safetensors").write_bytes(os.urandom(300_000))
    assert base_fingerprint(str(other)) != base_fingerprint(str(cached))
    for adapter in (by_name, by_path):
        with pytest.raises(SlimtuneError, match="another model"):
            check_adapter(adapter, str(other))


def test_the_fingerprint_reads_only_the_weights_the_loader_reads(tmp_path):
    """The fingerprint covered every *.bin/*.pt/*.safetensors/*.gguf file of the directory: an adapter trained on a
    Trainer checkpoint (checkpoint-500/ with optimizer.pt, scheduler.pt, training_args.bin) was refused as 'another
    model' once optimizer.pt was deleted to save space, and one trained on a hub download holding model.safetensors
    and pytorch_model.bin once the unused .bin was removed; a .gguf directory changed with any other .gguf added."""
    from slimtune.models.loading import base_fingerprint

    base = tiny_checkpoint(tmp_path / "checkpoint-500")
    clean = base_fingerprint(str(base))
    for name in ("optimizer.pt", "scheduler.pt", "training_args.bin", "pytorch_model.bin"):
        (base / name).write_bytes(os.urandom(50_000))
    assert base_fingerprint(str(base)) == clean
    (base / "model.safetensors").write_bytes(os.urandom(50_000))
    assert base_fingerprint(str(base)) != clean  # the weights it loads: still another base

    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "a-Q4.gguf").write_bytes(os.urandom(50_000))
    first = base_fingerprint(str(gguf))
    (gguf / "b-Q8.gguf").write_bytes(os.urandom(50_000))  # load_local reads the first .gguf only
    assert base_fingerprint(str(gguf)) == first


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc/self/mem (unreadable at 0)")
def test_an_unreadable_weights_file_is_a_one_line_error_not_a_traceback(tmp_path):
    """base_fingerprint read the base's files with no guard: an unreadable weights file (permissions, I/O error)
    made `slimtune eval --adapter` fail with a traceback before load_local could say what is wrong, and the end of a
    training run (adapter_meta) lose its adapter."""
    from slimtune.cli import app
    from slimtune.peft.registry import adapter_meta

    base = tiny_checkpoint(tmp_path / "base")
    (base / "model.safetensors").unlink()
    os.symlink("/proc/self/mem", base / "model.safetensors")  # a regular file whose every read fails (EIO)
    assert adapter_meta(str(base))["base_fingerprint"] is None  # raised OSError
    adapter = lora_adapter(tmp_path / "adapter", {"base_model": "x", "base_fingerprint": "sha256:0"})
    res = CliRunner().invoke(app, ["eval", "--data", DEV, "--model", str(base), "--adapter", str(adapter)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1, res.stderr


# -- write_adapter -----------------------------------------------------------------------------------------------------
def tiny_peft(method: str):
    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft import PeftSettings, apply_peft
    model, tok = load_model_and_tokenizer("tiny-llama", texts=["a great movie"])
    model = apply_peft(model, PeftSettings(method, r=2))
    with torch.no_grad():  # a moved adapter: what it holds shows in the outputs
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model, tok


def logits(model, tok):
    ids = tok("a great movie", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_keep_others_replaces_an_adapter_of_another_kind(tmp_path):
    """The Hugging Face trainer's save_model writes an SVFit model with keep_others into its output directory; a LoRA
    saved there before (adapter_config.json) stayed, and read_adapter, which reads adapter_config.json first, loaded
    that stale LoRA instead of the model just saved, without a word."""
    from slimtune.peft.registry import read_adapter, write_adapter

    out = tmp_path / "hf-output"
    lora, tok = tiny_peft("lora")
    write_adapter(lora, tok, out, keep_others=True)
    (out / "trainer_state.json").write_text("{}")  # the trainer's own file: kept
    svfit, _ = tiny_peft("svfit")
    write_adapter(svfit, tok, out, meta={"dtype": "float32"}, keep_others=True)
    assert not (out / "adapter_config.json").exists() and (out / "trainer_state.json").exists()
    loaded, _ = read_adapter(out, "tiny-llama")
    assert torch.allclose(logits(loaded, tok), logits(svfit, tok), atol=1e-6)


def test_hf_save_model_of_a_plain_model_drops_slimtunes_stale_adapter(tmp_path):
    """A full fine-tune saved by ZOTrainer.save_model into a directory where an SVFit save left
    slimtune_adapter_config.json: read_adapter (slimtune eval --adapter) loaded the stale SVFit adapter on the base
    instead of the model just saved."""
    datasets = pytest.importorskip("datasets")
    from transformers import TrainingArguments

    from slimtune.hf import ZOArguments, ZOTrainer
    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft.registry import read_adapter, write_adapter

    out = tmp_path / "hf-output"
    svfit, tok = tiny_peft("svfit")
    write_adapter(svfit, tok, out, meta={"dtype": "float32"}, keep_others=True)
    full, _ = load_model_and_tokenizer("tiny-llama", texts=["a great movie"])
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = ZOTrainer(model=full, args=TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True,
                                                           disable_tqdm=True),
                        train_dataset=datasets.Dataset.from_list([{"input_ids": [1, 2], "labels": [1, 2]}]),
                        processing_class=tok, zo_args=ZOArguments(optimizer="mezo", lr=0.05, eps=1e-2))
    trainer.save_model(str(out))
    loaded, _ = read_adapter(out, "tiny-llama")
    assert torch.allclose(logits(loaded, tok), logits(full, tok), atol=1e-6)


def test_write_adapter_into_the_current_directory(tmp_path, monkeypatch):
    """`trainer.save_model(".")` (or output_dir=".") with an SVFit model: write_adapter built its temporary directory
    from the path's name, which "." does not have (ValueError: PosixPath('.') has an empty name)."""
    from slimtune.peft.registry import read_adapter, write_adapter

    monkeypatch.chdir(tmp_path)
    svfit, tok = tiny_peft("svfit")
    write_adapter(svfit, tok, ".", meta={"dtype": "float32"}, keep_others=True)
    write_adapter(svfit, tok, "./", meta={"dtype": "float32"}, keep_others=True)
    loaded, _ = read_adapter(tmp_path, "tiny-llama")
    assert torch.allclose(logits(loaded, tok), logits(svfit, tok), atol=1e-6)


# -- a private federated run's saved tokenizer -----------------------------------------------------------------------
def test_a_private_federated_runs_adapter_lists_no_training_words(tmp_path, demo_paths):
    """The server now saves its tokenizer with the adapter; on a tiny model that tokenizer is fitted to the clients'
    training texts (--data), so a private run (local DP clients, or client-level DP) wrote every distinct word of the
    clients' data beside its noised adapter (slimtune train fits a private run's tokenizer to evaluation texts only)."""
    from slimtune.federated.server_app import run_server
    from slimtune.models.loading import tiny_tokenizer

    cfg = make_cfg(demo_paths, bits=8, local_optimizer="dp-sgd", local_dp_noise=1.0, rounds=1, num_clients=2,
                   out_dir=str(tmp_path / "run"), eval_max=8)
    run_server(InProcessGrid(2), cfg)
    public = set(tiny_tokenizer(Path(DEV).read_text().splitlines()).get_vocab())
    training_only = set(tiny_tokenizer(Path(TRAIN).read_text().splitlines()).get_vocab()) - public
    assert training_only  # the check is not vacuous
    tokenizer = tmp_path / "run" / "adapter" / "tokenizer.json"
    saved = set(json.loads(tokenizer.read_text())["model"]["vocab"]) if tokenizer.exists() else set()
    assert not saved & training_only, sorted(saved & training_only)[:5]
    # eval refuses it in one line (the tiny base cannot be rebuilt without the run's tokenizer), never silently
    from slimtune.cli import app
    res = CliRunner().invoke(app, ["eval", "--data", DEV, "--model", "tiny-llama", "--adapter",
                                   str(tmp_path / "run" / "adapter")])
    assert res.exit_code == 2 and "tokenizer" in res.stderr, res.output


# -- same_source -------------------------------------------------------------------------------------------------------
def test_same_source_sees_a_hard_link_and_a_split_less_saved_dataset(tmp_path):
    """same_source compared resolved paths: a hard link of the training file passed the check before the model
    loaded; and hf:DIR was never 'the same', although a plain Dataset saved with save_to_disk (no splits) is read
    whole on both sides, --data hf:DIR and --eval-data hf:DIR are then the very same rows."""
    import datasets

    from slimtune.data.readers import same_source

    linked = tmp_path / "eval.tsv"
    os.link(TRAIN, linked)
    assert same_source(TRAIN, str(linked))
    copied = tmp_path / "copy.tsv"
    shutil.copy(TRAIN, copied)
    assert not same_source(TRAIN, str(copied))  # a copy is for the row-overlap check, not this one

    plain = tmp_path / "plain"
    datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1]}).save_to_disk(str(plain))
    assert same_source(f"hf:{plain}", f"hf:{plain}") and same_source(f"hf:{plain}", f"hf:{plain}/")
    split = tmp_path / "split"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"sentence": ["a"], "label": [0]}),
                          "validation": datasets.Dataset.from_dict({"sentence": ["b"], "label": [1]})}
                         ).save_to_disk(str(split))
    assert not same_source(f"hf:{split}", f"hf:{split}")  # train split vs validation split


# -- the hostile rows' full-dev verdict --------------------------------------------------------------------------------
def bench_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import federated_attacks
    return federated_attacks


def row(attack, accuracy, full=None, examples=872, data="dev.tsv"):
    return {"setup": {"attack": attack, "hostile_clients": 1 if attack else 0, "clients": 8, "robust": "direction",
                      "reference": "honest-direction", "clients_per_round": 4},
            "final_accuracy": accuracy, "rounds": 30, "accepted_updates": 120, "round_metrics": [],
            **({"full_dev": {"accuracy": full, "examples": examples, "data": data}} if full is not None else {})}


def test_judged_gap_compares_full_dev_scores_only_on_the_same_set(monkeypatch):
    """judged_gap read 'full dev' whenever both rows had a full_dev record, even when the two were scored on
    different sets (another dev file, another number of rows): a gap between two different sets decided the
    verdict."""
    bench = bench_module(monkeypatch)
    honest = row(None, 0.90, full=0.86)
    same = row("sign-flip", 0.85, full=0.85)
    assert bench.judged_gap(same, honest) == (pytest.approx(-1.0), "full dev")
    for other in (row("sign-flip", 0.85, full=0.85, examples=200),
                  row("sign-flip", 0.85, full=0.85, data="dev-subset.tsv")):
        gap, on = bench.judged_gap(other, honest)
        assert on == "200 dev" and gap == pytest.approx(-5.0)


def test_rerunning_the_hostile_grid_keeps_the_rows_full_dev_scores(monkeypatch, tmp_path):
    """run_hostile rewrites every finished row of its grid from the run's summary; that dropped the full_dev score
    rescore_full_dev had added, so `--hostile all` run again to fill in a missing row silently turned the finished
    rows' verdicts back to the 200-row set."""
    import argparse
    bench = bench_module(monkeypatch)
    out = tmp_path / "hostile"
    path = out.with_suffix(".json")
    stored = {}
    for name in ("sign-flip-1of8", "honest"):
        (out / name).mkdir(parents=True)
        (out / name / "summary.json").write_text(json.dumps({"final_accuracy": 0.9, "accepted_updates": 8}))
        (out / name / "metrics.jsonl").write_text(json.dumps({"round": 1, "server_accuracy": 0.9}) + "\n")
        stored[name] = {"final_accuracy": 0.9, "accepted_updates": 8, "round_metrics": [], "setup": {},
                        "full_dev": {"accuracy": 0.86, "examples": 872, "data": "dev.tsv"}}
    path.write_text(json.dumps(stored))
    args = argparse.Namespace(hostile=["sign-flip"], hostile_clients=[1], clients=8, clients_per_round=4, rounds=30,
                              local_steps=2, lr=1e-2, hostile_out=out, robust="none")

    def never(*_):
        raise AssertionError("a finished row is not run again")

    results = bench.run_hostile(args, Path(TRAIN), Path(DEV), runner=never)
    assert results["honest"]["full_dev"]["accuracy"] == results["sign-flip-1of8"]["full_dev"]["accuracy"] == 0.86
    # a row that is run again (its directory was deleted) is a new theta: its old full-dev score goes
    shutil.rmtree(out / "honest")

    def rerun(cfg, attack, hostile):
        Path(cfg.out_dir).mkdir(parents=True)
        (Path(cfg.out_dir) / "summary.json").write_text(json.dumps({"final_accuracy": 0.8, "accepted_updates": 8}))
        (Path(cfg.out_dir) / "metrics.jsonl").write_text("")

    results = bench.run_hostile(args, Path(TRAIN), Path(DEV), runner=rerun)
    assert "full_dev" not in results["honest"] and results["sign-flip-1of8"]["full_dev"]["accuracy"] == 0.86


def test_a_recorded_fingerprint_that_is_not_a_string_is_a_one_line_error(tmp_path):
    """slimtune.json's base_fingerprint is compared by membership (base_identities): a hand-edited list there raised
    TypeError (unhashable) instead of naming the file."""
    from slimtune.peft.registry import check_adapter
    adapter = lora_adapter(tmp_path / "adapter", {"base_model": "x", "base_fingerprint": ["sha256:0"]})
    with pytest.raises(SlimtuneError, match="slimtune.json: base_fingerprint"):
        check_adapter(adapter, "tiny-llama")


def test_a_resume_accepts_the_same_files_spelled_another_way(tmp_path, monkeypatch):
    """`--resume` compared path settings as strings: the 10,000-step benchmark run, started with
    --data ../shared/data/sst2/train.tsv, was refused when resumed with the absolute path of the same file
    ('settings differ ... train_data'). Paths now compare as files (data.readers.same_path); another file is still
    refused."""
    import shutil

    from slimtune.train import TrainConfig
    from slimtune.train.resume import as_json, differences

    (tmp_path / "data").mkdir()
    for name in ("train.tsv", "dev.tsv", "other.tsv"):
        shutil.copy(Path(__file__).resolve().parents[1] / "slimtune" / "data" / "demo" / "sst2_demo_train.tsv",
                    tmp_path / "data" / name)
    monkeypatch.chdir(tmp_path)
    stored = as_json(TrainConfig(out_dir="run", train_data="data/train.tsv", eval_data="./data/dev.tsv"))
    same = TrainConfig(out_dir="run", train_data=str(tmp_path / "data" / "train.tsv"),
                       eval_data=str(tmp_path / "data" / "dev.tsv"))
    assert differences(same, stored)[0] == []
    other = TrainConfig(out_dir="run", train_data=str(tmp_path / "data" / "other.tsv"), eval_data="data/dev.tsv")
    refused = differences(other, stored)[0]
    assert len(refused) == 1 and refused[0].startswith("train_data:")

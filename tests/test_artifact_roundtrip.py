"""What one command writes, another reads back as the same model.

Producers of a model: `slimtune train` (each --peft, --dtype, --base-quant, --save, resumed), the Hugging Face
Trainer integration (`ZOTrainer.save_model`), `slimtune federate`, `slimtune merge`. Consumers: `slimtune eval`,
`generate`, `merge`, and the Python loader `slimtune.peft.read_adapter` (the one loader the commands use). A consumer
must rebuild the producer's model (the metrics `eval` reports equal the run's own evaluation in summary.json), and
must refuse, with one line naming the path and exit code 2, an adapter of another base and a broken adapter
directory, instead of evaluating another model or failing with an internal error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_review_findings import DEV, TRAIN, cli  # the demo files and the CLI runner


def train(out: Path, *extra, model: str = "tiny-llama", steps: int = 4) -> dict:
    """A short first-order run (its adapter moves in 4 steps) evaluated every 2 steps; returns summary.json."""
    res = cli("train", "--data", TRAIN, "--eval-data", DEV, "--model", model, "--steps", steps, "--eval-every", 2,
              "--batch-size", 8, "--optimizer", "adamw", "--lr", "2e-2", "--lr-scheduler", "constant", "--quiet",
              "--out", out, *extra)
    assert res.exit_code == 0, res.output
    return json.loads((out / "summary.json").read_text())


def evaluate(*args) -> dict:
    res = cli("eval", "--data", DEV, *args)
    assert res.exit_code == 0, res.output
    return json.loads(res.output[res.output.index("{"):])


def assert_refused(res, path) -> None:
    """Exit 2, one line on stderr starting with "error:" and naming `path`, no traceback."""
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert str(path) in lines[0] and "Traceback" not in res.output, lines[0]


def consumers(adapter, model="tiny-llama", tmp=None):
    """(name, result) of eval, generate and merge of `adapter` on --model `model`."""
    merged = Path(tmp or adapter.parent) / "merged-by-test"
    shutil.rmtree(merged, ignore_errors=True)
    return [("eval", cli("eval", "--data", DEV, "--model", model, "--adapter", adapter)),
            ("generate", cli("generate", "--prompt", "a great movie", "--max-new-tokens", 3, "--model", model,
                             "--adapter", adapter)),
            ("merge", cli("merge", adapter, "--model", model, "--out", merged))]


@pytest.fixture(scope="module")
def zero_shot():
    return evaluate("--model", "tiny-llama")


# -- every PEFT method: train -> eval, merge -> eval, the Python loader --------------------------------------------
@pytest.mark.parametrize("peft", ["lora", "pissa", "adapter", "svfit", "none"])
def test_each_peft_method_reads_back_as_the_run_evaluated_it(tmp_path, peft, zero_shot):
    summary = train(tmp_path / "run", "--peft", peft, "--save", "last")
    adapter = tmp_path / "run" / "adapter"
    final = summary["final_eval"]
    assert final["loss"] != pytest.approx(zero_shot["loss"], rel=1e-6)  # the adapter moved: the check is not vacuous
    assert evaluate("--model", "tiny-llama", "--adapter", adapter)["loss"] == pytest.approx(final["loss"], rel=1e-9)

    from slimtune.peft import read_adapter
    from slimtune.train.objectives import make_objective
    model, tok = read_adapter(adapter, "tiny-llama")
    objective = make_objective("sst2")
    raw, _ = objective.load(DEV, "validation")
    objective.bind(tok)
    assert objective.evaluate(model, objective.examples(raw, tok), "cpu")["loss"] == pytest.approx(final["loss"],
                                                                                                    rel=1e-9)

    res = cli("merge", adapter, "--model", "tiny-llama", "--out", tmp_path / "merged")
    if peft == "adapter":  # non-linear: cannot be folded into the weights
        assert_refused(res, "")
        return
    assert res.exit_code == 0, res.output
    assert evaluate("--model", tmp_path / "merged")["loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_best_adapter_of_a_resumed_run_reads_back(tmp_path):
    # the earlier SST-2 prompt: from it this tiny random model's accuracy rises past step 0 within the 6 steps, so the
    # best adapter is a trained one (from the new prompt it stays at 0.5: the best would be step 0's, a vacuous check)
    train(tmp_path / "run", "--peft", "lora", "--checkpoint-every", 2, "--template", "{sentence} It was",
          "--label-words", "0=terrible,1=great", steps=2)
    res = cli("train", "--out", tmp_path / "run", "--resume", "--steps", 6, "--quiet")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["best_step"] > 0
    got = evaluate("--model", "tiny-llama", "--adapter", tmp_path / "run" / "adapter")
    assert got["loss"] == pytest.approx(summary["best_eval"]["loss"], rel=1e-9)


# -- the base the run trained on: its dtype and quantization ---------------------------------------------------------
@pytest.mark.parametrize("flags", [["--dtype", "bf16"], ["--base-quant", "int8"], ["--base-quant", "int4", "--dtype",
                                                                                     "bf16"]],
                         ids=["bf16", "int8", "int4-bf16"])
def test_a_run_in_another_dtype_reads_back_in_that_dtype(tmp_path, flags):
    """eval rebuilds the run's base: bf16 weights (not fp32), the quantized base in the run's compute dtype."""
    if "--base-quant" in flags:
        pytest.importorskip("bitsandbytes")
    summary = train(tmp_path / "run", "--peft", "lora", "--save", "last", *flags)
    got = evaluate("--model", "tiny-llama", "--adapter", tmp_path / "run" / "adapter")
    assert got["loss"] == pytest.approx(summary["final_eval"]["loss"], rel=1e-5)  # bnb's kernels: ~1e-6 apart


# -- refusals: another base, a missing tokenizer, broken files --------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """lora, svfit and full (--peft none) runs on tiny-llama, a merged checkpoint, and a lora run on that checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    for peft in ("lora", "svfit", "none"):
        train(root / peft, "--peft", peft, "--save", "last")
    assert cli("merge", root / "lora" / "adapter", "--model", "tiny-llama", "--out", root / "merged").exit_code == 0
    train(root / "on-merged", "--peft", "lora", "--save", "last", model=str(root / "merged"))
    return root


@pytest.mark.parametrize("peft", ["lora", "svfit", "none"])
def test_an_adapter_of_another_architecture_is_refused(runs, peft, tmp_path):
    adapter = runs / peft / "adapter"
    for name, res in consumers(adapter, "tiny-gpt2", tmp_path):
        assert_refused(res, adapter)


def test_an_adapter_of_another_checkpoint_with_the_same_shapes_is_refused(runs, tmp_path):
    """A LoRA trained on a local checkpoint fits every model of its architecture; on another base (here tiny-llama,
    the checkpoint's own origin) it would evaluate another model without a word."""
    adapter = runs / "on-merged" / "adapter"
    for name, res in consumers(adapter, "tiny-llama", tmp_path):
        assert_refused(res, adapter)
    summary = json.loads((runs / "on-merged" / "summary.json").read_text())
    moved = tmp_path / "moved-checkpoint"  # the same checkpoint elsewhere is the same base
    shutil.copytree(runs / "merged", moved)
    got = evaluate("--model", moved, "--adapter", adapter)
    assert got["loss"] == pytest.approx(summary["final_eval"]["loss"], rel=1e-9)


def test_an_adapter_without_its_tokenizer_is_refused_on_a_tiny_model(runs, tmp_path):
    """Tiny models fit their vocabulary to the run's texts: without the saved tokenizer another base is built."""
    adapter = tmp_path / "adapter"
    shutil.copytree(runs / "lora" / "adapter", adapter)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (adapter / name).unlink()
    for name, res in consumers(adapter, "tiny-llama", tmp_path):
        assert_refused(res, adapter)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


BROKEN = {  # name: (run, what is done to its adapter directory)
    "lora-weights-truncated": ("lora", lambda d: _truncate(d / "adapter_model.safetensors")),
    "full-weights-truncated": ("none", lambda d: _truncate(d / "model.safetensors")),
    "tokenizer-truncated": ("lora", lambda d: _truncate(d / "tokenizer.json")),
    "meta-not-an-object": ("lora", lambda d: (d / "slimtune.json").write_text("[1]")),
    "meta-unknown-quant": ("lora", lambda d: (d / "slimtune.json").write_text('{"base_quant": "int3"}')),
    "interrupted-swap": ("lora", lambda d: (shutil.copytree(d, d.with_name("adapter.tmp")),
                                            shutil.move(d, d.with_name("adapter.old")))),  # write_adapter's crash
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_adapter_directory_is_a_one_line_error(runs, tmp_path, case):
    run, damage = BROKEN[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(runs / run / "adapter", adapter)
    damage(adapter)
    for name, res in consumers(adapter, "tiny-llama", tmp_path):
        assert_refused(res, adapter)


# -- the Hugging Face Trainer as a producer ---------------------------------------------------------------------------
def hf_train(tmp_path: Path, peft: str, dtype: torch.dtype = torch.float32, steps: int = 4,
             processing_class: bool = False):
    """A few ZOTrainer steps on the demo data, saved with save_model to tmp_path / "adapter"; returns (model,
    tokenizer, adapter directory). Without `processing_class` the tokenizer reaches the trainer through the collator
    only."""
    datasets = pytest.importorskip("datasets")
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    import slimtune
    from slimtune.data import get_task, read_examples
    from slimtune.hf import ZOArguments, ZOTrainer
    from slimtune.models import load_model_and_tokenizer

    task = get_task("sst2")
    examples = read_examples(TRAIN, task)
    model, tok = load_model_and_tokenizer("tiny-llama", dtype, texts=[e.prompt for e in examples])
    model = slimtune.apply_peft(model, peft, r=4)
    words = [tok(w, add_special_tokens=False)["input_ids"][0] for w in task.label_words]
    rows = []
    for e in examples:
        prompt = tok(e.prompt, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt + [words[e.label]], "labels": [-100] * len(prompt) + [words[e.label]]})
    trainer = ZOTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=steps,
                                                            per_device_train_batch_size=8, save_strategy="no",
                                                            report_to=[], use_cpu=True, disable_tqdm=True),
                        train_dataset=datasets.Dataset.from_list(rows),
                        processing_class=tok if processing_class else None,
                        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
                        zo_args=ZOArguments(optimizer="mezo", lr=0.05, eps=1e-2))
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    return model, tok, tmp_path / "adapter"


def in_process_eval(model, tok) -> dict:
    from slimtune.train.objectives import make_objective
    objective = make_objective("sst2")
    raw, _ = objective.load(DEV, "validation")
    objective.bind(tok)
    return objective.evaluate(model, objective.examples(raw, tok), "cpu")


@pytest.mark.parametrize("peft", ["lora", "svfit", "adapter"])
def test_hf_trainer_save_model_reads_back_with_slimtune_eval(tmp_path, peft):
    model, tok, adapter = hf_train(tmp_path, peft)
    got = evaluate("--model", "tiny-llama", "--adapter", adapter)
    assert got["loss"] == pytest.approx(in_process_eval(model, tok)["loss"], rel=1e-9)


def test_a_checkpoint_whose_weights_do_not_fit_its_architecture_is_refused(tmp_path):
    """transformers would initialise the missing weights at random and load the rest: another model, silently."""
    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft import PeftSettings, apply_peft

    model, tok = load_model_and_tokenizer("tiny-llama", texts=["a great movie"])
    apply_peft(model, PeftSettings("svfit", r=2)).save_pretrained(tmp_path / "wrapped")  # wrapper keys, not the model's
    tok.save_pretrained(tmp_path / "wrapped")
    assert_refused(cli("eval", "--data", DEV, "--model", tmp_path / "wrapped"), tmp_path / "wrapped")
    assert_refused(cli("eval", "--data", DEV, "--model", "tiny-llama", "--adapter", tmp_path / "wrapped"),
                   tmp_path / "wrapped")


# -- federated ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_federated_zo_seeds_adapter_reads_back(tmp_path):
    """The server's adapter of a zo-seeds run (the default mode is checked in test_federated_attacks)."""
    import os
    import subprocess
    import sys
    out = tmp_path / "fed"
    res = subprocess.run([sys.executable, "-m", "slimtune.cli", "federate", "--data", TRAIN, "--eval-data", DEV,
                          "--model", "tiny-llama", "--clients", "2", "--rounds", "2", "--mode", "zo-seeds",
                          "--lr", "5e-2", "--eps", "1e-2", "--out", str(out)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    got = evaluate("--model", "tiny-llama", "--adapter", out / "adapter")
    assert got["accuracy"] == pytest.approx(summary["final_accuracy"])
    assert_refused(cli("eval", "--data", DEV, "--model", "tiny-gpt2", "--adapter", out / "adapter"), out / "adapter")

"""Review 36: data-parallel ZO (torchrun) and --resume across optimizers, as a careless user drives them.

What held (probed, not repeated here): 2 gloo ranks follow the one-process trajectory bit for bit with shards of
different sizes (--batch-size 3) and with an empty shard (--batch-size 1); an interrupted run (a real SIGINT after
step 4, linear schedule with warm-up) resumes bit for bit for dphizoo, dplozo, dphybrid, sgd with momentum, mezo with
n-SPSA 2 and weight decay, lozo-m on full weights, fzoo with the pool, dp-sgd. Each test below fails on the code it was
written against.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune.optim import OptimizerArgs
from slimtune.peft import PeftSettings
from slimtune.train import TrainConfig, prepare, train
from test_bad_input_table import TINY, cli
from test_distributed import free_port


def config(tmp_path, demo_paths, **kw):
    train_path, dev_path = demo_paths
    base = dict(out_dir=str(tmp_path / "run"), train_data=train_path, eval_data=dev_path, model="tiny-llama",
                optimizer="mezo", optim=OptimizerArgs(lr=1e-2, eps=1e-2), peft=PeftSettings("lora", r=2), steps=8,
                batch_size=8, eval_every=1, checkpoint_every=3, eval_max=16, lr_scheduler="constant",
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_resuming_an_early_stopped_run_does_not_train_past_where_it_stopped(tmp_path, demo_paths, monkeypatch):
    """--patience 2 stopped the run at step 2 (status.json: completed, stop_reason 'early stopping'). `--resume` with
    the same settings (nothing changed, so the uninterrupted trajectory ends at step 2) trains step 3, evaluates,
    stops again, and rewrites adapter/ (--save last) and summary.json: the loop only looks at `steps`; the checkpoint
    keeps evals_without_improvement (2 >= patience) but nothing checks it before the next step."""
    import slimtune.train.trainer as T
    monkeypatch.setattr(T, "is_better", lambda metric, new, old: old is None)  # only the zero-shot point is best
    cfg = dict(patience=2, save="last")
    first = train(prepare(config(tmp_path, demo_paths, **cfg)))
    assert (first["steps"], first["stop_reason"]) == (2, "early stopping")
    again = train(prepare(config(tmp_path, demo_paths, **cfg), resume=True))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert again["steps"] == 2 and steps == [0, 1, 2], (again["steps"], steps)


def test_the_best_adapter_on_disk_is_the_one_the_summary_names_after_a_resume(tmp_path, demo_paths, monkeypatch):
    """--save best: a failure at step 5 left adapter/ saved at step 4 (the best evaluation) and a checkpoint at
    step 3, whose best_step is 0. The resume (here with --eval-every 3, an allowed change; a private run's replay
    with fresh noise does the same) never re-evaluates step 4, so summary.json says 'best (step 0)' with step 0's
    metrics while adapter/ holds the step-4 weights of a trajectory metrics.jsonl no longer shows (truncated after
    step 3). What `eval --adapter` scored was not what the summary reported. Now a new best adapter is checkpointed
    with it, so a resume never starts before the model adapter/ holds."""
    import slimtune.train.trainer as T
    from slimtune import SlimtuneError
    calls = []

    def better(metric, new, old):  # the zero-shot point, then the step-4 evaluation of the first attempt
        calls.append(1)
        return old is None or len(calls) == 5
    monkeypatch.setattr(T, "is_better", better)
    step_ = T._step

    def failing(run, step):
        if step == 4:
            raise SlimtuneError("disk full (simulated)")
        return step_(run, step)
    monkeypatch.setattr(T, "_step", failing)
    with pytest.raises(SlimtuneError):
        train(prepare(config(tmp_path, demo_paths, steps=6)))
    assert any(load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))[k].abs().sum() > 0
               for k in load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors")))  # step 4's
    monkeypatch.setattr(T, "_step", step_)
    calls.clear()
    calls.extend([1] * 10)  # no evaluation of the resumed run is better
    run = prepare(config(tmp_path, demo_paths, steps=6, eval_every=3), resume=True)
    assert run.start_step == 4  # a new best adapter is checkpointed with it: the resume starts at its step
    summary = train(run)
    assert summary["saved_adapter"] == "best (step 4)", summary["saved_adapter"]
    on_disk = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 4 in steps  # the evaluation the summary names is still in the log
    assert any(v.abs().sum() > 0 for k, v in on_disk.items() if "lora_B" in k)


def test_a_stray_world_size_is_one_line_not_an_internal_error(tmp_path, demo_paths, monkeypatch):
    """distributed.setup trusts WORLD_SIZE: set in the shell (a job scheduler's, an earlier export) without torchrun,
    `slimtune train` ends in 'internal error (ValueError: Error initializing torch.distributed using env://
    rendezvous: environment variable RANK expected, but not set); please report it', and WORLD_SIZE=abc in
    'internal error (ValueError: invalid literal for int()...'. Bad input: one line naming WORLD_SIZE, exit 2."""
    for value, extra in (("2", {}), ("abc", {})):
        monkeypatch.setenv("WORLD_SIZE", value)
        for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name, raising=False)
        res = cli("train", *TINY, "--data", demo_paths[0], "--steps", "1", "--batch-size", "4", "--eval-every", "0",
                  "--quiet", "--r", "2", "--out", tmp_path / f"run{value}")
        assert res.exit_code == 2 and "internal error" not in res.output and "WORLD_SIZE" in res.output, res.output
        assert not (tmp_path / f"run{value}").exists()


def _torchrun(argv, ranks, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    cmd = [sys.executable, "-m", "slimtune.cli", *argv] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "slimtune.cli", *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]


def _args(demo_paths, out, steps, *extra):
    return ["train", "--data", demo_paths[0], "--model", "tiny-llama", "--optimizer", "mezo", "--peft-r", "2",
            "--lr", "1e-2", "--eps", "1e-2", "--steps", str(steps), "--batch-size", "8", "--eval-every", "0",
            "--checkpoint-every", "3", "--lr-scheduler", "constant", "--save", "last", "--quiet", "--out", str(out),
            *extra]


def test_bytes_communicated_counts_the_steps_each_world_ran(tmp_path, demo_paths):
    """summary.json's bytes_communicated is steps x the current world's bytes per step: 3 steps on 2 ranks then
    resumed in one process to step 6 reports 0 bytes (the 2-rank steps sent 3 x 2 forwards x 2 ranks x 16 B), and
    data_parallel_ranks 1; resumed the other way round it would report 6 steps of 2 ranks."""
    _torchrun(_args(demo_paths, tmp_path / "run", 3), 2)
    _torchrun(_args(demo_paths, tmp_path / "run", 6, "--resume"), 1)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bytes_communicated"] == 3 * 2 * 2 * 16, summary["bytes_communicated"]


def test_data_parallel_ranks_leave_no_temporary_directories(tmp_path, demo_paths):
    """trainer._build gives every rank but 0 `work_dir=Path(tempfile.mkdtemp())` for apply_peft and never removes
    it: each data-parallel run leaves one /tmp/tmpXXXX per extra rank (with PiSSA, a copy of the initial adapter
    in it)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    _torchrun(_args(demo_paths, tmp_path / "run", 1), 2, TMPDIR=str(scratch))
    left = sorted(p.name for p in scratch.iterdir() if p.name.startswith("tmp"))
    assert not left, left

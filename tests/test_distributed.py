"""Data-parallel ZO with torch.distributed: 2 gloo processes on localhost follow the one-process trajectory."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(demo_paths, out, optimizer, steps, *extra):
    eps = ["--eps", "1e-2"] if optimizer not in ("adamw", "sgd") else []  # a ZO setting
    return ["train", "--data", demo_paths[0], "--eval-data", demo_paths[1], "--model", "tiny-llama", "--optimizer",
            optimizer, "--peft", "lora", "--peft-r", "2", "--lr", "1e-2", *eps, "--steps", str(steps),
            "--batch-size", "8", "--eval-every", "3", "--eval-max", "40", "--checkpoint-every", "3",
            "--lr-scheduler", "constant", "--quiet", "--out", str(out), *extra]


def launch(argv, ranks):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "slimtune.cli", *argv] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "slimtune.cli", *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]


def weights(run_dir):
    return load_file(str(run_dir / "checkpoint" / "trainable.safetensors"))


def logged(run_dir, key):
    """{step: value} for the records that carry `key` (evaluation-only records, e.g. step 0, do not)."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    found = {r["step"]: r[key] for r in records if key in r}
    assert found, f"{run_dir}: no record carries {key}"
    return found


def same_log(a: dict, b: dict, rel: float, abs: float = 0.0) -> None:  # noqa: A002  (pytest.approx's name)
    """Both runs logged the same steps, with values equal to `rel` (or `abs`)."""
    assert sorted(a) == sorted(b)
    assert [a[s] for s in sorted(a)] == pytest.approx([b[s] for s in sorted(b)], rel=rel, abs=abs)


def test_two_ranks_follow_the_one_process_trajectory(tmp_path, demo_paths):
    launch(args(demo_paths, tmp_path / "one", "mezo", 6), 1)
    launch(args(demo_paths, tmp_path / "two", "mezo", 6), 2)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a) and any(a[k].abs().sum() > 0 for k in a)
    same_log(logged(tmp_path / "one", "projected_grad"), logged(tmp_path / "two", "projected_grad"),
             rel=1e-4, abs=1e-5)  # sub-batch padding: float tolerance (each rank pads its own shard, so the
    # per-example losses differ by rounding, ~1e-6 here: threat-model.md; a noised value near 0 needs the abs part)
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert two["data_parallel_ranks"] == 2 and two["bytes_communicated"] == 6 * 2 * 2 * 16  # 4 losses x 4 B per rank
    assert one["best_eval"] == pytest.approx(two["best_eval"]) and not (tmp_path / "two" / "rank1").exists()


def test_dpzero_ranks_share_the_secret_noise(tmp_path, demo_paths):
    """Same secret (from the checkpoint) -> the 2-rank and 1-process continuations agree, noise included. A fixed
    noise multiplier: a budget planned for the first 3 steps stopped both continuations at once ('privacy budget
    exhausted'), and the test compared two copies of the step-3 checkpoint (data-parallel review)."""
    from slimtune.privacy.secret import create_key_file
    create_key_file(tmp_path / "run.key")  # (lead) a completed run retires its own key: one extended later keeps its
    # own --secret-key-file
    private = ("--noise-multiplier", "1.0", "--delta", "1e-3", "--secret-key-file", str(tmp_path / "run.key"))
    launch(args(demo_paths, tmp_path / "two", "dpzero", 3, *private), 2)
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    start = weights(tmp_path / "one")
    launch(args(demo_paths, tmp_path / "two", "dpzero", 6, *private, "--resume"), 2)
    launch(args(demo_paths, tmp_path / "one", "dpzero", 6, *private, "--resume"), 1)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.allclose(a[k], start[k]) for k in a)  # both continued past step 3
    assert max(logged(tmp_path / "one", "projected_grad")) == 6
    same_log(logged(tmp_path / "one", "projected_grad"), logged(tmp_path / "two", "projected_grad"),
             rel=1e-4)  # sub-batch padding: float tolerance


def test_first_order_optimizers_are_refused_under_torchrun(tmp_path, demo_paths):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "slimtune.cli", *args(demo_paths, tmp_path / "x", "adamw", 2)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode != 0 and "data-parallel runs" in res.stderr

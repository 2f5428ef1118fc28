"""Review of data-parallel ZO (torchrun): ranks that disagree, ranks that fail, --restart of a private run.

Every test launches 2 gloo ranks of tiny-llama through a small launcher script that can give one rank different
flags (RANK_ARGS: {"1": {"--seed": "7"}}), kill one rank at the start of a step (KILL_AT="rank:step"), and dump each
rank's final trainable weights and noise multiplier (RANK_DUMP) -- nothing else rank 1 holds is visible from outside.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import free_port

LAUNCHER = '''
import json, os, signal, sys
import slimtune.train as TP
import slimtune.train.trainer as T
rank = os.environ.get("RANK", "0")
argv = sys.argv[1:]
for flag, value in json.loads(os.environ.get("RANK_ARGS", "{}")).get(rank, {}).items():
    argv[argv.index(flag) + 1] = value
kill = os.environ.get("KILL_AT")
if kill and kill.split(":")[0] == rank:
    step_ = T._step
    def _step(run, step):
        if step == int(kill.split(":")[1]):
            os.kill(os.getpid(), signal.SIGKILL)
        return step_(run, step)
    T._step = _step
dump = os.environ.get("RANK_DUMP")
if dump:
    train_ = T.train
    def train(run):
        try:
            return train_(run)
        finally:
            from safetensors.torch import save_file
            save_file({n: p.detach().clone().contiguous() for n, p in run.model.named_parameters()
                       if p.requires_grad}, f"{dump}/rank{rank}.safetensors")
            with open(f"{dump}/rank{rank}.json", "w") as f:
                json.dump({"noise": getattr(run.accountant, "noise", None)}, f)
    TP.train = T.train = train
from slimtune.cli import app
app(argv)
'''


def common(data, out, optimizer="mezo", steps=4, *extra):
    private = ["--epsilon", "6", "--delta", "1e-3"] if optimizer.startswith("dp") else []
    return ["train", "--data", data, "--model", "tiny-llama", "--optimizer", optimizer, "--peft", "lora",
            "--peft-r", "2", "--lr", "1e-2", "--eps", "1e-2", "--steps", str(steps), "--batch-size", "8",
            "--lr-scheduler", "constant", "--save", "last", "--quiet", "--out", str(out), *private, *extra]


def launch(tmp_path, argv, ranks=2, **env):
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    cmd = [sys.executable, str(script), *argv] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(script), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def errors(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


def same_weights(dump: Path) -> bool:
    a, b = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    return all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_restart_of_a_failed_private_run_gives_every_rank_the_same_accountant(tmp_path, demo_paths):
    """--restart composes the failed run's releases on rank 0 only: rank 1 reads status.json's `abandoned` before
    rank 0 writes it (trainer._private_setup, new-run branch), plans a smaller noise multiplier, adds less noise to
    its copy of the weights, and feeds per-example losses measured at those under-noised weights into rank 0's
    releases -- the run diverges silently and its (epsilon, delta) no longer describes what was computed."""
    argv = common(demo_paths[0], tmp_path / "run", "dpzero", 6)
    crashed = launch(tmp_path, argv, ranks=1, KILL_AT="0:3")  # a private run that dies after releasing 3 steps
    assert crashed.returncode != 0 and json.loads((tmp_path / "run" / "status.json").read_text())[
        "released_through"] == 3
    dump = tmp_path / "dump"
    dump.mkdir()
    res = launch(tmp_path, [*argv, "--restart"], RANK_DUMP=str(dump))
    assert res.returncode == 0, res.stderr[-2000:]
    noise = [json.loads((dump / f"rank{r}.json").read_text())["noise"] for r in (0, 1)]
    assert noise[0] == noise[1], f"rank 0 noise multiplier {noise[0]}, rank 1 {noise[1]}"
    assert same_weights(dump)


@pytest.mark.parametrize("flag", ["--seed", "--data"])
def test_ranks_that_disagree_on_settings_or_data_are_refused(tmp_path, demo_paths, flag):
    """torchrun on several machines runs one command per node; nothing checks that the ranks agree. A different
    --seed on one rank draws a different z (the ranks' weights silently diverge, rank 0 saves its own), a different
    --data file trains rank 1's shard on other rows; both exit 0."""
    other = tmp_path / "other.tsv"
    lines = Path(demo_paths[0]).read_text().splitlines()
    other.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    value = {"--seed": "7", "--data": str(other)}[flag]
    dump = tmp_path / "dump"
    dump.mkdir()
    res = launch(tmp_path, common(demo_paths[0], tmp_path / "run", "mezo", 4, "--seed", "0"),
                 RANK_ARGS=json.dumps({"1": {flag: value}}), RANK_DUMP=str(dump))
    assert res.returncode != 0, "ranks with different " + flag + " trained to completion"
    assert any(flag in line and "rank" in line for line in errors(res)), res.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_ranks_with_different_secret_keys_are_refused_in_one_line(tmp_path, demo_paths):
    """--secret-key-file is 'given to every rank out of band'; a rank given another key draws other noise and other
    batches. Today the run dies inside a collective (gloo abort) and every rank reports 'a private training step
    failed ... rerun with --log-private-stats', which points the user at the wrong cause (and at dropping the
    guarantee). Expected: one line, before any step, saying the ranks' key files differ (compare a keyed digest,
    never the key)."""
    from slimtune.privacy.secret import create_key_file
    for name in ("k0", "k1"):
        create_key_file(tmp_path / name)
    res = launch(tmp_path, common(demo_paths[0], tmp_path / "run", "dpzero", 4, "--secret-key-file",
                                  str(tmp_path / "k0")), RANK_ARGS=json.dumps({"1": {"--secret-key-file":
                                                                                      str(tmp_path / "k1")}}))
    assert res.returncode != 0
    assert errors(res) and all("--secret-key-file" in line for line in errors(res)), res.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_private_run_with_key_file_and_a_run_dir_rank_1_cannot_see(tmp_path, demo_paths):
    """The docs: 'Private runs on several machines read the key from the shared run directory or from
    --secret-key-file, given to each rank out of band' -- but a new private run's nonce is read from RUN/status.json
    on every rank, so a rank whose --out is not the shared directory dies with 'internal error (KeyError: 'nonce');
    please report it'. Expected: it works, or one line saying the run directory must be shared."""
    from slimtune.privacy.secret import create_key_file
    create_key_file(tmp_path / "key")
    res = launch(tmp_path, common(demo_paths[0], tmp_path / "run", "dpzero", 2, "--secret-key-file",
                                  str(tmp_path / "key")), RANK_ARGS=json.dumps({"1": {"--out": str(tmp_path / "b")}}))
    assert not any("internal error" in line for line in errors(res)), res.stderr[-2000:]
    assert res.returncode == 0 or any("--out" in line and "shared" in line for line in errors(res)), \
        res.stderr[-2000:]


def test_a_rank_failing_its_checks_leaves_no_running_run_dir(tmp_path, demo_paths):
    """prepare(): rank 0 claims the directory (.lock, status.json state=running) before the barrier that waits for
    the other ranks' checks ('every rank has checked before rank 0 writes anything' is not so). Rank 1's bad data
    file -> rank 0 leaves a 'running' status.json in a fresh --out and reports 'internal error (RuntimeError: gloo
    ... Connection closed by peer); please report it'."""
    bad = tmp_path / "bad.tsv"
    bad.write_text(Path(demo_paths[0]).read_text().splitlines()[0] + "\nx\t7\n")
    res = launch(tmp_path, common(demo_paths[0], tmp_path / "run"), RANK_ARGS=json.dumps({"1": {"--data": str(bad)}}))
    assert res.returncode != 0
    assert any("bad.tsv:2" in line for line in errors(res))
    assert not any("internal error" in line for line in errors(res)), res.stderr[-2000:]
    status = tmp_path / "run" / "status.json"
    assert not status.exists() or json.loads(status.read_text()).get("state") != "running"


def test_a_rank_dying_mid_run_is_reported_as_such_not_as_an_internal_error(tmp_path, demo_paths):
    """Rank 1 killed at step 3: rank 0 marks the run failed (good) but says 'internal error (RuntimeError: [.../gloo/
    transport/tcp/pair.cc:537] Read error ... GLHF!); please report it' -- a bug report for a lost peer."""
    res = launch(tmp_path, common(demo_paths[0], tmp_path / "run", "mezo", 8), KILL_AT="1:2")
    assert res.returncode != 0
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"
    assert errors(res) and not any("internal error" in line for line in errors(res)), res.stderr[-2000:]


def test_only_rank_0_reports_the_run(tmp_path, demo_paths):
    """Rank 1 prints an empty summary table ('- - -') and a second 'run written to RUN' line (commands/train.py
    prints whatever train() returned; rank 1's summary is {})."""
    res = launch(tmp_path, common(demo_paths[0], tmp_path / "run", "mezo", 2))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("run written to") == 1, res.stdout

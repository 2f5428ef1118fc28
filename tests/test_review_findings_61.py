"""Review 61: the deployment path, attacked as a careless operator (and as a hostile local user)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimtune import SlimtuneError
from slimtune.federated import deployment
from slimtune.federated.config import FederatedConfig, check_run

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"


def _alive(pid: int) -> bool:
    """A process that still runs (a zombie left to a PID 1 that does not reap is not running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


CHILD = r"""
import sys, time
from pathlib import Path
from slimtune.federated import deployment as d

pidfile = Path(sys.argv[1])

def start_superlink(self):  # a stand-in SuperLink: a process started the way the script starts Flower's
    proc = self._start("superlink", ["sleep", "120"])
    pidfile.write_text(str(proc.pid))

d.LocalFederation.start_superlink = start_superlink
d.LocalFederation.add_node = lambda self, *a, **k: None
d.LocalFederation.submit = lambda self, timeout: time.sleep(120)
sys.argv = ["deployment", "--nodes", "2", "--rounds", "1", "--out", sys.argv[2]]
d.main()
"""


def test_sigterm_to_the_deployment_script_stops_every_process_it_started(tmp_path):
    """`timeout`, `kill`, a scheduler or systemd stop the script with SIGTERM: Python's default action ends it
    without running LocalFederation.__exit__, and the SuperLink/SuperNodes (own sessions) keep running, listening
    and holding the run's keys (seen: `timeout 120 python -m slimtune.federated.deployment` left them all up)."""
    script, pidfile = tmp_path / "child.py", tmp_path / "superlink.pid"
    script.write_text(CHILD)
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(script), str(pidfile), str(tmp_path / "out")], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = None
    try:
        deadline = time.monotonic() + 120
        while not pidfile.exists() or not pidfile.read_text():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the stand-in SuperLink never started"
            time.sleep(0.2)
        started = int(pidfile.read_text())
        assert _alive(started)
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
        time.sleep(0.5)
        assert not _alive(started), "SIGTERM left the script's SuperLink running (an orphan in its own session)"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if started is not None and _alive(started):
            os.killpg(started, signal.SIGKILL)  # our own stand-in (sleep), in the group the script gave it


def test_a_successful_deployment_leaves_no_copies_of_the_data_nor_keys_behind(tmp_path, monkeypatch):
    """run() makes /tmp/slimtune-deploy.* (every node's shard of --data, each node's private key, the SuperLink's
    TLS key, the server settings, Flower's home) and never removes it: every run leaves a copy of the training data
    and its secrets in the temporary directory."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    class Federation:  # the processes are not the point: what run() leaves on disk is
        def __init__(self, work, cfg, insecure=False):
            self.work = Path(work)
            (self.work / "keys").mkdir()
            (self.work / "keys" / "supernode0").write_text("private key")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def start_superlink(self):
            pass

        def add_node(self, *args, **kwargs):
            pass

        def submit(self, timeout):
            return {"stop_reason": "completed"}

    monkeypatch.setattr(deployment, "LocalFederation", Federation)
    monkeypatch.setattr(deployment, "with_bundle_bytes", lambda summary, nodes, out: summary)
    out = tmp_path / "out"
    deployment.run(2, DEMO / "sst2_demo_train.tsv", DEMO / "sst2_demo_dev.tsv", 1, out, "tiny-llama", 60.0)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("slimtune-deploy.*/**/*") if p.is_file())
    assert not left, f"left behind after a completed run: {left}"


def _deployment_cfg(tmp_path, **kw):
    return FederatedConfig(data="", eval_data=str(DEMO / "sst2_demo_dev.tsv"), model="tiny-llama", rounds=1,
                           out_dir=str(tmp_path / "out"), **kw)


def test_allowed_nodes_fewer_than_num_clients_is_refused_before_any_work(tmp_path):
    """A server settings file whose allowed-nodes lists fewer node ids than num-clients (a node left out, or one id
    twice) can never start a round: check_run accepts it, the server builds its model, waits node_timeout (300 s by
    default) and then says 'only 1 of num-clients=2 SuperNodes connected ... start more SuperNodes' while both
    nodes are connected."""
    for allowed in ("7", "7,7"):
        with pytest.raises(SlimtuneError, match="allowed"):
            check_run(_deployment_cfg(tmp_path, num_clients=2, allowed_nodes=allowed), dirichlet=False)


def test_allowed_nodes_that_pass_the_check_are_node_ids_the_server_can_read(tmp_path):
    """The check is str.isdigit(), which accepts '²' and other digits int() refuses: check_run passes, then the
    server builds its model and MembersOnly raises ValueError (a traceback, after the work)."""
    from slimtune.federated.server_app import MembersOnly
    cfg = _deployment_cfg(tmp_path, num_clients=1, allowed_nodes="\u00b2")
    try:
        check_run(cfg, dirichlet=False)
    except SlimtuneError:
        return  # refused before any work: what the rule asks
    try:
        MembersOnly(object(), cfg.allowed_nodes)
    except ValueError as exc:
        pytest.fail(f"check_run accepted allowed_nodes {cfg.allowed_nodes!r}, which the server cannot read: {exc}")

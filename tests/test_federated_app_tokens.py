"""Flower's SubprocessExecutor starts every ServerApp / ClientApp with `--token <hex>` on its command line, which
every local user can read (`ps -ef`); the token authenticates the app to the runtime API for the whole run. The
deployment's SuperLink and SuperNodes start slimtune's SuperExec instead, which passes the token in a private file."""

import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _spec(**over):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec
    fields = dict(task_type=TaskType.SERVER_APP, runtime_api_address="127.0.0.1:9091", token="ab" * 32,
                  insecure=False, root_certificates_path="/x/ca.pem", runtime_dependency_install=True,
                  parent_pid=123, suppress_output=True, task_id=7)
    return ExecutionSpec(**{**fields, **over})


def _launched(executor_module, executor, spec, monkeypatch):
    seen, popen = [], subprocess.Popen

    class Recorder:
        def __init__(self, args, **kwargs):
            seen.append(args)
            self.proc = popen(["true"])

        def wait(self):
            return self.proc.wait()
    monkeypatch.setattr(executor_module.subprocess, "Popen", Recorder)
    executor.launch(spec)
    return seen[0]


@pytest.mark.parametrize("over", [{}, {"insecure": True, "parent_pid": None, "runtime_dependency_install": False}])
def test_apps_start_as_flower_starts_them_with_the_token_in_a_private_file(monkeypatch, over):
    from flwr.supercore.superexec.executor import subprocess_executor

    from slimtune.federated import superexec
    spec = _spec(**over)
    flower = _launched(subprocess_executor, subprocess_executor.SubprocessExecutor(), spec, monkeypatch)
    ours = _launched(superexec, superexec.TokenFileExecutor(), spec, monkeypatch)
    assert spec.token in flower  # Flower's own: the token is on the command line
    assert spec.token not in " ".join(ours)
    at = ours.index("--token-file")
    token_file = Path(ours[at + 1])
    # the same command with `--token TOKEN` replaced by `--token-file PATH` (a Flower upgrade that adds a flag fails)
    assert ours[:at] + ["--token", spec.token] + ours[at + 2:] == flower
    deadline = time.time() + 10
    while token_file.parent.exists() and time.time() < deadline:  # removed once the app has exited
        time.sleep(0.05)
    assert not token_file.parent.exists()


def test_the_token_file_is_the_owners_alone(tmp_path, monkeypatch):
    from slimtune.federated.superexec import write_token
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    path = write_token("cd" * 32)
    assert path.read_text() == "cd" * 32 and path.parent.parent == tmp_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_the_deployment_starts_slimtunes_superexec_under_flowers_name(tmp_path):
    from slimtune.federated.config import FederatedConfig
    from slimtune.federated.deployment import LocalFederation
    federation = LocalFederation(tmp_path / "work", FederatedConfig(out_dir=str(tmp_path / "run")))
    found = shutil.which("flower-superexec", path=federation.env["PATH"])
    assert found and Path(found).parent != Path(sys.executable).parent, found  # not Flower's own
    assert stat.S_IMODE(Path(found).stat().st_mode) & 0o077 == 0
    done = subprocess.run([found, "--help"], capture_output=True, text=True, timeout=120, env=federation.env)
    assert done.returncode == 0 and "--runtime-api-address" in done.stdout, done.stderr[-2000:]
    # and the executor it builds for Flower's default is the token-file one
    probe = ("from slimtune.federated import superexec as s; s.use_token_files(); "
             "from flwr.supercore.superexec import run_superexec as m; from flwr.supercore.constant import "
             "ExecutorType; print(type(m.get_executor(ExecutorType.SUBPROCESS)).__name__)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "TokenFileExecutor", out.stderr[-2000:]


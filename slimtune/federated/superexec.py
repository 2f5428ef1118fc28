"""Flower's `flower-superexec`, with the apps' run tokens kept off their command lines.

In subprocess isolation (Flower's default) the SuperLink and each SuperNode start a SuperExec, which starts every
ServerApp / ClientApp as `flwr-serverapp <address> --token <hex>` (`SubprocessExecutor.launch`). That token
authenticates the app to the runtime API for as long as the app runs: whoever holds it can pull the run's messages
(on the SuperLink, the clients' updates) and push messages as the app. A command line is world-readable
(`/proc/<pid>/cmdline`, `ps -ef`), so every local user of the SuperLink's or a SuperNode's machine could read it.

Flower's apps also accept `--token-file`. `TokenFileExecutor` starts them exactly as Flower does, but writes the
token to a file only the owner can read (mode 0600, inside a fresh directory of mode 0700) and passes its path; the
directory is removed when the app exits, or when the SuperExec stops first (`close`, which Flower's signal handlers and
its main loop's exit call), whichever comes first. A token that cannot be written (a full or unwritable temporary
directory) or an app that cannot be started fails that one launch (`LaunchResult.failed`: Flower logs it and the task
expires), never the SuperExec's loop. `python -m slimtune.federated.superexec` is `flower-superexec` (same
arguments) with this executor in place of Flower's subprocess executor; the deployment script puts it first on the
SuperLink's and SuperNodes' PATH under Flower's name (`shim`), so Flower starts it where it would start its own.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

COMMAND = "flower-superexec"  # the name Flower's SuperLink and SuperNode start their SuperExec by


def write_token(token: str) -> Path:
    """The token in a new file readable by its owner only, in a new directory only its owner can enter."""
    folder = Path(tempfile.mkdtemp(prefix="flwr-app-"))  # mkdtemp: mode 0700, a name no one else can take
    path = folder / "token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(token)
    return path


def app_command(spec: ExecutionSpec, token_file: Path) -> list[str]:
    """Flower's SubprocessExecutor command for `spec`, with `--token-file PATH` where Flower puts `--token TOKEN`."""
    args = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address, "--token-file", str(token_file)]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args.extend(["--root-certificates", spec.root_certificates_path])
    if spec.parent_pid is not None:
        args.extend(["--parent-pid", str(spec.parent_pid)])
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


def _remove_when_done(proc: subprocess.Popen, folder: Path, done=None) -> None:
    proc.wait()
    shutil.rmtree(folder, ignore_errors=True)
    if done is not None:
        done(folder)


class TokenFileExecutor(SubprocessExecutor):
    """Flower's subprocess executor, passing each app its token through a private file."""

    def __init__(self) -> None:
        self._folders: set[Path] = set()  # the token folders of the apps still running
        self._lock = threading.Lock()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        try:
            token_file = write_token(spec.token)
        except OSError as exc:  # a full or unwritable temporary directory: this launch fails, not the SuperExec
            return LaunchResult.failed(f"could not write the app's token file: {exc}")
        output = subprocess.DEVNULL if spec.suppress_output else None
        try:
            proc = subprocess.Popen(app_command(spec, token_file), stdout=output, stderr=output)
        except BaseException as exc:
            shutil.rmtree(token_file.parent, ignore_errors=True)
            if isinstance(exc, OSError):
                return LaunchResult.failed(f"could not start {TASK_TYPE_TO_COMMAND[spec.task_type]}: {exc}")
            raise
        with self._lock:
            self._folders.add(token_file.parent)
        threading.Thread(target=_remove_when_done, args=(proc, token_file.parent, self._forget),
                         daemon=True).start()
        return LaunchResult.accepted()

    def _forget(self, folder: Path) -> None:
        with self._lock:
            self._folders.discard(folder)

    def close(self) -> None:
        """The SuperExec stops (a signal, its parent gone, its loop's end): remove the tokens of the apps it started
        that still run (the threads that would remove them die with this process). An app reads its token when it
        starts, so a running app keeps its connection."""
        with self._lock:
            folders, self._folders = list(self._folders), set()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        super().close()


def use_token_files() -> None:
    """Make Flower's SuperExec build a TokenFileExecutor wherever it would build its SubprocessExecutor."""
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec as module
    flower_get_executor = module.get_executor

    def get_executor(executor_type, *args, **kwargs):
        if executor_type == ExecutorType.SUBPROCESS:
            return TokenFileExecutor()
        return flower_get_executor(executor_type, *args, **kwargs)
    module.get_executor = get_executor


def shim(folder: Path) -> Path:
    """An executable `flower-superexec` in `folder` (which goes first on PATH) that runs this module with this
    interpreter and passes Flower's arguments on."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / COMMAND
    path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m slimtune.federated.superexec \"$@\"\n")
    path.chmod(0o700)
    return path


def main() -> None:
    use_token_files()
    from flwr.supercore.cli.flower_superexec import flower_superexec
    sys.argv[0] = COMMAND
    flower_superexec()


if __name__ == "__main__":
    main()

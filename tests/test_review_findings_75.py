"""Review 75 (adversarial review of 5859d29 and dfbbb5e). Each test fails on the code it was written against."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import time

from slimtune.train.run_dir import RunFileError, recover_adapter



def test_nohup_ignored_sighup_is_not_turned_into_a_stop():
    """`nohup slimtune train ...` (or a parent that set SIGTERM/SIGHUP to SIG_IGN) asks that the signal be ignored;
    _stop_on_interrupt installs its handler over SIG_IGN, so closing the terminal now kills a nohup'd run."""
    from slimtune.train.trainer import _stop_on_interrupt

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        raised = None
        try:
            with _stop_on_interrupt():
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001
            raised = exc
        assert raised is None, f"an ignored SIGHUP (nohup) stopped the run: {raised!r}"
    finally:
        signal.signal(signal.SIGHUP, before)


def test_recover_adapter_does_not_resurrect_a_lone_stale_old_adapter(tmp_path):
    """A kill between write_adapter's renames leaves `.adapter.<id>.old.partial` AND its twin `.adapter.<id>.partial`.
    A lone `.old.partial` is what a kill during the *successful* write's cleanup (rmtree of the previous adapter)
    leaves: half deleted, an earlier step's. If the user later deletes adapter/, the next claim puts it back."""
    out = tmp_path / "run"
    stale = out / ".adapter.0123456789ab.old.partial"
    stale.mkdir(parents=True)
    (stale / "adapter_config.json").write_text("{}")  # rmtree got as far as the weights
    recover_adapter(out)
    assert not (out / "adapter").exists(), "a half-deleted previous adapter became adapter/"


def test_run_file_error_keeps_its_errno_through_pickle():
    """RunFileError promises 'still the OSError it was (errno, filename) for a Python caller'; OSError's __reduce__
    rebuilds it as RunFileError(errno, strerror, filename), so after pickling (multiprocessing, a federated client
    process) .errno is the message string, not ENOSPC."""
    exc = RunFileError("run/checkpoint: No space left on device (ENOSPC)", errno.ENOSPC, "run/checkpoint")
    back = pickle.loads(pickle.dumps(exc))
    assert back.errno == errno.ENOSPC, back.errno
    assert back.filename == "run/checkpoint" and str(back) == str(exc)

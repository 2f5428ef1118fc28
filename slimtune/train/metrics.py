"""Run metrics: JSON lines per step/eval, peak memory, and the run summary read by `slimtune report`."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch


def peak_memory_mb(device: str) -> float:
    """Peak CUDA memory allocated on GPU; peak resident set size of this process on CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return process_memory_mb("VmHWM")


def reset_peak_memory(device: str) -> None:
    """Start this process's peak anew (a run's peak is its own, not an earlier run's or a freed tensor's in the same
    Python session): CUDA's allocator statistics, or VmHWM through /proc/self/clear_refs ("5"). Where the kernel does
    not allow it, the peak stays the process's since it started."""
    if str(device).startswith("cuda"):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def process_memory_mb(field: str) -> float:
    """This process's own resident memory in MB from /proc/self/status: "VmRSS" (now) or "VmHWM" (its peak). Off
    Linux, getrusage's ru_maxrss (the peak; on Linux ru_maxrss keeps a larger parent's peak across fork and exec, so
    it is the fallback only)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint (and a partial last line, as a kill leaves it) so the
        log matches the replayed trajectory. Rewritten whole or not at all: a failed write keeps the log as it was."""
        from slimtune.train.run_dir import replace_file
        if not self.path.exists():
            return
        keep = [json.dumps(r) for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        replace_file(self.path, "".join(line + "\n" for line in keep))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line that does not parse (a partial last line after a kill) is skipped."""
    return [record for _, record in numbered_records(path)]


def numbered_records(path: Path, skipped: list[int] | None = None) -> list[tuple[int, dict]]:
    """(line number, record) of each object line of a JSON-lines file, as read_jsonl reads them (for messages that
    name the line); the numbers of the lines skipped (not JSON, or not an object) are appended to `skipped`."""
    from slimtune.train.run_dir import read_record
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for number, line in enumerate(read_record(path, errors="replace").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                out.append((number, record))
            elif skipped is not None:
                skipped.append(number)
    return out


def last_logged_step(path: Path, key: str) -> int:
    """The last step of a record carrying `key` (0 if none)."""
    return max((int(r.get("step", 0)) for r in read_jsonl(path) if key in r), default=0)


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v

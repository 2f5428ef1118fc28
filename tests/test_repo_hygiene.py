"""What the repository may hold: results and code, never a run's secret key, checkpoint or weights.

Long benchmark runs keep their checkpoints, adapters and (private runs) key files beside their results, visible to
git so that a session cut off mid-run hands them on, but never committed (.gitignore explains); this test fails CI
when one was committed anyway (a `git add` of a whole results folder did once).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(r"(^|/)(secret\.key|secret\.json)$|(^|/)checkpoint/|(^|/)adapter/.*\.(safetensors|bin)$"
                       r"|\.(safetensors|pt)$")


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_no_key_checkpoint_or_weights_is_committed():
    bad = [f for f in tracked_files() if FORBIDDEN.search(f)]
    assert not bad, f"committed run artefacts (keys, checkpoints, weights): {bad[:10]}"


def test_the_pattern_catches_what_it_must():
    for path in ("benchmarks/results/zo_convergence/x/secret.key", "benchmarks/results/e2e/y/checkpoint/secret.json",
                 "benchmarks/results/a/checkpoint/trainer_state.json", "runs/z/adapter/adapter_model.safetensors",
                 "model.pt"):
        assert FORBIDDEN.search(path), path
    for path in ("benchmarks/results/defaults/mezo-lora/metrics.jsonl", "slimtune/privacy/secret.py",
                 "docs/how-to/export.md"):
        assert not FORBIDDEN.search(path), path


@pytest.mark.parametrize("hub_first", [False, True])
def test_importing_slimtune_keeps_every_library_off_the_hub(hub_first):
    """The full suite crashed in a huggingface_hub telemetry thread resolving huggingface.co (TRL's SFTTrainer sends
    telemetry, and its request headers look up an agent registry on the Hub): only the CLI set HF_HUB_OFFLINE, and
    huggingface_hub reads it once, when first imported. `import slimtune` now sets it and HF_HUB_DISABLE_TELEMETRY,
    also when huggingface_hub was imported before slimtune; a setting the user made wins."""
    import subprocess
    import sys
    first = "import huggingface_hub.constants\n" if hub_first else ""
    code = first + ("import slimtune\nfrom huggingface_hub import constants as c\n"
                    "from huggingface_hub.utils import _detect_agent\n"
                    "print(c.HF_HUB_OFFLINE, c.HF_HUB_DISABLE_TELEMETRY, _detect_agent._fetch_registry())")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                                                             "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True", "None"], out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", first + "import slimtune\nfrom huggingface_hub import constants as c\n"
                          "print(c.HF_HUB_OFFLINE)"], env={**env, "HF_HUB_OFFLINE": "0"}, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split() == ["False"], out.stderr[-2000:]

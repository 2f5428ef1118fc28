import os
import signal
from pathlib import Path

import pytest
import torch

from slimtune.data import get_task, read_examples
from slimtune.models import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"
SHARED = ROOT.parent / "shared" / "data"

os.environ.setdefault("SLIMTUNE_CACHE", str(ROOT / ".pytest_cache" / "slimtune"))
torch.set_num_threads(1)  # tiny test models gain nothing from threads, and 2 threads stall on a busy CPU
# A suite started in the background (`nohup make test &`) inherits SIGINT ignored, and Python then raises no
# KeyboardInterrupt: the Ctrl-C tests would fail for the way they were started. Ctrl-C as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def demo_paths():
    return str(DEMO / "sst2_demo_train.tsv"), str(DEMO / "sst2_demo_dev.tsv")


@pytest.fixture
def tiny():
    """(model, tokenizer, examples) for a tiny random llama fitted to the demo data."""
    task = get_task("sst2")
    examples = read_examples(str(DEMO / "sst2_demo_train.tsv"), task)
    model, tok = load_model_and_tokenizer("tiny-llama", texts=[e.prompt for e in examples])
    return model, tok, examples


@pytest.fixture
def shared_data():
    if not SHARED.exists():
        pytest.skip(f"shared data not found at {SHARED} (../shared/data is provided beside the repo in CI)")
    return SHARED


@pytest.fixture
def hf_offline(monkeypatch):
    """Hugging Face libraries told not to reach the hub (tests of the trainer integration)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def hf_args(tmp_path, **kwargs):
    """transformers TrainingArguments for a two-step CPU run writing under tmp_path (kwargs override)."""
    from transformers import TrainingArguments
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to=[], logging_steps=1,
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=7, max_steps=2)
    return TrainingArguments(**{**base, **kwargs})


def cli(*args):
    """`slimtune ARGS...` in this process (typer's CliRunner), warnings silenced; arguments may be paths or numbers."""
    import warnings

    from typer.testing import CliRunner

    from slimtune.cli import app
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(res) -> str:
    """The one `error:` line of a refused command (exit code 2, nothing else on stderr), whitespace collapsed."""
    assert res.exit_code == 2, (res.exit_code, res.output[-800:])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return " ".join(lines[0].split())


@pytest.fixture
def retired_keys(monkeypatch):
    """{key file path: its JSON text}, read just before a completed private run retires its key (an attacker's
    test needs the key the run used; the run directory no longer holds it)."""
    from slimtune.privacy import secret
    from slimtune.train import trainer

    seen: dict = {}
    real = secret.retire_key_file

    def spy(path):
        from pathlib import Path
        path = Path(path)
        if path.is_file():
            seen[path] = path.read_text()
        real(path)

    monkeypatch.setattr(trainer, "retire_key_file", spy)
    return seen

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

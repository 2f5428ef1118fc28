"""examples/ (issue 37): each script runs end to end on tiny-llama with a handful of steps and its default (bundled)
data: HF Trainer + MeZO on SST-2, TRL SFT with ZO on E2E, DPZero in a plain torch loop."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def test_hf_trainer_mezo_sst2(tmp_path):
    out = load("hf_trainer_mezo_sst2").main(["--model", "tiny-llama", "--steps", "4", "--out", str(tmp_path)])
    assert 0 <= out["after"]["eval_accuracy"] <= 1
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_trl_sft_zo_e2e(tmp_path):
    pytest.importorskip("trl")
    out = load("trl_sft_zo_e2e").main(["--model", "tiny-llama", "--steps", "4", "--out", str(tmp_path)])
    assert out["after"] > 0 and isinstance(out["completion"], str)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_dpzero_torch_loop(tmp_path):
    out = load("dpzero_torch_loop").main(["--model", "tiny-llama", "--steps", "4", "--epsilon", "3",
                                          "--out", str(tmp_path)])
    assert 0 < out["epsilon"] <= 3 * 1.001
    assert (tmp_path / "adapter" / "adapter_config.json").exists()

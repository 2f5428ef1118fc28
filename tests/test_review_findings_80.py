"""Review 80: the newest changes (strict Python API, LoRA loader refusing adapters that do not fully load, finite
checks) as an adversary and a careless user. Each test fails on the code it was written against."""

import warnings

import numpy as np
import pytest
import torch

from conftest import DEMO, cli, one_line_error

from slimtune import SlimtuneError, privacy

BASE = dict(noise_multiplier=1.0, dataset_size=1000, batch_size=16, steps=100)


# --- the Python API refuses the numbers numpy and torch hand out -------------------------------------------------

@pytest.mark.parametrize("keyword, value", [
    ("dataset_size", np.int64(1000)),  # len(np.array) / df.shape[0] arithmetic, np.arange sweeps
    ("batch_size", np.int64(16)),
    ("noise_multiplier", np.float32(1.0)),  # a value read from a float32 array
    ("noise_multiplier", torch.tensor(1.0)),  # a torch scalar (sigma computed in torch)
    ("delta", np.float32(1e-5)),
])
def test_privacy_epsilon_takes_numpy_and_torch_scalars(keyword, value):
    """Review 77 made slimtune.privacy.epsilon check its arguments with the config-file rules (settings/python.py
    typed -> coerce: `isinstance(value, int)` / `(int, float)`): np.int64(1000), np.float32(1.0), torch.tensor(1.0)
    are now refused ("dataset_size: expected an integer, got np.int64(1000)"), where the previous release priced them
    (1.5804 for these arguments). Numbers from numpy/pandas/torch are the ordinary way sweeps are written. Expected:
    the same epsilon as for the plain Python number."""
    expected = privacy.epsilon(**BASE)
    got = privacy.epsilon(**{**BASE, keyword: value})
    assert got == pytest.approx(expected, rel=1e-5)


def test_privacy_noise_multiplier_takes_a_numpy_epsilon():
    """The same for slimtune.privacy.noise_multiplier(epsilon=np.float32(2.0)): refused now, 0.9126 before."""
    args = dict(dataset_size=1000, batch_size=16, steps=100)
    assert privacy.noise_multiplier(epsilon=np.float32(2.0), **args) == \
        pytest.approx(privacy.noise_multiplier(epsilon=2.0, **args), rel=1e-4)


def test_privacy_epsilon_takes_numpy_steps():
    """steps=np.int64(100): refused ("steps: expected an integer"); before, dp_accounting's TypeError leaked out."""
    assert privacy.epsilon(**{**BASE, "steps": np.int64(100)}) == pytest.approx(privacy.epsilon(**BASE), rel=1e-9)


@pytest.fixture
def tiny_base():
    from slimtune.models import load_model_and_tokenizer
    torch.manual_seed(0)
    return load_model_and_tokenizer("tiny-llama", texts=["a great movie", "an awful movie"])[0]


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=("q_proj", "v_proj")),  # a tuple: as peft's LoraConfig takes it; a list is accepted
    dict(r=np.int64(4)),
    dict(lora_dropout=np.float32(0.1)),
], ids=["tuple-targets", "np-int-r", "np-float32-dropout"])
def test_apply_peft_takes_a_tuple_of_targets_and_numpy_numbers(tiny_base, kwargs):
    """slimtune.apply_peft(model, "lora", target_modules=("q_proj", "v_proj")) is refused: "target_modules: expected a
    string, got ('q_proj', 'v_proj')" (coerce accepts a list only), and r=np.int64(4) / lora_dropout=np.float32(0.1)
    "expected an integer/number". Expected: applied as the list / Python number would be."""
    import slimtune
    model = slimtune.apply_peft(tiny_base, "lora", **kwargs)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_zo_optimizer_and_arguments_take_a_float32_lr(tiny_base):
    """slimtune.MeZO(model, lr=np.float32(1e-3)) and ZOArguments(lr=np.float32(1e-3)) are refused ("lr: expected a
    number, got np.float32(0.001)"); np.float64 passes (a float subclass): whether a learning rate is accepted depends
    on the numpy dtype it was computed in."""
    import slimtune
    from slimtune.hf import ZOArguments
    slimtune.MeZO(tiny_base, lr=np.float32(1e-3))
    ZOArguments(optimizer="mezo", lr=np.float32(1e-3))


# --- peft adapters that loaded before are refused ----------------------------------------------------------------

def _prompt_adapter(tmp_path, config):
    from peft import get_peft_model

    from slimtune.models import load_model_and_tokenizer
    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer("tiny-llama", texts=["a great movie", "an awful movie"])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    directory = tmp_path / "adapter"
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    return directory, ids, model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_a_peft_prompt_learning_adapter_still_loads(tmp_path, kind):
    """A prompt-tuning or prefix-tuning adapter saved by peft (adapter_config.json + adapter_model.safetensors, as
    peft's PromptTuningConfig/PrefixTuningConfig write it) loaded through load_peft and ran in `slimtune generate`
    / `eval` (exit 0) before Review 79. Now check_lora_loaded re-loads its file with set_peft_model_state_dict, which
    loads `prompt_embeddings` into the prompt encoder itself and leaves the key among unexpected_keys: every such
    adapter is refused with "1 tensor(s) no adapter layer takes (e.g. prompt_embeddings)", a false reason (peft
    loaded it). Expected: it loads, with peft's own outputs."""
    import peft

    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft.registry import load_peft
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4) if kind == "prompt" else \
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    directory, ids, expected = _prompt_adapter(tmp_path, config)
    torch.manual_seed(0)
    base = load_model_and_tokenizer("tiny-llama", texts=["a great movie", "an awful movie"])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_peft(base, directory).eval()
    assert torch.allclose(loaded(input_ids=ids).logits, expected)
    res = cli("generate", "--adapter", directory, "--model", "tiny-llama", "--prompt", "a great movie",
              "--max-new-tokens", 2)
    assert res.exit_code == 0, res.output[-600:]


@pytest.fixture
def bin_adapter(tmp_path):
    """A plain LoRA adapter saved by peft as adapter_model.bin (safe_serialization=False), with its tokenizer."""
    from peft import LoraConfig, get_peft_model

    from slimtune.models import load_model_and_tokenizer
    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer("tiny-llama", texts=["a great movie", "an awful movie"])
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    directory = tmp_path / "adapter"
    model.save_pretrained(str(directory), safe_serialization=False)
    tok.save_pretrained(str(directory))
    assert (directory / "adapter_model.bin").exists()
    return directory


def test_an_unreadable_adapter_model_bin_is_one_line_exit_2(tmp_path, bin_adapter):
    """adapter_model.bin that is not a torch file (bytes of something else): `slimtune generate --adapter` exits 1
    with "an internal error ... WeightsUnpickler error: Unsupported operand ...; please report it" — torch's
    UnpicklingError is not among the exceptions _load_lora turns into one line (adapter_model.safetensors is checked
    for readability before peft reads it; the .bin it falls back to is not). Expected: one line naming the file,
    exit 2."""
    (bin_adapter / "adapter_model.bin").write_bytes(b"\x80\x04not a torch file" * 8)
    line = one_line_error(cli("generate", "--adapter", bin_adapter, "--model", "tiny-llama", "--prompt", "a great",
                              "--max-new-tokens", 2))
    assert "adapter_model.bin" in line, line


def test_a_truncated_adapter_model_bin_is_not_blamed_on_the_base_model(tmp_path, bin_adapter):
    """A truncated adapter_model.bin (an interrupted copy) is reported as "this LoRA adapter does not fit the model
    (PytorchStreamReader failed reading zip archive ...); use the base model it was trained on": the damaged file is
    not named and the advice is wrong (Review 79 fixed the same for a damaged adapter_config.json). Expected: the
    line names adapter_model.bin and does not send the user after another base model."""
    data = (bin_adapter / "adapter_model.bin").read_bytes()
    (bin_adapter / "adapter_model.bin").write_bytes(data[:200])
    line = one_line_error(cli("merge", bin_adapter, "--model", "tiny-llama", "--out", tmp_path / "merged"))
    assert "adapter_model.bin" in line, line
    assert "use the base model it was trained on" not in line, line


# --- the accountant: values the Python API now accepts but cannot price -------------------------------------------

def test_privacy_epsilon_with_pld_and_a_tiny_noise_multiplier_is_a_slimtune_error():
    """slimtune.privacy.epsilon takes any noise_multiplier > 0 (its own rule; --noise-multiplier's is >= 1e-3). With
    accountant="pld" and noise_multiplier=1e-4, dp_accounting tries to allocate 373 GiB and a raw MemoryError
    ("Unable to allocate 373. GiB for an array ...") reaches the caller (with RDP the same value is priced,
    5.5e9). Between 1e-3 and ~0.02 — values the CLI accepts — the PLD accountant needs GBs and minutes (sigma 1e-3:
    a 3.8 GiB array after ~15 s; 0.01: ~100 s). Expected: a SlimtuneError naming the keyword, before any work."""
    with pytest.raises(SlimtuneError, match="noise_multiplier"):
        privacy.epsilon(**{**BASE, "noise_multiplier": 1e-4, "accountant": "pld"})


def test_a_huge_noise_multiplier_is_not_called_too_small():
    """noise_multiplier=1e300 (nonsense, but finite and > 0, so accepted): "noise multiplier 1e+300: too small to
    account (epsilon overflows); use a larger noise_multiplier" — advice to raise it further. Expected: epsilon ~0
    (1e6 gives 0.0), or a message that does not call it too small."""
    try:
        value = privacy.epsilon(**{**BASE, "noise_multiplier": 1e300})
    except SlimtuneError as exc:
        assert "too small" not in str(exc), str(exc)
    else:
        assert 0 <= value <= 1e-3


@pytest.mark.parametrize("sigma", [1e-154, 1e-153, 5e-152])
def test_a_vanishing_noise_multiplier_is_never_priced_epsilon_zero(sigma):
    """RDP prices noise_multiplier 1e-150 at epsilon 5.5e301 and 1e-160 at inf, but every sigma between ~1e-154 and
    ~3e-152 at exactly 0.0 (dp_accounting's log1p(exp(a - b)) + b turns inf - inf into NaN: "invalid value
    encountered in scalar subtract"): a run with no noise at all is priced as perfectly private. slimtune.privacy.epsilon
    accepts any noise_multiplier > 0 since Review 77 and answers 0.0. Expected: a SlimtuneError (too small to account)
    or an epsilon at least as large as the one for a larger sigma."""
    try:
        value = privacy.epsilon(**{**BASE, "noise_multiplier": sigma})
    except SlimtuneError:
        return
    assert value >= privacy.epsilon(**{**BASE, "noise_multiplier": 1e-150}), value


def test_train_with_a_huge_target_epsilon_does_not_report_epsilon_zero(tmp_path):
    """`slimtune train --optimizer dpzero --epsilon 1e300` (--epsilon has no upper bound) calibrates noise_multiplier
    5e-152 — no noise — inside that window, trains, prints "epsilon 0.000" at every step and writes "epsilon": 0.0 to
    summary.json and the runs table: a false privacy claim in the run's own record. Expected: refused (exit 2, one
    line), or a recorded epsilon that is not 0."""
    import json
    out = tmp_path / "run"
    res = cli("train", "--model", "tiny-llama", "--data", DEMO / "sst2_demo_train.tsv", "--optimizer", "dpzero",
              "--epsilon", "1e300", "--delta", "1e-3", "--steps", 1, "--batch-size", 4, "--eval-every", 0, "--quiet",
              "--out", out)
    if res.exit_code == 2:
        one_line_error(res)
        return
    assert res.exit_code == 0, res.output[-600:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] > 0, summary

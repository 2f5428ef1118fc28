"""Attacks on a private run (issue 33), each written as the attacker would run it on the files a run leaves behind.

Threat model (README, "What to publish"): a user may publish everything a private run writes except its key file
(`secret.key`): config.json, metrics.jsonl, summary.json, status.json, the adapter, the checkpoint's weights and
optimizer state, reports. Each test below is an attack that recovered the DP noise, or a per-example signal, from
the code before issue 33; on the fixed code each attack must recover nothing.

(a) no file but the key file holds the key, a generator state or anything else that determines the noise;
(b) a search over 32-bit seeds finds the seed of a 32-bit-keyed generator (the attack works) but nothing consistent
    with a real run (the key is 256 bits and reaches the noise only through HMAC -> Philox);
(c) resuming re-releases nothing: a changed setting is refused, and a step whose release was already written is
    recomputed with fresh noise and accounted again;
(d) a canary row changes nothing a private run prints or writes outside its releases.
"""

from __future__ import annotations

import base64
import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

from slimtune.optim import OptimizerArgs
from slimtune.peft import PeftSettings
from slimtune.privacy import PrivacySpec
from slimtune.train import TrainConfig, prepare, train

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"
KEY_FILE = "secret.key"
GAMMA, CLIP_LR = 0.9, 0.2  # adaptive clipping's target quantile and step (the defaults)


def private_config(out: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), train_data=str(DEMO / "sst2_demo_train.tsv"),
                eval_data=str(DEMO / "sst2_demo_dev.tsv"), model="tiny-llama", optimizer="dpzero",
                optim=OptimizerArgs(lr=1e-2, eps=1e-2), peft=PeftSettings("lora", r=2), steps=6, batch_size=8,
                eval_every=3, checkpoint_every=3, progress=False, lr_scheduler="constant",
                privacy=PrivacySpec(delta=1e-3, noise_multiplier=1.0))  # adaptive clipping (the default)
    base.update(kw)
    return TrainConfig(**base)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run) if "projected_grad" in r}


def run_files(run: Path) -> list[Path]:
    return sorted(p for p in run.rglob("*") if p.is_file())


def key_encodings(key: bytes) -> list[bytes]:
    """Every way a program might have written the key (or a 32/64-bit part of it)."""
    out = [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key), base64.b64encode(key)[:-2]]
    for width in (4, 8, 16):
        for order in ("little", "big"):
            part = int.from_bytes(key[:width], order)
            out += [str(part).encode(), str(part >> 1).encode(), part.to_bytes(width, order)]
    return [e for e in out if len(e) >= 4]


# -- (a) nothing outside the key file determines the noise --------------------------------------------------------
def test_no_run_file_but_the_key_file_holds_the_key_or_a_generator_state(tmp_path, retired_keys):
    run = tmp_path / "run"
    train(prepare(private_config(run)))
    key_path = run / KEY_FILE
    assert not key_path.exists() and key_path in retired_keys, "a completed run retires its key file"  # (lead)
    key = bytes.fromhex(json.loads(retired_keys[key_path])["key"])
    assert len(key) >= 16, "the key has at least 128 bits"
    for path in run_files(run):
        if path == key_path:
            continue
        data = path.read_bytes()
        for enc in key_encodings(key):
            assert enc not in data, f"{path.relative_to(run)} holds the key (or part of it)"
        if path.suffix == ".pt":  # no random generator state (torch or numpy) in any pickled state
            state = torch.load(path, weights_only=False)
            assert not generator_states(state), f"{path.relative_to(run)} holds a generator state"


def generator_states(obj, found=None) -> list:
    """uint8 tensors the size of a torch CPU generator state, or numpy bit-generator state dicts, anywhere in obj."""
    found = [] if found is None else found
    if isinstance(obj, torch.Tensor) and obj.dtype == torch.uint8 and obj.numel() >= 5000:
        found.append(obj)
    elif isinstance(obj, dict):
        if "bit_generator" in obj or "state" in obj and isinstance(obj.get("state"), dict) and "key" in obj["state"]:
            found.append(obj)
        for v in obj.values():
            generator_states(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            generator_states(v, found)
    return found


def test_the_checkpoint_does_not_predict_the_next_noise(tmp_path):
    """The attack of the review: load the noise generator from checkpoint/optimizer.pt (step 3) and predict the noisy
    counts of steps 4..6 that adaptive clipping's logged C reveals."""
    from slimtune.privacy.secret import create_key_file
    run, key = tmp_path / "run", str(tmp_path / "run.key")
    create_key_file(Path(key))  # (lead) a completed run is extended only with a key file of the user's
    train(prepare(private_config(run, steps=3, secret_key_file=key)))
    state = torch.load(run / "checkpoint" / "optimizer.pt", weights_only=False)
    train(prepare(private_config(run, steps=6, secret_key_file=key), resume=True))
    stolen = generator_states(state)
    if not stolen:
        return  # nothing to steal: the attack has no generator to start from
    gen = torch.Generator()
    gen.set_state(stolen[0])
    noisy = noisy_counts(run)
    draws = [(torch.randn((), generator=gen, dtype=torch.float64).item(),
              torch.randn((), generator=gen, dtype=torch.float64).item()) for _ in range(3)]
    assert not consistent(noisy, {4: draws[0][1], 5: draws[1][1], 6: draws[2][1]}, quantile_noise(run)), \
        "the checkpoint's generator state predicted the count noise of the next steps"


def noisy_counts(run: Path) -> dict[int, float]:
    """Adaptive clipping's released count at each step t, from the logged clips: C_{t+1} = C_t exp(-lr (f_t - gamma)),
    f_t = (count_t + sigma_b n_t) / B. Returns {t: count_t + sigma_b n_t}."""
    steps = step_records(run)
    batch = json.loads((run / "config.json").read_text())["batch_size"]
    return {t: batch * (GAMMA - math.log(steps[t + 1]["clip"] / steps[t]["clip"]) / CLIP_LR)
            for t in sorted(steps) if t + 1 in steps}


def quantile_noise(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["quantile_noise"]


def consistent(noisy: dict[int, float], noise: dict[int, float], sigma_b: float, tol: float = 1e-6) -> bool:
    """Whether candidate standard-normal count noises make every noisy count an integer (the true counts are)."""
    shared = [t for t in noisy if t in noise]
    if not shared:
        return False
    for t in shared:
        count = noisy[t] - sigma_b * noise[t]
        if abs(count - round(count)) > tol:
            return False
    return True


# -- (b) a 32-bit seed search --------------------------------------------------------------------------------------
def mt_count_noises(seed: int, steps: int) -> list[float]:
    """The count noise of each step if the noise came from torch's CPU generator keyed with `seed` (scalar, count)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        torch.randn((), generator=gen, dtype=torch.float64)
        out.append(torch.randn((), generator=gen, dtype=torch.float64).item())
    return out


def search_seed(noisy: dict[int, float], sigma_b: float, candidates) -> list[int]:
    """Every candidate seed whose generator makes all the noisy counts integers."""
    steps = max(noisy)
    hits = []
    for seed in candidates:
        draws = mt_count_noises(seed, steps)
        if consistent(noisy, {t: draws[t - 1] for t in noisy}, sigma_b):
            hits.append(seed)
    return hits


def test_the_seed_search_finds_a_32_bit_seed_and_nothing_for_a_real_run(tmp_path, retired_keys):
    sigma_b = 2.0
    # 1. the attack works: releases made with a 32-bit seed are found within the searched space
    true_seed = 0x5EED_0B57
    counts = [3, 5, 7, 6, 2]
    draws = mt_count_noises(true_seed, len(counts))
    simulated = {t + 1: counts[t] + sigma_b * draws[t] for t in range(len(counts))}
    space = range(true_seed - 300, true_seed + 300)
    assert search_seed(simulated, sigma_b, space) == [true_seed]
    # 2. a real run: the same search over a space that holds its key's low 32 bits (and the 32-bit words of every
    # 64-bit seed a program could derive from it) finds nothing consistent
    run = tmp_path / "run"
    train(prepare(private_config(run)))
    noisy, sigma = noisy_counts(run), quantile_noise(run)
    assert noisy and sigma > 0
    words = seed_words(run, retired_keys.get(run / KEY_FILE))  # (lead) the key as the run retired it
    assert len(words) >= 16
    space = sorted({w + d for w in words for d in range(-20, 21)})
    assert search_seed(noisy, sigma, space) == []


def seed_words(run: Path, key_text: str | None = None) -> set[int]:
    """The 32-bit words an implementation could have keyed torch's generator with: every word of the key file (its
    text as read before a completed run retired it, or the file), and for the pre-issue-33 format (a 63-bit secret in
    checkpoint/secret.json) the low word of its noise seed."""
    words = set()
    if key_text is None and (run / KEY_FILE).exists():
        key_text = (run / KEY_FILE).read_text()
    if key_text is not None:
        key = bytes.fromhex(json.loads(key_text)["key"])
        words |= {int.from_bytes(key[i:i + 4], order) for i in range(0, len(key), 4) for order in ("little", "big")}
    legacy = run / "checkpoint" / "secret.json"
    if legacy.exists():
        from slimtune.optim.base import mix_seed
        words.add(mix_seed(json.loads(legacy.read_text())["seed"], 0xD9) & 0xFFFFFFFF)
    assert words, "no key file"
    return words


# -- (c) resume releases nothing twice -------------------------------------------------------------------------------
def crash_after_logging_step(monkeypatch, crash_step: int):
    """Make the trainer die right after step `crash_step` was logged and before its checkpoint (as a kill would)."""
    import slimtune.train.trainer as trainer
    original = trainer._checkpoint

    def checkpoint(run, step, *args, **kwargs):
        if step == crash_step:
            raise KeyboardInterrupt  # like a kill -9 between the log line and the checkpoint
        return original(run, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "_checkpoint", checkpoint)


def test_resume_with_changed_settings_is_refused_or_releases_with_fresh_noise(tmp_path, monkeypatch):
    from slimtune import SlimtuneError
    run = tmp_path / "run"
    crash_after_logging_step(monkeypatch, 4)
    last = dict(checkpoint_every=2, save="last")  # (--save best checkpoints a better evaluation's step too: step 3's)
    with pytest.raises(KeyboardInterrupt):
        train(prepare(private_config(run, **last)))
    monkeypatch.undo()
    released = step_records(run)
    assert max(released) == 4  # step 4 was released; the checkpoint holds step 2
    # the review's attack: resume with another lr (or batch size) replays step 3-4 with the same noise
    try:
        resumed = prepare(private_config(run, **last, optim=OptimizerArgs(lr=5e-2, eps=1e-2)), resume=True)
    except SlimtuneError as exc:
        assert "lr" in str(exc)  # refused, naming the setting
    else:
        train(resumed)
        again = step_records(run)
        for t in (3, 4):  # the same direction z, another lr: with the same noise the difference is noise-free
            assert released[t]["projected_grad"] != again[t]["projected_grad"]
    # resuming with the same settings recomputes steps 3-4 with fresh noise, and accounts for both releases
    summary = train(prepare(private_config(run, **last), resume=True))
    again = step_records(run)
    assert all(released[t]["projected_grad"] != again[t]["projected_grad"] for t in (3, 4))
    from slimtune.privacy.accountant import PrivacyAccountant
    spec = PrivacySpec(delta=1e-3, noise_multiplier=1.0)
    reference = PrivacyAccountant(spec, summary["train_examples"], 8, 1.0, 1, quantile_noise=summary["quantile_noise"])
    assert summary["epsilon"] == pytest.approx(reference.epsilon(6 + 2), rel=1e-6)  # 6 steps + 2 released twice


@pytest.mark.parametrize("change", [{"delta": 0.5}, {"delta": 1e-4}, {"noise_multiplier": 2.0}])
def test_resume_refuses_changed_privacy_settings(tmp_path, change):
    from slimtune import SlimtuneError
    run = tmp_path / "run"
    train(prepare(private_config(run, steps=3)))
    spec = PrivacySpec(**{"delta": 1e-3, "noise_multiplier": 1.0, **change})
    with pytest.raises(SlimtuneError, match="delta|noise"):
        train(prepare(private_config(run, steps=6, privacy=spec), resume=True))


def test_delta_of_one_over_n_or_more_is_refused(tmp_path):
    from slimtune import SlimtuneError
    with pytest.raises(SlimtuneError, match="delta"):
        prepare(private_config(tmp_path / "run", privacy=PrivacySpec(delta=0.5, noise_multiplier=1.0)))


# -- (d) no per-example side channel ------------------------------------------------------------------------------
def generation_rows(canary: bool) -> list[dict]:
    rows = [{"prompt": f"Describe item {i}:", "completion": f" a small item number {i}"} for i in range(24)]
    if canary:
        rows[5] = {"prompt": "Describe item 5:", "completion": " zebra " * 200}  # far longer than --max-length
    return rows


def cli_private_generation(tmp_path: Path, name: str, canary: bool):
    """`slimtune train` in its own process, so that stderr is what a user (or a log collector) would see."""
    import subprocess
    import sys
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generation_rows(canary)))
    return subprocess.run([sys.executable, "-m", "slimtune.cli", "train", "--task", "generation", "--data", str(data),
                           "--model", "tiny-llama", "--optimizer", "dpzero", "--epsilon", "2", "--delta", "1e-3",
                           "--steps", "6", "--batch-size", "8", "--max-length", "24", "--eval-every", "0",
                           "--out", str(tmp_path / name), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_a_canary_row_changes_nothing_on_stderr(tmp_path):
    without = cli_private_generation(tmp_path, "without", canary=False)
    with_canary = cli_private_generation(tmp_path, "with", canary=True)
    assert without.returncode == 0 and with_canary.returncode == 0, with_canary.stderr
    assert with_canary.stderr.replace("with", "") == without.stderr.replace("without", "")


def test_the_memory_refusal_does_not_measure_the_training_rows(tmp_path, monkeypatch):
    """The refusal names what the user configured (--max-length), never the longest training example. (The tiny
    model's 256 positions are lifted: --max-length 10^7 would be refused by check_positions before the memory check.)"""
    from slimtune import SlimtuneError
    from slimtune.models import loading
    monkeypatch.setattr(loading, "max_positions", lambda model: None)
    messages = []
    for canary in (False, True):
        data = tmp_path / f"{canary}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in generation_rows(canary)))
        cfg = private_config(tmp_path / f"run{canary}", task="generation", train_data=str(data), eval_data=None,
                             batch_size=24, max_length=10**7)  # all 24 rows (a larger batch is refused first)
        with pytest.raises(SlimtuneError) as exc:
            prepare(cfg)
        import re  # the machine's free memory changes between the two calls; the data may not change anything else
        messages.append(re.sub(r"the [\d,]+ MB available", "the N MB available", str(exc.value)
                               .replace(str(tmp_path), "")))
    assert "N MB available" in messages[0] and messages[0] == messages[1]


def test_a_tiny_models_saved_tokenizer_holds_no_training_words(tmp_path):
    data = tmp_path / "train.tsv"
    rows = (DEMO / "sst2_demo_train.tsv").read_text().splitlines()
    data.write_text("\n".join(rows[:-1] + ["a xylophonic canary sentence\t1"]) + "\n")
    run = tmp_path / "run"
    train(prepare(private_config(run, train_data=str(data), steps=2, eval_every=0)))
    for path in run_files(run):
        if path.name != KEY_FILE:
            assert b"xylophonic" not in path.read_bytes(), f"{path.relative_to(run)} holds a training word"


# -- overlap and impossible sampling ------------------------------------------------------------------------------
def test_eval_data_equal_to_the_training_data_is_refused_for_private_runs(tmp_path):
    from slimtune import SlimtuneError
    same = str(DEMO / "sst2_demo_train.tsv")
    with pytest.raises(SlimtuneError, match="eval"):
        prepare(private_config(tmp_path / "a", eval_data=same))
    copy = tmp_path / "copy.tsv"
    copy.write_text((DEMO / "sst2_demo_train.tsv").read_text())
    with pytest.raises(SlimtuneError, match="eval"):
        prepare(private_config(tmp_path / "b", eval_data=str(copy)))


def test_shuffle_with_a_batch_larger_than_the_data_is_one_error(tmp_path):
    from slimtune import SlimtuneError
    with pytest.raises(SlimtuneError, match="batch"):
        prepare(private_config(tmp_path / "run", batch_size=1000,
                               privacy=PrivacySpec(delta=1e-3, noise_multiplier=1.0, sampling="shuffle")))


# -- file modes --------------------------------------------------------------------------------------------------
def test_the_key_file_is_owner_only_and_every_other_file_is_as_documented(tmp_path, monkeypatch):
    from slimtune.train import trainer
    modes, retire = {}, trainer.retire_key_file

    def mode_then_retire(path):  # (lead) a completed run retires its key: its mode is read as it goes
        modes[path.name] = stat.S_IMODE(path.stat().st_mode)
        retire(path)
    monkeypatch.setattr(trainer, "retire_key_file", mode_then_retire)
    run = tmp_path / "run"
    train(prepare(private_config(run)))
    assert modes == {KEY_FILE: 0o600}, modes
    for path in run_files(run):
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.name == KEY_FILE:
            assert mode == 0o600, oct(mode)
        else:
            assert mode in (0o600, 0o644) or mode == 0o666 & ~current_umask(), (path, oct(mode))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_restart_composes_the_releases_of_the_run_it_replaces(tmp_path, monkeypatch):
    """--restart moves a failed private run aside and starts over on the same data: the replaced run's releases were
    published, so the new run's epsilon composes them (no fresh budget)."""
    from slimtune.privacy.accountant import PrivacyAccountant
    run = tmp_path / "run"
    crash_after_logging_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(prepare(private_config(run, checkpoint_every=3)))  # dies at step 3's checkpoint
    monkeypatch.undo()
    assert json.loads((run / "status.json").read_text())["released_through"] == 3
    summary = train(prepare(private_config(run, steps=2, checkpoint_every=10), restart=True))
    assert (tmp_path / "run.failed-1" / "metrics.jsonl").exists()
    spec = PrivacySpec(delta=1e-3, noise_multiplier=1.0)
    reference = PrivacyAccountant(spec, summary["train_examples"], 8, 1.0, 1, quantile_noise=summary["quantile_noise"])
    assert summary["epsilon"] == pytest.approx(reference.epsilon(2 + 3), rel=1e-6)  # 2 new steps + 3 published


def test_two_runs_sharing_a_key_file_draw_different_noise(tmp_path):
    from slimtune.privacy.secret import create_key_file
    create_key_file(tmp_path / "shared.key")
    released = []
    for name in ("a", "b"):
        train(prepare(private_config(tmp_path / name, steps=2, secret_key_file=str(tmp_path / "shared.key"))))
        released.append(step_records(tmp_path / name)[1]["projected_grad"])
    assert released[0] != released[1]


def test_a_run_never_spends_past_its_target_epsilon():
    """The loop let epsilon reach 1.001 x the target: a resumed run whose recomputed steps were accounted twice
    ended at epsilon 6.0008 for --epsilon 6 (gemma-dpzero-lora-eps6). It now stops at the last step within it."""
    from slimtune.train.trainer import budget_allows

    class Accountant:
        spec = PrivacySpec(target_epsilon=6.0, delta=1e-5)

        def epsilon(self, steps):
            return 6.0 * (1 + 1e-4 * (steps - 100))  # 6.0 at step 100, 6.0006 at 106

    assert budget_allows(Accountant(), 100) and not budget_allows(Accountant(), 101)
    assert budget_allows(None, 10**6)

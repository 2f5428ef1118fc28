"""Findings of an independent adversarial review (after f23d015). Each test reproduces one bug and FAILS on the code
it was written against; its docstring states the finding and the behaviour expected instead. Tiny models only."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from slimtune import SlimtuneError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"
TRAIN, DEV = str(DEMO / "sst2_demo_train.tsv"), str(DEMO / "sst2_demo_dev.tsv")
runner = CliRunner()


def cli(*args):
    from slimtune.cli import app
    return runner.invoke(app, [str(a) for a in args])


def private_config(out: Path, **kw):
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.privacy import PrivacySpec
    from slimtune.train import TrainConfig
    base = dict(out_dir=str(out), train_data=TRAIN, eval_data=DEV, model="tiny-llama", optimizer="dpzero",
                optim=OptimizerArgs(lr=1e-2, eps=1e-2), peft=PeftSettings("lora", r=2), steps=2, batch_size=8,
                eval_every=0, checkpoint_every=2, progress=False, lr_scheduler="constant",
                privacy=PrivacySpec(delta=1e-3, noise_multiplier=1.0))
    base.update(kw)
    return TrainConfig(**base)


def released(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["projected_grad"] for r in rows if "projected_grad" in r}


# -- privacy ---------------------------------------------------------------------------------------------------------
def test_a_key_file_reused_by_a_second_run_gives_it_fresh_noise(tmp_path):
    """HIGH. `--secret-key-file` (documented for data-parallel ranks) is read as is and the noise/batches are
    HMAC(key, purpose || attempt || step || draw) with nothing run-specific in the message: two private runs given the
    same key file (a sweep, a re-run after `--restart`, a user who keeps "their" key) draw the *same* noise and the
    same Poisson batches at every step. The threat model says "Two runs with identical settings draw different noise
    and batches"; here their releases are identical, and with any setting changed (lr, seed) the difference of two
    releases of one step cancels the noise exactly (a noise-free function of the private data).
    Expected: a key file already used by another run is refused, or every run binds its noise and batches to a fresh
    per-run nonce (recorded in the run directory, kept across --resume), so two runs never share noise."""
    from slimtune.privacy.secret import create_key_file
    from slimtune.train import prepare, train

    create_key_file(tmp_path / "my.key")
    runs = []
    for name in ("a", "b"):
        try:
            train(prepare(private_config(tmp_path / name, secret_key_file=str(tmp_path / "my.key"))))
        except SlimtuneError:
            return  # refusing to reuse a key for a second run is a fix
        runs.append(released(tmp_path / name))
    assert runs[0][1] != runs[1][1], "two runs with one key file released the same noisy scalar (same noise)"


def test_federated_server_secrets_have_more_than_32_bits(tmp_path):
    """HIGH. The federated server's secret randomness — theta_0 (with FFA the frozen LoRA A that must stay secret
    from clients), the fixed secret dither of the broadcast, and the client-level DP noise — comes from
    `torch.Generator().manual_seed(secrets.randbits(63))` / `torch.manual_seed(...)`. torch's CPU generator (mt19937)
    keeps only the low 32 bits of the seed (issue 33's finding 2), so each of these secrets is one of 2^32 values a
    client can search offline against the Q(theta) it receives.
    Expected: seeds that differ only above bit 32 give different secrets (use the 256-bit key / Philox path of
    privacy/secret.py, or OS randomness directly)."""
    import inspect

    import slimtune.federated.bounds as bounds
    import slimtune.federated.model as fed_model
    import slimtune.federated.strategy as strategy_module
    from slimtune.federated.config import FederatedConfig
    from slimtune.federated.strategy import secret_dither

    shapes = {"l.lora_A.weight": (4, 8), "l.lora_B.weight": (8, 4)}
    cfg = FederatedConfig(data=TRAIN, bits=4, dither=1.0)
    first, second = secret_dither(shapes, cfg), secret_dither(shapes, cfg)
    assert any(not torch.equal(first[k], second[k]) for k in shapes)
    for module in (fed_model, strategy_module, bounds):  # no secret drawn from torch's seeded CPU generator
        source = inspect.getsource(module)
        assert "manual_seed(secret" not in source and "Generator().manual_seed" not in source, module.__name__
        assert not hasattr(module, "secret_seed"), module.__name__


# -- Hugging Face trainer ----------------------------------------------------------------------------------------
def _hf_private_trainer(tmp_path, eval_same_as_train=False, **kwargs):
    datasets = pytest.importorskip("datasets")
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    import slimtune
    from slimtune.hf import ZOArguments, ZOTrainer
    from slimtune.models.loading import tiny_model, tiny_tokenizer

    rows = [line.split("\t")[0] for line in (DEMO / "sst2_demo_train.tsv").read_text().splitlines()[1:]]
    tok = tiny_tokenizer(rows)
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id, seed=0)
    torch.manual_seed(0)
    model = slimtune.apply_peft(model, "lora", r=2)
    data = datasets.Dataset.from_dict({"text": rows}).map(lambda b: tok(b["text"]), batched=True,
                                                         remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, report_to=[],
                             logging_steps=2, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=7, **kwargs)
    return ZOTrainer(model=model, args=args, train_dataset=data, eval_dataset=data if eval_same_as_train else None,
                     data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                     zo_args=ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2))


def test_private_zotrainer_does_not_release_total_flos_of_private_batches(tmp_path, monkeypatch):
    """MEDIUM. transformers' Trainer adds `floating_point_ops(inputs)` = 6 x params x numel(input_ids) of every
    training batch to `state.total_flos`, which is logged at the end of `train()` (log_history, report_to) and saved
    in every checkpoint's trainer_state.json. In a private ZOTrainer run the batches are the secret Poisson batches
    (random size, padded to their longest row), so total_flos reveals the sum over steps of realised batch size x
    longest row — per-example information (a long canary row shows) outside the accounted releases. ZOTrainerMixin.log
    drops the loss but keeps total_flos.
    Expected: a private run's logs and state carry no quantity computed from the realised batches (total_flos absent
    or 0, or computed from the expected batch size and --max-length)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trainer = _hf_private_trainer(tmp_path, max_steps=4)
    trainer.train()
    logged = [r["total_flos"] for r in trainer.state.log_history if r.get("total_flos")]
    assert not logged and not trainer.state.total_flos, \
        f"total_flos {trainer.state.total_flos:.6g} counts the tokens of the private Poisson batches"


def test_private_zotrainer_refuses_evaluation_on_the_training_data(tmp_path, monkeypatch):
    """MEDIUM. `slimtune train` refuses --eval-data that overlaps the training data for private runs (issue 33,
    item 4: evaluations and best-model choice would be computed on training rows without noise), but a private
    ZOTrainer accepts eval_dataset == train_dataset (the project's own tests build it that way) and logs eval_loss of
    the private rows, un-noised, in its log_history.
    Expected: a one-line SlimtuneError when a private ZOTrainer's eval_dataset shares rows with train_dataset."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SlimtuneError):
        _hf_private_trainer(tmp_path, eval_same_as_train=True, max_steps=2)


# -- federation: one code path, one validation ------------------------------------------------------------------
@pytest.mark.parametrize("run_config", [
    {"lr": -1.0},
    {"local-optimizer": "dp-sgd", "local-dp-noise": 0.0},
    {"local-optimizer": "dpzero", "local-dp-delta": 1.5},
    {"lr": "abc"},
    {"max-length": 0},
], ids=["negative-lr", "dp-noise-0", "dp-delta-1.5", "lr-string", "max-length-0"])
def test_flwr_run_path_refuses_what_slimtune_federate_refuses(tmp_path, run_config):
    """MEDIUM. Issue 35 item 3 ("one code path ... the same validation"): `slimtune federate` checks types and ranges
    through FederateSettings, but `flwr run .` and the deployment script build FederatedConfig.from_flower(run_config)
    and call check_run, whose FederatedConfig.validate checks neither types nor the ranges of lr, eps, max_length,
    dirichlet_alpha or the local-DP settings. A run config with local-dp-noise = 0 (private clients with no noise), a
    local-dp-delta of 1.5, a negative or string lr, max-length 0 passes check_run and starts Flower.
    Expected: check_run refuses each with a one-line SlimtuneError, as `slimtune federate` does."""
    from slimtune.federated.config import FederatedConfig, check_run

    cfg = FederatedConfig.from_flower({"data": TRAIN, **run_config}, None)
    with pytest.raises(SlimtuneError):
        check_run(replace(cfg, out_dir=str(tmp_path / "out")))


# -- settings: internal errors on bad input ---------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["train", "--data", TRAIN, "--model", "tiny-llama", "--steps", "1", "--batch-size", "4", "--quiet", "--r", "2",
     "--seed", str(2 ** 70), "--out", "{tmp}/out"],
    ["train", "--data", TRAIN, "--model", "tiny-llama", "--steps", "1", "--batch-size", "4", "--quiet", "--r", "2",
     "--optimizer", "dpzero", "--delta", "1e-3", "--noise-multiplier", "1e-300", "--out", "{tmp}/out"],
    ["federate", "--data", TRAIN, "--model", "tiny-llama", "--seed", str(2 ** 70), "--rounds", "1", "--clients", "1",
     "--out", "{tmp}/out"],
], ids=["train-seed-2^70", "train-noise-multiplier-1e-300", "federate-seed-2^70"])
def test_out_of_range_numbers_are_one_line_errors_not_internal_errors(tmp_path, argv):
    """LOW. `--seed 2**70` (train, federate) ends in "internal error (ValueError: Overflow when unpacking long long)"
    with exit 1 (torch.manual_seed), `--noise-multiplier 1e-300` in "internal error (ZeroDivisionError)"; the settings
    model has no upper bound for the seed and no lower bound away from 0 for the noise.
    Expected: exit 2 with one line naming the flag, before any work."""
    res = cli(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert res.exit_code == 2, res.output[-400:]
    assert "internal error" not in res.output


def test_report_on_a_summary_that_is_not_an_object_is_a_one_line_error(tmp_path):
    """LOW. `slimtune report RUN` where RUN/summary.json is valid JSON but not an object (e.g. `[1, 2]`, a truncated or
    foreign file) ends in "internal error (AttributeError: 'list' object has no attribute 'get')", exit 1.
    Expected: exit 2, one line naming the file."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("[1, 2]")
    res = cli("report", run, "--out", tmp_path / "report")
    assert res.exit_code == 2 and "internal error" not in res.output, res.output[-400:]


def test_fzoo_trains_with_the_n_its_config_records(tmp_path):
    """LOW-MEDIUM (setting silently replaced). `train --optimizer fzoo --n-spsa 1` trains FZOO with N = 8 directions
    (optim/__init__.py: `args.n_spsa if args.n_spsa > 1 else 8`) while config.json records n_spsa 1; slimtune.FZOO
    refuses n_perturbations < 2. A user asking for N = 1 (or reading config.json to reproduce a run) is misled.
    Expected: --n-spsa 1 with fzoo is a one-line error (FZOO needs N >= 2), or FZOO's N has its own setting whose
    default 8 is what config.json records."""
    from slimtune.settings.train import TrainSettings
    from slimtune.train import prepare

    try:
        settings = TrainSettings.build({"data": TRAIN, "model": "tiny-llama", "optimizer": "fzoo", "n_spsa": 1,
                                        "steps": 1, "batch_size": 4, "r": 2, "quiet": True,
                                        "out": str(tmp_path / "run")})
        run = prepare(settings.to_config())
    except SlimtuneError:
        return
    run.run_dir.release()
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["n_spsa"]
    assert run.optimizer.config.n_perturbations == recorded, \
        f"config.json says n_spsa {recorded}, FZOO runs {run.optimizer.config.n_perturbations} directions"


def test_dpzero_clipping_bounds_a_nan_per_example_difference():
    """MEDIUM. DPZero's sensitivity bound (each example moves the clipped sum by at most C) fails for a non-finite
    per-example difference: `g.clamp(-C, C)` keeps NaN (l+ = l- = inf, e.g. a bf16/fp16 overflow on one row), so the
    released scalar is NaN and the run stops at the first step that sampled that row — a certain, per-example signal
    (which step, whether at all) outside the accounted release. (+inf is clipped correctly; NaN is not.)
    Expected: a non-finite per-example value contributes at most C (e.g. clipped to 0 or +-C) and the release stays
    finite; the mechanism's bound holds for any input."""
    import math

    from slimtune.privacy import PrivacySpec
    from slimtune.privacy.dpzero import PrivateDifference

    mechanism = PrivateDifference(PrivacySpec(delta=1e-3, noise_multiplier=1.0, clip=1.0), 1.0, 4.0)
    plus = torch.tensor([0.5, float("inf"), 0.7])
    minus = torch.tensor([0.4, float("inf"), 0.6])
    value, _ = mechanism(plus, minus, 1e-2)
    assert math.isfinite(value), "one row's non-finite loss made the private release NaN"


def test_eval_of_a_quantized_base_adapter_reproduces_the_runs_evaluation(tmp_path):
    """LOW-MEDIUM (exactness). A LoRA adapter trained with --base-quant int4 was evaluated during training (summary's
    final_eval_loss, best-model choice) on the int4 base, but nothing in adapter/ records the quantization and
    `slimtune eval` / `generate` / `merge` have no --base-quant: they apply it to the dense base, silently another
    model (loss 0.697444 in the run, 0.697552 from `slimtune eval` on the tiny model; for a plain LoRA run the two
    agree to the last digit). Expected: the adapter records its base quantization and eval/generate/merge use it (or
    refuse / say so), so `slimtune eval` reproduces the run's own evaluation."""
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "q"
    res = cli("train", "--data", TRAIN, "--eval-data", DEV, "--model", "tiny-llama", "--base-quant", "int4",
              "--steps", "2", "--eval-every", "2", "--save", "last", "--batch-size", "4", "--r", "2", "--quiet",
              "--out", run)
    assert res.exit_code == 0, res.output[-400:]
    summary = json.loads((run / "summary.json").read_text())
    res = cli("eval", "--data", DEV, "--model", "tiny-llama", "--adapter", run / "adapter")
    if res.exit_code == 2:
        return  # refusing to evaluate on a different base is a fix
    out = res.stdout
    measured = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert measured["loss"] == pytest.approx(summary["final_eval_loss"], abs=1e-7), \
        "slimtune eval scored the adapter on the dense base, not the int4 base it was trained and evaluated on"


@pytest.mark.parametrize("line", ['server-lr = "fast"', 'server-average = "x"', "norm-bound = inf",
                                  "server-momentum = 5.0", "eval-max = -5", "node-timeout = -1.0"],
                         ids=["server-lr-string", "server-average-string", "norm-bound-inf", "momentum-5",
                              "eval-max-negative", "node-timeout-negative"])
def test_server_settings_file_is_checked_like_the_flags(tmp_path, line):
    """MEDIUM. The server's settings file ($SLIMTUNE_SERVER_SETTINGS / $FLWR_HOME/slimtune-server.toml, the only
    place `flwr run` and deployment take server settings from) is type-checked only for fields whose default is not
    None, and FederatedConfig.validate has no ranges for most fields: `server-lr = "fast"` and `server-average = "x"`
    end in a TypeError traceback inside check_run; `norm-bound = inf` is accepted (B_t = inf: the bound on one
    client's influence is off, while --norm-bound inf is refused by `slimtune federate`), as are server-momentum 5.0
    (FedAvgM diverges), eval-max -5 and node-timeout -1.
    Expected: a one-line SlimtuneError naming the file and key, as FederateSettings gives for the same values."""
    from slimtune.federated.config import FederatedConfig, check_run

    settings = tmp_path / "slimtune-server.toml"
    settings.write_text(line + "\n")
    with pytest.raises(SlimtuneError):
        cfg = FederatedConfig.from_flower({"data": TRAIN}, settings)
        check_run(replace(cfg, out_dir=str(tmp_path / "out")))


def test_the_release_ledger_records_a_step_before_its_adapter_is_written(tmp_path, monkeypatch):
    """MEDIUM. A private run's ledger (status.json `released_through`) must record a step before anything holding
    that step's release is written, so that a resume after a crash recomputes it under a fresh attempt *and accounts
    it*. With --save best the adapter of an evaluation step s (theta_s: post-processing of step s's noisy scalar, a
    file the threat model lets the user publish) is written in _track_best *before*
    `run_dir.update(released_through=s)`. A crash or second Ctrl-C in between (or a kill during the adapter swap)
    leaves adapter/ at step s with the ledger at s - 1; a resume from an earlier checkpoint then abandons steps up to
    s - 1 only, and step s's published release is never accounted.
    Expected: released_through >= s whenever adapter/ (or the checkpoint) holds step s's weights."""
    from slimtune.train import prepare, train
    from slimtune.train import trainer as trainer_module

    seen = []
    real_save = trainer_module._save_adapter

    def recording_save(run):
        seen.append((run.run_dir.status().get("released_through"), run.best_step))
        real_save(run)

    monkeypatch.setattr(trainer_module, "_save_adapter", recording_save)
    monkeypatch.setattr(trainer_module, "is_better", lambda *a: True)  # every evaluation saves the adapter
    train(prepare(private_config(tmp_path / "run", steps=2, eval_every=2, checkpoint_every=2)))
    late = [(ledger, step) for ledger, step in seen if step and (ledger or 0) < step]
    assert not late, f"adapter of step {late[0][1]} written while the ledger said released_through={late[0][0]}"


def test_resume_compares_a_setting_the_older_run_did_not_record_with_its_default(tmp_path):
    """MEDIUM (resume changes what is trained). train/resume.py `differences` skips every setting absent from the
    run's config.json ("a setting newer than the run: it trained with the field's default") instead of comparing the
    new value with that default. Runs made before this round (f23d015) have no `base_quant`, `secret_key_file`,
    `optim.fo_layers`, ... in config.json, so `--resume --base-quant int4` on such a run is accepted and continues
    training its LoRA on a quantized base it never saw. (Simulated here by removing the key from a fresh run's
    config.json, which is what an f23d015 run holds.)
    Expected: a missing key is compared as the field's default (None here), so the change is refused."""
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "old"
    res = cli("train", "--data", TRAIN, "--model", "tiny-llama", "--steps", "2", "--batch-size", "4", "--r", "2",
              "--quiet", "--out", run)
    assert res.exit_code == 0, res.output[-400:]
    stored = json.loads((run / "config.json").read_text())
    del stored["base_quant"]
    (run / "config.json").write_text(json.dumps(stored))
    res = cli("train", "--out", run, "--resume", "--steps", "3", "--base-quant", "int4")
    assert res.exit_code == 2, "resume with --base-quant int4 accepted for a run trained on a dense base"


def test_client_level_dp_does_not_drop_replies_by_their_norm(tmp_path):
    """MEDIUM. Under client-level DP (--client-dp-clip S, --client-dp-noise sigma) every update is clipped to S and
    the mean is taken over the *accepted* replies with noise sigma S / K'. --max-update-norm is still allowed with it:
    a reply whose norm exceeds the cap is rejected, so whether a client is counted (K', logged per round as
    replies/rejected, and the divisor of the released mean) depends on that client's data — an un-noised,
    unaccounted bit, the federated twin of dividing by the realised batch size (which DPZero avoids).
    Expected: check_run refuses --max-update-norm together with client-level DP (or over-norm replies are clipped,
    not dropped, and the mean divides by the fixed number of clients)."""
    from slimtune.federated.config import FederatedConfig, check_run

    cfg = FederatedConfig(data=TRAIN, bits=32, client_dp_clip=1.0, client_dp_noise=1.0, max_update_norm=0.5,
                          out_dir=str(tmp_path / "out"))
    with pytest.raises(SlimtuneError):
        check_run(cfg)

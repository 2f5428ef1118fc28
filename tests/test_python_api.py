"""The public Python API (issue 37): optimizers built from a model, apply_peft, the accountant in one call, and
slimtune.train(**settings) — the CLI's code, defaults and checks, reached from Python."""

import copy
import io
import json
import subprocess
import sys

import pytest
import torch

import slimtune
from slimtune import SlimtuneError
from slimtune.models.loading import tiny_model, tiny_tokenizer
from slimtune.optim.defaults import defaults_for


def tiny_lm(peft: str | None = "lora", seed: int = 0):
    tok = tiny_tokenizer(["a b c d e f g it was great terrible"])
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id, seed=seed).eval()
    if peft:
        torch.manual_seed(seed)
        model = slimtune.apply_peft(model, peft, r=4)
    return model


def batch(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 15, (n, 8), generator=g)
    return ids


def mean_loss(model, ids):
    return lambda: model(input_ids=ids, labels=ids).loss


def per_example(model, ids):
    def closure():
        logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return nll.mean(dim=1)
    return closure


def trainable(model):
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_import_slimtune_is_light():
    code = "import sys, slimtune; print('torch' in sys.modules, sorted(slimtune.__all__)[:3])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False")


def test_mezo_takes_the_cli_defaults_for_the_model_kind_and_learns():
    model = tiny_lm("lora")
    opt = slimtune.MeZO(model)
    table = defaults_for("mezo", "lora")
    assert (opt.settings["lr"], opt.settings["eps"]) == (table.lr, table.eps)
    full = slimtune.MeZO(tiny_lm(None))
    assert full.settings["lr"] == defaults_for("mezo", "none").lr  # a plain model: the full-parameter row
    ids = batch()
    model = tiny_lm("lora")
    opt = slimtune.MeZO(model, lr=5e-2, eps=1e-2)
    first = mean_loss(model, ids)().item()
    for _ in range(30):
        out = opt.step(mean_loss(model, ids))
    assert "projected_grad" in out.info and out.loss < first


def test_public_mezo_is_the_cli_optimizer():
    """Same seed and batches: slimtune.MeZO moves the weights exactly as build_optimizer's MeZO (the CLI's)."""
    from slimtune.optim import OptimizerArgs, build_optimizer

    a, b = tiny_lm("lora"), tiny_lm("lora")
    public = slimtune.MeZO(a, lr=1e-2, eps=1e-2, seed=3)
    internal = build_optimizer("mezo", b, OptimizerArgs(lr=1e-2, eps=1e-2, seed=3))
    for step in range(3):
        ids = batch(step)
        public.step(mean_loss(a, ids))
        internal.step(mean_loss(b, ids))
    assert all(torch.equal(x, y) for x, y in zip(trainable(a), trainable(b)))


@pytest.mark.parametrize("make", [
    lambda m: slimtune.MeZO(m, lr=1e-2),
    lambda m: slimtune.LOZO(m, lr=1e-2, rank=2, nu=2),
    lambda m: slimtune.LOZO(m, lr=1e-2, momentum=0.9),
    lambda m: slimtune.FZOO(m, n_perturbations=3),
    lambda m: slimtune.HiZOO(m),
    lambda m: slimtune.SparseMeZO(m, mask_every=2),
], ids=["mezo", "lozo", "lozo-m", "fzoo", "hizoo", "sparse-mezo"])
def test_state_dict_round_trip_continues_bit_identically(make, tmp_path):
    """3 steps, save (torch.save / weights_only load, as transformers does), restore into fresh objects, 3 more ==
    6 uninterrupted steps."""
    model = tiny_lm("lora")
    opt = make(model)
    for step in range(6):
        opt.step(mean_loss(model, batch(step)))
    expected = trainable(model)

    model = tiny_lm("lora")
    opt = make(model)
    for step in range(3):
        opt.step(mean_loss(model, batch(step)))
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = tiny_lm("lora")
    model.load_state_dict(saved["model"])
    opt = make(model)
    opt.load_state_dict(saved["opt"])
    for step in range(3, 6):
        opt.step(mean_loss(model, batch(step)))
    assert all(torch.equal(x, y) for x, y in zip(trainable(model), expected))


def test_torch_schedulers_drive_the_learning_rate():
    model = tiny_lm("lora")
    opt = slimtune.MeZO(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    for step in range(3):
        opt.step(mean_loss(model, batch(step)))
        sched.step()
    assert opt.impl.config.lr == pytest.approx(1e-2 / 3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)


def test_a_step_without_a_closure_is_an_error():
    with pytest.raises(SlimtuneError, match="needs a closure"):
        slimtune.MeZO(tiny_lm("lora")).step()


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_spsa=0), "n_spsa 0: must be >= 1"),
    (dict(lr=-1.0), "lr -1: must be > 0"),
    (dict(perturbation="uniform"), "perturbation='uniform': choose one of"),
    (dict(seed=1.5), "expected an integer"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(SlimtuneError, match=message) as info:
        slimtune.MeZO(tiny_lm("lora"), **kwargs)
    assert "\n" not in str(info.value)


def test_no_trainable_parameters_is_an_error():
    model = tiny_lm(None)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(SlimtuneError, match="no trainable parameters"):
        slimtune.MeZO(model)


def test_dpzero_needs_per_example_losses():
    model = tiny_lm("lora")
    dp = slimtune.DPZero(model, epsilon=6, delta=1e-5, dataset_size=1000, batch_size=16, steps=10)
    n = len(dp.sample_batch())
    with pytest.raises(SlimtuneError, match="needs per-example losses"):
        dp.step(mean_loss(model, batch(n=n)))
    out = dp.step(per_example(model, batch(n=n)))
    assert "projected_grad" in out.info and dp.steps_taken == 1


def test_dpzero_calibrates_to_the_budget_and_stops_at_it():
    from slimtune.privacy.accountant import PrivacyAccountant

    model = tiny_lm("lora")
    dp = slimtune.DPZero(model, epsilon=2.0, delta=1e-5, dataset_size=500, batch_size=10, steps=4, clipping="fixed")
    assert dp.noise_multiplier == pytest.approx(slimtune.privacy.noise_multiplier(
        epsilon=2.0, dataset_size=500, batch_size=10, steps=4), rel=1e-4)
    for _ in range(4):
        idx = dp.sample_batch()
        ids = batch(len(idx), n=len(idx)) if idx else torch.zeros(0, 8, dtype=torch.long)
        dp.step(per_example(model, ids) if idx else (lambda: torch.zeros(0)))
    assert dp.epsilon_spent <= 2.0 * 1.001
    with pytest.raises(SlimtuneError, match="calibrated for 4 steps"):
        dp.step(per_example(model, batch()))
    assert isinstance(dp.accountant, PrivacyAccountant)


def test_dpzero_batches_are_poisson_and_the_state_holds_no_key(tmp_path):
    model = tiny_lm("lora")
    dp = slimtune.DPZero(model, dataset_size=2000, batch_size=20, steps=50)
    sizes = []
    for _ in range(30):
        idx = dp.sample_batch()
        sizes.append(len(idx))
        assert len(set(idx)) == len(idx) and all(0 <= i < 2000 for i in idx)
        dp.impl.step_count += 1  # the next step's draw (no training needed to look at the sampler)
    assert len(set(sizes)) > 3 and 12 < sum(sizes) / len(sizes) < 28  # random sizes around B = 20
    state = dp.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # plain values only: the key cannot be pickled (RunKey refuses) and is not there
    assert "key" not in json.dumps(state, default=str).lower().replace("keys", "")


@pytest.mark.parametrize("kwargs, message", [
    (dict(delta=0.01), "delta=0.01 >= 1/N"),
    (dict(clipping="fixed", target_quantile=0.5), "target_quantile applies only to adaptive clipping"),
    (dict(dataset_size=0), "dataset_size=0: must be an integer >= 1"),
    (dict(mechanism="cauchy"), "mechanism='cauchy': choose one of"),
])
def test_dpzero_arguments_are_checked(kwargs, message):
    args = {**dict(dataset_size=1000, batch_size=16, steps=10), **kwargs}
    with pytest.raises(SlimtuneError, match=message):
        slimtune.DPZero(tiny_lm("lora"), **args)


def test_apply_peft_by_name_and_its_checks():
    model = slimtune.apply_peft(tiny_lm(None), "svfit", r=2)
    assert slimtune.optimizers.peft_kind(model) == "svfit"
    assert slimtune.MeZO(model).settings["lr"] == defaults_for("mezo", "svfit").lr
    with pytest.raises(SlimtuneError, match="lora_alpha applies only to peft lora or pissa"):
        slimtune.apply_peft(tiny_lm(None), "svfit", lora_alpha=8.0)
    with pytest.raises(SlimtuneError, match="r 0: must be >= 1"):
        slimtune.apply_peft(tiny_lm(None), "lora", r=0)
    with pytest.raises(SlimtuneError, match="choose one of"):
        slimtune.apply_peft(tiny_lm(None), "prefix")


def test_privacy_epsilon_is_the_accountant():
    from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec

    eps = slimtune.privacy.epsilon(noise_multiplier=1.0, dataset_size=1000, batch_size=16, steps=100)
    assert eps == PrivacyAccountant(PrivacySpec(), 1000, 16, 1.0).epsilon(100)
    sigma = slimtune.privacy.noise_multiplier(epsilon=eps, dataset_size=1000, batch_size=16, steps=100)
    assert sigma == pytest.approx(1.0, rel=1e-3)
    assert slimtune.privacy.epsilon(noise_multiplier=1.0, dataset_size=1000, batch_size=16, steps=100,
                                    releases=2) > eps
    with pytest.raises(SlimtuneError, match="slimtune.privacy.epsilon: accountant='moments'"):  # its keyword, not the flag
        slimtune.privacy.epsilon(noise_multiplier=1.0, dataset_size=1000, batch_size=16, steps=1,
                                 accountant="moments")


def test_train_is_the_cli_from_python(tmp_path, demo_paths):
    train, dev = demo_paths
    summary = slimtune.train(data=train, eval_data=dev, model="tiny-llama", optimizer="mezo", steps=3, batch_size=4,
                             eval_every=3, out=str(tmp_path / "run"), quiet=True)
    assert summary["steps"] == 3 and summary["method"] == "mezo"
    assert (tmp_path / "run" / "adapter").is_dir()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["optim"]["lr"] == defaults_for("mezo", "lora").lr  # the table's default, as on the CLI
    resolved = slimtune.train(data=train, model="tiny-llama", optimizer="lozo", out=str(tmp_path / "dry"),
                              dry_run=True)
    assert resolved["steps"] == defaults_for("lozo", "lora").steps and not (tmp_path / "dry").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(optimizer="mezo", lozo_rank=4), "--lozo-rank applies only to --optimizer lozo, lozo-m or dplozo"),
    (dict(steps=0), "--steps 0: must be >= 1"),
    (dict(optimiser="mezo"), "unknown setting 'optimiser'"),
])
def test_train_refuses_what_the_cli_refuses(tmp_path, demo_paths, kwargs, message):
    with pytest.raises(SlimtuneError, match=message):
        slimtune.train(data=demo_paths[0], model="tiny-llama", out=str(tmp_path / "run"), **kwargs)
    assert not (tmp_path / "run").exists()


def test_train_reads_a_config_file_under_keyword_overrides(tmp_path, demo_paths):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {demo_paths[0]}\nmodel: tiny-llama\noptimizer: lozo\nsteps: 7\n")
    resolved = slimtune.train(config=str(config), steps=5, out=str(tmp_path / "run"), dry_run=True)
    assert resolved["optimizer"] == "lozo" and resolved["steps"] == 5


def test_dphybrid_from_python_spends_its_budget_over_poisson_batches():
    """slimtune.DPHybrid: the hybrid's two releases a step calibrated to the budget; empty batches take a step."""
    model = tiny_lm("lora")
    dp = slimtune.DPHybrid(model, epsilon=3.0, delta=1e-5, dataset_size=400, batch_size=8, steps=3, fo_layers=1)
    one = slimtune.DPZero(tiny_lm("lora"), epsilon=3.0, delta=1e-5, dataset_size=400, batch_size=8, steps=3)
    assert dp.accountant.releases == 2 and dp.noise_multiplier > one.noise_multiplier
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for _ in range(3):
        idx = dp.sample_batch()
        dp.step(per_example(model, batch(len(idx), n=len(idx))) if idx else (lambda: torch.zeros(0)))
    assert 0 < dp.epsilon_spent <= 3.0 * 1.001
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(torch.isfinite(a).all() for a in after) and any(not torch.equal(a, b) for a, b in zip(after, before))
    with pytest.raises(SlimtuneError, match="calibrated for 3 steps"):
        dp.step(per_example(model, batch()))

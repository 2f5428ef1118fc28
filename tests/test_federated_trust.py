"""Issue 35: --robust trust (FLTrust). Each reply is weighted by its cosine with the server's own update on its root
data and rescaled to that update's norm. Unlike the direction filter, whose reference (the round's median) two
sign-flipping clients of 8 can move, nothing a client sends moves the reference."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from test_federated import make_cfg, theta_like
from slimtune import SlimtuneError
from slimtune.federated.bounds import aggregate, trusted, update_norm


def own_root(demo_paths, tmp_path, name="root.tsv"):
    """Root data of the server's own: the demo training rows reworded (none of the clients' or evaluation rows)."""
    header, *rows = open(demo_paths[0]).read().splitlines()
    path = tmp_path / name
    path.write_text("\n".join([header, *(f"truly {row}" for row in rows)]) + "\n")
    return path


def skewed_replies(n_honest=3, n_flipped=1, tau=0.5, seed=0):
    """Honest replies tau t + s_c b (label skew s_c = +-1, |b| = 1 > tau), flipped ones the negative of an honest one;
    the reference is t plus a little noise (the server's root data has both labels)."""
    g = torch.Generator().manual_seed(seed)
    names = theta_like().keys()
    shapes = {k: v.shape for k, v in theta_like().items()}
    unit = lambda: (lambda v: {k: x / update_norm(v) for k, x in v.items()})(  # noqa: E731
        {k: torch.randn(shapes[k], generator=g) for k in names})
    t, b = unit(), unit()
    honest = [{k: tau * t[k] + (1 if c % 2 else -1) * b[k] for k in names} for c in range(n_honest)]
    flipped = [{k: -v for k, v in honest[c % n_honest].items()} for c in range(n_flipped)]
    noise = unit()
    reference = {k: t[k] + 0.2 * noise[k] for k in names}
    return t, honest, flipped, reference


def along(update, direction):
    return sum((update[k] * direction[k]).sum() for k in direction).item()


def test_trust_gives_no_weight_to_sign_flipped_replies_even_as_a_majority():
    """Three flipped replies of four: the round's median is theirs, so the direction filter keeps them; trust keeps
    the honest reply only, and the step points along the task."""
    t, honest, flipped, reference = skewed_replies(n_honest=1, n_flipped=3)
    theta = theta_like()
    cosines = []
    update = trusted([*honest, *flipped], reference, theta, [0.25] * 4, cosines)
    assert cosines[0] > 0 and all(c < 0 for c in cosines[1:])
    assert along(update, t) > 0
    # the update is the honest reply rescaled to the reference's norm, at its weight in the mean (1/4: the flipped
    # replies' weight goes to nobody)
    h = honest[0]
    expected = {k: 0.25 * h[k] * update_norm(reference) / update_norm(h) for k in h}
    assert all(torch.allclose(update[k], expected[k], atol=1e-6) for k in h)


def test_trust_rescales_every_reply_to_the_reference_norm():
    """A reply sent at norm 999 in the task's direction moves theta no more than the reference's own norm."""
    t, honest, _, reference = skewed_replies()
    huge = {k: 999 * v / update_norm(t) for k, v in t.items()}
    update = trusted([*honest, huge], reference, theta_like(), [0.25] * 4)
    assert update_norm(update) <= update_norm(reference) + 1e-6


def test_trust_moves_nothing_when_no_reply_agrees_with_the_reference():
    t, honest, _, reference = skewed_replies(tau=0.0)
    against = {k: -v for k, v in reference.items()}
    update = trusted([against], reference, theta_like(), [1.0])
    assert all(float(v.abs().max()) == 0 for v in update.values())


def test_aggregate_under_trust_logs_each_cosine_and_needs_the_reference(demo_paths, tmp_path):
    root = own_root(demo_paths, tmp_path)
    cfg = make_cfg(demo_paths, robust="trust", root_data=str(root))
    t, honest, flipped, reference = skewed_replies()
    info = {}
    aggregate(theta_like(), [*honest, *flipped], [0.25] * 4, cfg, info=info, reference=reference)
    assert info["trusted"] == sum(c > 0 for c in info["trust"]) and len(info["trust"]) == 4
    assert info["trust"][3] < 0  # the flipped reply
    with pytest.raises(ValueError, match="reference"):
        aggregate(theta_like(), honest, [1 / 3] * 3, cfg)


@pytest.mark.parametrize("change, message", [
    (dict(robust="trust"), "--robust trust needs --root-data"),
    (dict(robust="median", root_data="ROOT"), "--root-data applies only to --robust trust or auto"),
    (dict(root_data="ROOT", local_optimizer="mezo"), "zeroth-order or hybrid clients"),  # auto: trust, not ignored
    (dict(root_data="ROOT", client_dp_clip=1.0), "--robust auto with --root-data"),
    (dict(robust="trust", root_data="ROOT", local_optimizer="mezo"), "zeroth-order or hybrid clients"),
    (dict(robust="trust", root_data="ROOT", mode="zo-seeds", local_optimizer="mezo"), "zeroth-order or hybrid clients"),
    (dict(robust="trust", root_data="EVAL"), "is --eval-data"),
    (dict(robust="trust", root_data="DATA", local_optimizer="dp-adamw"), "is --data"),
    (dict(robust="trust", root_data="ROOT", local_optimizer="hybrid"), "zeroth-order or hybrid clients"),
    (dict(robust="trust", root_data="ROOT", client_dp_clip=1.0), "client-level DP"),
])
def test_trust_settings_that_cannot_work_are_refused(demo_paths, tmp_path, change, message):
    root = own_root(demo_paths, tmp_path)
    change = {k: {"ROOT": str(root), "EVAL": demo_paths[1], "DATA": demo_paths[0]}.get(v, v) for k, v in change.items()}
    with pytest.raises(SlimtuneError, match=message):
        make_cfg(demo_paths, **change).validate()


@pytest.mark.parametrize("source, flag", [(0, "--data"), (1, "--eval-data")])
def test_root_rows_shared_with_the_clients_or_the_evaluation_are_refused(demo_paths, tmp_path, source, flag):
    """A copy (another path) of the clients' or the evaluation data, or any of their rows: the server would train
    without noise on the clients' examples, or on what it reports accuracy on."""
    from slimtune.federated.config import check_inputs
    root = own_root(demo_paths, tmp_path)
    copied = open(demo_paths[source]).read().splitlines()[1:3]
    root.write_text(root.read_text() + "\n".join(copied) + "\n")
    with pytest.raises(SlimtuneError, match=f"2 of its rows also appear in {flag}"):
        check_inputs(make_cfg(demo_paths, robust="trust", root_data=str(root)))
    check_inputs(make_cfg(demo_paths, robust="trust", root_data=str(own_root(demo_paths, tmp_path, "own.tsv"))))


def test_a_tiny_norm_reply_cannot_make_the_aggregate_non_finite():
    """(review) fp32 uploads let a client send 1e-40 x an honest update: a positive cosine, and a float32 rescale
    factor ||Delta_0|| / ||Delta_k|| ~ 1e40 overflowed, so the round's update was inf and the step refused: one
    client stalled every round. The rescale is done in double precision."""
    t, honest, _, reference = skewed_replies(tau=2.0)
    tiny = {k: 1e-40 * v for k, v in honest[0].items()}
    assert all(torch.isfinite(v).all() for v in tiny.values()) and update_norm(tiny) > 0
    update = trusted([honest[1], tiny], reference, theta_like(), [0.5, 0.5])
    assert all(torch.isfinite(v).all() for v in update.values())
    assert update_norm(update) <= update_norm(reference) + 1e-6


def test_a_barely_trusted_reply_moves_theta_no_more_than_its_weight_in_the_mean(demo_paths, tmp_path):
    """(review) FLTrust divides by the sum of trust scores: a reply with cosine 1e-5, alone in a round whose honest
    reply points away from Delta_0, got weight 1 and moved theta by ||Delta_0|| in a direction of its choosing (and
    was logged as cosine 0.0, `trusted` 0). Capped, it moves theta by at most w_k ||Delta_0||, and a reply that
    moved theta is counted as trusted."""
    root = own_root(demo_paths, tmp_path)
    cfg = make_cfg(demo_paths, robust="trust", root_data=str(root))
    theta = theta_like()
    _, _, _, reference = skewed_replies()
    orth = lambda v: {k: v[k] - along(v, reference) / update_norm(reference) ** 2 * reference[k]  # noqa: E731
                      for k in reference}
    g = torch.Generator().manual_seed(5)
    harm = orth({k: torch.randn(v.shape, generator=g) for k, v in reference.items()})
    harm = {k: v / update_norm(harm) for k, v in harm.items()}
    hostile = {k: harm[k] + 1e-5 * reference[k] for k in reference}
    honest = {k: -0.1 * reference[k] + v for k, v in orth({k: torch.randn(v.shape, generator=g)
                                                             for k, v in reference.items()}).items()}
    info = {}
    update = aggregate(theta, [honest, hostile], [0.5, 0.5], cfg, info=info, reference=reference)
    assert along(update, harm) <= 0.5 * update_norm(reference) + 1e-6
    assert info["trusted"] == 1
    # a round whose replies agree equally with the reference keeps the mean's weights, however small the cosines
    unit_orth = [orth(skewed_replies(seed=s)[1][0]) for s in (7, 8)]
    weak = [{k: 0.1 * reference[k] + v / update_norm(u) for k, v in u.items()} for u in unit_orth]  # equal cosines
    update = trusted(weak, reference, theta, [0.5, 0.5])
    expected = {k: sum(0.5 * w[k] * update_norm(reference) / update_norm(w) for w in weak) for k in reference}
    assert all(torch.allclose(update[k], expected[k], atol=1e-6) for k in reference)


def test_a_diverged_reference_moves_nothing_and_says_so(demo_paths, tmp_path, caplog):
    cfg = make_cfg(demo_paths, robust="trust", root_data=str(own_root(demo_paths, tmp_path)))
    _, honest, _, reference = skewed_replies()
    broken = {k: torch.full_like(v, float("nan")) for k, v in reference.items()}
    update = aggregate(theta_like(), honest, [1 / 3] * 3, cfg, reference=broken)
    assert all(float(v.abs().max()) == 0 for v in update.values())
    assert "not finite" in caplog.text


def test_auto_is_trust_when_the_server_has_root_data(demo_paths, tmp_path):
    root = str(own_root(demo_paths, tmp_path))
    assert make_cfg(demo_paths, root_data=root).aggregation_rule == "trust"
    assert make_cfg(demo_paths).aggregation_rule == "direction"
    assert make_cfg(demo_paths, robust="direction").aggregation_rule == "direction"


def test_the_root_data_stays_on_the_server(demo_paths, tmp_path):
    cfg = make_cfg(demo_paths, robust="trust", root_data=str(tmp_path / "root.tsv"))
    assert "root_data" not in json.loads(cfg.client_json())


def test_the_server_reference_is_its_own_round_on_the_root_data(demo_paths, tmp_path):
    """run_server's reference: the clients' recipe (non-private optimizer) from what they received, on the root
    data; a different start gives a different update, and nothing but the LoRA entries is returned."""
    from slimtune.federated.model import build_model, lora_state
    from slimtune.federated.root_reference import reference_optimizer
    from slimtune.federated.server_app import root_reference
    root = own_root(demo_paths, tmp_path)
    cfg = make_cfg(demo_paths, robust="trust", root_data=str(root), local_optimizer="dp-adamw").resolved()
    model, tok, _, _, objective = build_model(cfg)
    reference = root_reference(cfg, model, tok, objective)
    assert reference.optimizer_name == "adamw" == reference_optimizer("dp-adamw")
    start = lora_state(model)
    delta = reference(start, 1)
    assert set(delta) == set(start) and update_norm(delta) > 0
    assert all(p.grad is None for p in model.parameters())
    again = reference(start, 1)  # the same round from the same start: the same batches, the same update
    assert all(torch.allclose(delta[k], again[k]) for k in delta)
    assert root_reference(replace(cfg, robust="direction", root_data=""), model, tok, objective) is None


def test_federate_refuses_trust_without_root_data_in_one_line(demo_paths, tmp_path):
    for extra, words in ((["--robust", "trust"], "--root-data"),
                         (["--robust", "median", "--root-data", demo_paths[1]], "--robust trust or auto"),
                         (["--root-data", demo_paths[0]], "is --data")):
        proc = subprocess.run([sys.executable, "-m", "slimtune.cli", "federate", "--data", demo_paths[0],
                               "--out", str(tmp_path / "run"), *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_trust_runs_in_flowers_simulation_against_a_sign_flipping_client(demo_paths, tmp_path, monkeypatch):
    """The whole path (simulate -> run_server -> FedLPP with the root reference): every round logs one cosine per
    reply, and the flipping client's replies get none of the weight."""
    from flwr.supercore.task_identity import TaskIdentity
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, None)  # the simulation runtime sets its own
    from slimtune.federated import simulate
    from slimtune.federated.hostile import hostile_app
    root = own_root(demo_paths, tmp_path)
    cfg = make_cfg(demo_paths, bits=4, rounds=2, robust="trust", root_data=str(root), out_dir=str(tmp_path / "run"))
    summary = simulate(cfg, client_app=hostile_app("sign-flip", {0}, cfg.data))
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["aggregation_rule"] == "trust"
    for r in rounds[1:]:
        assert len(r["trust"]) == r["replies"] == 3 and r["trusted"] <= 2
        assert min(r["trust"]) < 0  # the flipped reply


def test_the_non_private_form_of_each_optimizer():
    from slimtune.federated.root_reference import reference_optimizer
    from slimtune.optim.methods import METHODS, PRIVATE
    assert [reference_optimizer(p) for p in ("dp-adamw", "dp-sgd", "dpzero", "dphybrid")] == \
        ["adamw", "sgd", "mezo", "hybrid"]
    assert all(reference_optimizer(n) == n for n in METHODS if n not in PRIVATE)  # lozo-m stays lozo-m
    assert not any(reference_optimizer(p) in PRIVATE for p in PRIVATE)

"""Issue 35, item 2: federated local DP that works and leaks nothing, and a run that trained nothing is an error."""

import json
import math
from dataclasses import replace

import pytest

from test_federated import InProcessGrid, make_cfg, task_identity  # noqa: F401 (fixture)
from slimtune import SlimtuneError
from slimtune.federated.client_app import local_train
from slimtune.federated.model import build_model, lora_state
from slimtune.federated.wire import encode_state


def payload_for(cfg):
    model, *_ = build_model(cfg)
    return encode_state(lora_state(model), cfg.bits, cfg.block_size)[0]


@pytest.mark.parametrize("optimizer", ["dp-adamw", "dp-sgd", "dpzero"])
def test_private_clients_train_every_round_and_release_only_the_update(demo_paths, optimizer):
    """dp-adamw / dp-sgd clients failed from round 2 ('hooks twice'); private clients sent their exact training loss
    and example count, then their local epsilon (a function of their count)."""
    cfg = make_cfg(demo_paths, bits=8, local_optimizer=optimizer, local_dp_noise=1.0)
    payload = payload_for(cfg)
    for server_round in (1, 2, 3):
        arrays, metrics = local_train(cfg, 0, payload, server_round, steps_before=2 * (server_round - 1))
        assert arrays and metrics == {}, server_round  # no loss, no count, no epsilon


def test_a_clients_reply_does_not_depend_on_its_row_count(demo_paths, tmp_path, capsys):
    """A private client sent `local-epsilon`, computed from its row count rounded down to a power of two: a node with 8
    rows reported another value than the same node without one of them (7 rows, bucket 4), so the reply said whether
    that row was there, a release no accountant covered. Now nothing about it is sent; a deployment node prints its
    own epsilon on its own stderr."""
    from slimtune.federated.local_privacy import node_epsilon

    lines = open(demo_paths[0]).read().splitlines()
    cfg = make_cfg(demo_paths, bits=8, local_optimizer="dp-sgd", local_dp_noise=1.0, batch_size=4)
    replies = []
    for rows in (8, 7):
        own = tmp_path / f"node{rows}.tsv"
        own.write_text("\n".join(lines[:rows + 1]) + "\n")
        _, metrics = local_train(replace(cfg, data=str(own)), 3, payload_for(cfg), 2, own_data=True, steps_before=2)
        replies.append(metrics)
        printed = capsys.readouterr().err
        assert f"epsilon {node_epsilon(cfg, rows, 4):.4g}" in printed and "not sent" in printed
    assert replies[0] == replies[1] == {}
    assert node_epsilon(cfg, 7, 4) > node_epsilon(cfg, 8, 4)  # fewer rows: a larger rate, a larger epsilon


def test_a_public_lower_bound_caps_the_rate_and_lets_the_server_report_epsilon(demo_paths, tmp_path):
    """--local-dp-min-examples M: every client samples at q <= B / M, so the server reports eps(B / M, sigma, T), a
    bound on every client's epsilon computed from public settings only (T: a client that trained every round)."""
    from slimtune.data import PoissonSampler
    from slimtune.federated.local_privacy import node_epsilon, public_bound, sample_rate
    from slimtune.federated.server_app import run_server
    from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec

    cfg = make_cfg(demo_paths, bits=8, local_optimizer="dp-adamw", rounds=2, out_dir=str(tmp_path / "run"),
                   eval_max=20, local_dp_min_examples=64, batch_size=8)
    assert sample_rate(cfg, 16) == 8 / 64 and sample_rate(cfg, 1000) == 8 / 1000  # a small client: smaller batches
    assert PoissonSampler(16, 8, max_rate=sample_rate(cfg, 16)).sample_rate == 8 / 64
    spec = PrivacySpec(delta=cfg.local_dp_delta, noise_multiplier=cfg.local_dp_noise, clip=cfg.local_dp_clip)
    expected = PrivacyAccountant(spec, 64, 8, cfg.local_dp_noise).epsilon(2 * cfg.local_steps)
    assert public_bound(cfg, 2) == pytest.approx(expected)
    assert all(node_epsilon(cfg, n, 2 * cfg.local_steps) <= expected + 1e-12 for n in (3, 16, 64, 1000))
    summary = run_server(InProcessGrid(3), cfg)
    assert summary["accepted_updates"] == 6 and summary["local_epsilon"] == pytest.approx(expected)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("local_epsilon") for r in rounds if r["round"] > 0] == pytest.approx([public_bound(cfg, 1),
                                                                                        expected])


def test_dpzero_in_zo_seeds_mode_is_refused(demo_paths):
    """--mode zo-seeds clients run MeZO and release (seed, scalar) pairs: --local-optimizer dpzero there was silently
    non-private."""
    with pytest.raises(SlimtuneError, match="zo-seeds"):
        make_cfg(demo_paths, mode="zo-seeds", local_optimizer="dpzero").validate()
    with pytest.raises(SlimtuneError, match="--weighting examples"):
        make_cfg(demo_paths, local_optimizer="dp-sgd", weighting="examples").validate()


def test_a_private_run_without_a_public_bound_reports_no_local_epsilon(demo_paths, tmp_path):
    from slimtune.federated.server_app import run_server
    cfg = make_cfg(demo_paths, bits=8, local_optimizer="dp-adamw", rounds=2, out_dir=str(tmp_path / "run"),
                   eval_max=20)
    summary = run_server(InProcessGrid(3), cfg)
    assert summary["accepted_updates"] == 6 and summary["stop_reason"] == "completed" and summary["nodes_replied"] == 3
    assert summary["local_epsilon"] is None and summary["local_delta"] is None


def test_a_run_where_every_client_fails_exits_with_an_error_and_saves_no_adapter(demo_paths, tmp_path):
    """It used to exit 0, say 'completed', report epsilon and save the untrained adapter."""
    from slimtune.federated.server_app import run_server

    def broken(msg, context):
        raise RuntimeError("Trying to add hooks twice to the same model")

    out = tmp_path / "run"
    cfg = make_cfg(demo_paths, bits=8, rounds=2, out_dir=str(out), eval_max=20)
    with pytest.raises(SlimtuneError, match="no client update was accepted"):
        run_server(InProcessGrid(3, broken), cfg)
    assert not (out / "adapter").exists()

"""Issue 35, item 2: federated local DP that works and leaks nothing, and a run that trained nothing is an error."""

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
    and example count."""
    cfg = make_cfg(demo_paths, bits=8, local_optimizer=optimizer, local_dp_noise=1.0)
    payload = payload_for(cfg)
    for server_round in (1, 2, 3):
        arrays, metrics = local_train(cfg, 0, payload, server_round, steps_before=2 * (server_round - 1))
        assert arrays and set(metrics) == {"local-epsilon"}, server_round  # no loss, no count


def test_each_client_computes_its_local_epsilon_from_its_own_data(demo_paths, tmp_path):
    """In deployment the local epsilon was computed from the server's split, not the node's file (20.8 reported for
    an 8-row node whose epsilon was 24.8). A client reports it from its own size (rounded down to a power of two,
    so the value is a valid upper bound that does not reveal the exact count)."""
    from slimtune.federated.client_app import local_epsilon
    from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec

    lines = open(demo_paths[0]).read().splitlines()
    own = tmp_path / "node.tsv"
    own.write_text("\n".join(lines[:11]) + "\n")  # 10 rows: reported as 8
    cfg = replace(make_cfg(demo_paths, bits=8, local_optimizer="dp-sgd", local_dp_noise=1.0, batch_size=4),
                  data=str(own))
    _, first = local_train(cfg, 3, payload_for(cfg), 1, own_data=True)
    _, third = local_train(cfg, 3, payload_for(cfg), 3, own_data=True, steps_before=4)
    spec = PrivacySpec(delta=cfg.local_dp_delta, noise_multiplier=1.0, clip=cfg.local_dp_clip)
    expected = PrivacyAccountant(spec, 8, 4, 1.0).epsilon(6)
    assert third["local-epsilon"] == pytest.approx(expected) and first["local-epsilon"] < third["local-epsilon"]
    assert local_epsilon(cfg, 10, 6) == local_epsilon(cfg, 8, 6) > local_epsilon(cfg, 16, 6)  # the bucket's bound


def test_dpzero_in_zo_seeds_mode_is_refused(demo_paths):
    """--mode zo-seeds clients run MeZO and release (seed, scalar) pairs: --local-optimizer dpzero there was silently
    non-private."""
    with pytest.raises(SlimtuneError, match="zo-seeds"):
        make_cfg(demo_paths, mode="zo-seeds", local_optimizer="dpzero").validate()
    with pytest.raises(SlimtuneError, match="--weighting examples"):
        make_cfg(demo_paths, local_optimizer="dp-sgd", weighting="examples").validate()


def test_a_private_run_reports_what_its_clients_computed(demo_paths, tmp_path):
    from slimtune.federated.server_app import run_server
    cfg = make_cfg(demo_paths, bits=8, local_optimizer="dp-adamw", rounds=2, out_dir=str(tmp_path / "run"),
                   eval_max=20)
    summary = run_server(InProcessGrid(3), cfg)
    assert summary["accepted_updates"] == 6 and summary["stop_reason"] == "completed" and summary["nodes_replied"] == 3
    assert summary["local_epsilon"] > 0 and math.isfinite(summary["local_epsilon"])


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

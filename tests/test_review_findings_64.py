"""Review 64: federated privacy settings and accounting (DP flags given and then not used, or used differently than
said; what a private run writes). Each test fails on the code it was written against."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimtune import SlimtuneError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"
TRAIN, DEV = str(DEMO / "sst2_demo_train.tsv"), str(DEMO / "sst2_demo_dev.tsv")


# -- 1. `flwr run .` / the server settings file: local DP settings for clients that are not private ----------------
@pytest.mark.parametrize("key,value", [("local-dp-noise", 2.0), ("local-dp-clip", 0.1), ("local-dp-delta", 1e-9)])
def test_local_dp_settings_in_a_flwr_run_config_without_a_private_optimizer_are_refused(key, value):
    """`flwr run . --run-config 'local-dp-noise=2.0'` (the --local-optimizer forgotten: adamw, the default): the
    `slimtune federate` flag is refused (applies=private_clients), but FederatedConfig.validate, the one check of the
    `flwr run` and deployment paths, runs check_config_values -> Settings.check_values, which checks types and ranges
    and never `applies`. The run is accepted and its clients train with plain AdamW, no DP at all, while the user's
    config asks for noise 2.0."""
    from slimtune.federated.config import FederatedConfig
    cfg = FederatedConfig.from_flower({"data": TRAIN, "model": "tiny-llama", key: value}, None)
    with pytest.raises(SlimtuneError, match=key):
        cfg.validate()


# -- 2. `slimtune federate`: --local-dp-delta without --local-dp-min-examples --------------------------------------
def test_local_dp_delta_without_a_public_bound_is_refused_in_a_simulation():
    """`slimtune federate --local-optimizer dp-sgd --local-dp-delta 1e-7`: the delta is used only by the server's
    public bound (local_privacy.public_bound, which needs --local-dp-min-examples) and by a deployment node's ledger and
    printed epsilon (own data-path). A simulation's clients have neither, so nothing is computed at that delta: the
    flag is accepted and unused (summary.json: local_epsilon and local_delta null)."""
    from slimtune.settings.federate import FederateSettings
    with pytest.raises(SlimtuneError, match="local-dp-delta"):
        FederateSettings.build({"data": TRAIN, "model": "tiny-llama", "local_optimizer": "dp-sgd",
                                "local_dp_delta": 1e-7})


# -- 3. dphybrid clients: --local-dp-clip is not the clip of the first-order part ---------------------------------
def test_dphybrid_clients_clip_their_first_order_part_at_local_dp_clip(monkeypatch):
    """--local-dp-clip is 'private local optimizers: clipping threshold' (and a node's `local-dp-clip` floor refuses
    'a larger clip'), but a dphybrid client builds OptimizerArgs without fo_clip, so the top part's per-example
    gradient is clipped at the method constant 1.0 whatever the run (or the node's floor) says: --local-dp-clip 0.05
    clips only the ZO scalar."""
    from slimtune.federated import client_app
    from slimtune.federated.config import FederatedConfig
    from slimtune.federated.model import build_model, lora_state
    from slimtune.federated.wire import encode_state

    built = []

    def capture(*args, **kwargs):
        built.append(real(*args, **kwargs))
        raise RuntimeError("stop after building the optimizer")

    real = client_app.build_optimizer
    monkeypatch.setattr(client_app, "build_optimizer", capture)
    cfg = FederatedConfig(data=TRAIN, num_clients=2, local_steps=1, lr=1e-2, bits=8, batch_size=4,
                          local_optimizer="dphybrid", local_dp_clip=0.05)
    model, *_ = build_model(cfg)
    payload = encode_state(lora_state(model), cfg.bits, cfg.block_size)[0]
    try:
        with pytest.raises(SlimtuneError):
            client_app.local_train(cfg, 0, payload, 1)
        assert built, "the client built no optimizer"
        assert built[0].fo.max_grad_norm == pytest.approx(0.05)
    finally:
        for optimizer in built:  # the cached client model must not keep this optimizer's per-example hooks
            client_app.release_hooks(optimizer)


# -- 4. the coalition measurement in a private run -------------------------------------------------------------------
@pytest.mark.parametrize("private", [{"local_optimizer": "dp-sgd"}, {"client_dp_clip": 1.0, "client_dp_noise": 1.0}])
def test_the_coalition_measurement_is_refused_in_a_private_run(private):
    """--attack-coalition k fine-tunes, without DP, on the pooled rows of clients 0..k-1 and writes the result's
    score (attack_coalition_score, attack_coalition_from_scratch_score) and the exact number of those rows
    (attack_coalition_examples) to summary.json: functions of individual training examples that no accountant
    covers, in the file of a run whose other outputs are withheld for privacy (private_clients: no round times, no
    memory, no losses). It is accepted beside local and client-level DP."""
    from slimtune.federated.config import FederatedConfig
    cfg = FederatedConfig(data=TRAIN, eval_data=DEV, num_clients=3, attack_coalition=1, **private)
    with pytest.raises(SlimtuneError, match="attack-coalition"):
        cfg.validate()

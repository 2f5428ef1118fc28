"""Review 30: the federated part attacked as a hostile server and a hostile client, and the two changes of the day
(client-level DP's fixed denominator, the node's shared-data pin). Every test here failed on the code it was
written against."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from slimtune import SlimtuneError
from slimtune.federated.strategy import FedLPP
from slimtune.federated.wire import FP32
from test_federated import InProcessGrid, instructions, make_cfg, reply, task_identity, theta_like  # noqa: F401


def _hostile_round(cfg, node: dict, **sent) -> Message:
    """One round on a node whose server sends the config it likes: every field of FederatedConfig, server-only ones
    included, with `sent` over cfg's values (a hostile server writes its own JSON, not client_json())."""
    from slimtune.federated.client_app import train
    from slimtune.federated.model import build_model, lora_state
    from slimtune.federated.wire import encode_state

    model, *_ = build_model(replace(cfg, eval_data=""))
    payload, _ = encode_state(lora_state(model), cfg.bits, cfg.block_size)
    doc = {**json.loads(cfg.client_json()), **sent}  # what an honest server sends, with the hostile fields over it
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()}),
                          "config": ConfigRecord({"server-round": 1, "slimtune-config": json.dumps(doc)})})
    return train(Message(content=content, dst_node_id=7, message_type="train"),
                 Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={}))


def _node_secret(tmp_path):
    secret = tmp_path / "node_private.tsv"
    secret.write_text("sentence\tlabel\nthe nurse said the patient has hiv\thunter2\n")
    return secret


# -- (b) hostile server: eval_data is a server-only setting, but a node reads whatever file the server sends there --

def test_a_node_with_its_own_data_does_not_send_the_server_rows_of_a_file_it_named_as_eval_data(demo_paths, tmp_path):
    """build_model (client_app._setup) loads cfg.eval_data; the node's config is the server's JSON, so a hostile server
    names any table on the node as eval_data, and a non-private node with data-path (no _kept_on_node) sends the
    parse error, with the row's value, back as the reply's error reason: a read primitive on the node's files."""
    secret = _node_secret(tmp_path)
    cfg = make_cfg(demo_paths, bits=8, local_steps=1, eval_data="")
    try:
        _hostile_round(cfg, {"data-path": demo_paths[0]}, eval_data=str(secret))
    except Exception as exc:  # noqa: BLE001 - Flower sends str(exc) to the server
        assert "hunter2" not in str(exc) and "node_private" not in str(exc), str(exc)


def test_a_pinned_node_never_opens_a_file_the_server_names_as_eval_data(demo_paths, tmp_path, monkeypatch):
    """Under the shared-data pin the error text is withheld, but the node still reads the server-named eval file:
    whether the round succeeds says whether that file exists and parses, and a tiny model's tokenizer is fitted to
    its texts (load_model_and_data), so the update depends on it."""
    import slimtune.train.objectives as objectives
    secret = tmp_path / "node_private.tsv"
    secret.write_text(open(demo_paths[1]).read())
    opened, real = [], objectives.load_model_and_data
    monkeypatch.setattr(objectives, "load_model_and_data",
                        lambda objective, model, train, evals, *a, **k: opened.append(evals) or
                        real(objective, model, train, evals, *a, **k))
    cfg = make_cfg(demo_paths, bits=8, local_steps=1, eval_data="")
    try:
        _hostile_round(cfg, {"partition-id": 0, "num-partitions": 3, "shared-data": demo_paths[0]},
                       eval_data=str(secret))
    except SlimtuneError:
        pass  # refusing the round is a fix too
    assert str(secret) not in opened, opened


# -- (b) hostile server: the node's caps bound steps, batch and length, not the LoRA rank it builds --------------------

def test_a_capped_node_refuses_a_lora_rank_that_fills_its_memory(demo_paths, monkeypatch):
    """docs/how-to/federated.md: with max-local-steps / max-batch-size / max-length 'a hostile server cannot keep it
    training forever or fill its memory'. lora_r (validated only as >= 1) sizes every LoRA A and B the node builds:
    lora_r = 10**7 on tiny-llama is gigabytes per module, on a node that set all three caps. Fixed: the node caps the
    rank too (max-lora-r), and pins the model it loads (model=...)."""
    import slimtune.federated.client_app as client_app

    def no_build(cfg, *a, **k):
        raise AssertionError(f"the node built a model with lora_r {cfg.lora_r}")

    monkeypatch.setattr(client_app, "build_model_and_split", no_build)
    client_app._setup.cache_clear()
    cfg = make_cfg(demo_paths, bits=8, local_steps=1, max_length=64, batch_size=8)
    caps = {"data-path": demo_paths[0], "max-local-steps": 1, "max-batch-size": 8, "max-length": 64}
    caps["max-lora-r"] = 16  # the cap on the rank (fix: NODE_CAPS), set with the others
    with pytest.raises(SlimtuneError, match="max-lora-r.*round refused"):
        _hostile_round(cfg, caps, lora_r=10**7)


def test_a_pinned_node_without_num_partitions_refuses_a_huge_num_clients(demo_paths, monkeypatch):
    """A pinned node with partition-id but no num-partitions splits the shared file into the server's num_clients
    (client_app._local_round): num_clients = 10**9 makes dirichlet_partition build [alpha] * 10**9 per label, 100
    times (gigabytes, minutes), past every cap the node set."""
    import slimtune.federated.client_app as client_app
    seen = []
    real = client_app.dirichlet_partition
    monkeypatch.setattr(client_app, "dirichlet_partition",
                        lambda labels, n, *a, **k: seen.append(n) or real(labels, min(n, 3), *a, **k))
    client_app._setup.cache_clear()
    cfg = make_cfg(demo_paths, bits=8, local_steps=1, max_length=64)
    node = {"partition-id": 0, "shared-data": demo_paths[0], "max-local-steps": 1, "max-batch-size": 8,
            "max-length": 64}
    try:
        _hostile_round(cfg, node, num_clients=10**9)
    except SlimtuneError:
        pass
    assert all(n < 10**6 for n in seen), seen


# -- client-level DP: what is released besides the noised model -------------------------------------------------------

def _arrays(d):
    return {k: v.numpy() for k, v in d.items()}


def test_client_level_dp_round_log_does_not_say_whose_reply_was_rejected(demo_paths):
    """The fixed denominator makes the model independent of whether client 3's reply was accepted, but the round's
    record (metrics.jsonl, un-noised) still says replies 3 / rejected 0 against 2 / 1: a client whose training diverged
    on its data (non-finite delta) is told apart outside the accounting, which --max-update-norm is refused for."""
    cfg = make_cfg(demo_paths, bits=FP32, client_dp_clip=1.0, client_dp_noise=1.0)
    logs = []
    for diverged in (False, True):
        strategy = FedLPP(cfg, theta_like())
        msgs = instructions(strategy)
        third = _arrays(theta_like(3))
        if diverged:
            third = {k: np.full_like(v, np.nan) for k, v in third.items()}
        strategy.aggregate_train(1, [reply(msgs[0], _arrays(theta_like(1)), 10, 11),
                                     reply(msgs[1], _arrays(theta_like(2)), 10, 12), reply(msgs[2], third, 10, 13)])
        logs.append(strategy.round_log[1])
    assert logs[0] == logs[1], logs


def test_client_level_dp_run_whose_replies_all_failed_reports_the_epsilon_it_spent(demo_paths, tmp_path):
    """Every round released sigma S / K noise (the change of the day) and metrics.jsonl logs each round's epsilon, but
    summary.json says epsilon null: whether the run reports (and saves) anything depends on whether any reply was
    accepted."""
    from slimtune.federated.server_app import run_server

    def broken(msg, context):
        raise RuntimeError("crashed on a row")

    out = tmp_path / "run"
    cfg = make_cfg(demo_paths, bits=8, rounds=2, out_dir=str(out), eval_max=20, client_dp_clip=1.0,
                   client_dp_noise=1.0)
    try:
        run_server(InProcessGrid(3, broken), cfg)
    except SlimtuneError:
        pass
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("epsilon") for r in rounds)  # the noised rounds were released and accounted
    assert json.loads((out / "summary.json").read_text())["epsilon"] is not None


def test_weighting_examples_is_not_silently_ignored_under_client_level_dp(demo_paths):
    """bounds.aggregate overwrites the weights with 1 / --clients under client-level DP; --weighting examples (which
    also makes num-examples a required, un-noised metric of every reply) is accepted and does nothing."""
    cfg = make_cfg(demo_paths, bits=FP32, weighting="examples", client_dp_clip=1.0, client_dp_noise=1.0)
    with pytest.raises(SlimtuneError, match="weighting"):
        cfg.validate()


def test_a_node_that_pins_its_model_refuses_another(demo_paths, monkeypatch):
    """The server names the model the node loads (its size is the node's memory); a node pins it with model=..."""
    import slimtune.federated.client_app as client_app
    monkeypatch.setattr(client_app, "build_model_and_split", lambda cfg, *a, **k: (_ for _ in ()).throw(
        AssertionError(f"the node built {cfg.model}")))
    client_app._setup.cache_clear()
    cfg = make_cfg(demo_paths, bits=8, local_steps=1)
    with pytest.raises(SlimtuneError, match="model.*round refused"):
        _hostile_round(cfg, {"data-path": demo_paths[0], "model": "smollm2"})

"""Adversarial review 9 of FedLPP (model privacy against clients, the deployment's network surface, what clients
release to the server). Each test fails on the code it was written against; see the review report."""

import os
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from slimtune import SlimtuneError
from slimtune.federated import FederatedConfig
from slimtune.federated.strategy import FedLPP


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages built outside a running Flower app need a task identity (the runtime sets it in real runs)."""
    from flwr.supercore.task_identity import TaskIdentity
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


from test_federated import make_cfg  # noqa: E402  (the suite's one small federated config)


def theta_like(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"l.lora_A.weight": torch.randn(8, 64, generator=g) * 0.05,
            "l.lora_B.weight": torch.randn(64, 8, generator=g) * 0.01}


def near_exact(view: dict, theta: dict) -> float:
    """The fraction of theta's (non-zero) coordinates a client gets back to within 0.1 % (fp16 is ~0.05 %)."""
    hits = total = 0
    for k, t in theta.items():
        nz = t != 0
        rel = (view[k] - t).abs()[nz] / t.abs()[nz]
        hits, total = hits + int((rel < 1e-3).sum()), total + int(nz.sum())
    return hits / total


# -- 1. the broadcast's fp16 block scales are full-precision values of theta -----------------------------------------
def test_block_size_one_broadcasts_theta_at_fp16_precision_whatever_the_bits(demo_paths):
    """--block-size 1 (accepted: low=1) makes every value its own block: its scale is |theta_i| in fp16 and its 1-bit
    code the sign, so the '1-bit' broadcast is theta to ~11 bits. The setting must be refused (or the scales must not
    carry the values)."""
    cfg = make_cfg(demo_paths, bits=1, block_size=1)
    try:
        cfg.validate()
    except SlimtuneError:
        return  # refused: fine
    theta = theta_like()
    assert near_exact(FedLPP(cfg, theta).client_view(), theta) < 0.05


def test_every_blocks_absmax_reaches_the_client_at_fp16_precision_even_with_dither(demo_paths):
    """With the default block size 64, each block's scale is its absmax rounded up to fp16, and the absmax element's
    code is the top level, so the client holds one value per block at ~11 bits (--dither 1 leaves most of them: 1.7 %
    of coordinates at 4 bits against 1.9 % without). The broadcast should not carry any coordinate of theta at a
    precision far beyond the bit width (e.g. power-of-two scales)."""
    theta = theta_like()
    for dither in (0.0, 1.0):
        cfg = make_cfg(demo_paths, bits=4, dither=dither)
        view = FedLPP(cfg, theta).client_view()
        maxima = {}  # each block's largest |value| and what the client holds for it
        for k, t in theta.items():
            blocks = t.flatten().view(-1, 64)
            top = blocks.abs().argmax(dim=1)
            rows = torch.arange(len(blocks))
            maxima[k] = (blocks[rows, top], view[k].flatten().view(-1, 64)[rows, top])
        exact = torch.cat([((v - t).abs() / t.abs() < 1e-3).float() for t, v in maxima.values()]).mean().item()
        assert exact < 0.1, (dither, exact)  # every block's maximum came back within 0.1 % (1.0); now ~ 2 %


# -- 2. the deployment: SuperNode authentication admits whoever can reach the port -----------------------------------
def test_a_node_registered_by_an_outsider_is_never_sampled(tmp_path):
    """Open-source Flower's Control API has no account authentication (NoOpControlAuthnPlugin): any process that
    reaches the SuperLink's port registers a key of its own with `flwr supernode register` and joins; Flower samples
    every connected node (fraction 1), so it was sent Q(theta) and aggregated. The deployment now records the node ids
    of the keys it registered (allowed_nodes in the server's settings) and the server's Grid lists no other node.
    (The `slow` deployment test starts such an outsider beside two admitted nodes.)"""
    import json

    from slimtune.federated.deployment import LocalFederation, registered_node_id
    from slimtune.federated.server_app import MembersOnly

    class Fleet:
        def get_node_ids(self):
            return [11, 12, 99]

        def send_and_receive(self, messages):
            return messages

    grid = MembersOnly(Fleet(), "11,12")
    assert grid.get_node_ids() == [11, 12] and grid.send_and_receive("x") == "x"
    assert registered_node_id("\u2705 SuperNode 4431 registered successfully.\n", "n0") == 4431
    with pytest.raises(SlimtuneError, match="no node id"):
        registered_node_id("something else", "n0")
    federation = LocalFederation(tmp_path / "work", FederatedConfig(out_dir=str(tmp_path / "run")))
    federation.admit(11)
    federation.admit(12)
    assert json.loads(federation.settings.read_text())["allowed_nodes"] == "11,12"
    FederatedConfig(allowed_nodes="11,12", num_clients=2).validate()  # review 61: one allowed node per client


# -- 3. a node cannot hold its own privacy floor: the server's config decides, and node settings are ignored ----------
def test_a_node_config_privacy_setting_is_not_silently_ignored(demo_paths, tmp_path):
    """A deployment node's operator sets `--node-config 'local-optimizer="dp-adamw" local-dp-noise=2.0'` to train only
    with DP; the ClientApp reads data-path / partition-id and nothing else, so a (curious) server that sends
    local_optimizer adamw gets a non-private round, with the node's loss and example count. A node setting must be
    honoured (a floor the server cannot lower) or refused in one line, never silently ignored."""
    from slimtune.federated.client_app import train
    from slimtune.federated.model import build_model, lora_state
    from slimtune.federated.wire import encode_state

    own = tmp_path / "node.tsv"
    own.write_text("\n".join(open(demo_paths[0]).read().splitlines()[:21]) + "\n")
    cfg = make_cfg(demo_paths, bits=8, local_optimizer="adamw")  # what the server sent: no DP
    model, *_ = build_model(cfg)
    payload, _ = encode_state(lora_state(model), cfg.bits, cfg.block_size)
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()}),
                          "config": ConfigRecord({"server-round": 1, "slimtune-config": cfg.client_json()})})
    msg = Message(content=content, dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(own), "local-optimizer": "dp-adamw",
                                                        "local-dp-noise": 2.0},
                      state=RecordDict(), run_config={})
    try:
        out = train(msg, context)
    except Exception as exc:  # noqa: BLE001 - a refusal naming the node setting is the other acceptable answer
        assert "local-optimizer" in str(exc) or "local-dp-noise" in str(exc), exc
        return
    metrics = dict(out.content.metric_records["metrics"])
    assert not metrics, f"the node asked for DP and released {metrics}"


# -- 4. the server reads the clients' training rows -------------------------------------------------------------------
def test_the_deployment_server_is_not_handed_the_clients_rows(tmp_path):
    """The deployment shards --data into one file per node, then hands the SuperLink's ServerApp the unsharded file
    (server-settings.json `data`); run_server reads it (check_inputs, and build_model loads every row; a tiny model
    fits its tokenizer to them). The server needs no training row: it evaluates on --eval-data. (A server given no
    training file at all passes check_run and then fails in build_model with ': is a directory'.)"""
    import json
    from pathlib import Path

    from slimtune.federated.deployment import DEMO, LocalFederation, deployment_config
    train = DEMO / "sst2_demo_train.tsv"
    cfg = deployment_config(2, train, DEMO / "sst2_demo_dev.tsv", 1, tmp_path / "run", "tiny-llama")
    server = json.loads(LocalFederation(tmp_path / "work", cfg).settings.read_text())
    assert not server["data"] or Path(server["data"]).resolve() != train.resolve(), server["data"]

"""Review 87: one hostile client (or SuperNode operator) among honest ones, and a careless operator.

Replies are built by hand and fed to the strategy, as tests/test_federated_hostile.py and test_review_findings_81.py
do (no simulation)."""

import io
import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from test_federated import FakeGrid, instructions, make_cfg, reply, task_identity  # noqa: F401 (fixture)
from slimtune import SlimtuneError
from slimtune.federated.strategy import FP16_MAX, FedLPP

FP32 = 32
SHAPES = {"l.lora_A.weight": (2, 6), "l.lora_B.weight": (5, 2)}


def zero_theta():
    return {k: torch.zeros(s) for k, s in SHAPES.items()}


def small_delta(seed=1, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return {k: (scale * torch.randn(s, generator=g)).numpy() for k, s in SHAPES.items()}


def padded_npy(value: np.ndarray, pad: int) -> bytes:
    """`value` as .npy (format 1.0) bytes whose header dict is followed by `pad` spaces: numpy reads it back as the
    same array (np.load accepts headers up to 10,000 bytes)."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': %r, }" % (tuple(value.shape),) + " " * pad
    header += " " * ((-(10 + len(header) + 1)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + value.tobytes()


def test_an_accepted_reply_padded_inside_its_npy_headers_does_not_inflate_the_upload_bytes(demo_paths):
    """Review 81 rejected replies padded with extra records or metric keys, so that one client could not set the
    run's reported communication cost (bytes_up_per_client in metrics.jsonl; bytes_up_per_client_per_round and
    bytes_communicated in summary.json). decode_arrays checks each array's .npy header (dtype, shape, byte count),
    but not its length: a header dict followed by ~9 kB of spaces is valid .npy (numpy reads the same array) and the
    reply is accepted, its padding counted as the client's upload (wire_bytes). Here 2 arrays of 10 and 12 floats:
    the per-client upload reported goes from ~1.5 kB to ~7.5 kB; with a real LoRA (tens of arrays) ~10 kB per array,
    every round."""
    cfg = make_cfg(demo_paths, bits=FP32)
    delta = small_delta()

    honest = FedLPP(cfg, zero_theta())
    msgs = instructions(honest)
    honest.aggregate_train(1, [reply(msgs[i], delta, 10, 11 + i) for i in range(3)])
    honest_bytes = honest.round_log[1]["bytes_up_per_client"]

    attacked = FedLPP(cfg, zero_theta())
    msgs = instructions(attacked)
    padded = reply(msgs[2], delta, 10, 13)
    for key, value in delta.items():
        data = padded_npy(np.ascontiguousarray(value, dtype=np.float32), 9000)
        assert np.array_equal(np.load(io.BytesIO(data)), value)  # a valid .npy of the same array
        padded.content["arrays"][key] = Array(dtype="float32", shape=tuple(value.shape), stype="numpy.ndarray",
                                              data=data)
    attacked.aggregate_train(1, [reply(msgs[0], delta, 10, 11), reply(msgs[1], delta, 10, 12), padded])
    info = attacked.round_log[1]
    assert info["rejected"] == 1 or info["bytes_up_per_client"] <= 1.1 * honest_bytes, (honest_bytes, info)


def test_one_of_two_replies_cannot_set_the_reported_train_loss(demo_paths):
    """aggregate_train reports train_loss as 'the claims' median: no one client sets it' (np.median). With an even
    number of accepted replies np.median is the mean of the two middle claims; with two replies (2 clients, or
    --clients-per-round 2, or one of three rejected) the hostile one sets the reported loss to anything finite:
    here 1e300 next to an honest 0.5 is reported as 5e299 (metrics.jsonl's train_loss). The lower median (as
    bounds.lower_median, used for every other claim) would report 0.5."""
    cfg = make_cfg(demo_paths, bits=FP32, num_clients=2)
    strategy = FedLPP(cfg, zero_theta())
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), type("G", (), {
        "get_node_ids": lambda self: [11, 12]})()))
    delta = small_delta()
    lying = reply(msgs[1], delta, 10, 12)
    lying.content["metrics"] = MetricRecord({"num-examples": 10, "train-loss": 1e300})
    strategy.aggregate_train(1, [reply(msgs[0], delta, 10, 11), lying])
    info = strategy.round_log[1]
    assert info["replies"] == 2
    assert info.get("train_loss", 0.0) <= 0.5, info  # never above the honest client's claim


@pytest.mark.parametrize("bits", [1, 2])
def test_a_theta_the_server_step_accepts_is_broadcast_finite(demo_paths, bits):
    """strategy.server_step keeps theta within FP16_MAX = 6e4 'because Q(theta)'s scales are fp16'. But
    quantization.coarse_scales rounds each block's absmax UP to `bits` significant bits: at --bits 2 an absmax of
    58000 becomes 65536 (unit 2^13), at --bits 1 also 65536 (unit 2^14), above float16's 65504, so the scale is
    sent as inf. Every client then decodes that block as NaN (bits 2: 0 * inf at the zero level) or -inf (bits 1),
    and so does the server's own client_view (the client_visible_* scores, the trust reference). The step that
    put theta there was accepted as within range."""
    cfg = make_cfg(demo_paths, bits=bits)
    strategy = FedLPP(cfg, zero_theta())
    target = {k: torch.full(s, 58000.0) for k, s in SHAPES.items()}
    assert all(v.abs().max() <= FP16_MAX for v in target.values())
    new = strategy.server_step({k: target[k] - strategy.theta[k] for k in SHAPES})  # fedavg, server lr 1
    strategy.theta = new
    if all(torch.equal(new[k], torch.zeros(s)) for k, s in SHAPES.items()):
        return  # the server refused the step: theta stays broadcastable
    sent = strategy.client_view()
    assert all(torch.isfinite(v).all() for v in sent.values()), {k: v.flatten()[:3] for k, v in sent.items()}


def _dup(msgs_now, msgs_old, delta):
    return [reply(msgs_now[0], delta, 10, 11), reply(msgs_now[1], delta, 10, 12), reply(msgs_now[2], delta, 10, 13),
            reply(msgs_now[2], delta, 10, 13)]  # node 13 answers its instruction twice


def _not_sampled(msgs_now, msgs_old, delta):
    return [reply(msgs_now[0], delta, 10, 11), reply(msgs_now[1], delta, 10, 12),
            reply(msgs_now[0], delta, 10, 14)]  # node 14 was not sampled; it answers node 11's instruction


def _stale(msgs_now, msgs_old, delta):
    return [reply(msgs_now[0], delta, 10, 11), reply(msgs_now[1], delta, 10, 12),
            reply(msgs_old[2], delta, 10, 13)]  # node 13's reply to round 1's instruction, replayed in round 2


@pytest.mark.parametrize("make, legit", [(_dup, 3), (_not_sampled, 2), (_stale, 2)],
                         ids=["twice", "not-sampled", "old-round"])
def test_the_strategy_takes_one_reply_per_sampled_node_to_this_rounds_instruction(demo_paths, make, legit):
    """Defence in depth (Flower's LinkState refuses these before they reach the ServerApp in stock deployments; the
    strategy trusts that entirely): aggregate_train accepts every reply it is handed, whoever sent it and whatever it
    answers. A node answering twice counts twice (its weight doubled under --weighting equal; under client-level DP
    one client then moves the sum by 2S where the accountant assumes S); a node that was not sampled, or a reply to
    an earlier round's instruction (a replay), is aggregated as one of this round's replies. Nothing checks
    metadata.reply_to_message_id against the instructions configure_train sent, nor src_node_id against their
    dst_node_id. Here 3 nodes sampled in round 2; the crafted reply must not be accepted."""
    cfg = make_cfg(demo_paths, bits=FP32)
    strategy = FedLPP(cfg, zero_theta())
    old = instructions(strategy)
    strategy.aggregate_train(1, [reply(old[i], small_delta(), 10, 11 + i) for i in range(3)])
    now = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), FakeGrid()))
    replies = make(now, old, small_delta(2))
    strategy.aggregate_train(2, replies)
    info = strategy.round_log[2]
    assert info["replies"] <= legit, info


def test_a_server_settings_file_others_can_write_is_refused(tmp_path):
    """The server's settings file ($SLIMTUNE_SERVER_SETTINGS or $FLWR_HOME/slimtune-server.toml) decides who is in
    the federation (allowed_nodes: the only guard against a node registered by anyone who reaches the Control API),
    client-level DP (client-dp-clip/-noise), --max-update-norm, --robust, where the adapter is written. A file that
    other users may write (a careless chmod, a shared $FLWR_HOME) is read silently: any local user can admit their
    own node or turn the DP off for the next run. The project refuses key files readable by others
    (privacy/secret.py); a settings file writable by others should be refused in one line naming it."""
    from slimtune.federated.config import FederatedConfig
    settings = tmp_path / "slimtune-server.toml"
    settings.write_text('allowed-nodes = "11,12,13,14"\nclient-dp-clip = 0.0\n')
    os.chmod(settings, 0o666)
    with pytest.raises(SlimtuneError, match="slimtune-server.toml"):
        FederatedConfig.from_flower({}, settings)

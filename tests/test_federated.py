"""FedLPP: quantization bounds, theta never leaves the server, aggregation math, dropout, malformed replies."""

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from slimtune.federated import FederatedConfig, dirichlet_partition
from slimtune.federated.client_app import local_train
from slimtune.federated.model import build_model, lora_state
from slimtune.federated.wire import FP32, decode_state, encode_state
from slimtune.federated.quantization import dequantize, max_gap, nf_levels, quantize
from slimtune.federated.server_app import make_replay
from slimtune.federated.strategy import FedLPP


@pytest.mark.parametrize("bits", range(1, 9))
def test_quantization_error_is_bounded_per_bit_width(bits):
    torch.manual_seed(bits)
    x = torch.randn(37, 29) * torch.rand(37, 1) * 3
    q = quantize(x, bits, block_size=64)
    err = (dequantize(q) - x).abs().flatten()
    blocks = torch.cat([x.flatten(), torch.zeros((-x.numel()) % 64)]).view(-1, 64)
    absmax = blocks.abs().amax(1).repeat_interleave(64)[:x.numel()]
    assert bool((err <= absmax * (1 + 2.0 ** -bits) * max_gap(bits) / 2 * 1.002 + 1e-7).all())
    scales = torch.from_numpy(q.scales).float()  # no more significant bits than a code (review 9)
    mantissa = scales / torch.exp2(torch.floor(torch.log2(scales)) - bits)
    assert bool((mantissa == mantissa.round()).all())
    assert q.packed.nbytes == -(-x.numel() * bits // 8)  # really b bits per value
    assert len(nf_levels(bits)) == 2 ** bits


def test_more_bits_less_error():
    x = torch.randn(4096)
    errors = [(dequantize(quantize(x, b)) - x).pow(2).mean().item() for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]
    assert 0.0 in nf_levels(4).tolist()  # exact zero, as in NF4


def test_dirichlet_partition_is_non_iid_and_complete():
    labels, keys = [i % 2 for i in range(400)], [f"row {i}" for i in range(400)]
    parts = dirichlet_partition(labels, keys, 4, alpha=0.1, seed=0, num_labels=2)
    assert sorted(i for p in parts for i in p) == list(range(400))
    skew = [abs(np.mean([labels[i] for i in p]) - 0.5) for p in parts]
    assert max(skew) > 0.3  # small alpha: some client sees mostly one label
    labels, keys = [i % 2 for i in range(4000)], [f"row {i}" for i in range(4000)]  # rows placed one by one: enough
    iid = dirichlet_partition(labels, keys, 4, alpha=1000.0, seed=0, num_labels=2)  # of them that their sampling noise is small
    assert max(abs(np.mean([labels[i] for i in p]) - 0.5) for p in iid) < 0.1


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages built outside a running Flower app need a task identity (the runtime sets it in real runs)."""
    from flwr.supercore.task_identity import TaskIdentity
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class FakeGrid:
    def get_node_ids(self):
        return [11, 12, 13]


class InProcessGrid:
    """A Flower Grid whose nodes run a ClientApp train function in this process, one message at a time: run_server
    end to end in seconds, without Ray or processes. A handler that raises makes an error reply, as Flower does."""

    def __init__(self, nodes: int, handler=None):
        from flwr.app import Context
        from slimtune.federated.client_app import train
        self.handler = handler or train
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i,
                                                                                   "num-partitions": nodes},
                                          state=RecordDict(), run_config={}) for i in range(nodes)}
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from slimtune.federated.client_app import pinned_to
        replies = []
        for msg in messages:
            self.sent.append(msg)
            try:  # the nodes train shares of the file the run names, as simulate's do (client_app.simulation_app)
                data = json.loads(str(msg.content["config"]["slimtune-config"]))["data"]
                out = pinned_to(data, self.handler)(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - what Flower turns into an error reply
                out = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            out.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            replies.append(out)
        return replies


def make_cfg(demo_paths, **kw):
    """Plain FedAvg at a constant server lr unless a test asks otherwise (server_optimizer=None: the swept default)."""
    train_path, dev_path = demo_paths
    return FederatedConfig(**{"data": train_path, "eval_data": dev_path, "num_clients": 3, "local_steps": 2, "lr": 1e-2,
                              "server_optimizer": "fedavg", "server_lr_scheduler": "constant", **kw})


def theta_like(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"l.lora_A.weight": torch.randn(2, 6, generator=g), "l.lora_B.weight": torch.randn(5, 2, generator=g)}


def reply(to: Message, arrays: dict, examples: int, node: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples, "train-loss": 0.5})})
    msg = Message(content=content, reply_to=to)
    msg.metadata.__dict__["_src_node_id"] = node  # what the transport would fill in
    return msg


def instructions(strategy):
    return list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid()))


def test_server_never_sends_theta(demo_paths):
    cfg = make_cfg(demo_paths, bits=4)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    assert len(msgs) == 3
    for msg in msgs:
        arrays = msg.content["arrays"]
        for key in arrays.keys():
            value = arrays[key].numpy()
            assert value.dtype in (np.uint8, np.float16), key  # packed codes and fp16 scales only
            assert not any(value.size == t.numel() and value.dtype == np.float32 for t in theta.values())
        sent = decode_state({k: arrays[k].numpy() for k in arrays.keys()}, strategy.shapes, 4, cfg.block_size)
        assert all(not torch.equal(sent[k], theta[k]) for k in theta)  # clients only get Q(theta)
        assert "slimtune-config" in msg.content["config"]


def test_aggregation_matches_a_hand_computation(demo_paths):
    """Equal weights, each delta clipped to the round's (lower) median norm: theta + (clip(d1) + clip(d2)) / 2."""
    cfg = make_cfg(demo_paths, bits=FP32)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    d1, d2 = theta_like(1), theta_like(2)
    replies = [reply(msgs[0], {k: v.numpy() for k, v in d1.items()}, 10, 11),
               reply(msgs[1], {k: v.numpy() for k, v in d2.items()}, 30, 12)]
    strategy.aggregate_train(1, replies)
    n1, n2 = (torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())).item() for d in (d1, d2))
    bound = min(n1, n2)
    for k in theta:
        expected = theta[k] + (d1[k] * min(1, bound / n1) + d2[k] * min(1, bound / n2)) / 2
        assert torch.allclose(strategy.theta[k], expected, atol=1e-6)
    assert strategy.round_log[1]["update_bound"] == pytest.approx(bound)
    sent = instructions(strategy)[0].content["arrays"]  # the next broadcast carries the new theta, not a stale copy
    sent = decode_state({k: sent[k].numpy() for k in sent.keys()}, strategy.shapes, FP32, cfg.block_size)
    assert all(torch.equal(sent[k], strategy.theta[k]) for k in theta)
    assert all(torch.equal(strategy.client_view()[k], strategy.theta[k]) for k in theta)


def test_example_weights_are_capped_at_the_round_median_claim(demo_paths):
    cfg = make_cfg(demo_paths, bits=FP32, weighting="examples", robust="none")  # the weighted mean
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    d = theta_like(1)
    deltas = [d, {k: v.flip(0) for k, v in d.items()}, {k: -v for k, v in d.items()}]  # equal norms: no clipping
    strategy.aggregate_train(1, [reply(m, {k: v.numpy() for k, v in x.items()}, n, 11 + i)
                                 for i, (m, x, n) in enumerate(zip(msgs, deltas, (10, 30, 10**9)))])
    for k in theta:  # claims 10, 30, 1e9 -> weights 10, 30, 30 (the median claim)
        expected = theta[k] + (10 * deltas[0][k] + 30 * deltas[1][k] + 30 * deltas[2][k]) / 70
        assert torch.allclose(strategy.theta[k], expected, atol=1e-6)
    msgs = instructions(strategy)
    strategy.aggregate_train(2, [reply(msgs[0], {k: v.numpy() for k, v in d.items()}, 10, 11)])
    no_count = reply(msgs[1], {k: v.numpy() for k, v in d.items()}, 10, 12)
    no_count.content["metrics"] = MetricRecord({"train-loss": 0.5})
    _, metrics = strategy.aggregate_train(3, [no_count])
    assert metrics["rejected"] == 1  # --weighting examples needs the count


def test_client_dp_clips_each_delta(demo_paths):
    cfg = make_cfg(demo_paths, bits=FP32, client_dp_clip=0.5, client_dp_noise=0.0)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    big = {k: 100 * v for k, v in theta_like(1).items()}
    strategy.aggregate_train(1, [reply(msgs[0], {k: v.numpy() for k, v in big.items()}, 10, 11)])
    moved = torch.sqrt(sum(((strategy.theta[k] - theta[k]) ** 2).sum() for k in theta))
    assert moved.item() == pytest.approx(0.5 / cfg.num_clients, rel=1e-4)  # clipped, over the fixed count K


def test_dropout_and_malformed_replies_do_not_corrupt_theta(demo_paths, caplog):
    cfg = make_cfg(demo_paths, bits=FP32)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    good = theta_like(3)
    wrong_shape = {k: np.zeros((7, 7), dtype=np.float32) for k in theta}
    nan = {k: np.full(v.shape, np.nan, dtype=np.float32) for k, v in theta.items()}
    failed = Message(Error(code=1, reason="client crashed"), reply_to=msgs[2])
    with caplog.at_level(logging.WARNING, logger="slimtune.federated"):
        _, metrics = strategy.aggregate_train(1, [reply(msgs[0], {k: v.numpy() for k, v in good.items()}, 5, 11),
                                                  reply(msgs[1], wrong_shape, 5, 12), reply(msgs[1], nan, 5, 12),
                                                  failed])
    assert metrics["replies"] == 1 and metrics["rejected"] == 3
    assert "rejected reply from client 12" in caplog.text and "has shape (7, 7), expected (2, 6)" in caplog.text
    assert "non-finite" in caplog.text and "client crashed" in caplog.text
    for k in theta:
        assert torch.allclose(strategy.theta[k], theta[k] + good[k], atol=1e-6)
    strategy.aggregate_train(2, [failed])  # everyone dropped: theta unchanged
    for k in theta:
        assert torch.allclose(strategy.theta[k], theta[k] + good[k], atol=1e-6)


def test_clients_that_miss_the_round_timeout_are_reported_not_silently_dropped(demo_paths, caplog, tmp_path):
    """A sampled client whose reply never arrives (slower than the round timeout) used to leave only 'replies: 0'
    in the log while the run went on; now the round says so, and summary.json and the CLI name the rounds."""
    from slimtune.federated.server_app import _write_summary

    cfg = make_cfg(demo_paths, bits=FP32, round_timeout=60)
    strategy = FedLPP(cfg, theta_like())
    msgs = instructions(strategy)
    with caplog.at_level(logging.WARNING, logger="slimtune.federated"):
        strategy.aggregate_train(1, [reply(msgs[0], {k: v.numpy() for k, v in theta_like(3).items()}, 5, 11)])
    assert strategy.round_log[1]["sampled"] == 3 and strategy.round_log[1]["replies"] == 1
    assert "2 of 3 sampled clients did not reply within the round timeout (60 s)" in caplog.text
    out = tmp_path / "fed"
    out.mkdir()
    rounds = [{"round": 0, "peak_mem_mb": 1.0}, {**strategy.round_log[1], "peak_mem_mb": 1.0},
              {"round": 2, "sampled": 3, "replies": 3, "peak_mem_mb": 1.0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    model, *_ = build_model(cfg)
    assert _write_summary(cfg, out, model, None, 1.0)["rounds_with_lost_updates"] == [1]
    with pytest.raises(Exception, match="--round-timeout"):
        make_cfg(demo_paths, round_timeout=0).validate()


def test_client_round_and_seed_mode_replay(demo_paths):
    """A client trains from Q(theta); in zo-seeds mode the server replays its (seed, scalar) pairs exactly."""
    cfg = make_cfg(demo_paths, bits=8, mode="zo-seeds", local_steps=3)
    model, *_ = build_model(cfg)
    theta = lora_state(model)
    payload, down = encode_state(theta, cfg.bits, cfg.block_size)
    arrays, metrics = local_train(cfg, 0, payload, server_round=1)
    assert arrays["seeds"].shape == (3,) and arrays["seeds"].nbytes + arrays["grads"].nbytes == 36  # bytes, not MB
    assert metrics["num-examples"] > 0
    start = decode_state(payload, {k: tuple(v.shape) for k, v in theta.items()}, cfg.bits, cfg.block_size)
    delta = make_replay(build_model(cfg)[0], cfg)(arrays["seeds"], arrays["grads"].astype(np.float64))
    replayed = {k: start[k] + delta[k] for k in start}
    from slimtune.federated.client_app import _setup
    client_model = _setup(cfg.to_json(), cfg.num_clients)[0]  # the cached model the client trained
    client_state = lora_state(client_model)
    for k in theta:  # server replay from Q(theta) == the client's own local trajectory
        assert torch.allclose(replayed[k], client_state[k], atol=1e-6)


def test_ffa_lora_keeps_a_frozen(demo_paths):
    cfg = make_cfg(demo_paths, bits=FP32, aggregation="ffa")
    model, *_ = build_model(cfg)
    theta = lora_state(model)
    payload, _ = encode_state(theta, FP32, cfg.block_size)
    arrays, _ = local_train(cfg, 1, payload, server_round=1)
    # A never changes, so its (zero) delta is not uploaded: FFA-LoRA halves the upload of FedIT
    assert set(arrays) == {k for k in theta if "lora_B" in k}
    assert sum(v.nbytes for v in arrays.values()) == sum(v.numel() * 4 for k, v in theta.items() if "lora_B" in k)
    assert any(np.any(v) for v in arrays.values())
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    strategy.aggregate_train(1, [reply(msgs[0], arrays, 10, 11)])  # the server accepts the B-only reply
    assert strategy.round_log[1]["replies"] == 1
    for k in theta:
        assert torch.equal(strategy.theta[k], theta[k]) == ("lora_A" in k)
    full = {k: np.zeros(tuple(v.shape), np.float32) for k, v in theta.items()}  # a FedIT-shaped reply is refused
    strategy.aggregate_train(2, [reply(msgs[0], full, 10, 11)])
    assert strategy.round_log[2]["rejected"] == 1


def test_simulation_end_to_end(demo_paths, tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, None)  # the simulation runtime sets its own
    from slimtune.federated.simulation import simulate

    # one Ray start for everything end to end: 2 of 3 clients sampled per round (issue 14), the model-IP attacks, and
    # the swept server step when none is given (its averaging decay overridden)
    cfg = make_cfg(demo_paths, bits=4, rounds=2, out_dir=str(tmp_path / "fed"), clients_per_round=2,
                   attack_coalition=2, attack_window=2, server_average=0.5, server_optimizer=None)
    summary = simulate(cfg)
    assert summary["rounds"] == 2 and summary["bits"] == 4
    assert summary["payload_bytes_down_per_client_per_round"] < summary["trainable_bytes"] / 4  # ~4 bits + scales
    assert summary["bytes_down_per_client_per_round"] > summary["payload_bytes_down_per_client_per_round"]  # + framing
    lines = (tmp_path / "fed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # round 0 (initial) + 2 rounds
    rounds = [json.loads(line) for line in lines]
    assert [r.get("replies") for r in rounds[1:]] == [2, 2] and summary["clients_per_round"] == 2
    assert all("multi_round_accuracy" in r and "iterate_accuracy" in r for r in rounds[1:])
    assert (summary["server_optimizer"], summary["server_lr"]) == ("fedavgm", 1.0)
    assert summary["server_average"] == 0.5 and summary["final_iterate_accuracy"] == rounds[-1]["iterate_accuracy"]
    for key in ("attack_theta_score", "attack_received_score", "attack_multi_round_score", "attack_coalition_score",
                "attack_coalition_from_scratch_score"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["attack_theta_score"] == pytest.approx(summary["final_accuracy"])
    assert summary["attack_received_score"] == pytest.approx(summary["client_visible_accuracy"])
    assert summary["attack_best_score"] == max(summary["attack_received_score"], summary["attack_multi_round_score"],
                                               summary["attack_coalition_score"])
    assert summary["attack_coalition_steps"] == 4
    assert (tmp_path / "fed" / "adapter" / "adapter_model.safetensors").exists()


# -- issue 15, items 1-3: what a client receives, secret server randomness, DP only where it is applied ------------
def test_clients_receive_no_server_settings_and_cannot_rebuild_theta0(demo_paths, monkeypatch):
    import json

    import slimtune.federated.server_app as server_app
    from slimtune.federated.config import SERVER_ONLY

    cfg = make_cfg(demo_paths, bits=4, client_dp_clip=1.0, client_dp_noise=0.5, out_dir="/private/server/path")
    sent = json.loads(str(instructions(FedLPP(cfg, theta_like()))[0].content["config"]["slimtune-config"]))
    assert not set(SERVER_ONLY) & set(sent) and "/private/server/path" not in json.dumps(sent)
    # theta_0 comes from a secret key: what the client can build from the public settings is not the server's
    from slimtune.privacy.secret import RunKey
    server_theta = lora_state(build_model(cfg, secret_key=RunKey.fresh())[0])
    client_guess = lora_state(build_model(FederatedConfig.from_json(json.dumps(sent)))[0])
    assert all(not torch.equal(server_theta[k], client_guess[k]) for k in server_theta if "lora_A" in k)
    bound = max(v.abs().max().item() for k, v in server_theta.items() if "lora_A" in k)
    assert 0 < bound <= 1 / min(v.shape[1] for k, v in server_theta.items() if "lora_A" in k) ** 0.5  # peft's init


def test_client_dp_noise_is_not_a_function_of_the_config(demo_paths):
    cfg = make_cfg(demo_paths, bits=FP32, client_dp_clip=1.0, client_dp_noise=1.0)
    moved = []
    for _ in range(2):
        strategy = FedLPP(cfg, theta_like())
        msgs = instructions(strategy)
        strategy.aggregate_train(1, [reply(msgs[0], {k: 0 * v.numpy() for k, v in theta_like(1).items()}, 10, 11)])
        moved.append(strategy.theta)
    assert any(not torch.equal(moved[0][k], moved[1][k]) for k in moved[0])  # same settings, different noise


def test_ffa_client_dp_noises_only_what_is_trained(demo_paths):
    cfg = make_cfg(demo_paths, bits=FP32, aggregation="ffa", client_dp_clip=1.0, client_dp_noise=1.0)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    delta = {k: v.numpy() for k, v in theta_like(1).items() if "lora_B" in k}  # clients upload B only
    strategy.aggregate_train(1, [reply(msgs[0], delta, 10, 11)])
    for k in theta:
        assert torch.equal(strategy.theta[k], theta[k]) == ("lora_A" in k)  # A untouched, B moved (and noised)


@pytest.mark.parametrize("kw,needle", [(dict(client_dp_noise=1.0), "--client-dp-clip"),
                                       (dict(mode="zo-seeds", client_dp_clip=1.0, client_dp_noise=1.0), "zo-seeds")])
def test_dp_settings_that_would_not_apply_are_refused(demo_paths, kw, needle):
    from slimtune import SlimtuneError
    with pytest.raises(SlimtuneError, match=needle):
        make_cfg(demo_paths, **kw).validate()


# -- issue 15, items 4-5: hostile or broken replies are rejected and the run still trains; a run that trained nothing fails
def _hostile(theta, msgs):
    good = {k: 0.01 * v.numpy() for k, v in theta_like(3).items()}
    as_f64 = {k: v.astype(np.float64) for k, v in good.items()}

    def with_metrics(arrays, **metrics):
        msg = reply(msgs[1], arrays, 5, 12)
        msg.content["metrics"] = MetricRecord({"num-examples": 5, "train-loss": 0.5, **metrics})
        return msg

    return good, {
        "inf examples": with_metrics(good, **{"num-examples": float("inf")}),
        "1e300 examples": with_metrics(good, **{"num-examples": 1e300}),
        "list examples": with_metrics(good, **{"num-examples": [1.0, 2.0]}),
        "list loss": with_metrics(good, **{"train-loss": [0.5, 0.5]}),
        "float64 delta": with_metrics(as_f64),
        "extra key": with_metrics({**good, "l.lora_A.weight::junk": np.zeros(3, dtype=np.float32)}),
    }


def test_hostile_replies_are_rejected_and_the_round_still_trains(demo_paths, caplog):
    cfg = make_cfg(demo_paths, bits=FP32)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    good, hostile = _hostile(theta, msgs)
    with caplog.at_level(logging.WARNING, logger="slimtune.federated"):
        _, metrics = strategy.aggregate_train(1, [reply(msgs[0], good, 5, 11), *hostile.values()])
    assert metrics["replies"] == 1 and metrics["rejected"] == len(hostile)
    assert caplog.text.count("rejected reply from client 12") == len(hostile)
    for k in theta:
        assert torch.allclose(strategy.theta[k], theta[k] + torch.as_tensor(good[k]), atol=1e-6)
    assert all(torch.isfinite(v).all() for v in strategy.client_view().values())  # the next broadcast is sound


def test_quantized_uploads_must_have_the_wire_dtypes(demo_paths):
    cfg = make_cfg(demo_paths, bits=4, upload_bits=4)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    arrays, _ = encode_state(theta_like(1), 4, cfg.block_size)
    as_float = {k: v.astype(np.float32) if k.endswith("::codes") else v for k, v in arrays.items()}
    _, metrics = strategy.aggregate_train(1, [reply(msgs[0], arrays, 5, 11), reply(msgs[1], as_float, 5, 12)])
    assert metrics["replies"] == 1 and metrics["rejected"] == 1
    # a 4-bit upload has the broadcast's shapes, so its payload is the 4-bit broadcast's (issue 14's bytes-up row)
    assert strategy.round_log[1]["payload_bytes_up_per_client"] == strategy.encoded()[1]


def test_zo_seed_replies_are_bounded(demo_paths):
    cfg = make_cfg(demo_paths, bits=FP32, mode="zo-seeds", local_steps=3)
    strategy = FedLPP(cfg, theta_like(), replay=lambda seeds, grads: {k: 0 * v for k, v in theta_like().items()})
    msgs = instructions(strategy)
    ok = {"seeds": np.arange(3, dtype=np.int64), "grads": np.ones(3, dtype=np.float32)}
    flood = {"seeds": np.arange(10**6, dtype=np.int64), "grads": np.ones(10**6, dtype=np.float32)}
    wild = {"seeds": np.arange(3, dtype=np.int64), "grads": np.full(3, 1e30, dtype=np.float32)}
    _, metrics = strategy.aggregate_train(1, [reply(msgs[0], ok, 5, 11), reply(msgs[1], flood, 5, 12),
                                              reply(msgs[1], wild, 5, 12)])
    assert metrics["replies"] == 1 and metrics["rejected"] == 2


def test_a_run_where_every_client_fails_is_an_error(demo_paths, tmp_path):
    from slimtune.federated.server_app import _write_summary

    out = tmp_path / "fed"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "replies": 0, "rejected": 4, "peak_mem_mb": 1.0,
                                                           "server_accuracy": 0.5, "client_visible_accuracy": 0.5})
                                               + "\n" for r in range(3)))
    model, *_ = build_model(make_cfg(demo_paths))
    summary = _write_summary(make_cfg(demo_paths, rounds=2), out, model, None, 1.0)
    assert summary["stop_reason"] != "completed" and summary["accepted_updates"] == 0
    import flwr.simulation

    from slimtune import SlimtuneError
    from slimtune.federated.simulation import simulate

    fresh = tmp_path / "fresh"

    def fake_run_simulation(**kwargs):  # what the server leaves when every client failed
        fresh.mkdir()
        (fresh / "summary.json").write_text(json.dumps(summary))

    flwr.simulation.run_simulation, original = fake_run_simulation, flwr.simulation.run_simulation
    try:
        with pytest.raises(SlimtuneError, match="trained nothing"):
            simulate(make_cfg(demo_paths, out_dir=str(fresh)))
    finally:
        flwr.simulation.run_simulation = original


def test_bytes_are_bytes_on_the_wire(demo_paths):
    """Flower 1.41 sends a message as content-addressed objects (message, records, arrays, array chunks), each as
    its deflated bytes: that, not the RecordDict's protobuf size, is what a client pulls or pushes."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    def sent(message):
        return sum(len(o.deflate()) for o in get_all_nested_objects(message).values())

    cfg = make_cfg(demo_paths, bits=4)
    strategy = FedLPP(cfg, theta_like())
    msgs = instructions(strategy)
    log = strategy.round_log[1]
    assert log["bytes_down_per_client"] == sent(msgs[0]) > log["payload_bytes_down_per_client"]
    assert log["bytes_down_total"] == 3 * sent(msgs[0])
    failed = Message(Error(code=1, reason="client crashed"), reply_to=msgs[2])
    up = {k: v.numpy() for k, v in theta_like(1).items()}
    good = reply(msgs[0], {k: v.astype(np.float32) for k, v in up.items()}, 5, 11)
    strategy.aggregate_train(1, [good, failed])
    assert log["bytes_up_total"] == sent(good)  # failed: nothing


# -- issue 15, items 7-8: `flwr run .` with the default local federation, node-local data, deployment engine ------
def test_run_config_declares_what_the_clients_train_with_and_nothing_unknown():
    import tomllib
    from pathlib import Path
    from dataclasses import fields as dc_fields
    app_config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["flwr"][
        "app"]["config"]
    known = {f.name for f in dc_fields(FederatedConfig)} | {"num_server_rounds"}
    assert {k.replace("-", "_") for k in app_config} <= known  # every declared key means something
    cfg = FederatedConfig.from_flower(app_config, settings=None)
    assert cfg.num_clients == 2  # Flower's default local federation runs 2 SuperNodes
    assert cfg.round_timeout < 3600 and cfg.node_timeout < 3600  # not Flower's hour-long default wait


def test_the_server_gives_up_on_missing_nodes_with_a_clear_error():
    from slimtune import SlimtuneError
    from slimtune.federated.server_app import wait_for_nodes

    class TwoNodes:
        def get_node_ids(self):
            return [1, 2]

    wait_for_nodes(TwoNodes(), 2, timeout=1)
    with pytest.raises(SlimtuneError, match="only 2 of num-clients=4 SuperNodes connected.*num-clients=2"):
        wait_for_nodes(TwoNodes(), 4, timeout=0.2, poll=0.05)


def test_a_node_with_its_own_data_trains_on_that_file_only(demo_paths, tmp_path):
    own = tmp_path / "node0.tsv"
    lines = open(demo_paths[0]).read().splitlines()
    own.write_text("\n".join(lines[:21]) + "\n")  # header + 20 rows
    cfg = make_cfg(demo_paths, bits=8, local_steps=2)
    model, *_ = build_model(cfg)
    payload, _ = encode_state(lora_state(model), cfg.bits, cfg.block_size)
    from dataclasses import replace
    _, metrics = local_train(replace(cfg, data=str(own)), 5, payload, server_round=1, own_data=True)
    assert metrics["num-examples"] == 20


@pytest.mark.slow
def test_deployment_engine_with_two_supernodes(tmp_path):
    from slimtune.federated.deployment import run
    from slimtune.federated.deployment import DEMO
    summary = run(2, DEMO / "sst2_demo_train.tsv", DEMO / "sst2_demo_dev.tsv", 2, tmp_path / "deploy", "tiny-llama",
                  900)
    assert summary["accepted_updates"] == 4 and summary["stop_reason"] == "completed"


# -- issue 14, item 1: server-side optimizers on the aggregated LoRA update -----------------------------------------
def test_server_optimizers_follow_their_update_rules(demo_paths):
    from slimtune.federated.server_opt import ServerOptimizer
    theta = {"w": torch.zeros(3), "a": torch.ones(2)}
    deltas = [{"w": torch.tensor([1.0, -2.0, 0.5]), "a": torch.zeros(2)},
              {"w": torch.tensor([0.5, 1.0, -1.0]), "a": torch.zeros(2)}]
    adam = ServerOptimizer("fedadam", lr=0.1)
    m, v, t = torch.zeros(3), torch.zeros(3), theta
    for d in deltas:
        t = adam.apply(t, d)
        m = 0.9 * m + 0.1 * d["w"]
        v = 0.99 * v + 0.01 * d["w"] ** 2
    assert torch.allclose(t["w"], 0.1 * (0.1 * deltas[0]["w"] / (0.1 * deltas[0]["w"].abs() + 1e-9))
                          + 0.1 * m / (v.sqrt() + 1e-9), atol=1e-5)
    assert torch.equal(t["a"], theta["a"])  # a never-updated tensor (A under FFA) stays put
    avgm = ServerOptimizer("fedavgm", momentum=0.5)
    t = avgm.apply(avgm.apply(theta, deltas[0]), deltas[1])
    assert torch.allclose(t["w"], deltas[0]["w"] + (0.5 * deltas[0]["w"] + deltas[1]["w"]))
    assert torch.equal(ServerOptimizer("fedavg").apply(theta, deltas[0])["w"], deltas[0]["w"])
    yogi = ServerOptimizer("fedyogi")
    assert all(torch.isfinite(v).all() for v in yogi.apply(theta, deltas[0]).values())
    with pytest.raises(Exception, match="--server-optimizer 'sgd'"):
        make_cfg(demo_paths, server_optimizer="sgd").validate()


def test_strategy_applies_the_server_optimizer_to_the_mean(demo_paths):
    cfg = make_cfg(demo_paths, bits=FP32, server_optimizer="fedavgm", server_lr=0.5, server_momentum=0.0,
                   robust="none")  # the mean (two unrelated replies disagree: the direction filter drops both)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    d1 = theta_like(1)
    d2 = {k: v.flip(0) for k, v in d1.items()}  # the same norm: the bound clips neither
    strategy.aggregate_train(1, [reply(msgs[0], {k: v.numpy() for k, v in d1.items()}, 10, 11),
                                 reply(msgs[1], {k: v.numpy() for k, v in d2.items()}, 30, 12)])
    for k in theta:
        assert torch.allclose(strategy.theta[k], theta[k] + 0.5 * (d1[k] + d2[k]) / 2, atol=1e-6)


def test_server_step_defaults_to_the_swept_one_for_adamw_clients_and_fedavg_otherwise(demo_paths):
    """AdamW clients get FedAvgM (momentum 0.5, lr 1, no averaging): a tie with FedAdam 3e-3 + averaging 0.8 in
    benchmarks/federated_sweep.py (0.850 vs 0.853), and it does not turn one hostile client's consistent push into
    full per-coordinate steps (federated_attacks.py); a setting the user gives always wins, and a chosen optimizer gets
    Flower's lr, no averaging and momentum 0.9, not the default's."""
    unset = {"server_optimizer": None}
    r = make_cfg(demo_paths, **unset).resolved()
    assert (r.server_optimizer, r.server_lr, r.server_average, r.server_momentum) == ("fedavgm", 1.0, 0.0, 0.5)
    r = make_cfg(demo_paths, **unset, server_lr=0.5, server_average=0.8).resolved()
    assert (r.server_optimizer, r.server_lr, r.server_average) == ("fedavgm", 0.5, 0.8)
    r = make_cfg(demo_paths, server_optimizer="fedavgm").resolved()
    assert (r.server_optimizer, r.server_lr, r.server_average, r.server_momentum) == ("fedavgm", None, 0.0, 0.9)
    r = make_cfg(demo_paths, server_optimizer="fedadam").resolved()
    assert (r.server_optimizer, r.server_lr, r.server_average) == ("fedadam", None, 0.0)
    for other in ({"local_optimizer": "mezo"}, {"local_optimizer": "sgd"}, {"mode": "zo-seeds"}):
        r = make_cfg(demo_paths, **unset, **other).resolved()
        assert (r.server_optimizer, r.server_lr, r.server_average) == ("fedavg", None, 0.0), other
    assert FederatedConfig().resolved().server_optimizer == "fedavgm"  # the dataclass default: AdamW clients
    strategy = FedLPP(make_cfg(demo_paths, **unset, bits=FP32), theta_like())
    assert (strategy.server_opt.name, strategy.server_opt.lr, strategy.server_opt.momentum) == ("fedavgm", 1.0, 0.5)
    assert strategy.average is None


def test_iterate_average_is_the_ema_of_the_server_iterates(demo_paths):
    from slimtune.federated.server_opt import IterateAverage
    avg = IterateAverage(0.75)
    iterates = [{"w": torch.tensor([float(t), -2.0 * t])} for t in (1, 2, 3)]
    for it in iterates:
        avg.update(it)
    expected = 0.75 * (0.75 * iterates[0]["w"] + 0.25 * iterates[1]["w"]) + 0.25 * iterates[2]["w"]
    assert torch.allclose(avg.value["w"], expected)
    off = IterateAverage(0.0)
    for it in iterates:
        off.update(it)
    assert torch.equal(off.value["w"], iterates[-1]["w"])
    for bad in (1.0, -0.1):
        with pytest.raises(Exception, match="--server-average"):
            make_cfg(demo_paths, server_average=bad).validate()


def test_server_keeps_the_average_and_broadcasts_only_the_iterate(demo_paths):
    """--server-average: the server's model (evaluated, saved) is the EMA of its iterates; clients still receive
    Q(theta_t) of the current iterate, and the decay is a server-only setting they are not told."""
    cfg = make_cfg(demo_paths, bits=FP32, server_average=0.5)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    assert strategy.server_model() is strategy.theta  # before any update: theta_0
    iterates = []
    for rnd, d in ((1, theta_like(1)), (2, theta_like(2))):
        msgs = instructions(strategy)
        assert "server_average" not in json.loads(str(msgs[0].content["config"]["slimtune-config"]))
        strategy.aggregate_train(rnd, [reply(msgs[0], {k: v.numpy() for k, v in d.items()}, 10, 11)])
        iterates.append({k: v.clone() for k, v in strategy.theta.items()})
    for k in theta:
        assert torch.allclose(strategy.theta[k], theta[k] + theta_like(1)[k] + theta_like(2)[k], atol=1e-6)
        assert torch.allclose(strategy.server_model()[k], 0.5 * iterates[0][k] + 0.5 * iterates[1][k], atol=1e-6)
        assert torch.allclose(strategy.client_view()[k], strategy.theta[k])  # fp32 broadcast: the iterate itself
        assert not torch.allclose(strategy.client_view()[k], strategy.server_model()[k])


def test_robust_aggregation_bounds_one_hostile_client(demo_paths):
    theta = theta_like()
    honest = [theta_like(s) for s in (1, 2)]
    hostile = {k: 100 * torch.ones_like(v) for k, v in theta.items()}
    for robust in ("median", "clip"):
        cfg = make_cfg(demo_paths, bits=FP32, robust=robust, max_update_norm=1e6)
        strategy = FedLPP(cfg, theta)
        msgs = instructions(strategy)
        strategy.aggregate_train(1, [reply(m, {k: v.numpy() for k, v in d.items()}, 10, 11 + i)
                                     for i, (m, d) in enumerate(zip(msgs, [*honest, hostile]))])
        moved = max((strategy.theta[k] - theta[k]).abs().max().item() for k in theta)
        biggest_honest = max(d[k].abs().max().item() for d in honest for k in d)
        assert moved <= biggest_honest + 1e-5, robust  # the 100s never get through
    with pytest.raises(Exception, match="--robust"):
        make_cfg(demo_paths, robust="median", client_dp_clip=1.0).validate()


def test_server_lr_follows_its_schedule_over_the_rounds(demo_paths):
    """--server-lr-scheduler (default cosine): round t steps with server_lr * multiplier(t - 1) over --rounds, so the
    last rounds take small steps (a hostile push that gets past the aggregation late cannot undo what was learnt).
    FedAvg, 4 rounds, cosine: multipliers 1, 0.854, 0.5, 0.146 of the same delta."""
    import math
    cfg = make_cfg(demo_paths, bits=FP32, rounds=4, server_lr_scheduler="cosine")
    assert FederatedConfig.server_lr_scheduler == "cosine"
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    d = theta_like(1)
    for rnd in range(1, 5):
        before = {k: v.clone() for k, v in strategy.theta.items()}
        msgs = instructions(strategy)
        assert "server_lr_scheduler" not in json.loads(str(msgs[0].content["config"]["slimtune-config"]))
        strategy.aggregate_train(rnd, [reply(msgs[0], {k: v.numpy() for k, v in d.items()}, 10, 11)])
        factor = 0.5 * (1 + math.cos(math.pi * (rnd - 1) / 4))
        for k in theta:
            assert torch.allclose(strategy.theta[k] - before[k], factor * d[k], atol=1e-5), (rnd, k)
    with pytest.raises(Exception, match="--server-lr-scheduler"):
        make_cfg(demo_paths, server_lr_scheduler="zigzag").validate()

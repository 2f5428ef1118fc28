"""Review 81: what one hostile federated client can still do to the server (stall it, burn its CPU, ...).

Replies are built by hand and fed to the strategy (as tests/test_federated_hostile.py does); run_server is driven by
test_federated's InProcessGrid where a whole run is needed."""

import numpy as np
import pytest
import torch

from test_federated import InProcessGrid, instructions, make_cfg, reply, task_identity  # noqa: F401 (fixture)
from slimtune import SlimtuneError
from slimtune.federated import bounds
from slimtune.federated.strategy import FedLPP

FP32 = 32
SUBNORMAL = float(np.float32(1.4e-45))  # float32's smallest subnormal


class TooMuchWork(Exception):
    pass


def test_one_crafted_fp32_reply_cannot_spin_the_servers_clip_loop(demo_paths, monkeypatch):
    """bounds.clip_update scales a delta by factor = B / ||delta|| in the delta's dtype. A hostile reply of finite
    float32 values near 3e38 makes that factor a float32 *subnormal* (~1e-42), which torch rounds to a few bits: when
    it rounds up, the result lies above B, and the loop shrinks the factor by one float32 epsilon (1.2e-7) per
    iteration, each iteration a full pass over the delta, until the rounding flips (up to ~0.5 / k / 1.2e-7
    iterations at k subnormal steps). Measured: a 1M-entry LoRA delta against an honest bound of 0.05 took 37,119
    passes (571 s on this machine) for ONE reply, every round it is sent. Here a 32k-entry LoRA and two honest
    replies of norm 0.05: the server's clip should cost a handful of norm computations, not thousands."""
    shapes = {"l.lora_A.weight": (4, 4096), "l.lora_B.weight": (4096, 4)}
    theta = {k: torch.zeros(s) for k, s in shapes.items()}
    cfg = make_cfg(demo_paths, bits=FP32)
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    g = torch.Generator().manual_seed(0)
    honest = {k: torch.rand(s, generator=g) for k, s in shapes.items()}
    scale = 0.05 / bounds.update_norm(honest)
    honest = {k: (v * scale).float() for k, v in honest.items()}
    bound = bounds.update_norm(honest)  # B_t: the lower median of [honest, honest, hostile]
    n = sum(int(np.prod(s)) for s in shapes.values())
    k = int(np.ceil(bound / (3.3e38 * np.sqrt(n)) / SUBNORMAL)) + 1  # the fewest subnormal steps a float32 reaches
    value = np.float32(bound / ((k + 0.99) * SUBNORMAL * np.sqrt(n)))  # factor just below (k + 1) steps: rounds up
    assert np.isfinite(value)
    hostile = {key: np.full(s, value, dtype=np.float32) for key, s in shapes.items()}

    calls = {"n": 0}
    real_norm = bounds.update_norm

    def counted(delta):
        calls["n"] += 1
        if calls["n"] > 1000:
            raise TooMuchWork("the server computed more than 1000 update norms for one round of 3 replies")
        return real_norm(delta)

    monkeypatch.setattr(bounds, "update_norm", counted)
    as_np = {key: v.numpy() for key, v in honest.items()}
    strategy.aggregate_train(1, [reply(msgs[0], as_np, 10, 11), reply(msgs[1], as_np, 10, 12),
                                 reply(msgs[2], hostile, 10, 13)])
    assert calls["n"] <= 1000
    assert bounds.update_norm({k: strategy.theta[k] - theta[k] for k in theta}) <= bound * (1 + 1e-6)


class Stalled(Exception):
    pass


def test_a_node_that_leaves_after_round_one_does_not_stall_the_server_forever(demo_paths, tmp_path, monkeypatch):
    """run_server passes min_available_nodes = num_clients to Flower's FedAvg and checks the count only once, before
    round 1 (wait_for_nodes, bounded by node_timeout). Every later round, Flower's sample_nodes loops
    `while connected < min_available_nodes: sleep(1)` without end; a SuperLink lists only ONLINE nodes, so one
    hostile (or crashed) SuperNode that goes offline after round 1 stalls the server forever: no error, no summary,
    no adapter, the honest nodes' work never saved. It should give up (one line, as wait_for_nodes does) or go on
    with the nodes it has; here Flower's poll is counted and the test stops it after 50 polls."""
    from slimtune.federated.server_app import run_server
    import flwr.serverapp.strategy.strategy_utils as utils

    polls = {"n": 0}

    def counted_sleep(seconds):
        polls["n"] += 1
        if polls["n"] > 50:
            raise Stalled("Flower is still waiting for the node that left, after 50 polls")

    monkeypatch.setattr(utils, "sleep", counted_sleep)

    class LeavingGrid(InProcessGrid):
        rounds = 0

        def get_node_ids(self):
            ids = super().get_node_ids()
            return ids if self.rounds < 1 else ids[:-1]  # the last node went offline after round 1

        def send_and_receive(self, messages, timeout=None):
            out = super().send_and_receive(messages, timeout)
            self.rounds += bool(out)
            return out

    cfg = make_cfg(demo_paths, out_dir=str(tmp_path / "run"), rounds=2, local_steps=1, eval_max=8, node_timeout=1.0)
    try:
        run_server(LeavingGrid(3), cfg)
    except SlimtuneError:
        pass  # a clear one-line error is an acceptable outcome; waiting forever is not


def test_a_reply_padded_with_records_the_server_never_reads_is_rejected_not_counted(demo_paths):
    """replies.py promises that 'every field of a client's reply is checked, and anything unexpected rejects the
    reply'; parse_reply reads only content['arrays'] and content['metrics'] (two keys of it). A hostile client adds
    a record of its own (here a 1 MB ConfigRecord, and an unknown metric beside num-examples): the reply is accepted,
    and its padding goes into the run's records as what a client uploads (bytes_up_per_client in metrics.jsonl,
    bytes_up_per_client_per_round and bytes_communicated in summary.json: the communication cost the project
    reports), which one client can thus set to anything."""
    from flwr.app import ConfigRecord, MetricRecord

    cfg = make_cfg(demo_paths, bits=FP32)
    theta = {"l.lora_A.weight": torch.zeros(2, 6), "l.lora_B.weight": torch.zeros(5, 2)}
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    g = torch.Generator().manual_seed(1)
    delta = {k: (0.01 * torch.randn(v.shape, generator=g)).numpy() for k, v in theta.items()}
    padded = reply(msgs[2], delta, 10, 13)
    padded.content["junk"] = ConfigRecord({"pad": "x" * 1_000_000})
    padded.content["metrics"] = MetricRecord({"num-examples": 10, "train-loss": 0.5, "junk": [1.0] * 1000})
    strategy.aggregate_train(1, [reply(msgs[0], delta, 10, 11), reply(msgs[1], delta, 10, 12), padded])
    info = strategy.round_log[1]
    assert info["rejected"] == 1, {k: info.get(k) for k in ("replies", "rejected", "bytes_up_per_client")}
    assert info["bytes_up_per_client"] < 100_000, info  # the honest replies are ~1 kB


def test_the_deployment_reports_a_run_stopped_early_with_its_rounds_saved(tmp_path):
    """(lead) The fixer's note: a run stopped by missing nodes keeps its rounds (adapter, summary), but the
    deployment script said "trained nothing; no adapter was saved" for any stop_reason but "completed"."""
    import json
    import subprocess

    from slimtune import SlimtuneError
    from slimtune.federated.deployment import finished_summary
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"stop_reason": "round 3: 1 of num-clients=3 SuperNodes missing",
                                                  "rounds_done": 2, "rounds": 5}))
    done = subprocess.CompletedProcess([], 1, "", "")
    with pytest.raises(SlimtuneError) as err:
        finished_summary(out, tmp_path / "logs", done)
    assert "stopped early" in str(err.value) and "2 round(s) done are saved" in str(err.value)
    assert "trained nothing" not in str(err.value)
    (out / "adapter").rmdir()
    (out / "summary.json").write_text(json.dumps({"stop_reason": "no client update", "rounds_done": 0}))
    with pytest.raises(SlimtuneError, match="trained nothing"):
        finished_summary(out, tmp_path / "logs", done)

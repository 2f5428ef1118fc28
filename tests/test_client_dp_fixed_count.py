"""Client-level DP (DP-FedAvg): the released mean divides by the fixed number of clients, not by how many replies
were accepted, and a round is released whether or not any reply was accepted.

With the realised count K' as the divisor (and as the noise's scale sigma S / K'), whether one client's reply was
accepted, which can depend on that client's data (its training diverged, its reply was too large, it crashed on one
of its rows), changes the released model by a factor K / K' that the noise does not cover. McMahan et al. (2018)'s
fixed-denominator estimator divides by the expected count, and a lost reply counts as a zero update: one client then
moves the sum by at most S whether it replied or not, which is what the accountant is calibrated to.
"""

import numpy as np
import torch
from flwr.app import Error, Message

from slimtune.federated.strategy import FedLPP
from slimtune.federated.wire import FP32
from test_federated import instructions, make_cfg, reply, task_identity, theta_like  # noqa: F401 (fixture)


def _arrays(d):
    return {k: v.numpy() for k, v in d.items()}


def test_client_level_dp_mean_divides_by_the_number_of_clients_not_the_accepted_replies(demo_paths):
    cfg = make_cfg(demo_paths, bits=FP32, client_dp_clip=100.0, client_dp_noise=0.0)  # 3 clients, no clipping
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    d1, d2 = theta_like(1), theta_like(2)
    failed = Message(Error(code=1, reason="client crashed"), reply_to=msgs[2])
    strategy.aggregate_train(1, [reply(msgs[0], _arrays(d1), 10, 11), reply(msgs[1], _arrays(d2), 10, 12), failed])
    for k in theta:  # (d1 + d2 + 0) / 3, the failed client counted as a zero update
        assert torch.allclose(strategy.theta[k], theta[k] + (d1[k] + d2[k]) / 3, atol=1e-6), k


def test_client_level_dp_noise_scale_does_not_depend_on_the_accepted_count(demo_paths):
    """Zero updates, noise only: the noise's spread is sigma S / K with K = --clients, one reply accepted or three."""
    cfg = make_cfg(demo_paths, bits=FP32, client_dp_clip=1.0, client_dp_noise=1.0)
    spreads = []
    for accepted in (1, 3):
        strategy = FedLPP(cfg, {"w.lora_B.weight": torch.zeros(200, 200)})
        msgs = instructions(strategy)
        zero = {"w.lora_B.weight": np.zeros((200, 200), dtype=np.float32)}
        replies = [reply(m, zero, 10, 11 + i) for i, m in enumerate(msgs[:accepted])]
        replies += [Message(Error(code=1, reason="crashed"), reply_to=m) for m in msgs[accepted:]]
        strategy.aggregate_train(1, replies)
        spreads.append(strategy.theta["w.lora_B.weight"].std().item())
    assert abs(spreads[0] - 1 / 3) < 0.02 and abs(spreads[1] - 1 / 3) < 0.02, spreads


def test_client_level_dp_releases_a_round_with_no_accepted_reply(demo_paths):
    """Skipping the release when every reply was lost tells the model's users that the round's clients failed: the
    noise is released anyway (the round's update is sigma S / K noise around zero)."""
    cfg = make_cfg(demo_paths, bits=FP32, client_dp_clip=1.0, client_dp_noise=1.0)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    strategy.aggregate_train(1, [Message(Error(code=1, reason="crashed"), reply_to=m) for m in msgs])
    assert any(not torch.equal(strategy.theta[k], theta[k]) for k in theta)

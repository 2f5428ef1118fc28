"""Issue 35, item 1: one hostile client cannot control the model under the defaults (bounded influence, server side).

Every test builds replies by hand and feeds them to the strategy; the defaults are the ones a run gets (only the
server optimizer is named where a test is about one)."""

import numpy as np
import pytest
import torch

from test_federated import instructions, make_cfg, reply, task_identity, theta_like  # noqa: F401 (fixture)
from slimtune.federated.strategy import FedLPP

FP32 = 32


def norm(state):
    return torch.sqrt(sum((v.double() ** 2).sum() for v in state.values())).item()


def as_arrays(state):
    return {k: v.numpy().astype(np.float32) for k, v in state.items()}


def moved(strategy, theta):
    return {k: strategy.theta[k] - theta[k] for k in theta}


def honest_deltas(n=3, scale=0.1):
    return [{k: scale * v for k, v in theta_like(10 + s).items()} for s in range(n)]


def test_a_client_claiming_a_huge_dataset_gets_no_more_weight_than_an_honest_one(demo_paths):
    """num-examples up to 1e9 used to give the liar the whole weight, even with --robust clip."""
    for robust in ("none", "clip"):
        cfg = make_cfg(demo_paths, bits=FP32, robust=robust)
        theta = theta_like()
        strategy = FedLPP(cfg, theta)
        msgs = instructions(strategy)
        honest = honest_deltas(2)
        liar = {k: -v for k, v in honest[0].items()}  # an honest-sized update, pointing the other way
        replies = [reply(msgs[0], as_arrays(honest[0]), 10, 11), reply(msgs[1], as_arrays(honest[1]), 10, 12),
                   reply(msgs[2], as_arrays(liar), int(1e9), 13)]
        strategy.aggregate_train(1, replies)
        step = moved(strategy, theta)
        liar_share = sum((step[k] * liar[k]).sum() for k in theta) / sum((liar[k] ** 2).sum() for k in theta)
        assert liar_share <= 1 / 3 + 1e-4, robust  # at most an equal share (it was ~1.0)


def test_a_norm_999_update_moves_theta_no_further_than_an_honest_one(demo_paths):
    cfg = make_cfg(demo_paths, bits=FP32)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    honest = honest_deltas(2)
    huge = {k: torch.ones_like(v) for k, v in theta.items()}
    huge = {k: v * 999 / norm(huge) for k, v in huge.items()}
    strategy.aggregate_train(1, [reply(msgs[0], as_arrays(honest[0]), 10, 11),
                                 reply(msgs[1], as_arrays(honest[1]), 10, 12), reply(msgs[2], as_arrays(huge), 10, 13)])
    assert norm(moved(strategy, theta)) <= max(norm(d) for d in honest) + 1e-5


def test_fedadam_keeps_learning_after_one_norm_999_reply(demo_paths):
    """One accepted norm-999 reply used to fill FedAdam's second moment and stall it (progress 2.61 -> 0.028)."""

    def progress(poisoned: bool) -> float:
        cfg = make_cfg(demo_paths, bits=FP32, server_optimizer="fedadam", server_lr=1e-2)
        theta = theta_like()
        strategy = FedLPP(cfg, theta)
        direction = honest_deltas(1, scale=0.01)[0]
        for rnd in range(1, 12):
            msgs = instructions(strategy)
            replies = [reply(msgs[i], as_arrays(direction), 10, 11 + i) for i in range(2)]
            if poisoned and rnd == 1:
                replies.append(reply(msgs[2], as_arrays({k: 1e4 * v for k, v in direction.items()}), 10, 13))
            strategy.aggregate_train(rnd, replies)
        return norm(moved(strategy, theta))

    assert progress(poisoned=True) >= 0.5 * progress(poisoned=False)


def test_fedavgm_never_locks_out_honest_clients(demo_paths):
    """FedAvgM momentum used to push theta past the fp16 guard, after which every honest reply was rejected."""
    cfg = make_cfg(demo_paths, bits=FP32, server_optimizer="fedavgm", server_momentum=0.9)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    push = {k: 500 * torch.ones_like(v) for k, v in theta.items()}
    for rnd in range(1, 31):
        msgs = instructions(strategy)
        honest = honest_deltas(2)
        _, metrics = strategy.aggregate_train(rnd, [reply(msgs[0], as_arrays(honest[0]), 10, 11),
                                                    reply(msgs[1], as_arrays(honest[1]), 10, 12),
                                                    reply(msgs[2], as_arrays(push), 10, 13)])
        assert metrics["replies"] == 3, rnd
    assert all(torch.isfinite(v).all() and v.abs().max() < 6e4 for v in strategy.theta.values())
    assert all(torch.isfinite(v).all() for v in strategy.client_view().values())


def test_the_server_step_keeps_theta_finite_under_any_accepted_reply(demo_paths):
    for name in ("fedavg", "fedavgm", "fedadam", "fedyogi"):
        cfg = make_cfg(demo_paths, bits=FP32, server_optimizer=name)
        theta = theta_like()
        strategy = FedLPP(cfg, theta)
        msgs = instructions(strategy)
        big = {k: torch.full_like(v, 3e38) for k, v in theta.items()}  # finite in fp32, overflows any square
        strategy.aggregate_train(1, [reply(msgs[0], as_arrays(big), 10, 11)])
        assert all(torch.isfinite(v).all() and v.abs().max() <= 6e4 for v in strategy.theta.values()), name


# -- zo-seeds ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zo_setup(demo_paths_module):
    from slimtune.federated.server_app import make_replay
    from slimtune.federated.model import build_model, lora_state
    cfg = make_cfg(demo_paths_module, bits=FP32, mode="zo-seeds", local_steps=3, lr=1e-2)
    model = build_model(cfg)[0]
    return cfg, lora_state(model), make_replay(model, cfg)


@pytest.fixture(scope="module")
def demo_paths_module():
    from conftest import DEMO
    return str(DEMO / "sst2_demo_train.tsv"), str(DEMO / "sst2_demo_dev.tsv")


def zo_reply(msg, grads, node, seeds=None):
    grads = np.asarray(grads, dtype=np.float32)
    seeds = np.arange(len(grads), dtype=np.int64) + 100 * node if seeds is None else seeds
    return reply(msg, {"seeds": seeds, "grads": grads}, 10, node)


def test_zo_seed_replies_are_bounded_per_scalar(zo_setup):
    """A reply of finite but huge scalars used to move theta by 17x the update cap."""
    cfg, theta, replay = zo_setup
    honest_only = FedLPP(cfg, theta, replay=replay)
    msgs = instructions(honest_only)
    honest = [zo_reply(msgs[0], [0.5, -0.3, 0.2], 11), zo_reply(msgs[1], [-0.4, 0.6, 0.1], 12)]
    honest_only.aggregate_train(1, honest)
    attacked = FedLPP(cfg, theta, replay=replay)
    msgs = instructions(attacked)
    attacked.aggregate_train(1, [zo_reply(msgs[0], [0.5, -0.3, 0.2], 11), zo_reply(msgs[1], [-0.4, 0.6, 0.1], 12),
                                 zo_reply(msgs[2], [9e5, -9e5, 9e5], 13)])
    assert attacked.round_log[1]["replies"] == 3
    assert norm(moved(attacked, theta)) <= 2 * norm(moved(honest_only, theta)) + 1e-6
    inf = FedLPP(cfg, theta, replay=replay)
    msgs = instructions(inf)
    _, metrics = inf.aggregate_train(1, [zo_reply(msgs[0], [0.5, -0.3, 0.2], 11),
                                         zo_reply(msgs[1], [float("inf"), 0.1, 0.1], 12)])
    assert metrics["replies"] == 1 and metrics["rejected"] == 1


def test_zo_seeds_honours_the_server_optimizer_and_robust_aggregation(zo_setup):
    """zo-seeds used to ignore --server-optimizer and --robust."""
    from dataclasses import replace
    cfg, theta, replay = zo_setup
    steps = {}
    for name, kw in (("fedavg", {}), ("half", {"server_optimizer": "fedavgm", "server_lr": 0.5,
                                              "server_momentum": 0.0})):
        strategy = FedLPP(replace(cfg, **kw), theta, replay=replay)
        msgs = instructions(strategy)
        strategy.aggregate_train(1, [zo_reply(msgs[0], [0.5, -0.3, 0.2], 11), zo_reply(msgs[1], [-0.4, 0.6, 0.1], 12)])
        steps[name] = moved(strategy, theta)
    for k in theta:
        assert torch.allclose(steps["half"][k], 0.5 * steps["fedavg"][k], atol=1e-7)
    median = FedLPP(replace(cfg, robust="median"), theta, replay=replay)
    msgs = instructions(median)
    same = [0.5, -0.3, 0.2]
    median.aggregate_train(1, [zo_reply(msgs[0], same, 11, seeds=np.arange(3)),
                               zo_reply(msgs[1], same, 12, seeds=np.arange(3)),
                               zo_reply(msgs[2], [-0.5, 0.3, -0.2], 13, seeds=np.arange(3))])
    alone = FedLPP(cfg, theta, replay=replay)
    msgs = instructions(alone)
    alone.aggregate_train(1, [zo_reply(msgs[0], same, 11, seeds=np.arange(3))])
    for k in theta:  # the coordinate-wise median of two equal updates and their negation is that update
        assert torch.allclose(median.theta[k], alone.theta[k], atol=1e-7)


def test_the_coordinate_wise_median_of_an_even_number_of_updates_is_unbiased(demo_paths):
    """--robust median took torch's lower median: with 4 replies (the benchmark's clients per round) every coordinate
    got the 2nd smallest value, a push towards -inf on every coordinate that no client sent. With an even count the
    median is the mean of the two middle values, so updates symmetric around u aggregate to u."""
    from dataclasses import replace
    from slimtune.federated.bounds import aggregate
    cfg = replace(make_cfg(demo_paths, bits=FP32), robust="median")
    theta = theta_like()
    u = {k: 0.1 * v for k, v in theta_like(3).items()}
    spread = [-3.0, -1.0, 1.0, 3.0]
    deltas = [{k: v + s * 0.01 for k, v in u.items()} for s in spread]
    update = aggregate(theta, deltas, [0.25] * 4, cfg)
    for k in theta:
        assert torch.allclose(update[k], u[k], atol=1e-6), k
    # one hostile reply among four cannot move a coordinate past the honest values
    hostile = [{k: v + s * 0.01 for k, v in u.items()} for s in (-1.0, 0.0, 1.0)] + [{k: -50 * v for k, v in u.items()}]
    update = aggregate(theta, hostile, [0.25] * 4, cfg)
    for k in theta:  # the honest values of a coordinate lie in u +- 0.01; the hostile one is -50 u
        assert ((update[k] - u[k]).abs() <= 0.01 + 1e-6).all(), k


def test_robust_direction_drops_a_reply_that_pushes_against_the_round(demo_paths):
    """Sign flip within the norm bound (issue 35's attack that the mean and the median let through: the flipped
    update is the round's largest aligned vector, and the server optimizer amplifies its consistent push):
    --robust direction keeps the replies whose cosine with the round's coordinate-wise median is positive, so a
    reply pointing against the others gets no weight, and honest replies keep their equal share (1/4 each: the
    dropped reply's weight goes to nobody)."""
    from dataclasses import replace
    from slimtune.federated.bounds import aggregate
    cfg = replace(make_cfg(demo_paths, bits=FP32), robust="direction")
    theta = theta_like()
    common = {k: 0.1 * v for k, v in theta_like(3).items()}
    honest = [{k: v + 0.03 * n for (k, v), n in zip(common.items(), theta_like(20 + s).values())} for s in range(3)]
    flipped = {k: -3 * v for k, v in honest[0].items()}
    info = {}
    update = aggregate(theta, [*honest, flipped], [0.25] * 4, cfg, info=info)
    assert info["agreeing"] == 3
    honest_shares = {k: sum(d[k] for d in honest) / 4 for k in theta}
    for k in theta:
        assert torch.allclose(update[k], honest_shares[k], atol=1e-6), k
    # two opposite replies: their median is 0, so neither agrees with the round and nothing moves
    alone = aggregate(theta, [honest[0], {k: -v for k, v in honest[0].items()}], [0.5, 0.5], cfg)
    assert all(float(v.abs().max()) == 0 for v in alone.values())
    with pytest.raises(Exception, match="--robust"):
        make_cfg(demo_paths, robust="direction", client_dp_clip=1.0).validate()


def test_robust_direction_keeps_a_lone_reply_and_logs_each_cosine(demo_paths):
    """A round with one reply (the others timed out) is its own median: kept, as the mean would keep it (its size is
    still bounded by the window's norms). Each reply's cosine with the round's median goes to the server's metrics."""
    from dataclasses import replace
    from slimtune.federated.bounds import aggregate
    cfg = replace(make_cfg(demo_paths, bits=FP32), robust="direction")
    theta = theta_like()
    delta = {k: 0.1 * v for k, v in theta_like(3).items()}
    info = {}
    update = aggregate(theta, [delta], [1.0], cfg, info=info)
    assert info["agreeing"] == 1 and info["agreement"] == [1.0]
    assert all(torch.equal(update[n], delta[n]) for n in theta)


def test_robust_direction_never_gives_a_reply_more_weight_than_the_mean(demo_paths):
    """The replies it drops used to hand their weight to the kept ones (renormalised), so a coalition that gets honest
    replies dropped gained weight: 2 colluding replies in a round of 4 (2 of 8 clients with --clients-per-round 4:
    21% of rounds; or honest clients that time out) made the median, dropped both honest replies and moved theta by
    their own mean alone (100% of the update, against 50% under --robust none). A dropped reply's weight now goes to
    nobody: no reply weighs more than it would in the plain mean."""
    from dataclasses import replace
    from slimtune.federated.bounds import aggregate
    cfg = replace(make_cfg(demo_paths, bits=FP32), robust="direction")
    theta = theta_like()
    common = {k: 0.1 * v for k, v in theta_like(3).items()}
    honest = [{k: v + 0.03 * n for (k, v), n in zip(common.items(), theta_like(20 + s).values())} for s in range(2)]
    hostile = [{k: -v + 0.01 * n for (k, v), n in zip(common.items(), theta_like(40 + s).values())} for s in range(2)]
    info = {}
    update = aggregate(theta, [*honest, *hostile], [0.25] * 4, cfg, info=info)
    push = {k: sum(d[k] for d in hostile) for k in theta}  # what the coalition sends, summed
    share = sum((update[k] * push[k]).sum() for k in theta) / sum((push[k] ** 2).sum() for k in theta)
    assert info["agreeing"] == 2  # they set the median: both honest replies disagree with it
    assert share <= 0.25 + 1e-6, float(share)  # each hostile reply at most its own 1/4 (it was 1/2 each)


def test_the_default_aggregation_filters_lora_replies_by_direction_only_where_it_can(demo_paths):
    """--robust auto (the default): the direction filter for LoRA replies; the plain mean for zo-seeds replies (near-
    orthogonal random directions: the filter would drop honest ones at random) and under client-level DP (accounted
    for the uniform mean)."""
    from slimtune.federated import FederatedConfig
    from slimtune.federated.config import robust_rule
    assert FederatedConfig.robust == "auto"
    assert robust_rule("auto", "lora", False) == "direction"
    assert robust_rule("auto", "zo-seeds", False) == "none" and robust_rule("auto", "lora", True) == "none"
    assert robust_rule("clip", "lora", False) == "none" and robust_rule("median", "lora", False) == "median"
    make_cfg(demo_paths, client_dp_clip=1.0).validate()  # the default is valid with client-level DP
    make_cfg(demo_paths, robust="clip", client_dp_clip=1.0).validate()  # clip is the mean: not refused
    cfg = make_cfg(demo_paths, bits=FP32)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    honest = honest_deltas(3)
    common = {k: 0.1 * v for k, v in theta_like(3).items()}
    honest = [{k: common[k] + 0.03 * d[k] for k in theta} for d in honest]
    flipped = {k: -v for k, v in honest[0].items()}
    strategy.aggregate_train(1, [reply(m, as_arrays(d), 10, 11 + i)
                                 for i, (m, d) in enumerate(zip(msgs, [honest[0], honest[1], flipped]))])
    log = strategy.round_log[1]
    assert len(msgs) == 3 and log["agreeing"] == 2 and log["agreement"][2] < 0  # the flipped reply is dropped


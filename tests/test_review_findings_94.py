"""Review 94: the federated DP accounting against the mechanism actually run (client-level DP on the server, local DP
on the clients), and what a private run lets out besides the accounted releases.

Replies are built by hand and fed to the strategy (as tests/test_federated.py and test_review_findings_87.py do);
nothing here starts Ray or a simulation."""

import logging
import re

import pytest
import torch

from test_federated import make_cfg, reply, task_identity  # noqa: F401 (fixture)
from slimtune import SlimtuneError
from slimtune.federated.config import check_run
from slimtune.federated.strategy import FedLPP

FP32 = 32
SHAPES = {"l.lora_A.weight": (2, 6), "l.lora_B.weight": (5, 2)}
CLIENT_DP = dict(client_dp_clip=1.0, client_dp_noise=1.0)


def zero_theta():
    return {k: torch.zeros(s) for k, s in SHAPES.items()}


def small_delta(seed=1, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return {k: (scale * torch.randn(s, generator=g)).numpy() for k, s in SHAPES.items()}


# -- 1. a delta that allows releasing a whole client (or a whole row) -------------------------------------------------

def test_client_dp_delta_at_or_above_one_over_the_clients_is_refused(demo_paths):
    """`slimtune train` refuses delta >= 1/N (accountant.check_spec: 'such a delta allows leaking a whole example').
    Client-level DP's unit is a client, so N = --clients; the federated path never calls check_spec, and
    --client-dp-delta is only checked to lie in (0, 1). With 3 clients, --client-dp-delta 0.5 is accepted and
    metrics.jsonl / summary.json report epsilon 6.47 after 10 rounds at noise 1 (19.05 at delta 1e-5): a mechanism
    that publishes one client's data outright, chosen at random, is (0, 1/3)-DP, so at delta >= 1/N the reported
    epsilon guarantees nothing about any one client."""
    cfg = make_cfg(demo_paths, bits=FP32, num_clients=3, client_dp_delta=0.5, **CLIENT_DP)
    with pytest.raises(SlimtuneError, match="delta"):
        cfg.validate()


def test_public_local_epsilon_bound_is_not_reported_at_a_delta_above_one_over_the_bound(demo_paths):
    """The server's public bound on every private client's epsilon (summary.json local_epsilon, metrics.jsonl
    local_epsilon) is priced at --local-dp-delta as given, any value in (0, 1). local_privacy.account_delta protects a
    node's own ledger from exactly this ('at delta 0.999999 every epsilon is ~0: a budget measured at it would bound
    nothing'), and `slimtune train` refuses delta >= 1/N, but the server's reported bound has neither guard: with
    --local-dp-min-examples 2 and --local-dp-delta 0.9 the run reports local_epsilon 8.7 after 10 rounds (20.7 at
    1e-5), at a delta under which a client's rows can be released whole."""
    cfg = make_cfg(demo_paths, bits=FP32, local_optimizer="dpzero", local_dp_min_examples=2, local_dp_delta=0.9,
                   batch_size=1)
    with pytest.raises(SlimtuneError, match="delta"):
        cfg.validate()


# -- 2. the server's evaluations on the clients' own rows ------------------------------------------------------------

@pytest.mark.parametrize("copy", [False, True], ids=["same-file", "rows-copied"])
@pytest.mark.parametrize("private", [CLIENT_DP, dict(local_optimizer="dpzero")], ids=["client-dp", "local-dp"])
def test_a_private_federated_run_refuses_eval_data_that_is_the_training_data(demo_paths, tmp_path, private, copy):
    """`slimtune train` with a private optimizer refuses --eval-data naming the training data (data.readers
    EVAL_IS_TRAINING: 'a private run's evaluations ... would be computed on training rows without noise'). `slimtune
    federate` has no such check: with --eval-data the same file as --data, every scored round writes server_accuracy /
    client_visible_accuracy (and summary.json final_accuracy, initial_accuracy) computed without noise on the clients'
    rows, releases that neither the client-level accountant nor the clients' local epsilon covers (evaluating the
    released model on private data is a new query of that data, not post-processing). `slimtune train` also refuses
    evaluation data that shares rows with the training data (trainer.check_data); federate checks row overlap only
    for --root-data. rows-copied: the training file's rows under another name."""
    train, _ = demo_paths
    if copy:
        evaluation = tmp_path / "dev.tsv"
        evaluation.write_text(open(train).read())
        train_or_copy = str(evaluation)
    else:
        train_or_copy = train
    cfg = make_cfg(demo_paths, bits=FP32, eval_data=train_or_copy, out_dir=str(tmp_path / "run"), **private)
    with pytest.raises(SlimtuneError, match="eval"):
        check_run(cfg)


# -- 3. Flower's own log in a private run ----------------------------------------------------------------------------

class ReplyingGrid:
    """A Grid whose three nodes answer every train instruction with a small delta (no training)."""

    def get_node_ids(self):
        return [11, 12, 13]

    def send_and_receive(self, messages, timeout=None):
        return [reply(m, small_delta(i + 1), 10, m.metadata.dst_node_id) for i, m in enumerate(messages)]


@pytest.mark.parametrize("private", [CLIENT_DP, dict(local_optimizer="dpzero")], ids=["client-dp", "local-dp"])
def test_a_private_run_does_not_log_its_wall_clock_time(demo_paths, private):
    """A private run withholds its timing: 'the server writes no round times or memory (a round lasts as long as its
    slowest client's private batches take)' (local_privacy.private_clients; summary.json time_per_step_s None, no
    elapsed_s in metrics.jsonl). But run_server drives the rounds through Flower's Strategy.start, which logs at INFO
    on Flower's console handler 'Strategy execution finished in 12.34s' (the whole run's wall-clock time, i.e. the
    sum over rounds of the slowest client's local steps: Poisson batch sizes and the lengths of the sampled rows) and
    then a dump of every round's metrics; nothing in slimtune lowers the 'flwr' logger, so `slimtune federate` prints
    it for every private run."""
    cfg = make_cfg(demo_paths, bits=FP32, **private)
    strategy = FedLPP(cfg, zero_theta(), min_available_nodes=3, min_train_nodes=3, fraction_train=1.0)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    flwr_log = logging.getLogger("flwr")
    handler, level = Keep(level=logging.DEBUG), flwr_log.level
    flwr_log.addHandler(handler)
    flwr_log.setLevel(logging.INFO)  # Flower's own default (flwr.supercore.logger)
    try:
        strategy.start(ReplyingGrid(), strategy.broadcast()[0], num_rounds=1, timeout=60)
    finally:
        flwr_log.removeHandler(handler)
        flwr_log.setLevel(level)
    timed = [line for line in records if re.search(r"\d+\.\d\ds\b", line)]
    assert not timed, timed

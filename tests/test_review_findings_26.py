"""Review 26: the federation attacked by a hostile participant (a client against the server and the other clients, a
server against its clients) and `slimtune federate`'s settings. Each test failed on the code it was written against."""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from test_bad_input_table import TINY, TRAIN, assert_one_line, cli
from test_federated import instructions, make_cfg, reply, task_identity, theta_like  # noqa: F401 (fixture)
from slimtune.federated.strategy import FedLPP

FP32 = 32


def as_arrays(state):
    return {k: v.numpy().astype(np.float32) for k, v in state.items()}


def bare_reply(to: Message, arrays: dict, metrics: dict, node: int) -> Message:
    """A reply with exactly `metrics` (a private client sends none)."""
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    msg = Message(content=content, reply_to=to)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def honest(seed, scale=0.05):
    return {k: scale * v for k, v in theta_like(10 + seed).items()}


# -- 1. client-level DP: a client's failure text goes into the server's log ----------------------------------------
def test_under_client_level_dp_a_failing_clients_error_text_is_not_logged(demo_paths, caplog):
    """Under client-level DP the server treats its clients' data as private (server_app.private_clients: no round
    times, no memory, no training loss: only the noised aggregate is released). But a client that fails sends
    Flower's error reason, `str(exc)` of its ClientApp (a deployment node's bad row: "node.jsonl:7: field 'label':
    unknown label '<the row's value>'"), and aggregate_train logs it verbatim. The clients run a non-private local
    optimizer and do not know the run is client-level DP (client_dp_* are server-only), so only the server can keep
    it out of its log."""
    cfg = make_cfg(demo_paths, bits=FP32, client_dp_clip=1.0, client_dp_noise=1.0)
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    secret = "my-card-number-4111111111111111"
    failed = Message(Error(code=0, reason=f"SlimtuneError: node.jsonl:7: field 'label': unknown label '{secret}'"),
                     reply_to=msgs[2])
    failed.metadata.__dict__["_src_node_id"] = 13
    with caplog.at_level(logging.DEBUG, logger="slimtune.federated"):
        strategy.aggregate_train(1, [reply(msgs[0], as_arrays(honest(0)), 10, 11),
                                     reply(msgs[1], as_arrays(honest(1)), 10, 12), failed])
    assert any(not torch.equal(strategy.theta[k], theta[k]) for k in theta)  # the round went on (its counts are
    # not written under client-level DP: tests/test_review_findings_30.py)
    assert secret not in caplog.text, caplog.text


# -- 2. local DP: the logged training loss is one hostile client's claim --------------------------------------------
def test_in_a_private_run_no_single_client_sets_the_logged_training_loss(demo_paths):
    """strategy.aggregate_train logs train_loss as "the claims' median: no one client sets it" (review 10). Private
    local optimizers send no loss, so in a local-DP run the only claim is a hostile client's: its made-up number is
    written to metrics.jsonl as the run's training loss (`slimtune report` plots it). A private run should read no
    train-loss at all (or reject a reply carrying metrics a private client never sends)."""
    cfg = make_cfg(demo_paths, bits=FP32, local_optimizer="dp-adamw")
    theta = theta_like()
    strategy = FedLPP(cfg, theta)
    msgs = instructions(strategy)
    replies = [bare_reply(msgs[0], as_arrays(honest(0)), {}, 11), bare_reply(msgs[1], as_arrays(honest(1)), {}, 12),
               bare_reply(msgs[2], as_arrays(honest(2)), {"train-loss": 0.001}, 13)]
    strategy.aggregate_train(1, replies)
    assert strategy.round_log[1]["replies"] >= 2
    assert "train_loss" not in strategy.round_log[1], strategy.round_log[1]


# -- 3. federate's missing-column error names flags federate lacks --------------------------------------------------
def test_federates_missing_column_error_names_no_flag_federate_lacks(tmp_path):
    """A --data (or --eval-data, --root-data) table without the task's columns is refused by data/readers.py with
    "choose with --text-column/--label-column"; `slimtune federate` has neither flag (review 23 fixed the same hint
    for --template only): the user is sent to a flag that is refused as unknown."""
    bad = tmp_path / "bad.csv"
    bad.write_text("text,target\nfine movie,1\nbad movie,0\n")
    res = cli("federate", "--data", bad, *TINY, "--out", tmp_path / "fed")
    assert_one_line(res, "missing column(s) 'sentence', 'label'")
    assert "--text-column" not in res.stderr and "--label-column" not in res.stderr, res.stderr
    assert not (tmp_path / "fed").exists()


# -- the fix's edges (the lead's) --------------------------------------------------------------------------------------
def test_a_clients_text_in_the_servers_log_is_quoted_and_cut(demo_paths, caplog):
    """In a run that does not protect its clients' data the error text is logged, quoted (a hostile client's newline
    cannot start a forged log line) and cut (it cannot flood the log)."""
    cfg = make_cfg(demo_paths, bits=FP32)
    strategy = FedLPP(cfg, theta_like())
    msgs = instructions(strategy)
    failed = Message(Error(code=0, reason="boom\nround 1: server step taken" + "x" * 10_000), reply_to=msgs[2])
    failed.metadata.__dict__["_src_node_id"] = 13
    with caplog.at_level(logging.DEBUG, logger="slimtune.federated"):
        strategy.aggregate_train(1, [reply(msgs[0], as_arrays(honest(0)), 10, 11),
                                     reply(msgs[1], as_arrays(honest(1)), 10, 12), failed])
    line = next(r.getMessage() for r in caplog.records if "client 13 failed" in r.getMessage())
    assert "\n" not in line and "boom\\nround 1" in line and len(line) < 500, line


# -- 4. a hostile server names the file a shared-file node reads ------------------------------------------------------
def test_a_node_reading_the_servers_data_path_sends_no_text_of_that_file(demo_paths, tmp_path, capsys):
    """A node started without data-path reads the file the server's config names (a share of a shared file). A
    hostile server can name any table on the node: the reader's error ("people.tsv:6: field 'label': unknown label
    '<a value>'", or the header's column names) went back to the server as the round's error reason. Withheld now,
    as a private client's is; the node's operator sees it on the node's stderr."""
    from dataclasses import replace

    import pytest
    from test_federated_local_dp import payload_for
    from slimtune import SlimtuneError
    from slimtune.federated.client_app import local_train

    lines = open(demo_paths[0]).read().splitlines()
    bad = lines[5].split("\t")
    bad[-1] = "SECRETVALUE"
    other = tmp_path / "people.tsv"
    other.write_text("\n".join(lines[:5] + ["\t".join(bad)] + lines[6:40]) + "\n")
    honest_cfg = make_cfg(demo_paths, bits=8)
    payload = payload_for(honest_cfg)  # the broadcast, from the shared file's model
    with pytest.raises(SlimtuneError) as err:
        local_train(replace(honest_cfg, data=str(other)), 1, payload, 1, own_data=False, num_partitions=2)
    assert "SECRETVALUE" not in str(err.value) and "people.tsv:6" not in str(err.value), str(err.value)
    assert "SECRETVALUE" in capsys.readouterr().err

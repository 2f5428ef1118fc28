"""Nineteenth review round: `slimtune federate`'s settings and their sources (flags, config and server settings files,
node config, the deployment script's data shards) used by a careless user and operator.

Each test fails on the code it was written against; nothing here starts Flower, Ray or a real deployment (the
simulation's `run_simulation` and the deployment's LocalFederation are replaced by recorders that fail the test if the
run gets that far)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from slimtune import SlimtuneError

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import DEMO  # noqa: E402
from test_bad_input_table import assert_one_line, cli  # noqa: E402
from test_federated import make_cfg, task_identity  # noqa: E402, F401 (fixture)

TRAIN, DEV = DEMO / "sst2_demo_train.tsv", DEMO / "sst2_demo_dev.tsv"  # 72 training rows, labels 0/1


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture
def flower_started(monkeypatch):
    """Records a call of Flower's simulation instead of starting Ray (minutes): a refusal must come before it."""
    import flwr.simulation
    calls = []

    def run_simulation(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("Flower's simulation was started")

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_simulation)
    return calls


def federate(tmp_path, *extra):
    return cli("federate", "--data", TRAIN, "--model", "tiny-llama", "--out", tmp_path / "out", *extra)


# -- 1. a partition that cannot give every client a row is found by the clients, after Ray started -----------------
@pytest.mark.parametrize("extra", [("--clients", "100"), ("--clients", "8", "--alpha", "0.05")],
                         ids=["more-clients-than-rows", "non-iid-alpha"])
def test_a_partition_that_leaves_a_client_empty_is_refused_before_flower_starts(tmp_path, flower_started, extra):
    """check_run reads the data but never partitions it: the Dirichlet split (partition.dirichlet_partition) is first
    drawn inside every ClientApp (client_app._setup), after Ray started. `--clients 8 --alpha 0.05` (a user asking for
    a strongly non-IID split of the 72-row file) or `--clients 100` passes every check, starts the simulation, and each
    client raises `ValueError: could not give every one of 8 clients 1 examples`; the run ends minutes later in
    'federated run trained nothing' without naming --clients or --alpha."""
    res = federate(tmp_path, *extra)
    assert not flower_started, "the simulation was started with a partition no client can train on"
    assert_one_line(res, "--clients")
    assert "--alpha" in res.stderr or "100" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


# -- 2. server-evaluation flags without --eval-data are silently ignored -------------------------------------------
@pytest.mark.parametrize("flag,value", [("--attack-coalition", "2"), ("--eval-every", "3"), ("--eval-max", "10")])
def test_evaluation_flags_without_eval_data_are_refused_by_name(tmp_path, flower_started, flag, value):
    """`--attack-coalition k` is scored on the evaluation data: run_server skips the whole measurement when there is
    none (`if history is not None and history.items and evals`), so the run completes, the summary has no attack_*
    key and the CLI prints nothing about it. --eval-every and --eval-max likewise do nothing without --eval-data
    (`slimtune train` refuses both there: 'eval-every-without-eval' in test_bad_input_table). A flag that does not
    apply must be refused by name."""
    res = federate(tmp_path, flag, value)
    assert not flower_started, f"{flag} {value} without --eval-data reached Flower"
    assert_one_line(res, flag)


# -- 3. --upload-bits in --mode zo-seeds is silently ignored ------------------------------------------------------
def test_upload_bits_in_zo_seeds_mode_is_refused_by_name(tmp_path, flower_started):
    """A zo-seeds client uploads (seed, scalar) pairs (client_app._local_round returns before encode_state and
    replies.check_reply's zo-seeds branch never reads upload_bits), so `--mode zo-seeds --upload-bits 4` (the user
    believes the uploads are 4-bit) trains exactly as without it; the summary even records `bits`/`upload_bits` as
    chosen. FederateSettings.upload_bits has no `applies` condition."""
    res = federate(tmp_path, "--mode", "zo-seeds", "--upload-bits", "4")
    assert not flower_started, "--upload-bits 4 was accepted for (seed, scalar) uploads"
    assert_one_line(res, "--upload-bits")


# -- 4. a node's privacy floor accepts values outside their range, and then holds nothing --------------------------
@pytest.mark.parametrize("node", [{"local-dp-noise": -2.0}, {"local-dp-delta": 1e5}],
                         ids=["negative-noise", "delta-above-1"])
def test_a_node_privacy_floor_out_of_range_is_refused(demo_paths, node):
    """check_node_floor checks a floor value's type, never its range: `local-dp-noise=-2` (a typo for 2) is met by
    every round (server noise >= -2), `local-dp-delta=1e5` (a typo for 1e-5) by every delta, so the node trains at
    whatever the server sends while its operator believes it is pinned. `local-dp-epsilon` is range-checked (> 0);
    noise must be > 0 and delta in (0, 1) as for --local-dp-noise / --local-dp-delta."""
    from slimtune.federated.client_app import check_node_floor
    cfg = make_cfg(demo_paths, local_optimizer="dp-adamw")
    key = next(iter(node))
    with pytest.raises(SlimtuneError, match=key):
        check_node_floor(cfg, node, None)


# -- 5. partition-id / num-partitions are used unchecked ----------------------------------------------------------
@pytest.mark.parametrize("node", [{"partition-id": 5, "num-partitions": 2}, {"partition-id": -1, "num-partitions": 2},
                                  {"partition-id": 0, "num-partitions": 0}],
                         ids=["id-past-the-partitions", "negative-id", "zero-partitions"])
def test_bad_partition_keys_of_a_node_are_one_line_errors(demo_paths, task_identity, node):  # noqa: F811
    """NODE_KEYS are skipped by check_node_floor and read raw in client_app.train: partition-id 5 of 2 ends in
    `IndexError: list index out of range` (sent to the server as the error text); partition-id -1 silently trains on
    the last partition (another node's share, Python's negative index); num-partitions=0 is silently replaced by the
    server's num-clients (`num_partitions or cfg.num_clients`). Each should be one line naming the key."""
    from flwr.app import Context, RecordDict

    from test_federated_review_11 import _node_round
    cfg = make_cfg(demo_paths)
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    with pytest.raises(SlimtuneError, match="partition"):
        _node_round(cfg, None, node, context)


# -- 6. a server settings file naming one setting twice keeps one silently -----------------------------------------
@pytest.mark.parametrize("name,text", [
    ("rounds.toml", "rounds = 10\nnum-server-rounds = 3\n"),
    ("out.json", json.dumps({"out-dir": "/srv/runs/a", "out_dir": "/srv/runs/b"})),
])
def test_a_server_settings_file_that_sets_one_setting_twice_is_refused(tmp_path, name, text):
    """read_settings maps `num-server-rounds` and `rounds`, `out-dir` and `out_dir` to one field and keeps the last
    without a word: `rounds = 10` above a later `num-server-rounds = 3` (an operator's edit on top of the documented
    example) runs 3 rounds; the run lands in /srv/runs/b. (TOML and JSON refuse a key given twice; these are two
    spellings of one.)"""
    from slimtune.federated.config import read_settings
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SlimtuneError, match="twice|both|more than once"):
        read_settings(path)


# -- 7. the deployment script splits its data file by lines, not rows ---------------------------------------------
def _rows(source: Path) -> list[str]:
    from slimtune.data.readers import read_rows
    return [json.dumps(row, sort_keys=True) for _, row in read_rows(str(source))[0]]


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_deployment_shards_hold_every_row_of_the_file_exactly_once(tmp_path, suffix):
    """deployment.shard takes the first line as a header and splits the rest by lines: for a JSONL file (a supported
    --data format; it has no header) the first record is copied into every node's shard, so every node trains on it
    and the federation sees it N times; for a CSV with a quoted newline in a field (valid CSV, read fine by
    check_run) the row is cut in two and the shards hold an unterminated quote, found by the nodes after Flower
    started."""
    from slimtune.federated.deployment import shard
    source = tmp_path / f"train.{suffix}"
    if suffix == "jsonl":
        source.write_text("".join(json.dumps({"sentence": f"film {i} was {'good' if i % 2 else 'bad'}",
                                              "label": i % 2}) + "\n" for i in range(6)))
    else:
        source.write_text('sentence,label\n"a long\nreview",1\nbad one,0\ngood one,1\nmeh,0\n')
    work = tmp_path / "work"
    work.mkdir()
    shards = [row for path in shard(source, 2, work) for row in _rows(path)]
    assert sorted(shards) == sorted(_rows(source))


def test_deployment_refuses_data_it_cannot_shard_before_the_superlink_starts(tmp_path, monkeypatch, capsys):
    """`--data hf:DIR` (a saved dataset, accepted by --data everywhere and by deployment_config's check_run) reaches
    run(), which starts the SuperLink and then shard() does Path('hf:DIR').read_text(): FileNotFoundError, a
    traceback after Flower's processes started (exit 1), instead of one line and exit 2 before any work."""
    datasets = pytest.importorskip("datasets")
    import slimtune.federated.deployment as deployment

    saved = tmp_path / "hfds"
    datasets.Dataset.from_list([{"sentence": f"film {i} was {'good' if i % 2 else 'bad'}", "label": i % 2}
                                for i in range(8)]).save_to_disk(str(saved))
    started = []

    class Recorder:  # LocalFederation without processes: records what would have started
        def __init__(self, work, cfg, insecure=False):
            started.append("federation")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def start_superlink(self):
            started.append("superlink")

        def add_node(self, name, node_config, **kw):
            started.append(name)

        def submit(self, timeout):
            raise AssertionError("submitted")

    monkeypatch.setattr(deployment, "LocalFederation", Recorder)
    monkeypatch.setattr(deployment.tempfile, "mkdtemp", lambda prefix="": str(tmp_path / "work"))
    (tmp_path / "work").mkdir()
    monkeypatch.setattr(sys, "argv", ["deployment", "--nodes", "2", "--data", f"hf:{saved}", "--rounds", "1",
                                      "--out", str(tmp_path / "dout")])
    capsys.readouterr()  # drop the setup's own output (save_to_disk's progress bar): only main()'s is judged
    with pytest.raises(SystemExit) as exited:
        deployment.main()
    assert exited.value.code == 2
    assert "superlink" not in started, started
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and "hf:" in err[0], err

"""Issue 35, item 3: one code path for `slimtune federate` (simulation), `flwr run .` and the deployment script: the
same checks and exit codes, no run overwritten, nodes that draw their own seeds, clients that get only what training
needs."""

import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from test_federated import InProcessGrid, make_cfg, task_identity  # noqa: F401 (fixture)
from slimtune import SlimtuneError
from slimtune.federated.config import SERVER_ONLY, FederatedConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kw, needle", [({"aggregation": "FFA"}, "--aggregation"), ({"bits": 9}, "--bits"),
                                        ({"mode": "seeds"}, "--mode"), ({"data": "/nonexistent.tsv"}, "nonexistent")])
def test_run_server_refuses_bad_settings_before_any_work(demo_paths, tmp_path, kw, needle):
    """`flwr run .` skipped the CLI's checks: aggregation='FFA' silently trained A."""
    from slimtune.federated.server_app import run_server
    out = tmp_path / "run"
    with pytest.raises(SlimtuneError, match=needle):
        run_server(InProcessGrid(3), make_cfg(demo_paths, out_dir=str(out), **kw))
    assert not out.exists()


def test_simulate_runs_the_same_checks_before_starting_anything(demo_paths, tmp_path, monkeypatch):
    import flwr.simulation
    from slimtune.federated.simulation import simulate
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: pytest.fail("started a simulation"))
    with pytest.raises(SlimtuneError, match="--aggregation"):
        simulate(make_cfg(demo_paths, aggregation="FFA", out_dir=str(tmp_path / "run")))


def test_a_second_run_never_overwrites_the_first(demo_paths, tmp_path):
    """A second `flwr run .` deleted the previous run's metrics and would have overwritten its adapter."""
    from slimtune.federated.server_app import run_server
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"round": 0}\n')
    with pytest.raises(SlimtuneError, match="already holds"):
        run_server(InProcessGrid(3), make_cfg(demo_paths, out_dir=str(out)))
    assert (out / "metrics.jsonl").read_text() == '{"round": 0}\n' and (out / "adapter").is_dir()


def client_visible(key: str) -> bool:
    name = "rounds" if key == "num-server-rounds" else key.replace("-", "_")
    return name not in SERVER_ONLY


def test_the_app_run_config_holds_only_what_clients_may_see():
    """Every ClientApp's Context.run_config is the app's [tool.flwr.app.config] fused with --run-config: it held the
    output path, the evaluation data, the rounds and the timeouts."""
    from flwr.common.config import get_fused_config_from_dir
    seen_by_clients = get_fused_config_from_dir(ROOT, {})
    assert seen_by_clients and all(client_visible(k) for k in seen_by_clients), sorted(seen_by_clients)
    assert FederatedConfig.from_flower(seen_by_clients, settings=None).num_clients == 2  # Flower's local federation


def test_server_settings_come_from_the_server_side_file_only(tmp_path):
    with pytest.raises(SlimtuneError, match="'out-dir' is a server setting"):
        FederatedConfig.from_flower({"out-dir": "/srv/run", "model": "tiny-llama"}, settings=None)
    with pytest.raises(SlimtuneError, match="num-server-rounds"):
        FederatedConfig.from_flower({"num-server-rounds": 5}, settings=None)
    with pytest.raises(SlimtuneError, match="'nope'"):
        FederatedConfig.from_flower({"nope": 1}, settings=None)
    path = tmp_path / "server.toml"
    path.write_text('out-dir = "/srv/run"\nnum-server-rounds = 7\neval-data = "dev.tsv"\nround-timeout = 60.0\n')
    cfg = FederatedConfig.from_flower({"model": "tiny-llama", "lr": 0.01}, settings=path)
    assert (cfg.out_dir, cfg.rounds, cfg.eval_data, cfg.round_timeout, cfg.lr) == ("/srv/run", 7, "dev.tsv", 60.0,
                                                                                  0.01)
    path.write_text('rounds = "many"\n')
    with pytest.raises(SlimtuneError, match=f"{path.name}.*rounds"):
        FederatedConfig.from_flower({}, settings=path)


def _seeds_of_a_node(demo_paths, node_id, node_config, own_file):
    from slimtune.federated.client_app import train
    from slimtune.federated.model import build_model, lora_state
    from slimtune.federated.wire import encode_state
    cfg = make_cfg(demo_paths, mode="zo-seeds", bits=8, local_steps=2, local_optimizer="mezo")
    payload, _ = encode_state(lora_state(build_model(cfg)[0]), 8, cfg.block_size)
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()}),
                          "config": ConfigRecord({"server-round": 1, "slimtune-config": cfg.client_json()})})
    msg = Message(content, dst_node_id=node_id, message_type="train")
    context = Context(run_id=1, node_id=node_id, node_config={"data-path": str(own_file), **node_config},
                      state=RecordDict(), run_config={})
    return train(msg, context).content["arrays"]["seeds"].numpy().tolist()


def test_deployment_nodes_draw_their_own_seeds(demo_paths, tmp_path):
    """Every deployment node trained as partition 0, so all nodes drew identical ZO seeds."""
    own = tmp_path / "node.tsv"
    own.write_text("\n".join(open(demo_paths[0]).read().splitlines()[:21]) + "\n")
    by_partition = [_seeds_of_a_node(demo_paths, 7, {"partition-id": k}, own) for k in (0, 1)]
    by_node_id = [_seeds_of_a_node(demo_paths, node, {}, own) for node in (7, 8)]
    assert by_partition[0] != by_partition[1] and by_node_id[0] != by_node_id[1]


def test_the_deployment_script_exits_2_on_bad_input_without_touching_a_previous_run(tmp_path, monkeypatch, capsys):
    from slimtune.federated import deployment
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    monkeypatch.setattr(deployment, "run", lambda *a, **k: pytest.fail("started a deployment"))
    for argv in (["--out", str(out)], ["--out", str(tmp_path / "new"), "--nodes", "0"]):
        monkeypatch.setattr(sys, "argv", ["deployment", *argv])
        with pytest.raises(SystemExit) as exit_info:
            deployment.main()
        assert exit_info.value.code == 2, argv
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert (out / "summary.json").read_text() == "{}"


def test_eval_every_scores_round_zero_every_kth_and_the_last_five():
    from slimtune.federated import FederatedConfig
    cfg = FederatedConfig(rounds=30, eval_every=5)
    assert [r for r in range(31) if cfg.evaluates(r)] == [0, 5, 10, 15, 20, 25, 26, 27, 28, 29, 30]
    assert all(FederatedConfig(rounds=7).evaluates(r) for r in range(8))  # default: every round

"""Issue 14: client sampling per round and the model-IP attacks (what colluding clients rebuild of theta)."""

import json

import pytest
import torch

from test_federated import InProcessGrid, task_identity  # noqa: F401 (fixture: messages outside a Flower runtime)
from slimtune import SlimtuneError
from slimtune.federated import FederatedConfig, dirichlet_partition
from slimtune.federated.attacks import BroadcastHistory, coalition_data, coalition_finetune, recovered
from slimtune.federated.model import build_model, build_model_and_split, lora_state
from slimtune.federated.wire import decode_state, encode_state


def make_cfg(demo_paths, **kw):
    train_path, dev_path = demo_paths
    return FederatedConfig(**{"data": train_path, "eval_data": dev_path, "num_clients": 3, "local_steps": 2, "lr": 1e-2,
                              **kw})


def received(state, bits=2, block=64):
    arrays, _ = encode_state(state, bits, block)
    return decode_state(arrays, {k: tuple(v.shape) for k, v in state.items()}, bits, block)


def test_history_keeps_the_last_window_and_averages_it():
    history = BroadcastHistory(window=2)
    for value in (1.0, 2.0, 4.0):
        history.add({"w": torch.full((3,), value)})
    assert len(history.items) == 2
    assert torch.equal(history.mean()["w"], torch.full((3,), 3.0))  # (2 + 4) / 2: round 1 dropped
    with pytest.raises(ValueError):
        BroadcastHistory(window=2).mean()


def test_deterministic_quantizer_gives_averaging_nothing_while_theta_stays_within_a_step():
    """Q is a fixed function of theta: broadcasts of a theta that moves less than a quantization step are identical,
    so their mean is Q(theta_T) and the multi-round attack learns nothing more; crossing level boundaries is what
    lets averaging beat a single broadcast."""
    g = torch.Generator().manual_seed(0)
    theta = {"w": torch.randn(4096, generator=g)}
    history = BroadcastHistory(window=8)
    for t in range(8):
        history.add(received({"w": theta["w"] + 1e-6 * t}))
    assert torch.allclose(history.mean()["w"], history.items[-1]["w"], rtol=0, atol=1e-5)
    # theta drifting by a full step per round dithers the rounding: the mean is closer to the mean theta
    history = BroadcastHistory(window=8)
    drifts = [theta["w"] + 0.1 * t for t in range(8)]
    for d in drifts:
        history.add(received({"w": d}))
    target = torch.stack(drifts).mean(0)
    assert (history.mean()["w"] - target).norm() < (history.items[-1]["w"] - drifts[-1]).norm()


def test_coalition_pools_exactly_its_clients_data(demo_paths):
    cfg = make_cfg(demo_paths, attack_coalition=2)
    _, _, train, _, _, split = build_model_and_split(cfg)
    parts = dirichlet_partition([e.label for e in train], [" ".join(e.prompt.casefold().split()) for e in train], 3,
                                cfg.dirichlet_alpha, cfg.seed, num_labels=2)
    pooled = coalition_data(cfg, train, split)
    assert len(pooled) == len(parts[0]) + len(parts[1]) < len(train)
    assert [e.prompt for e in pooled] == [train[i].prompt for i in parts[0] + parts[1]]


def test_coalition_finetune_moves_the_received_model_toward_its_data(demo_paths):
    cfg = make_cfg(demo_paths, attack_coalition=3, bits=2, lr=3e-2, batch_size=8)
    model, _, train, _, objective, split = build_model_and_split(cfg)
    start = received(lora_state(model))
    examples = coalition_data(cfg, train, split)[:16]

    def loss(state):
        from slimtune.federated.model import load_lora_state
        load_lora_state(model, state)
        with torch.no_grad():
            return objective.losses(model, objective.encode(examples, cfg.max_length)).mean().item()

    before = loss(start)
    attacked = coalition_finetune(model, objective, start, examples, cfg, steps=10, seed=1)
    assert any(not torch.equal(attacked[k], start[k]) for k in start)
    assert loss(attacked) < before
    with pytest.raises(ValueError):
        coalition_finetune(model, objective, start, [], cfg, steps=1, seed=1)


def test_recovered_fraction():
    assert recovered(0.8, 0.6, 1.0) == pytest.approx(0.5)
    assert recovered(0.6, 0.6, 0.6) is None and recovered(None, 0.5, 0.7) is None


@pytest.mark.parametrize("kw, needle", [({"clients_per_round": 4}, "--clients-per-round"),
                                        ({"clients_per_round": 2, "client_dp_clip": 1.0}, "every client"),
                                        ({"attack_coalition": 5}, "--attack-coalition"),
                                        ({"attack_window": 0}, "--attack-window"),
                                        ({"attack_coalition": 1, "mode": "zo-seeds"}, "zo-seeds")])
def test_bad_sampling_and_attack_settings_are_refused(demo_paths, kw, needle):
    with pytest.raises(SlimtuneError, match=needle):
        make_cfg(demo_paths, **kw).validate()


def test_attack_and_sampling_settings_stay_on_the_server(demo_paths):
    from slimtune.federated.config import SERVER_ONLY
    cfg = make_cfg(demo_paths, clients_per_round=2, attack_coalition=1)
    sent = json.loads(cfg.client_json())
    assert {"clients_per_round", "attack_coalition", "attack_window"} <= set(SERVER_ONLY)
    assert not {"clients_per_round", "attack_coalition", "attack_window"} & set(sent)



def test_dither_is_bounded_secret_and_fixed_across_rounds(demo_paths):
    from slimtune.federated.quantization import dequantize, max_gap, quantize
    from slimtune.federated.strategy import FedLPP

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64 * 8, generator=g)
    u = (torch.rand(x.shape, generator=g) - 0.5) * max_gap(2)
    plain, dithered = dequantize(quantize(x, 2)), dequantize(quantize(x, 2, dither=u))
    absmax = x.view(-1, 64).abs().amax(1).repeat_interleave(64)
    assert not torch.equal(plain, dithered)
    scale = absmax * (1 + 2.0 ** -2)  # the block scale: absmax rounded up to 2 significant bits (coarse_scales)
    assert bool(((dithered - x).abs() <= scale * max_gap(2) * 1.002 + 1e-6).all())  # gap/2 rounding + gap/2 dither
    assert (dithered - x).pow(2).mean() > (plain - x).pow(2).mean()  # the client's copy is further from theta

    cfg = make_cfg(demo_paths, bits=2, dither=1.0)
    theta = {"l.lora_A.weight": torch.randn(4, 64, generator=g), "l.lora_B.weight": torch.randn(64, 4, generator=g)}
    first, second = FedLPP(cfg, theta), FedLPP(cfg, theta)
    view = first.client_view()
    assert any(not torch.equal(view[k], second.client_view()[k]) for k in theta)  # secret: not from the config
    first._encoded = None  # re-encode the same theta in a later round: the same dither, the same broadcast
    assert all(torch.equal(view[k], first.client_view()[k]) for k in theta)
    plain_view = FedLPP(make_cfg(demo_paths, bits=2), theta).client_view()
    err = lambda v: sum((v[k] - theta[k]).pow(2).sum() for k in theta)
    assert err(view) > err(plain_view)


def test_a_fixed_dither_survives_multi_round_averaging():
    """theta drifting across level boundaries dithers a deterministic quantizer and lets the mean of the broadcasts
    approach the mean theta; a fixed secret dither is a bias the mean keeps."""
    from slimtune.federated.quantization import dequantize, max_gap, quantize

    g = torch.Generator().manual_seed(2)
    base = torch.randn(4096, generator=g)
    u = (torch.rand(base.shape, generator=g) - 0.5) * max_gap(2)
    drifts = [base + 0.05 * t * torch.randn(4096, generator=g) for t in range(10)]
    target = torch.stack(drifts).mean(0)
    plain = torch.stack([dequantize(quantize(d, 2)) for d in drifts]).mean(0)
    dithered = torch.stack([dequantize(quantize(d, 2, dither=u)) for d in drifts]).mean(0)
    assert (dithered - target).norm() > 1.2 * (plain - target).norm()


@pytest.mark.parametrize("kw", [{"dither": 3.0}, {"dither": -0.1}, {"dither": 1.0, "bits": 32}])
def test_bad_dither_is_refused(demo_paths, kw):
    with pytest.raises(SlimtuneError, match="--dither"):
        make_cfg(demo_paths, **kw).validate()


# -- issue 35, item 7: hostile-client rows of benchmarks/federated_attacks.py (tiny model, in-process grid) ----------
def _dev_subset(demo_paths, tmp_path, rows=24):
    lines = open(demo_paths[1]).read().splitlines()
    path = tmp_path / "dev.tsv"
    path.write_text("\n".join(lines[:rows + 1]) + "\n")
    return path


def test_hostile_rows_run_every_attack_and_render_a_verdict(demo_paths, tmp_path, monkeypatch):
    import argparse
    from pathlib import Path

    from slimtune.federated.hostile import ATTACKS, hostile_train
    from slimtune.federated.server_app import run_server
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import federated_attacks as bench

    def in_process(cfg, attack, hostile):
        return run_server(InProcessGrid(cfg.num_clients, hostile_train(attack, hostile) if attack else None), cfg)

    args = argparse.Namespace(hostile=list(ATTACKS), hostile_clients=[1, 2], clients=4, clients_per_round=0,
                              rounds=2, local_steps=2, lr=1e-2, hostile_out=tmp_path / "hostile", robust="none")
    results = bench.run_hostile(args, Path(demo_paths[0]), _dev_subset(demo_paths, tmp_path), model="tiny-llama",
                                runner=in_process)
    assert set(results) == {"honest", "honest-zo-seeds"} | {f"{a}-{k}of4" for a in ATTACKS for k in (1, 2)}
    assert results["inf-scalar-2of4"]["accepted_updates"] == 2 * 2  # the two hostile replies refused each round
    assert sum(m.get("rejected", 0) for m in results["inf-scalar-2of4"]["round_metrics"]) == 2 * 2
    assert results["norm-999-1of4"]["accepted_updates"] == 4 * 2  # accepted, clipped to the round's bound
    table = bench.hostile_table(json.loads((tmp_path / "hostile.json").read_text()))
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert table.count("| reference |") == 2 and len(rows) == 2 + len(results)
    assert all(("met" in line or "missed" in line) for line in rows[2:] if "reference" not in line)
    # --robust median: its own rows, each compared with the all-honest run under the same aggregation
    args.hostile, args.hostile_clients, args.robust = ["sign-flip"], [1], "median"
    results = bench.run_hostile(args, Path(demo_paths[0]), _dev_subset(demo_paths, tmp_path), model="tiny-llama",
                                runner=in_process)
    assert {"honest-median", "sign-flip-1of4-median"} <= set(results)
    assert results["sign-flip-1of4-median"]["setup"]["reference"] == "honest-median"
    assert results["sign-flip-1of4-median"]["robust"] == results["honest-median"]["robust"] == "median"
    assert results["honest"]["robust"] == "none"
    # --skip-references: only the attack rows (the reference runs in another process)
    args.robust, args.skip_references = "direction", True
    results = bench.run_hostile(args, Path(demo_paths[0]), _dev_subset(demo_paths, tmp_path), model="tiny-llama",
                                runner=in_process)
    assert "sign-flip-1of4-direction" in results and "honest-direction" not in results
    # what the table says is not run yet: rows under the rule the default gives each mode (direction for LoRA
    # attacks, the mean for zo-seeds), so inf-scalar's mean rows count and the median rows do not
    from slimtune.federated.hostile import LORA_ATTACKS
    missing = {name for name, *_ in bench.missing_default_rows(results)}
    assert missing == {f"{a}-{k}of4-direction" for a in LORA_ATTACKS for k in (1, 2)} - {"sign-flip-1of4-direction"}
    assert "sign-flip-2of4-direction" in bench.hostile_table(results)
    # --rescore-full-dev: the saved final theta scored again by `slimtune eval` (one row, a subprocess)
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps({"honest": results["honest"]}))
    dev = _dev_subset(demo_paths, tmp_path)
    rescored = bench.rescore_full_dev(path, tmp_path / "hostile", dev, threads=1, model="tiny-llama")
    assert rescored["honest"]["full_dev"]["examples"] == len(dev.read_text().splitlines()) - 1
    assert rescored["honest"]["full_dev"]["accuracy"] == pytest.approx(results["honest"]["final_accuracy"])


def _row(attack, k, acc, full=None, reference="honest-direction"):
    return {"setup": {"attack": attack, "hostile_clients": k, "clients": 8, "robust": "direction",
                      "reference": reference},
            "final_accuracy": acc, "rounds": 30, "accepted_updates": 120, "round_metrics": [{"round": 30,
                                                                                             "server_accuracy": acc}],
            **({"full_dev": {"accuracy": full, "examples": 872}} if full is not None else {})}


def test_hostile_verdict_reads_the_full_dev_set_when_both_runs_were_rescored(tmp_path, monkeypatch):
    """The runs score 200 dev rows (one standard error ~2.5 points); where a row and its all-honest reference were
    both rescored on the whole dev set, the verdict reads that, and says so; otherwise the 200 rows, and says so."""
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import federated_attacks as bench
    results = {"honest-direction": _row(None, 0, 0.90, 0.88),
               "sign-flip-1of8-direction": _row("sign-flip", 1, 0.855, 0.87),  # 200: -4.5 missed; full: -1.0 met
               "norm-999-1of8-direction": _row("norm-999", 1, 0.89, 0.84),  # 200: -1.0 met; full: -4.0 missed
               "size-lie-1of8-direction": _row("size-lie", 1, 0.86)}  # not rescored: the 200 rows judge it
    lines = {line.split(" (")[0].strip("| "): line for line in bench.hostile_table(results).splitlines()
             if line.startswith("| ")}
    assert "met (full dev)" in lines["sign-flip-1of8-direction"] and "-4.5 pts" in lines["sign-flip-1of8-direction"]
    assert "**missed** (-4.0 pts, full dev)" in lines["norm-999-1of8-direction"]
    assert "**missed** (-4.0 pts, 200 dev)" in lines["size-lie-1of8-direction"]
    gap, on = bench.judged_gap(results["sign-flip-1of8-direction"], results["honest-direction"])  # targets.py's too
    assert on == "full dev" and gap == pytest.approx(-1.0)

    calls = []

    def fake(adapter, dev):
        calls.append(adapter.parent.name)
        return 0.5, 872

    for name in results:
        (tmp_path / "rows" / name / ("adapter" if name != "size-lie-1of8-direction" else "nothing")).mkdir(parents=True)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(results))
    out = bench.rescore_full_dev(path, tmp_path / "rows", tmp_path / "dev.tsv", threads=1, evaluate=fake)
    assert calls == []  # every row with an adapter was rescored already; the one without has no adapter
    del results["honest-direction"]["full_dev"]
    path.write_text(json.dumps(results))
    out = bench.rescore_full_dev(path, tmp_path / "rows", tmp_path / "dev.tsv", threads=1, evaluate=fake)
    assert calls == ["honest-direction"] and out["honest-direction"]["full_dev"]["accuracy"] == 0.5
    assert out["sign-flip-1of8-direction"]["full_dev"]["accuracy"] == 0.87  # kept


@pytest.mark.slow
def test_a_hostile_client_runs_in_flowers_simulation(demo_paths, tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, None)  # the simulation runtime sets its own
    from slimtune.federated import simulate
    from slimtune.federated.hostile import hostile_app
    cfg = make_cfg(demo_paths, eval_data=str(_dev_subset(demo_paths, tmp_path)), bits=4, rounds=2,
                   out_dir=str(tmp_path / "run"))
    summary = simulate(cfg, client_app=hostile_app("norm-999", {0}, cfg.data))
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["accepted_updates"] == 6 and all(r["update_bound"] < 999 for r in rounds[1:])


def test_robust_rules_model_keeps_what_each_rule_promises(monkeypatch):
    """benchmarks/robust_rules.py (the synthetic federation behind the hostile rows' discussion): with the task's pull
    twice the label skew's, the direction filters keep no flipped reply and every honest one, the mean keeps every
    flipped reply, and an all-honest round's progress is 30 tau for the mean."""
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import robust_rules as bench
    monkeypatch.setattr(bench, "TAUS", (2.0,))
    rows = bench.measure(trials=2)["rows"]
    for rule in ("direction", "direction-loo"):
        assert rows[f"tau2-1of8-{rule}"]["flipped_kept"] == 0 and rows[f"tau2-1of8-{rule}"]["honest_kept"] == 1
    assert rows["tau2-1of8-mean"]["flipped_kept"] == 1
    assert abs(rows["tau2-0of8-mean"]["progress"] - 60) < 1
    assert rows["tau2-1of8-direction"]["progress"] > rows["tau2-1of8-mean"]["progress"]
    # trust (FLTrust): the server's reference cannot be moved, so 2 flippers of 8 change nothing it does
    assert rows["tau2-2of8-trust"]["flipped_kept"] == 0 and rows["tau2-2of8-trust"]["honest_kept"] == 1
    assert rows["tau2-2of8-trust"]["progress"] > rows["tau2-2of8-direction"]["progress"]
    assert "| 2 | 1 of 8 | direction |" in bench.table({"trials": 2, "dim": 1, "clients": 8, "per_round": 4,
                                                          "rounds": 30, "rows": rows})


@pytest.mark.parametrize("private", ["dpzero", "dplozo", "dp-adamw", "dp-sgd", "dphizoo", "dphybrid"])
def test_the_coalition_attack_is_refused_beside_every_private_local_optimizer(demo_paths, private):
    """The coalition measurement fine-tunes, without DP, on the pooled rows of clients 0..k-1 and writes its scores and
    the number of those rows to summary.json: functions of individual training examples that no accountant covers.
    Beside a private local optimizer (any of the methods table's, dphizoo and dphybrid included) it is refused before
    any work, with one line naming --attack-coalition (review 64; it used to run, with the optimizer's non-private
    form)."""
    cfg = make_cfg(demo_paths, attack_coalition=2, bits=2, local_optimizer=private, batch_size=4)
    with pytest.raises(SlimtuneError, match="--attack-coalition 2 .*private run"):
        cfg.validate()
    make_cfg(demo_paths, attack_coalition=2, bits=2, batch_size=4).validate()  # the same run without DP measures

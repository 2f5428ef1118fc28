"""The benchmark scripts: they compile under the supported Python, and the logic that turns their runs into the
README's verdicts (targets met or not) says what the numbers say."""

from __future__ import annotations

import py_compile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_every_benchmark_compiles(script, tmp_path):
    py_compile.compile(str(BENCH / script), cfile=str(tmp_path / "x.pyc"), doraise=True)


def _run(steps, acc, fps=2, finished=True):
    return {"steps": steps, "accuracy": acc, "forward_passes": [s * fps for s in steps], "finished": finished,
            "forwards_to_target": next((s * fps for s, a in zip(steps, acc) if a >= 0.8), None)}


def test_pool_target_compares_equal_steps_and_waits_for_finished_runs():
    import zo_convergence as z

    gauss = _run([0, 250, 500], [0.5, 0.75, 0.80])
    pool = _run([0, 250, 500], [0.5, 0.70, 0.795])
    t = z.compare({"mezo-lora-gaussian": gauss, "mezo-lora-pool": pool})["mezo-lora-pool_vs_mezo-lora-gaussian"]
    assert t["common_steps"] == [250, 500] and t["gap_at_last_common_step"] == pytest.approx(-0.005)
    assert t["within_1_point"] is True
    pool_far = _run([0, 250, 500], [0.5, 0.75, 0.78])
    t = z.compare({"mezo-lora-gaussian": gauss, "mezo-lora-pool": pool_far})["mezo-lora-pool_vs_mezo-lora-gaussian"]
    assert t["within_1_point"] is False
    running = _run([0, 250], [0.5, 0.75], finished=False)
    t = z.compare({"mezo-lora-gaussian": gauss, "mezo-lora-pool": running})["mezo-lora-pool_vs_mezo-lora-gaussian"]
    assert t["within_1_point"] is None and t["common_steps"] == [250]  # no verdict on a run that has not finished


def test_fzoo_target_is_half_of_mezos_forward_passes():
    import zo_convergence as z

    mezo = _run([0, 250, 500, 750], [0.5, 0.7, 0.79, 0.81])  # 80% at 1,500 forward passes
    fast = _run([0, 56, 112], [0.5, 0.7, 0.82], fps=9)  # 80% at 1,008
    t = z.compare({"mezo-lora-gaussian": mezo, "fzoo-lora": fast})["fzoo-lora_vs_mezo-lora-gaussian"]
    assert t["forwards_to_target"] == [1008, 1500] and t["le_half"] is False
    faster = _run([0, 56], [0.5, 0.81], fps=9)  # 504 <= 750
    assert z.compare({"mezo-lora-gaussian": mezo, "fzoo-lora": faster})["fzoo-lora_vs_mezo-lora-gaussian"]["le_half"]
    never = _run([0, 56, 112], [0.5, 0.6, 0.7], fps=9)
    t = z.compare({"mezo-lora-gaussian": mezo, "fzoo-lora": never})["fzoo-lora_vs_mezo-lora-gaussian"]
    assert t["le_half"] is False and t["ratio"] is None


def test_fzoo_target_is_not_met_by_default_when_mezo_never_reaches_80():
    """MeZO + LoRA ends at 0.78 on SST-2 dev, so its forwards to 80% are unknown (> its 4,000): FZOO reaching 80% at
    3,000 forwards proves nothing (None, not met), at <= 2,000 it proves <= 0.5x. The comparison also reports the
    forwards to the highest 5-point level MeZO did reach (75%)."""
    import zo_convergence as z

    mezo = _run([0, 500, 1000, 1500, 2000], [0.5, 0.65, 0.757, 0.773, 0.781])  # 75% at 2,000 forwards
    late = _run([0, 111, 222, 333, 444], [0.5, 0.7, 0.76, 0.79, 0.81], fps=9)  # 80% at 3,996, 75% at 1,998
    t = z.compare({"mezo-lora-gaussian": mezo, "fzoo-lora": late})["fzoo-lora_vs_mezo-lora-gaussian"]
    assert t["forwards_to_target"] == [3996, None] and t["le_half"] is None
    assert t["reached_level"] == 0.75 and t["forwards_to_reached_level"] == [1998, 2000]
    assert t["ratio_at_reached_level"] == pytest.approx(0.999)
    assert t["ratio_at_reached_level_above"] is None
    assert t["gap_at_equal_forwards"] == pytest.approx([0.05, 0.003, 0.017, 0.029])
    slow = _run([0, 111, 222, 333, 444], [0.5, 0.6, 0.7, 0.74, 0.749], fps=9)  # never 75% in 3,996 forwards
    t = z.compare({"mezo-lora-gaussian": mezo, "fzoo-lora": slow})["fzoo-lora_vs_mezo-lora-gaussian"]
    assert t["forwards_to_reached_level"] == [None, 2000] and t["ratio_at_reached_level"] is None
    assert t["ratio_at_reached_level_above"] == pytest.approx(3996 / 2000)  # needed more than its whole budget
    early = _run([0, 111, 222], [0.5, 0.78, 0.81], fps=9)  # 80% at 1,998 <= 0.5 x 4,000
    assert z.compare({"mezo-lora-gaussian": mezo, "fzoo-lora": early})["fzoo-lora_vs_mezo-lora-gaussian"]["le_half"]


def test_zo_convergence_reads_a_run_that_is_still_going(tmp_path, monkeypatch):
    import json

    import zo_convergence as z

    monkeypatch.setattr(z, "run_dir", lambda name: tmp_path / name)
    (tmp_path / "fzoo-lora").mkdir()
    lines = [{"step": 0, "eval_accuracy": 0.5}, {"step": 1, "loss": 1.0, "step_time_s": 2.0},
             {"step": 56, "loss": 0.9, "step_time_s": 4.0, "eval_accuracy": 0.81},
             {"step": 56, "eval_accuracy": 0.81}]  # a resumed run may log an evaluation twice
    (tmp_path / "fzoo-lora" / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    c = z.curve("fzoo-lora")
    assert c["steps"] == [0, 56] and c["forward_passes"] == [0, 504] and c["forwards_to_target"] == 504
    assert c["finished"] is False and c["time_per_step_s"] == pytest.approx(3.0)
    assert z.curve("mezo-full-pool") is None


def test_federated_run_names_say_how_they_differ_from_the_first_run():
    import federated_attacks as f

    assert f.variant({"server_optimizer": "fedavgm", "server_lr": None, "server_momentum": 0.9,
                      "aggregation": "fedavg", "dither": 0.0}) == ""
    assert f.variant({"server_optimizer": "fedadam", "server_lr": 3e-3}) == "-fedadam-slr0.003"
    assert f.variant({"server_momentum": 0.5}) == "-m0.5"
    assert f.variant({"server_optimizer": "fedadam", "server_momentum": 0.5}) == "-fedadam"  # momentum: fedavgm's
    assert f.variant({"aggregation": "ffa", "dither": 2.0}) == "-ffa-dither2"
    assert f.variant({"server_optimizer": "fedadam", "server_lr": 3e-3, "server_average": 0.8}) == \
        "-fedadam-slr0.003-avg0.8"
    assert f.variant({"local_steps": 5, "lr": 2e-3}) == "-local5-lr0.002"
    assert f.variant({"local_steps": 3, "lr": 1e-3}) == ""
    assert len({f.variant(s) for s in ({}, {"server_momentum": 0.5}, {"aggregation": "ffa"}, {"dither": 1.0})}) == 4


def test_federated_runs_are_compared_with_a_centralized_run_of_their_own_total_steps_and_lr():
    import federated_attacks as f

    first = {"rounds": 30, "clients_per_round": 4, "local_steps": 3, "lr": 1e-3}
    assert f.central_name(first) == "centralized"
    assert f.central_name({**first, "local_steps": 5}) == "centralized-600steps-lr0.001"
    assert f.central_name({**first, "lr": 2e-3}) == "centralized-360steps-lr0.002"


def test_defaults_rows_still_running_show_their_progress_not_a_result(tmp_path):
    import defaults as d

    assert d.progress(tmp_path / "absent") == "not run yet"
    run_dir = tmp_path / "mezo-svfit"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "eval_accuracy": 0.516}\n{"step": 1, "loss": 0.7}\n'
                                           '{"step": 250, "loss": 0.6, "eval_accuracy": 0.659}\n{"step": 285}\n')
    assert d.progress(run_dir) == "unfinished: step 285, dev acc 0.659 at step 250"


def test_defaults_verdicts_follow_the_issue_targets_on_final_accuracy():
    import defaults as d

    row = lambda final, **kw: {"final_accuracy": final, "best_accuracy": final + 0.01, "saved_adapter": "best (step 9)",
                               "zero_shot_accuracy": 0.516, "trainable_params": 460_800, "epsilon": None, **kw}
    res = {"adamw-lora": row(0.859), "mezo-lora": row(0.830), "dpzero-lora-eps6": row(0.815, epsilon=5.99),
           "dpzero-lora-eps2": row(0.79, epsilon=2.3), "adamw-svfit": row(0.85, trainable_params=1680),
           "mezo-svfit": row(0.80, saved_adapter="last"), "lozo-full": row(0.50)}
    assert d.verdict("adamw-lora", res)[0] is False  # 0.859 < 0.88
    assert d.verdict("mezo-lora", res)[0] is True  # 0.830 >= 0.859 - 0.04
    assert d.verdict("dpzero-lora-eps6", res)[0] is True  # 0.815 >= 0.830 - 0.02, epsilon within budget
    assert d.verdict("dpzero-lora-eps2", res)[0] is False  # accuracy fine, epsilon 2.3 over its budget of 2
    assert d.verdict("adamw-svfit", res)[0] is True
    res["adamw-svfit"]["trainable_params"] = 460_800 // 5
    assert d.verdict("adamw-svfit", res)[0] is False  # only 5x fewer trainable values
    assert d.verdict("mezo-svfit", res)[0] is False  # the saved adapter is not the best one
    met, why = d.verdict("lozo-full", res)
    assert met is False and "below zero-shot" in why
    del res["mezo-lora"]
    assert d.verdict("dpzero-lora-eps6", res) == (None, "mezo-lora has not run")
    res["adamw-lora"]["prompt"] = ["Review: {sentence}\nSentiment:", "0=negative,1=positive"]  # rerun, new prompt
    met, why = d.verdict("adamw-svfit", res)  # its own row is of the earlier prompt: no verdict across prompts
    assert met is None and "new prompt" in why


def test_readme_tables_default_skips_hand_written_blocks_and_knows_every_generated_one():
    """`python benchmarks/readme_tables.py` with no names used to stop with a KeyError on the hand-written
    `results` block; by default it now renders exactly the marked blocks that tables.py generates."""
    import readme_tables
    import tables

    marked = [name for page in readme_tables.pages() for name in readme_tables.marked_tables(page.read_text())]
    assert "results" not in marked and "defaults" in marked and "zo-convergence" in marked and "targets" in marked
    assert set(marked) <= set(tables.TABLES)


def test_tables_refuses_an_unknown_name(monkeypatch):
    import sys

    import tables

    monkeypatch.setattr(sys, "argv", ["tables.py", "results"])
    with pytest.raises(SystemExit, match="unknown table results"):
        tables.main()


def test_federated_table_names_say_what_differs_from_fedavg():
    import federated_table as f

    assert f.run_suffix("fedavg", "fedavg", 0.0) == ""
    assert f.run_suffix("fedadam", "fedavg", 0.0) == "-fedadam"  # the names of the recorded runs stay valid
    assert f.run_suffix("fedadam", "ffa", 0.8) == "-fedadam-ffa-avg0.8"


def _e2e_row(bleu: float, peak: float | None = None) -> dict:
    return {"peak_mem_mb": peak, "steps": 10, "validation": {"bleu": bleu, "rougeL": 50.0, "loss": 1.5}}


def test_e2e_verdicts_follow_issue_12_targets():
    """AdamW BLEU >= 60; MeZO >= 0.75 x AdamW at <= 1.2 x the inference floor's peak memory (both must hold);
    DPZero >= 0.9 x MeZO; a row whose reference has not run gets no verdict."""
    import e2e_generation as e

    d = {"inference": {"peak_mem_mb": 1500.0}, "adamw-lora": _e2e_row(65.0, 5000.0),
         "mezo-lora": _e2e_row(49.0, 1790.0), "dpzero-lora-eps6": _e2e_row(44.0, 1800.0)}
    v = e.verdicts(d)
    assert v["adamw-lora"]["met"] and v["mezo-lora"]["met"] and not v["dpzero-lora-eps6"]["met"]  # 44 < 44.1
    assert v["mezo-lora"]["memory_ratio"] == pytest.approx(1790 / 1500)
    d["mezo-lora"] = _e2e_row(60.0, 1900.0)  # accurate enough, but 1.27x the floor
    assert e.verdicts(d)["mezo-lora"]["met"] is False
    del d["inference"]
    assert e.verdicts(d)["mezo-lora"]["met"] is None
    assert e.verdicts({"adamw-lora": _e2e_row(59.9)})["adamw-lora"]["met"] is False
    assert e.verdicts({"dpzero-lora-eps6": _e2e_row(40.0)})["dpzero-lora-eps6"]["met"] is None


def test_e2e_table_shows_the_memory_ratio_and_verdicts(monkeypatch):
    import tables

    d = {"inference": {"peak_mem_mb": 1500.0, "typical_batches_peak_mem_mb": 1300.0, "two_forwards_s": 8.0,
                       "batches": 20, "batch_size": 16, "worst_case_batch": "15 longest rows + the shortest prompt"},
         "zero-shot": {"validation": {"bleu": 12.5, "rougeL": 35.0, "loss": 2.4}},
         "adamw-lora": _e2e_row(65.0, 5000.0), "mezo-lora": _e2e_row(40.0, 1650.0)}
    monkeypatch.setattr(tables, "read_results", lambda name: d)
    text = tables.e2e_table()
    mezo = next(line for line in text.splitlines() if line.startswith("| mezo-lora"))
    assert "| 1.10 |" in mezo and "**no**" in mezo  # 40 < 0.75 x 65
    assert "| dpzero-lora-eps6 | - | - | not run yet |" in text and "peak 1,500 MB" in text
    assert "(1,300 MB over the typical batches alone)" in text  # the ratio divides by the worst case, not this


def test_federated_sweep_scores_the_last_rounds_and_never_round_zero():
    import federated_sweep as f

    metrics = [{"round": 0, "server_accuracy": 0.9}, {"round": 1, "server_accuracy": 0.6},
               {"round": 2, "server_accuracy": 0.8}, {"round": 3, "server_accuracy": 0.5},
               {"round": 4, "server_accuracy": 0.9}]
    s = f.score(metrics)
    assert s["accuracy"] == [0.6, 0.8, 0.5, 0.9] and s["final"] == 0.9
    assert s["mean_last"] == pytest.approx((0.8 + 0.5 + 0.9) / 3)
    assert f.score([{"round": 0, "server_accuracy": 0.5}])["mean_last"] is None


def test_federated_sweep_chooses_the_steadiest_good_candidate():
    import federated_sweep as f

    results = {"fedavgm-m0.9": {"final": 0.86, "mean_last": 0.70},  # a lucky last round of an oscillating run
               "fedadam-slr3e-3": {"final": 0.83, "mean_last": 0.82},
               "fedadam-slr1e-2": {"final": 0.84, "mean_last": 0.82},  # tie: the earlier-listed one wins
               "fedadam-slr1e-3": {"final": None, "mean_last": None}}  # not finished
    assert f.choose(results) == "fedadam-slr3e-3"
    assert f.choose({"x": {"mean_last": None}}) is None
    assert set(f.CANDIDATES["fedadam-slr3e-3-local5"]) <= set(f.BASE)  # every candidate changes known settings
    assert all(set(c) <= set(f.BASE) for c in f.CANDIDATES.values())


def test_zo_step_ratio_divides_by_the_forwards_timed_in_the_same_process(monkeypatch):
    """Issue 13's step-time targets use two forwards timed alternately in the step's own process, not the separate
    inference process (whose drift once put MeZO + LoRA anywhere in 0.98-1.21x)."""
    import tables
    import zo_step

    def row(step, floor, mem=1000.0, n=10):
        return {"step_time_s": step, "two_forwards_s": floor, "peak_mem_mb": mem, "trainable_params": n}

    results = {"inference": row(0.42, 0.42, n=0), "inference_lora": row(0.45, 0.45, n=0),
               "mezo-pool_full": row(0.50, 0.36), "lozo_full": row(0.44, 0.36), "mezo_lora": row(0.46, 0.45),
               "lozo_lora": row(0.46, 0.45), "mezo_full": row(2.0, 0.36)}
    ratios = zo_step.ratios_from(results)
    met = zo_step.targets_met(ratios)
    assert not met["lozo_full_le_1.2x_two_forwards"]  # 0.44 / 0.36 = 1.22, though 0.44 / 0.42 would pass
    assert met["mezo_full_pool_le_1.5x_two_forwards"] and met["mezo_lora_le_1.05x_two_forwards"]
    d = {"results": results, "ratios": ratios, "targets_met": met, "torch": "x", "threads": 2, "steps": 6}
    monkeypatch.setattr(tables, "read_results", lambda name: d)
    text = tables.zo_step_table()
    lozo = next(line for line in text.splitlines() if "`lozo`, full" in line)
    assert "| 1.22 | 1.05 |" in lozo and "lozo_full_le_1.2x_two_forwards: **not met**" in text


def test_wall_clock_to_80_is_compared_with_adamw_and_unknown_while_running():
    import zo_convergence as z

    def run(acc, seconds, finished=True):
        return {"accuracy": acc, "seconds": seconds, "finished": finished,
                "seconds_to_target": z.seconds_to({"accuracy": acc, "seconds": seconds}, 0.8)}

    adamw = run([0.5, 0.83, 0.88], [0.0, 220.0, 1700.0])
    fast = run([0.5, 0.7, 0.81], [0.0, 200.0, 400.0])  # 400 s <= 2 x 220 s
    slow = run([0.5, 0.7, 0.81], [0.0, 300.0, 600.0])
    never = run([0.5, 0.7, 0.78], [0.0, 300.0, 600.0])
    going = run([0.5, 0.7], [0.0, 300.0], finished=False)
    t = z.wall_clock({"adamw-lora": adamw, "hybrid-lora": fast, "hizoo-lora": slow, "mezo-lora-pool": never,
                      "sparse-mezo-full": going})
    assert t["hybrid-lora"]["ratio"] == pytest.approx(400 / 220) and t["hybrid-lora"]["le_2x"] is True
    assert t["hizoo-lora"]["le_2x"] is False and t["mezo-lora-pool"] == {
        "seconds_to_target": None, "reference_seconds": 220.0, "ratio": None, "le_2x": False}
    assert t["sparse-mezo-full"]["le_2x"] is None and "adamw-lora" not in t
    assert z.wall_clock({"hybrid-lora": fast})["hybrid-lora"]["le_2x"] is None  # no reference yet: no verdict


def test_scale_targets_read_the_rows_scale_py_writes(monkeypatch):
    """The 7B verdicts come from the rows benchmarks/scale.py writes (its refusal status is 'refused by the planner';
    a check for the bare word 'refused' once printed a met target as missed)."""
    import inspect

    import scale
    import targets

    assert '"status": "refused by the planner"' in inspect.getsource(scale.run_one)  # the status used below
    row = lambda method, **kw: {"arch": "llama", "size": "7b", "method": method, **kw}
    rows = {"a": row("inference-bf16", peak_rss_mb=13_305.0, measured_over_predicted=1.0),
            "b": row("mezo-full-bf16", peak_rss_mb=13_322.0, measured_over_predicted=1.0),
            "c": row("adamw-full", predicted_mb=104_815.0, status="refused by the planner"),
            "d": row("mezo-lora-int4", peak_rss_mb=4_608.0, step_over_two_forwards=1.0, measured_over_predicted=1.0)}
    monkeypatch.setattr(targets, "read_results", lambda name: {"rows": rows} if name == "scale.json" else None)
    verdicts = targets.scale_rows()
    cells = [r[-1] for r in verdicts]
    assert cells[0].startswith("met") and cells[1].startswith("met") and cells[2].startswith("met"), cells
    assert cells[3].startswith("met") and cells[4] == "not run yet", cells
    rows["c"]["predicted_mb"] = 20_000.0  # under 24 GB: the planner refusing it is not the target
    assert targets.scale_rows()[1][-1].startswith("**missed**")


def test_benchmark_private_runs_log_their_private_stats_once(tmp_path, monkeypatch):
    """A private run withholds its step times and memory; the benchmarks (public data) ask for them, once."""
    import launch
    calls = []
    monkeypatch.setattr(launch.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    launch.train_run(tmp_path / "a", tmp_path / "t.tsv", tmp_path / "d.tsv", ["--optimizer", "dpzero", "--epsilon", "6"], 1)
    launch.train_run(tmp_path / "b", tmp_path / "t.tsv", tmp_path / "d.tsv",
                     ["--optimizer", "dpzero", "--epsilon", "6", "--log-private-stats"], 1)
    launch.train_run(tmp_path / "c", tmp_path / "t.tsv", tmp_path / "d.tsv", ["--optimizer", "mezo"], 1)
    launch.train_run(tmp_path / "e", tmp_path / "t.tsv", tmp_path / "d.tsv", ["--optimizer", "dp-adamw"], 1)  # eps 6
    assert [c.count("--log-private-stats") for c in calls] == [1, 1, 0, 1]


def test_runs_of_different_prompts_are_never_compared():
    """SST-2's prompt changed (zero-shot 0.52 -> 0.78): a hybrid of the old prompt against AdamW of the new one, or
    the pool against Gaussian z across prompts, would credit the prompt to the method."""
    import zo_convergence as z
    new = ["Review: {sentence}\nSentiment:", "0=negative,1=positive"]

    def run(acc, seconds, prompt=None):
        return {"accuracy": acc, "seconds": seconds, "finished": True, "steps": [0, 250, 500], "prompt": prompt}

    adamw = run([0.78, 0.85, 0.88], [0.0, 220.0, 1700.0], new)
    old_hybrid = run([0.52, 0.81, 0.86], [0.0, 300.0, 600.0])
    new_hybrid = run([0.78, 0.86, 0.87], [0.0, 300.0, 600.0], new)
    t = z.wall_clock({"adamw-lora": adamw, "hybrid-lora": old_hybrid})
    assert t == {}
    t = z.wall_clock({"adamw-lora": adamw, "hybrid-lora": new_hybrid}, 0.85)
    assert t["hybrid-lora"]["ratio"] == pytest.approx(300 / 220)
    pool, gaussian = run([0.78, 0.8, 0.82], [0, 1, 2], new), run([0.52, 0.6, 0.7], [0, 1, 2])
    assert "mezo-lora-pool_vs_mezo-lora-gaussian" not in z.compare({"mezo-lora-pool": pool,
                                                                   "mezo-lora-gaussian": gaussian})

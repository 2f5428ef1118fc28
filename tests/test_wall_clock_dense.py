"""Issue 36's wall-clock target from the dense pair (benchmarks/zo_convergence.DENSE): AdamW + LoRA and the hybrid
again, evaluated every 2 steps, stopped at their first evaluation at 80%. Their bounds decide the verdict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
PROMPT = ["Review: {sentence}\nSentiment:", "0=negative,1=positive"]


@pytest.fixture(autouse=True)
def bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def _run(steps, acc, step_s, finished=False):
    return {"steps": steps, "accuracy": acc, "seconds": [s * step_s for s in steps], "finished": finished,
            "time_per_step_s": step_s, "prompt": PROMPT}


def _settings(tmp_path, monkeypatch, a=1, b=1):
    import zo_convergence as z
    monkeypatch.setattr(z, "OUT", tmp_path)
    (tmp_path / "dense_settings.json").write_text(json.dumps({
        "hybrid-lora-dense": {"threads": a, "device": "cpu"}, "adamw-lora-dense": {"threads": b, "device": "cpu"}}))
    return z


def test_dense_pair_decides_the_ratio_from_bounds_two_steps_apart(tmp_path, monkeypatch):
    z = _settings(tmp_path, monkeypatch)
    adamw = _run([0, 2, 4, 6, 8, 10], [0.78, 0.78, 0.79, 0.79, 0.79, 0.81], 3.0)  # 80% in (8, 10] steps
    hybrid = _run([0, 2, 4, 6, 8, 10, 12, 14], [0.78] * 7 + [0.80], 3.0)  # in (12, 14]
    c = z.dense_clock({"adamw-lora-dense": adamw, "hybrid-lora-dense": hybrid})["hybrid-lora-dense"]
    assert c["steps_to_target"] == [14, 10] and c["ratio"] == pytest.approx(1.4)
    assert c["ratio_bounds"] == pytest.approx([36 / 30, 42 / 24]) and c["le_2x"] is True
    slow = _run(list(range(0, 32, 2)), [0.78] * 15 + [0.80], 3.0)  # 80% in (28, 30]: at least 28/10
    c = z.dense_clock({"adamw-lora-dense": adamw, "hybrid-lora-dense": slow})["hybrid-lora-dense"]
    assert c["le_2x"] is False
    straddle = _run(list(range(0, 20, 2)), [0.78] * 9 + [0.80], 3.0)  # (16, 18] against (8, 10]: 1.6x-2.25x
    c = z.dense_clock({"adamw-lora-dense": adamw, "hybrid-lora-dense": straddle})["hybrid-lora-dense"]
    assert c["le_2x"] is None and c["ratio_bounds"] == pytest.approx([48 / 30, 54 / 24])


def test_dense_pair_capped_without_the_level_is_not_met_and_a_running_one_is_unknown(tmp_path, monkeypatch):
    z = _settings(tmp_path, monkeypatch)
    adamw = _run([0, 2, 4], [0.78, 0.79, 0.81], 3.0)
    capped = _run(list(range(0, z.DENSE_MAX_STEPS + 2, 2)), [0.78] * (z.DENSE_MAX_STEPS // 2 + 1), 3.0)
    assert z.dense_clock({"adamw-lora-dense": adamw, "hybrid-lora-dense": capped})["hybrid-lora-dense"]["le_2x"] is False
    going = _run([0, 2, 4], [0.78, 0.78, 0.79], 3.0)
    assert z.dense_clock({"adamw-lora-dense": adamw, "hybrid-lora-dense": going})["hybrid-lora-dense"]["le_2x"] is None


def test_dense_pair_of_different_thread_settings_gets_no_verdict_in_own_seconds(tmp_path, monkeypatch):
    z = _settings(tmp_path, monkeypatch, a=1, b=2)
    adamw = _run([0, 2, 4, 6, 8, 10], [0.78, 0.78, 0.79, 0.79, 0.79, 0.81], 3.0)
    hybrid = _run([0, 2, 4, 6, 8, 10, 12, 14], [0.78] * 7 + [0.80], 3.0)
    c = z.dense_clock({"adamw-lora-dense": adamw, "hybrid-lora-dense": hybrid})["hybrid-lora-dense"]
    assert c["ratio"] == pytest.approx(1.4) and c["le_2x"] is None


def test_dense_pair_in_one_settings_step_costs(tmp_path, monkeypatch):
    """Steps to 80% x each step's cost from one zo_step.py run: the load beside either run cannot move it."""
    z = _settings(tmp_path, monkeypatch)
    adamw = _run([0, 2, 4, 6, 8, 10], [0.78, 0.78, 0.79, 0.79, 0.79, 0.81], 3.0)
    hybrid = _run([0, 2, 4, 6, 8, 10, 12, 14], [0.78] * 7 + [0.80], 9.0)  # its own seconds: 3x slower (load)
    zo_step = {"ratios": {"hybrid_lora": {"time_vs_two_forwards": 1.05}, "adamw_lora": {"time_vs_two_forwards": 1.0}},
               "results": {"hybrid_lora": {"threads": 1}, "adamw_lora": {"threads": 1}}}
    c = z.dense_same_setting({"adamw-lora-dense": adamw, "hybrid-lora-dense": hybrid}, zo_step)["hybrid-lora-dense"]
    assert c["steps_to_target"] == [14, 10] and c["ratio"] == pytest.approx(1.4 * 1.05)
    assert c["ratio_bounds"] == pytest.approx([12 * 1.05 / 10, 14 * 1.05 / 8]) and c["le_2x"] is True
    assert c["first_evaluation"] == []


def test_target_row_takes_the_dense_pair_when_it_has_measured(monkeypatch):
    import targets
    conv = {"runs": {}, "wall_clock_dense_same_setting": {"hybrid-lora-dense": {
        "steps_to_target": [14, 10], "step_cost_in_two_forwards": [1.05, 1.0], "threads": 1, "ratio": 1.47,
        "ratio_bounds": [1.26, 1.84], "le_2x": True, "first_evaluation": [], "eval_every": 2,
        "reference": "adamw-lora-dense"}}}
    monkeypatch.setattr(targets, "read_results", lambda name: conv if name == "zo_convergence.json" else None)
    row = next(r for r in targets.zo_rows() if r[1].startswith("wall-clock"))
    assert row[3].startswith("met") and "1.47x (bounds 1.26x-1.84x)" in row[3] and "step 14" in row[3], row[3]
    conv["wall_clock_dense_same_setting"]["hybrid-lora-dense"].update(le_2x=None, ratio_bounds=[1.6, 2.25])
    row = next(r for r in targets.zo_rows() if r[1].startswith("wall-clock"))
    assert row[3].startswith("unresolved") and "between 1.60x and 2.25x" in row[3], row[3]


def test_a_run_stopped_by_stop_when_is_not_an_error_but_other_failures_are(tmp_path, monkeypatch):
    """launch.train_run's stop_when: one Ctrl-C once it holds (the run's own clean stop, exit code non-zero), which is
    then no failure; a run that fails on its own still raises."""
    import launch
    script = tmp_path / "fake.py"
    script.write_text("import signal, sys, time\n"
                      "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
                      "if sys.argv[-1] == 'fail':\n    sys.exit(3)\n"
                      "open(sys.argv[-1], 'w').write('go')\n"
                      "time.sleep(60)\n")
    flag, mode = tmp_path / "flag", []
    real_popen = subprocess.Popen
    monkeypatch.setattr(launch.subprocess, "Popen", lambda cmd, **kw: real_popen([sys.executable, str(script),
                                                                                  *mode], **kw))
    mode[:] = [str(flag)]
    launch.train_run(tmp_path / "run", tmp_path / "t.tsv", tmp_path / "d.tsv", [], 1,
                     stop_when=lambda _: flag.exists())  # stopped by its Ctrl-C once the flag is there: no error
    mode[:] = ["fail"]
    with pytest.raises(subprocess.CalledProcessError):  # failed on its own: the condition never held
        launch.train_run(tmp_path / "run2", tmp_path / "t.tsv", tmp_path / "d.tsv", [], 1,
                         stop_when=lambda _: (tmp_path / "never").exists())


def _metrics(path, steps_losses, evals):
    path.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 0, "eval_accuracy": evals.get(0, 0.78)}]
    for step, loss in steps_losses.items():
        lines.append({"step": step, "loss": loss, "step_time_s": 3.0, **({"eval_accuracy": evals[step]}
                                                                          if step in evals else {})})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_a_refining_run_on_the_same_trajectory_makes_the_first_step_exact(tmp_path, monkeypatch):
    """Evaluations 2 steps apart bound the first step at 80% to (4, 6]; the refining run's evaluation at step 5 (its
    losses equal the dense run's: one trajectory) settles it, and one step apart the bound is exact (weights change
    only at a step). A refining run whose losses differ is not used."""
    z = _settings(tmp_path, monkeypatch)
    monkeypatch.setattr(z, "run_dir", lambda name: tmp_path / name)
    losses = {k: 1.0 / k for k in range(1, 8)}
    _metrics(tmp_path / "adamw-lora-dense", losses, {2: 0.786, 4: 0.796, 6: 0.801})
    assert z.refine_step("adamw-lora-dense") == 5 and z.dense_decided("adamw-lora-dense")
    assert not z.dense_decided("adamw-lora-dense-refine")  # not run yet
    _metrics(tmp_path / "adamw-lora-dense-refine", {k: losses[k] for k in range(1, 6)}, {5: 0.8}, )
    assert z.dense_decided("adamw-lora-dense-refine")
    results = {n: z.curve(n) for n in ("adamw-lora-dense", "adamw-lora-dense-refine")}
    view = z.dense_view(results, "adamw-lora-dense")
    assert view["refined"] and view["steps"] == [0, 2, 4, 5, 6] and view["accuracy"][3] == 0.8
    assert view["seconds"][3] == pytest.approx(15.0)  # the dense run's own seconds at step 5
    assert z.step_bounds(view, "steps", 0.8) == (5, 5) and z.bounds(view, "steps", 0.8) == (4, 5)
    _metrics(tmp_path / "adamw-lora-dense-refine", {**{k: losses[k] for k in range(1, 6)}, 3: 0.7}, {5: 0.8})
    results = {n: z.curve(n) for n in ("adamw-lora-dense", "adamw-lora-dense-refine")}
    view = z.dense_view(results, "adamw-lora-dense")
    assert not view["refined"] and view.get("refine_mismatch") and view["steps"] == [0, 2, 4, 6]


def test_exact_first_steps_decide_a_ratio_the_two_step_bounds_left_open(tmp_path, monkeypatch):
    z = _settings(tmp_path, monkeypatch)
    adamw = _run([0, 2, 4, 5, 6], [0.78, 0.786, 0.796, 0.799, 0.801], 3.0)  # exactly step 6
    hybrid = _run([0, 2, 4, 6, 8, 10, 11, 12], [0.78, 0.78, 0.78, 0.78, 0.79, 0.797, 0.801, 0.81], 3.0)  # step 11
    zo_step = {"ratios": {"hybrid_lora": {"time_vs_two_forwards": 1.0}, "adamw_lora": {"time_vs_two_forwards": 1.0}},
               "results": {"hybrid_lora": {"threads": 1}, "adamw_lora": {"threads": 1}}}
    c = z.dense_same_setting({"adamw-lora-dense": adamw, "hybrid-lora-dense": hybrid}, zo_step)["hybrid-lora-dense"]
    assert c["ratio_bounds"] == pytest.approx([11 / 6, 11 / 6]) and c["le_2x"] is True
    hybrid = _run([0, 2, 4, 6, 8, 10, 12, 13], [0.78, 0.78, 0.78, 0.78, 0.79, 0.797, 0.799, 0.801], 3.0)  # step 13
    c = z.dense_same_setting({"adamw-lora-dense": adamw, "hybrid-lora-dense": hybrid}, zo_step)["hybrid-lora-dense"]
    assert c["ratio_bounds"] == pytest.approx([13 / 6, 13 / 6]) and c["le_2x"] is False


def test_a_dense_run_still_short_of_80_is_not_met_once_its_lower_bound_is_over_2x(tmp_path, monkeypatch):
    z = _settings(tmp_path, monkeypatch)
    adamw = _run([0, 2, 4, 6], [0.78, 0.786, 0.796, 0.801], 3.0)  # (4, 6]
    early = _run([0, 2, 4, 6, 8, 10], [0.78, 0.78, 0.78, 0.79, 0.79, 0.797], 3.0)  # > 10 steps: 10/6 < 2
    c = z.dense_clock({"adamw-lora-dense": adamw, "hybrid-lora-dense": early})["hybrid-lora-dense"]
    assert c["le_2x"] is None and c["ratio_bounds"][0] == pytest.approx(10 / 6)
    late = _run(list(range(0, 18, 2)), [0.78] * 9, 3.0)  # > 16 steps: 16/6 > 2, whatever comes next
    c = z.dense_clock({"adamw-lora-dense": adamw, "hybrid-lora-dense": late})["hybrid-lora-dense"]
    assert c["le_2x"] is False and c["ratio_bounds"][0] == pytest.approx(16 / 6)

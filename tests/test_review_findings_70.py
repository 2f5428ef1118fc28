"""Review 70: are the measurements honest? README / docs tables from benchmarks/results/, issue 36's targets rows,
`slimtune report` on the benchmark runs, and the tests that guard the README. Every test here failed when written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"


@pytest.fixture(autouse=True)
def bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def _row(summary: dict) -> dict:
    from slimtune.report.render import COLUMNS, table_rows
    return dict(zip([c[0] for c in COLUMNS], table_rows([summary])[0]))


def test_report_withholds_time_and_memory_of_a_private_run_that_did_not_log_private_stats():
    """A private run without --log-private-stats withholds its peak memory and step time (trainer.write_summary:
    they are measured on private batches). Runs written before that rule kept them in summary.json, and `slimtune
    report` prints whatever the summary holds: the archived DPZero eps-6 run shows 1,107 MB and 5.205 s/step with an
    unstarred epsilon, i.e. as if covered by the guarantee."""
    from slimtune.report.render import load_runs

    run = RESULTS / "before-prompt-change" / "defaults" / "dpzero-lora-eps6"
    summary = load_runs([str(run)])[0].summary
    assert summary["epsilon"] is not None and summary["private_stats_logged"] is False  # private, nothing logged
    row = _row(summary)
    assert (row["peak memory (MB)"], row["time/step (s)"]) == ("-", "-"), row


def test_defaults_table_withholds_time_and_memory_of_private_rows_whose_run_withheld_them():
    """README's defaults table shows peak MB and wall time for dpzero-lora-eps6 / eps2 (1,107 MB, 174 min; 1,171 MB,
    168 min), taken from runs whose summary says private_stats_logged: false: numbers a private run releases only with
    --log-private-stats. defaults.json does not even record the flag, so the table cannot tell."""
    import tables

    defaults = json.loads((RESULTS / "defaults.json").read_text())
    table = tables.defaults_table().splitlines()
    checked = 0
    for name, r in defaults.items():
        if r.get("epsilon") is None:
            continue
        for run in (RESULTS / "defaults" / name, RESULTS / "before-prompt-change" / "defaults" / name):
            path = run / "summary.json"
            s = json.loads(path.read_text()) if path.exists() else {}
            if s.get("final_accuracy") == r["final_accuracy"] and s.get("private_stats_logged") is False:
                cells = [c.strip() for c in next(line for line in table if line.startswith(f"| {name}")).split("|")]
                checked += 1
                assert (cells[8], cells[9]) == ("-", "-"), (name, cells[8], cells[9])  # peak MB, wall time
    assert checked >= 1  # the rows above exist today (dpzero-lora-eps6 / eps2 of the earlier prompt)


def test_time_to_target_of_a_private_run_that_withheld_its_time_is_not_zero_seconds():
    """tables.time_to costs a private run's steps at its mean step time; a run that withheld it (time_per_step_s
    null, no step_time_s in metrics.jsonl) gets 0 per step, so grid tables print '~0 s (step 50)': a made-up time."""
    import tables

    metrics = [{"step": 0, "eval_accuracy": 0.5}, {"step": 1, "epsilon": 1.0},
               {"step": 50, "eval_accuracy": 0.85, "epsilon": 2.0}]
    shown = tables.time_to(metrics, 0.8, None)
    assert not re.match(r"~?0 s", shown), shown


def test_report_marks_runs_trained_with_another_prompt(tmp_path):
    """`slimtune report defaults/adamw-lora defaults/adamw-svfit` puts 0.883 beside 0.856 as if comparable; the
    runs' config.json records different prompts (`Review: {sentence}\\nSentiment:` vs `{sentence} It was`, which
    alone moved zero-shot from 0.52 to 0.78). The report says nothing about it (the README marks '(old prompt')."""
    from slimtune.report.render import load_runs, render_report
    from slimtune.train.resume import read_stored

    runs = [RESULTS / "defaults" / "adamw-lora", RESULTS / "defaults" / "adamw-svfit"]
    assert len({read_stored(r)["template"] for r in runs}) == 2  # two prompts
    out = Path(render_report(load_runs([str(r) for r in runs]), tmp_path)["markdown"]).read_text()
    table = [line for line in out.splitlines() if line.startswith("| adamw-svfit")]
    assert "prompt" in out.lower() or "It was" in out, table


def test_private_target_row_says_its_accuracy_is_from_step_1750_of_a_run_stopped_at_1984():
    """dphybrid-lora-eps6 stopped at step 1984 (privacy budget exhausted) and was last evaluated at step 1750; the
    targets row ('private version of the best method', beside '2,000 steps' rows) shows 0.827 against the hybrid's
    step-2000 0.860 with no word of either step."""
    import targets

    run = json.loads((RESULTS / "zo_convergence.json").read_text())["runs"]["dphybrid-lora-eps6"]
    assert run["stop_reason"] != "completed" and run["steps"][-1] < 2000  # precondition
    row = next(r for r in targets.zo_rows() if r[1].startswith("private version"))
    assert str(run["steps"][-1]) in row[3], row[3]


def test_report_does_not_show_an_earlier_evaluation_as_the_final_accuracy_of_a_run_stopped_between_evaluations():
    """The same run in `slimtune report`: steps 1984, dev accuracy 0.827 -- but 0.827 is step 1750's evaluation;
    the model trained 234 more steps unevaluated (write_summary takes the last evaluation as final_accuracy)."""
    from slimtune.report.render import load_runs

    run = load_runs([str(RESULTS / "zo_convergence" / "dphybrid-lora-eps6")])[0]
    last_eval = max(m["step"] for m in run.metrics if "eval_accuracy" in m)
    assert last_eval < run.summary["steps"]  # precondition: 1750 < 1984
    row = _row(run.summary)
    assert str(last_eval) in row["dev accuracy"] or row["dev accuracy"] == "-", row


def test_zo_step_memory_ratio_of_a_row_run_later_is_not_shown_as_one_run_ratio():
    """zo_step.json's hybrid_lora and adamw_lora rows were timed later at 1 thread (--only); their
    memory_vs_inference divides by inference_lora's peak from the earlier 2-thread invocation. The zo-step table
    withholds time / inference process for such rows ('not comparable') but prints memory / inference (1.044, 1.263)
    unmarked, and the hybrid targets row uses it ('memory 1.04x (zo_step.json)')."""
    import tables

    # (lead) the results file was re-measured in one invocation: a row merged in later is made here, as --only would
    doc = json.loads((Path(tables.__file__).parent / "results" / "zo_step.json").read_text())
    row = dict(doc["results"]["hybrid_lora"], invocation="2026-01-01T00:00:00", threads=1)
    doc["results"]["hybrid_lora"] = row
    original = tables.read_results
    tables.read_results = lambda name: doc if name == "zo_step.json" else original(name)
    try:
        later = [line for line in tables.zo_step_table().splitlines() if "run later" in line]
    finally:
        tables.read_results = original
    assert later  # precondition
    for line in later:
        assert line.rstrip(" |").rsplit("|", 1)[1].strip() == "-", line


def test_wall_clock_target_is_not_met_on_two_first_evaluation_upper_bounds(monkeypatch):
    """The wall-clock row says 'met (1.09x, hybrid-lora, ...)' from steps_to_target [40, 37]: AdamW + LoRA reached
    80% at its first evaluation (step 37) and the hybrid at its first (step 40). Both are only upper bounds (zero-shot
    is 0.78, 80% is 2 points above): the true ratio lies anywhere in [1/37, 40]. No verdict follows."""
    import targets

    conv = json.loads((RESULTS / "zo_convergence.json").read_text())["runs"]
    ref = conv["adamw-lora"]
    first = next(i for i, a in enumerate(ref["accuracy"]) if a >= 0.8)
    assert first == 1  # precondition: the reference got there at its first evaluation after step 0
    # (lead) the dense pair (zo_convergence.DENSE, both runs evaluated every 2 steps) may settle the row since: this
    # finding is about the first-evaluation bounds, so the row is judged here without the dense pair's entries
    real = targets.read_results
    without_dense = lambda name: {k: v for k, v in (real(name) or {}).items() if not k.startswith("wall_clock_dense")} \
        if name == "zo_convergence.json" else real(name)  # noqa: E731
    monkeypatch.setattr(targets, "read_results", without_dense)
    row = next(r for r in targets.zo_rows() if r[1].startswith("wall-clock"))
    assert not row[3].startswith("met"), row[3]


def test_readme_prose_has_no_hand_written_result_numbers():
    """README's prose under the targets table repeats results by hand: 'gains 4.3 points', '1.4 points (2.2 at their
    best)', '9% more peak memory', '0.3 points', 'misses by 3.3 points', '(0.0 points)'. They will not follow the
    JSON when the runs are redone (the test only looks for 0.ddd accuracies)."""
    text = (ROOT / "README.md").read_text()
    outside = re.sub(r"<!-- (\S+):start -->.*?<!-- \1:end -->", "", text, flags=re.S)
    outside = re.sub(r"```.*?```", "", outside, flags=re.S)
    found = re.findall(r"\b\d+(?:\.\d+)? (?:points|pts)\b|\b\d+% more\b", outside)
    assert found == []


def test_the_readme_test_fails_when_a_generated_table_is_stale(tmp_path, monkeypatch):
    """No test compares README.md (or docs/benchmarks/*.md) with what readme_tables.fill makes of the results now:
    test_docs' README test checks its length, its markers and 0.ddd numbers outside blocks; a stale number inside
    the defaults table passes it. (`docs_tables.py --check` exists but no test runs it, and it skips README.md.)"""
    import test_docs

    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- defaults:start -->.*?<!-- defaults:end -->", text, flags=re.S).group(0)
    stale = text.replace(block, block.replace("| adamw-lora | 460,800 | 300 | 0.883", "| adamw-lora | 460,800 | 300 | 0.999"))
    assert stale != text  # precondition: a number in the generated table changed
    (tmp_path / "README.md").write_text(stale)
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    monkeypatch.setattr(test_docs, "ROOT", tmp_path)
    with pytest.raises(AssertionError):
        test_docs.test_readme_is_short_and_its_numbers_are_generated(None)

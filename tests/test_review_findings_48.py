"""Review 48: can the generated tables mislead? The README's targets block, the docs' benchmark tables and the
verdicts behind them (benchmarks/targets.py, tables.py, zo_convergence.py, federated_attacks.py), attacked with
synthetic result dicts (no benchmark run, nothing under benchmarks/results/ read for the numbers or written).

Held up: every accuracy verdict reads the final accuracy (never the best); missing result files give "not run yet"
rows, never dropped ones; the hybrid row reads only `hybrid-lora` (2 blocks), never `hybrid-lora-fo4`; verdicts are
computed on unrounded values (a 872-example accuracy cannot straddle 0.84 / 0.87 at three decimals); the README's
targets block equals what the current results generate. What failed: rows of SST-2's earlier prompt shown or compared
without their mark (bf16 vs fp32, every federated row), step costs of two thread settings labelled as one setting,
own-second ratios printed without their thread settings, a privacy-budget-stopped run shown as plainly "finished",
and one zero-shot accuracy printed under a table whose rows have different ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
OLD = ["{sentence} It was", "0=terrible,1=great"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import launch
    import targets
    import tables
    return {"targets": targets, "tables": tables, "new": list(launch.prompt_of_flags([]))}


def fake_results(monkeypatch, module, files: dict) -> None:
    monkeypatch.setattr(module, "read_results", lambda relative: files.get(relative))


def row_of(rows: list[list[str]], figure_start: str) -> list[str]:
    return next(r for r in rows if r[1].startswith(figure_start))


# --- issue 38: bf16 vs fp32 -------------------------------------------------------------------------------------

def test_targets_bf16_row_marks_old_prompt_rows(bench, monkeypatch):
    """targets.scale_rows judges `mezo-lora-bf16` against `mezo-lora` from defaults.json with no prompt check and no
    mark: the README's row "bf16 vs fp32 SST-2 dev ... met (+0.7 pts)" comes from two rows of SST-2's earlier prompt
    (defaults.json: both have no "prompt"; the defaults table marks both "(old prompt)"), shown unmarked."""
    t = bench["targets"]
    fake_results(monkeypatch, t, {"defaults.json": {"mezo-lora": {"final_accuracy": 0.780},
                                                    "mezo-lora-bf16": {"final_accuracy": 0.787}}})
    cell = row_of(t.scale_rows(), "bf16 vs fp32")[3]
    assert "old prompt" in cell, cell


def test_targets_bf16_row_never_compares_across_prompts(bench, monkeypatch):
    """With `mezo-lora` rerun with today's prompt (in progress: benchmarks/defaults.py --only mezo-lora) and the bf16
    row not yet, the gap is taken across prompts (the prompt alone moved zero-shot from 0.52 to 0.78) and judged: here
    a "met" (within 1 pt) from rows that are not comparable. defaults.verdict says "not yet" for the same pair."""
    t = bench["targets"]
    fake_results(monkeypatch, t, {"defaults.json": {
        "mezo-lora": {"final_accuracy": 0.790, "prompt": bench["new"]},
        "mezo-lora-bf16": {"final_accuracy": 0.787, "prompt": OLD}}})
    cell = row_of(t.scale_rows(), "bf16 vs fp32")[3]
    assert not cell.startswith(("met", "**missed**")), cell


# --- issue 36: wall-clock ratios and thread settings ------------------------------------------------------------

def test_same_setting_clock_does_not_pair_step_costs_of_two_thread_settings(bench):
    """zo_convergence.same_setting_clock divides the run's step cost by the reference's as "step costs from one
    zo_step.py run (same threads, same moment)", recording only the run's thread setting. In zo_step.json today
    `mezo_lora` was timed with the file's 2 threads and `adamw_lora` later at 1 thread (`--only`): the mezo-lora-pool
    and -gaussian "same setting" ratios (13.2x, 19.8x; docs zo-cost page: "step costs from one zo_step.py run, 2
    thread") mix two settings and two moments."""
    import zo_convergence as zc
    acc = [0.78, 0.81, 0.82]
    runs = {"adamw-lora": {"steps": [0, 37, 74], "accuracy": acc, "finished": True, "prompt": bench["new"]},
            "mezo-lora-pool": {"steps": [0, 250, 500], "accuracy": acc, "finished": True, "prompt": bench["new"]}}
    zo_step = {"threads": 2, "results": {"mezo_lora": {}, "adamw_lora": {"threads": 1}},
               "ratios": {"mezo_lora": {"time_vs_two_forwards": 1.03}, "adamw_lora": {"time_vs_two_forwards": 1.05}}}
    entry = zc.same_setting_clock(runs, zo_step).get("mezo-lora-pool")
    assert not (entry and entry["ratio"] is not None and entry.get("threads") == 2), entry


def test_targets_wall_clock_row_says_which_threads_its_own_seconds_came_from(bench, monkeypatch):
    """The README's wall-clock row prints the runs' own-seconds ratios ("own seconds: 0.90x", "to 85% ...: 8.34x in
    own seconds") with no thread setting: the reference and the hybrid ran at different settings beside other runs
    (zo_convergence.py's docstring; its own table notes say "their thread settings differ"), and zo_convergence.json
    records none. Project rule: say which thread setting a timing came from."""
    t = bench["targets"]
    new = bench["new"]
    conv = {"runs": {"adamw-lora": {"finished": True, "final_accuracy": 0.88, "prompt": new, "accuracy": [0.8],
                                    "steps": [37]},
                     "hybrid-lora": {"finished": True, "final_accuracy": 0.86, "prompt": new, "accuracy": [0.8],
                                     "steps": [40]}},
            "wall_clock_to_target": {"hybrid-lora": {"ratio": 0.90, "le_2x": True}},
            "wall_clock_same_setting": {"hybrid-lora": {"ratio": 1.09, "le_2x": True, "threads": 1}},
            "harder_level": 0.85, "wall_clock_to_harder_level": {"hybrid-lora": {"ratio": 8.34, "le_2x": False}}}
    fake_results(monkeypatch, t, {"zo_convergence.json": conv})
    cell = row_of(t.zo_rows(), "wall-clock to 80%")[3]
    assert "own seconds" in cell
    own_part = cell[cell.index("own seconds"):]
    assert "thread" in own_part, cell


# --- issue 36: a run stopped by its privacy budget ----------------------------------------------------------------

def test_zo_convergence_table_does_not_show_a_budget_stopped_run_as_plainly_finished(bench, monkeypatch, tmp_path):
    """dphybrid-lora-eps6 stopped at step 1984 of 2,000 ("privacy budget exhausted"); its last evaluation was at step
    1750, so its summary's final_accuracy (0.827, the targets' "private version" row) is the model of step 1750, not
    of the run's end. curve() keeps only `finished = bool(summary)`: the table's status reads "finished", the steps
    and stop reason are lost."""
    import zo_convergence as zc
    tables = bench["tables"]
    out = tmp_path / "zo_convergence"
    run = out / "dphybrid-lora-eps6"
    run.mkdir(parents=True)
    lines = [{"step": s, "eval_accuracy": 0.78 + s / 100000, "eval_loss": 0.4} for s in range(0, 2000, 250)]
    lines += [{"step": s, "loss": 0.4, "step_time_s": 1.0} for s in range(1, 1985)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in sorted(lines, key=lambda m: m["step"])))
    (run / "summary.json").write_text(json.dumps({"steps": 1984, "stop_reason": "privacy budget exhausted",
                                                  "final_accuracy": 0.7975, "best_accuracy": 0.7975}))
    monkeypatch.setattr(zc, "OUT", out)
    doc = {"runs": {"dphybrid-lora-eps6": zc.curve("dphybrid-lora-eps6")}, "targets": {}}
    (tmp_path / "zo_convergence.json").write_text(json.dumps(doc))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    row = next(line for line in tables.zo_convergence_table().splitlines() if line.startswith("| dphybrid-lora-eps6"))
    status = row.rstrip(" |").rsplit("|", 1)[1]
    assert "1984" in status or "budget" in status, row


# --- issue 35 and the FedLPP table: prompts of federated rows -------------------------------------------------------

def hostile(attack, count, robust, reference, acc, prompt=None):
    setup = {"attack": attack, "hostile_clients": count, "robust": robust, "reference": reference}
    return {"setup": setup, "final_accuracy": acc, **({"prompt": prompt} if prompt else {})}


def test_targets_federated_gap_is_never_taken_across_prompts(bench, monkeypatch):
    """federated_attacks.judged_gap / targets.federated_rows subtract the all-honest run's accuracy from the attacked
    run's with no prompt check (nothing federated records a prompt). A sign-flip row rerun with SST-2's new prompt
    (the FedLPP benchmark's start accuracy went 0.475 -> 0.805 with it) against an all-honest run of the earlier one
    reads as +15 pts: issue 35's 2-of-8 target shown "met"."""
    t = bench["targets"]
    results = {"honest-direction": hostile(None, 0, "direction", "honest-direction", 0.70),
               "sign-flip-2of8-direction": hostile("sign-flip", 2, "direction", "honest-direction", 0.85,
                                                   bench["new"])}
    fake_results(monkeypatch, t, {"federated_hostile.json": results})
    cell = row_of(t.federated_rows(), "2 of 8 clients hostile, 30 rounds (the default")[3]
    assert "met" not in cell.split("(")[0], cell


def test_targets_federated_rows_mark_rows_of_the_earlier_prompt(bench, monkeypatch):
    """Every federated_hostile.json row trained with SST-2's earlier prompt (start accuracy 0.475; none records a
    prompt, which tables.earlier_prompt reads as the earlier one), yet the README's four issue-35 rows carry no
    "(old prompt)" mark."""
    t = bench["targets"]
    results = {"honest-direction": hostile(None, 0, "direction", "honest-direction", 0.70),
               "sign-flip-1of8-direction": hostile("sign-flip", 1, "direction", "honest-direction", 0.69)}
    fake_results(monkeypatch, t, {"federated_hostile.json": results})
    cell = row_of(t.federated_rows(), "1 of 8 clients hostile, 30 rounds (the default")[3]
    assert "old prompt" in cell, cell


def test_federated_table_marks_rows_of_the_earlier_prompt(bench, monkeypatch):
    """benchmarks/federated_table.py merges `{**previous, **results}` into federated.json; it is rerunning fedlpp-2/4/8/
    fp32 now (today's prompt and defaults: start accuracy 0.805 against 0.475), so the fedadam / fedavgm / FFA rows of
    the earlier prompt and code will sit beside them, and tables.federated_table marks no row: their 0.835 / 0.830 /
    0.790 read as comparable with the new FedAvg rows."""
    tables = bench["tables"]
    row = {"client_visible_accuracy": 0.8, "initial_accuracy": 0.475, "payload_bytes_down_per_client_per_round": 1,
           "payload_bytes_up_per_client_per_round": 1, "peak_mem_mb": 1000}
    d = {"fedlpp-4bit": {**row, "final_accuracy": 0.835, "initial_accuracy": 0.805, "prompt": bench["new"]},
         "fedlpp-4bit-fedadam": {**row, "final_accuracy": 0.835}}
    fake_results(monkeypatch, tables, {"federated.json": d})
    line = next(x for x in tables.federated_table().splitlines() if x.startswith("| fedlpp-4bit-fedadam"))
    assert "old prompt" in line, line


# --- the defaults table's footer --------------------------------------------------------------------------------------

def test_defaults_table_footer_zero_shot_is_not_one_rows_value_for_all(bench, monkeypatch, tmp_path):
    """defaults_table prints "Zero-shot dev accuracy: X" with X the first row's zero-shot, under rows of two prompts
    and two models (SmolLM2 today's prompt 0.780; the old-prompt rows ~0.52; Gemma its own): a reader compares
    mezo-svfit's 0.694 (old prompt, zero-shot ~0.52) with 0.780."""
    import defaults
    tables = bench["tables"]
    monkeypatch.setattr(defaults, "OUT", tmp_path)
    base = {"trainable_params": 1, "steps": 300, "best_accuracy": 0.8, "best_step": 1, "epsilon": None,
            "peak_mem_mb": 1, "wall_time_s": 60, "saved_adapter": "best (step 1)"}
    d = {"adamw-lora": {**base, "final_accuracy": 0.883, "zero_shot_accuracy": 0.780, "prompt": bench["new"]},
         "mezo-svfit": {**base, "final_accuracy": 0.694, "zero_shot_accuracy": 0.521}}
    fake_results(monkeypatch, tables, {"defaults.json": d})
    text = tables.defaults_table()
    stated = re.findall(r"Zero-shot dev accuracy: (0\.\d{3})", text)
    assert not stated or {"0.780", "0.521"} <= set(re.findall(r"0\.\d{3}", text.split("\n\n", 1)[1])), stated

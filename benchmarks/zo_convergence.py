"""Accuracy per forward pass and per second for the ZO estimators, perturbation sources and issue 36's methods
(issue 13, items 1 and 4; issue 36, item 7).

SST-2 (all of train) -> the full 872-example dev set, SmolLM2-135M, batch 16, seed 0, every run at its per-method
defaults (slimtune/optim/defaults.py) plus only the flag that names what is compared:

- `mezo-lora-gaussian` is the `mezo-lora` row of benchmarks/defaults.py (same command, same directory: it is run or
  resumed there, never twice), against `mezo-lora-pool` (`--perturbation pool`): the shared Gaussian pool must give
  the accuracy of fresh Gaussian z at the same steps (target: within 1 point).
- `mezo-full-gaussian` against `mezo-full-pool`: the same comparison on all 134M parameters, where the pool is what
  brings the step to ~1x two forwards on CPU (benchmarks/zo_step.py).
- `fzoo-lora`: FZOO (N = 8 one-sided Rademacher directions, N + 1 = 9 forwards per step) for the same number of
  training forward passes as MeZO's 2,000 steps x 2; target: 80% dev accuracy in <= 0.5x MeZO's forward passes.
  MeZO + LoRA ends at 78% at its defaults, so its forwards to 80% are only known to exceed 4,000: the target then
  holds only if FZOO gets there in <= 2,000, and is reported as not shown otherwise. Both runs' forwards to the
  highest 5-point level MeZO does reach (75%) are reported next to it, a ratio that can be measured.
- issue 36: `hizoo-lora` (3 forwards a step), `hybrid-lora` (backprop through the top 2 blocks, 2 forwards),
  `hizoo-l-full` and `sparse-mezo-full` (pool z), each 2,000 steps at its defaults; `adamw-lora` is the reference
  row, the `adamw-lora` run of benchmarks/defaults.py (300 steps, evaluated every 37). Target: wall-clock seconds to
  80% dev at most 2x AdamW + LoRA's.

Two x-axes: training forward passes (evaluation passes not counted; a backward pass is not counted either, so AdamW's
1 and the hybrid's 2 per step understate their compute) and training wall-clock seconds (the sum of logged step
times up to the evaluation: evaluations excluded). Seconds compare only runs made with the same threads on the same
machine with the same load: say which in the README. ZO runs evaluate every ~500 training forward passes (250 MeZO
steps, 56 FZOO, 167 HiZOO); the hybrid, whose seconds to 80% are the contest, every 40 steps. A finished run is
skipped, an unfinished one resumes from its checkpoint (ZO runs take hours on 2 CPU cores; `--gpu` makes them
minutes).
Results: benchmarks/results/zo_convergence.json, runs under benchmarks/results/zo_convergence/, plot
benchmarks/results/zo_convergence.png (accuracy against forwards and against seconds), README table:
`python benchmarks/readme_tables.py zo-convergence`.
Usage: python benchmarks/zo_convergence.py [--only NAME...] [--threads N] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import defaults
from launch import run_prompt, same_prompt, train_run

ROOT = defaults.ROOT
OUT = ROOT / "benchmarks" / "results" / "zo_convergence"
EVAL_FORWARDS = 500  # evaluate every ~500 training forward passes
MEZO_FORWARDS = 2000 * 2  # MeZO's budget: 2,000 steps of two forwards
TARGET_ACC = 0.80

# name -> (flags, forward passes per training step); mezo-lora-gaussian is defaults.py's mezo-lora run
RUNS = {
    "adamw-lora": (defaults.RUNS["adamw-lora"][0], 1),  # the reference row: defaults.py's run
    "mezo-lora-gaussian": (defaults.RUNS["mezo-lora"][0], 2),
    "mezo-lora-pool": (["--optimizer", "mezo", "--peft", "lora", "--steps", "2000", "--perturbation", "pool"], 2),
    "fzoo-lora": (["--optimizer", "fzoo", "--peft", "lora", "--steps", str(MEZO_FORWARDS // 9)], 9),
    "mezo-full-gaussian": (["--optimizer", "mezo", "--peft", "none", "--steps", "2000"], 2),
    "mezo-full-pool": (["--optimizer", "mezo", "--peft", "none", "--steps", "2000", "--perturbation", "pool"], 2),
    "hizoo-lora": (["--optimizer", "hizoo", "--peft", "lora", "--steps", "2000"], 3),
    "hybrid-lora": (["--optimizer", "hybrid", "--peft", "lora", "--steps", "2000"], 2),
    "hizoo-l-full": (["--optimizer", "hizoo-l", "--peft", "none", "--steps", "2000"], 3),
    "sparse-mezo-full": (["--optimizer", "sparse-mezo", "--peft", "none", "--steps", "2000", "--perturbation", "pool"],
                         2),
    # issue 36, hybrid target: the lever left, backprop through the top 4 blocks (the target allows <= 2, so this row
    # is not the target's; on the train split, 600 steps from the new prompt, it ended 0.872 against 2 blocks' 0.858:
    # defaults_sweep hybrid+lora-fo-layers)
    "hybrid-lora-fo4": (["--optimizer", "hybrid", "--peft", "lora", "--steps", "2000", "--fo-layers", "4"], 2),
    # issue 36: the private version of the best method (the hybrid), epsilon 6, beside dpzero-lora-eps6 (defaults.py)
    "dphybrid-lora-eps6": (["--optimizer", "dphybrid", "--peft", "lora", "--steps", "2000", "--epsilon", "6"], 2),
    # issue 36, item 5: where MeZO + LoRA plateaus, at its defaults over 10,000 steps (the schedule decays over all of
    # them); resumable over several sessions
    "mezo-lora-10k": (["--optimizer", "mezo", "--peft", "lora", "--steps", "10000"], 2),
}
# Issue 36's wall-clock target where it is decided: from SST-2's new prompt both the reference and the hybrid were
# at 80% by their first evaluation (step 37 and 40), so those runs bound the ratio neither way. The same two
# commands again, evaluated every DENSE_EVAL_EVERY steps from step 0 and stopped (one Ctrl-C: a clean, resumable stop)
# at their first evaluation at TARGET_ACC, or at DENSE_MAX_STEPS without it. Then each once more (REFINE), evaluated
# only at the step between its last two evaluations: the weights change only at a step, so evaluations one step apart
# give the exact first step at the level (`dense_view`; used only where the refining run's losses equal the dense
# run's at every step, i.e. the same trajectory). Run them one after the other with the same --threads on an
# otherwise equal load: their own seconds are then one setting (`dense_clock`).
DENSE = {"adamw-lora-dense": "adamw-lora", "hybrid-lora-dense": "hybrid-lora"}  # dense run -> the run it repeats
REFINE = {"adamw-lora-dense-refine": "adamw-lora-dense", "hybrid-lora-dense-refine": "hybrid-lora-dense"}
DENSE_EVAL_EVERY = 2
DENSE_MAX_STEPS = 120
for _name, _of in {**DENSE, **REFINE}.items():
    RUNS[_name] = RUNS[DENSE.get(_of, _of)]
# Runs whose wall-clock to TARGET_ACC is the contest: evaluated every 40 steps, as the reference every 37, so the
# first evaluation at 80% is not 250 steps late (evaluations are not counted in the seconds)
EVAL_EVERY = {"hybrid-lora": 40}
REFERENCE = "adamw-lora"  # wall-clock to TARGET_ACC of every other run is compared with this run's
SHARED = {"mezo-lora-gaussian": "mezo-lora", "adamw-lora": "adamw-lora"}  # rows that are benchmarks/defaults.py runs
WALL_CLOCK_RATIO = 2.0  # target: seconds to TARGET_ACC <= 2x AdamW + LoRA's
# (run, reference): the pool must match Gaussian z at equal steps; FZOO must reach TARGET_ACC in half MeZO's passes
POOL_PAIRS = (("mezo-lora-pool", "mezo-lora-gaussian"), ("mezo-full-pool", "mezo-full-gaussian"))
FASTER = ("fzoo-lora", "mezo-lora-gaussian")


def run_dir(name: str) -> Path:
    return defaults.OUT / SHARED[name] if name in SHARED else OUT / name


def train(name: str, threads: int, gpu: bool) -> None:
    """Run (or resume) one configuration; a finished one is left alone."""
    if name in SHARED:
        defaults.run(SHARED[name], defaults.RUNS[SHARED[name]][0], threads, gpu)
        return
    flags, fps = RUNS[name]
    every = DENSE_EVAL_EVERY if name in DENSE else EVAL_EVERY.get(name, round(EVAL_FORWARDS / fps))
    if name in REFINE:
        every = refine_step(REFINE[name])
        if every is None or dense_decided(name):
            return  # nothing to refine (yet), or done
    if name in DENSE or name in REFINE:
        if name in DENSE and dense_decided(name):
            return
        settings = OUT / "dense_settings.json"  # what the pair ran with: its seconds compare only in one setting
        recorded = json.loads(settings.read_text()) if settings.exists() else {}
        recorded[name] = {"threads": threads, "device": "cuda" if gpu else "cpu"}
        settings.write_text(json.dumps(recorded, indent=2))
    train_run(run_dir(name), defaults.SST2 / "train.tsv", defaults.SST2 / "dev.tsv",
              ["--model", "smollm2", "--eval-every", str(every), "--checkpoint-every", "25",
               "--device", "cuda" if gpu else "cpu", *flags], threads,
              stop_when=(lambda _: dense_decided(name)) if name in DENSE or name in REFINE else None)


def dense_decided(name: str) -> bool:
    """Whether a dense run (DENSE) has what it is for: an evaluation at TARGET_ACC, or DENSE_MAX_STEPS evaluated; a
    refining run (REFINE): its one evaluation after step 0."""
    r = curve(name)
    if name in REFINE:
        return bool(r and refine_step(REFINE[name]) in r["steps"])
    return bool(r and r["steps"] and (max(r["accuracy"]) >= TARGET_ACC or r["steps"][-1] >= DENSE_MAX_STEPS))


def refine_step(dense: str) -> int | None:
    """The step a refining run evaluates for the dense run `dense`: the one between its first evaluation at
    TARGET_ACC and the evaluation before (None: not reached yet, or nothing between)."""
    r = curve(dense)
    if not r or not r["steps"]:
        return None
    first = next((i for i, a in enumerate(r["accuracy"]) if a >= TARGET_ACC), None)
    if not first or r["steps"][first] - r["steps"][first - 1] != 2:
        return None
    return r["steps"][first] - 1


def step_records(name: str) -> dict:
    """{step: its training record (loss, step_time_s)} of a run's metrics.jsonl (a resume's re-logged step: the last)."""
    path = run_dir(name) / "metrics.jsonl"
    if not path.exists():
        return {}
    records = (json.loads(line) for line in path.read_text().splitlines())
    return {m["step"]: m for m in records if "loss" in m}


def same_trajectory(a: dict, b: dict, upto: int) -> bool:
    """Whether two runs' logged losses agree at every step up to `upto` (to float32 rounding): one trajectory."""
    return all(k in a and k in b and math.isclose(a[k]["loss"], b[k]["loss"], rel_tol=1e-5, abs_tol=1e-7)
               for k in range(1, upto + 1))


def dense_view(results: dict, name: str) -> dict | None:
    """The dense run `name` with its refining run's evaluation added (at the dense run's own seconds at that step)
    where both followed one trajectory; "refined": whether it was, "refine_mismatch": a refining run that diverged."""
    r = results.get(name)
    if r is None:
        return None
    refine = next((k for k, v in REFINE.items() if v == name), None)
    ref_run = results.get(refine)
    step = refine_step(name) if ref_run else None
    out = {**r, "refined": False}
    if step is None or step not in ref_run["steps"]:
        return out
    own, other = step_records(name), step_records(refine)
    if not same_trajectory(own, other, step):
        return {**out, "refine_mismatch": True}
    i = r["steps"].index(step + 1)
    seconds = None if r.get("seconds") is None else sum(own[k]["step_time_s"] for k in range(1, step + 1))
    out["steps"] = r["steps"][:i] + [step] + r["steps"][i:]
    out["accuracy"] = r["accuracy"][:i] + [ref_run["accuracy"][ref_run["steps"].index(step)]] + r["accuracy"][i:]
    if seconds is not None:
        out["seconds"] = r["seconds"][:i] + [seconds] + r["seconds"][i:]
    out["forward_passes"] = [k * r["forwards_per_step"] for k in out["steps"]] if "forwards_per_step" in r else None
    out["refined"] = True
    return out


def step_bounds(run: dict, axis: str, level: float):
    """`bounds`, exact where the evaluation before the first one at `level` is one step earlier: the weights change
    only at a step, so the level was first reached at that step (lower = upper). A run still going that has not got
    there: (its last evaluation, None), a lower bound all the same (`dense_verdict` reads it as such)."""
    if not run.get("finished") and run.get(axis) and max(run["accuracy"]) < level:
        return run[axis][-1], None
    b = bounds(run, axis, level)
    if b is None or b[1] is None:
        return b
    i = next(i for i, a in enumerate(run["accuracy"]) if a >= level)
    return (b[1], b[1]) if i and run["steps"][i] - run["steps"][i - 1] == 1 else b


def curve(name: str) -> dict | None:
    """The evaluations of a run (finished or not) on the forward-pass axis; None if it has not started."""
    path = run_dir(name) / "metrics.jsonl"
    if not path.exists():
        return None
    fps = RUNS[name][1]
    metrics = [json.loads(line) for line in path.read_text().splitlines()]
    evals = {m["step"]: m["eval_accuracy"] for m in metrics if "eval_accuracy" in m}  # a resume may re-log a step
    summary_path = run_dir(name) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    step_time = {m["step"]: m["step_time_s"] for m in metrics if "step_time_s" in m}  # a resume re-logs a step
    times = list(step_time.values())
    steps = sorted(evals)
    if times:
        seconds = [sum(t for k, t in step_time.items() if k <= s) for s in steps]
    elif summary.get("time_per_step_s"):  # a private run logs no per-step times: the run's mean step time
        seconds = [s * summary["time_per_step_s"] for s in steps]
    else:
        seconds = None  # not measurable (yet)
    result = {"forwards_per_step": fps, "finished": bool(summary), "steps": steps,
              "forward_passes": [s * fps for s in steps], "accuracy": [evals[s] for s in steps],
              "seconds": seconds,
              "final_accuracy": summary.get("final_accuracy"), "best_accuracy": summary.get("best_accuracy"),
              "time_per_step_s": statistics.median(times) if times else None, "flags": RUNS[name][0],
              "prompt": run_prompt(run_dir(name)), "stopped_at": summary.get("steps"),
              "stop_reason": summary.get("stop_reason")}
    return {**result, "forwards_to_target": forwards_to(result, TARGET_ACC),
            "seconds_to_target": seconds_to(result, TARGET_ACC)}


def compare(results: dict) -> dict:
    """The issue's two accuracy targets from whatever has been evaluated so far (None: not measurable yet)."""
    out = {}
    for run, ref in POOL_PAIRS:
        a, b = results.get(run), results.get(ref)
        if not (a and b) or not same_prompt(a, b):
            continue
        common = sorted(set(a["steps"]) & set(b["steps"]) - {0})
        acc = lambda r, s: r["accuracy"][r["steps"].index(s)]
        gaps = [acc(a, s) - acc(b, s) for s in common]
        out[f"{run}_vs_{ref}"] = {
            "common_steps": common, "gap_at_each_step": gaps,
            "gap_at_last_common_step": gaps[-1] if gaps else None,
            "within_1_point": (abs(gaps[-1]) <= 0.01) if gaps and a["finished"] and b["finished"] else None}
    run, ref = FASTER
    a, b = results.get(run), results.get(ref)
    if a and b and a["finished"] and b["finished"] and same_prompt(a, b):
        fa, fb = a["forwards_to_target"], b["forwards_to_target"]
        level = math.floor(max(b["accuracy"]) * 20) / 20  # the highest 5-point level MeZO reaches
        la, lb = forwards_to(a, level), forwards_to(b, level)
        n = min(len(a["accuracy"]), len(b["accuracy"]))  # both evaluate every ~EVAL_FORWARDS: pair by index
        out[f"{run}_vs_{ref}"] = {"forwards_to_target": [fa, fb],
                                  "ratio": (fa / fb) if fa is not None and fb else None,
                                  "le_half": half_or_less(fa, fb, b["forward_passes"][-1]),
                                  "reached_level": level, "forwards_to_reached_level": [la, lb],
                                  "ratio_at_reached_level": (la / lb) if la is not None and lb else None,
                                  # the run never got there: it needed more than its whole budget, i.e. > this ratio
                                  "ratio_at_reached_level_above": (a["forward_passes"][-1] / lb)
                                  if la is None and lb else None,
                                  "gap_at_equal_forwards": [a["accuracy"][i] - b["accuracy"][i] for i in range(1, n)]}
    return out


HARDER_LEVEL = 0.85  # also reported: from SST-2's new prompt, 80% is near the zero-shot accuracy (0.78)


def wall_clock(results: dict, level: float = TARGET_ACC) -> dict:
    """Seconds to `level` (TARGET_ACC: issue 36's <= 2x AdamW + LoRA) of every run against the reference's, among runs
    of the reference's prompt. A run that never got there is None (not met once it has finished); so is every ratio
    while the reference has not got there. le_2x here compares the first evaluations at the level as points; `judged`
    weighs them as what they are, bounds (`ratio_verdict`)."""
    ref = results.get(REFERENCE)
    ref_s = seconds_to(ref, level) if ref else None
    out = {}
    for name, r in results.items():
        if name == REFERENCE or name in DENSE or name in REFINE or r.get("seconds") is None or not same_prompt(r, ref or {}):
            continue
        s = seconds_to(r, level)
        ratio = s / ref_s if s is not None and ref_s else None
        if ratio is not None:
            met = ratio <= WALL_CLOCK_RATIO
        else:  # never got there: not met once finished (if the reference did); unknown while running
            met = False if r["finished"] and ref_s is not None else None
        out[name] = {"seconds_to_target": s, "reference_seconds": ref_s, "ratio": ratio, "le_2x": met}
    return out


def bounds(run: dict, axis: str, level: float) -> tuple[float, float | None] | None:
    """Where on `axis` the run first reached `level`, as (lower, upper): the evaluation before the first one at or
    above it and that one (an evaluation shows only that the level was reached since the one before). A run that
    never got there: (its last evaluation, None) once finished, None while it runs or before anything is evaluated."""
    xs = run.get(axis) or []
    for i, (x, a) in enumerate(zip(xs, run["accuracy"])):
        if a >= level:
            return (xs[i - 1] if i else x), x
    return (xs[-1], None) if xs and run.get("finished") else None


def ratio_verdict(run: dict, own, ref, cost: float, ref_cost: float, ref_name: str = REFERENCE) -> dict:
    """The ratio's bounds from the two runs' `bounds` (each x its step cost) and the verdict on <= WALL_CLOCK_RATIO:
    True when even the largest ratio the evaluations allow is within it, False when even the smallest is above it or
    the run finished without getting there, None (unresolved) otherwise or while either run has not got there and is not finished; `first_evaluation` names
    the runs that got there at their first evaluation (only an upper bound)."""
    if own is None or ref is None or ref[1] is None:
        return {"ratio_bounds": None, "le_2x": None, "first_evaluation": []}
    low = own[0] * cost / (ref[1] * ref_cost) if ref[1] else None
    high = None if own[1] is None or not ref[0] else own[1] * cost / (ref[0] * ref_cost)  # None: unbounded
    met = True if high is not None and high <= WALL_CLOCK_RATIO else \
        False if own[1] is None or low is not None and low > WALL_CLOCK_RATIO else None  # (finished, never got there)
    first = [n for n, b in ((run.get("name"), own), (ref_name, ref)) if b[1] is not None and b[0] == 0 != b[1]]
    return {"ratio_bounds": [low, high], "le_2x": met, "first_evaluation": first}


def capped(run: dict) -> dict:
    """A dense run stopped at DENSE_MAX_STEPS without the level counts as finished without it."""
    return {**run, "finished": run["finished"] or run["steps"][-1] >= DENSE_MAX_STEPS}


def dense_verdict(run: dict, ref: dict, axis: str, cost: float, ref_cost: float, name: str, ref_name: str) -> dict:
    """`ratio_verdict` on the dense pair's `step_bounds`: a run still going that has not reached the level is not
    met only once even its lower bound is over the target (ratio_verdict reads a missing upper bound as never)."""
    own, other = step_bounds(run, axis, TARGET_ACC), step_bounds(ref, axis, TARGET_ACC)
    out = ratio_verdict({**run, "name": name}, own, other, cost, ref_cost, ref_name=ref_name)
    going = own is not None and own[1] is None and not run.get("finished")
    if going and other is not None and other[1] is not None:
        low = out["ratio_bounds"][0]
        out["le_2x"] = False if low is not None and low > WALL_CLOCK_RATIO else None
    return out


def dense_clock(results: dict) -> dict:
    """Issue 36's wall-clock ratio from the dense pair (DENSE): the hybrid's training seconds to TARGET_ACC over AdamW +
    LoRA's, each run's own logged step times, weighed as bounds (`ratio_verdict`: the first evaluation at the level
    and the one before it, DENSE_EVAL_EVERY steps apart). A run stopped at DENSE_MAX_STEPS without the level counts
    as finished without it. Runs of different prompts or settings (dense_settings.json) get no verdict."""
    run, ref = "hybrid-lora-dense", "adamw-lora-dense"
    a, b = dense_view(results, run), dense_view(results, ref)
    if not a or not b or not a.get("seconds") or not b.get("seconds") or not same_prompt(a, b):
        return {}
    settings_path = OUT / "dense_settings.json"
    settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    s, rs = seconds_to(a, TARGET_ACC), seconds_to(b, TARGET_ACC)
    entry = {"reference": ref, "eval_every": DENSE_EVAL_EVERY, "max_steps": DENSE_MAX_STEPS,
             "settings": [settings.get(run), settings.get(ref)],
             "steps_to_target": [first_at(a, "steps", TARGET_ACC), first_at(b, "steps", TARGET_ACC)],
             "seconds_to_target": s, "reference_seconds": rs, "ratio": s / rs if s is not None and rs else None,
             "time_per_step_s": [a["time_per_step_s"], b["time_per_step_s"]], "refined": [a["refined"], b["refined"]],
             **dense_verdict(capped(a), capped(b), "seconds", 1.0, 1.0, run, ref)}
    if settings.get(run) is None or settings.get(run) != settings.get(ref):
        entry["le_2x"] = None  # their seconds are not one setting's
    return {run: entry}


def dense_same_setting(results: dict, zo_step: dict | None) -> dict:
    """The dense pair's steps to TARGET_ACC (bounds DENSE_EVAL_EVERY apart) x each step's cost from one
    benchmarks/zo_step.py run (`same_setting_clock`'s costs): a ratio that the load beside either run cannot move."""
    pair = {"hybrid-lora-dense": "hybrid-lora", "adamw-lora-dense": REFERENCE}
    views = {n: dense_view(results, n) for n in pair}
    if not all(views.values()):
        return {}
    renamed = {pair[n]: views[n] for n in pair}  # zo_step's configurations are named after the runs repeated
    out = same_setting_clock(renamed, zo_step)
    if "hybrid-lora" not in out:
        return {}
    a, b = views["hybrid-lora-dense"], views["adamw-lora-dense"]
    c = out["hybrid-lora"]
    costs = c["step_cost_in_two_forwards"]
    return {"hybrid-lora-dense": {**c, "reference": "adamw-lora-dense", "eval_every": DENSE_EVAL_EVERY,
                                  "refined": [a["refined"], b["refined"]],
                                  **dense_verdict(capped(a), capped(b), "steps", *costs, "hybrid-lora-dense",
                                                  "adamw-lora-dense")}}


# run -> its step's configuration in benchmarks/zo_step.py (the same method on the same model, timed in one run)
STEP_CONFIG = {"adamw-lora": "adamw_lora", "hybrid-lora": "hybrid_lora", "mezo-lora-gaussian": "mezo_lora",
               "mezo-lora-pool": "mezo_lora"}


def same_setting_clock(results: dict, zo_step: dict | None) -> dict:
    """Wall-clock to TARGET_ACC with every step costed in one setting: steps to the target (the first evaluation at or
    above it, so an upper bound at each run's evaluation spacing) x the step's cost in two forward passes, both
    costs from one benchmarks/zo_step.py run (same threads, same moment; each step timed against two forwards in its
    own process). The long runs' own seconds mix thread settings and neighbours (the reference ran at 2 threads
    beside other runs, the hybrid at 1 thread beside one): this ratio does not."""
    costs = {name: (zo_step or {}).get("ratios", {}).get(cfg, {}).get("time_vs_two_forwards")
             for name, cfg in STEP_CONFIG.items()}
    ref, ref_cost = results.get(REFERENCE), costs.get(REFERENCE)
    ref_steps = None if ref is None else first_at(ref, "steps", TARGET_ACC)

    def threads(name: str):  # a row timed on its own (--only) records its setting; older rows: the file's
        return (zo_step or {}).get("results", {}).get(STEP_CONFIG[name], {}).get("threads",
                                                                                 (zo_step or {}).get("threads"))
    out = {}
    for name, r in results.items():
        if name == REFERENCE or costs.get(name) is None or ref_cost is None or not ref_steps or \
                not same_prompt(r, ref) or threads(name) != threads(REFERENCE):  # costs of one setting only
            continue
        steps = first_at(r, "steps", TARGET_ACC)
        ratio = None if steps is None else (steps * costs[name]) / (ref_steps * ref_cost)
        out[name] = {"steps_to_target": [steps, ref_steps], "step_cost_in_two_forwards": [costs[name], ref_cost],
                     "threads": threads(name), "ratio": ratio,
                     **ratio_verdict({**r, "name": name}, bounds(r, "steps", TARGET_ACC),
                                     bounds(ref, "steps", TARGET_ACC), costs[name], ref_cost)}
    return out


def judged(doc: dict) -> dict:
    """zo_convergence.json's document with every wall-clock verdict judged from its runs' evaluations as bounds
    (`ratio_verdict`: unresolved where a run got there at its first evaluation and the bounds straddle the target),
    so a file written by older code, or by a run started before this rule, is read by it; an entry whose runs lack
    the axis is left as it is."""
    runs, out = doc.get("runs") or {}, dict(doc)
    ref = runs.get(REFERENCE) or {}
    for key, axis, level in (("wall_clock_to_target", "seconds", doc.get("target_accuracy", TARGET_ACC)),
                             ("wall_clock_to_harder_level", "seconds", doc.get("harder_level")),
                             ("wall_clock_same_setting", "steps", doc.get("target_accuracy", TARGET_ACC))):
        if not doc.get(key) or level is None or not ref.get(axis):
            continue
        out[key] = {}
        for name, c in doc[key].items():
            r = runs.get(name) or {}
            costs = (c.get("step_cost_in_two_forwards") or [1.0, 1.0]) if axis == "steps" else [1.0, 1.0]
            out[key][name] = c if not r.get(axis) else \
                {**c, **ratio_verdict({**r, "name": name}, bounds(r, axis, level), bounds(ref, axis, level), *costs)}
    return out


def first_at(run: dict, axis: str, level: float):
    """run[axis] (steps, seconds, forward passes) at the first evaluation with accuracy >= level (None: never)."""
    return next((x for x, a in zip(run.get(axis) or [], run["accuracy"]) if a >= level), None)


def seconds_to(run: dict, level: float) -> float | None:
    """Training seconds at the first evaluation with accuracy >= level (None: never)."""
    return first_at(run, "seconds", level)


def forwards_to(run: dict, level: float) -> int | None:
    """Training forward passes at the first evaluation with accuracy >= level (None: never)."""
    return first_at(run, "forward_passes", level)


def half_or_less(fa: int | None, fb: int | None, ref_budget: int) -> bool | None:
    """Whether fa <= 0.5 fb. A reference that never reached the target needed more than its budget, so only
    fa <= 0.5 budget proves the claim; anything else is unknown (None), never "met" by default."""
    if fb is not None:
        return fa is not None and fa <= 0.5 * fb
    if fa is not None and fa <= 0.5 * ref_budget:
        return True
    return None


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_forwards, by_seconds) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, r in results.items():
        if name in DENSE or name in REFINE:  # a few early steps each: the table's notes give them
            continue
        label = name + ("" if r["finished"] else " (running)")
        style = dict(color="black", ls="--") if name == REFERENCE else {}
        by_forwards.plot(r["forward_passes"], r["accuracy"], marker="o", ms=3, label=label, **style)
        if r.get("seconds"):
            by_seconds.plot(r["seconds"], r["accuracy"], marker="o", ms=3, label=label, **style)
    for ax in (by_forwards, by_seconds):
        ax.axhline(TARGET_ACC, color="grey", lw=0.8, ls="--")
    by_forwards.set_xlabel("training forward passes (backward passes not counted)")
    by_seconds.set_xlabel("training wall-clock seconds (evaluations excluded)")
    by_forwards.set_ylabel("SST-2 dev accuracy (872)")
    by_forwards.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect() -> dict:
    """Read every run's curve into zo_convergence.json and the plot (also while runs are still going)."""
    results = {name: c for name in RUNS if (c := curve(name)) is not None}
    step_path = ROOT / "benchmarks" / "results" / "zo_step.json"
    zo_step = json.loads(step_path.read_text()) if step_path.exists() else None
    doc = {"target_accuracy": TARGET_ACC, "eval_every_forwards": EVAL_FORWARDS, "runs": results,
           "targets": compare(results), "wall_clock_to_target": wall_clock(results),
           "harder_level": HARDER_LEVEL, "wall_clock_to_harder_level": wall_clock(results, HARDER_LEVEL),
           "wall_clock_same_setting": same_setting_clock(results, zo_step), "wall_clock_dense": dense_clock(results),
           "wall_clock_dense_same_setting": dense_same_setting(results, zo_step)}
    doc = judged(doc)
    path = OUT.with_suffix(".json")
    path.write_text(json.dumps(doc, indent=2))
    if results:
        plot(results, OUT.with_suffix(".png"))
    return doc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", choices=list(RUNS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="run on CUDA (minutes instead of hours)")
    ap.add_argument("--collect", action="store_true", help="only gather what the runs have logged so far")
    args = ap.parse_args()
    if not defaults.SST2.exists():
        raise SystemExit(f"needs GLUE SST-2 at {defaults.SST2}")
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.collect:
        for name in RUNS:
            if not args.only or name in args.only:
                train(name, args.threads, args.gpu)
                collect()
    doc = collect()
    print(json.dumps({**doc["targets"], "wall_clock_to_target": doc["wall_clock_to_target"]}, indent=2))


if __name__ == "__main__":
    main()

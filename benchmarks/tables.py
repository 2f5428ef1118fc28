"""Print the README's Markdown tables from benchmark results (so the README never drifts from the JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from slimtune.report.render import load_runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def time_to(metrics: list[dict], target: float, mean_step_s: float | None = None) -> str:
    """Wall-clock training seconds until the first evaluation at or above `target`.

    Private runs log no per-step time (it depends on the private batch size): steps x the run's mean step time, and a
    run that withheld that too (no --log-private-stats: mean_step_s None) shows only the step, never a made-up time."""
    per_step = any("step_time_s" in m for m in metrics)
    elapsed = 0.0
    for m in metrics:
        elapsed = elapsed + (m.get("step_time_s") or 0.0) if per_step else m["step"] * (mean_step_s or 0.0)
        if (m.get("eval_accuracy") or 0) >= target:
            if not per_step and mean_step_s is None:
                return f"withheld (step {m['step']})"
            return f"{'' if per_step else '~'}{elapsed:.0f} s (step {m['step']})"
    return "not reached"


def read_results(relative: str) -> dict | None:
    """A benchmark's JSON under benchmarks/results/, or None before that benchmark has run."""
    path = RESULTS / relative
    return json.loads(path.read_text()) if path.exists() else None


EARLIER = " (old prompt)"  # an SST-2 row trained with the prompt before issue 36's change
EARLIER_NOTE = ("Rows marked (old prompt) trained with SST-2's earlier prompt `{sentence} It was` (terrible / great); "
                "SST-2's default is now `Review: {sentence}\\nSentiment:` (negative / positive), and they are rerun "
                "with it over sessions (`SLIMTUNE_RERUN_STALE_PROMPT=1`, benchmarks/launch.py).")


def mark(entry: dict | None) -> str:
    """" (old prompt)" after an SST-2 row trained with the prompt before issue 36's change, else ""."""
    return EARLIER if earlier_prompt(entry) else ""


def earlier_prompt(entry: dict | None) -> bool:
    """Whether an SST-2 results entry (defaults.json, zo_convergence.json) trained with another prompt than SST-2's
    today; entries from before runs recorded it (no "prompt") trained with the earlier one."""
    from launch import prompt_of_flags
    if not entry:
        return False
    prompt = entry.get("prompt")
    return prompt is None or tuple(prompt) != prompt_of_flags([])


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def grid_table(task: str, names: list[str], target: float) -> str:
    rows = ["| run | optimizer | PEFT | trainable params | peak memory (MB) | time/step (s) | steps | dev acc (final) "
            f"| dev acc (best) | time to {target:.0%} | epsilon |", "|" + "---|" * 11]
    zero = None
    finished = [RESULTS / task / n for n in names if (RESULTS / task / n / "summary.json").exists()]
    for run in load_runs(finished):
        s, m = run.summary, run.metrics
        zero = next((x["eval_accuracy"] for x in m if x.get("step") == 0 and "eval_accuracy" in x), zero)
        rows.append(f"| {run.name} | {s['method']} | {s['peft']} | {s['trainable_params']:,} | {fmt(s['peak_mem_mb'], ',.0f')} | "
                    f"{fmt(s['time_per_step_s'], '.2f')} | {s['steps']} | {fmt(s['final_accuracy'])} | "
                    f"{fmt(s['best_accuracy'])} | {time_to(m, target, s.get('time_per_step_s'))} | {fmt(s['epsilon'], '.2f')} |")
    return "\n".join(rows) + (f"\n\nZero-shot dev accuracy (step 0): {zero:.3f}." if zero is not None else "")


def mia_table() -> str:
    d = read_results("membership_inference.json")
    if d is None:
        return "(not run)"
    rows = [f"{d['members']} members, {d['steps']} steps, delta = {d['delta']}", "",
            "| run | attack AUC | member loss | non-member loss | epsilon |", "|---|---|---|---|---|"]
    for name, r in d["results"].items():
        rows.append(f"| {name} | {r['auc']:.3f} | {r['member_loss']:.3f} | {r['nonmember_loss']:.3f} | "
                    f"{fmt(r['epsilon'], '.2f')} |")
    return "\n".join(rows)


def federated_table() -> str:
    d = read_results("federated.json")
    if d is None:
        return "(not run)"
    rows = ["| run | server acc (theta) | client-visible acc (Q(theta)) | start acc | payload bytes down / client / "
            "round | payload bytes up / client / round | peak memory (MB) |", "|" + "---|" * 7]
    for name, s in d.items():
        if name == "centralized":
            rows.append(f"| centralized (same data, same total steps) | {fmt(s['final_accuracy'])} | - | - | - | - | "
                        f"{s['peak_mem_mb']:,.0f} |")
            continue
        down = s.get("payload_bytes_down_per_client_per_round") or s["bytes_down_per_client_per_round"]
        up = s.get("payload_bytes_up_per_client_per_round") or s["bytes_up_per_client_per_round"]
        rows.append(f"| {name}{mark(s)} | {fmt(s['final_accuracy'])} | "
                    f"{fmt(s['client_visible_accuracy'])} | "
                    f"{fmt(s['initial_accuracy'])} | {down:,.0f} | {up:,.0f} | {s['peak_mem_mb']:,.0f} |")
    return "\n".join(rows)


def federated_attacks_table() -> str:
    from federated_attacks import central_name

    d = read_results("federated_attacks.json")
    if d is None:
        return "(not run yet: `python benchmarks/federated_attacks.py`)"
    rows = ["| run | server acc (theta) | theta, mean of last 10 rounds | theta - centralized | Q(theta) as received | "
            "theta - Q(theta) | mean of last W broadcasts | coalition fine-tune | best attack | theta - best attack | "
            "coalition alone (fresh LoRA) | payload bytes down / client / round |", "|" + "---|" * 12]
    for name, s in d.items():
        if name.startswith("centralized"):
            continue
        central = d.get(central_name(s["setup"]), {}).get("final_accuracy")
        theta, q, best = s["final_accuracy"], s["client_visible_accuracy"], s["attack_best_score"]
        last = [m["server_accuracy"] for m in s.get("round_metrics", []) if m["round"] > 0][-10:]
        rows.append(f"| {name} ({s['rounds']} rounds) | {fmt(theta)} | {fmt(sum(last) / len(last) if last else None)} | "
                    f"{fmt(None if central is None else (theta - central) * 100, '+.1f')} pts | {fmt(q)} | "
                    f"{(theta - q) * 100:+.1f} pts | {fmt(s['attack_multi_round_score'])} | "
                    f"{fmt(s['attack_coalition_score'])} | {fmt(best)} | {(theta - best) * 100:+.1f} pts | "
                    f"{fmt(s.get('attack_coalition_from_scratch_score'))} | "
                    f"{s['payload_bytes_down_per_client_per_round']:,.0f} |")
    for name, c in d.items():
        if name.startswith("centralized"):
            rows.append(f"| {name} (same examples, same total local steps: {c['steps']}) | {fmt(c['final_accuracy'])} | "
                        f"- | - | - | - | - | - | - | - | - | - |")
    return "\n".join(rows)


def federated_hostile_table() -> str:
    from federated_attacks import hostile_table
    return hostile_table(read_results("federated_hostile.json"))


def broadcast_table() -> str:
    d = read_results("broadcast_accuracy.json")
    if d is None:
        return "(not run yet: `python benchmarks/broadcast_accuracy.py`)"
    rows = [f"theta ({d['adapter']}): {fmt(d['theta'])} on the first {d['dev_size']} dev examples.", "",
            "| bits | dither (largest steps) | accuracy of Q(theta) | theta - Q(theta) | relative L2 error | payload bytes |",
            "|---|---|---|---|---|---|"]
    for r in d["received"].values():
        rows.append(f"| {r['bits']} | {r['dither']:g} | {fmt(r['accuracy'])} | {(d['theta'] - r['accuracy']) * 100:+.1f} pts | "
                    f"{r['relative_error']:.3f} | {r['payload_bytes']:,} |")
    return "\n".join(rows)


def scaling_table(models: bool = False) -> str:
    """The PEFT-size law (X = trainable parameters, over ranks), or with `models` the two-model fit (X = the base
    model's parameter count: SmolLM2-135M and Gemma 3 270M, each at LoRA's first rank)."""
    d = read_results("scaling/scaling_law_models.json" if models else "scaling/scaling_law.json")
    if d is None:
        return ("(not run: `python benchmarks/scaling_law.py --models smollm2 gemma3-270m --methods lora`)" if models
                else "(not run)")
    what = "X (base model params)" if models else "X (trainable params)"
    rows = ["| method | fit: L = A / (X^alpha D_f^beta) + E | RMSE (log L) |", "|---|---|---|"]
    for m, f in d["fits"].items():
        rows.append(f"| {m} | {f['A']:.3g} / (X^{f['alpha']:.3f} D_f^{f['beta']:.3f}) + {f['E']:.3f} | "
                    f"{f['rmse_log']:.3f} |")
    sizes = sorted({p[1] for pts in d["points"].values() for p in pts})
    rows += ["", f"| method | {what} | " + " | ".join(f"D_f={s}" for s in sizes) + " |",
             "|" + "---|" * (2 + len(sizes))]
    for m, pts in d["points"].items():
        for x in sorted({p[0] for p in pts}):
            loss = {dsz: l for xi, dsz, l in pts if xi == x}
            rows.append(f"| {m} | {x:,} | " + " | ".join(fmt(loss.get(s)) for s in sizes) + " |")
    return "\n".join(rows)


def dpzero_clipping_table(split: str = "val") -> str:
    d = read_results(f"dpzero_clipping/{split}.json")
    if d is None:
        return "(not run)"
    rows = ["| run | acc at steps 0/40/80/120/160/200 | final acc | eval loss (final) | final C | epsilon | s/step |",
            "|" + "---|" * 7]
    for name, r in d.items():
        curve = " / ".join(f"{a:.3f}" for _, a in r["eval_curve"])
        loss = (read_results(f"dpzero_clipping/{split}/{name}/summary.json") or {}).get("final_eval_loss")
        rows.append(f"| {name} | {curve} | {fmt(r['final_accuracy'])} | {fmt(loss)} | "
                    f"{fmt(r['clip_final'], '.2f')} | {fmt(r['epsilon'], '.2f')} | {fmt(r['time_per_step_s'], '.2f')} |")
    return "\n".join(rows)


def threads(row: dict) -> str:
    """The thread setting a defaults row's wall time was measured at ('' where it was not recorded)."""
    value = row.get("threads")
    return "" if value is None else " (GPU)" if value == "cuda" else f" ({value} thr)"


def wall_time(row: dict) -> str:
    """A defaults row's wall time in minutes with its thread setting; '-' where a private run withheld it."""
    return "-" if row.get("wall_time_s") is None else f"{row['wall_time_s'] / 60:.0f} min{threads(row)}"


def defaults_table() -> str:
    """benchmarks/defaults.py: every method at its defaults on the full SST-2 dev set, with its target."""
    import defaults as bench

    d = {name: bench.released(name, r) for name, r in (read_results("defaults.json") or {}).items()}
    rows = ["| run | trainable params | steps | dev acc (best = saved) | best step | final acc | epsilon | peak MB "
            "| wall time | target | met (final acc) |", "|" + "---|" * 11]
    for name, (_, target) in bench.RUNS.items():
        r = d.get(name)
        if r is None:
            rows.append(f"| {name} | - | - | {bench.progress(bench.OUT / name)} | - | - | - | - | - | {target} | - |")
            continue
        met, why = bench.verdict(name, d)
        rows.append(f"| {name}{mark(r)} | {r['trainable_params']:,} | {r['steps']} | {fmt(r['best_accuracy'])} | "
                    f"{r['best_step']} | {fmt(r['final_accuracy'])} | {fmt(r['epsilon'], '.2f')} | "
                    f"{fmt(r['peak_mem_mb'], ',.0f')} | {wall_time(r)} | {target} | "
                    f"{({True: 'yes', False: '**no**', None: 'comparison' if bench.TARGETS[name][0] == 'compare' else 'not yet'}[met])}: {why} |")
    zeros = {}  # each row's zero-shot: per model and prompt (one number under rows of two prompts misled)
    for name, r in d.items():
        if r.get("zero_shot_accuracy") is not None:
            kind = f"{'Gemma 3 270M' if name.startswith('gemma') else 'SmolLM2'}, " \
                   f"{'old prompt' if earlier_prompt(r) else 'current prompt'}"
            zeros.setdefault(kind, r["zero_shot_accuracy"])
    zero_text = "; ".join(f"{v:.3f} ({k})" for k, v in zeros.items())
    return "\n".join(rows) + ("\n\nVerdicts use the final accuracy: the best one is chosen on this dev set. Wall "
                              "time: steps x mean step time (evaluations excluded), at the torch threads shown (a "
                              "1-thread run had one other 1-thread run beside it); rows without a count predate its "
                              "recording: the Gemma and bf16 rows ran at 1 thread beside one other run, the others at "
                              "2 threads, often beside other runs." +
                              (" Peak MB and wall time '-': a private run that did not log private stats (both are "
                               "measured on its private batches; its epsilon does not cover them)."
                               if any(bench.withheld(n, r) for n, r in d.items()) else "") +
                              (f" Zero-shot dev accuracy: {zero_text}." if zeros else "") + " " +
                              EARLIER_NOTE)


def sweep_table() -> str:
    """benchmarks/defaults_sweep.py: the candidates per pair on the train split, and the one selected."""
    d = read_results("defaults_sweep.json")
    if d is None:
        return "(not run)"
    rows = ["| pair | candidate | val acc (final) | val loss (final) | val acc (best, step) | steps | s/step | selected |",
            "|" + "---|" * 8]
    for pair, r in d.items():
        for name, c in r["candidates"].items():
            rows.append(f"| {pair} | {name} | {fmt(c['final_accuracy'])} | {fmt(c.get('final_eval_loss'))} | "
                        f"{fmt(c['best_accuracy'])} ({c['best_step']}) | {c['steps']} | "
                        f"{fmt(c['time_per_step_s'], '.2f')} | {'yes' if name == r['selected'] else ''} |")
    return "\n".join(rows)


def e2e_table() -> str:
    """benchmarks/e2e_generation.py: E2E NLG validation.csv (67 MRs, 556 references), each saved model scored once."""
    import e2e_generation as bench

    d = read_results("e2e.json") or {}
    floor, verdict = d.get("inference") or {}, bench.verdicts(d)
    rows = ["| run | trainable params | steps | BLEU | ROUGE-L | loss | peak MB (train) | peak / inference | train time "
            "| epsilon | target | met |", "|" + "---|" * 12]
    for name in bench.RUNS:
        r = d.get(name)
        if r is None:
            rows.append(f"| {name} | - | - | not run yet | - | - | - | - | - | - | - | - |")
            continue
        v, t = r["validation"], verdict.get(name, {})
        train_time = f"{r['train_time_s'] / 60:.0f} min" if r.get("train_time_s") else "-"
        ratio = f"{r['peak_mem_mb'] / floor['peak_mem_mb']:.2f}" if r.get("peak_mem_mb") and floor else "-"
        met = {True: "yes", False: "**no**", None: "reference not run"}[t["met"]] if t else "-"
        rows.append(f"| {name} | {fmt(r.get('trainable_params'), ',')} | {r.get('steps') or 0} | {v['bleu']:.1f} | "
                    f"{v['rougeL']:.1f} | {v['loss']:.3f} | {fmt(r.get('peak_mem_mb'), ',.0f')} | {ratio} | "
                    f"{train_time} | {fmt(r.get('epsilon'), '.2f')} | {t.get('target', '-')} | {met} |")
    if floor:
        rows += ["", f"Inference floor (`inference`): two forward passes of the loss on {floor['batches']} training "
                     f"batches of {floor['batch_size']}, SmolLM2 + untrained LoRA, no gradient and one worst-case "
                     f"batch ({floor['worst_case_batch']}): peak {floor['peak_mem_mb']:,.0f} MB "
                     f"({floor['typical_batches_peak_mem_mb']:,.0f} MB over the typical batches alone), "
                     f"{floor['two_forwards_s']:.1f} s per two forwards. The ratio column divides by the worst-case "
                     "peak: a run's peak is set by the largest batch it draws."]
    return "\n".join(rows)


def federated_sweep_table() -> str:
    """benchmarks/federated_sweep.py: FedLPP settings scored on 200 held-out *training* rows (never dev)."""
    import federated_sweep as bench

    d = read_results("federated_sweep.json") or {}
    rows = [f"| candidate | differs from FedAvgM 0.9, 3 local steps, lr 1e-3 | server acc per round | final "
            f"| mean of last {bench.LAST} | chosen |", "|" + "---|" * 6]
    for name, change in bench.CANDIDATES.items():
        r = d.get(name)
        what = ", ".join(f"{k} {v}" for k, v in change.items()) or "-"
        if r is None:
            rows.append(f"| {name} | {what} | not run yet | - | - | - |")
            continue
        rows.append(f"| {name} | {what} | {' / '.join(f'{a:.2f}' for a in r['accuracy'])} | {fmt(r['final'])} | "
                    f"{fmt(r['mean_last'])} | {'**yes**' if d.get('chosen') == name else ''} |")
    return "\n".join(rows)


def zo_convergence_table() -> str:
    """benchmarks/zo_convergence.py: dev accuracy against training forward passes, pool vs Gaussian z, FZOO vs MeZO."""
    import zo_convergence as bench

    d = read_results("zo_convergence.json") or {"runs": {}, "targets": {}}
    d = bench.judged(d)  # verdicts weighed as bounds, whatever code wrote the file
    clock = d.get("wall_clock_to_target") or {}
    rows = ["| run | forwards / step | dev acc at each evaluation (every ~500 forwards, from 0) | final acc "
            "| forwards to 80% | seconds to 80% (x AdamW + LoRA) | s/step | status |", "|" + "---|" * 8]
    for name, (flags, fps) in bench.RUNS.items():
        r = d["runs"].get(name)
        if r is None:
            rows.append(f"| {name} | {fps} | not run yet | - | - | - | - | - |")
            continue
        to = r["forwards_to_target"]
        budget = flags[flags.index("--steps") + 1]
        status = "finished" if r["finished"] else f"unfinished, resumable (evaluated to step {r['steps'][-1]} of {budget})"
        if name in bench.REFINE:  # stopped on purpose: after its one evaluation
            status = (f"{bench.REFINE[name]} again, evaluated only at step {r['steps'][-1]} (between its last two "
                      "evaluations); stopped there")
        elif name in bench.DENSE:  # stopped on purpose: at its first evaluation at 80%, or DENSE_MAX_STEPS without it
            reached = max(r["accuracy"]) >= bench.TARGET_ACC
            status = (f"{bench.DENSE[name]} again, evaluated every {bench.DENSE_EVAL_EVERY} steps: stopped at its "
                      f"first evaluation at 80% (step {r['steps'][-1]} of {budget})" if reached else
                      f"{bench.DENSE[name]} again, evaluated every {bench.DENSE_EVAL_EVERY} steps: "
                      + (f"not at 80% by step {r['steps'][-1]}" if r["steps"][-1] >= bench.DENSE_MAX_STEPS
                         else f"running (evaluated to step {r['steps'][-1]})"))
        if r["finished"] and r.get("stop_reason") not in (None, "completed"):  # final_accuracy: its last evaluation's
            status = (f"stopped at step {r.get('stopped_at')} of {budget}: {r['stop_reason']} (last evaluated at step "
                      f"{r['steps'][-1]})")
        seconds = r.get("seconds_to_target")
        ratio = (clock.get(name) or {}).get("ratio")
        seconds = "not reached" if seconds is None else f"{seconds:,.0f}" + (f" ({ratio:.2f}x)" if ratio else "")
        rows.append(f"| {name}{mark(r)} | {fps} | "
                    f"{' / '.join(f'{a:.3f}' for a in r['accuracy'])} | {fmt(r['final_accuracy'])} "
                    f"| {'not reached' if to is None else f'{to:,}'} | {seconds} | {fmt(r['time_per_step_s'], '.2f')} "
                    f"| {status} |")
    notes = []
    for name, c in clock.items():
        if c.get("le_2x") is not None or c.get("ratio") is not None:
            notes.append(f"{name}: wall-clock to 80% {clock_verdict(c)} (target <= {bench.WALL_CLOCK_RATIO:g}x "
                         f"{bench.REFERENCE}), in the runs' own seconds (their thread settings differ)")
    harder = d.get("harder_level")
    for name, c in (d.get("wall_clock_to_harder_level") or {}).items():
        if c.get("ratio") is not None or c.get("le_2x") is not None:
            ratio = f"never got there ({bench.REFERENCE} did)" if c["ratio"] is None else \
                f"{c['ratio']:.2f}x {bench.REFERENCE}'s, in the runs' own seconds"
            notes.append(f"{name}: wall-clock to {100 * harder:.0f}% (a harder level, reported beside the target's "
                         f"80%): {ratio}")
    for name, c in (d.get("wall_clock_same_setting") or {}).items():
        if c.get("ratio") is None:
            continue
        (steps, ref_steps), (cost, ref_cost) = c["steps_to_target"], c["step_cost_in_two_forwards"]
        notes.append(f"{name}, same setting: {steps} steps x {cost:.2f} two-forward costs against {bench.REFERENCE}'s "
                     f"{ref_steps} x {ref_cost:.2f} = **{c['ratio']:.2f}x** (step costs from one zo_step.py run, "
                     f"{c.get('threads')} thread; target <= {bench.WALL_CLOCK_RATIO:g}x: {clock_verdict(c)})")
    for name, c in (d.get("wall_clock_dense") or {}).items():
        if c.get("ratio") is None and c.get("le_2x") is None and not c.get("ratio_bounds"):
            continue
        steps, ref_steps = c["steps_to_target"]
        threads = ", ".join(sorted({f"{s['threads']} thread{'s' if s['threads'] != 1 else ''} on {s['device']}"
                                    for s in c.get("settings") or [] if s})) or "setting not recorded"
        refined = " and once between the last two (its -refine run)" if all(c.get("refined") or [False]) else ""
        notes.append(f"{name} vs {c['reference']} (both evaluated every {c['eval_every']} steps{refined}, one after "
                     f"the other, {threads}): 80% at step {steps if steps is not None else 'never'} vs {ref_steps}, "
                     + ("" if c["ratio"] is None else f"{c['seconds_to_target']:,.0f} vs {c['reference_seconds']:,.0f} "
                        f"training seconds = **{c['ratio']:.2f}x**; ")
                     + f"target <= {bench.WALL_CLOCK_RATIO:g}x: {clock_verdict(c)}")
    for name, c in (d.get("wall_clock_dense_same_setting") or {}).items():
        if c.get("ratio") is None and c.get("le_2x") is None:
            continue
        (steps, ref_steps), (cost, ref_cost) = c["steps_to_target"], c["step_cost_in_two_forwards"]
        low, high = c.get("ratio_bounds") or (None, None)
        span = "" if low is None or high is None else \
            " (exact: evaluations one step apart at 80%)" if low == high else f", between {low:.2f}x and {high:.2f}x"
        every = f"every {c['eval_every']} steps" + (", then at the step between the last two" if all(
            c.get("refined") or [False]) else "")
        notes.append(f"{name}, same setting: {steps} steps x {cost:.2f} two-forward costs against {c['reference']}'s "
                     f"{ref_steps} x {ref_cost:.2f} = **{c['ratio']:.2f}x**{span} (evaluations {every}; step costs "
                     f"from one zo_step.py run, {c.get('threads')} thread; "
                     f"target <= {bench.WALL_CLOCK_RATIO:g}x: {clock_verdict(c)})")
    for key, t in d["targets"].items():
        if "gap_at_last_common_step" in t and t["gap_at_last_common_step"] is not None:
            verdict = {True: "met", False: "**not met**", None: "runs not finished"}[t["within_1_point"]]
            notes.append(f"{key.replace('_vs_', ' vs ')}: gap {100 * t['gap_at_last_common_step']:+.1f} pts at step "
                         f"{t['common_steps'][-1]}; at each evaluation: "
                         + " / ".join(f"{100 * g:+.1f}" for g in t["gap_at_each_step"]) + " pts "
                         f"(target within 1 point: {verdict})")
        elif "le_half" in t:
            run, ref = key.split("_vs_")
            reached = lambda f: "not reached" if f is None else f"{f:,}"
            fa, fb = t["forwards_to_target"]
            ratio = "" if t["ratio"] is None else f", {t['ratio']:.2f}x"
            verdict = {True: "met", False: "**not met**", None: "**not shown**: MeZO never reached 80%, so its "
                       "forwards to 80% are only known to exceed its budget"}[t["le_half"]]
            notes.append(f"{run} vs {ref}, training forwards to 80%: {reached(fa)} vs {reached(fb)}{ratio} "
                         f"(target <= 0.5x: {verdict})")
            if t.get("reached_level") is not None:
                la, lb = t["forwards_to_reached_level"]
                at, above = t["ratio_at_reached_level"], t.get("ratio_at_reached_level_above")
                ratio = f"{at:.2f}x" if at is not None else f"more than {above:.1f}x" if above else "-"
                notes.append(f"to {100 * t['reached_level']:.0f}% (the highest 5-point level MeZO reached): "
                             f"{reached(la)} vs {reached(lb)} ({ratio})")
            if t.get("gap_at_equal_forwards"):
                notes.append(f"{run} - {ref} at equal forwards (each ~500): "
                             + " / ".join(f"{100 * g:+.1f}" for g in t["gap_at_equal_forwards"]) + " pts")
    if any(earlier_prompt(r) for r in d["runs"].values()):
        notes.append(EARLIER_NOTE.rstrip("."))
    return "\n".join(rows) + ("\n\n" + "\n".join(f"- {n}." for n in notes) if notes else "")


def clock_verdict(c: dict) -> str:
    """A wall-clock comparison's verdict (zo_convergence.wall_clock / same_setting_clock): met, **not met**, or
    unresolved with why (`clock_why`)."""
    if c.get("le_2x") is not None:
        return "met" if c["le_2x"] else "**not met**"
    why = clock_why(c)
    return f"unresolved ({why})" if why else "unresolved"


def clock_why(c: dict, level: float = 0.8) -> str:
    """Why a wall-clock comparison to `level` has no verdict: the runs that reached it at their first evaluation (an
    upper bound only) and the bounds the evaluations allow on the ratio; '' when nothing is known."""
    low, high = c.get("ratio_bounds") or (None, None)
    first = c.get("first_evaluation") or []
    why = [f"{' and '.join(first)} reached {level:.0%} at {'their' if len(first) > 1 else 'its'} first evaluation: "
           "an upper bound only"] if first else []
    if low is not None or high is not None:
        why.append("the ratio is " + ("bounded neither way" if not low and high is None else
                                      f"only known to be above {low:.2f}x" if high is None else
                                      f"between {low or 0:.2f}x and {high:.2f}x"))
    return "; ".join(why)


ZO_STEP_LABELS = {
    "inference": "inference (2 forwards)", "inference_lora": "inference + LoRA (2 forwards)",
    "adamw_full": "AdamW, full backprop", "naive_mezo_full": "naive MeZO (out-of-place, 4 sweeps)",
    "mezo_full": "slimtune `mezo`, full (gaussian z)", "mezo-pool_full": "slimtune `mezo`, full, `--perturbation pool`",
    "mezo-rademacher_full": "slimtune `mezo`, full, `--perturbation rademacher`",
    "lozo_full": "slimtune `lozo`, full (r=2)", "mezo_lora": "slimtune `mezo` + LoRA r=8",
    "lozo_lora": "slimtune `lozo` + LoRA r=8",
    "hybrid_lora": "slimtune `hybrid` + LoRA r=8 (AdamW top 2 blocks, MeZO below)",
    "adamw_lora": "AdamW + LoRA r=8 (backprop through every block)"}


def zo_step_table() -> str:
    """benchmarks/zo_step.py. The time ratio divides by two forward passes timed alternately in the same process."""
    from zo_step import same_run_as_floor

    d = read_results("zo_step.json")
    if d is None:
        return "not run yet"
    rows = ["| configuration | trainable params | step time (s) | two forwards, same process (s) | time / two forwards | "
            "time / inference process | peak memory (MB) | memory / inference |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in d["results"].items():
        q = d["ratios"][name]
        n = r["trainable_params"]
        params = f"{n / 1e6:.1f}M" if n >= 1e6 else (f"{n / 1e3:.1f}K" if n else "0")
        other_threads = r.get("threads") not in (None, d["threads"])  # run later, alone in its process pool
        later = not same_run_as_floor(d, name)  # another invocation than the inference row it would divide by
        label = ZO_STEP_LABELS.get(name, name) + (f" ({r['threads']} thread, run later)" if other_threads else
                                                  " (run later)" if later else "")
        floor_process = "-" if later else f"{q['time_vs_floor_process']:.2f}"  # another run's inference: not comparable
        memory = "-" if later else f"{q['memory_vs_inference']:.3f}"
        rows.append(f"| {label} | {params} | {r['step_time_s']:.2f} | {r['two_forwards_s']:.2f} | "
                    f"{q['time_vs_two_forwards']:.2f} | {floor_process} | {r['peak_mem_mb']:,.0f} | {memory} |")
    met = ", ".join(f"{k}: {'met' if v else '**not met**'}" for k, v in d["targets_met"].items())
    later = not all(same_run_as_floor(d, name) for name in d["results"])
    return "\n".join(rows) + (f"\n\nTargets in the script: {met}. torch {d['torch']}, {d['threads']} threads, "
                              f"medians of {d.get('steps', '?')} timed steps per configuration." +
                              (" A row timed later (another invocation and thread setting) shows no ratio against the "
                               "inference rows' time or peak, which are another run's: '-'." if later else ""))


def gguf_table() -> str:
    d = json.loads((RESULTS / "gguf_export.json").read_text())
    rows = ["| output type | file size (MB) | max \\|logit diff\\| / std | top-1 agreement | verified | time (s) |",
            "|---|---:|---:|---:|---|---:|"]
    for q, r in d["results"].items():
        rows.append(f"| {q} | {r['bytes'] / 2**20:,.0f} | {r['max_abs_diff_over_std']:.4f} | {r['top1_agreement']:.3f} | "
                    f"{'yes' if r['verified'] else 'no'} | {r['seconds']:.0f} |")
    return "\n".join(rows)


def generation_speed_table() -> str:
    """benchmarks/generation_speed.py: greedy decoding of the 67 E2E validation MRs (issue 12: under 60 s)."""
    d = read_results("generation_speed.json")
    if d is None:
        return "not run yet"
    rows = ["| model | prompts | batch | new tokens | time (s) | tokens/s | under 60 s |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in d["rows"].items():
        rows.append(f"| {name} | {r['prompts']} | {r['batch_size']} | {r['generated_tokens']:,} | {r['seconds']:.1f} | "
                    f"{r['tokens_per_s']:.0f} | {'yes' if r['under_target'] else '**no**'} |")
    return "\n".join(rows) + (f"\n\nGreedy, at most {d['max_new_tokens']} new tokens, fastest of the timed passes; "
                              f"{d['device']}, {d['threads']} threads, torch {d['torch']}.")


MAIN_RUNS = ["fo-lora", "fo-lora-lr3e-4", "zo-lora", "lozo-full"]
DP_RUNS = ["zo-lora", "dpzero-lora-eps6", "dpzero-lora-eps2", "dp-adamw-lora-eps6"]
PEFT_RUNS = ["fo-full", "fo-lora-lr3e-4", "fo-lora", "fo-pissa", "fo-svfit", "lozo-full", "zo-lora", "zo-pissa",
             "zo-svfit"]
# table name (as in README's <!-- NAME:start --> markers and on the command line) -> what prints it
TABLES = {"sst2": lambda: grid_table("sst2", MAIN_RUNS, 0.8), "dp": lambda: grid_table("sst2", DP_RUNS, 0.8),
          "peft": lambda: grid_table("sst2", PEFT_RUNS, 0.8), "mia": mia_table, "federated": federated_table,
          "federated-attacks": federated_attacks_table, "broadcast": broadcast_table,
          "federated-hostile": federated_hostile_table,
          "robust-rules": lambda: __import__("robust_rules").table(read_results("robust_rules.json")),
          "scaling": scaling_table, "scaling-models": lambda: scaling_table(models=True),
          "defaults": defaults_table, "defaults-sweep": sweep_table, "e2e": e2e_table,
          "generation-speed": generation_speed_table, "zo-step": zo_step_table, "gguf": gguf_table,
          "dpzero-clipping": dpzero_clipping_table, "zo-convergence": zo_convergence_table,
          "federated-sweep": federated_sweep_table, "targets": lambda: __import__("targets").targets_table(),
          "scale": lambda: __import__("scale").scale_table(),
          "scale-cuda": lambda: __import__("scale").scale_table(cuda=True),
          "rte": lambda: grid_table("rte", ["fo-lora-lr3e-4", "fo-svfit", "zo-lora", "dpzero-lora-eps6"], 0.55)}


def main() -> None:
    which = sys.argv[1:] or ["sst2", "dp", "peft", "mia", "federated", "rte", "scaling"]
    unknown = [w for w in which if w not in TABLES]
    if unknown:
        sys.exit(f"error: unknown table {', '.join(unknown)}; known: {', '.join(TABLES)}")
    for w in which:
        print(f"\n<!-- {w} -->")
        print(TABLES[w]())


if __name__ == "__main__":
    main()

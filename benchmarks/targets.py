"""The open issues' targets in one table, each read from the results file that measures it (README: `targets` block).

A row says met, **missed** (with the number), or not run yet / not built; the details are on the docs' benchmark pages.
Usage: python benchmarks/readme_tables.py targets
"""

from __future__ import annotations

from tables import EARLIER, clock_why, earlier_prompt, mark, read_results
from launch import same_prompt
from zo_convergence import judged
from zo_step import same_run_as_floor

FORWARD_ONLY = ("mezo-lora-gaussian", "mezo-lora-pool", "fzoo-lora", "mezo-full-gaussian", "mezo-full-pool",
                "hizoo-lora", "hizoo-l-full", "sparse-mezo-full", "mezo-lora-10k")


def verdict(ok: bool | None, value: str) -> str:
    if ok is None:
        return value or "not run yet"
    return f"met ({value})" if ok else f"**missed** ({value})"


def federated_rows() -> list[list[str]]:
    """Issue 35's targets under what a run gets: the default --robust auto without root data (the direction filter
    for LoRA replies, the mean for zo-seeds), and with --root-data (auto is then trust; zo-seeds is refused there, so
    its attack does not apply)."""
    from federated_attacks import honest_reference, judged_gap
    from slimtune.federated import FederatedConfig
    from slimtune.federated.config import robust_rule
    from slimtune.federated.hostile import ATTACKS, LORA_ATTACKS
    results = read_results("federated_hostile.json") or {}
    default = FederatedConfig.robust  # the targets are about what a run gets: rows under the default's aggregation

    def rule_of(setup: dict, root_data: bool) -> bool:
        mode = "zo-seeds" if str(setup.get("reference", "")).startswith("honest-zo-seeds") else "lora"
        return robust_rule(setup.get("robust") or "none", mode, False) == robust_rule(default, mode, False, root_data) \
            and not setup.get("server")  # a row under another server step than the default's
    rows = []
    for root_data, setting, attacks in ((False, f"the default --robust {default}", ATTACKS),
                                        (True, f"--root-data: --robust {default} is trust", LORA_ATTACKS)):
        for count, margin in ((1, 3.0), (2, 5.0)):
            gaps = []
            for name, r in results.items():
                setup = r.get("setup", {})
                if setup.get("attack") and setup.get("hostile_clients") == count and rule_of(setup, root_data):
                    honest = honest_reference(name, setup, results)[1]
                    if not same_prompt(r, honest or {}):
                        continue  # a gap across prompts is no gap (the prompt alone moved the start by 33 points)
                    gap, on = judged_gap(r, honest)
                    if gap is not None:
                        gaps.append((gap, setup["attack"], on, earlier_prompt(r)))
            worst = min(gaps) if gaps else None
            missing = [a for a in attacks if a not in {g[1] for g in gaps}]
            sets = sorted({g[2] for g in gaps})
            old = EARLIER if any(g[3] for g in gaps) else ""
            value = "" if worst is None else (f"worst {worst[0]:+.1f} pts ({worst[1]}) over {len(gaps)} of "
                                              f"{len(attacks)} attacks, on {' / '.join(sets)}{old}" +
                                              (f"; not run: {', '.join(missing)}" if missing else ""))
            shown = verdict(None if worst is None else worst[0] >= -margin, value)
            if missing and worst is not None and worst[0] >= -margin:
                shown = f"met where run, incomplete ({value})"
            rows.append(["35", f"{count} of 8 clients hostile, 30 rounds ({setting})",
                         f"within {margin:g} pts of all-honest", shown])
    return rows


def private_row(private: dict | None, hybrid: dict | None, partial: dict | None) -> str:
    """DP-hybrid + LoRA at epsilon 6 against the (non-private) hybrid, the best method so far."""
    if private is not None and hybrid is None:
        return (f"not compared: {private['final_accuracy']:.3f}{mark(private)}; "
                "hybrid-lora is being rerun with SST-2's new prompt")
    if private is None or hybrid is None:
        seen = "" if not partial or not partial.get("accuracy") else \
            f"; running: {partial['accuracy'][-1]:.3f} at step {partial['steps'][-1]}"
        return f"not run yet (dphybrid-lora-eps6, benchmarks/zo_convergence.py{seen})"
    if not same_prompt(private, hybrid):
        return (f"not compared: {private['final_accuracy']:.3f}{mark(private)} vs "
                f"hybrid-lora {hybrid['final_accuracy']:.3f}{mark(hybrid)}")
    gap = (private["final_accuracy"] - hybrid["final_accuracy"]) * 100
    return verdict(gap >= -2, f"{private['final_accuracy']:.3f}{stopped(private)} vs hybrid-lora "
                               f"{hybrid['final_accuracy']:.3f}{stopped(hybrid)} ({gap:+.1f} pts)")


def stopped(run: dict) -> str:
    """For a run that stopped before its last step (privacy budget exhausted, early stopping), the step its final
    accuracy (its last evaluation) is from and where and why it stopped; '' for a run that completed."""
    if run.get("stop_reason") in (None, "completed") or not run.get("steps"):
        return ""
    return f" (last evaluated at step {run['steps'][-1]}; stopped at {run.get('stopped_at')}: {run['stop_reason']})"


def hybrid_verdict(hybrid: dict | None, memory, running: str, old: str) -> str:
    """The hybrid's row: accuracy >= 0.87 and peak memory <= 1.5x inference's (zo_step.json). A memory ratio against
    another run's inference peak ('other run') is no measurement: the row is missed on accuracy alone, unresolved
    otherwise."""
    if hybrid is None:
        return verdict(None, running)
    shown = "not measured" if memory is None else \
        "not comparable (zo_step.json: timed in another run than its inference row)" if memory == "other run" else \
        f"{memory:.2f}x (zo_step.json)"
    value = f"{hybrid['final_accuracy']:.3f}{old}, memory {shown}"
    if hybrid["final_accuracy"] < 0.87:
        return verdict(False, value)
    if not isinstance(memory, float):
        return f"unresolved ({value})"
    return verdict(memory <= 1.5, value)


def clock_row(c: dict, value: str, tail: str = "") -> str:
    """The wall-clock row: met / **missed** where the evaluations settle it, unresolved (with why) where they do
    not (tables.clock_why)."""
    if c.get("le_2x") is not None:
        return verdict(c["le_2x"], value + tail)
    why = clock_why(c)
    return f"unresolved ({value}" + (f"; {why}" if why else "") + f"{tail})"


def dense_row(key: str, dense: dict) -> str:
    """The wall-clock row from the dense pair (zo_convergence.DENSE): the hybrid's ratio, its bounds, the setting."""
    name, c = next(iter(dense.items()))
    low, high = c.get("ratio_bounds") or (None, None)
    span = "" if low is None or high is None else f" (bounds {low:.2f}x-{high:.2f}x)"
    how = (f"step costs in one setting, {c.get('threads')} thread" if key == "wall_clock_dense_same_setting"
           else "the runs' own seconds")
    steps, ref_steps = c["steps_to_target"][:2]
    every = f"every {c['eval_every']} steps" + (" and at the step between the last two" if all(
        c.get("refined") or [False]) else "")
    span = "" if span and low == high else span  # exact: evaluations one step apart at the level
    return clock_row(c, f"{c['ratio']:.2f}x{span}, {name}: 80% at step {steps} vs AdamW + LoRA's {ref_steps}, both "
                        f"evaluated {every}, {how}")


def zo_rows() -> list[list[str]]:
    conv = (read_results("zo_convergence.json") or {}).get("runs", {})
    defaults = read_results("defaults.json") or {}
    finished = {n: r for n, r in conv.items() if r.get("finished")}
    forward = {n: r["final_accuracy"] for n, r in finished.items() if n in FORWARD_ONLY and "10k" not in n}
    forward.update({n: r["final_accuracy"] for n, r in defaults.items()
                    if n in ("mezo-lora", "mezo-svfit", "lozo-full") and r.get("final_accuracy") is not None})
    best = max(forward.items(), key=lambda kv: kv[1]) if forward else None
    entry_of = lambda n: finished.get(n) or defaults.get(n)  # noqa: E731
    old = lambda n: mark(entry_of(n))  # noqa: E731
    hybrid = finished.get("hybrid-lora")

    def running(name: str) -> str:
        r = conv.get(name)
        if not r or not r.get("accuracy"):
            return "not run yet" if not r else f"running ({name}, nothing evaluated yet)"
        return f"running ({name}): {r['accuracy'][-1]:.3f} at step {r['steps'][-1]}"
    conv_doc = read_results("zo_convergence.json") or {}
    step = read_results("zo_step.json") or {}
    conv_doc = judged(conv_doc)  # verdicts weighed as bounds, whatever code wrote the file
    own = {n: c["ratio"] for n, c in (conv_doc.get("wall_clock_to_target") or {}).items() if c.get("ratio")}
    same = {n: c for n, c in (conv_doc.get("wall_clock_same_setting") or {}).items() if c.get("ratio")}
    clock = same or {n: c for n, c in (conv_doc.get("wall_clock_to_target") or {}).items() if c.get("ratio")}
    # step costs from one setting when measured, else the runs' own seconds; a run that met it beats an unresolved
    # one (the evaluations allow no verdict: clock_verdict), which beats one that did not
    # the dense pair (zo_convergence.DENSE: both runs evaluated every 2 steps), where it has measured the ratio,
    # decides the row: step costs from one setting first, its own seconds otherwise
    dense, dense_key = {}, next((key for key in ("wall_clock_dense_same_setting", "wall_clock_dense")
                      if any(c.get("ratio") is not None for c in (conv_doc.get(key) or {}).values())), None)
    if dense_key:
        dense = {n: c for n, c in conv_doc[dense_key].items() if c.get("ratio") is not None}
    rank = {True: 0, None: 1, False: 2}
    fastest = min(((n, c["ratio"]) for n, c in clock.items()), key=lambda kv: (rank[clock[kv[0]]["le_2x"]], kv[1]),
                  default=None)

    def harder_note(name: str) -> str:
        """From SST-2's new prompt 80% is 2 points over zero-shot (0.78): the harder level beside it."""
        c = (conv_doc.get("wall_clock_to_harder_level") or {}).get(name) or {}
        level = conv_doc.get("harder_level")
        if not level or (c.get("ratio") is None and c.get("le_2x") is None):
            return ""
        shown = "never reached" if c["ratio"] is None else \
            f"{c['ratio']:.2f}x in own seconds (their thread settings differ)"
        return f"; to {100 * level:.0f}% (zero-shot is now 0.78): {shown}"
    clock_note = "" if fastest is None else (
        f", step costs in one setting (own seconds, their thread settings differ: {own[fastest[0]]:.2f}x)"
        if same and fastest[0] in own else
        ", runs' own seconds (thread settings differ)" if not same else ", step costs in one setting")
    e2e = read_results("e2e.json") or {}
    adamw_bleu = (e2e.get("adamw-lora") or {}).get("validation", {}).get("bleu")
    zo_bleu = {n: r["validation"]["bleu"] for n, r in e2e.items()
               if n not in ("zero-shot", "adamw-lora", "inference") and isinstance(r, dict) and "validation" in r
               and r.get("epsilon") is None}
    best_bleu = max(zo_bleu.items(), key=lambda kv: kv[1]) if zo_bleu else None
    ratios = step.get("ratios") or {}
    forward_only = [r["memory_vs_inference"] for n, r in ratios.items()  # against its own run's inference only
                    if n.startswith(("mezo", "lozo")) and r.get("memory_vs_inference") and same_run_as_floor(step, n)]
    memory = max(forward_only) if forward_only else None
    hybrid_memory = (ratios.get("hybrid_lora") or {}).get("memory_vs_inference")
    if hybrid_memory is not None and not same_run_as_floor(step, "hybrid_lora"):
        hybrid_memory = "other run"  # timed later (--only): its inference peak is another run's
    rows = [
        ["36", "best forward-only method, 2,000 steps (SST-2 dev)", ">= 0.84",
         verdict(None if best is None else best[1] >= 0.84,
                 ("" if best is None else f"{best[1]:.3f}, {best[0]}{old(best[0])}") + "".join(
                     f"; {running(n)} from the new prompt" for n in FORWARD_ONLY
                     if n in conv and not conv[n].get("finished") and not earlier_prompt(conv[n])
                     and conv[n].get("accuracy")))],
        ["36", "hybrid (backprop through <= 2 blocks), 2,000 steps", ">= 0.87 at <= 1.5x inference memory",
         hybrid_verdict(hybrid, hybrid_memory, running("hybrid-lora"), old("hybrid-lora"))],
        ["36", "wall-clock to 80% dev, best ZO or hybrid / AdamW + LoRA", "<= 2x",
         dense_row(dense_key, dense) if dense else
         "not measured yet: no ZO or hybrid run of the reference's prompt has reached 80%" if fastest is None else
         clock_row(clock[fastest[0]], f"{fastest[1]:.2f}x, {fastest[0]}{old(fastest[0])}{clock_note}",
                   harder_note(fastest[0]))],
        ["36", "E2E BLEU, best ZO or hybrid, 2,000 steps", f">= 0.75 x AdamW ({0.75 * (adamw_bleu or 0):.1f})",
         verdict(None if best_bleu is None or adamw_bleu is None else best_bleu[1] >= 0.75 * adamw_bleu,
                 "" if best_bleu is None else f"{best_bleu[1]:.1f}, {best_bleu[0]}")],
        ["36", "private version of the best method, epsilon 6", ">= best non-private - 2 pts",
         private_row(finished.get("dphybrid-lora-eps6"), hybrid, conv.get("dphybrid-lora-eps6"))],
        ["36", "forward-only peak memory / inference", "<= 1.1x",
         verdict(None if memory is None else memory <= 1.1,
                 "" if memory is None else f"largest {memory:.3f}x, zo_step.json")],
    ]
    return rows


def scale_rows() -> list[list[str]]:
    rows_in = (read_results("scale.json") or {}).get("rows", {})
    seven = {r["method"]: r for r in rows_in.values() if r.get("arch") == "llama" and r.get("size") == "7b"}
    out = []
    mezo, inference = seven.get("mezo-full-bf16"), seven.get("inference-bf16")
    if mezo and inference and mezo.get("peak_rss_mb") and inference.get("peak_rss_mb"):
        ratio = mezo["peak_rss_mb"] / inference["peak_rss_mb"]
        ok = ratio <= 1.1 and mezo["peak_rss_mb"] < 16 * 1024
        out.append(verdict(ok, f"{ratio:.2f}x, {mezo['peak_rss_mb'] / 1024:.1f} GB"))
    else:
        out.append("not run yet")
    adamw = seven.get("adamw-full")
    out.append(verdict(None if adamw is None else str(adamw.get("status", "")).startswith("refused")
                       and adamw.get("predicted_mb", 0) > 24 * 1024,
                       "" if adamw is None else f"predicted {adamw.get('predicted_mb', 0) / 1024:.0f} GB, "
                                                f"{adamw.get('status')}"))
    int4 = seven.get("mezo-lora-int4")
    if int4 and int4.get("peak_rss_mb") and int4.get("step_over_two_forwards"):
        ok = int4["peak_rss_mb"] <= 6 * 1024 and int4["step_over_two_forwards"] <= 1.15
        out.append(verdict(ok, f"{int4['peak_rss_mb'] / 1024:.1f} GB, {int4['step_over_two_forwards']:.2f}x"))
    else:
        out.append("not run yet")
    ratios = lambda rows: [r["measured_over_predicted"] for r in rows if r.get("measured_over_predicted")  # noqa: E731
                           and r.get("size") in ("1b", "3b", "4b", "7b")]
    cpu, gpu = ratios(rows_in.values()), ratios((read_results("scale_cuda.json") or {}).get("rows", {}).values())
    ran = cpu + gpu
    out.append(verdict(None if not ran else all(0.85 <= x <= 1.15 for x in ran),
                       "" if not ran else f"{min(ran):.2f}-{max(ran):.2f}x over {len(cpu)} CPU rows"
                       + (f" and {len(gpu)} on an H200" if gpu else "")))
    defaults = read_results("defaults.json") or {}
    bf16, fp32 = defaults.get("mezo-lora-bf16"), defaults.get("mezo-lora")
    if bf16 and fp32 and not same_prompt(bf16, fp32):  # the prompt alone moves zero-shot by 26 points
        out.append(f"not compared: bf16 {bf16['final_accuracy']:.3f}{mark(bf16)} vs "
                   f"fp32 {fp32['final_accuracy']:.3f}{mark(fp32)} (other prompts)")
    else:
        gap = None if not (bf16 and fp32) else (bf16["final_accuracy"] - fp32["final_accuracy"]) * 100
        old = mark(bf16)
        out.append(verdict(None if gap is None else abs(gap) <= 1.0, "" if gap is None else f"{gap:+.1f} pts{old}"))
    names = [("MeZO full bf16 at 7B: peak / bf16 inference", "<= 1.1x, < 16 GB"),
             ("AdamW full at 7B", "predicted > 24 GB, refused"),
             ("MeZO + LoRA on an int4 7B base: peak, step / 2 forwards", "<= 6 GB, <= 1.15x"),
             ("planner vs measured peak, 1B-7B rows", "within 15%"),
             ("bf16 vs fp32 SST-2 dev (MeZO + LoRA, 2,000 steps)", "within 1 pt")]
    return [["38", name, target, value] for (name, target), value in zip(names, out)]


def targets_table() -> str:
    rows = ["| issue | figure | target | now |", "|---|---|---|---|"]
    for row in federated_rows() + zo_rows() + scale_rows():
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)

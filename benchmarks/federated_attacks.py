"""FedLPP at scale with its model-IP measured: 8 non-IID clients (Dirichlet 0.5), client sampling, many rounds, and
what colluding clients rebuild of the server's theta, per bit width (slimtune/federated/attacks.py).

Per bit width: server accuracy (theta), what a client receives (Q(theta)), the multi-round attack (mean of the last W
broadcasts), the coalition attack (k clients pool their data and fine-tune the best received estimate for the compute
one client gets) — per round where it is cheap, at the end for the coalition — plus a centralized run on the same
examples with the same total number of local steps. SST-2 dev (first --dev-size rows).

Results: benchmarks/results/federated_attacks.json, runs under benchmarks/results/federated_attacks/, plot
federated_attacks.png; README table: `python benchmarks/readme_tables.py federated-attacks`.
A finished run is kept (delete its directory to re-run it); `--threads` sets torch threads per process.

Hostile clients (issue 35), `--hostile all` (or some of size-lie norm-999 sign-flip inf-scalar): the same 8 clients,
4 sampled per round, 30 rounds, 4-bit broadcast, under the defaults a run gets (the swept server step, the server's
bound on every update), with 1 and 2 of the 8 clients hostile (partitions 0 and 1; slimtune/federated/hostile.py),
each compared with an all-honest run of the same settings: LoRA/AdamW clients for size-lie, norm-999 and sign-flip,
zo-seeds/MeZO clients for inf-scalar. Targets: theta's dev accuracy after the last round within 3 points of the
all-honest run with 1 hostile client, within 5 with 2. Results: benchmarks/results/federated_hostile.json, runs under
benchmarks/results/federated_hostile/; README table: `python benchmarks/readme_tables.py federated-hostile`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from federated_sweep import BASE as SWEEP_BASE
from federated_table import DATA, ROOT, subset
from launch import merged

OUT = ROOT / "benchmarks" / "results" / "federated_attacks"  # --out moves it (smoke runs)
HOSTILE_OUT = ROOT / "benchmarks" / "results" / "federated_hostile"
HOSTILE_TARGET = {1: 3.0, 2: 5.0}  # points of dev accuracy theta may lose against the all-honest run, by hostile count


# the settings of the first recorded run (the sweep's base, FedIT, no dither); a run that differs from them gets a
# name (and label) that says how
BASE = {**SWEEP_BASE, "aggregation": "fedavg", "dither": 0.0}


def variant(setup: dict) -> str:
    """'-fedadam-slr0.003', '-m0.5', '-ffa', '-dither2', '-avg0.8', '-local5', '-lr0.002' ... for the settings that
    differ from BASE ('' if none)."""
    get = lambda k: setup.get(k, BASE[k])
    out = ""
    if get("server_optimizer") != BASE["server_optimizer"]:
        out += f"-{get('server_optimizer')}"
    if get("server_lr") is not None:
        out += f"-slr{get('server_lr'):g}"
    if get("server_optimizer") == "fedavgm" and get("server_momentum") != BASE["server_momentum"]:
        out += f"-m{get('server_momentum'):g}"
    if get("aggregation") != BASE["aggregation"]:
        out += f"-{get('aggregation')}"
    if get("dither"):
        out += f"-dither{get('dither'):g}"
    if get("server_average"):
        out += f"-avg{get('server_average'):g}"
    if get("local_steps") != BASE["local_steps"]:
        out += f"-local{get('local_steps')}"
    if get("lr") != BASE["lr"]:
        out += f"-lr{get('lr'):g}"
    return out


def central_name(setup: dict) -> str:
    """The centralized reference of a run: the same LoRA trained on the same examples for the run's total number of
    local steps (rounds x clients per round x local steps) at the clients' lr. 'centralized' is the first recorded
    one (360 steps at lr 1e-3); any other gets its steps and lr in its name."""
    steps = setup["rounds"] * setup["clients_per_round"] * setup.get("local_steps", BASE["local_steps"])
    lr = setup.get("lr", BASE["lr"])
    return "centralized" if (steps, lr) == (360, 1e-3) else f"centralized-{steps}steps-lr{lr:g}"


def label(run: dict) -> str:
    return f"{run['bits']}-bit" + (variant(run.get("setup") or {}) or "-fedavgm-m0.9").replace("-", " ")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: v for k, v in results.items() if k.startswith("fedlpp")}
    centrals = {k: v for k, v in results.items() if k.startswith("centralized")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in runs.items():
        rounds = [m for m in r["round_metrics"] if m["round"] > 0 and m.get("server_accuracy") is not None]
        x = [m["round"] for m in rounds]
        line, = axes[0].plot(x, [m["server_accuracy"] for m in rounds], label=f"{label(r)} theta")
        axes[0].plot(x, [m["client_visible_accuracy"] for m in rounds], "--", color=line.get_color(),
                     label=f"{label(r)} Q(theta)")
        axes[0].plot(x, [m["multi_round_accuracy"] for m in rounds], ":", color=line.get_color(),
                     label=f"{label(r)} mean of last {r['attack_window']}")
    for (name, c), style in zip(centrals.items(), ("-", "-.", "--", ":")):
        axes[0].axhline(c["final_accuracy"], color="k", lw=0.8, ls=style, label=f"{name} ({c['steps']} steps)")
    axes[0].set(xlabel="round", ylabel="SST-2 dev accuracy", title="server model vs what clients hold")
    axes[0].legend(fontsize=7)
    names = list(runs)
    xs = range(len(names))
    for shift, key, text in ((-0.27, "attack_theta_score", "theta (server)"), (0, "attack_best_score", "best attack"),
                             (0.27, "attack_coalition_from_scratch_score", "coalition alone (fresh LoRA)")):
        axes[1].bar([i + shift for i in xs], [runs[n][key] for n in names], 0.27, label=text)
    axes[1].set_xticks(list(xs), [label(runs[n]).replace(" ", "\n", 1) for n in names], fontsize=7)
    axes[1].set(ylim=(0.4, 1.0), ylabel="accuracy", title="theta vs best reconstruction")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- hostile clients (issue 35) -----------------------------------------------------------------------------------
def robust_suffix(robust: str) -> str:
    """'' under the server's default aggregation (the weighted mean), '-median' for --robust median."""
    return "" if robust in ("none", "clip") else f"-{robust}"


def hostile_grid(attacks: list[str], counts: list[int], clients: int,
                 robust: str = "none") -> list[tuple[str, str | None, int]]:
    """(run name, attack or None, hostile clients): every attack x count, then each mode's all-honest reference
    (last, so a stopped grid has its attack rows, comparable with an earlier reference); names end in
    robust_suffix(robust)."""
    from slimtune.federated.hostile import LORA_ATTACKS
    rows = [(f"{attack}-{k}of{clients}", attack, k) for attack in attacks for k in counts]
    if any(a in LORA_ATTACKS for a in attacks):
        rows.append(("honest", None, 0))
    if "inf-scalar" in attacks:
        rows.append(("honest-zo-seeds", None, 0))
    return [(name + robust_suffix(robust), attack, k) for name, attack, k in rows]


def reference_of(name: str, attack: str | None, robust: str = "none") -> str:
    """The all-honest run an attack row is compared with: same mode, same aggregation."""
    zo = attack == "inf-scalar" or name.startswith("honest-zo-seeds")
    return ("honest-zo-seeds" if zo else "honest") + robust_suffix(robust)


def hostile_config(name: str, attack: str | None, data: Path, dev: Path, run_dir: Path, args, model: str):
    """A run's settings: the defaults a run gets (server step, bounds) on the benchmark's data and clients; zo-seeds
    rows run MeZO clients (lr 1e-3, eps 1e-2: the MeZO + LoRA defaults)."""
    from slimtune.federated import FederatedConfig
    zo = reference_of(name, attack).startswith("honest-zo-seeds")
    return FederatedConfig(data=str(data), eval_data=str(dev), model=model, eval_max=0, num_clients=args.clients,
                           clients_per_round=args.clients_per_round, rounds=args.rounds, bits=4,
                           local_steps=args.local_steps, lr=args.lr, eps=1e-2 if zo else 1e-3, batch_size=16,
                           lora_r=8, dirichlet_alpha=0.5, out_dir=str(run_dir), mode="zo-seeds" if zo else "lora",
                           local_optimizer="mezo" if zo else "adamw", round_timeout=7200, robust=args.robust,
                           root_data=str(root_subset(args)) if args.robust == "trust" else "",
                           eval_every=5,  # the full dev set 3x per round dominated the run; rounds 0, 5, ... and 26-30
                           **server_step(args))


def root_subset(args) -> Path:
    """--robust trust: the server's root data, the first --root-size SST-2 train rows after the clients' --train-size
    rows whose sentence is neither among the clients' rows nor in the dev rows (SST-2 train repeats sentences, and
    the server refuses root rows it shares with either): the same distribution, both labels, FLTrust's 100 by
    default."""
    sentence = lambda line: line.split("\t", 1)[-1].strip()  # noqa: E731  (label \t sentence)
    header, *rows = (DATA / "train.tsv").read_text().splitlines()
    dev = (DATA / "dev.tsv").read_text().splitlines()[1:args.dev_size + 1]
    taken = {sentence(r) for r in rows[:args.train_size]} | {sentence(r) for r in dev}
    root = []
    for row in rows[args.train_size:]:
        if len(root) == args.root_size:
            break
        if sentence(row) not in taken:
            root.append(row)
            taken.add(sentence(row))
    path = args.hostile_out / f"root_{args.train_size}+{args.root_size}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *root]) + "\n")
    return path


def server_step(args) -> dict:
    """--hostile-server-optimizer: the hostile rows' server step instead of the default (lr: --server-lr or Flower's;
    fedavgm: --server-momentum; no iterate averaging)."""
    name = getattr(args, "hostile_server_optimizer", None)
    if not name:
        return {}
    return {"server_optimizer": name, "server_lr": args.server_lr, "server_momentum": args.server_momentum,
            "server_average": 0.0}


def row_label(args) -> str:
    """The rows' suffix: the aggregation (robust_suffix), then the server step when it is not the default's."""
    name = getattr(args, "hostile_server_optimizer", None)
    if not name:
        return args.robust
    return f"{args.robust}-{name}" + (f"-m{args.server_momentum:g}" if name == "fedavgm" else "") + \
        (f"-slr{args.server_lr:g}" if args.server_lr else "")


def run_hostile(args, data: Path, dev: Path, model: str = "smollm2", runner=None) -> dict:
    """Every row of the hostile grid that has no summary yet; `runner(cfg, attack, hostile_partitions)` runs one
    (default: Flower's simulation with hostile_app). Returns the results file's content."""
    from slimtune.federated import simulate
    from slimtune.federated.hostile import hostile_app

    def simulated(cfg, attack, hostile):
        client_app = hostile_app(attack, hostile, cfg.data) if attack else None
        return simulate(cfg, cpus_per_client=float(os.cpu_count() or 1), client_app=client_app)

    runner = runner or simulated
    out = args.hostile_out
    out.mkdir(parents=True, exist_ok=True)
    path, results = out.with_suffix(".json"), {}
    label = row_label(args)
    for name, attack, k in hostile_grid(args.hostile, args.hostile_clients, args.clients, label):
        if attack is None and getattr(args, "skip_references", False):
            continue  # another process runs the all-honest reference
        run_dir = out / name
        kept = {}  # a finished row's full-dev score (rescore_full_dev) belongs to its theta: kept unless run again
        if not (run_dir / "summary.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            runner(hostile_config(name, attack, data, dev, run_dir, args, model), attack, set(range(k)))
        elif path.exists() and "full_dev" in (stored := json.loads(path.read_text()).get(name, {})):
            kept = {"full_dev": stored["full_dev"]}
        summary = json.loads((run_dir / "summary.json").read_text())
        rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        setup = {"attack": attack, "hostile_clients": k, "clients": args.clients,
                 "clients_per_round": args.clients_per_round, "robust": args.robust,
                 "reference": reference_of(name, attack, label), **({"server": label} if label != args.robust else {})}
        results = merged(path, {name: {**summary, "round_metrics": rounds, "setup": setup, **kept}})
        print(name, {k: summary[k] for k in ("final_accuracy", "accepted_updates")}, flush=True)
    return results


def rescore_full_dev(path: Path, out: Path, dev: Path, threads: int, model: str = "smollm2", evaluate=None) -> dict:
    """theta after the last round of every hostile row (run_dir/adapter, the server's full-precision LoRA) scored on
    the whole dev set `dev`, stored as row["full_dev"] = {"accuracy", "examples"}; rows scored already are kept.

    The runs evaluate on the first --dev-size rows (200: one standard error is about 2.5 points at 85%), which is what
    keeps 30 rounds of 8 clients affordable; a gap of 3 to 5 points between two such runs is within their noise. The
    whole SST-2 dev set (872 rows, about 1.2 points) judges the same final theta more sharply. `evaluate(adapter,
    dev)` -> (accuracy, examples); default `slimtune eval` in a subprocess at `threads` threads."""
    import subprocess
    import sys

    from launch import thread_env

    def cli_eval(adapter: Path, data: Path) -> tuple[float, int]:
        cmd = [sys.executable, "-m", "slimtune.cli", "eval", "--model", model, "--adapter", str(adapter),
               "--data", str(data), "--device", "cpu"]
        done = subprocess.run(cmd, check=True, env=thread_env(threads), capture_output=True, text=True)
        scored = json.loads(done.stdout)
        return scored["accuracy"], scored["examples"]

    evaluate = evaluate or cli_eval
    results = json.loads(path.read_text()) if path.exists() else {}
    # the rows the README's verdicts read first (the default LoRA rule and trust), then the other current rules, then
    # retired ones: a rescoring cut off keeps what matters most
    rule = lambda item: item[1]["setup"].get("robust") or "none"  # noqa: E731
    for name, row in sorted(results.items(), key=lambda item: (rule(item) not in ("direction", "trust"),
                                                               rule(item) not in ROBUST_CHOICES)):
        adapter = out / name / "adapter"
        if row.get("full_dev") or not adapter.exists():
            continue
        accuracy, examples = evaluate(adapter, dev)
        row = json.loads(path.read_text())[name]  # re-read: attack rows may have landed beside this process
        results = merged(path, {name: {**row, "full_dev": {"accuracy": accuracy, "examples": examples,
                                                            "data": dev.name}}})
        print(name, "full dev", accuracy, flush=True)
    return results


# --robust of the hostile rows (a retired rule's rows stay as history)
ROBUST_CHOICES = ("none", "median", "direction", "trust")


def missing_default_rows(results: dict) -> list[tuple[str, str, int, str]]:
    """(row name, attack, hostile count, --robust) of every attack x target count with no row under the rule the
    default (--robust auto) gives its mode: the direction filter for LoRA attacks, the mean for zo-seeds ones.
    Rows of other or retired rules (suffixed names) do not count."""
    from slimtune.federated import FederatedConfig
    from slimtune.federated.config import robust_rule
    from slimtune.federated.hostile import ATTACKS, LORA_ATTACKS
    ran = {(r["setup"]["attack"], r["setup"]["hostile_clients"], r["setup"].get("robust") or "none")
           for r in results.values() if r["setup"]["attack"] and not r["setup"].get("server")}
    clients = next(iter(results.values()))["setup"]["clients"] if results else 8
    missing = []
    for k in sorted(HOSTILE_TARGET):
        for attack in ATTACKS:
            robust = robust_rule(FederatedConfig.robust, "lora" if attack in LORA_ATTACKS else "zo-seeds", False)
            if (attack, k, robust) not in ran:
                missing.append((f"{attack}-{k}of{clients}{robust_suffix(robust)}", attack, k, robust))
    return missing


def judged_gap(row: dict, honest: dict) -> tuple[float | None, str]:
    """(theta's gap to its all-honest run in points, the dev set that measured it): the whole dev set where both
    runs were rescored on it, the same file and number of rows (`rescore_full_dev`), else the runs' own --dev-size
    rows. The README's table and the targets block both read it."""
    records = [r.get("full_dev") or {} for r in (row, honest)]
    full = [record.get("accuracy") for record in records]
    same_set = all(records[0].get(key) == records[1].get(key) for key in ("data", "examples"))
    if None not in full and same_set:  # two scores on different sets are no gap: the runs' own rows then
        return (full[0] - full[1]) * 100, "full dev"
    own = [r.get("final_accuracy") for r in (row, honest)]
    return (None if None in own else (own[0] - own[1]) * 100), "200 dev"


def honest_reference(name: str, setup: dict, results: dict) -> tuple[str, dict]:
    """(name, result) of the all-honest run a row is judged against: its own (same mode and aggregation); for a robust
    row whose own all-honest run is not there, the default aggregation's. The README's table and the targets block
    both use it."""
    ref = setup.get("reference")
    if ref not in results:
        ref = reference_of(name, setup.get("attack"))
    return ref, results.get(ref, {})


def hostile_table(results: dict | None) -> str:
    """README rows: theta after the last round against the all-honest run of the same mode, with the verdict. The
    verdict reads the whole dev set where both runs were rescored on it (`rescore_full_dev`), else the runs' own
    --dev-size rows; the table says which."""
    if not results:
        return "(not run yet: `python benchmarks/federated_attacks.py --hostile all`)"
    rows = ["| run | attack | hostile clients | theta acc (last round, 200 dev) | theta, mean of the last 5 evaluations | "
            "vs all-honest (200 dev) | theta acc, full dev | vs all-honest, full dev | target | verdict | "
            "replies rejected | updates accepted |",
            "|" + "---|" * 12]
    # per aggregation (the default mean first), its all-honest references above its attack rows
    ordered = sorted(results.items(), key=lambda item: (item[1]["setup"].get("robust", "none") not in ("none", "clip"),
                                                        item[1]["setup"]["attack"] is not None))
    full = lambda r: (r.get("full_dev") or {}).get("accuracy")  # noqa: E731
    points = lambda a, b: None if a is None or b is None else (a - b) * 100  # noqa: E731
    shown = lambda gap, attack: "-" if gap is None or not attack else f"{gap:+.1f} pts"  # noqa: E731
    for name, r in ordered:
        setup = r["setup"]
        theta = r["final_accuracy"]
        last = [m["server_accuracy"] for m in r["round_metrics"]
                if m.get("round", 0) > 0 and m.get("server_accuracy") is not None][-5:]  # evaluated rounds only
        rejected = sum(m.get("rejected", 0) for m in r["round_metrics"])
        ref, honest = honest_reference(name, setup, results)
        judged, on = judged_gap(r, honest)
        gap, gap_full = points(theta, honest.get("final_accuracy")), judged if on == "full dev" else None
        target = HOSTILE_TARGET.get(setup["hostile_clients"])
        if not setup["attack"]:
            verdict, target_text = "reference", "-"
        else:
            target_text = f"within {target:g} pts"
            verdict = "-" if judged is None else f"met ({on})" if judged >= -target else \
                f"**missed** ({judged:+.1f} pts, {on})"
        examples = (r.get("full_dev") or {}).get("examples")
        rows.append(f"| {name} ({r['rounds']} rounds) | {setup['attack'] or 'none'} | {setup['hostile_clients']} of "
                    f"{setup['clients']} | {theta:.3f} | {sum(last) / len(last):.3f} | {shown(gap, setup['attack'])}"
                    f"{'' if ref == setup['reference'] or not setup['attack'] else f' (vs {ref})'} | "
                    f"{'-' if full(r) is None else f'{full(r):.3f} ({examples})'} | {shown(gap_full, setup['attack'])} | "
                    f"{target_text} | {verdict} | {rejected} | {r['accepted_updates']} |")
    notes = []
    for name, r in results.items():
        if not r["setup"]["attack"] and r.get("initial_accuracy") is not None \
                and abs(r["final_accuracy"] - r["initial_accuracy"]) < 0.02:
            notes.append(f"{name} ends where it started ({r['initial_accuracy']:.3f} at round 0): that mode does not "
                         f"learn in {r['rounds']} rounds at its defaults, so its attack rows can show only that theta "
                         "stays finite and where it was, not that learning survives the attack.")
    missing = missing_default_rows(results)
    if missing:
        notes.append("Not run yet under the default aggregation (--robust auto): " + ", ".join(
            f"{name} (`python benchmarks/federated_attacks.py --hostile {attack} --hostile-clients {k}"
            f"{'' if robust == 'none' else f' --robust {robust}'}`)" for name, attack, k, robust in missing)
            + "; each LoRA row is 25-60 min of one core, each zo-seeds row ~20 min.")
    return "\n".join(rows) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def main() -> None:
    global OUT
    from slimtune.federated import FederatedConfig, simulate
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.train import TrainConfig, prepare, train

    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--clients-per-round", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--local-steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--server-optimizer", default="fedavgm")
    ap.add_argument("--server-lr", type=float)
    ap.add_argument("--server-momentum", type=float, default=0.9, help="fedavgm's momentum")
    ap.add_argument("--aggregation", default="fedavg", choices=["fedavg", "ffa"], help="FedIT (fedavg) or FFA-LoRA")
    ap.add_argument("--dither", type=float, default=0.0, help="fixed secret broadcast dither (units of the largest step)")
    ap.add_argument("--server-average", type=float, default=0.0, help="EMA decay of the server's model over its "
                    "iterates (0: off)")
    ap.add_argument("--attack-coalition", type=int, default=2)
    ap.add_argument("--attack-window", type=int, default=5)
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--dev-size", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-centralized", action="store_true")
    ap.add_argument("--centralized-only", action="store_true", help="only the centralized reference (to run it "
                    "beside the federated runs)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--hostile", nargs="*", default=None, help="hostile-client rows instead of the bit-width runs: "
                    "all, or some of size-lie norm-999 sign-flip inf-scalar")
    ap.add_argument("--hostile-clients", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--hostile-out", type=Path, default=HOSTILE_OUT)
    ap.add_argument("--robust", default="none", choices=list(ROBUST_CHOICES),
                    help="hostile rows: the server's aggregation (median: coordinate-wise median; direction: the "
                    "replies agreeing with the round's median; trust: FLTrust, each reply weighted by its cosine with "
                    "the server's own update on --root-size rows; rows named '<row>-<robust>', compared with "
                    "'honest-<robust>')")
    ap.add_argument("--root-size", type=int, default=100, help="--robust trust: rows of the server's root data "
                    "(SST-2 train rows after the clients' --train-size rows)")
    ap.add_argument("--hostile-server-optimizer", choices=["fedavg", "fedavgm", "fedadam", "fedyogi"],
                    help="hostile rows: this server step instead of the default (with --server-lr, --server-momentum; "
                         "no averaging); rows are named after it")
    ap.add_argument("--rescore-full-dev", action="store_true", help="hostile rows: score every finished row's final "
                    "theta (run_dir/adapter) on the whole SST-2 dev set and store it beside the --dev-size score; "
                    "nothing is trained")
    ap.add_argument("--skip-references", action="store_true", help="hostile rows: only the attack rows (run the "
                    "all-honest reference in another process with --hostile-clients and no count)")
    args = ap.parse_args()
    OUT = args.out
    if not DATA.exists():
        raise SystemExit(f"needs GLUE SST-2 at {DATA}")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    data, dev = subset(args.train_size, OUT), subset(args.dev_size, OUT, "dev")
    if args.rescore_full_dev:
        rescore_full_dev(args.hostile_out.with_suffix(".json"), args.hostile_out, DATA / "dev.tsv", args.threads)
        return
    if args.hostile is not None:
        from slimtune.federated.hostile import ATTACKS
        args.hostile = list(ATTACKS) if args.hostile in ([], ["all"]) else args.hostile
        unknown = set(args.hostile) - set(ATTACKS)
        if unknown or not set(args.hostile_clients) <= set(HOSTILE_TARGET):
            raise SystemExit(f"--hostile: choose from {', '.join(ATTACKS)} (got {sorted(unknown)}); "
                             f"--hostile-clients: 1 and/or 2")
        run_hostile(args, data, dev)
        return
    path = OUT.with_suffix(".json")
    setup = {k: getattr(args, k) for k in ("clients", "clients_per_round", "rounds", "local_steps", "lr",
                                           "server_optimizer", "server_lr", "server_momentum", "aggregation",
                                           "attack_coalition", "attack_window", "train_size", "dev_size", "dither",
                                           "server_average")}
    for bits in [] if args.centralized_only else args.bits:
        name = f"fedlpp-{bits}bit" + variant(setup)
        run_dir = OUT / name
        if not (run_dir / "summary.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = FederatedConfig(data=str(data), eval_data=str(dev), model="smollm2", eval_max=0,
                                  num_clients=args.clients, clients_per_round=args.clients_per_round,
                                  rounds=args.rounds, bits=bits, local_steps=args.local_steps, lr=args.lr,
                                  batch_size=16, lora_r=8, dirichlet_alpha=0.5, out_dir=str(run_dir),
                                  server_optimizer=args.server_optimizer, server_lr=args.server_lr,
                                  server_momentum=args.server_momentum, aggregation=args.aggregation,
                                  attack_coalition=args.attack_coalition, attack_window=args.attack_window,
                                  dither=args.dither, server_average=args.server_average,
                                  round_timeout=7200)  # a shared CPU must not turn slow rounds into lost ones
            simulate(cfg, cpus_per_client=float(os.cpu_count() or 1))  # one client at a time: no oversubscription
        summary = json.loads((run_dir / "summary.json").read_text())
        rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results = merged(path, {name: {**summary, "round_metrics": rounds, "setup": setup}})
        print(name, {k: summary[k] for k in ("final_accuracy", "client_visible_accuracy", "attack_multi_round_score",
                                             "attack_coalition_score", "attack_best_score",
                                             "attack_coalition_from_scratch_score")}, flush=True)
    central_dir = OUT / central_name(setup)
    if not args.no_centralized and not (central_dir / "summary.json").exists():
        steps = args.rounds * args.local_steps * args.clients_per_round  # the same total local steps
        shutil.rmtree(central_dir, ignore_errors=True)
        cfg = TrainConfig(out_dir=str(central_dir), train_data=str(data), eval_data=str(dev), model="smollm2",
                          optimizer="adamw", optim=OptimizerArgs(lr=args.lr), peft=PeftSettings("lora", r=8, alpha=16),
                          steps=steps, batch_size=16, eval_every=steps // 4, eval_max=0, progress=False,
                          lr_scheduler="constant", warmup_steps=0)
        train(prepare(cfg))
    central = central_dir / "summary.json"
    results = merged(path, {central_dir.name: {**json.loads(central.read_text()), "setup": setup}} if central.exists()
                     else {})
    plot(results, OUT.parent / "federated_attacks.png")


if __name__ == "__main__":
    main()

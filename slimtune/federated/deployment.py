"""Run slimtune's Flower app on the real Deployment Engine on this machine: one `flower-superlink` and N
`flower-supernode` processes on 127.0.0.1 (insecure local mode: testing only; real deployments use TLS), each node
reading only its own shard of the data through `--node-config data-path=...`, then `flwr run . <connection>`.

Every process it starts is stopped by PID when it ends (normally, on error or on Ctrl-C). Flower's state lives in a
temporary FLWR_HOME, so the user's ~/.flwr is never touched.
Usage: python -m slimtune.federated.deployment [--nodes 2] [--data FILE] [--eval-data FILE] [--rounds 2]
       [--out runs/deployment] [--model tiny-llama] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from slimtune import SlimtuneError
from slimtune.federated.config import SETTINGS_ENV, FederatedConfig, check_run

ROOT = Path(__file__).resolve().parents[2]  # the Flower app directory (pyproject.toml with [tool.flwr.app])
DEMO = ROOT / "slimtune" / "data" / "demo"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def shard(data: Path, nodes: int, work: Path) -> list[Path]:
    """Split a TSV/CSV file's rows into `nodes` files (shuffled, seed 0): the data each node holds locally."""
    lines = data.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    random.Random(0).shuffle(rows)
    paths = []
    for k in range(nodes):
        path = work / f"node{k}{data.suffix}"
        path.write_text("\n".join([header, *rows[k::nodes]]) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate every started process (its whole process group), then kill what is left."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def flower_executable(name: str) -> str:
    """Flower's executables from the environment that runs this script (next to sys.executable), not whatever
    `PATH` finds first."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SlimtuneError(f"{path}: not found; install flwr into this environment ({sys.executable})")
    return str(path)


def deployment_config(nodes: int, data: Path, eval_data: Path | None, rounds: int, out: Path,
                      model: str) -> FederatedConfig:
    """The run's settings, checked as every path checks them (config.check_run)."""
    cfg = FederatedConfig(data=str(data), eval_data=str(eval_data or ""), model=model, num_clients=nodes,
                          rounds=rounds, out_dir=str(Path(out).resolve()), node_timeout=120.0, round_timeout=300.0)
    check_run(cfg)
    return cfg


def run(nodes: int, data: Path, eval_data: Path | None, rounds: int, out: Path, model: str, timeout: float) -> dict:
    """Start the SuperLink and `nodes` SuperNodes, submit the app with `flwr run`, stop everything; the summary."""
    cfg = deployment_config(nodes, data, eval_data, rounds, out, model)
    work = Path(tempfile.mkdtemp(prefix="slimtune-deploy."))
    home = work / "flwr-home"
    home.mkdir()
    link_port, *node_ports = free_ports(1 + nodes)  # Flower 1.41: the SuperLink serves every API on one HTTP port
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "slimtune-local"\n\n[superlink.slimtune-local]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    settings = work / "server-settings.json"  # the server's settings: only the SuperLink's environment points here
    settings.write_text(json.dumps(asdict(cfg)))
    # Flower's processes start more of Flower's executables by name (flower-superexec, flwr-serverapp...): the
    # environment's own come first on their PATH
    env = {**os.environ, "FLWR_HOME": str(home),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop(SETTINGS_ENV, None)
    logs = work / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, **(extra_env or {})},
                                cwd=work, start_new_session=True)  # own process group: stopped with its children
        procs.append(proc)
        return proc

    try:
        link = start("superlink", [flower_executable("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                   "--port", str(link_port)], {SETTINGS_ENV: str(settings)})
        wait_for_port(link_port, link)
        for k, path in enumerate(shard(data, nodes, work)):
            start(f"supernode{k}", [flower_executable("flower-supernode"), "--insecure", "--superlink",
                                    f"127.0.0.1:{link_port}", "--host", "127.0.0.1", "--port", str(node_ports[k]),
                                    "--node-config", f'partition-id={k} data-path="{path}"'])
        submit = subprocess.run([flower_executable("flwr"), "run", str(ROOT), "slimtune-local", "--stream"],
                                env=env, cwd=work, capture_output=True, text=True, timeout=timeout)
        (logs / "flwr-run.log").write_text(submit.stdout + submit.stderr)
        return finished_summary(out, logs, submit)
    finally:
        stop(procs)


def finished_summary(out: Path, logs: Path, submit: subprocess.CompletedProcess) -> dict:
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise SlimtuneError(f"the run wrote no summary (logs in {logs}): "
                            f"{(submit.stderr or submit.stdout).strip().splitlines()[-1:]}")
    summary = json.loads(summary_path.read_text())
    if summary.get("stop_reason") != "completed":
        raise SlimtuneError(f"federated run trained nothing: {summary.get('stop_reason')}; no adapter was saved "
                            f"(logs in {logs})")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--data", type=Path, default=DEMO / "sst2_demo_train.tsv")
    ap.add_argument("--eval-data", type=Path, default=DEMO / "sst2_demo_dev.tsv")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/deployment"))
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    try:
        if args.nodes < 1:
            raise SlimtuneError(f"--nodes {args.nodes}: must be >= 1")
        deployment_config(args.nodes, args.data, args.eval_data, args.rounds, args.out, args.model)
        summary = run(args.nodes, args.data, args.eval_data, args.rounds, args.out, args.model, args.timeout)
    except SlimtuneError as exc:  # the CLI's convention: one line, exit code 2
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: summary.get(k) for k in ("rounds", "clients", "accepted_updates", "final_accuracy",
                                                  "client_visible_accuracy", "bytes_communicated", "stop_reason")}))


if __name__ == "__main__":
    main()

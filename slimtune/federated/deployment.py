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
from pathlib import Path

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


def run(nodes: int, data: Path, eval_data: Path | None, rounds: int, out: Path, model: str, timeout: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="slimtune-deploy."))
    home = work / "flwr-home"
    home.mkdir()
    link_port, *node_ports = free_ports(1 + nodes)  # Flower 1.41: the SuperLink serves every API on one HTTP port
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "slimtune-local"\n\n[superlink.slimtune-local]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home)}
    logs = work / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work,
                                start_new_session=True)  # its own process group: stopped with everything it spawns
        procs.append(proc)
        return proc

    try:
        link = start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port)])
        wait_for_port(link_port, link)
        for k, path in enumerate(shard(data, nodes, work)):
            start(f"supernode{k}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                    "--host", "127.0.0.1", "--port", str(node_ports[k]), "--node-config",
                                    f'partition-id={k} num-partitions={nodes} data-path="{path}"'])
        config = {"num-clients": nodes, "num-server-rounds": rounds, "model": model, "data": str(data),
                  "eval-data": str(eval_data or ""), "out-dir": str(out.resolve()), "node-timeout": 120.0,
                  "round-timeout": 300.0}
        run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        submit = subprocess.run(["flwr", "run", str(ROOT), "slimtune-local", "--run-config", run_config, "--stream"],
                                env=env, cwd=work, capture_output=True, text=True, timeout=timeout)
        (logs / "flwr-run.log").write_text(submit.stdout + submit.stderr)
        summary_path = out / "summary.json"
        if not summary_path.exists():
            raise RuntimeError(f"the run wrote no summary (logs in {logs}): "
                               f"{(submit.stderr or submit.stdout).strip().splitlines()[-1:]}")
        return json.loads(summary_path.read_text())
    finally:
        stop(procs)


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
    if (args.out / "summary.json").exists():
        raise SystemExit(f"{args.out}: already holds a run (nothing was overwritten)")
    summary = run(args.nodes, args.data, args.eval_data, args.rounds, args.out, args.model, args.timeout)
    print(json.dumps({k: summary.get(k) for k in ("rounds", "clients", "accepted_updates", "final_accuracy",
                                                  "client_visible_accuracy", "bytes_communicated", "stop_reason")}))
    sys.exit(0 if summary.get("accepted_updates") else 1)


if __name__ == "__main__":
    main()

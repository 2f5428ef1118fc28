"""Run slimtune's Flower app on the real Deployment Engine on this machine: one `flower-superlink` and N
`flower-supernode` processes on 127.0.0.1, each node reading only its own shard of the data through
`--node-config data-path=...`, then `flwr run . <connection>`.

Secure by default: TLS with a CA and a SuperLink certificate made for this run, and SuperNode authentication (each
node's key registered with `flwr supernode register` before it starts; an unregistered node is refused). See
credentials.py. `--insecure` turns both off, with a warning: for debugging only.

The server's settings (rounds, output, evaluation data...) go to a file only the SuperLink's environment points at
($SLIMTUNE_SERVER_SETTINGS); clients receive the app's run config (training settings) and, per round, the training
settings in the message. Every process it starts is stopped by PID when it ends (normally, on error, on Ctrl-C, SIGTERM
or SIGHUP). Flower's state lives in a temporary FLWR_HOME, so the user's ~/.flwr is never touched; the temporary
directory (the nodes' shards of the data, their keys, the TLS key) is removed when the script ends, except, after a
failure, its logs/ (which the error names).
Usage: python -m slimtune.federated.deployment [--nodes 2] [--data FILE] [--eval-data FILE] [--rounds 2]
       [--out runs/deployment] [--model tiny-llama] [--timeout 900] [--insecure]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from slimtune import SlimtuneError
from slimtune.federated.config import SETTINGS_ENV, FederatedConfig, check_run
from slimtune.federated.credentials import make_certificates, make_node_key

ROOT = Path(__file__).resolve().parents[2]  # the Flower app directory (pyproject.toml with [tool.flwr.app])
DEMO = ROOT / "slimtune" / "data" / "demo"
CONNECTION = "slimtune-local"
log = logging.getLogger("slimtune.federated")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


SHARDED = (".tsv", ".csv", ".jsonl", ".json")  # the files shard() writes back in their own format


def check_shardable(data: Path) -> None:
    """One line for --data the script cannot write per-node files of: a saved dataset (hf:DIR) or another type."""
    source = str(data)
    if source.startswith("hf:"):
        raise SlimtuneError(f"--data {source}: the deployment script writes each node a file of its rows (.tsv, .csv "
                            f"or .jsonl) and does not split a saved dataset: save it as one (e.g. Dataset.to_json("
                            f"'train.jsonl')) and give that file")
    if Path(source).suffix.lower() not in SHARDED:
        raise SlimtuneError(f"--data {source}: the deployment script splits .tsv, .csv or .jsonl files into one file "
                            f"per node, not {Path(source).suffix or 'a file without a suffix'}")


def shard_rows(data: Path, nodes: int) -> tuple[list[dict], str]:
    """The rows of --data as every node reads its shard (data/readers.py: rows, never lines: a JSONL file has no
    header, a CSV field may hold a newline), and the delimiter of a table ("" for JSONL); one line when there are
    fewer rows than nodes (a node would hold an empty file)."""
    from slimtune.data.readers import read_rows
    check_shardable(data)
    rows, _ = read_rows(str(data))
    if nodes > len(rows):
        raise SlimtuneError(f"--nodes {nodes}: more nodes than --data {data} has rows ({len(rows)}); each node's "
                            f"shard needs at least one row")
    suffix = Path(data).suffix.lower()
    return [row for _, row in rows], {".tsv": "\t", ".csv": ","}.get(suffix, "")


def _reads_back(path: Path, share: list[dict]) -> bool:
    """Whether a node reading `path` gets `share`, row for row (a short row's missing fields, None, included)."""
    from slimtune.data.readers import read_rows
    try:
        return [row for _, row in read_rows(str(path), "train")[0]] == share
    except SlimtuneError:
        return False


def shard(data: Path, nodes: int, work: Path) -> list[Path]:
    """Split --data's rows into `nodes` files (shuffled, seed 0; node k holds rows k, k + nodes, ...), each in the
    file's own format (a table with its header and delimiter, JSONL one object per line): the data each node holds
    locally. Every row is in exactly one shard, and each shard is read back as its node will read it."""
    import csv

    rows, delimiter = shard_rows(data, nodes)
    random.Random(0).shuffle(rows)
    paths = []
    for k in range(nodes):
        path = work / f"node{k}{Path(data).suffix}"
        share = rows[k::nodes]
        with path.open("w", encoding="utf-8", newline="") as f:
            if delimiter:  # as readers._read_delimited reads it: quoted where a field needs it (with \r\n line
                # ends, csv also quotes a field holding a lone \r, which would otherwise end a row when read)
                writer = csv.writer(f, delimiter=delimiter, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
                writer.writerow(list(rows[0]))
                for row in share:  # a short row stays short (its missing trailing fields absent, not written "")
                    values = list(row.values())
                    while values and values[-1] is None:
                        values.pop()
                    writer.writerow(["" if v is None else v for v in values])
            else:
                f.writelines(json.dumps(row) + "\n" for row in share)  # ASCII: a lone surrogate has no UTF-8
        if share and not _reads_back(path, share):
            raise SlimtuneError(f"{data}: node {k}'s share does not read back as the rows it was given (a field the "
                                f"{Path(data).suffix} format cannot hold as written); convert the file to .jsonl")
        paths.append(path)
    return paths


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SlimtuneError(f"process {proc.pid} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise SlimtuneError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


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


def app_bundle_bytes() -> int:
    """Size of the app bundle (FAB) `flwr run .` builds and every SuperNode pulls once per run."""
    from flwr.cli.build import build_fab_from_disk
    return len(build_fab_from_disk(ROOT))


class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, started and stopped as one (a context manager).

    Secure unless `insecure`: TLS with the run's own certificates and SuperNode authentication (add_node registers
    the node's key first unless register=False)."""

    def __init__(self, work: Path, cfg: FederatedConfig, insecure: bool = False):
        self.work, self.cfg, self.insecure = Path(work), cfg, insecure
        self.home, self.logs, self.keys = self.work / "flwr-home", self.work / "logs", self.work / "keys"
        for d in (self.home, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.node_logs: dict[str, Path] = {}
        self.link_port = free_ports(1)[0]  # Flower 1.41: the SuperLink serves every API on one HTTP port
        self.tls = None if insecure else make_certificates(self.work / "tls")
        security = "insecure = true" if insecure else f'root-certificates = "{self.tls.ca.resolve()}"'
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                               f'address = "127.0.0.1:{self.link_port}"\n{security}\n')
        self.settings = self.work / "server-settings.json"  # only the SuperLink's environment points here
        self.settings.write_text(json.dumps(asdict(cfg)))
        self.settings.chmod(0o600)  # the server refuses a settings file every user may write (whatever the umask)
        # Flower's processes start more of Flower's executables by name (flower-superexec, flwr-serverapp...): the
        # environment's own come first on their PATH, and before them slimtune's flower-superexec, which hands each
        # app its run token in a private file instead of on its command line (federated/superexec.py)
        from slimtune.federated.superexec import shim  # imports Flower
        superexec_shim = shim(self.work / "bin")
        self.env = {**os.environ, "FLWR_HOME": str(self.home),
                    "PATH": os.pathsep.join([str(superexec_shim.parent), str(Path(sys.executable).parent),
                                             os.environ.get("PATH", "")])}
        self.env.pop(SETTINGS_ENV, None)

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        stop(self.procs)

    def _start(self, name: str, cmd: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**self.env, **(extra_env or {})},
                                cwd=self.work, start_new_session=True)  # own process group: stopped with children
        self.procs.append(proc)
        return proc

    def superlink_command(self) -> list[str]:
        cmd = [flower_executable("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.link_port)]
        if self.insecure:
            return cmd + ["--insecure"]
        return cmd + ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                      "--ssl-keyfile", str(self.tls.key), "--enable-supernode-auth"]

    def start_superlink(self) -> None:
        link = self._start("superlink", self.superlink_command(), {SETTINGS_ENV: str(self.settings)})
        wait_for_port(self.link_port, link)

    def node_command(self, node_config: str, private_key: Path | None) -> list[str]:
        cmd = [flower_executable("flower-supernode"), "--superlink", f"127.0.0.1:{self.link_port}", "--host",
               "127.0.0.1", "--port", str(free_ports(1)[0]), "--node-config", node_config]
        if self.insecure:
            return cmd + ["--insecure"]
        return cmd + ["--root-certificates", str(self.tls.ca), "--auth-supernode-private-key", str(private_key)]

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([flower_executable("flwr"), *args], env=self.env, cwd=self.work, capture_output=True,
                              text=True, timeout=timeout)

    def add_node(self, name: str, node_config: str, register: bool = True, admit: bool = True) -> Path:
        """Start a SuperNode with a key of its own, registered with the SuperLink first unless register=False, and
        admitted to the run's allowed nodes unless admit=False (a key someone else registered). Returns its log."""
        private = None
        if not self.insecure:
            private, public = make_node_key(self.keys, name)
            if register:
                done = self.flwr("supernode", "register", str(public), CONNECTION)
                if done.returncode:
                    raise SlimtuneError(f"flwr supernode register failed for {name}: "
                                        f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
                if admit:
                    self.admit(registered_node_id(done.stdout, name))
        self._start(name, self.node_command(node_config, private))
        self.node_logs[name] = self.logs / f"{name}.log"
        return self.node_logs[name]

    def admit(self, node_id: int) -> None:
        """Add a node this run registered to the server's allowed_nodes (server_app.MembersOnly): a key registered by
        anyone else who reaches the Control API is connected but never sampled."""
        settings = json.loads(self.settings.read_text())
        known = [n for n in (settings.get("allowed_nodes") or "").split(",") if n]
        settings["allowed_nodes"] = ",".join([*known, str(node_id)])
        self.settings.write_text(json.dumps(settings))

    def submit(self, timeout: float) -> dict:
        """`flwr run .` on this federation, streamed to its end; the run's summary."""
        try:
            done = self.flwr("run", str(ROOT), CONNECTION, "--stream", timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlimtuneError(f"--timeout {timeout:g}: the federated run did not finish in time; every process "
                                f"was stopped (logs in {self.logs})") from None
        (self.logs / "flwr-run.log").write_text(done.stdout + done.stderr)
        return finished_summary(Path(self.cfg.out_dir), self.logs, done)


def finished_summary(out: Path, logs: Path, submit: subprocess.CompletedProcess) -> dict:
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise SlimtuneError(f"the run wrote no summary (logs in {logs}): "
                            f"{(submit.stderr or submit.stdout).strip().splitlines()[-1:]}")
    summary = json.loads(summary_path.read_text())
    if summary.get("stop_reason") != "completed":
        if summary.get("rounds_done") and (out / "adapter").is_dir():  # stopped after some rounds: those are kept
            raise SlimtuneError(f"federated run stopped early: {summary.get('stop_reason')}; the "
                                f"{summary['rounds_done']} round(s) done are saved in {out} (logs in {logs})")
        raise SlimtuneError(f"federated run trained nothing: {summary.get('stop_reason')}; no adapter was saved "
                            f"(logs in {logs})")
    return summary


def registered_node_id(output: str, name: str) -> int:
    """The node id `flwr supernode register` prints ("SuperNode 123 registered successfully")."""
    import re
    found = re.search(r"SuperNode (\d+) registered", output)
    if found is None:
        tail = output.strip()[-200:]
        raise SlimtuneError(f"flwr supernode register for {name}: no node id in its output ({tail!r}); the server "
                            "could not restrict the run to the nodes it registered")
    return int(found[1])


def deployment_config(nodes: int, data: Path, eval_data: Path | None, rounds: int, out: Path,
                      model: str) -> FederatedConfig:
    """The server's settings, checked as every path checks them (config.check_run, the training file included), then
    without the training file: each node reads its own shard, and the server needs no training row (it was handed
    the whole unsharded file, and read it). The shards are checked here too (a file shard() can split, at least one
    row per node), before any process starts; the nodes share rows round-robin, not by the simulation's Dirichlet
    split, which check_run therefore leaves out."""
    check_shardable(data)
    if Path(model).exists():  # a checkpoint directory: the Flower processes run elsewhere (their work folder)
        model = str(Path(model).resolve())
    eval_data = Path(eval_data).resolve() if eval_data else None
    cfg = FederatedConfig(data=str(data), eval_data=str(eval_data or ""), model=model, num_clients=nodes,
                          rounds=rounds, out_dir=str(Path(out).resolve()), node_timeout=120.0, round_timeout=300.0)
    check_run(cfg, dirichlet=False)
    shard_rows(data, nodes)
    return replace(cfg, data="")


def with_bundle_bytes(summary: dict, nodes: int, out: Path) -> dict:
    """The app bundle each node pulled once, added to the summary (and to bytes_communicated_with_bundle)."""
    bundle = app_bundle_bytes()
    summary.update(app_bundle_bytes=bundle, app_bundle_bytes_total=bundle * nodes,
                   bytes_communicated_with_bundle=summary.get("bytes_communicated", 0) + bundle * nodes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(nodes: int, data: Path, eval_data: Path | None, rounds: int, out: Path, model: str, timeout: float,
        insecure: bool = False) -> dict:
    """Start the SuperLink and `nodes` SuperNodes, submit the app with `flwr run`, stop everything; the summary."""
    cfg = deployment_config(nodes, data, eval_data, rounds, out, model)
    if insecure:
        log.warning("--insecure: no TLS and no SuperNode authentication; anyone who reaches the port can read the "
                    "broadcasts and join the federation as a client")
    work = Path(tempfile.mkdtemp(prefix="slimtune-deploy."))
    completed = False
    try:
        shards = shard(data, nodes, work)  # before any process starts
        with LocalFederation(work, cfg, insecure) as federation:
            federation.start_superlink()
            for k, path in enumerate(shards):
                federation.add_node(f"supernode{k}", f'partition-id={k} data-path="{path}"')
            summary = federation.submit(timeout)
        summary = with_bundle_bytes(summary, nodes, Path(cfg.out_dir))
        completed = True
        return summary
    finally:  # the processes are stopped (LocalFederation.__exit__) before anything is removed
        clean_work(work, keep_logs=not completed)


def clean_work(work: Path, keep_logs: bool) -> None:
    """Remove the run's working directory: it holds a copy of every node's shard of --data, the nodes' private keys,
    the SuperLink's TLS key, the server settings and Flower's home. A completed run leaves nothing; a failed or
    stopped one keeps only logs/ (its error messages point there: 'logs in ...'), and says where it is."""
    import shutil
    logs = work / "logs"
    if keep_logs and logs.is_dir() and any(logs.iterdir()):
        for entry in work.iterdir():
            if entry == logs:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        log.warning("the federation's logs are kept in %s (the data shards and keys were removed)", logs)
    else:
        shutil.rmtree(work, ignore_errors=True)


def stop_on_signals(signals: tuple = (signal.SIGTERM, signal.SIGHUP)) -> None:
    """SIGTERM (`timeout`, `kill`, a scheduler, systemd) and SIGHUP (a closed terminal) end the script by raising
    SystemExit, as Ctrl-C raises KeyboardInterrupt: LocalFederation.__exit__ then stops every process it started (in
    their own sessions, they would outlive the script's default death) and run() removes the shards and keys. A
    repeat of the signal during that bounded clean-up (stop(): 15 s, then SIGKILL) is ignored."""
    def handler(signum, frame):
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    for s in signals:
        signal.signal(s, handler)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--data", type=Path, default=DEMO / "sst2_demo_train.tsv")
    ap.add_argument("--eval-data", type=Path, default=DEMO / "sst2_demo_dev.tsv")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/deployment"))
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication (debugging only)")
    args = ap.parse_args()
    logging.basicConfig(format="%(levelname)s: %(message)s")
    stop_on_signals()
    try:
        if args.nodes < 1:
            raise SlimtuneError(f"--nodes {args.nodes}: must be >= 1")
        if not args.timeout > 0 or args.timeout == float("inf"):  # NaN too
            raise SlimtuneError(f"--timeout {args.timeout}: must be a number of seconds > 0")
        deployment_config(args.nodes, args.data, args.eval_data, args.rounds, args.out, args.model)
        summary = run(args.nodes, args.data, args.eval_data, args.rounds, args.out, args.model, args.timeout,
                      args.insecure)
    except SlimtuneError as exc:  # the CLI's convention: one line, exit code 2
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: summary.get(k) for k in ("rounds", "clients", "accepted_updates", "final_accuracy",
                                                  "client_visible_accuracy", "bytes_communicated",
                                                  "app_bundle_bytes_total", "stop_reason")}))


if __name__ == "__main__":
    main()

"""Issue 35, items 4 and 6: the deployment runs with TLS and SuperNode authentication by default, reports the bytes
Flower sends (the app bundle once per node included), and the app bundle holds nothing but the package's code."""

import io
import os
import re
import threading
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_run_credentials_chain_to_the_run_ca_and_name_the_host(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from slimtune.federated.credentials import make_certificates, make_node_key
    tls = make_certificates(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    private, public = make_node_key(tmp_path / "keys", "node0")
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert private.stat().st_mode & 0o077 == 0 and tls.key.stat().st_mode & 0o077 == 0  # owner-readable only


def test_secure_by_default_and_insecure_only_when_asked(tmp_path):
    from slimtune.federated.config import FederatedConfig
    from slimtune.federated.deployment import LocalFederation
    cfg = FederatedConfig(out_dir=str(tmp_path / "run"))
    secure = LocalFederation(tmp_path / "secure", cfg)
    link = secure.superlink_command()
    assert "--insecure" not in link and "--enable-supernode-auth" in link and "--ssl-certfile" in link
    node = secure.node_command("partition-id=0", tmp_path / "key")
    assert "--insecure" not in node and "--root-certificates" in node and "--auth-supernode-private-key" in node
    assert "root-certificates" in (secure.home / "config.toml").read_text()
    insecure = LocalFederation(tmp_path / "insecure", cfg, insecure=True)
    assert "--insecure" in insecure.superlink_command() and "--insecure" in insecure.node_command("x=1", None)
    assert all(Path(p).parent == Path(__import__("sys").executable).parent for p in (link[0], node[0]))


@pytest.mark.slow
def test_an_unregistered_node_is_refused_and_registered_ones_train(tmp_path):
    """An extra, unauthenticated SuperNode used to join and be aggregated while the summary said clients: 2."""
    from slimtune.federated.deployment import (DEMO, LocalFederation, app_bundle_bytes, deployment_config, shard,
                                               with_bundle_bytes)
    cfg = deployment_config(2, DEMO / "sst2_demo_train.tsv", DEMO / "sst2_demo_dev.tsv", 2, tmp_path / "run",
                            "tiny-llama")
    with LocalFederation(tmp_path / "work", cfg) as federation:
        federation.start_superlink()
        paths = shard(DEMO / "sst2_demo_train.tsv", 3, tmp_path)
        for k in range(2):
            federation.add_node(f"supernode{k}", f'partition-id={k} data-path="{paths[k]}"')
        intruder = federation.add_node("intruder", f'partition-id=2 data-path="{paths[2]}"', register=False)
        # review 9: open-source Flower lets anyone who reaches the Control API register a key; such a node connects
        # but is not among the run's allowed nodes, so it is never sampled (never sent Q(theta), never aggregated)
        outsider = federation.add_node("outsider", f'partition-id=3 data-path="{paths[2]}"', admit=False)
        seen, done = set(), threading.Event()
        watcher = threading.Thread(target=_watch_command_lines, args=(seen, done), daemon=True)
        watcher.start()
        try:
            summary = with_bundle_bytes(federation.submit(timeout=900), 2, Path(cfg.out_dir))
        finally:
            done.set()
            watcher.join()
    # what any local user's `ps -ef` showed during the run: Flower's executor put each app's run token there
    apps = [line for line in seen if re.search(r"flwr-(serverapp|clientapp) ", line)]
    assert any("flwr-serverapp" in a for a in apps) and any("flwr-clientapp" in a for a in apps), sorted(seen)
    assert all("--token-file" in a and not re.search(r"--token [0-9a-f]{16}", a) for a in apps), apps
    # Flower samples every connected node each round (fraction 1): an admitted intruder would make it 3 replies
    assert summary["accepted_updates"] == 4 and summary["stop_reason"] == "completed"
    assert summary["clients"] == summary["nodes_replied"] == 2
    refused = intruder.read_text()
    assert "Failed to activate SuperNode" in refused and "Receiving: train" not in refused
    joined = outsider.read_text()
    assert "SuperNode ID:" in joined and "Receiving: train" not in joined  # it connected, and was never sampled
    bundle = summary["app_bundle_bytes"]  # the package's code: other edits to it change this by a few KB
    assert abs(bundle - app_bundle_bytes()) < 0.05 * bundle and summary["app_bundle_bytes_total"] == 2 * bundle
    assert summary["bytes_communicated_with_bundle"] == summary["bytes_communicated"] + 2 * bundle


def _watch_command_lines(seen: set, done: threading.Event) -> None:
    """Every process command line this user can read (`/proc/<pid>/cmdline`, what `ps -ef` shows any local user),
    collected until `done`."""
    while not done.is_set():
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    seen.add(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    pass
        done.wait(0.2)


def test_the_app_bundle_holds_only_the_package_code(tmp_path):
    """`flwr run .` packages the app directory for every SuperNode; .gitignore re-includes the E2E rows'
    checkpoints, so a DP run's secret key file shipped to every node. The bundle is built here from a copy of the app
    (pyproject.toml, .gitignore, the package) with such a checkpoint, a result file and data planted in it."""
    import shutil

    from flwr.cli.build import build_fab_from_disk
    app = tmp_path / "app"
    shutil.copytree(ROOT / "slimtune", app / "slimtune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy(ROOT / name, app / name)
    planted = {"benchmarks/results/e2e/dp-run/checkpoint/secret.json": '{"key": "00"}',
               "benchmarks/results/e2e/dp-run/checkpoint/state.json": "{}",
               "runs/dp/secret.key": '{"key": "00"}', "benchmarks/results/summary.json": "{}",
               "data/train.jsonl": '{"text": "private"}\n', "notes.md": "# notes\n", "slimtune/secret.json": "{}"}
    for path, text in planted.items():
        (app / path).parent.mkdir(parents=True, exist_ok=True)
        (app / path).write_text(text)
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    code = {str(p.relative_to(ROOT)) for p in (ROOT / "slimtune").rglob("*.py") if "__pycache__" not in p.parts}
    assert set(names) - {"pyproject.toml", ".info/CONTENT"} == code
    assert not set(planted) & set(names) and not any(n.endswith((".json", ".jsonl", ".tsv", ".key")) for n in names)

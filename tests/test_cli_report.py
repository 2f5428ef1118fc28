"""CLI end to end on a tiny model, clear CLI errors, and the report rendered from fixture metrics."""

import json

from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.report import load_runs, render_report

runner = CliRunner()


def test_cli_train_eval_merge(tmp_path, demo_paths):
    train_path, dev_path = demo_paths
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--data", train_path, "--eval-data", dev_path, "--model", "tiny-llama",
                              "--optimizer", "lozo", "--peft", "svfit", "--r", "2", "--steps", "4",
                              "--eval-every", "2", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "lozo" and summary["peft"] == "svfit" and summary["steps"] == 4
    assert (out / "adapter" / "slimtune_adapter.safetensors").exists()


def test_cli_bad_input_is_one_clear_line(tmp_path, demo_paths):
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nhello\t1\n")
    res = runner.invoke(app, ["train", "--data", str(bad), "--model", "tiny-llama", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "bad.tsv: missing column(s) 'sentence'" in res.output
    assert "Traceback" not in res.output


def fixture_run(tmp_path, name, method, acc, eps=None):
    d = tmp_path / name
    d.mkdir()
    summary = {"method": method, "peft": "lora", "trainable_params": 1234, "peak_mem_mb": 512.0,
               "time_per_step_s": 0.25, "steps": 20, "final_accuracy": acc, "epsilon": eps,
               "delta": 1e-5 if eps else None, "bytes_communicated": 2048}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval_accuracy": acc * s / 20}) + "\n"
                                             for s in (0, 10, 20)))
    return str(d)


def test_report_table_and_plots(tmp_path):
    runs = [fixture_run(tmp_path, "zo", "mezo", 0.81), fixture_run(tmp_path, "dp", "dpzero", 0.74, eps=2.0)]
    paths = render_report(load_runs(runs), tmp_path / "report")
    md = paths["markdown"].read_text()
    assert "| zo | mezo | lora | 1,234 | 512 | 0.250 | 20 | 0.810 | - | - | 2.0 KB |" in md  # empty columns dropped
    # a private run that did not log private stats (no private_stats_logged: true) withholds its memory and time
    assert "| dp | dpzero | lora | 1,234 | - | - | 20 | 0.740 | 2.00 | 1e-05 | 2.0 KB |" in md
    assert "best dev acc" not in md and "BLEU" not in md
    html = paths["html"].read_text()
    assert html.count("<tr>") == 3 and "accuracy_vs_epsilon.png" in html
    assert [p.name for p in paths["plots"]] == ["accuracy_vs_steps.png", "accuracy_vs_memory.png",
                                                "accuracy_vs_epsilon.png"]
    for p in paths["plots"]:
        assert p.exists() and p.stat().st_size > 5000  # a real PNG with content, not an empty canvas
    res = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "no summary.json" in res.output


def test_cli_eval_and_merge(tmp_path, demo_paths):
    train_path, dev_path = demo_paths
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", "--data", train_path, "--model", "tiny-llama", "--optimizer", "adamw",
                               "--peft", "svfit", "--steps", "2", "--out", str(out), "--quiet"]).exit_code == 0
    res = runner.invoke(app, ["eval", "--data", dev_path, "--model", "tiny-llama", "--adapter", str(out / "adapter")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["examples"] == 24
    merged = tmp_path / "merged"
    res = runner.invoke(app, ["merge", str(out / "adapter"), "--out", str(merged), "--model", "tiny-llama"])
    assert res.exit_code == 0, res.output
    assert (merged / "config.json").exists() and (merged / "model.safetensors").exists()
    res = runner.invoke(app, ["merge", str(out / "adapter"), "--out", str(merged), "--model", "tiny-llama"])
    assert res.exit_code == 2 and "nothing was overwritten" in res.output


def test_flower_app_is_declared_for_flwr_run():
    import importlib
    import tomllib
    from pathlib import Path

    from slimtune.federated import FederatedConfig

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    flwr = pyproject["tool"]["flwr"]["app"]
    for ref in flwr["components"].values():
        module, attr = ref.split(":")
        assert getattr(importlib.import_module(module), attr) is not None
    cfg = FederatedConfig.from_flower(flwr["config"], settings=None)  # rounds: a server setting, not in the run config
    assert cfg.bits == flwr["config"]["bits"]
    assert cfg.lora_r == flwr["config"]["lora-r"]


def test_cli_federate_rejects_bad_settings_before_starting(tmp_path, demo_paths):
    train_path, _ = demo_paths
    res = runner.invoke(app, ["federate", "--data", train_path, "--model", "tiny-llama", "--bits", "12",
                              "--out", str(tmp_path / "f")])
    assert res.exit_code == 2 and "--bits 12 / --upload-bits 32: each must be 1..8 or 32" in res.output
    for flag, value, message in (("--round-timeout", "0", "--round-timeout 0: must be > 0"),
                                 ("--server-average", "1", "--server-average 1: must be >= 0 and < 1")):
        res = runner.invoke(app, ["federate", "--data", train_path, "--model", "tiny-llama", flag, value,
                                  "--out", str(tmp_path / "f")])
        assert res.exit_code == 2 and message in res.output, flag
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nok\t7\n")
    res = runner.invoke(app, ["federate", "--data", str(bad), "--model", "tiny-llama", "--out", str(tmp_path / "f")])
    assert res.exit_code == 2 and "bad.tsv:2: field 'label': unknown label '7'" in res.output, res.output

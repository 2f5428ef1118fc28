"""--config files (issue 16): flags override file values, unknown keys are one-line errors, config.json re-runs."""

import json

from typer.testing import CliRunner

from slimtune.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(map(str, args)))


def test_file_values_apply_and_flags_win(tmp_path, demo_paths):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {demo_paths[0]}\nmodel: tiny-llama\noptimizer: adamw\nlr: 3e-3\nsteps: 3\n"
                   f"batch-size: 4\neval_every: 0\npeft: lora\nr: 2\nquiet: true\ntarget_modules: q_proj\n")
    res = run("train", "--config", cfg, "--steps", 2, "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["steps"] == 2  # the flag wins
    assert saved["optim"]["lr"] == 3e-3 and isinstance(saved["optim"]["lr"], float)  # YAML's '3e-3' is a string
    assert saved["batch_size"] == 4 and saved["optimizer"] == "adamw" and saved["peft"]["target_modules"] == ["q_proj"]


def test_a_runs_config_json_reproduces_it(tmp_path, demo_paths):
    first = run("train", "--data", demo_paths[0], "--model", "tiny-llama", "--optimizer", "dpzero", "--epsilon", 4,
                "--delta", "1e-3", "--steps", 2, "--batch-size", 4, "--eval-every", 0, "--r", 2, "--lr", "1e-2",
                "--target-quantile", 0.8, "--out", tmp_path / "a", "--quiet")
    assert first.exit_code == 0, first.output
    again = run("train", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "b")
    assert again.exit_code == 0, again.output
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("a", "b"))
    assert {**a, "out_dir": None} == {**b, "out_dir": None}


def test_null_in_a_config_file_leaves_the_flag_default(tmp_path, demo_paths):
    """Older runs' config.json hold null for settings that now have a default (svfit_relative): null means unset,
    not False — SVFit must still train relative scales, not silently switch to the values."""
    cfg = tmp_path / "old.json"
    cfg.write_text(json.dumps({"data": demo_paths[0], "model": "tiny-llama", "optimizer": "mezo", "peft": "svfit",
                               "r": 2, "steps": 1, "batch_size": 4, "eval_every": 0, "quiet": True,
                               "svfit_relative": None}))
    res = run("train", "--config", cfg, "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["peft"]["svfit_relative"] is True


def test_unknown_keys_and_bad_values_are_one_line_errors(tmp_path, demo_paths):
    cases = {"unknown.yaml": ("learning_rate: 0.1\n", "unknown setting 'learning_rate'"),
             "badvalue.yaml": ("steps: many\n", "setting 'steps'"),
             "broken.json": ("{oops", "not valid JSON"),
             "list.yaml": ("- 1\n- 2\n", "mapping")}
    for name, (text, needle) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        res = run("train", "--config", path, "--data", demo_paths[0], "--out", tmp_path / "never")
        assert res.exit_code == 2, res.output
        lines = [l for l in res.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and needle in lines[0] and name in lines[0], res.stderr
    res = run("train", "--model", "tiny-llama", "--out", tmp_path / "never")
    assert res.exit_code == 2 and "--data is required" in res.stderr
    res = run("eval", "--config", tmp_path / "unknown.yaml")
    assert res.exit_code == 2 and "unknown setting 'learning_rate'" in res.stderr


def test_eval_and_federate_take_config_files(tmp_path, demo_paths):
    cfg = tmp_path / "eval.json"
    cfg.write_text(json.dumps({"data": demo_paths[1], "model": "tiny-llama"}))
    res = run("eval", "--config", cfg)
    assert res.exit_code == 0 and json.loads(res.stdout)["examples"] > 0, res.output
    fed = tmp_path / "fed.yaml"
    fed.write_text(f"data: {demo_paths[0]}\nclients: 2\nclient-dp-noise: 1.0\n")  # refused before anything starts
    res = run("federate", "--config", fed, "--model", "tiny-llama", "--out", tmp_path / "fed")
    assert res.exit_code == 2 and "--client-dp-clip" in res.stderr

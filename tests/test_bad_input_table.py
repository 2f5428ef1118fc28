"""Settings you can trust (issue 34): every bad input of the review, as input -> exit code and message fragment.

Each row runs the real CLI (CliRunner) on a tiny model. Exit 2 rows must print exactly one line on stderr starting
with "error:" and no traceback, and must not have created the output they were refused for. Rows that should succeed
(exit 0) check the result that used to be wrong. Then `hypothesis` throws random flag combinations at the settings
model and at `train --dry-run`: nothing but a one-line error or success may come out.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from slimtune import SlimtuneError
from slimtune.cli import app

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"
TRAIN, DEV = str(DEMO / "sst2_demo_train.tsv"), str(DEMO / "sst2_demo_dev.tsv")
runner = CliRunner()
TINY = ["--model", "tiny-llama"]
FAST = ["--steps", "2", "--batch-size", "4", "--quiet", "--r", "2"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line(res, needle: str, code: int = 2):
    assert res.exit_code == code, res.output
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "Traceback" not in res.output
    assert needle in " ".join(lines[0].split()), lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished LoRA MeZO run and a finished DPZero run to resume from (2 steps each)."""
    root = tmp_path_factory.mktemp("runs")
    lora = root / "lora"
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "mezo", *FAST, "--eval-every", "0", "--out", lora)
    assert res.exit_code == 0, res.output
    dp = root / "dp"
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "dpzero", "--epsilon", "3", "--delta", "1e-3", *FAST,
              "--eval-every", "0", "--out", dp)
    assert res.exit_code == 0, res.output
    return {"lora": lora, "dp": dp, "root": root}


def copy_run(runs, name, tmp_path):
    target = tmp_path / name
    shutil.copytree(runs[name], target)
    return target


# -- rows: (id, argv, needle); {tmp} is the test's directory --------------------------------------------------------
TRAIN_BASE = ["train", "--data", TRAIN, *TINY, "--out", "{tmp}/out"]
ROWS = [
    # privacy settings silently dropped
    ("dp-flags-without-dp", [*TRAIN_BASE, "--optimizer", "mezo", "--epsilon", "2", "--delta", "1e-5"],
     "--epsilon applies only to --optimizer dp-adamw, dp-sgd, dpzero"),
    ("noise-without-dp", [*TRAIN_BASE, "--optimizer", "adamw", "--noise-multiplier", "1"],
     "--noise-multiplier applies only"),
    # flags the method does not use
    ("adamw-eps", [*TRAIN_BASE, "--optimizer", "adamw", "--eps", "0.5"], "--eps applies only to --optimizer"),
    ("adamw-n-spsa", [*TRAIN_BASE, "--optimizer", "adamw", "--n-spsa", "4"], "--n-spsa applies only"),
    ("mezo-momentum", [*TRAIN_BASE, "--optimizer", "mezo", "--momentum", "0.9"], "--momentum applies only"),
    ("lora-svfit-absolute", [*TRAIN_BASE, "--peft", "lora", "--svfit-absolute"], "--svfit-relative applies only"),
    ("none-r", [*TRAIN_BASE, "--peft", "none", "--r", "4"], "--r applies only"),
    ("sst2-template-other-column", [*TRAIN_BASE, "--template", "{text} It was"], "only {sentence} can be filled in"),
    ("sst2-label-words-other-values", [*TRAIN_BASE, "--label-words", "neg=bad,pos=good"], "has the label values 0, 1"),
    ("generation-label-words", [*TRAIN_BASE, "--task", "generation", "--label-words", "0=a,1=b"],
     "--label-words applies only"),
    ("classification-num-beams", [*TRAIN_BASE, "--num-beams", "2"], "--num-beams applies only"),
    ("eval-every-without-eval", [*TRAIN_BASE, "--eval-every", "5"], "--eval-every applies only"),
    ("patience-without-eval", [*TRAIN_BASE, "--patience", "2"], "--patience applies only"),
    ("dphizoo-laplace", [*TRAIN_BASE, "--optimizer", "dphizoo", "--mechanism", "laplace", "--clipping", "fixed"],
     "dphizoo releases two values per step"),
    ("dphybrid-laplace", [*TRAIN_BASE, "--optimizer", "dphybrid", "--mechanism", "laplace", "--clipping", "fixed"],
     "dphybrid releases two values per step"),
    ("fo-clip-without-dphybrid", [*TRAIN_BASE, "--optimizer", "hybrid", "--fo-clip", "0.5"], "--fo-clip"),
    ("adaptive-flag-fixed", [*TRAIN_BASE, "--optimizer", "dpzero", "--clipping", "fixed", "--clip-lr", "0.3"],
     "--clip-lr applies only to adaptive clipping"),
    # ranges
    ("eps-zero", [*TRAIN_BASE, "--eps", "0"], "--eps 0: must be > 0"),
    ("lozo-nu-zero", [*TRAIN_BASE, "--optimizer", "lozo", "--lozo-nu", "0"], "--lozo-nu 0: must be >= 1"),
    ("negative-lr", [*TRAIN_BASE, "--lr", "-0.01"], "--lr -0.01: must be > 0"),
    ("max-length-1", [*TRAIN_BASE, "--max-length", "1"], "--max-length 1: must be >= 8"),
    ("negative-k-shot", [*TRAIN_BASE, "--k-shot", "-1"], "--k-shot -1: must be >= 0"),
    ("negative-eval-max", [*TRAIN_BASE, "--eval-data", DEV, "--eval-max", "-3"], "--eval-max -3: must be >= 0"),
    ("negative-patience", [*TRAIN_BASE, "--eval-data", DEV, "--patience", "-1"], "--patience -1: must be >= 0"),
    ("nan-lr", [*TRAIN_BASE, "--lr", "nan"], "--lr nan: must be a finite number"),
    ("warmup-over-steps", [*TRAIN_BASE, "--steps", "5", "--warmup-steps", "5"], "--warmup-steps 5"),
    ("dtype-fp16-cpu", [*TRAIN_BASE, "--dtype", "fp16"], "--dtype float16 needs a CUDA device"),
    ("dtype-unknown", [*TRAIN_BASE, "--dtype", "int3"], "--dtype 'int3'"),
    ("device-gpu", [*TRAIN_BASE, "--device", "gpu"], "--device 'gpu'"),
    ("device-cuda", [*TRAIN_BASE, "--device", "cuda"], "no CUDA device"),
    ("plan-device-cuda", ["plan", *TINY, "--device", "cuda"], "no CUDA device"),
    ("unknown-flag", [*TRAIN_BASE, "--nope", "1"], "No such option"),
    ("not-an-int", [*TRAIN_BASE, "--steps", "abc"], "'abc' is not a valid integer"),
    # templates and label words
    ("template-empty-field", [*TRAIN_BASE, "--task", "custom", "--template", "{} It was", "--label-words",
                              "0=bad,1=good"], "placeholders need a column name"),
    ("template-no-placeholder", [*TRAIN_BASE, "--task", "custom", "--template", "It was", "--label-words",
                                 "0=bad,1=good"], "has no placeholder"),
    ("label-words-twice", [*TRAIN_BASE, "--task", "custom", "--template", "{sentence} It was", "--label-words",
                           "0=bad,0=awful,1=good"], "label value '0' appears twice"),
    ("label-words-same-word", [*TRAIN_BASE, "--task", "custom", "--template", "{sentence} It was",
                               "--label-words", "0=good,1=good"], "label word 'good' appears twice"),
    ("generation-template-no-placeholder", [*TRAIN_BASE, "--task", "generation", "--template", "Hello"],
     "has no placeholder"),
    ("generate-template-column", ["generate", *TINY, "--input", TRAIN, "--template", "{mr}"],
     "only {input} can be filled in"),
    ("generate-template-no-placeholder", ["generate", *TINY, "--prompt", "x", "--template", "Hello"],
     "has no placeholder"),
    ("generate-max-length-0", ["generate", *TINY, "--prompt", "x", "--max-length", "0"], "--max-length 0"),
    ("generate-input-column-with-prompt", ["generate", *TINY, "--prompt", "x", "--input-column", "mr"],
     "--input-column applies to --input"),
    ("eval-batch-size-0", ["eval", "--data", DEV, *TINY, "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    ("eval-predictions-classification", ["eval", "--data", DEV, *TINY, "--predictions", "{tmp}/p.jsonl"],
     "--predictions applies only to --task generation"),
    # outputs checked before any work
    ("eval-predictions-missing-dir", ["eval", "--data", DEV, *TINY, "--task", "generation", "--predictions",
                                     "{tmp}/missing/p.jsonl"], "does not exist"),
    ("eval-predictions-is-dir", ["eval", "--data", DEV, *TINY, "--task", "generation", "--predictions", "{tmp}"],
     "is a directory"),
    ("generate-output-missing-dir", ["generate", *TINY, "--prompt", "x", "--output", "{tmp}/missing/o.jsonl"],
     "does not exist"),
    ("generate-output-exists", ["generate", *TINY, "--prompt", "x", "--output", "{tmp}/exists.txt"], "exists"),
    ("merge-out-is-file", ["merge", "{tmp}", *TINY, "--out", "{tmp}/exists.txt"], "is a file"),
    ("report-out-is-file", ["report", "{tmp}", "--out", "{tmp}/exists.txt"], "is a file"),
    ("train-out-is-file", [*TRAIN_BASE[:-2], "--out", "{tmp}/exists.txt"], "is a file"),
    ("export-out-exists", ["export", "{tmp}", *TINY, "--out", "{tmp}/exists.gguf"], "exists"),
    # federate: checked before Flower or Ray start
    ("federate-clients-0", ["federate", "--data", TRAIN, *TINY, "--clients", "0", "--out", "{tmp}/out"],
     "--clients 0: must be >= 1"),
    ("federate-eps-adamw", ["federate", "--data", TRAIN, *TINY, "--eps", "1e-2", "--out", "{tmp}/out"],
     "--eps applies only to zeroth-order clients"),
    ("federate-local-dp-without-dp", ["federate", "--data", TRAIN, *TINY, "--local-dp-noise", "2", "--out",
                                      "{tmp}/out"], "--local-dp-noise applies only"),
    ("federate-out-holds-a-file", ["federate", "--data", TRAIN, *TINY, "--out", "{tmp}"], "{tmp}"),
    # data
    ("batch-over-dataset", [*TRAIN_BASE, "--batch-size", "1000"], "larger than the 72 training examples"),
    ("data-missing", ["train", "--data", "{tmp}/nope.tsv", *TINY, "--out", "{tmp}/out"], "no such file"),
    ("resume-nothing", [*TRAIN_BASE, "--resume"], "no run there"),
    ("resume-and-restart", [*TRAIN_BASE, "--resume", "--restart"], "--resume"),
]


@pytest.mark.parametrize("argv,needle", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_before_any_work(tmp_path, argv, needle):
    (tmp_path / "exists.txt").write_text("keep me")
    (tmp_path / "exists.gguf").write_text("keep me")
    res = cli(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert_one_line(res, needle.replace("{tmp}", str(tmp_path)))
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert (tmp_path / "exists.txt").read_text() == "keep me"


# -- config files ------------------------------------------------------------------------------------------------
CONFIG_ROWS = [
    ("nested.yaml", f"train:\n  data: {TRAIN}\neval:\n  data: {DEV}\n", "nested section"),
    ("float-steps.yaml", f"data: {TRAIN}\nsteps: 2.7\n", "expected an integer, got 2.7"),
    ("include.yaml", f"data: {TRAIN}\nconfig_file: other.yaml\n", "cannot include another"),
    ("list.yaml", f"data: {TRAIN}\nlr: [1, 2]\n", "got a list"),
    ("bool-as-int.yaml", f"data: {TRAIN}\nsteps: true\n", "expected an integer"),
    ("string-bool.yaml", f"data: {TRAIN}\nquiet: 'yes'\n", "expected true or false"),
    ("unknown.yaml", f"data: {TRAIN}\nlearning_rate: 0.1\n", "unknown setting 'learning_rate'"),
]


@pytest.mark.parametrize("name,text,needle", CONFIG_ROWS, ids=[r[0] for r in CONFIG_ROWS])
def test_config_file_rows(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    res = cli("train", "--config", path, *TINY, "--out", tmp_path / "out")
    assert_one_line(res, needle)
    assert name in res.stderr and not (tmp_path / "out").exists()


def test_non_utf8_config_and_data_are_one_line_errors(tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("data: caf\xe9.tsv\n".encode("latin-1"))
    assert_one_line(cli("train", "--config", cfg, *TINY, "--out", tmp_path / "out"), "not UTF-8")
    data = tmp_path / "latin1.tsv"
    data.write_bytes("sentence\tlabel\nun caf\xe9 terrible\t0\n".encode("latin-1"))
    assert_one_line(cli("train", "--data", data, *TINY, *FAST, "--out", tmp_path / "out"), "not UTF-8")


def test_tsv_rows_with_extra_fields_name_their_line(tmp_path):
    data = tmp_path / "extra.tsv"
    data.write_text("sentence\tlabel\na fine film\t1\na bad\tfilm\t0\n")
    assert_one_line(cli("train", "--data", data, *TINY, *FAST, "--out", tmp_path / "out"), f"{data}:3: 3 fields")


# -- resume is exact or refused -----------------------------------------------------------------------------------
@pytest.mark.parametrize("change,needle", [
    (["--optimizer", "mezo"], "optimizer: 'dpzero' -> 'mezo'"),
    (["--epsilon", "8"], "privacy.target_epsilon: 3.0 -> 8.0"),
    (["--delta", "0.5"], "privacy.delta"),
    (["--batch-size", "8"], "batch_size: 4 -> 8"),
])
def test_a_private_run_resumes_only_as_itself(runs, tmp_path, change, needle):
    run = copy_run(runs, "dp", tmp_path)
    before = (run / "config.json").read_text()
    assert_one_line(cli("train", "--out", run, "--resume", "--steps", "4", *change), needle)
    assert (run / "config.json").read_text() == before  # (lead) a completed run's key was retired when it completed


@pytest.mark.parametrize("change,needle", [
    (["--peft", "pissa"], "peft.method: 'lora' -> 'pissa'"),
    (["--lr", "0.5"], "optim.lr"),
    (["--target-modules", "q_proj"], "peft.target_modules"),
    (["--r", "4"], "peft.r: 2 -> 4"),
    (["--optimizer", "adamw"], "optimizer: 'mezo' -> 'adamw'"),
])
def test_resume_refuses_what_changes_the_trajectory(runs, tmp_path, change, needle):
    run = copy_run(runs, "lora", tmp_path)
    assert_one_line(cli("train", "--out", run, "--resume", "--steps", "4", *change), needle)


def test_resume_takes_the_runs_settings_and_records_what_changed(runs, tmp_path):
    run = copy_run(runs, "lora", tmp_path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a partial last line, as a kill leaves it
    res = cli("train", "--out", run, "--resume", "--steps", "4")
    assert res.exit_code == 0, res.output
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 4 and config["optimizer"] == "mezo" and config["peft"]["r"] == 2
    assert len(config["resumed"]) == 1 and config["resumed"][0]["at_step"] == 2
    assert config["resumed"][0]["changed"]["steps"] == [2, 4]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert json.loads((run / "status.json").read_text())["state"] == "completed"


def test_a_second_run_into_a_finished_directory_is_refused(runs, tmp_path):
    run = copy_run(runs, "lora", tmp_path)
    before = (run / "metrics.jsonl").read_text()
    assert_one_line(cli("train", "--data", TRAIN, *TINY, *FAST, "--out", run), "already holds a run")
    assert (run / "metrics.jsonl").read_text() == before


def test_a_run_directory_has_one_owner(tmp_path):
    from slimtune.train.run_dir import RunDirectory
    holder = RunDirectory(tmp_path / "out")
    holder.acquire()  # as a training process would
    try:
        assert_one_line(cli("train", "--data", TRAIN, *TINY, *FAST, "--out", tmp_path / "out"),
                        "another slimtune process")
    finally:
        holder.release()


def test_a_failed_run_is_marked_and_restart_moves_it_aside(tmp_path, monkeypatch):
    import slimtune.train.trainer as trainer
    step = trainer._step

    def failing(run, i):
        if i == 1:
            raise SlimtuneError("training loss is nan at step 2")  # what a diverging run reports
        return step(run, i)

    monkeypatch.setattr(trainer, "_step", failing)
    out = tmp_path / "out"
    res = cli("train", "--data", TRAIN, *TINY, *FAST, "--out", out)
    assert_one_line(res, "training loss is nan")
    monkeypatch.undo()
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
    assert_one_line(cli("train", "--data", TRAIN, *TINY, *FAST, "--out", out), "--restart")
    res = cli("train", "--data", TRAIN, *TINY, *FAST, "--optimizer", "adamw", "--out", out, "--restart")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.failed-1" / "status.json").exists()  # nothing lost
    assert json.loads((out / "status.json").read_text())["state"] == "completed"


# -- accepted and used to be wrong --------------------------------------------------------------------------------
def test_eval_max_evaluates_exactly_that_many(tmp_path):
    res = cli("train", "--data", TRAIN, "--eval-data", DEV, *TINY, *FAST, "--eval-max", "1", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["eval_examples"] == 1


def test_classification_eval_honours_max_length(tmp_path):
    losses = []
    for length in ("8", "256"):
        res = cli("eval", "--data", DEV, *TINY, "--max-length", length)
        assert res.exit_code == 0, res.output
        losses.append(json.loads(res.stdout)["loss"])
    assert losses[0] != losses[1]


def test_generate_prompt_with_output_writes_the_file(tmp_path):
    out = tmp_path / "o.jsonl"
    res = cli("generate", *TINY, "--prompt", "a lovely film", "--max-new-tokens", "3", "--output", out)
    assert res.exit_code == 0, res.output
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "a lovely film"


def test_demo_never_overwrites_an_earlier_demo(tmp_path, monkeypatch):
    from slimtune.settings.commands import DemoSettings
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "keep").write_text("x")
    assert DemoSettings.build({}).out == "runs/demo-2"
    with pytest.raises(SlimtuneError, match="not empty"):
        DemoSettings.build({"out": "runs/demo"}, given={"out"})


# -- fuzzing -------------------------------------------------------------------------------------------------------
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.sampled_from(["mezo", "dpzero", "adamw", "lora", "none", "svfit",
                                                          "generation", "custom", "{text} x", "0=a,1=b", "fp16",
                                                          "cuda", "pool", "fixed", "shuffle", "pld"]),
                   st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                             max_size=1))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(sorted(__import__("slimtune.settings.train", fromlist=["TrainSettings"])
                                              .TrainSettings.defaults())), VALUES, max_size=6))
def test_random_settings_never_raise_anything_but_a_one_line_error(values):
    from slimtune.settings.train import TrainSettings
    values = {"data": TRAIN, **values}
    try:
        s = TrainSettings.build(values)
        s.to_config()
    except SlimtuneError as exc:
        assert "\n" not in str(exc).strip()


FLAG_VALUES = {"--optimizer": ["mezo", "dpzero", "adamw", "lozo", "fzoo", "hybrid", "x"],
               "--peft": ["lora", "none", "svfit", "pissa", "adapter"], "--task": ["sst2", "custom", "generation"],
               "--lr": ["1e-3", "-1", "0", "abc", "inf"], "--eps": ["1e-3", "0"], "--epsilon": ["2", "0", "-1"],
               "--steps": ["1", "0", "2.5"], "--batch-size": ["4", "0", "100000"], "--r": ["2", "0"],
               "--momentum": ["0.9", "1.5"], "--template": ["{text} It was", "{}", "plain"],
               "--label-words": ["0=a,1=b", "0=a,0=b", "x"], "--dtype": ["bf16", "fp16", "float32"],
               "--device": ["cpu", "cuda", "tpu"], "--clipping": ["fixed", "adaptive"], "--eval-every": ["0", "3"],
               "--max-length": ["1", "64"], "--n-spsa": ["1", "4"], "--perturbation": ["pool", "gaussian"],
               "--resume": [None], "--restart": [None], "--eval-data": [DEV]}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.integers(0, 6), max_size=5))
def test_random_command_lines_end_in_success_or_one_line(tmp_path_factory, picks):
    out = tmp_path_factory.mktemp("fuzz") / "out"
    argv = ["train", "--data", TRAIN, *TINY, "--out", str(out), "--dry-run"]
    for flag_name, i in picks.items():
        options = FLAG_VALUES[flag_name]
        value = options[i % len(options)]
        argv += [flag_name] if value is None else [flag_name, value]
    res = runner.invoke(app, argv)
    assert "Traceback" not in res.output
    assert res.exit_code in (0, 2), res.output
    if res.exit_code == 2:
        lines = [l for l in res.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert not out.exists()  # --dry-run writes nothing


def test_report_labels_a_run_that_did_not_complete(runs, tmp_path):
    run = copy_run(runs, "lora", tmp_path)
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "state": "failed"}))
    from slimtune.report import load_runs
    assert "(failed" in load_runs([str(run)])[0].name


def test_ctrl_c_stops_after_a_step_with_the_resume_command(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "slimtune.cli", "train", "--data", TRAIN, *TINY, "--steps",
                             "100000", "--batch-size", "4", "--r", "2", "--checkpoint-every", "1000", "--out", str(out),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and
                                          len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [l for l in err.splitlines() if l.strip() and "stopping after this step" not in l]
    assert len(lines) == 1 and "resume with: slimtune train --out" in lines[0], err
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted" and (out / "checkpoint" / "trainer_state.json").exists()
    step = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert step >= 2 and step == status["step"]
    res = cli("train", "--out", out, "--resume", "--steps", str(step + 2))
    assert res.exit_code == 0, res.output


def test_a_run_resumed_twice_keeps_its_history(runs, tmp_path):
    run = copy_run(runs, "lora", tmp_path)
    for steps in ("3", "4"):
        res = cli("train", "--out", run, "--resume", "--steps", steps)
        assert res.exit_code == 0, res.output
    history = json.loads((run / "config.json").read_text())["resumed"]
    assert [h["at_step"] for h in history] == [2, 3]


def test_the_optimizer_table_says_what_each_optimizer_is():
    """slimtune/optim/methods.py is the one list of optimizers (settings, registry, planner, sources and accountant
    read it): each row's claims hold for the optimizer the registry builds."""
    from slimtune.models.loading import tiny_model
    from slimtune.optim import OptimizerArgs, build_optimizer
    from slimtune.optim.builders import private_releases
    from slimtune.optim.methods import METHODS
    from slimtune.peft import PeftSettings, apply_peft
    from slimtune.privacy import PrivacySpec
    from slimtune.privacy.dpzero import PrivateDifference
    from slimtune.settings import train as settings
    from slimtune.zo.perturbation import check_perturbation
    assert settings.TrainSettings.defaults()["optimizer"] in METHODS
    for name, method in METHODS.items():
        model = apply_peft(tiny_model("tiny-llama", 50, 0, 1), PeftSettings("lora", r=2))
        private = (PrivacySpec(noise_multiplier=1.0), 1.0, 4.0, None) if method.private else None
        args = OptimizerArgs(lr=1e-3, eps=1e-2, fo_layers=1 if method.kind == "hybrid" else None,
                             perturbation="pool" if method.sources else "gaussian")
        opt = build_optimizer(name, model, args, private=private)
        # sources: the optimizer draws z from the source it was given (the others are refused one below)
        assert (getattr(getattr(opt, "source", None), "name", None) == "pool") == method.sources, name
        assert opt.zeroth_order == (method.kind != "first-order"), name
        assert hasattr(opt, "top") == (method.kind == "hybrid"), name
        if method.private and method.kind != "first-order":
            assert isinstance(opt.estimator, PrivateDifference), name
        if method.adaptive_clipping:
            assert method.private and method.kind != "first-order", name
        assert private_releases(name, 1) == (method.releases if method.private else 1), name
        if not method.sources:
            with pytest.raises(SlimtuneError, match="--perturbation pool"):
                check_perturbation("pool", name)

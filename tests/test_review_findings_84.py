"""Review 84: a careless user of the commands other than training (generate, eval, export, report, plan) and of
`train --resume`.

Each test failed on the code it was written against (see the docstrings for what happened)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO, cli, one_line_error
from test_review_findings_10 import fake_run

TINY = ["--model", "tiny-llama"]
TRAIN, DEV = DEMO / "sst2_demo_train.tsv", DEMO / "sst2_demo_dev.tsv"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed 4-step AdamW + LoRA run on tiny-llama (checkpoint/, adapter/, config.json, status.json)."""
    run = tmp_path_factory.mktemp("r84") / "run"
    res = cli("train", "--data", TRAIN, "--eval-data", DEV, *TINY, "--optimizer", "adamw", "--peft", "lora",
              "--steps", 4, "--eval-every", 2, "--batch-size", 8, "--out", run, "--quiet")
    assert res.exit_code == 0, res.output
    assert (run / "checkpoint").is_dir() and (run / "adapter").is_dir()
    return run


def copy_run(run: Path, where: Path) -> Path:
    shutil.copytree(run, where)
    return where


# -- a run file that is a directory: an internal error (exit 1), not one line naming it -------------------------------
@pytest.mark.parametrize("name", ["summary.json", "metrics.jsonl", "status.json", "config.json"])
def test_report_of_a_run_whose_file_is_a_directory_is_one_line_naming_it(tmp_path, name):
    """`report RUN` where RUN/summary.json (or metrics.jsonl, status.json, config.json) is a directory ended in
    'error: internal error (IsADirectoryError: [Errno 21] Is a directory: ...); please report it', exit code 1:
    only JSON and UTF-8 errors were caught (report/render.py _load_summary, train/metrics.numbered_records,
    run_dir.read_status, resume.read_stored)."""
    run = fake_run(tmp_path / "run")
    path = run / name
    if path.exists():
        path.unlink()
    path.mkdir()
    (path / "x").write_text("{}")
    out = tmp_path / "report"
    res = cli("report", run, "--out", out)
    if res.exit_code == 0:  # config.json is optional for a report: a run whose record cannot be read may be reported
        assert name == "config.json", res.output
        return
    message = one_line_error(res)
    assert name in message, message
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("name", ["config.json", "status.json"])
def test_resume_of_a_run_whose_record_is_a_directory_is_one_line_naming_it(tmp_path, finished_run, name):
    """`train --resume --out RUN` where RUN/config.json or RUN/status.json is a directory: 'internal error
    (IsADirectoryError ...)', exit code 1, instead of one line naming the file."""
    run = copy_run(finished_run, tmp_path / "run")
    (run / name).unlink()
    (run / name).mkdir()
    res = cli("train", "--resume", "--out", run, "--steps", 6, "--quiet")
    message = one_line_error(res)
    assert name in message, message


# -- a named pipe where a run file should be: report waits forever ------------------------------------------------------
@pytest.mark.parametrize("name", ["summary.json", "metrics.jsonl"])
def test_report_does_not_hang_on_a_run_file_that_is_a_named_pipe(tmp_path, name):
    """A named pipe in place of RUN/summary.json (or metrics.jsonl): `slimtune report RUN` blocked forever in
    read_text (the data readers refuse pipes and devices for this reason: data/readers.require_data_file). It should
    refuse in one line naming the file. (Run in a child process: in this one a hang would stall the suite; the limit
    is only a guard against that hang, far above the seconds the refusal takes.)"""
    run = fake_run(tmp_path / "run")
    (run / name).unlink()
    os.mkfifo(run / name)
    env = {**os.environ, "SLIMTUNE_DEBUG": ""}
    try:
        res = subprocess.run([sys.executable, "-m", "slimtune.cli", "report", str(run), "--out",
                              str(tmp_path / "report")], capture_output=True, text=True, timeout=60, env=env,
                             cwd=str(Path(__file__).resolve().parents[1]))
    except subprocess.TimeoutExpired:
        pytest.fail(f"`slimtune report` still waiting on the named pipe {name} after 60 s")
    assert res.returncode == 2, (res.returncode, res.stderr[-500:])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], res.stderr


# -- outputs written into RUN/checkpoint/ are deleted by the next checkpoint save ---------------------------------------
def test_outputs_written_into_a_runs_checkpoint_directory_survive_its_resume(tmp_path, finished_run):
    """`generate --adapter RUN/adapter --output RUN/checkpoint/out.jsonl` and `report RUN --out RUN/checkpoint/report`
    were accepted (check_outside guards only the adapter directory); the next checkpoint save (`train --resume`,
    checkpoint.save_checkpoint swaps a fresh directory in and rmtree's the old one) deleted the user's files without a
    word. Either the commands refuse such an output (one line naming the flag), or the files survive the resume."""
    run = copy_run(finished_run, tmp_path / "run")
    written = []
    gen = run / "checkpoint" / "completions.jsonl"
    res = cli("generate", "--adapter", run / "adapter", "--prompt", "great movie", "--max-new-tokens", 2,
              "--output", gen)
    if res.exit_code == 2:
        assert "--output" in one_line_error(res)
    else:
        assert res.exit_code == 0 and gen.is_file(), res.output
        written.append(gen)
    rep = run / "checkpoint" / "report"
    res = cli("report", run, "--out", rep)
    if res.exit_code == 2:
        assert "--out" in one_line_error(res)
    else:
        assert res.exit_code == 0 and (rep / "report.md").is_file(), res.output
        written.append(rep / "report.md")
    res = cli("train", "--resume", "--out", run, "--steps", 6, "--quiet")
    assert res.exit_code == 0, res.output
    lost = [str(p.relative_to(run)) for p in written if not p.exists()]
    assert not lost, f"deleted by the resume: {lost}"


# -- a --num-beams no model can run -------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_num_beams_beyond_any_vocabulary_is_refused_before_generating(tmp_path, monkeypatch, command):
    """`--num-beams 100000000` (a typo for 10) passed every check (low=1, no upper bound): the model was loaded and
    transformers' beam search tried to allocate beams x prompt tensors (3.2 GB for a 4-token prompt, growing with
    each step); under a memory limit 'internal error (RuntimeError: ... DefaultCPUAllocator: can't allocate memory
    ...)', exit 1. Beam search keeps at most one beam per vocabulary entry worth having: a width beyond the
    vocabulary (tiny-llama's is a few hundred words; no model has 10^8) is bad input, refused in one line before any
    work. (Here generation itself is replaced by a marker, so the test never allocates.)"""
    import slimtune.generation.decode as decode

    def reached(*args, **kwargs):
        raise RuntimeError("REACHED GENERATION")

    monkeypatch.setattr(decode, "_generate", reached)
    if command == "generate":
        res = cli("generate", *TINY, "--prompt", "great movie", "--num-beams", 10**8, "--max-new-tokens", 2,
                  "--output", tmp_path / "out.jsonl")
    else:
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"food {i}\n", "completion": f"a place {i}"}) + "\n"
                                for i in range(4)))
        res = cli("eval", *TINY, "--task", "generation", "--data", data, "--num-beams", 10**8, "--max-new-tokens", 2)
    assert "REACHED GENERATION" not in res.output, res.output
    assert "--num-beams" in one_line_error(res)


# -- report: a damaged line inside metrics.jsonl is skipped without a word -------------------------------------------------
def test_report_does_not_silently_drop_a_damaged_line_inside_metrics(tmp_path):
    """metrics.jsonl lines that do not parse are skipped (train.metrics.numbered_records), which is right for the
    partial *last* line a kill leaves; but a damaged line in the middle (a disk error, a bad edit, a merge of two
    logs) was skipped too, and `report` drew the curves without that evaluation, exit 0 and no word. A damaged line
    that is not the last should be named (file:line), as _checked_metrics names a non-numeric value."""
    run = fake_run(tmp_path / "run", metrics=[{"step": 1, "eval_accuracy": 0.5}])
    (run / "metrics.jsonl").write_text('{"step": 1, "eval_accuracy": 0.5}\n{"step": 2, "eval_accur\x00\x00\n'
                                       '{"step": 3, "eval_accuracy": 0.75}\n')
    out = tmp_path / "report"
    import warnings

    from typer.testing import CliRunner  # (lead) not cli(): it silences warnings, and a warning is an answer here

    from slimtune.cli import app
    with warnings.catch_warnings(record=True) as caught:  # what the CLI prints as `warning: ...` lines
        warnings.simplefilter("always")
        res = CliRunner().invoke(app, ["report", str(run), "--out", str(out)])
    said = " ".join(str(w.message) for w in caught) if res.exit_code == 0 else one_line_error(res)
    assert "metrics.jsonl:2" in " ".join(said.split()), (res.exit_code, res.output)


# -- (lead) review 84's suspicions, confirmed --------------------------------------------------------------------------
def test_plans_suggested_train_flags_carry_the_shape_it_planned(tmp_path):
    """(lead) `plan --r 4 --max-length 64` sized its rows at rank 4 and 64 tokens, but the train flags it printed
    held neither: copied, they trained at train's defaults (rank 8, 256 tokens: more memory than was found to fit)."""
    res = cli("plan", *TINY, "--r", 4, "--max-length", 64, "--batch-size", 4)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "--optimizer mezo --peft lora --r 4 --batch-size 4 --max-length 64" in text, res.output[-2000:]


def test_a_stray_comma_in_target_modules_is_refused_before_any_work(tmp_path):
    """(lead) `--target-modules "q_proj,"` passed --dry-run and was refused by the real run after the model loaded,
    as a layer named '' ("--target-modules : no such layer")."""
    line = one_line_error(cli("train", "--data", TRAIN, *TINY, "--target-modules", "q_proj,", "--out", tmp_path / "o",
                              "--dry-run"))
    assert "--target-modules" in line and "empty" in line, line


@pytest.mark.parametrize("row", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                     "content": "yo"}],
                                  "prompt": "other", "completion": "other"}],
                         ids=["messages-and-pair"])
def test_a_row_with_both_a_conversation_and_a_pair_is_refused_naming_its_line(tmp_path, row):
    """(lead) A JSONL row holding `messages` and `prompt`/`completion` used the conversation and dropped the pair
    without a word (train, eval, generate)."""
    data = tmp_path / "rows.jsonl"
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    data.write_text(json.dumps(ok) + "\n" + json.dumps(row) + "\n")
    line = one_line_error(cli("eval", *TINY, "--task", "generation", "--data", data, "--max-new-tokens", 2))
    assert f"{data}:2" in line and "both" in line, line
    line = one_line_error(cli("generate", *TINY, "--input", data, "--max-new-tokens", 2, "--output",
                              tmp_path / "out.jsonl"))
    assert f"{data}:2" in line and "both" in line, line
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n" + json.dumps({**ok, "prompt": "p",
                                                                                        "completion": "c"}) + "\n")
    line = one_line_error(cli("eval", *TINY, "--task", "generation", "--data", pairs, "--max-new-tokens", 2))
    assert f"{pairs}:2" in line and "messages" in line, line


def test_train_resume_through_a_copied_runs_config_json_is_refused_not_the_original_resumed(tmp_path):
    """(lead) `train --config COPY/config.json --resume` took out_dir from that record (the run's original directory)
    and resumed the original, not the copy the user pointed at. Without --out it is refused in one line naming both;
    with --out COPY it resumes the copy."""
    orig, copy = tmp_path / "orig", tmp_path / "copy"
    res = cli("train", "--data", TRAIN, *TINY, "--steps", 2, "--batch-size", 4, "--out", orig, "--quiet")
    assert res.exit_code == 0, res.output
    shutil.copytree(orig, copy)
    before = (orig / "metrics.jsonl").read_text()
    line = one_line_error(cli("train", "--config", copy / "config.json", "--resume", "--steps", 3, "--quiet"))
    assert "--config" in line and "--out" in line, line
    assert (orig / "metrics.jsonl").read_text() == before
    res = cli("train", "--config", copy / "config.json", "--resume", "--out", copy, "--steps", 3, "--quiet")
    assert res.exit_code == 0, res.output
    assert (orig / "metrics.jsonl").read_text() == before


def test_generate_says_when_a_prompt_lost_its_beginning(tmp_path):
    """(lead) A prompt longer than --max-length (or than the room --max-new-tokens leaves in the model's positions)
    was cut from the left without a word: the completion was of another prompt than the one written."""
    import warnings

    from typer.testing import CliRunner

    from slimtune.cli import app
    long_prompt = " ".join(["great movie"] * 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner().invoke(app, ["generate", *TINY, "--prompt", long_prompt, "--max-length", "8",
                                       "--max-new-tokens", "2", "--output", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 0, res.output
    said = " ".join(str(w.message) for w in caught)
    assert "1 of 1 prompts" in said and "cut" in said, said

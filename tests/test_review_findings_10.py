"""Tenth review round: a careless user against the commands other than `train` (generate, eval, merge, export,
plan, report) and the adapter writer of the Python API.

Each test fails on the code it was written against (nothing here trains: adapters are built and saved directly)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slimtune import SlimtuneError
from test_bad_input_table import assert_one_line, cli  # the CLI runner and the one-line error check

TINY = ["--model", "tiny-llama"]
TEXTS = ["hello there", "good day", "a fine film", "a dull film"]


def saved_adapter(directory: Path, method: str) -> Path:
    """An untrained `method` adapter on tiny-llama saved as a run saves it (weights, tokenizer, slimtune.json)."""
    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft import PeftSettings, adapter_meta, apply_peft, write_adapter

    model, tok = load_model_and_tokenizer("tiny-llama", texts=TEXTS)
    model = apply_peft(model, PeftSettings(method=method, r=2))
    write_adapter(model, tok, directory, meta=adapter_meta("tiny-llama"))
    return directory


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters10")
    return {m: saved_adapter(root / m, m) for m in ("lora", "adapter")}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading any model is 'work': a check that should have come first shows up as this error instead."""
    import slimtune.models

    def refuse(*args, **kwargs):
        raise SlimtuneError("LOADED A MODEL")

    monkeypatch.setattr(slimtune.models, "load_model_and_tokenizer", refuse)


def fake_run(directory: Path, summary: dict | None = None, metrics: list[dict] | None = None) -> Path:
    """A finished run as `slimtune report` reads it: summary.json and metrics.jsonl."""
    directory.mkdir(parents=True)
    base = {"method": "mezo", "peft": "lora", "steps": 2, "final_accuracy": 0.5, "best_accuracy": 0.5,
            "peak_mem_mb": 10.0}
    (directory / "summary.json").write_text(json.dumps({**base, **(summary or {})}))
    rows = metrics if metrics is not None else [{"step": 1, "eval_accuracy": 0.5}]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


# -- adapters: nothing of the user's beside them is lost -----------------------------------------------------------
def test_write_adapter_never_deletes_a_users_directory_beside_it(tmp_path):
    """write_adapter (train, federate, the HF trainer's save_model into the user's own output_dir) builds the adapter
    in the fixed sibling `<dir>.tmp`, which it first rmtree's: the user's `mymodel.tmp/` was deleted without a word."""
    mine = tmp_path / "mymodel.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    saved_adapter(tmp_path / "mymodel", "lora")
    assert (mine / "notes.txt").read_text() == "mine"


# -- merge / export: an adapter that cannot be merged is known before the base is loaded --------------------------
@pytest.mark.parametrize("command", ["merge", "export"])
def test_an_adapter_that_cannot_be_merged_is_refused_before_the_base_is_loaded(adapters, tmp_path, no_model_loading,
                                                                                command):
    """A bottleneck adapter's slimtune_adapter.json says it cannot be folded into the weights, yet merge and export
    loaded the base model (minutes for a real one) before saying so."""
    out = tmp_path / ("merged" if command == "merge" else "model.gguf")
    res = cli(command, adapters["adapter"], *TINY, "--out", out)
    assert_one_line(res, "bottleneck")


# -- outputs that are symlinks: checked before the work, never failing after it -------------------------------------
def test_a_dangling_symlink_as_output_is_refused_before_any_model_is_loaded(tmp_path, no_model_loading):
    """`--output o.jsonl` where o.jsonl is a dangling symlink passed the check (Path.exists follows the link), the
    model was loaded and every completion generated, and then the write failed with the untrue 'appeared while this
    command ran'."""
    out = tmp_path / "o.jsonl"
    out.symlink_to(tmp_path / "nowhere.jsonl")
    res = cli("generate", *TINY, "--prompt", "hello there", "--max-new-tokens", "1", "--output", out)
    assert_one_line(res, "--output")
    assert "LOADED A MODEL" not in res.stderr and "appeared while" not in res.stderr
    assert out.is_symlink()


def test_merge_into_a_symlink_to_an_empty_directory_writes_there_or_is_refused_before_the_work(adapters, tmp_path):
    """check_new_directory accepts a symlink to an empty directory (is_dir follows it); the merge then ran in full
    and the final rename onto the link failed: 'could not write (Not a directory; nothing was overwritten)'."""
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    res = cli("merge", adapters["lora"], *TINY, "--out", link)
    if res.exit_code == 0:
        assert (target / "config.json").exists() and link.is_symlink()
    else:
        assert_one_line(res, "--out")
        assert "could not write" not in res.stderr  # refused by the check, not after the merge


# -- flags that do nothing ----------------------------------------------------------------------------------------
@pytest.fixture
def chat_prompts(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there"}]}) + "\n")
    return path


@pytest.mark.parametrize("flags, named", [(["--template", "Question: {input} Answer:"], "--template"),
                                          (["--chat"], "--chat")])
def test_generate_refuses_flags_a_file_of_conversations_ignores(chat_prompts, tmp_path, flags, named):
    """Conversations (`messages` rows) are always rendered with the chat template as they are: --template was never
    applied and --chat did nothing, without a word."""
    res = cli("generate", *TINY, "--input", chat_prompts, *flags, "--max-new-tokens", "1",
              "--output", tmp_path / "o.jsonl")
    assert_one_line(res, named)


def test_generate_refuses_batch_size_with_a_single_prompt():
    """--prompt generates one completion (streamed): --batch-size 64 did nothing."""
    res = cli("generate", *TINY, "--prompt", "hello there", "--batch-size", "64", "--max-new-tokens", "1")
    assert_one_line(res, "--batch-size")


@pytest.mark.parametrize("kind, flags, named", [
    ("pairs", ["--template", "Question: {input} Answer:"], "--template"),
    ("pairs", ["--target-column", "answer"], "--target-column"),
    ("chat", ["--template", "Question: {input} Answer:"], "--template"),
    ("chat", ["--target-column", "answer"], "--target-column"),
])
def test_eval_does_not_silently_drop_prompt_settings_its_data_does_not_use(tmp_path, kind, flags, named):
    """`eval --task generation` on prompt/completion JSONL or chat JSONL accepted --template and --target-column and
    scored the untemplated prompts against the `completion` / last assistant message: the numbers were of another
    evaluation than the one asked for."""
    data = tmp_path / "data.jsonl"
    if kind == "pairs":
        rows = [{"prompt": "hello there", "completion": "hi"}, {"prompt": "good day", "completion": "day"}]
    else:
        rows = [{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    predictions = tmp_path / "p.jsonl"
    res = cli("eval", *TINY, "--task", "generation", "--data", data, *flags, "--max-new-tokens", "1",
              "--predictions", predictions)
    if res.exit_code == 0 and named == "--template" and kind == "pairs":  # a fix may apply it instead
        prompts = [json.loads(line)["prompt"] for line in predictions.read_text().splitlines()]
        assert all(p.startswith("Question: ") for p in prompts), prompts
        return
    assert_one_line(res, named)


# -- plan ---------------------------------------------------------------------------------------------------------
def test_plan_names_the_model_flag():
    """`plan --model nope` said "model 'nope': not a directory ..." without naming --model."""
    res = cli("plan", "--model", "nope")
    assert_one_line(res, "--model")


# -- report ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("summary, metrics, named", [
    (None, [{"eval_accuracy": 0.5}], "metrics.jsonl"),  # a row without its step
    ({"epsilon": "3"}, None, "epsilon"),  # a number written as a string
])
def test_report_of_a_malformed_run_is_one_line_and_writes_nothing(tmp_path, summary, metrics, named):
    """A metrics.jsonl row without "step", or a summary.json epsilon that is a string, ended in 'internal error
    (KeyError: 'step')' / '(TypeError: can't multiply sequence ...)' with exit code 1, after the report directory
    was created and half filled with plots."""
    run = fake_run(tmp_path / "run", summary, metrics)
    out = tmp_path / "report"
    res = cli("report", run, "--out", out)
    assert_one_line(res, named)
    assert not out.exists() or not any(out.iterdir())


def test_an_interrupted_report_leaves_nothing_behind(tmp_path, monkeypatch):
    """render_report wrote the plots and report.md straight into --out: a Ctrl-C (or any failure) while writing
    report.html left a half report, which then also blocks `report --out` with the same directory."""
    import slimtune.report.render as render
    from slimtune.commands.report import make_report

    run = fake_run(tmp_path / "run")
    out = tmp_path / "report"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "_html", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_report([str(run)], str(out))
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) in (["run"], ["report", "run"])

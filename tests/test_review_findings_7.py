"""Seventh review round: a careless user against the commands other than `train` (generate, eval, merge, export,
plan, report, federate and the deployment script), config files, and the Python API.

Each test failed on the code before its fix."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from slimtune import SlimtuneError
from test_bad_input_table import assert_one_line, cli  # the CLI runner and the one-line error check

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"
TRAIN, DEV, E2E = str(DEMO / "sst2_demo_train.tsv"), str(DEMO / "sst2_demo_dev.tsv"), str(DEMO / "e2e_demo_dev.csv")
TINY = ["--model", "tiny-llama"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 2-step MeZO + LoRA run on tiny-llama, and its adapter merged into a plain checkpoint."""
    root = tmp_path_factory.mktemp("run7")
    res = cli("train", "--data", TRAIN, *TINY, "--steps", "2", "--batch-size", "4", "--r", "2", "--quiet",
              "--out", root / "run")
    assert res.exit_code == 0, res.output
    res = cli("merge", root / "run" / "adapter", *TINY, "--out", root / "merged")
    assert res.exit_code == 0, res.output
    return root


# -- generate: prompts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_is_one_line(prompt):
    """`generate --prompt ""` ended in an internal error (a reshape of 0 tokens inside the model)."""
    assert_one_line(cli("generate", *TINY, "--prompt", prompt), "--prompt")


def test_a_prompt_file_that_is_not_utf8_is_one_line(tmp_path):
    """A .txt prompt file in Latin-1 ended in an internal error (UnicodeDecodeError)."""
    path = tmp_path / "prompts.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert_one_line(cli("generate", *TINY, "--input", path), "not UTF-8")


def test_input_column_with_a_text_file_is_refused(tmp_path):
    """A .txt file has no columns: `--input-column` was silently ignored."""
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n")
    assert_one_line(cli("generate", *TINY, "--input", path, "--input-column", "text"), "--input-column")


# -- a byte order mark ----------------------------------------------------------------------------------------------
def test_files_saved_with_a_byte_order_mark_read_as_without(tmp_path):
    """Excel and Notepad save UTF-8 with a BOM: the first column of a TSV/CSV was '\\ufeffsentence' (train refused
    'missing column sentence'), and a JSONL's first line was 'not valid JSON'; so were a JSON config file and a .txt
    prompt file's first prompt."""
    from slimtune.data.readers import read_rows
    from slimtune.generation.prompts import read_prompt_items
    from slimtune.settings.cli import read_config_file

    bom = b"\xef\xbb\xbf"
    tsv = tmp_path / "train.tsv"
    tsv.write_bytes(bom + Path(TRAIN).read_bytes())
    rows, _ = read_rows(str(tsv))
    assert set(rows[0][1]) == {"sentence", "label"}
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(bom + b'{"input": "hi"}\n')
    assert read_rows(str(jsonl))[0] == [(1, {"input": "hi"})]
    txt = tmp_path / "p.txt"
    txt.write_bytes(bom + b"hello\n")
    assert read_prompt_items(str(txt)) == ["hello"]
    cfg = tmp_path / "c.json"
    cfg.write_bytes(bom + b'{"lr": 0.001}')
    assert read_config_file(str(cfg)) == {"lr": 0.001}


# -- an empty value is not "no value" -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["generate", *TINY, "--prompt", "hi", "--output", ""], "--output"),
    (["eval", "--data", E2E, *TINY, "--task", "generation", "--input-column", "mr", "--target-column", "ref",
      "--predictions", ""], "--predictions"),
    (["eval", "--data", DEV, *TINY, "--adapter", ""], "--adapter"),
    (["train", "--data", TRAIN, *TINY, "--eval-data", "", "--out", "{tmp}/out"], "--eval-data"),
    (["train", "--data", TRAIN, *TINY, "--out", ""], "--out"),
    (["report", "{tmp}", "--out", ""], "--out"),
    (["merge", "", *TINY, "--out", "{tmp}/merged"], "ADAPTER"),
])
def test_an_empty_value_is_refused_not_ignored(tmp_path, monkeypatch, args, needle):
    """`--output "$OUT"` with OUT unset printed to the terminal instead; `train --out ""` wrote the run into the
    current directory; `--eval-data ""` trained without evaluation; `--adapter ""` evaluated the bare base."""
    monkeypatch.chdir(tmp_path)
    res = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_one_line(res, needle)
    assert "empty" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_empty_value_in_a_config_file_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {DEV}\nadapter: ''\n")
    assert_one_line(cli("eval", "--config", cfg, *TINY), "setting 'adapter'")


# -- the model: checked before any work -----------------------------------------------------------------------------
def test_federate_checks_the_model_before_it_starts(tmp_path):
    """`federate --model nope` created the output directory and started Ray before the model was looked for; the
    deployment script started a SuperLink and SuperNodes and ended with 'the run wrote no summary'."""
    from slimtune.federated import FederatedConfig
    from slimtune.federated.config import check_run

    out = tmp_path / "fed"
    res = cli("federate", "--data", TRAIN, "--model", "nope", "--out", out)
    assert_one_line(res, "--model nope")
    assert not out.exists()
    with pytest.raises(SlimtuneError, match="--model nope"):
        check_run(FederatedConfig(data=TRAIN, model="nope", out_dir=str(tmp_path / "dep")))
    assert not (tmp_path / "dep").exists()


def test_deployment_timeout_is_checked_and_a_timeout_is_one_line(tmp_path, monkeypatch, capsys):
    """`python -m slimtune.federated.deployment --timeout -1` started the federation, then ended in a traceback
    (subprocess.TimeoutExpired); so did any run longer than --timeout."""
    from slimtune.federated import deployment

    started = []
    monkeypatch.setattr(deployment, "run", lambda *a, **k: started.append(a))
    for bad in ("-1", "0", "nan"):
        monkeypatch.setattr("sys.argv", ["deployment", "--timeout", bad, "--out", str(tmp_path / "d")])
        with pytest.raises(SystemExit) as exit_:
            deployment.main()
        assert exit_.value.code == 2
        assert "--timeout" in capsys.readouterr().err
    assert not started

    def late(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], kwargs.get("timeout"))

    monkeypatch.setattr(deployment.subprocess, "run", late)
    federation = object.__new__(deployment.LocalFederation)
    federation.env, federation.work, federation.logs = {}, tmp_path, tmp_path
    with pytest.raises(SlimtuneError, match="--timeout 5"):
        federation.submit(5.0)


# -- what the terminal shows ----------------------------------------------------------------------------------------
def test_an_error_is_printed_as_written():
    """rich turned ':x:' in a message into an emoji: `--device cuda:x` was reported as 'cuda❌'."""
    res = cli("generate", *TINY, "--prompt", "hi", "--device", "cuda:x")
    assert res.exit_code == 2
    assert "cuda:x" in res.stderr


def test_a_warning_is_one_line_without_source_code(tmp_path):
    """Python's warnings printed the file, the line and the source line of slimtune's code beside the error (run in
    a process of its own: pytest records warnings instead of printing them)."""
    import sys
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    res = subprocess.run([sys.executable, "-m", "slimtune.cli", "generate", *TINY, "--input", str(path),
                          "--max-new-tokens", "1"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny models have no chat template
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("warning:") for line in lines), lines
    assert "render_chat" not in res.stderr and ".py:" not in res.stderr


# -- config files ---------------------------------------------------------------------------------------------------
def test_a_toml_config_file_is_read(tmp_path):
    """A TOML file was parsed as YAML: 'expected a mapping of settings at the top level' for a valid file."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = "{DEV}"\nbatch_size = 8\nmodel = "tiny-llama"\n')
    res = cli("eval", "--config", cfg)
    assert res.exit_code == 0, res.output
    cfg.write_text(f'data = "{DEV}"\nbatch_size = "8"\n')
    assert_one_line(cli("eval", "--config", cfg), "setting 'batch_size': expected an integer")
    cfg.write_text('data = "x\n')
    assert_one_line(cli("eval", "--config", cfg), "not valid TOML")


# -- plan -----------------------------------------------------------------------------------------------------------
def test_the_planner_counts_the_adapters_own_weights():
    """`plan --r 100000000000` said MeZO + LoRA with 22 trillion trainable values fits in 548 MB (the adapter's
    weights were not counted), and `train` let such a run start."""
    from slimtune.models.loading import tiny_model
    from slimtune.report.memory_model import predict_run_mb

    model = tiny_model("tiny-llama", 100, 0, 1)
    small, n_small = predict_run_mb(model, "mezo", "lora", 8, 4, 32, "cpu")
    big, n_big = predict_run_mb(model, "mezo", "lora", 10**9, 4, 32, "cpu")
    assert big - small >= (n_big - n_small) * 4 / 2**20 * 0.99


# -- the Python API -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda slimtune: slimtune.apply_peft("tiny-llama", "lora"),
    lambda slimtune: slimtune.apply_peft(None),
    lambda slimtune: slimtune.MeZO("tiny-llama"),
    lambda slimtune: slimtune.DPZero(None, epsilon=2, dataset_size=10, batch_size=2),
])
def test_a_model_that_is_not_a_module_is_named(call):
    """A model name or None where a model goes: AttributeError from deep inside ('str' has no 'named_modules')."""
    import slimtune
    with pytest.raises(SlimtuneError, match="model"):
        call(slimtune)


def test_train_takes_paths_and_refuses_a_mapping_as_config(tmp_path):
    """slimtune.train(data=Path(...)) was refused ('expected a string, got PosixPath'); config={...} ended in a
    TypeError from pathlib."""
    import slimtune
    resolved = slimtune.train(data=Path(TRAIN), model="tiny-llama", out=tmp_path / "run", dry_run=True)
    assert resolved["train_data"] == TRAIN and resolved["out_dir"] == str(tmp_path / "run")
    with pytest.raises(SlimtuneError, match="config"):
        slimtune.train({"data": TRAIN})


def test_load_model_takes_dtype_names_and_checks_the_device():
    """load_model_and_tokenizer(dtype="bf16") failed inside torch's .to(); device="gpu" with torch's list of 20
    device types."""
    from slimtune.models import load_model_and_tokenizer
    model, _ = load_model_and_tokenizer("tiny-llama", dtype="bf16", texts=["a b"])
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(SlimtuneError, match="device 'gpu'"):
        load_model_and_tokenizer("tiny-llama", device="gpu", texts=["a b"])


# -- adapters -------------------------------------------------------------------------------------------------------
def test_a_run_directory_given_as_adapter_names_its_adapter(run_dir):
    """`--adapter RUN` (not RUN/adapter) read the run's config.json as a model: 'could not load a causal LM
    checkpoint: Unrecognized model in run. Should have a model_type key'."""
    res = cli("generate", *TINY, "--prompt", "hi", "--adapter", run_dir / "run")
    assert_one_line(res, f"{run_dir / 'run' / 'adapter'}")


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_model_with_a_merged_checkpoint_is_not_ignored(run_dir, tmp_path, command):
    """A merged checkpoint is the whole model: `--model` was silently ignored (any base name 'worked')."""
    merged = run_dir / "merged"
    if command == "generate":
        res = cli("generate", "--model", "tiny-gpt2", "--prompt", "hi", "--adapter", merged)
    else:
        res = cli("merge", merged, "--model", "tiny-gpt2", "--out", tmp_path / "again")
    assert_one_line(res, "--model")
    res = cli("generate", "--prompt", "hi", "--max-new-tokens", "1", "--adapter", merged)  # --model left out: fine
    assert res.exit_code == 0, res.output


# -- outputs: written whole or not at all, nothing of the user's touched --------------------------------------------
def test_outputs_never_touch_a_users_file_beside_them_and_leave_nothing_when_interrupted(run_dir, tmp_path,
                                                                                          monkeypatch):
    """The temporary names were fixed: `--output o.jsonl` overwrote the user's o.jsonl.tmp, `merge --out m` deleted
    a directory m.tmp-merge, `export --out x.gguf` deleted x.gguf.partial; and a Ctrl-C while saving left the
    half-written temporary behind."""
    from slimtune.commands.evaluate import write_jsonl
    from slimtune.commands.export import save_checkpoint_dir
    from slimtune.models import load_model_and_tokenizer

    mine = tmp_path / "o.jsonl.tmp"
    mine.write_text("mine")
    write_jsonl(str(tmp_path / "o.jsonl"), [{"a": 1}], "--output")
    assert mine.read_text() == "mine" and (tmp_path / "o.jsonl").read_text() == '{"a": 1}\n'

    theirs = tmp_path / "m.tmp-merge"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    model, tok = load_model_and_tokenizer(str(run_dir / "merged"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tok, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_dir(model, tok, str(tmp_path / "m"))
    assert (theirs / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tmp-merge", "o.jsonl", "o.jsonl.tmp"]
    monkeypatch.undo()

    from slimtune.export.gguf import export_gguf
    partial = tmp_path / "x.gguf.partial"
    partial.write_text("mine")
    with pytest.raises(SlimtuneError):  # a tiny model's word-level tokenizer: llama.cpp's converter refuses it
        export_gguf(model, tok, tmp_path / "x.gguf", "f32", verify=False)
    assert partial.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tmp-merge", "o.jsonl", "o.jsonl.tmp", "x.gguf.partial"]

"""Review of --robust trust's --root-data checks and of the per-model defaults (third review round).

Each test failed on the code before its fix."""

import json
from pathlib import Path

import pytest

from test_federated import make_cfg
from slimtune import SlimtuneError
from slimtune.federated.config import check_inputs


def write_rows(path, header, rows):
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def demo_rows(path):
    return open(path).read().splitlines()[1:]


@pytest.mark.parametrize("reword", [str.upper, lambda row: "  " + row.replace(" ", "   ").replace("\t", " \t")],
                         ids=["case", "spacing"])
def test_root_rows_that_differ_from_the_clients_only_in_case_or_spacing_are_refused(demo_paths, tmp_path, reword):
    """The root-data overlap check compared exact strings: the clients' rows upper-cased or re-spaced passed it, and
    the server trained without noise on the clients' sentences."""
    root = write_rows(tmp_path / "root.tsv", "sentence\tlabel", [reword(r) for r in demo_rows(demo_paths[0])[:3]])
    with pytest.raises(SlimtuneError, match="3 of its rows also appear in --data"):
        check_inputs(make_cfg(demo_paths, robust="trust", root_data=root))


def chat_rows(path, tag, n=6):
    rows = [{"messages": [{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": f"{tag} question {i}"},
                          {"role": "assistant", "content": f"{tag} answer {i}"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_generation_root_data_sharing_only_a_system_prompt_with_the_clients_is_accepted(tmp_path):
    """The check intersected every string of every row: chat root data whose only common text with the clients'
    data is the system prompt was refused as '1 of its rows also appear in --data' (no row was shared). A row
    that is a client's row is still refused."""
    data, dev = chat_rows(tmp_path / "data.jsonl", "client"), chat_rows(tmp_path / "dev.jsonl", "dev")
    root = chat_rows(tmp_path / "root.jsonl", "server")
    check_inputs(make_cfg((data, dev), task="generation", robust="trust", root_data=root))
    with open(root, "a") as f:
        f.write(open(data).read().splitlines()[2] + "\n")
    with pytest.raises(SlimtuneError, match="1 of its rows also appear in --data"):
        check_inputs(make_cfg((data, dev), task="generation", robust="trust", root_data=root))


def test_eval_data_saved_with_save_to_disk_is_checked_on_the_split_the_server_evaluates(demo_paths, tmp_path):
    """check_inputs read --eval-data hf:DIR's *train* split while the server evaluates on its validation split: an
    evaluation set holding only a validation split was refused before any work ('no split train'), and root rows
    shared with the validation split were not seen."""
    import datasets
    header, *rows = open(demo_paths[1]).read().splitlines()
    cols = [dict(zip(header.split("\t"), r.split("\t"))) for r in rows]
    columns = {"sentence": [c["sentence"] for c in cols], "label": [int(c["label"]) for c in cols]}
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(columns)}).save_to_disk(str(tmp_path / "dev"))
    paths = (demo_paths[0], f"hf:{tmp_path / 'dev'}")
    check_inputs(make_cfg(paths))
    root = write_rows(tmp_path / "root.tsv", header, rows[:2])
    with pytest.raises(SlimtuneError, match="2 of its rows also appear in --eval-data"):
        check_inputs(make_cfg(paths, robust="trust", root_data=root))


def write_gguf(directory, architecture, hidden, layers):
    import gguf
    directory.mkdir()
    writer = gguf.GGUFWriter(str(directory / "model.gguf"), architecture)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(directory)


def test_a_gguf_checkpoint_directory_gets_its_architectures_defaults(tmp_path):
    """--model DIR holding a .gguf and no config.json (load_local reads it): builtin_architecture read only
    config.json, so a Gemma 3 270M GGUF ran MeZO at SmolLM2's lr 1e-3, the one that diverged on Gemma."""
    from slimtune.models.loading import builtin_architecture
    from slimtune.optim.defaults import defaults_for
    gemma = write_gguf(tmp_path / "gemma-gguf", "gemma3", 640, 18)
    assert builtin_architecture(gemma) == "gemma3-270m"
    assert defaults_for("mezo", "lora", builtin_architecture(gemma)).lr == 3e-4
    assert builtin_architecture(write_gguf(tmp_path / "smol-gguf", "llama", 576, 30)) == "smollm2"
    assert builtin_architecture(write_gguf(tmp_path / "other-gguf", "llama", 512, 30)) is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.gguf").write_bytes(b"not a gguf file")
    assert builtin_architecture(str(tmp_path / "broken")) is None  # load_local reports it, with its file


@pytest.mark.parametrize("flag", ["data", "eval_data", "root_data"])
def test_an_empty_generation_file_is_refused_in_one_line(tmp_path, flag):
    """check_inputs looked at the first row of a generation file before anything checked there was one: an empty
    .jsonl stopped `slimtune federate` with 'internal error (IndexError)' and exit code 1."""
    data, dev = chat_rows(tmp_path / "data.jsonl", "client"), chat_rows(tmp_path / "dev.jsonl", "dev")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    settings = dict(data=data, eval_data=dev, root_data=chat_rows(tmp_path / "root.jsonl", "server"))
    settings[flag] = str(empty)
    with pytest.raises(SlimtuneError, match="no examples"):
        check_inputs(make_cfg((settings["data"], settings["eval_data"]), task="generation", robust="trust",
                              root_data=settings["root_data"]))


def test_a_private_runs_eval_rows_equal_to_training_rows_up_to_case_and_spacing_are_refused(tmp_path, demo_paths):
    """The training path's --eval-data overlap check compared exact text: an upper-cased or re-spaced copy of a
    training row let a private run evaluate (and pick its best model) on training rows without noise."""
    from typer.testing import CliRunner

    from slimtune.cli import app
    rows = Path(demo_paths[0]).read_text().splitlines()
    sentence, label = rows[1].split("\t")
    held_out = tmp_path / "dev.tsv"
    held_out.write_text(f"sentence\tlabel\n{'  '.join(sentence.upper().split())}\t{label}\n")
    res = CliRunner().invoke(app, ["train", "--data", demo_paths[0], "--eval-data", str(held_out), "--model",
                                   "tiny-llama", "--optimizer", "dpzero", "--epsilon", "6", "--steps", "2",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "shares rows with the training data" in res.output, res.output
    assert not (tmp_path / "run").exists()


def test_one_saved_dataset_can_hold_the_root_rows_and_the_evaluation_split(demo_paths, tmp_path):
    """--root-data hf:DIR and --eval-data hf:DIR (its train split is the server's root data, its validation split
    the evaluation set) was refused as '--root-data ... is --eval-data' although they are different rows; rows the
    two splits share are still refused."""
    import datasets
    header, *rows = open(demo_paths[1]).read().splitlines()
    cols = [dict(zip(header.split("\t"), r.split("\t"))) for r in rows]
    half = len(cols) // 2

    def split(part):
        return datasets.Dataset.from_dict({"sentence": [c["sentence"] for c in part],
                                           "label": [int(c["label"]) for c in part]})
    datasets.DatasetDict({"train": split(cols[:half]), "validation": split(cols[half:])}).save_to_disk(
        str(tmp_path / "server"))
    server = f"hf:{tmp_path / 'server'}"
    check_inputs(make_cfg((demo_paths[0], server), robust="trust", root_data=server).resolved())
    make_cfg((demo_paths[0], server), robust="trust", root_data=server).validate()
    datasets.DatasetDict({"train": split(cols[:half]), "validation": split(cols[:half])}).save_to_disk(
        str(tmp_path / "shared"))
    shared = f"hf:{tmp_path / 'shared'}"
    with pytest.raises(SlimtuneError, match="also appear in --eval-data"):
        check_inputs(make_cfg((demo_paths[0], shared), robust="trust", root_data=shared))

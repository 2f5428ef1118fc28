"""Review 37: a careless user's data files, through the CLI (train/eval/generate --data/--input).

Each test is one finding: a file a user (or the project's own ../shared/data) really has, read silently wrong or
refused too late (after the model loaded) or with a message that names what is not in the file. The model loader is
replaced by one that raises 'LOADED A MODEL' where the error must come before any work.
"""

from __future__ import annotations

import csv
import json

import pytest

from slimtune.data import get_task, read_examples
from test_bad_input_table import assert_one_line, cli  # the CLI runner and the one-line error check
from test_review_findings_17 import refuse_model_loading

TINY = ["--model", "tiny-llama"]


# -- TSV read unquoted: RTE's quoted sentences keep their quotes -----------------------------------------------------
def test_rte_sentences_quoted_in_a_tsv_are_read_without_the_quotes(tmp_path):
    """_read_delimited reads TSV with csv.QUOTE_NONE. A TSV written by Python's csv module or pandas (`to_csv(sep=
    '\\t')`) quotes a field holding a quote: `"Valero said it found ""extensive"" damage."`. slimtune's prompt then
    starts with a quote and holds every quote doubled, without a word. ../shared/data/rte is such a file: 454 of its
    2,490 training examples and 48 of its 277 dev examples are read this way (see the next test)."""
    path = tmp_path / "rte.tsv"
    sentence = 'Valero said it found "extensive" damage at its refinery.'
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerows([["sentence1", "sentence2", "label"], [sentence, "Valero owns a refinery.", "0"]])
    [example] = read_examples(str(path), get_task("rte"))
    assert example.prompt.startswith(sentence + "\n"), example.prompt


def test_the_shared_rte_files_are_read_as_written(shared_data):
    """The real RTE dev file: its row 'The Amish community ... ""If someone snaps ..."" said Jake King ...' became a
    prompt opening with a quote and holding doubled quotes. Read as the CSV-quoted TSV it is, no prompt does."""
    for split in ("train", "dev"):
        path = shared_data / "rte" / f"{split}.tsv"
        examples = read_examples(str(path), get_task("rte"))
        with path.open(newline="", encoding="utf-8") as f:  # what Python's csv module reads: the file as written
            written = [row["sentence1"].strip() for row in csv.DictReader(f, delimiter="\t")]
        assert len(written) == len(examples)
        quoted = [e.source for e, first in zip(examples, written) if not e.prompt.startswith(first + "\n")]
        assert not quoted, f"{len(quoted)} of {len(examples)} RTE {split} prompts keep CSV quoting, e.g. {quoted[:2]}"


# -- CSV read leniently: a stray quote merges rows ------------------------------------------------------------------
@pytest.mark.parametrize("text,line", [
    ('sentence,label\n"it was great,1\nit was "bad",0\nfine,1\n', 3),  # rows 2 and 3 become one row labelled 0
    ('sentence,label\n"Wow" said the critic,1\nbad,0\n', 2),  # read as 'Wow said the critic'
], ids=["two-rows-merged", "quotes-dropped"])
def test_a_stray_quote_in_a_csv_is_a_one_line_error_not_a_merged_row(tmp_path, monkeypatch, text, line):
    """csv.reader without strict=True takes an opening quote that closes on a later line as one field across lines,
    and drops quotes that do not end a field: row 2 ('it was great', 1) and row 3 ('it was "bad"', 0) became the
    single example 'it was great,1\\nit was bad"' labelled 0; '"Wow" said the critic' became 'Wow said the critic'.
    Training went on (here: up to the model load) on rows the file does not hold."""
    refuse_model_loading(monkeypatch)
    data = tmp_path / "reviews.csv"
    data.write_text(text, encoding="utf-8")
    res = cli("train", "--data", data, *TINY, "--steps", "1", "--out", tmp_path / "out")
    assert_one_line(res, f"{data}:{line}")
    assert not (tmp_path / "out").exists()


# -- generation rows are checked after the model loads --------------------------------------------------------------
@pytest.mark.parametrize("name,text,needle", [
    ("pairs.tsv", "input\ttarget\nhello\tworld\nfoo\t\n", ":3: field 'target' is empty"),
    ("pairs.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 5}\n',
     ":2: field 'completion' is not text"),
    ("mixed.jsonl", '{"prompt": "a", "completion": "b"}\n{"input": "c", "target": "d"}\n',
     ":2: field 'prompt' is missing"),
])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_generation_rows_are_checked_before_the_model_loads(tmp_path, monkeypatch, command, name, text, needle):
    """GenerationObjective.load only reads the rows (chat rows are checked there); a table's or a prompt/completion
    file's rows are checked by rows_to_examples, which runs after load_model_and_tokenizer: an empty target on line
    3 of a 100k-row file is found after a 7B model has loaded. Classification rows are checked before."""
    refuse_model_loading(monkeypatch)
    data = tmp_path / name
    data.write_text(text, encoding="utf-8")
    args = ["--steps", "1", "--out", tmp_path / "out"] if command == "train" else []
    res = cli(command, "--task", "generation", "--data", data, *TINY, *args)
    assert_one_line(res, f"{data}{needle}")
    assert not (tmp_path / "out").exists()


# -- a prompt file's line breaks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("brk", ["\x0c", "\u2028", "\x85", "\x1e"], ids=["form-feed", "U+2028", "NEL", "RS"])
def test_a_prompt_file_holds_one_prompt_a_line(tmp_path, brk):
    """generate --input prompts.txt splits the file with str.splitlines, which also breaks at a form feed, U+2028,
    U+0085 (NEL: a cp1252 '...' decoded as Latin-1) and the separators \\x1c-\\x1e: a two-line file gave three prompts,
    and the completions no longer lined up with the user's lines."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"first prompt{brk}still the first\nsecond prompt\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    res = cli("generate", "--input", prompts, *TINY, "--max-new-tokens", "1", "--output", out)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == [f"first prompt{brk}still the first", "second prompt"]


# -- messages that name what is not in the file --------------------------------------------------------------------
@pytest.mark.parametrize("name,text,needle", [
    ("short.tsv", "sentence\tlabel\ngood film\nbad film\t0\n", ":2: field 'label' is missing"),
    ("null.jsonl", '{"sentence": "good film", "label": null}\n', ":1: field 'label' is missing"),
], ids=["tsv-row-without-its-label", "jsonl-null-label"])
def test_a_missing_label_is_named_missing_not_the_label_None(tmp_path, monkeypatch, name, text, needle):
    """Task.label_index takes str(raw): a TSV row that lost its tab (csv fills the label with None) and a JSONL label
    null were 'field 'label': unknown label 'None' (expected one of '0', '1')'; the file holds no 'None'."""
    refuse_model_loading(monkeypatch)
    data = tmp_path / name
    data.write_text(text, encoding="utf-8")
    res = cli("train", "--data", data, *TINY, "--steps", "1", "--out", tmp_path / "out")
    assert_one_line(res, f"{data}{needle}")
    assert "None" not in res.stderr


def test_a_blank_first_line_is_named_not_a_header_of_no_columns(tmp_path, monkeypatch):
    """A table pasted with an empty first line: DictReader takes the blank line as a header of 0 columns, and the
    error is ':2: 2 fields, the header has 0 (a stray tab in the text?)'."""
    refuse_model_loading(monkeypatch)
    data = tmp_path / "pasted.tsv"
    data.write_text("\nsentence\tlabel\ngood film\t1\n", encoding="utf-8")
    res = cli("train", "--data", data, *TINY, "--steps", "1", "--out", tmp_path / "out")
    assert_one_line(res, f"{data}:1: the header line is empty")


def test_a_nul_byte_in_a_table_is_refused_as_the_reader_says(tmp_path, monkeypatch):
    """readers._read_delimited's comment counts 'a NUL byte' among csv.Error's; since Python 3.11 csv reads NUL as a
    character, and 'go\\x00od film' became a prompt (a NUL marks a damaged or UTF-16-without-BOM file)."""
    refuse_model_loading(monkeypatch)
    data = tmp_path / "damaged.tsv"
    data.write_bytes(b"sentence\tlabel\ngo\x00od film\t1\nbad film\t0\n")
    res = cli("train", "--data", data, *TINY, "--steps", "1", "--out", tmp_path / "out")
    assert_one_line(res, f"{data}:2:")

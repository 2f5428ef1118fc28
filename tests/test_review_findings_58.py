"""Review 58: data input, as a careless user: JSON arrays, saved HF datasets (empty, DatasetDicts, ClassLabel),
one-class label columns, --k-shot on too few rows, private runs' data errors. Each test fails on the code it was
written against."""

import json
import re
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimtune import SlimtuneError
from slimtune.cli import app
from slimtune.data import get_task, read_examples

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
ROWS = [("a lovely film", 1), ("a bad film", 0), ("great fun", 1), ("dull and slow", 0)]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def train(tmp_path, data, *extra):
    return cli("train", "--model", "tiny-llama", "--data", data, "--steps", 1, "--batch-size", 2, "--eval-every", 0,
               "--out", tmp_path / "run", "--quiet", *extra)


def train_saying(tmp_path, data, *extra):
    """train's result and what it said: its error / warning lines and every warning raised (the CLI prints those
    as 'warning: ...'; under pytest they are caught here)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = train(tmp_path, data, *extra)
    said = [line for line in r.output.splitlines() if line.startswith(("warning", "error"))]
    return r, said + [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]


def jsonl(path, labels, texts=None):
    texts = texts or [s for s, _ in ROWS]
    path.write_text("".join(json.dumps({"sentence": s, "label": lab}) + "\n" for s, lab in zip(texts, labels)))
    return path


def one_line_exit_2(r):
    assert r.exit_code == 2, (r.exit_code, r.output[-600:])
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output[-600:]


# --- saved HF datasets ------------------------------------------------------------------------------------------------

def test_an_empty_saved_dataset_is_a_one_line_error(tmp_path):
    """`Dataset.from_dict({...: []}).save_to_disk(DIR)` (a filter that kept nothing) writes zero shards, and
    datasets.load_from_disk raises IndexError on it: `train --data hf:DIR` ends in 'internal error (IndexError: list
    index out of range); please report it', exit 1, instead of 'hf:DIR: no examples'."""
    import datasets
    datasets.Dataset.from_dict({"sentence": [], "label": []}).save_to_disk(str(tmp_path / "empty"))
    r = train(tmp_path, f"hf:{tmp_path / 'empty'}")
    one_line_exit_2(r)
    assert "hf:" in r.output and "no examples" in r.output, r.output[-400:]


def test_an_empty_validation_split_does_not_stop_reading_the_train_split(tmp_path):
    """A DatasetDict whose validation split is empty: `--data hf:DIR` reads only its train split (4 rows), yet
    load_from_disk loads every split and the empty one raises IndexError (an internal error, exit 1)."""
    import datasets
    rows = {"sentence": [s for s, _ in ROWS], "label": [lab for _, lab in ROWS]}
    datasets.DatasetDict(train=datasets.Dataset.from_dict(rows),
                         validation=datasets.Dataset.from_dict({"sentence": [], "label": []})
                         ).save_to_disk(str(tmp_path / "dd"))
    assert [e.label for e in read_examples(f"hf:{tmp_path / 'dd'}", get_task("sst2"), "train")] == [1, 0, 1, 0]


def test_eval_says_which_split_of_a_datasetdict_it_scored(tmp_path):
    """`slimtune eval --data hf:DIR` on a DatasetDict with train/validation/test scores the validation split (the
    docs name only train's --data -> train and --eval-data -> validation); nothing in the output or the docs says so,
    and a user who meant the test split reads a validation score as a test score."""
    import datasets
    rows = {"sentence": [s for s, _ in ROWS], "label": [lab for _, lab in ROWS]}
    datasets.DatasetDict(train=datasets.Dataset.from_dict(rows), validation=datasets.Dataset.from_dict(rows),
                         test=datasets.Dataset.from_dict(rows)).save_to_disk(str(tmp_path / "dd"))
    r = cli("eval", "--model", "tiny-llama", "--data", f"hf:{tmp_path / 'dd'}")
    assert r.exit_code == 0, r.output[-400:]
    docs = (ROOT / "docs" / "how-to" / "classification.md").read_text()
    documented = any("validation" in part and "eval" in part for part in re.split(r"\n\s*\n|\n- ", docs)
                     if "--eval-data" not in part)
    assert "validation" in r.output or documented, r.output[-400:]


def test_a_classlabel_in_another_order_is_not_silently_flipped(tmp_path):
    """A dataset whose label is ClassLabel(names=['positive', 'negative']) stores 'positive' as 0; sst2 reads the
    integer and trains label 0 as ' negative'. The file says in its own features what each integer means (and sst2
    knows those names), so every label is silently flipped."""
    import datasets
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["positive", "negative"])})
    ds = datasets.Dataset.from_dict({"sentence": [s for s, _ in ROWS],
                                     "label": ["positive" if lab else "negative" for _, lab in ROWS]},
                                    features=datasets.Features({"sentence": datasets.Value("string"),
                                                                "label": datasets.Value("string")}))
    ds.cast(features).save_to_disk(str(tmp_path / "ds"))
    try:
        labels = [e.label for e in read_examples(f"hf:{tmp_path / 'ds'}", get_task("sst2"))]
    except SlimtuneError as exc:  # refusing ("ClassLabel names ... do not match the task's") is as good
        assert "label" in str(exc)
    else:
        assert labels == [lab for _, lab in ROWS], labels


# --- JSON files -------------------------------------------------------------------------------------------------------

def test_a_json_array_file_is_not_called_invalid_json(tmp_path):
    """`.json` is accepted (read as JSON Lines); a pretty-printed JSON array, what `json.dump(rows, f, indent=2)` and
    pandas' `to_json(orient='records', indent=2)` write, is refused as 'array.json:1: not valid JSON (Expecting
    value)': the file is valid JSON, and nothing says that one object per line is wanted."""
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"sentence": s, "label": lab} for s, lab in ROWS], indent=2))
    try:
        examples = read_examples(str(path), get_task("sst2"))
    except SlimtuneError as exc:
        assert "not valid JSON" not in str(exc) and "per line" in str(exc), str(exc)
    else:
        assert [e.label for e in examples] == [1, 0, 1, 0]


def test_a_jsonl_rows_missing_field_on_line_1_names_the_line(tmp_path):
    """JSONL rows each carry their own fields. Row 1 lacks 'sentence' (it has 'text'); rows 2-4 have it. The message
    is the file's: 'rows.jsonl: missing column(s) 'sentence' (found 'label', 'text')', naming no line, as if no row
    had it (row 3 lacking it is 'rows.jsonl:3: field 'sentence' is missing')."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "odd one", "label": 1}) + "\n"
                    + "".join(json.dumps({"sentence": s, "label": lab}) + "\n" for s, lab in ROWS))
    with pytest.raises(SlimtuneError) as exc:
        read_examples(str(path), get_task("sst2"))
    assert f"{path}:1:" in str(exc.value), str(exc.value)


def test_a_header_only_table_is_not_called_an_empty_file(tmp_path):
    """A CSV holding its header line and no row is 'hdr.csv: no examples (file is empty)': the user opens it and sees
    a line in it."""
    path = tmp_path / "hdr.csv"
    path.write_text("sentence,label\n")
    with pytest.raises(SlimtuneError) as exc:
        read_examples(str(path), get_task("sst2"))
    assert "file is empty" not in str(exc.value) and "header" in str(exc.value), str(exc.value)


def test_the_label_spellings_accepted_besides_the_values_are_documented():
    """sst2 maps 'positive'/'negative' (any case: 'POSITIVE', 'Negative') and rte 'entailment'/'not_entailment' to
    0/1 (Task.aliases); docs/how-to/classification.md's Data section names only the values 0/1, so a string label
    column is reinterpreted without the docs saying so."""
    docs = (ROOT / "docs" / "how-to" / "classification.md").read_text()
    data = docs.split("## Data", 1)[1].split("\n## ", 1)[0]
    assert "'positive'" in data or "`positive`" in data, data


# --- one class, --k-shot ----------------------------------------------------------------------------------------------

def test_training_data_with_a_single_class_is_not_silent(tmp_path):
    """Every row labelled 1 (a filter gone wrong): train runs without a word, and the adapter learns to say
    ' positive'. Expected: a warning (or an error) naming the label column and the missing class."""
    r, said = train_saying(tmp_path, jsonl(tmp_path / "one.jsonl", [1, 1, 1, 1]))
    assert r.exit_code in (0, 2), r.output[-600:]
    assert any("label" in line or "class" in line for line in said), said


def test_k_shot_with_fewer_rows_of_a_class_than_k_is_not_silent(tmp_path):
    """`--k-shot K` "samples K examples per class"; a class with fewer rows gives all it has (data/sampling.k_shot:
    min(k, len(pool))), without a word: --k-shot 5 on 2 rows per class trains on 4 rows, recorded as k_shot 5."""
    r, said = train_saying(tmp_path, jsonl(tmp_path / "rows.jsonl", [1, 0, 1, 0]), "--k-shot", 5)
    assert any("--k-shot" in line for line in said), (r.exit_code, said)


def test_federated_root_data_with_a_single_label_is_refused(tmp_path):
    """docs/how-to/federated.md: the root data is '~100 rows of the task with both labels' (the trust reference must
    carry the task's direction, not one label's pull, or it down-weights every honest client of the other label).
    Root data of one label is accepted."""
    from test_federated import make_cfg
    from slimtune.federated.config import check_inputs
    demo = ROOT / "slimtune" / "data" / "demo"
    root = tmp_path / "root.tsv"
    root.write_text("sentence\tlabel\n" + "".join(f"my own positive review number {i}\t1\n" for i in range(20)))
    with pytest.raises(SlimtuneError, match="--root-data"):
        check_inputs(make_cfg((str(demo / "sst2_demo_train.tsv"), str(demo / "sst2_demo_dev.tsv")),
                              robust="trust", root_data=str(root)))


# --- private runs: data errors quote rows -----------------------------------------------------------------------------

def test_a_private_runs_unknown_label_error_does_not_quote_the_row(tmp_path):
    """`train --optimizer dp-adamw` on a table whose line 3 holds a name in its label column prints
    "secret.tsv:3: field 'label': unknown label 'John Smith 4111-1111'": the row's content, in a private run's error
    (terminal, CI log). The line and field suffice."""
    path = tmp_path / "secret.tsv"
    path.write_text("sentence\tlabel\na lovely film\t1\na bad film\tJohn Smith 4111-1111\n")
    r = train(tmp_path, path, "--optimizer", "dp-adamw")
    one_line_exit_2(r)
    assert "secret.tsv:3" in r.output and "John Smith" not in r.output, r.output[-400:]


def test_a_private_runs_missing_column_error_does_not_quote_a_headerless_first_row(tmp_path):
    """A table saved without its header: its first row is read as the header, and the missing-column message lists
    it ("found '1', 'my diagnosis is cancer'"), in a private run."""
    path = tmp_path / "noheader.tsv"
    path.write_text("my diagnosis is cancer\t1\na bad film\t0\n")
    r = train(tmp_path, path, "--optimizer", "dp-adamw")
    one_line_exit_2(r)
    assert "missing column" in r.output and "diagnosis" not in r.output, r.output[-400:]


def test_a_classlabel_of_names_the_task_does_not_know_keeps_its_integers(tmp_path):
    """Reading a ClassLabel by name is for names the task accepts; one of other names ('bad' / 'good') keeps its
    integers as before, rather than failing with an unknown label."""
    import datasets
    from slimtune.data import get_task, read_examples
    rows = {"sentence": [s for s, _ in ROWS], "label": [int(lab) for _, lab in ROWS]}
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["bad", "good"])})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "d"))
    examples = read_examples(f"hf:{tmp_path / 'd'}", get_task("sst2"))
    assert [e.label for e in examples] == [int(lab) for _, lab in ROWS]

"""Readers and tasks: formats, columns, labels, errors naming file/line/field, the real GLUE files."""

import json

import pytest

from slimtune import SlimtuneError
from slimtune.data import get_task, read_examples


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_tsv_csv_jsonl_give_the_same_examples(tmp_path):
    task = get_task("sst2")
    tsv = write(tmp_path, "a.tsv", "sentence\tlabel\ngood film\t1\nbad film\t0\n")
    csv = write(tmp_path, "a.csv", 'sentence,label\n"good film",1\n"bad film",0\n')
    jsonl = write(tmp_path, "a.jsonl", '{"sentence": "good film", "label": 1}\n\n{"sentence": "bad film", "label": 0}\n')
    got = [[(e.prompt, e.label) for e in read_examples(p, task)] for p in (tsv, csv, jsonl)]
    assert got[0] == got[1] == got[2] == [("Review: good film\nSentiment:", 1),
                                        ("Review: bad film\nSentiment:", 0)]


def test_hf_dataset_from_disk(tmp_path):
    import datasets
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"sentence": ["nice", "awful"], "label": [1, 0]})})
    ds.save_to_disk(str(tmp_path / "ds"))
    ex = read_examples(f"hf:{tmp_path / 'ds'}", get_task("sst2"), "train")
    assert [(e.prompt, e.label) for e in ex] == [("Review: nice\nSentiment:", 1),
                                                    ("Review: awful\nSentiment:", 0)]


@pytest.mark.parametrize("content,name,pattern", [
    ("text\tlabel\nx\t1\n", "a.tsv", r"a\.tsv: missing column\(s\) 'sentence'"),
    ("sentence\tlabel\ngood\t1\nbad\tmaybe\n", "b.tsv", r"b\.tsv:3: field 'label': unknown label 'maybe'"),
    ("", "c.tsv", r"c\.tsv: file is empty"),
    ("sentence\tlabel\n", "d.tsv", r"d\.tsv: only a header line, no rows"),
    ('{"sentence": "x", "label": 1}\n{oops\n', "e.jsonl", r"e\.jsonl:2: not valid JSON"),
    ("sentence\tlabel\n\t1\n", "f.tsv", r"f\.tsv:2: field 'sentence' is empty"),
])
def test_bad_input_names_file_line_and_field(tmp_path, content, name, pattern):
    with pytest.raises(SlimtuneError, match=pattern):
        read_examples(write(tmp_path, name, content), get_task("sst2"))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(SlimtuneError, match="file not found"):
        read_examples(str(tmp_path / "nope.tsv"), get_task("sst2"))
    with pytest.raises(SlimtuneError, match="unsupported file type"):
        read_examples(write(tmp_path, "x.parquet", "x"), get_task("sst2"))


def test_custom_task_and_renamed_columns(tmp_path):
    p = write(tmp_path, "c.jsonl", json.dumps({"review": "loved it", "stars": "pos"}) + "\n")
    task = get_task("custom", label_column="stars", template="Review: {review} Sentiment:", label_words="neg=bad,pos=good")
    [e] = read_examples(p, task)
    assert (e.prompt, e.label, task.label_words) == ("Review: loved it Sentiment:", 1, (" bad", " good"))
    renamed = get_task("sst2", text_column="review", label_column="stars")
    with pytest.raises(SlimtuneError, match="unknown label 'pos'"):
        read_examples(p, renamed)


def test_real_glue_files(shared_data):
    sst2 = read_examples(str(shared_data / "sst2" / "dev.tsv"), get_task("sst2"))
    rte = read_examples(str(shared_data / "rte" / "dev.tsv"), get_task("rte"))
    assert len(sst2) == 872 and {e.label for e in sst2} == {0, 1}
    assert len(rte) == 277 and "Does this mean that" in rte[0].prompt
    assert rte[1].label == 0  # RTE label 0 = entailment -> " Yes"

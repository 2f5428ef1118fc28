"""Review 43: the fixes of reviews 41-42 attacked (block padding, the noise cap and ledger accounting, the split over
the task's labels, CRLF shards read back, the quoted-TSV rule for short raw rows, escapes only from a shell).

1. readers._read_delimited now prefers the quoted reading of a TSV whenever the raw reading has a short row anywhere
   in the file: a raw (GLUE-style) file whose stray quotes pair up across two full raw rows is read quoted again (two
   rows merged into one, a tab and a newline in its text, the first row's label lost) as soon as some other row is
   short (a missing trailing field nothing reads, which review 39 reads again).
2. deployment.shard reads each shard back and refuses one that differs; a table row with fewer fields than the
   header reads as None, is written as "" and reads back as "": a file `slimtune train` accepts (a short row missing
   only an unread field) is refused with "convert the file to .jsonl".
3. The same rule is decided over the whole file, so a pandas TSV the reader accepts (one multi-line row's raw pieces
   are short) has shards it refuses (a node's shard holding only a multi-line row whose raw pieces are full rows):
   the deployment script stops with an error naming a temporary shard file the user never made.
4. A JSONL row holding a lone surrogate (json's "\\ud800") reads fine but shard() writes it with ensure_ascii=False
   into a UTF-8 file: UnicodeEncodeError, a traceback, not one line (older than review 42's change).
5. decode_state checks the broadcast's array shapes but not their dtypes: a hostile server's codes of the right
   length as float32 end in numpy's TypeError (a traceback on a non-private node), not decode_state's one-line
   ValueError naming the entry (older than review 42's change).

Tiny files only; no model is loaded.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtune import SlimtuneError
from slimtune.data.readers import read_rows


def test_a_raw_tsv_with_pairing_stray_quotes_is_not_merged_because_another_row_is_short(tmp_path):
    """Raw TSV (quotes as text): row 2's sentence opens with a quote, row 3's ends with one. Both raw rows are full,
    so the quoted reading (one row 'hello\\t1\\t0\\nworld') is ambiguous, and without row 4 the file is refused. Row 4
    lacks only `idx`, which nothing reads: now the whole file is read quoted, silently merging rows 2 and 3."""
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\tidx\n"hello\t1\t0\nworld"\t0\t1\nfine text\t1\n', encoding="utf-8")
    try:
        rows, _ = read_rows(str(path), "train")
    except SlimtuneError:
        return  # refused as ambiguous, as the same file without the short row is
    sentences = [row["sentence"] for _, row in rows]
    assert not any("\n" in s or "\t" in s for s in sentences), f"two raw rows merged into one: {sentences}"


def test_a_table_with_a_short_row_missing_an_unread_field_is_sharded(tmp_path):
    """Review 39 reads a row missing only fields nothing reads (Excel's short rows); the read-back check of shard()
    compares None (missing) with the "" DictWriter wrote for it and refuses the file."""
    from slimtune.federated.deployment import shard
    source = tmp_path / "train.csv"
    source.write_text("sentence,label,note\ngood movie,1,x\nbad movie,0\nok movie,1,y\nmeh,0,z\n", encoding="utf-8")
    read_rows(str(source), "train")  # the reader takes it
    work = tmp_path / "work"
    work.mkdir()
    try:
        paths = shard(source, 2, work)
    except SlimtuneError as exc:
        pytest.fail(f"a file the reader takes is refused by the deployment script: {exc}")
    back = sorted(row["sentence"] for p in paths for _, row in read_rows(str(p), "train")[0])
    assert back == sorted(["good movie", "bad movie", "ok movie", "meh"])


def test_a_pandas_tsv_the_reader_accepts_has_shards_its_nodes_read(tmp_path):
    """pandas' to_csv(sep='\\t') quotes a field holding a tab or a newline. Row 'p\\nq' breaks into a short raw row,
    so the file is read quoted; row 'x\\ty\\nz' alone breaks into two full raw rows. On the node that holds it without
    'p\\nq', its shard is refused ('quote the file fully (Python's csv, pandas)'), naming node1.tsv in a temporary
    directory. Either the source is refused too, or every shard reads back."""
    from slimtune.federated.deployment import shard
    source = tmp_path / "train.tsv"
    rows = [{"sentence": "x\ty\nz", "label": "1"}, {"sentence": "p\nq", "label": "0"},
            {"sentence": "plain", "label": "1"}, {"sentence": "other", "label": "0"}]
    with source.open("w", newline="", encoding="utf-8") as f:  # as pandas writes it
        writer = csv.DictWriter(f, ["sentence", "label"], delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    try:
        read_rows(str(source), "train")
    except SlimtuneError:
        return  # refused at its source: consistent
    work = tmp_path / "work"
    work.mkdir()
    try:
        shard(source, 2, work)
    except SlimtuneError as exc:
        pytest.fail(f"the reader takes {source.name}, but a shard of it is refused: {exc}")


def test_a_jsonl_row_with_a_lone_surrogate_is_one_line_in_the_deployment_script(tmp_path):
    """json reads "\\ud800" as a lone surrogate; shard() writes rows with ensure_ascii=False to UTF-8."""
    from slimtune.federated.deployment import shard
    source = tmp_path / "train.jsonl"
    source.write_text(json.dumps({"sentence": "good \ud800", "label": 1}) + "\n"
                      + json.dumps({"sentence": "bad", "label": 0}) + "\n", encoding="utf-8")
    try:
        read_rows(str(source), "train")
    except SlimtuneError:
        return  # (lead) refused at its source since review 78 (one line naming file:line): consistent
    work = tmp_path / "work"
    work.mkdir()
    try:
        shard(source, 1, work)
    except SlimtuneError:
        pass  # one line: fine (or the shard is written escaped)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"a traceback, not one line: {type(exc).__name__}: {exc}")


def test_a_broadcast_with_codes_of_the_wrong_dtype_is_one_line(tmp_path):
    """decode_state: 'raises ValueError naming the entry when something is missing or mis-shaped'."""
    from slimtune.federated.wire import decode_state, encode_state
    arrays, _ = encode_state({"w": torch.randn(17)}, 4, 16)
    arrays["w::codes"] = arrays["w::codes"].astype(np.float32)  # right length, wrong dtype
    with pytest.raises(ValueError, match="w"):
        decode_state(arrays, {"w": (17,)}, 4, 16)

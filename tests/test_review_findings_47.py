"""Review 47: the fixes of reviews 45-46 attacked (client-level DP in float64, the TSV rule "two whole raw lines in a
quoted row's span: refuse", short shard rows, LOCAL_WORLD_SIZE, the memory refusal at a rank's share, HiZOO-L's r
updated in place).

1. readers._read_delimited: a raw (GLUE-style) TSV with an optional trailing column whose stray quotes pair over a
   short raw line and a whole one has only one whole raw line in the span, so the two raw rows are silently merged
   into one row whose text holds a tab and a newline (review 45's case, with the short row first and no third line).
2. deployment.shard: whether a multi-line quoted row is judged at all depends on the rest of the file (the raw
   reading must succeed everywhere). A file `slimtune train` reads because another row (a one-line quoted field with
   two tabs) makes the raw reading fail is split so that row lands on another node: the shard's own raw reading then
   succeeds, the spanning row is refused, and the deployment stops ("convert the file to .jsonl").
3. bounds.clip_update (client-level DP): the factor S / ||Delta|| is applied in float32, so about half of the clipped
   updates have a norm above S (by ~5e-8 relative): the sum's sensitivity is then above the S the noise and the
   accountant are calibrated to (tiny, but the bound the accounting assumes does not hold).

Tiny files and tensors only.
"""

from __future__ import annotations

import pytest
import torch

from slimtune import SlimtuneError
from slimtune.data.readers import read_rows
from test_review_findings_45 import raw_rows_stay_apart


def test_a_raw_tsv_whose_stray_quotes_pair_over_a_short_line_and_a_whole_one_is_not_merged(tmp_path):
    """Raw TSV with an optional `idx` column: row 2's sentence opens with a quote and lacks idx (short: the raw
    reading takes it), row 3's sentence ends with a quote. Only line 3 is a whole raw row, so the quoted reading is
    kept: rows 2 and 3 become one row whose sentence holds a tab and a newline."""
    raw_rows_stay_apart(tmp_path / "train.tsv", 'sentence\tlabel\tidx\n"hello\t1\nworld"\t0\t2\nplain\t1\t3\n')


def test_a_tsv_read_quoted_because_of_another_row_is_sharded(tmp_path):
    """Row 2 is quoted over two lines with a tab inside (its raw lines are two whole rows); row 3 is a one-line quoted
    field with two tabs, which makes the raw reading fail, so the reader takes the file as quoted and never judges
    row 2. With two nodes the rows go to different shards; node 0's shard (row 2 alone) reads raw, row 2 is refused,
    and the deployment stops on a file `slimtune train` reads."""
    from slimtune.federated.deployment import shard
    source = tmp_path / "train.tsv"
    source.write_text('sentence\tlabel\n"x\ty\nz"\t1\n"p\tq\tr"\t0\n', encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    try:  # now: a quoted field with a tab over two lines is refused on its own, whatever the other rows are
        read_rows(str(source), "train")
    except SlimtuneError as exc:
        assert f"{source}:2:" in str(exc) and "\n" not in str(exc)
        with pytest.raises(SlimtuneError):
            shard(source, 2, work)  # and the deployment refuses what train refuses, before any node starts
        return
    shard(source, 2, work)


def test_a_clipped_client_update_is_within_the_clip_the_accountant_assumes():
    """Client-level DP: every update the noised sum adds is clipped to --client-dp-clip S (the sensitivity the noise
    std sigma S / K and the accountant assume). Scaled in float32, the clipped norm lands above S about half the
    time."""
    from slimtune.federated.bounds import clip_update, update_norm
    gen = torch.Generator().manual_seed(0)
    clip = 0.1
    over = []
    for _ in range(8):
        delta = {"a": torch.randn(64, 64, generator=gen) * 3, "b": torch.randn(8, 64, generator=gen)}
        norm = update_norm(clip_update(delta, clip))
        if norm > clip:
            over.append(norm / clip - 1)
    assert not over, f"clipped norms above S by {over}"

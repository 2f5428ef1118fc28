"""Review 45: the fixes of reviews 43-44 attacked (the per-row quoted-TSV rule, shard read-back, the broadcast's
dtypes, the planner's world size and --force warning, HiZOO's state without clones).

1. readers._read_delimited judges a multi-line quoted row by its own raw lines, but one short raw line among them
   (a row missing only an unread trailing field, which the raw reading accepts) makes the whole span "pieces": a raw
   (GLUE-style) file whose stray quotes pair up around such a row has three rows silently merged into one.
2. The same rule's error names the line after the previous row (`starts`), so blank lines before a row make it name
   a blank line, not the line where the quoted field opens.
3. A one-column TSV written by Python's csv (a prompts file for `generate`) whose text spans lines is always refused,
   with advice to write it with Python's csv, which is what wrote it: every raw piece of one column is "whole".
4. deployment.shard: a TSV row the reader takes (a short row; one raw piece short) is written back with its missing
   field as "", which makes every raw piece whole: the shard is refused ("convert the file to .jsonl").
5. trainer.check_memory reads LOCAL_WORLD_SIZE even without torchrun (WORLD_SIZE unset): a stray export divides a
   single process's budget (a run that fits is refused "each of 4 data-parallel ranks"), and a non-number or 0 is a
   ValueError / ZeroDivisionError, not one line.
6. check_fits(processes=N) compares the run with budget / N but its "what fits" list with the whole machine's
   budget: the refusal lists the refused pair itself among those that fit.
7. HiZOO-L's state_dict (no clones) holds r (replaced each step) and c (updated in place): a state kept across a
   step is neither the state it was nor the current one (r of step t, c of step t+1).

Tiny files and the tiny random models only.
"""

from __future__ import annotations

import csv
import re

import pytest
import torch

from slimtune import SlimtuneError
from slimtune.data.readers import read_rows
from slimtune.optim import OptimizerArgs
from slimtune.peft import PeftSettings
from slimtune.report import memory_model
from slimtune.train import TrainConfig


def test_a_raw_tsv_whose_stray_quotes_pair_around_a_short_row_is_not_merged(tmp_path):
    """Raw TSV (quotes as text) with an optional `idx` column: row 2's sentence opens with a quote, row 4's ends with
    one, and row 3 lacks only `idx` (nothing reads it; the raw reading takes it). Review 43's own case with the short
    row moved inside the span: read quoted, rows 2-4 become one row with tabs and newlines in its text."""
    raw_rows_stay_apart(tmp_path / "train.tsv", 'sentence\tlabel\tidx\n"hello\t1\t0\nfine text\t1\nworld"\t0\t2\n')


def raw_rows_stay_apart(path, text: str) -> None:
    """A raw TSV whose stray quotes pair up is refused as ambiguous, or read with no row merged into another (no
    sentence holding a tab or a newline)."""
    path.write_text(text, encoding="utf-8")
    try:
        rows, _ = read_rows(str(path), "train")
    except SlimtuneError:
        return
    sentences = [row["sentence"] for _, row in rows]
    assert not any("\n" in s or "\t" in s for s in sentences), f"raw rows merged into one: {sentences}"


def test_the_spanning_row_refusal_names_the_line_where_the_quote_opens(tmp_path):
    """Blank lines 2-3, then a quoted field over lines 4-5 whose raw lines are whole rows: the refusal names line 2
    (the line after the header), a blank line, and 'lines 2-5'."""
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\n\n\n"hello\t1\nworld"\t0\n', encoding="utf-8")
    with pytest.raises(SlimtuneError) as caught:
        read_rows(str(path), "train")
    assert re.search(r"train\.tsv:4:", str(caught.value)), str(caught.value)


def test_a_one_column_tsv_written_by_pythons_csv_with_a_multi_line_text_is_read(tmp_path):
    """`generate --prompts prompts.tsv` with one `input` column, written by csv.writer (QUOTE_MINIMAL): a prompt over
    two lines is quoted. Every raw line of a one-column file is a whole row, so the file is refused, and the message
    says to write it with Python's csv."""
    path = tmp_path / "prompts.tsv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerows([["input"], ["Write a haiku.\nAbout the sea."], ["Say hi."]])
    rows, _ = read_rows(str(path), "test")
    assert [row["input"] for _, row in rows] == ["Write a haiku.\nAbout the sea.", "Say hi."]


def test_a_tsv_the_reader_takes_is_sharded(tmp_path):
    """Row 2 is quoted over two lines (its text holds two tabs and a newline) and lacks `idx`: its last raw piece is
    short, so the reader takes the quoted reading. The shard writes the missing idx as "", every raw piece of the
    row is then whole, and the shard is refused: the deployment stops on a file `slimtune train` reads."""
    from slimtune.federated.deployment import shard
    source = tmp_path / "train.tsv"
    source.write_text('sentence\tlabel\tidx\n"a\tb\tc\nd"\t1\nplain\t0\t3\n', encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    try:  # review 47: a quoted field with a tab over lines is refused by the reader itself (train and shard alike)
        read_rows(str(source), "train")
    except SlimtuneError:
        with pytest.raises(SlimtuneError):
            shard(source, 1, work)
        return
    shard(source, 1, work)


def _config(tmp_path, demo_paths):
    return TrainConfig(out_dir=str(tmp_path / "run"), train_data=demo_paths[0], model="tiny-llama", optimizer="mezo",
                       optim=OptimizerArgs(lr=1e-6, eps=1e-3), peft=PeftSettings("lora", r=2), steps=1, batch_size=8,
                       progress=False, max_length=12)


@pytest.mark.parametrize("stray", ["4", "abc", "0"])
def test_a_stray_local_world_size_without_torchrun_is_not_read(tmp_path, demo_paths, monkeypatch, stray):
    """WORLD_SIZE unset (one process): check_memory still divides the budget by LOCAL_WORLD_SIZE. A run with room for
    1.5 of itself is refused as 'each of 4 data-parallel ranks'; 'abc' is a ValueError, '0' a ZeroDivisionError."""
    from slimtune.models import load_model_and_tokenizer
    from slimtune.train.trainer import check_memory

    model, tok = load_model_and_tokenizer("tiny-llama", texts=["a b c"])
    one, _ = memory_model.predict_run_mb(model, "mezo", "lora", 2, 8, 12, "cpu")
    monkeypatch.setattr(memory_model, "available_mb", lambda device: 1.5 * one / memory_model.HEADROOM)
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", stray)
    check_memory(_config(tmp_path, demo_paths), model, tok, None)  # fits: one process, 1.5x its prediction


def test_ranks_sharing_a_machine_are_not_told_the_refused_pair_fits(tmp_path, demo_paths, monkeypatch):
    """Two CPU ranks (torchrun --nproc_per_node 2) with room for 1.5 single processes: mezo+lora is refused against
    budget / 2, but its 'what fits' list is computed against the whole budget and names mezo+lora itself."""
    from slimtune.models import load_model_and_tokenizer
    from slimtune.train.trainer import check_memory

    model, tok = load_model_and_tokenizer("tiny-llama", texts=["a b c"])
    one, _ = memory_model.predict_run_mb(model, "mezo", "lora", 2, 8, 12, "cpu")
    monkeypatch.setattr(memory_model, "available_mb", lambda device: 1.5 * one / memory_model.HEADROOM)
    # the other rank holds nothing yet (it starts later): the ranks' pool is what is available now
    monkeypatch.setattr(memory_model, "ranks_rss_mb", lambda processes, own: own)
    for name, value in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    with pytest.raises(SlimtuneError, match="predicted") as caught:
        check_memory(_config(tmp_path, demo_paths), model, tok, None)
    fitting = str(caught.value).split("what fits:")[1]
    assert "mezo+lora (" not in fitting, str(caught.value)


def test_a_hizoo_l_state_kept_across_a_step_is_one_state(tmp_path):
    """s = opt.state_dict(); opt.step(...): a diagonal Hessian saved by reference follows the optimizer (as torch's
    moments do), but HiZOO-L's r is replaced each step and its c updated in place, so s then holds r of the step
    it was taken at and c of the next: loading s gives a Hessian the optimizer never had."""
    from slimtune.zo.hizoo import HiZOO, HiZOOConfig

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4, bias=False)
    x = torch.randn(8, 6)
    opt = HiZOO(model.named_parameters(), HiZOOConfig(lr=1e-2, eps=1e-2, factored=True))

    def closure():
        return (model(x) ** 2).mean(1)

    opt.step(closure)
    s = opt.state_dict()["hessian"][0]
    before = {k: v.clone() for k, v in s.items()}
    opt.step(closure)
    now = {k: v.clone() for k, v in opt.state_dict()["hessian"][0].items()}
    as_before = all(torch.equal(s[k], before[k]) for k in s)
    as_now = all(torch.equal(s[k], now[k]) for k in s)
    assert as_before or as_now, {k: (torch.equal(s[k], before[k]), torch.equal(s[k], now[k])) for k in s}

"""Review 39: the fixes of reviews 35-38 attacked as an adversary and a careless user.

1. The registry of private releases (optimizers.released_into) names an optimizer by `id(self)`: once the first
   optimizer is freed, a new one built at the same address is taken for it and steps over the weights' private
   steps with epsilon_spent from 0 (the notebook cell of review 38, run a third time).
2. The registry is keyed by the parameter objects: a `copy.deepcopy` of privately trained weights (or a state_dict
   round trip) holds the same private steps, and a new optimizer over it starts at epsilon_spent 0 unrefused.
3. TSV is read as quoted first: a raw TSV whose text opens a quote on one line and closes it before a tab on a
   later one is valid quoted TSV, and two rows become one silently (a label and a line end inside the prompt),
   though docs/benchmarks/rte.md promises "raw TSV is still read as it is".
4. The fewer-fields check refuses a row that lacks only a trailing column nothing reads (Excel omits trailing
   empty cells' delimiters on some rows): a table the reader read before is now refused, though no read field is
   missing (a missing label or text is already named by the field checks).
5. WORLD_SIZE is checked with str.isdigit, which accepts digits int() does not read ('²'): a traceback, not one line.

Tiny random models only; each test fails on the code it was written against.
"""

from __future__ import annotations

import copy

import pytest

import slimtune
from slimtune import SlimtuneError
from slimtune.data import get_task, read_examples
from slimtune.data.readers import read_rows
from test_review_findings_38 import private_step, refuses_or_covers, tiny_lm


def test_a_new_private_optimizer_at_a_freed_optimizers_address_does_not_inherit_its_releases():
    """Notebook: the DPZero cell, the loop (3 private steps), then the DPZero cell again (refused: the weights hold
    another's steps), and again: the second cell's object is freed when `opt` is rebound, and the third is often
    built at the first's address, so `owner == id(self)` and it steps with epsilon_spent from 0."""
    model = tiny_lm()
    opt = slimtune.DPZero(model, epsilon=2.0, delta=1e-5, dataset_size=400, batch_size=8, steps=5)
    for _ in range(3):
        private_step(opt, model)
    spent_by_the_model = opt.accountant.epsilon(4)
    for rerun in range(5):  # the cell run again, and again
        opt = slimtune.DPZero(model, epsilon=2.0, delta=1e-5, dataset_size=400, batch_size=8, steps=5)
        try:
            private_step(opt, model)
        except SlimtuneError:
            continue
        assert opt.epsilon_spent >= spent_by_the_model * (1 - 1e-9), (
            f"re-run {rerun}: a new optimizer stepped over weights holding 3 private steps and reports epsilon "
            f"{opt.epsilon_spent:.3g} (the model spent {spent_by_the_model:.3g})")


def test_a_deepcopy_of_privately_trained_weights_keeps_their_releases():
    """`best = copy.deepcopy(model)` after 3 private steps, then a new DPZero over the copy: the copy's weights hold
    the 3 releases, but the registry knows only the original parameter objects."""
    model = tiny_lm()
    first = slimtune.DPZero(model, epsilon=2.0, delta=1e-5, dataset_size=400, batch_size=8, steps=5)
    for _ in range(3):
        private_step(first, model)
    refuses_or_covers(copy.deepcopy(model), first.accountant.epsilon(4))


def test_a_raw_tsv_is_not_merged_across_lines_by_the_quoted_reading(tmp_path):
    """Raw TSV (quotes are text): row 2 opens a quote it never closes, row 3 ends its text with a quote. Read as
    quoted TSV it is valid: one row whose sentence is 'Stop\\t0\\nit was fine, all right' (row 2's label inside the
    prompt), 2 rows instead of 3, without a word. Either the 3 raw rows, or one line saying the file is ambiguous."""
    path = tmp_path / "raw.tsv"
    path.write_text('sentence\tlabel\n"Stop\t0\nit was fine, all right"\t1\na plain row\t1\n', encoding="utf-8")
    try:
        rows, _ = read_rows(str(path), "train")
    except SlimtuneError:
        return
    texts = [row["sentence"] for _, row in rows]
    assert texts == ['"Stop', 'it was fine, all right"', "a plain row"], f"raw TSV misread as {texts}"


def test_a_csv_row_lacking_only_an_unread_trailing_column_is_read(tmp_path):
    """A table with a `notes` column nothing reads; Excel leaves out the trailing delimiter of rows whose last cells
    are empty (after its first 16 rows). Every read field (sentence, label) is there, yet the file is refused: 'x.csv:3:
    2 fields, the header has 3'. A missing read field is already named ("field 'label' is missing")."""
    path = tmp_path / "x.csv"
    lines = ["sentence,label,notes", "good film,1,checked"] + [f"film {i},{i % 2}" for i in range(20)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    examples = read_examples(str(path), get_task("sst2"))
    assert len(examples) == 21


def test_a_world_size_of_non_ascii_digits_is_one_line(monkeypatch):
    """'²'.isdigit() is True, int('²') raises ValueError: an internal error instead of the one-line refusal."""
    from slimtune.distributed import torchrun_world_size
    monkeypatch.setenv("WORLD_SIZE", "²")
    with pytest.raises(SlimtuneError, match="WORLD_SIZE"):
        torchrun_world_size()

"""Review 41: the fixes of reviews 39 (release record, TSV readings, short rows, WORLD_SIZE) and 40 (--template
escapes, help markup) attacked.

1. Review 40 decodes \\n, \\t and \\\\ in a template "typed on the command line", and docs/how-to/generation.md says
   "a config file or Python gives the characters themselves". But `slimtune.train` calls build_settings with
   ctx=None, where every keyword counts as typed on the command line: a Python template r"C:\\new" trains on
   'C:' + newline + 'ew', and a Python string holding two backslashes loses one.
2. Review 39 removed the fewer-fields check, so a properly quoted TSV (Python's csv, pandas) whose text holds a line
   break now also parses as raw TSV (its broken-off lines are short rows, no longer an error), and the file is
   refused as ambiguous, with a message telling the user to quote the file with Python's csv or pandas, which is
   how it was written. Generation data (completions over several lines) hit this.

Tiny random models only; each test fails on the code it was written against.
"""

from __future__ import annotations

import csv
from pathlib import Path

import slimtune
from slimtune.data.readers import read_rows

DEMO = Path(__file__).resolve().parents[1] / "slimtune" / "data" / "demo"


def test_python_train_keeps_a_templates_backslashes(tmp_path):
    """docs/how-to/generation.md: 'a config file or Python gives the characters themselves'."""
    template = "{sentence} C:\\new\\table\\\\ It was"  # the characters: C : \ n e w \ t a b l e \ \
    resolved = slimtune.train(data=str(DEMO / "sst2_demo_train.tsv"), model="tiny-llama", task="sst2",
                              template=template, out=str(tmp_path / "run"), dry_run=True)
    assert resolved["template"] == template, f"Python's template was decoded: {resolved['template']!r}"


def test_a_csv_module_quoted_tsv_with_a_line_break_in_a_field_is_read(tmp_path):
    """A TSV written by Python's csv module (as pandas' to_csv(sep='\\t') writes it): the field with a line break is
    quoted, every other row plain. It is valid quoted TSV, and the raw reading only works because its broken lines
    are now short rows; the reader refuses it and says 'quote the file fully (Python's csv, pandas)'."""
    path = tmp_path / "gen.tsv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["input", "target"])
        writer.writerow(["name[Aromi]", "Aromi is a cafe."])
        writer.writerow(["name[Zizzi]", "Zizzi is a pub.\nIt is cheap."])
        writer.writerow(["name[Bibimbap]", "Bibimbap serves Chinese food."])
    rows, _ = read_rows(str(path), "train")
    assert [row["target"] for _, row in rows] == ["Aromi is a cafe.", "Zizzi is a pub.\nIt is cheap.",
                                                  "Bibimbap serves Chinese food."]

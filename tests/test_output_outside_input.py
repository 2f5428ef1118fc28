"""merge / export write their output outside the adapter they read: a merged checkpoint or GGUF written inside
RUN/adapter is deleted when `train --resume` replaces that adapter (nothing the user had may be lost)."""

import pytest

from test_bad_input_table import TINY, assert_one_line, cli
from test_review_findings_20 import sst2_run as run  # noqa: F401 (fixture: a finished tiny MeZO run)


@pytest.mark.parametrize("sub", ["merged", "deep/merged"])
def test_merge_refuses_an_out_inside_the_adapter(run, sub):
    out = run / "adapter" / sub
    res = cli("merge", run / "adapter", *TINY, "--out", out)
    assert_one_line(res, "--out")
    assert "adapter" in res.stderr and not out.exists()


def test_export_refuses_an_out_inside_the_adapter(run):
    out = run / "adapter" / "model.gguf"
    res = cli("export", run / "adapter", *TINY, "--out", out)
    assert_one_line(res, "--out")
    assert not out.exists()


def test_merge_beside_the_adapter_is_fine(run, tmp_path):
    res = cli("merge", run / "adapter", *TINY, "--out", tmp_path / "merged")
    assert res.exit_code == 0, res.output


def test_generate_and_eval_write_no_output_inside_the_adapter(run):
    out = run / "adapter" / "gen.jsonl"
    res = cli("generate", *TINY, "--adapter", run / "adapter", "--prompt", "hi", "--output", out)
    assert_one_line(res, "--output")
    assert not out.exists()

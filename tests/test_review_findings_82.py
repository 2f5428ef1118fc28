"""Review 82: the fixes of reviews 78 (data readers) and 81 (hostile federation), attacked.

Each test failed on the code it was written against (tiny random models only)."""

from __future__ import annotations

import json

import pytest

from conftest import cli, one_line_error
from test_federated import InProcessGrid, make_cfg, task_identity  # noqa: F401 (fixture)
from test_review_findings_78 import FAST, assert_one_line_child, slimtune
from slimtune import SlimtuneError


# -- 1. client-level DP, stopped before round 1 trained: an untrained "adapter" kept as "0 rounds done" --------------
def test_a_client_dp_run_stopped_in_round_one_keeps_no_untrained_adapter(demo_paths, tmp_path):
    """A SuperNode leaves between wait_for_nodes and round 1's sampling (sample_train_nodes waits node-timeout, then
    NodesMissing for round 1). Without client-level DP the run says "trained nothing" and saves no adapter. Under
    client-level DP run_server skips that check (`not cfg.client_level_dp`), saves the untrained initial LoRA as
    out/adapter with a summary of epsilon 0.0, and says "the 0 round(s) done are saved in OUT (adapter, ...)"; the
    deployment script, reading that summary (rounds_done 0), then says "no adapter was saved" beside the adapter/
    folder it left. Expected: as without DP (nothing trained, no adapter), or at least no "0 round(s) done are
    saved" and no adapter/ that nothing trained."""
    from slimtune.federated.server_app import run_server

    class LeavingGrid(InProcessGrid):
        calls = 0

        def get_node_ids(self):
            self.calls += 1  # 1: wait_for_nodes (all there); 2 on: round 1's sampling (one node gone)
            ids = super().get_node_ids()
            return ids if self.calls <= 1 else ids[:-1]

    out = tmp_path / "run"
    cfg = make_cfg(demo_paths, out_dir=str(out), rounds=3, local_steps=1, eval_max=8, node_timeout=0.2,
                   client_dp_clip=0.1, client_dp_noise=1.0)
    with pytest.raises(SlimtuneError) as err:
        run_server(LeavingGrid(3), cfg)
    assert "0 round(s) done are saved" not in str(err.value), str(err.value)
    assert not (out / "adapter").exists(), json.loads((out / "summary.json").read_text())


# -- 2. not-UTF-8 in a file whose lines end in a lone CR: the reader counts CR lines, not_utf8 does not -------------
@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_not_utf8_names_the_line_the_reader_counts_in_a_cr_file(tmp_path, suffix):
    """The readers open text with universal newlines: a file whose lines end in a lone \\r (classic Mac, some
    spreadsheet exports) is read row by row, and its other errors name the CR-counted line (a stray field on line 3
    says FILE:3). not_utf8 re-reads the bytes splitting at \\n only, so a Latin-1 byte on line 3 is reported as
    FILE:1 (the whole file is one "line" to it). Expected: FILE:3."""
    if suffix == "csv":
        data = b"sentence,label\rgood film,1\rcaf\xe9 film,0\rbad film,0\r"
    else:
        data = b'{"sentence": "good", "label": 1}\r{"sentence": "bad", "label": 0}\r{"sentence": "caf\xe9", ' \
               b'"label": 0}\r'
    path = tmp_path / f"cr.{suffix}"
    path.write_bytes(data)
    line = one_line_error(cli("train", "--data", path, *FAST, "--out", tmp_path / "out"))
    assert f"{path}:3:" in line, line


# -- 3. a regular file that is an endless-looking stream: the /dev/zero failure, through a sparse file -------------
@pytest.mark.parametrize("suffix", ["jsonl", "tsv"])
def test_a_sparse_file_of_zero_bytes_is_a_one_line_error_not_a_memory_error(tmp_path, suffix):
    """Review 78 refused /dev/zero as data (not a regular file), but the same stream as a regular file still
    fills memory: `truncate -s 8G data.jsonl` (a sparse file: no disk used; or a crash-zeroed or binary file named
    .jsonl) is one 8 GB "line" of NUL characters that the JSONL reader (and the TSV one) reads whole:
    `internal error (MemoryError: )`, exit 1 (without a memory limit: the machine's memory). Expected: one line
    naming the file (a line far longer than any row, or not text), exit 2."""
    path = tmp_path / f"zeros.{suffix}"
    with open(path, "wb") as f:
        f.truncate(8 << 30)
    code, err = slimtune("train", "--data", path, *FAST, "--out", tmp_path / "out", timeout=240, memory=4 << 30)
    line = assert_one_line_child(code, err, str(path))
    assert "internal error" not in line


def test_a_chat_template_raising_any_error_on_a_row_is_one_line_naming_it():
    """(lead) The fixer's change checked by hand only: a template whose expression raises on a row (here a division
    by zero when a message is empty) is the same one line as jinja's TemplateError, naming the row; in a private run
    its message (which could quote the row) is withheld."""
    from types import SimpleNamespace

    from slimtune import SlimtuneError
    from slimtune.data.tasks import rows_unquoted
    from slimtune.generation.data import render_chat

    def apply_chat_template(messages, **kw):
        return str(1 // len(messages[0]["content"]))  # ZeroDivisionError on an empty message

    tok = SimpleNamespace(chat_template="{{ x }}", apply_chat_template=apply_chat_template)
    assert render_chat(tok, [{"role": "user", "content": "hi"}], "d.jsonl:3") == "0"
    with pytest.raises(SlimtuneError, match=r"d.jsonl:3: the model's chat template refuses this conversation "
                                            r"\(ZeroDivisionError"):
        render_chat(tok, [{"role": "user", "content": ""}], "d.jsonl:3")
    with rows_unquoted():
        with pytest.raises(SlimtuneError) as err:
            render_chat(tok, [{"role": "user", "content": ""}], "d.jsonl:3")
    assert "withheld" in str(err.value) and "ZeroDivision" not in str(err.value)

"""A run directory whose config.json is valid JSON but not an object (a list, a string, a number: another tool's
file, or one edited by hand) is bad input: one line naming the file, exit 2, before any work; not an internal error."""

import json

import pytest

from test_bad_input_table import FAST, TINY, TRAIN, assert_one_line, cli


@pytest.mark.parametrize("content", [[1, 2], "a string", 3, None])
def test_resume_from_a_config_json_that_is_not_an_object(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(content))
    res = cli("train", "--data", TRAIN, *TINY, *FAST, "--out", run, "--resume")
    assert_one_line(res, "config.json")
    assert json.loads((run / "config.json").read_text()) == content  # left as it was


@pytest.mark.parametrize("content", [[1, 2], "a string"])
def test_train_into_a_directory_whose_config_json_is_not_an_object(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(content))
    res = cli("train", "--data", TRAIN, *TINY, *FAST, "--out", run)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "internal error" not in res.output
    assert json.loads((run / "config.json").read_text()) == content

"""Review 59: the data-input fixes of review 58 (rows_unquoted in private runs), adversarially. Each test fails on
the code it was written against."""

import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimtune import SlimtuneError
from slimtune.cli import app

runner = CliRunner()
SECRET = "John Smith 4111"


def train(tmp_path, data, *extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return runner.invoke(app, [str(a) for a in ("train", "--model", "tiny-llama", "--data", data, "--steps", 1,
                                                    "--batch-size", 2, "--eval-every", 0, "--out", tmp_path / "run",
                                                    "--quiet", *extra)])


def test_a_private_generation_runs_missing_column_error_does_not_quote_a_headerless_first_row(tmp_path):
    """`train --task generation --optimizer dp-adamw` on a table saved without its header: generation/data.py
    rows_to_examples lists the first row as the columns found ("found 'John Smith 4111', 'diagnosis ...'"),
    ignoring rows_unquoted (only readers._to_examples, the classification path, honours it)."""
    path = tmp_path / "noheader.csv"
    path.write_text(f"{SECRET},diagnosis cancer\nname=Ann,ok\n")
    r = train(tmp_path, path, "--task", "generation", "--input-column", "mr", "--target-column", "ref",
              "--optimizer", "dp-adamw")
    assert r.exit_code == 2, r.output[-400:]
    assert "missing column" in r.output and "John Smith" not in r.output, r.output[-400:]


def test_a_private_runs_duplicate_header_error_does_not_quote_a_headerless_first_row(tmp_path):
    """A header-less table whose first row holds the same text twice: readers._parse_delimited says "the header names
    column 'John Smith 4111' twice", in a private run (the header of a header-less file is its first row)."""
    path = tmp_path / "noheader.tsv"
    path.write_text(f"{SECRET}\t{SECRET}\t1\na bad film\tx\t0\n")
    r = train(tmp_path, path, "--optimizer", "dp-adamw")
    assert r.exit_code == 2, r.output[-400:]
    assert "twice" in r.output and "John Smith" not in r.output, r.output[-400:]


def test_a_private_federated_clients_data_error_does_not_quote_the_row(tmp_path):
    """`slimtune federate --local-optimizer dp-adamw` (clients with example-level DP): check_inputs reads --data
    outside rows_unquoted, so an unknown label is quoted ("unknown label 'John Smith 4111'")."""
    from slimtune.federated import FederatedConfig
    from slimtune.federated.config import check_inputs
    path = tmp_path / "secret.tsv"
    path.write_text(f"sentence\tlabel\na lovely film\t1\na bad film\t{SECRET}\n")
    cfg = FederatedConfig(task="sst2", data=str(path), model="tiny-llama", local_optimizer="dp-adamw",
                          out_dir=str(tmp_path / "fed")).resolved()
    with pytest.raises(SlimtuneError) as err:
        check_inputs(cfg)
    assert "secret.tsv:3" in str(err.value) and "John Smith" not in str(err.value), str(err.value)

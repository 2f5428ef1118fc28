"""Every run this repository recorded (benchmarks/results/**/config.json) reads back as train settings: what
`slimtune train --resume` and `--config RUN/config.json` start from. A stricter reader (review 62) must not strand
the runs already on disk (review 67: sixteen runs recorded `svfit_relative: null`)."""

import json
from pathlib import Path

import pytest

from slimtune.settings.train import TrainSettings, from_run_config, is_run_config

ROOT = Path(__file__).resolve().parents[1]
RECORDS = sorted(p for p in (ROOT / "benchmarks" / "results").rglob("config.json")
                 if is_run_config(json.loads(p.read_text())))


def test_the_repository_holds_run_records():
    assert len(RECORDS) > 20


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: str(p.parent.relative_to(ROOT / "benchmarks" / "results")))
def test_a_recorded_run_reads_back_as_settings(path):
    values = from_run_config(json.loads(path.read_text()), str(path))
    TrainSettings.check_values(values, str(path))

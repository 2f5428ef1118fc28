"""The documentation (issue 37): the MkDocs site builds with --strict (every link, page and API docstring resolves)
after its benchmark pages are regenerated from benchmarks/results/ by benchmarks/docs_tables.py, every generated
block names a table that tables.py knows, and the README stays short with only generated numbers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BENCH = ROOT / "benchmarks"

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")


@pytest.fixture
def bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def test_benchmark_pages_name_only_generated_tables(bench_on_path):
    import readme_tables
    import tables

    for page in (DOCS / "benchmarks").glob("*.md"):
        names = re.findall(r"<!-- ([\w-]+):start -->", page.read_text())
        assert set(names) <= set(tables.TABLES), page.name
        assert names == readme_tables.marked_tables(page.read_text())
    assert len(list((DOCS / "benchmarks").glob("*.md"))) >= 8


def test_docs_build_strict_from_regenerated_benchmark_pages(tmp_path, bench_on_path):
    import docs_tables

    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    docs_tables.update(docs)  # the pages as the results files say now
    assert "| adamw-lora" in (docs / "benchmarks" / "defaults.md").read_text()  # a table from JSON
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config["docs_dir"] = str(docs)
    config["hooks"] = [str(docs / "hooks.py")]
    config["plugins"][1]["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT)]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml"),
                             "-d", str(tmp_path / "site")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    site = tmp_path / "site"
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "--lozo-rank" in cli and "<!-- settings:" not in cli  # flags generated from the settings classes
    api = (site / "reference" / "python" / "index.html").read_text()
    assert "sample_batch" in api and "dataset_size" in api  # docstrings of the Python API
    defaults = (site / "reference" / "defaults" / "index.html").read_text()
    assert "defaults_sweep mezo+lora" in defaults


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            for value in item.values():
                yield from (pages(value) if isinstance(value, list) else [value])

    listed = set(pages(config["nav"]))
    present = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert listed == present


def test_readme_is_short_and_its_numbers_are_generated(bench_on_path):
    import readme_tables

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert text.splitlines()[2:6][1].startswith("make demo") and "make test" in text.splitlines()[5]  # the two commands
    assert {"defaults", "targets"} <= set(readme_tables.marked_tables(text))
    outside = re.sub(r"<!-- (\S+):start -->.*?<!-- \1:end -->", "", text, flags=re.S)
    outside = re.sub(r"```.*?```", "", outside, flags=re.S)
    assert not re.search(r"\b0\.\d{3}\b", outside)  # accuracies appear only in the generated table
    # every generated block is what readme_tables.fill makes of benchmarks/results/ now (docs_tables.py --check): a
    # stale number inside a table passes the checks above
    for page in [ROOT / "README.md", *sorted((ROOT / "docs" / "benchmarks").glob("*.md"))]:
        current = page.read_text()
        assert readme_tables.fill(current) == current, \
            f"{page.name}: a generated table is stale; run `python benchmarks/docs_tables.py`"

"""Write the generated tables into README.md between their `<!-- NAME:start -->` / `<!-- NAME:end -->` markers.
Usage: python benchmarks/readme_tables.py [NAME ...]   (default: every marked table that tables.py generates; a
marked block no table function renders, such as the hand-written `results` section, is left alone)
The docs' benchmark pages are filled the same way by benchmarks/docs_tables.py."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

import tables

README = Path(__file__).resolve().parents[1] / "README.md"


def marked_tables(text: str) -> list[str]:
    """The marked blocks of `text` that a table function in tables.py generates, in order."""
    return [name for name in re.findall(r"<!-- ([\w-]+):start -->", text) if name in tables.TABLES]


def render(name: str) -> str:
    """Table `name` as tables.py prints it (Markdown, from benchmarks/results/)."""
    buf = io.StringIO()
    argv = sys.argv
    try:
        with contextlib.redirect_stdout(buf):
            sys.argv = ["tables.py", name]
            tables.main()
    finally:
        sys.argv = argv
    return buf.getvalue().split(f"<!-- {name} -->", 1)[1].strip()


def fill(text: str, names: list[str] | None = None) -> str:
    """`text` with each marked block in `names` (default: all generated ones) replaced by its current table."""
    for name in names if names is not None else marked_tables(text):
        body = render(name)
        text = re.sub(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)",
                      lambda m: m.group(1) + body + "\n" + m.group(2), text, flags=re.S)
    return text


def pages() -> list[Path]:
    """Where generated blocks live: README.md and the docs' benchmark pages."""
    return [README, *sorted((README.parent / "docs" / "benchmarks").glob("*.md"))]


def write_block(name: str, body: str, path: Path | None = None) -> None:
    """Every marked block `name` (in `path`, or in README.md and the docs' benchmark pages) set to `body`: for tables
    a benchmark renders itself (benchmarks/scale.py)."""
    targets = [path] if path else [p for p in pages() if f"<!-- {name}:start -->" in p.read_text()]
    if not targets or f"<!-- {name}:start -->" not in targets[0].read_text():
        raise SystemExit(f"no page has <!-- {name}:start --> / <!-- {name}:end --> markers")
    for target in targets:
        target.write_text(re.sub(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)",
                                 lambda m: m.group(1) + body.strip() + "\n" + m.group(2), target.read_text(),
                                 flags=re.S))


def main() -> None:
    """Fill the named tables (default: all) wherever they are marked: README.md and docs/benchmarks/*.md."""
    for page in pages():
        text = page.read_text()
        new = fill(text, sys.argv[1:] or None)
        if new != text:
            page.write_text(new)


if __name__ == "__main__":
    main()

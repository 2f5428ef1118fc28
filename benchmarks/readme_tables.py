"""Write the generated tables into README.md between their `<!-- NAME:start -->` / `<!-- NAME:end -->` markers.
Usage: python benchmarks/readme_tables.py [NAME ...]   (default: every marked table that tables.py generates; a
marked block no table function renders, such as the hand-written `results` section, is left alone)"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

import tables

README = Path(__file__).resolve().parents[1] / "README.md"


def marked_tables(text: str) -> list[str]:
    """The README's marked blocks that a table function in tables.py generates, in README order."""
    return [name for name in re.findall(r"<!-- ([\w-]+):start -->", text) if name in tables.TABLES]


def main() -> None:
    text = README.read_text()
    names = sys.argv[1:] or marked_tables(text)
    for name in names:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            sys.argv = ["tables.py", name]
            tables.main()
        body = buf.getvalue().split(f"<!-- {name} -->", 1)[1].strip()
        text = re.sub(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)",
                      lambda m: m.group(1) + body + "\n" + m.group(2), text, flags=re.S)
    README.write_text(text)


if __name__ == "__main__":
    main()

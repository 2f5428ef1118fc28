"""Write the docs' benchmark pages (docs/benchmarks/*.md) and the README beside the docs directory from
benchmarks/results/: every `<!-- NAME:start -->` / `<!-- NAME:end -->` block a table function of tables.py generates is
replaced by its current table (the same code as benchmarks/readme_tables.py), and the plots the pages show are copied
to docs/benchmarks/img/. Run it after a benchmark writes new results; `mkdocs build` then publishes them.
Usage: python benchmarks/docs_tables.py [--docs DIR] [--check]
  --docs DIR  the docs directory (default: docs/ of this repository; its parent's README.md is filled too)
  --check     write nothing; exit 1 if a page (README.md included) or plot is out of date"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from readme_tables import fill

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = {"zo_convergence.png": RESULTS / "zo_convergence.png",
         "federated_attacks.png": RESULTS / "federated_attacks.png",
         "scaling_law.png": RESULTS / "scaling" / "scaling_law.png",
         "scaling_law_models.png": RESULTS / "scaling" / "scaling_law_models.png"}


def update(docs: Path, check: bool = False) -> list[str]:
    """Regenerate the pages under docs/benchmarks and the README.md beside `docs` (where there is one); returns the
    files that changed (or would, with check)."""
    pages = docs / "benchmarks"
    changed = []
    readme = docs.parent / "README.md"
    for page in [*([readme] if readme.exists() else []), *sorted(pages.glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        new = fill(text)
        if new != text:
            changed.append(str(page))
            if not check:
                page.write_text(new, encoding="utf-8")
    for name, source in PLOTS.items():
        target = pages / "img" / name
        if source.exists() and (not target.exists() or target.read_bytes() != source.read_bytes()):
            changed.append(str(target))
            if not check:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    changed = update(args.docs, args.check)
    for path in changed:
        print(("out of date: " if args.check else "wrote ") + path)
    if args.check and changed:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Review 40: a newcomer follows the documentation. Each test runs a documented command or snippet (adapted only by
swapping in the tiny model and tiny step counts) or checks a documented fact about behaviour, and fails on the code
as it was reviewed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimtune.cli import app

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"
E2E_TRAIN, E2E_DEV = str(DEMO / "e2e_demo_train.csv"), str(DEMO / "e2e_demo_dev.csv")
TINY = ["--model", "tiny-llama"]
runner = CliRunner()

GENERATION_DOC = (ROOT / "docs" / "how-to" / "generation.md").read_text(encoding="utf-8")


def _quoted_after(flag: str, command: str) -> str:
    """The single-quoted value of `flag` in the doc's first `command` line, as bash passes it (backslashes kept)."""
    import re
    line = next(line for line in GENERATION_DOC.splitlines() if command in line and flag in line)
    return re.search(re.escape(flag) + r" '([^']*)'", line)[1]


DOC_TEMPLATE = _quoted_after("--template", "--template")  # the documented training run's
DOC_PROMPT = _quoted_after("--prompt", "slimtune generate")  # the documented generate --prompt


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory):
    """docs/how-to/generation.md:91-92: the documented generation run, on tiny-llama for 2 steps."""
    out = tmp_path_factory.mktemp("gen") / "gen"
    res = cli("train", "--task", "generation", "--data", E2E_TRAIN, "--eval-data", E2E_DEV, "--input-column", "mr",
              "--target-column", "ref", "--template", DOC_TEMPLATE, "--optimizer", "mezo", "--peft", "lora",
              "--out", out, *TINY, "--steps", "2", "--quiet", "--max-new-tokens", "2", "--eval-every", "0")
    assert res.exit_code == 0, res.output
    return out


def test_generation_doc_generate_prompt_is_not_wrapped_twice(gen_run, monkeypatch):
    """docs/how-to/generation.md:95: `slimtune generate --adapter runs/gen/adapter --prompt 'Describe: name[Aromi],
    area[riverside]\\nDescription:'`. The same page (111) says --prompt goes through the learned template, so the
    documented prompt, already templated, reaches the model as 'Describe: Describe: ...Description:\\nDescription:'."""
    import slimtune.generation.decode as decode

    seen = []
    monkeypatch.setattr(decode, "stream_generate", lambda model, tok, prompt, *a, **k: seen.append(prompt))
    res = cli("generate", "--adapter", gen_run / "adapter", "--prompt", DOC_PROMPT, *TINY, "--max-new-tokens", "2")
    assert res.exit_code == 0, res.output
    assert len(seen) == 1
    assert seen[0].count("Describe:") == 1 and seen[0].count("Description:") == 1, seen[0]


def test_generation_doc_template_has_a_newline(gen_run):
    """docs/how-to/generation.md:92: `--template 'Describe: {mr}\\nDescription:'` (in bash single quotes) is meant as
    the built-in templates' newline (classification.md:11 writes SST-2's `Review: <sentence>\\nSentiment:`), but the
    CLI keeps the backslash and the n: every prompt the run trains on holds the two characters `\\n`."""
    learned = json.loads((gen_run / "adapter" / "slimtune.json").read_text())
    assert "\\n" not in learned["template"] and "\n" in learned["template"], learned["template"]


def test_train_help_names_the_quant_extra():
    """docs/reference/cli.md (the table generated from slimtune/settings/train.py:176) says --base-quant needs
    `pip install "slimtune[quant]"`; `slimtune train --help` (README.md:38: "lists every flag") renders the text
    through Rich markup, which eats `[quant]` and tells the user `pip install "slimtune"`."""
    env = {**os.environ, "COLUMNS": "400"}  # wide enough that no help text is cut
    res = subprocess.run([sys.executable, "-m", "slimtune.cli", "train", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.replace("│", " ").split())
    assert 'pip install "slimtune[quant]"' in text, [line for line in res.stdout.splitlines() if "base-quant" in line]


def test_zo_arguments_take_the_train_flag_names():
    """docs/how-to/hugging-face.md:70-72: `ZOArguments(optimizer=..., ...)` takes the optimizer's settings "with the
    names of the `slimtune train` flags". LOZO's flags are --lozo-rank / --lozo-nu, but ZOArguments only knows `rank` /
    `nu` (and FZOO's `n_perturbations` beside --n-spsa): the documented spelling is a TypeError."""
    import re
    from dataclasses import fields

    from slimtune.hf import ZOArguments

    doc = (ROOT / "docs" / "how-to" / "hugging-face.md").read_text(encoding="utf-8")
    settings = doc[doc.index("`ZOArguments(optimizer=..., ...)` takes"):doc.index("a setting that does not belong")]
    assert "names of the `slimtune train`\nflags" not in settings and "names of the `slimtune train` flags" not in \
        settings, "the doc says ZOArguments takes the train flags' names"
    named = set(re.findall(r"(\w+)=\.\.\.", settings)) - {"optimizer"}
    assert named and named <= {f.name for f in fields(ZOArguments)}, named

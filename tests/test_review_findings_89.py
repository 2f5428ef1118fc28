"""Review 89: the README and the docs site followed literally (a careless new user), checked against the code.

1. docs/how-to/private-training.md tells a user who wants to extend a private run later to "give it your own
   `--secret-key-file` (kept outside the run directory, never retired) from the start", and the threat model calls
   the key "a 256-bit key". No page says how such a file is made, and a 256-bit key written the ordinary ways (64 hex
   digits from `secrets.token_hex(32)` / `openssl rand -hex 32`, or 32 raw bytes) is refused with "not a slimtune
   key file", a line that does not say what a key file is. Only the internal `slimtune.privacy.secret.
   create_key_file` (what the tests use) makes one.
2. docs/reference/python.md opens with "Everything below is importable from the top-level package (`import
   slimtune`) ... except the Hugging Face integration", and then documents `read_adapter`, `write_adapter` and
   `peft_kind` (headings without their module): `slimtune.read_adapter`, `slimtune.write_adapter` and
   `slimtune.peft_kind` are AttributeErrors.
3. docs/how-to/hugging-face.md lists "A `constant` or `reduce_lr_on_plateau` schedule takes no warm-up:
   `zo_args.warmup_steps` above 0 with one is an error" (and `zo_args.warmup_steps` with the trainer's set
   differently, an error) among the refusals of which it says "These checks run when the trainer is built and again
   at `train()`". Both are accepted when the trainer is built and refused only at `train()`.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest

from conftest import DEMO, cli, one_line_error

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


# 1 ------------------------------------------------------------------------------------------------------------------

def _key_file_refusal(tmp_path, key_path: Path) -> str | None:
    """The one-line refusal of a dry run given `key_path` as --secret-key-file, or None when it is accepted."""
    res = cli("train", "--model", "tiny-llama", "--data", DEMO / "sst2_demo_train.tsv", "--optimizer", "dpzero",
              "--steps", 2, "--secret-key-file", key_path, "--out", tmp_path / "run", "--dry-run")
    if res.exit_code == 0:
        return None
    return one_line_error(res)


def _docs_say_how_to_make_a_key_file() -> bool:
    pages = [DOCS / "how-to" / "private-training.md", DOCS / "concepts" / "threat-model.md",
             DOCS / "how-to" / "memory-and-speed.md", DOCS / "reference" / "cli.md", ROOT / "README.md"]
    text = "\n".join(p.read_text() for p in pages)
    return bool(re.search(r'create_key_file|\{"key"|"key": "(?!retired)|slimtune key|keygen', text))


@pytest.mark.parametrize("form", ["hex", "raw"])
def test_a_256_bit_key_file_of_ones_own_can_be_made_as_documented(tmp_path, form):
    """private-training.md: to extend a private run later, "give it your own `--secret-key-file` ... from the
    start"; threat-model.md: "a 256-bit key". A user writes one the usual way. It must be accepted, or the refusal
    must say what a key file is / how to make one, or the docs must (today: none of the three)."""
    assert "your own `--secret-key-file`" in (DOCS / "how-to" / "private-training.md").read_text()
    key = tmp_path / "my.key"
    if form == "hex":
        key.write_text(secrets.token_hex(32) + "\n")  # `openssl rand -hex 32 > my.key`
    else:
        key.write_bytes(secrets.token_bytes(32))  # `head -c 32 /dev/urandom > my.key`
    key.chmod(0o600)
    line = _key_file_refusal(tmp_path, key)
    if line is None or _docs_say_how_to_make_a_key_file():
        return
    said = line.replace(str(key), "KEYFILE")
    assert re.search(r'"key"|json|create|generat|python -m|keygen', said, re.I), (
        "a 256-bit key file is refused without saying what a key file is, and no page says how to make one: "
        + said)


# 2 ------------------------------------------------------------------------------------------------------------------

def _documented_names() -> list[str]:
    """The objects python.md documents (`::: module.name`), by their last name, as the page shows them."""
    page = (DOCS / "reference" / "python.md").read_text()
    return [target.rsplit(".", 1)[-1] for target in re.findall(r"^::: (\S+)", page, re.M)]


def test_everything_on_the_python_api_page_is_importable_from_the_top_level_package():
    """python.md: "Everything below is importable from the top-level package (`import slimtune`) ... except the
    Hugging Face integration"."""
    import slimtune

    page = (DOCS / "reference" / "python.md").read_text()
    assert "Everything below is importable from the top-level package" in page
    missing = []
    for name in _documented_names():
        if name in ("epsilon", "noise_multiplier"):  # shown under "Privacy accounting": slimtune.privacy.<name>
            if not hasattr(slimtune.privacy, name):
                missing.append(f"slimtune.privacy.{name}")
            continue
        try:
            getattr(slimtune, name)
        except AttributeError:
            missing.append(f"slimtune.{name}")
    assert not missing, f"documented on the Python API page but not importable from slimtune: {missing}"


# 3 ------------------------------------------------------------------------------------------------------------------

def _trainer(tmp_path, zo_args, **training_args):
    from transformers import DataCollatorForLanguageModeling

    from conftest import hf_args
    from slimtune.hf import ZOTrainer
    from test_hf import lm_dataset, model_for, tokenizer

    tok = tokenizer()
    return ZOTrainer(model=model_for(tok, "lora"), args=hf_args(tmp_path, **training_args),
                     train_dataset=lm_dataset(tok), data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                     zo_args=zo_args)


@pytest.mark.parametrize("training_args, zo", [
    (dict(lr_scheduler_type="constant", max_steps=4), dict(warmup_steps=2)),  # "takes no warm-up: ... an error"
    (dict(warmup_steps=3, max_steps=4), dict(warmup_steps=1)),  # "with the trainer's set differently, an error"
], ids=["constant-schedule-with-warmup", "two-warmups"])
def test_warmup_conflicts_are_refused_when_the_trainer_is_built(tmp_path, hf_offline, training_args, zo):
    """hugging-face.md: these refusals "run when the trainer is built and again at `train()`"."""
    pytest.importorskip("datasets")
    from slimtune import SlimtuneError
    from slimtune.hf import ZOArguments

    page = (DOCS / "how-to" / "hugging-face.md").read_text()
    assert "These checks run when the trainer is built and again at `train()`" in page
    with pytest.raises(SlimtuneError, match="warm"):
        _trainer(tmp_path, ZOArguments(optimizer="mezo", **zo), **training_args)

"""Review 28 of 2ecff28..1d3f518 (reviews 24-27: recorded prompts, the Hugging Face trainer's re-checks, optimizer
state identity, settings you can trust). Each test failed on the code it was written against."""

from __future__ import annotations

import json
import os

import pytest

from test_bad_input_table import DEV, FAST, TINY, TRAIN, assert_one_line, cli

DRY = ["train", "--data", TRAIN, *TINY, *FAST, "--eval-every", "0"]


# -- 1. --secret-key-file: only its existence is checked early; the key file's own checks come after the work --------
def _key_file(path, mode):
    path.write_text(json.dumps({"key": "ab" * 32}))
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("mode,content", [(0o644, None), (0o600, "not json")], ids=["world-readable", "not-a-key"])
def test_a_secret_key_file_that_read_key_file_refuses_is_refused_before_any_work(tmp_path, mode, content):
    """Review 27 made a missing --secret-key-file fail before any work. The same file, created with a plain umask
    (0644: `read_key_file` refuses a key other users can read) or holding something that is not a key, passes the
    settings and --dry-run; the real run loads model and data, creates --out (.lock, status.json failed), and then
    fails, naming no flag."""
    key = _key_file(tmp_path / "run.key", mode)
    if content is not None:
        key.write_text(content)
    out = tmp_path / "out"
    dry = cli(*DRY, "--optimizer", "dpzero", "--secret-key-file", key, "--out", out, "--dry-run")
    assert_one_line(dry, "--secret-key-file")
    res = cli(*DRY, "--optimizer", "dpzero", "--secret-key-file", key, "--out", out)
    assert_one_line(res, "--secret-key-file")
    assert not out.exists(), sorted(p.name for p in out.iterdir())


# -- 2. ZOTrainer: adaptive clipping with Laplace noise is accepted by the constructor, refused in train() -------------
def test_zotrainer_refuses_adaptive_clipping_with_laplace_noise_when_it_is_built(tmp_path):
    """Review 27 refuses `--clipping adaptive --mechanism laplace` in the settings, before any work. The trainer
    checks ZOArguments in its constructor (and again at train()), but `clipping="adaptive", mechanism="laplace"`
    passes both; train() then creates output_dir, and only create_optimizer refuses it, in flag words a Python caller
    never wrote ("use --clipping fixed with --mechanism laplace")."""
    pytest.importorskip("datasets")
    from slimtune import SlimtuneError
    from slimtune.hf import ZOArguments
    from test_hf import model_for, tokenizer, trainer_for

    tok = tokenizer()
    zo = ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2, clipping="adaptive",
                     mechanism="laplace")
    with pytest.raises(SlimtuneError) as info:
        trainer_for(tmp_path, model_for(tok, "lora"), tok, zo, max_steps=2)
    assert "clipping=" in str(info.value) and "--" not in str(info.value), str(info.value)


# -- 3. --resume --steps below the run's recorded warm-up: the message names a flag --resume then refuses ------------
def test_resume_with_steps_below_the_recorded_warmup_names_the_runs_file(tmp_path):
    """Review 27 made a warm-up error name its file for `--config RUN/config.json`; the --resume path (the same
    record, from_run_config) still says "--warmup-steps 15: must be below --steps (10)". The user gave no
    --warmup-steps, and giving one is refused ("a resumed run trains exactly what it started with"): the message
    points at a fix that cannot be made. It should name RUN/config.json (the recorded warm-up) and --steps."""
    out = tmp_path / "a"
    res = cli(*DRY, "--optimizer", "adamw", "--out", out)
    assert res.exit_code == 0, res.output
    stored = json.loads((out / "config.json").read_text())
    stored.update(steps=300, warmup_steps=15)
    (out / "config.json").write_text(json.dumps(stored))
    res = cli("train", "--resume", "--out", out, "--steps", "10", "--dry-run")
    assert_one_line(res, "config.json")

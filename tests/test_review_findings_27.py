"""Review 27: settings you can trust (flags, config files, a run's config.json). Each test failed on the code it was
written against."""

from __future__ import annotations

import json

import pytest

from test_bad_input_table import FAST, TINY, TRAIN, assert_one_line, cli

DRY = ["train", "--data", TRAIN, *TINY, *FAST, "--eval-every", "0"]


# -- 1. --secret-key-file naming no file: refused after the model loaded and the run directory was made -------------
def test_a_missing_secret_key_file_is_refused_before_any_work(tmp_path):
    """A new private run given `--secret-key-file` that does not exist: the settings and --dry-run accept it; the real
    run loads model and data, creates --out (a .lock and a status.json marked failed), and only then fails with
    "<path>: no key file; a private run's noise cannot be continued without it" (no flag named, and about continuing
    a run that never started)."""
    out, key = tmp_path / "out", tmp_path / "no.key"
    dry = cli(*DRY, "--optimizer", "dpzero", "--secret-key-file", key, "--out", out, "--dry-run")
    assert_one_line(dry, "--secret-key-file")
    res = cli(*DRY, "--optimizer", "dpzero", "--secret-key-file", key, "--out", out)
    assert_one_line(res, "--secret-key-file")
    assert not out.exists(), sorted(p.name for p in out.iterdir())


# -- 2. adaptive-clipping settings accepted where the run clips at a fixed C ------------------------------------------
@pytest.mark.parametrize("flag,value", [("--clip-lr", "0.5"), ("--target-quantile", "0.5"),
                                        ("--clip-multiplier", "3")])
def test_adaptive_clipping_settings_are_refused_where_laplace_makes_clipping_fixed(tmp_path, flag, value):
    """`--clipping auto` is adaptive only with Gaussian noise (trainer.adaptive_clipping); with --mechanism laplace
    DPZero clips at a fixed --clip. The settings' `adaptive` condition tests only `clipping != "fixed"`, so
    --clip-lr / --target-quantile / --clip-multiplier are accepted and silently unused."""
    res = cli(*DRY, "--optimizer", "dpzero", "--mechanism", "laplace", flag, value, "--out", tmp_path / "o",
              "--dry-run")
    assert_one_line(res, flag)


# -- 3. LOZO-M momentum 0 from a settings file: refused as a flag, silently 0.9 from YAML ------------------------------
def test_lozo_m_momentum_zero_in_a_yaml_file_is_refused_as_the_flag_is(tmp_path):
    """`--momentum 0 --optimizer lozo-m` is refused (LOZO-M needs momentum > 0; the builder turns 0 into 0.9). The
    check skips any value with an _origin (meant for a run's config.json, whose values are never 'given' anyway), so
    `momentum: 0` in the user's YAML is accepted and the run trains with momentum 0.9."""
    cfg = tmp_path / "m.yaml"
    cfg.write_text("optimizer: lozo-m\nmomentum: 0\n")
    res = cli(*DRY, "--config", cfg, "--out", tmp_path / "o", "--dry-run")
    assert_one_line(res, "momentum")


# -- 4. a switch set to null in a settings file is silently left out ------------------------------------------------
def test_a_null_dry_run_in_a_settings_file_is_not_a_real_run(tmp_path):
    """`dry_run: ${DRY_RUN}` rendered with the variable unset is YAML null. Every other setting's null is refused
    ("an unset variable?"), but a bool's is dropped (file_values: meant for older run config.json files, which take
    the from_run_config path and never reach that line), so the run trains and writes --out."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dry_run:\n")
    out = tmp_path / "o"
    res = cli("train", "--data", TRAIN, *TINY, "--steps", "1", "--batch-size", "4", "--quiet", "--r", "2",
              "--eval-every", "0", "--config", cfg, "--out", out)
    assert_one_line(res, "dry_run")
    assert not out.exists()


# -- 5. --config RUN/config.json --steps N: the source run's table warm-up comes back as if given -------------------
@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("r27")
    res = cli(*DRY, "--optimizer", "adamw", "--out", root / "a")
    assert res.exit_code == 0, res.output
    return root / "a"


def test_a_run_configs_table_warmup_does_not_refuse_a_new_steps(adamw_run, tmp_path):
    """A 300-step AdamW run records warmup_steps 15 (the table's 5%, not a choice). `--config RUN/config.json --steps
    10` keeps it (retable keeps everything for the same model, optimizer and PEFT) and is refused with
    "--warmup-steps 15: must be below --steps (10)", naming a flag the user never gave and not the file it came
    from. Either the warm-up follows the new --steps (the table's 5%), or the message names the file."""
    stored = json.loads((adamw_run / "config.json").read_text())
    stored.update(steps=300, warmup_steps=15)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(stored))
    res = cli("train", "--config", cfg, "--steps", "10", "--out", tmp_path / "b", "--dry-run")
    if res.exit_code == 0:
        assert '"warmup_steps": 0' in res.stdout, res.stdout
    else:
        assert_one_line(res, str(cfg))


# -- 6. --clipping adaptive --mechanism laplace: --dry-run accepts what the run refuses after loading the model -------
def test_adaptive_clipping_with_laplace_is_refused_by_the_settings(tmp_path):
    """accountant.plan refuses adaptive clipping with Laplace noise, but only after the model and data are loaded
    (prepare -> _load -> plan); the settings and `--dry-run` ("check every setting") accept it."""
    res = cli(*DRY, "--optimizer", "dpzero", "--mechanism", "laplace", "--clipping", "adaptive",
              "--out", tmp_path / "o", "--dry-run")
    assert_one_line(res, "--clipping adaptive")

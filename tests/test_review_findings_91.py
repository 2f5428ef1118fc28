"""Review 91: regressions and bypasses in f8d771d, 9f07c2e, 5f6c128 and 632c250.

Each test fails on the code it was written against; the docstring says what a user sees and what is expected."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

from conftest import DEMO, cli

datasets = pytest.importorskip("datasets")

from slimtune import SlimtuneError  # noqa: E402

TRAIN = str(DEMO / "sst2_demo_train.tsv")


# -- 1. the private row check's labels: a token classifier's label is never checked -----------------------------------

def test_a_token_classifiers_label_the_loss_refuses_is_refused_before_any_step(tmp_path, hf_offline, monkeypatch):
    """f8d771d's _model_limits finds the labels a loss takes from `num_labels` only for class names ending in
    ForSequenceClassification, else from the output embeddings. A token classifier (loss_alignment "aligned", which
    the private ZOTrainer trains) has no output embeddings, so its labels are never checked: a row with a label 5 of
    num_labels 2 collates, and the run fails only at the secret step whose Poisson batch drew it (after released
    steps). Expected, as for the sequence classifier: refused before any step."""
    import slimtune.data as data
    from transformers import DataCollatorForTokenClassification, LlamaConfig, LlamaForTokenClassification

    from test_review_findings_85 import TRAIN_ROWS, _FixedBatches, assert_refused_before_any_step, trained_or_refused
    from test_review_findings_88 import private_trainer

    from slimtune.models.loading import tiny_tokenizer
    monkeypatch.setattr(data, "PoissonSampler", _FixedBatches)  # row 3 is drawn at step 3 only
    outcome = []
    for canary in (False, True):
        tok = tiny_tokenizer(TRAIN_ROWS)
        rows = datasets.Dataset.from_dict({"text": TRAIN_ROWS})
        rows = rows.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
        rows = rows.map(lambda r, i: {"labels": [(5 if canary and i == 3 and j == 0 else (j % 2))
                                                 for j in range(len(r["input_ids"]))]}, with_indices=True)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=tok.pad_token_id, num_labels=2)
        trainer = private_trainer(tmp_path / str(canary), LlamaForTokenClassification(config), rows,
                                  DataCollatorForTokenClassification(tok))
        outcome.append(trained_or_refused(trainer))
    assert_refused_before_any_step(outcome)


# -- 2. 9f07c2e's LoRA-dropout refusal: the same dropout under another peft method's name ------------------------------

@pytest.mark.parametrize("method", ["vera", "loha"])
def test_zotrainer_refuses_a_peft_dropout_its_steps_do_not_apply_whatever_the_method(tmp_path, hf_offline, method):
    """9f07c2e refuses LoraConfig(lora_dropout=0.1) on the user's model (a ZO step runs in eval(), where dropout is
    off), by module name `lora_dropout`. The same dropout of other peft methods ZOTrainer trains is accepted and
    silently never applied: VeraConfig(vera_dropout=0.1) (nn.Dropout modules named vera_dropout) and
    LoHaConfig(module_dropout=0.1, rank_dropout=0.1) (applied only `if self.training`). Expected: refused in one
    line, as for LoRA."""
    from peft import LoHaConfig, VeraConfig, get_peft_model

    from test_hf import model_for, tokenizer
    tok = tokenizer()
    config = (VeraConfig(r=4, vera_dropout=0.1, target_modules=["q_proj", "v_proj"]) if method == "vera" else
              LoHaConfig(r=4, module_dropout=0.1, rank_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(model_for(tok), config)
    assert_mezo_refuses_the_dropout(tmp_path, model, tok)


def assert_mezo_refuses_the_dropout(tmp_path, model, tok) -> None:
    """A 1-step MeZO ZOTrainer on `model` is refused in one SlimtuneError naming the dropout."""
    from slimtune.hf import ZOArguments
    from test_hf import trainer_for
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SlimtuneError, match="dropout"):
            trainer = trainer_for(tmp_path, model, tok, ZOArguments(optimizer="mezo", lr=1e-2, eps=1e-2),
                                  max_steps=1)
            trainer.train()


# -- 3. the server settings file: a shared directory above its own, or a linked directory in one ----------------------

def _settings(directory):
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    path = directory / "slimtune-server.toml"
    path.write_text('allowed-nodes = "11,12,13,14"\n')
    os.chmod(path, 0o600)
    return path


def test_a_server_settings_file_reached_through_a_linked_directory_in_a_shared_directory_is_refused(tmp_path):
    """f8d771d refuses a settings file in a directory every user may write, and a symbolic link *to the file* there
    ('anyone may point it elsewhere'). A symbolic link to the file's *directory* in that shared directory
    (SLIMTUNE_SERVER_SETTINGS=/shared/conf/slimtune-server.toml, conf a link) is the same: any user may re-point
    `conf` at a directory of theirs. Only the file's own parent (stat follows the link) and its resolved parent are
    judged, so it is read."""
    from slimtune.federated.config import FederatedConfig
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    _settings(tmp_path / "mine")
    os.symlink(tmp_path / "mine", shared / "conf")
    with pytest.raises(SlimtuneError):
        FederatedConfig.from_flower({}, shared / "conf" / "slimtune-server.toml")


def test_a_server_settings_file_below_a_shared_directory_is_refused(tmp_path):
    """The same one level up: /shared (0777, no sticky bit)/mine (0755)/slimtune-server.toml (0600). Any user may
    `mv /shared/mine /shared/old && mkdir /shared/mine` and write their own settings there (renaming a directory
    within its parent needs only the parent's write permission); only the immediate parent is checked."""
    from slimtune.federated.config import FederatedConfig
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    path = _settings(shared / "mine")
    with pytest.raises(SlimtuneError):
        FederatedConfig.from_flower({}, path)


# -- 4. 632c250: a copied run recognised without its status.json still resumes the original ---------------------------

def test_train_resume_through_a_copied_runs_config_json_without_status_is_refused(tmp_path):
    """632c250 refuses `train --config COPY/config.json --resume` without --out (it resumed the original run named in
    the record, not the copy) only when COPY/status.json exists. A run without status.json (made before it, or whose
    status.json is gone) is still a run: f8d771d's is_run_directory recognises it by config.json beside a checkpoint,
    and it still resumes. A copy of such a run, given by its config.json, silently continues the original (its
    metrics.jsonl grows), as before 632c250. Expected: refused in one line naming --config and --out, as with
    status.json."""
    from conftest import one_line_error
    orig, copy = tmp_path / "orig", tmp_path / "copy"
    res = cli("train", "--data", TRAIN, "--model", "tiny-llama", "--steps", 2, "--batch-size", 4, "--out", orig,
              "--quiet")
    assert res.exit_code == 0, res.output
    shutil.copytree(orig, copy)
    (copy / "status.json").unlink()
    before = (orig / "metrics.jsonl").read_text()
    res = cli("train", "--config", copy / "config.json", "--resume", "--steps", 3, "--quiet")
    assert (orig / "metrics.jsonl").read_text() == before, "the original run was resumed, not the copy"
    line = one_line_error(res)
    assert "--config" in line and "--out" in line, line


# -- 5. an adapter's tokenizer_config.json: the adapter's own file f8d771d did not cover ------------------------------

@pytest.mark.parametrize("kind", ["fifo", "directory", "missing"])
def test_an_adapter_whose_tokenizer_config_is_not_a_file_is_one_line_not_an_internal_error(tmp_path, kind):
    """f8d771d reads an adapter's own files (slimtune.json, adapter_config.json) as the regular files they must be (a
    FIFO hung eval, a directory was an internal error). The adapter's tokenizer_config.json (written by every run,
    read by `eval`/`generate --adapter`) is not covered: a named pipe or a directory in its place, or the file gone,
    is skipped by transformers, the tokenizer loads without its pad token, and `slimtune eval --adapter` ends in
    'error: internal error (TypeError: 'NoneType' object cannot be interpreted as an integer)' (exit 1). Expected:
    one line naming the adapter's file, exit 2."""
    run = tmp_path / "run"
    res = cli("train", "--data", TRAIN, "--model", "tiny-llama", "--steps", 1, "--batch-size", 4, "--out", run,
              "--quiet")
    assert res.exit_code == 0, res.output
    target = run / "adapter" / "tokenizer_config.json"
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    res = cli("eval", "--adapter", run / "adapter", "--data", str(DEMO / "sst2_demo_dev.tsv"))
    assert res.exit_code == 2 and "internal error" not in res.output, res.output


# -- 6. the server settings file at its default place: a broken link or a directory there is silently no file --------

@pytest.mark.parametrize("kind", ["dangling-link", "directory"])
def test_a_default_server_settings_path_that_is_no_file_is_not_silently_ignored(tmp_path, monkeypatch, kind):
    """settings_path() takes $FLWR_HOME/slimtune-server.toml only `if default.is_file()`: a symbolic link whose target
    is gone (the admin's link to /etc/slimtune/server.toml after a move) or a directory there reads as no settings
    file at all, and the server runs with the run config's values only: no allowed-nodes, no client-level DP, the
    bounds it was told to keep dropped without a word (an explicit $SLIMTUNE_SERVER_SETTINGS of the same path is
    refused by read_settings: 'no such server settings file'). Expected: the path handed on (read_settings names
    it) or refused in one line, never None."""
    from slimtune.federated import config as fc
    home = tmp_path / "flwr"
    home.mkdir()
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.delenv(fc.SETTINGS_ENV, raising=False)
    target = home / fc.SETTINGS_FILE
    if kind == "dangling-link":
        os.symlink(tmp_path / "moved-away.toml", target)
    else:
        target.mkdir()
    try:
        found = fc.settings_path()
    except SlimtuneError:
        return
    assert found is not None, f"{target} ({kind}) silently read as no server settings file"

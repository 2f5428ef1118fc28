"""Eighth review round: today's changes (the built-in's float32 cache, the record of every saved model, privacy review
6, careless-user review 7, federated local DP without a sent epsilon) attacked as a careless user and as an attacker.
Each test failed on the code before its fix.

1. `adapter_meta_of` recorded the dtype `load_model_and_tokenizer` was called with, not the model's: a model loaded in
   float32 and cast to bf16 (`model.to(torch.bfloat16)`) was recorded as float32, so `slimtune eval --adapter`
   rebuilt its base in float32 (the tuner adapters' save recorded the parameters' dtype before).
2. It recorded a checkpoint given as a relative path as that string and fingerprinted it at save time: after a
   change of working directory the fingerprint was None (the base check skipped) or another checkpoint's.
3. The built-in's cache rebuild removed whatever directory was at SLIMTUNE_CACHE/<name> when it was not float32,
   with `rmtree(ignore_errors=True)`: a user's own checkpoint of that name (a hub download, its README) was deleted.
4. The private ZOTrainer's held-out check remembered a (train, eval) pair by identity: an eval list that gained a
   training row after its first evaluation was scored un-noised (each call was checked before).
5. Empty values: `flwr run` / the deployment script's settings (FederatedConfig) took `out-dir = ""` and wrote the
   run into the server's working directory, which `slimtune federate --out ''` refuses.
6. The server settings file (slimtune-server.toml) saved with a byte order mark was invalid TOML, while `--config`
   files with one are read (one rule for the files a user edits).
7. `merge --out .` (an empty working directory, which the checks accept) failed after the whole merge with an
   internal error (`PosixPath('.') has an empty name`).
8. `--local-dp-min-examples` with non-private clients, refused by `slimtune federate`, was silently ignored under
   `flwr run` and the deployment script.
9. A TOML config with a [train] table was told to write `lr: ...` under no `train:` (YAML syntax).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from slimtune import SlimtuneError

from conftest import DEMO
from test_review_findings_5 import tiny_checkpoint


# -- 1, 2: the record read off a model --------------------------------------------------------------------------------
def test_a_model_cast_after_loading_is_recorded_in_its_own_dtype():
    import slimtune
    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft.registry import adapter_meta_of

    def cast():
        model, _ = load_model_and_tokenizer("tiny-llama", torch.float32, texts=["a great movie"])
        return model.to(torch.bfloat16)
    assert adapter_meta_of(cast())["dtype"] == "bfloat16"
    assert adapter_meta_of(slimtune.apply_peft(cast(), "lora", r=2))["dtype"] == "bfloat16"
    assert adapter_meta_of(slimtune.apply_peft(cast(), "svfit"))["dtype"] == "bfloat16"  # (one method per model:
    # peft injects LoRA into the base object itself, review 34)


def test_a_quantized_base_is_still_recorded_in_its_load_dtype():
    """A guard for the fix above: the int8 base's weights are int8 and its scales float32 whatever the dtype."""
    pytest.importorskip("bitsandbytes")
    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft.registry import adapter_meta_of

    model, _ = load_model_and_tokenizer("tiny-llama", torch.bfloat16, texts=["a great movie"], base_quant="int8")
    assert adapter_meta_of(model) == {"base_model": "tiny-llama", "base_fingerprint": "tiny-llama",
                                      "dtype": "bfloat16", "base_quant": "int8"}


def test_a_checkpoint_loaded_by_a_relative_path_is_recorded_wherever_the_save_runs(tmp_path, monkeypatch):
    from slimtune.models import load_model_and_tokenizer
    from slimtune.models.loading import base_fingerprint
    from slimtune.peft.registry import adapter_meta_of

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    model, _ = load_model_and_tokenizer("ckpt", torch.float32)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # a notebook or a script that changes directory before saving
    meta = adapter_meta_of(model)
    assert meta["base_fingerprint"] == base_fingerprint(str(ckpt)) is not None
    assert meta["base_model"] == str(ckpt)


# -- 3: the built-in's cache -------------------------------------------------------------------------------------------
def test_a_foreign_directory_where_the_cache_goes_is_never_deleted(tmp_path, monkeypatch):
    """SLIMTUNE_CACHE=~/models, where the user keeps a bf16 SmolLM2 under the cache's name (a hub download, README and
    all): the first `--model smollm2` run deleted it. It is refused in one line instead, untouched."""
    from slimtune.models import loading
    from test_review_findings_6 import fake_gguf_loader, fake_smollm2

    calls = fake_smollm2(tmp_path, monkeypatch, "models")
    mine = tmp_path / "models" / loading.BUILTIN_CACHES["smollm2"]
    model, tok = fake_gguf_loader([])(tmp_path, "x.gguf", torch.bfloat16)
    model.save_pretrained(mine)
    tok.save_pretrained(mine)
    (mine / "README.md").write_text("my notes")
    with pytest.raises(SlimtuneError, match="not slimtune's cache") as err:
        loading.load_model_and_tokenizer("smollm2", torch.float32)
    assert str(mine) in str(err.value)
    assert (mine / "README.md").read_text() == "my notes" and (mine / "model.safetensors").is_file()
    assert calls == []  # nothing was dequantized over it


def test_a_stale_cache_is_replaced_without_a_window_where_it_is_half_gone(tmp_path, monkeypatch):
    """A guard beside the fix above: slimtune's own bf16 cache (an older version's) is still rebuilt in float32,
    and moved away whole before it is deleted (another process sees the old directory, or none, never a part)."""
    from slimtune.models import loading
    from test_review_findings_6 import fake_gguf_loader, fake_smollm2, reference_weights

    calls = fake_smollm2(tmp_path, monkeypatch)
    stale = tmp_path / "cache" / loading.BUILTIN_CACHES["smollm2"]
    model, tok = fake_gguf_loader([])(tmp_path, "x.gguf", torch.bfloat16)
    model.save_pretrained(stale)
    tok.save_pretrained(stale)
    model, _ = loading.load_model_and_tokenizer("smollm2", torch.float32)
    expected = reference_weights()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert calls == [torch.float32]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [stale.name]  # nothing left beside it


# -- 4: the private trainer's held-out check ---------------------------------------------------------------------------
def test_a_private_trainer_rechecks_an_eval_list_that_gained_a_training_row(tmp_path):
    from test_privacy_review_6 import _hf_trainer, tokenizing

    trainer = _hf_trainer(tmp_path, tokenizing)
    held_out = [{"text": row} for row in trainer.eval_dataset["text"][:4]]
    trainer.evaluate(held_out)
    held_out.append({"text": trainer.train_dataset[0]["text"]})  # a notebook cell later
    with pytest.raises(SlimtuneError, match="shares rows with train_dataset"):
        trainer.evaluate(held_out)


# -- 5, 6: the federated settings paths --------------------------------------------------------------------------------
def test_flower_settings_refuse_an_empty_output_directory(tmp_path, monkeypatch):
    from slimtune.federated.config import FederatedConfig, check_run

    monkeypatch.chdir(tmp_path)  # an empty working directory: the run would have been written here
    with pytest.raises(SlimtuneError, match="empty"):
        check_run(FederatedConfig(data=str(DEMO / "sst2_demo_train.tsv"), out_dir=""))
    with pytest.raises(SlimtuneError, match="empty"):
        check_run(FederatedConfig(data=str(DEMO / "sst2_demo_train.tsv"), out_dir="runs/x", model=" "))


def test_a_server_settings_file_with_a_byte_order_mark_is_read(tmp_path):
    from slimtune.federated.config import read_settings

    toml = tmp_path / "slimtune-server.toml"
    toml.write_text("robust = 'median'\nround-timeout = 60.0\n", encoding="utf-8-sig")
    assert read_settings(toml) == {"robust": "median", "round_timeout": 60.0}
    upper = tmp_path / "settings.JSON"
    upper.write_text(json.dumps({"robust": "median"}), encoding="utf-8-sig")
    assert read_settings(upper) == {"robust": "median"}


# -- 7: an output directory that is the working directory --------------------------------------------------------------
def test_a_new_directory_can_be_the_empty_working_directory(tmp_path, monkeypatch):
    from slimtune.train.run_dir import write_new_directory

    here = tmp_path / "merged"
    here.mkdir()
    monkeypatch.chdir(here)
    write_new_directory(".", lambda tmp: (tmp / "config.json").write_text("{}"), "--out")
    assert os.listdir(".") == ["config.json"]  # seen from the working directory itself, not a replaced one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary left beside it


def test_flower_settings_refuse_a_client_sampling_bound_no_client_uses(tmp_path):
    """`slimtune federate --local-dp-min-examples 100` with non-private clients is refused; under `flwr run` (run
    config or server settings) and the deployment script the same bound was silently ignored."""
    from slimtune.federated.config import FederatedConfig, check_run

    data = str(DEMO / "sst2_demo_train.tsv")
    for kwargs in ({}, {"mode": "zo-seeds", "local_optimizer": "mezo"}):
        with pytest.raises(SlimtuneError, match="local-dp-min-examples"):
            check_run(FederatedConfig(data=data, out_dir=str(tmp_path / "run"), local_dp_min_examples=100, **kwargs))
    check_run(FederatedConfig(data=data, out_dir=str(tmp_path / "run"), local_dp_min_examples=100,
                              local_optimizer="dpzero"))


def test_a_nested_toml_section_is_named_in_toml(tmp_path):
    """`--config x.toml` (new today) with a [train] table was told to write `lr: ...` (YAML, invalid TOML)."""
    from slimtune.settings.cli import file_values
    from slimtune.settings.train import TrainSettings

    config = tmp_path / "c.toml"
    config.write_text("[train]\nlr = 0.1\n")
    with pytest.raises(SlimtuneError, match=r"write `lr = \.\.\.` at the top level, not under `\[train\]`"):
        file_values(TrainSettings, str(config))


def test_training_rows_without_their_labels_are_recognised_as_training_rows():
    """(Review 8's open item.) The held-out check keyed a row by all of its columns, so the usual predict() input, the
    training rows without their `labels` (or `label`) column, was not recognised: a private ZOTrainer scored training
    rows without noise. The key now leaves out label columns and the attention mask (not what the model is shown)."""
    from slimtune.hf import shares_rows

    train = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, -100, 7]},
             {"text": "A great movie", "label": 1}]
    assert shares_rows(train, [{"input_ids": [5, 6, 7]}]) is True
    assert shares_rows(train, [{"text": "a great  movie"}]) is True
    assert shares_rows(train, [{"input_ids": [5, 6, 8]}, {"text": "another movie", "label": 1}]) is False


def test_a_training_prompt_alone_is_recognised_as_a_training_row():
    """predict() on a training row's prompt (its input_ids without the target token: labels -100 there) scores what
    the model learned of that row; it was not recognised."""
    from slimtune.hf import shares_rows

    train = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, -100, 7]}]
    assert shares_rows(train, [{"input_ids": [5, 6]}]) is True
    assert shares_rows(train, [{"input_ids": [5, 8]}, {"input_ids": [5]}]) is False


def test_an_output_that_appears_after_the_check_is_never_overwritten(tmp_path, monkeypatch):
    """write_new_file checked that nothing was at the output, then renamed over it: a file created between the two
    was overwritten. The temporary is now hard-linked into place, which refuses anything there."""
    import pathlib

    from slimtune.train.run_dir import write_new_file

    target = tmp_path / "out.jsonl"

    def write(tmp):
        tmp.write_text("ours")
        target.write_text("theirs")  # another process, after any check this command made

    real_exists = pathlib.Path.exists
    monkeypatch.setattr(pathlib.Path, "exists", lambda self, **kw: False if self == target else real_exists(self))
    with pytest.raises(SlimtuneError, match="appeared while this command ran"):
        write_new_file(target, write, "--output")
    assert target.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]

"""Review 69: an adversarial review of ae45afa (a resume tied to a run fingerprint: train/fingerprint.py). Each test
fails on the code it was written against."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import cli, one_line_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"
ROWS = (DEMO / "sst2_demo_train.tsv").read_text().splitlines()


def start(run: Path, data, *flags, model="tiny-llama", steps: int = 2) -> None:
    res = cli("train", "--data", data, "--model", model, "--steps", steps, "--batch-size", "2", "--eval-every",
              "0", "--save", "last", "--checkpoint-every", "1", "--out", run, "--quiet", "--r", "2", *flags)
    assert res.exit_code == 0, res.output[-800:]


def fingerprint_of(run: Path) -> dict:
    return json.loads((run / "checkpoint" / "trainer_state.json").read_text())["fingerprint"]


def start_on_a_saved_model(tmp_path: Path) -> Path:
    """(lead) A run started on a tiny model saved as a checkpoint directory (tokenizer included): that directory."""
    import torch

    from slimtune.models import load_model_and_tokenizer
    data = tmp_path / "train.tsv"
    data.write_text("\n".join(ROWS[:41]) + "\n")
    model_dir = tmp_path / "base-model"
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("tiny-llama", texts=ROWS[1:41])
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    start(tmp_path / "run", data, model=model_dir)
    return model_dir


# -- privacy -----------------------------------------------------------------------------------------------------------
def test_rank_facts_of_a_private_run_hold_no_plain_digest_of_the_data(tmp_path):
    """A private data-parallel run's ranks all_gather `rank_facts`, which holds the plain SHA-256 of --data (and
    --eval-data): it leaves the process in a network message (torchrun's gloo store/collectives are not encrypted),
    where anyone holding a candidate dataset can hash it (or it with one row added or removed) and test a row's
    membership, the very thing fingerprint.py's HMAC exists to prevent in the checkpoint."""
    from slimtune.models.loading import tiny_model
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.privacy import PrivacySpec
    from slimtune.privacy.secret import create_key_file
    from slimtune.train import TrainConfig
    from slimtune.train.fingerprint import file_sha256
    from slimtune.train.trainer import rank_facts

    data = tmp_path / "train.tsv"
    data.write_text("\n".join(ROWS[:41]) + "\n")
    create_key_file(tmp_path / "run.key")
    config = TrainConfig(out_dir=str(tmp_path / "run"), train_data=str(data), model="tiny-llama", optimizer="dpzero",
                         optim=OptimizerArgs(), peft=PeftSettings("lora", r=2), steps=4, batch_size=8,
                         progress=False, privacy=PrivacySpec(target_epsilon=6.0, delta=1e-3),
                         secret_key_file=str(tmp_path / "run.key"))
    facts = rank_facts(config, tiny_model("tiny-llama", 100, 0, 1, seed=0))
    plain = file_sha256(data)
    assert not any(plain in str(value) for value in facts.values()), \
        [what for what, value in facts.items() if plain in str(value)]


def test_private_runs_sharing_a_key_file_do_not_share_a_data_digest(tmp_path):
    """--secret-key-file may be shared by several runs (privacy/secret.py: the nonce keeps their noise apart), but the
    data HMAC is keyed by K("data-check") alone: it is the same in every run of that key on the same file. Whoever
    sees one run's directory and can have a run of the same key trained on a file of their choice (or knows the data
    of another run of it) learns whether the two files are identical: D vs D plus one row is a membership test.
    Binding the MAC to the run (its id, or its nonce) removes the link."""
    from slimtune.privacy.secret import create_key_file
    data = tmp_path / "train.tsv"
    data.write_text("\n".join(ROWS[:41]) + "\n")
    create_key_file(tmp_path / "shared.key")
    private = ("--optimizer", "dpzero", "--delta", "1e-3", "--secret-key-file", tmp_path / "shared.key")
    start(tmp_path / "a", data, *private, steps=1)
    start(tmp_path / "b", data, *private, steps=1)
    a, b = fingerprint_of(tmp_path / "a"), fingerprint_of(tmp_path / "b")
    assert a["files"]["train_data"].startswith("hmac-sha256")  # (lead: a keyed digest, any version tag)
    assert a["files"]["train_data"] != b["files"]["train_data"]


# -- false acceptances -------------------------------------------------------------------------------------------------
def test_resume_refuses_a_saved_dataset_whose_rows_changed(tmp_path):
    """--data hf:DIR (a dataset saved with save_to_disk) is not a file, so compute() records no digest for it and
    check() compares nothing: the saved dataset regenerated with other rows is resumed on silently (the very case
    the fingerprint was made for, for one of the two data formats the reader accepts)."""
    import datasets

    def save(rows):
        shutil.rmtree(tmp_path / "ds", ignore_errors=True)
        pairs = [r.split("\t") for r in rows]
        datasets.Dataset.from_dict({"sentence": [p[0] for p in pairs], "label": [int(p[1]) for p in pairs]}) \
            .save_to_disk(str(tmp_path / "ds"))

    save(ROWS[1:41])
    start(tmp_path / "run", f"hf:{tmp_path / 'ds'}")
    save([ROWS[1], *ROWS[41:80]])
    message = one_line_error(cli("train", "--resume", "--out", tmp_path / "run", "--steps", "3", "--quiet"))
    assert "ds" in message, message


def test_resume_refuses_a_model_directory_whose_tokenizer_changed(tmp_path):
    """model_digest covers config.json and the weights only: the tokenizer saved with the model (tokenizer.json)
    replaced by another one (same vocabulary size, other ids) changes every example's token ids, and so the rest of
    the trajectory, with no word."""
    model_dir = start_on_a_saved_model(tmp_path)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "film", "little"  # two words of the data: their ids swapped
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    message = one_line_error(cli("train", "--resume", "--out", tmp_path / "run", "--steps", "3", "--quiet"))
    assert "tokenizer" in message or "model" in message, message


# -- the message -------------------------------------------------------------------------------------------------------
def test_a_model_directory_gone_at_resume_is_not_called_changed_weights(tmp_path):
    """--model DIR absent at resume (a relative path resumed from another working directory, a moved directory):
    model_digest returns None and check() says 'the model's weights differ from those the run started with (another
    checkpoint saved there?)', sending the user after a change that never happened; the data files get 'no such
    file here ... resume from the directory the run was started in'."""
    model_dir = start_on_a_saved_model(tmp_path)
    model_dir.rename(tmp_path / "moved-model")
    message = one_line_error(cli("train", "--resume", "--out", tmp_path / "run", "--steps", "3", "--quiet"))
    assert "differ" not in message and "base-model" in message, message


def test_a_resume_with_force_does_not_make_every_later_resume_forced(tmp_path, monkeypatch):
    """--force is a setting that config.json records and adopt_unset fills in when not given: after one resume with
    --force (torch upgraded), every later plain `--resume` is forced too, so a second library change is resumed
    through with only a warning where fingerprint.check promises a refusal 'without --force'."""
    import torch
    data = tmp_path / "train.tsv"
    data.write_text("\n".join(ROWS[:41]) + "\n")
    start(tmp_path / "run", data)
    monkeypatch.setattr(torch, "__version__", "98.0.0")
    res = cli("train", "--resume", "--out", tmp_path / "run", "--steps", "3", "--quiet", "--force")
    assert res.exit_code == 0, res.output[-800:]
    monkeypatch.setattr(torch, "__version__", "99.0.0")
    message = one_line_error(cli("train", "--resume", "--out", tmp_path / "run", "--steps", "4", "--quiet"))
    assert "99.0.0" in message, message

"""Review of the per-model defaults, the federated clients' lr and the --eval-data checks (fourth review round).

Each test failed on the code before its fix."""

from pathlib import Path

import pytest

from test_federated import make_cfg


def test_zo_seeds_clients_on_a_model_with_its_own_zo_lr_take_its_ratio():
    """--mode zo-seeds clients run MeZO whatever --local-optimizer says (its default, adamw, is unused), but the
    clients' lr was scaled for --local-optimizer: `slimtune federate --model gemma3-270m --mode zo-seeds` sent its
    MeZO clients (and replayed their pairs at) 1e-3, the lr that diverges on Gemma, against 3e-4 with
    --local-optimizer mezo."""
    from slimtune.federated import FederatedConfig
    assert FederatedConfig(model="gemma3-270m", mode="zo-seeds").resolved().lr == 3e-4
    assert FederatedConfig(model="gemma3-270m", mode="zo-seeds", local_optimizer="mezo").resolved().lr == 3e-4
    assert FederatedConfig(model="gemma3-270m", mode="lora").resolved().lr == 1e-3  # AdamW clients: unchanged


def saved_splits(directory: Path, demo_train: str, shared: bool = False) -> str:
    """hf:DIR with disjoint train and validation splits of the demo rows (validation = train's rows if shared)."""
    import datasets
    _, *rows = Path(demo_train).read_text().splitlines()
    cols = [row.split("\t") for row in rows]

    def split(part):
        return datasets.Dataset.from_dict({"sentence": [c[0] for c in part], "label": [int(c[1]) for c in part]})
    validation = cols[:20] if shared else cols[40:60]
    datasets.DatasetDict({"train": split(cols[:40]), "validation": split(validation)}).save_to_disk(str(directory))
    return f"hf:{directory}"


def test_a_private_run_may_train_and_evaluate_on_the_two_splits_of_one_saved_dataset(tmp_path, demo_paths):
    """--data hf:DIR reads DIR's train split and --eval-data hf:DIR its validation split, but a private run with both
    was refused as '--eval-data is the training data' (the federated check accepts the same pair since df8d10e); rows
    the two splits share are still refused."""
    from typer.testing import CliRunner

    from slimtune.cli import app

    def train(data, out):
        return CliRunner().invoke(app, ["train", "--data", data, "--eval-data", data, "--model", "tiny-llama",
                                        "--optimizer", "dpzero", "--epsilon", "6", "--steps", "1", "--batch-size",
                                        "4", "--eval-every", "1", "--out", str(tmp_path / out)])
    res = train(saved_splits(tmp_path / "disjoint", demo_paths[0]), "run")
    assert res.exit_code == 0, res.output
    res = train(saved_splits(tmp_path / "shared", demo_paths[0], shared=True), "shared-run")
    assert res.exit_code == 2 and "shares rows with the training data" in res.output, res.output


def test_the_demo_runs_mezo_at_the_models_own_ratio(monkeypatch, tmp_path):
    """`slimtune demo --model gemma3-270m` ran MeZO at the demo's fixed lr 5e-3, tuned on SmolLM2 and 5x the MeZO
    lr that already diverged on Gemma; it now takes Gemma's ratio, as the table and the federated clients do."""
    import slimtune.commands.train as command
    from slimtune.settings.commands import DemoSettings
    ran = []
    monkeypatch.setattr(command, "run_train", lambda settings: ran.append(settings))
    monkeypatch.setattr("slimtune.commands.report.make_report", lambda runs, out: None)
    for model in ("smollm2", "gemma3-270m"):
        command.run_demo(DemoSettings.build({"model": model, "out": str(tmp_path / model)}))
    zo = [s.lr for s in ran if s.optimizer == "mezo"]
    assert zo == [5e-3, 1.5e-3]


def test_a_client_round_run_without_the_server_uses_the_lr_the_server_would_send(monkeypatch, demo_paths):
    """local_train read cfg.lr as it came: a FederatedConfig built directly (lr None, the default) reached
    OptimizerArgs(lr=None), which silently takes the single-run table's lr (DP-AdamW + LoRA: 3e-3) instead of the
    clients' 1e-3 the server resolves and sends."""
    import slimtune.federated.client_app as client
    from slimtune.federated.model import build_model, lora_state
    from slimtune.federated.wire import encode_state
    seen = []
    real = client.build_optimizer
    monkeypatch.setattr(client, "build_optimizer", lambda name, model, args, private: seen.append(args.lr) or
                        real(name, model, args, private))
    cfg = make_cfg(demo_paths, lr=None, model="tiny-llama", local_optimizer="dp-adamw", local_steps=1, batch_size=4,
                   bits=8)
    payload, _ = encode_state(lora_state(build_model(cfg)[0]), cfg.bits, cfg.block_size)
    client.local_train(cfg, 0, payload, server_round=1)
    assert seen == [cfg.resolved().lr] == [1e-3]


@pytest.mark.parametrize("key, value", [("lr", "abc"), ("server-lr", [1]), ("server-optimizer", 3)])
def test_a_server_settings_file_value_of_the_wrong_type_names_the_file_and_key(tmp_path, key, value):
    """read_settings checks each value's type against its field's default; the clients' lr defaults to None since
    the per-model lr, so a settings file's `lr = "abc"` (as the server_* settings that default to None) passed it and
    was refused later as '--lr: expected a number', naming neither the file nor its key."""
    import json

    from slimtune import SlimtuneError
    from slimtune.federated.config import read_settings
    path = tmp_path / "server.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(SlimtuneError, match=f"server.json: key '{key}': expected"):
        read_settings(path)
    path.write_text(json.dumps({key: None}))
    assert read_settings(path) == {key.replace("-", "_"): None}  # unset: filled in by resolved()


def test_zotrainers_held_out_check_compares_text_rows_up_to_case_and_spacing():
    """slimtune.hf.shares_rows compared rows exactly: an evaluation set holding a training row upper-cased or
    re-spaced passed as held-out, where the CLI and the federated checks refuse it. Token ids compare as they are."""
    from slimtune.hf import shares_rows
    train = [{"text": "a lovely little film", "label": 1}, {"text": "dull", "label": 0}]
    assert shares_rows(train, [{"text": "A  LOVELY little film ", "label": 1}]) is True
    assert shares_rows(train, [{"text": "a lovely big film", "label": 1}]) is False
    assert shares_rows([{"input_ids": [1, 2, 3]}], [{"input_ids": [1, 2, 3]}]) is True
    assert shares_rows([{"input_ids": [1, 2, 3]}], [{"input_ids": [1, 2]}]) is False


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink"])
def test_a_private_run_refuses_its_training_file_as_eval_data_however_it_is_named(tmp_path, demo_paths, monkeypatch,
                                                                                 spelling):
    """One rule (`data.readers.same_source`) for the CLI's early check and the trainer's (the Python API): the training
    file named again, by another relative spelling or through a symlink, is refused for a private run, with one
    message, before any step."""
    import shutil

    from typer.testing import CliRunner

    from slimtune import SlimtuneError
    from slimtune.cli import app
    from slimtune.data.readers import EVAL_IS_TRAINING, same_source
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.privacy.accountant import PrivacySpec
    from slimtune.train import TrainConfig, prepare, train

    data = tmp_path / "train.tsv"
    shutil.copy(demo_paths[0], data)
    monkeypatch.chdir(tmp_path)
    if spelling == "symlink":
        (tmp_path / "link.tsv").symlink_to(data)
    evaluation = {"same": str(data), "relative": "./train.tsv", "symlink": "link.tsv"}[spelling]
    assert same_source(str(data), evaluation) and not same_source("hf:" + str(tmp_path), "hf:" + str(tmp_path))
    res = CliRunner().invoke(app, ["train", "--data", str(data), "--eval-data", evaluation, "--model", "tiny-llama",
                                   "--optimizer", "dpzero", "--epsilon", "6", "--steps", "1", "--batch-size", "4",
                                   "--out", str(tmp_path / "cli")])
    assert res.exit_code == 2 and "--eval-data is the training data" in res.output, res.output
    assert not (tmp_path / "cli" / "checkpoint").exists()
    cfg = TrainConfig(out_dir=str(tmp_path / "api"), train_data=str(data), eval_data=evaluation, model="tiny-llama",
                      optimizer="dpzero", optim=OptimizerArgs(), peft=PeftSettings("lora"), steps=1, batch_size=4,
                      privacy=PrivacySpec(target_epsilon=6.0), progress=False)
    with pytest.raises(SlimtuneError, match="training data") as refused:
        train(prepare(cfg))
    assert str(refused.value) == EVAL_IS_TRAINING

"""Review 67: adversarial review of the fixes committed since ecc6205 (planner, strict run configs, per-example
losses, tied weights, failed private steps, federated applicability and deployment cleanup)."""

import json
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
from transformers import LlamaConfig, LlamaForTokenClassification, default_data_collator  # noqa: E402,E501

from slimtune import SlimtuneError  # noqa: E402
from slimtune.hf import ZOArguments, ZOTrainer  # noqa: E402
from slimtune.models.loading import tiny_tokenizer  # noqa: E402

from conftest import DEMO, hf_args  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = [line.split("\t")[0] for line in (DEMO / "sst2_demo_train.tsv").read_text().splitlines()[1:]]
PRIVATE = dict(optimizer="dpzero", epsilon=2.0, lr=1e-3, eps=1e-2)


pytestmark = pytest.mark.usefixtures("hf_offline")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(ROWS)


# -- hf.py per_example_losses ---------------------------------------------------------------------------------------
def test_private_token_classifier_loss_is_not_shifted_by_one_token(tmp_path, tok):
    """A token classifier (NER/POS: LlamaForTokenClassification, BertForTokenClassification) has 3-D logits and one
    label per token, unshifted (transformers' ForTokenClassification loss). per_example_losses treats every 3-D
    non-encoder-decoder output as a causal LM and compares logits[t] with labels[t + 1]: a private run trains each
    token's tag on its neighbour's, silently. Either refuse it before any work, or compare unshifted."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id, num_labels=5)
    model = LlamaForTokenClassification(config)
    enc = tok(ROWS[:32], padding="max_length", max_length=12, truncation=True)
    labels = [[(i + j) % 5 for j in range(12)] for i in range(32)]
    data = datasets.Dataset.from_dict({**enc, "labels": labels})
    try:
        trainer = ZOTrainer(model=model, args=hf_args(tmp_path), train_dataset=data,
                            data_collator=default_data_collator, zo_args=ZOArguments(**PRIVATE))
    except SlimtuneError:
        return  # refused clearly, before any work
    batch = default_data_collator([data[i] for i in range(1)])  # one example: its mean loss is the model's own
    model.eval()  # (lead) its classifier dropout would make two forwards differ; ZO steps run in eval mode
    with torch.no_grad():
        own = model(**batch).loss
        private = trainer.per_example_losses(model, batch)
    assert torch.allclose(private, own.reshape(1), atol=1e-5), (private, own)


# -- settings/train.py from_run_config: runs this repo wrote ----------------------------------------------------------
OLD_RUN = REPO / "benchmarks" / "results" / "before-prompt-change" / "defaults" / "dpzero-lora-eps2" / "config.json"


def test_run_config_with_null_svfit_relative_is_read_as_unset(tmp_path, monkeypatch):
    """16 of this repo's own runs (benchmarks/results/**/config.json, e.g. before-prompt-change/defaults/*) record
    "peft": {"svfit_relative": null} (older versions had no default). settings/cli.py NULL_IS_UNSET reads that null as
    unset in a flat settings file, but a run's config.json takes from_run_config, which keeps None: `train --config
    RUN/config.json` and `train --resume --out RUN` stop with "setting 'svfit_relative': null is not allowed"."""
    from typer.testing import CliRunner

    from slimtune.cli import app
    stored = json.loads(OLD_RUN.read_text())
    assert stored["peft"]["svfit_relative"] is None  # the record as the repo holds it
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(stored))
    monkeypatch.chdir(REPO)  # its data paths are relative to the repo
    res = CliRunner().invoke(app, ["train", "--config", str(run / "config.json"), "--out", str(tmp_path / "new"),
                                   "--dry-run"])
    assert res.exit_code == 0, res.output


# -- settings/federate.py: `flwr run .` configs -----------------------------------------------------------------------
def test_flwr_run_private_round_may_meet_a_nodes_pinned_local_dp_delta(monkeypatch):
    """docs/how-to/federated.md: a deployment node pins its privacy floor with --node-config (local-optimizer, noise,
    local-dp-delta...) and refuses any round asking for a larger delta; the node's ledger and the epsilon it prints
    use local-dp-delta. Under `flwr run .` the run config always carries pyproject's `data` default, so 231146b's
    local_dp_accounted (`not s.data` as 'a deployment') refuses `--run-config "local-optimizer='dp-adamw'
    local-dp-noise=2.0 local-dp-delta=1e-6"`: the one value that lets such a node train is refused at the server."""
    import tomllib

    from slimtune.federated.config import FederatedConfig
    monkeypatch.chdir(REPO)
    app_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    run_config = {**app_config, "local-optimizer": "dp-adamw", "local-dp-noise": 2.0, "local-dp-delta": 1e-6}
    cfg = FederatedConfig.from_flower(run_config, None)
    cfg.resolved().validate()  # what run_server's check_run runs first


# -- report/memory_model.py: the new sgd / dp-sgd rows ----------------------------------------------------------------
def test_sgd_with_momentum_is_planned_with_its_momentum_buffer(tmp_path, tok, monkeypatch):
    """722156e plans sgd and dp-sgd with no optimizer state ({"sgd": 0, "dp-sgd": 0}), but `train --optimizer sgd
    --momentum 0.9` (momentum applies to sgd and dp-sgd) keeps torch SGD's momentum_buffer, one value per trainable
    value (SmolLM2 full fine-tuning: +513 MB): check_memory passes a run whose buffer does not fit the memory left."""
    from slimtune.models.loading import tiny_model
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.report import memory_model as mm
    from slimtune.train.trainer import TrainConfig, check_memory
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id, seed=0)
    monkeypatch.setattr(mm, "held_mb", lambda *a, **k: 0.0)
    peak, trainable = mm.predict_run_mb(model, "sgd", "none", 8, 4, 32, "cpu",
                                        runtime=mm.runtime_mb(model, "cpu", None, 0.0))
    momentum_mb = trainable * 4 / mm.MB
    monkeypatch.setattr(mm, "budget_mb", lambda *a, **k: peak + momentum_mb / 2)  # room for half the buffer
    config = TrainConfig(out_dir=str(tmp_path / "run"), train_data="x.tsv", model="tiny-llama", optimizer="sgd",
                         optim=OptimizerArgs(lr=1e-3, momentum=0.9), peft=PeftSettings("none"), batch_size=4,
                         max_length=32, device="cpu")
    with pytest.raises(SlimtuneError, match="predicted to peak"):
        check_memory(config, model, tok, None)


def test_the_deployment_passes_its_flower_processes_absolute_paths(tmp_path, monkeypatch):
    """(lead, from review 67's notes) The deployment script's Flower processes run in its work folder: a relative
    --eval-data (or a checkpoint --model) passed the script's checks and then named nothing on the server."""
    import shutil

    from slimtune.federated.deployment import deployment_config
    demo = REPO / "slimtune" / "data" / "demo"
    shutil.copy(demo / "sst2_demo_dev.tsv", tmp_path / "dev.tsv")
    shutil.copy(demo / "sst2_demo_train.tsv", tmp_path / "train.tsv")
    monkeypatch.chdir(tmp_path)
    cfg = deployment_config(2, Path("train.tsv"), Path("dev.tsv"), 1, Path("run"), "tiny-llama")
    assert Path(cfg.eval_data).is_absolute() and Path(cfg.eval_data) == tmp_path / "dev.tsv", cfg.eval_data

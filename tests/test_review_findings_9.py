"""Review 9: the newer training surfaces (hizoo, hizoo-l, sparse-mezo, fzoo, hybrid with --fo-layers, --perturbation,
resume, the Python API and slimtune.hf) as a careless user drives them. Each test fails on the code it was written
against; the report beside it says what to change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import slimtune
from slimtune import SlimtuneError
from slimtune.cli import app

from conftest import DEMO

TRAIN = str(DEMO / "sst2_demo_train.tsv")
runner = CliRunner()
TINY = ["--model", "tiny-llama", "--steps", "2", "--batch-size", "4", "--quiet", "--eval-every", "0", "--r", "2"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "Traceback" not in res.output
    return " ".join(lines[0].split())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 2-step hizoo run and a finished 2-step hybrid run (default --fo-layers) to resume from."""
    root = tmp_path_factory.mktemp("runs9")
    for name in ("hizoo", "hybrid"):
        res = cli("train", "--data", TRAIN, *TINY, "--optimizer", name, "--out", root / name)
        assert res.exit_code == 0, res.output
    return root


def copy_run(runs, name, tmp_path) -> Path:
    target = tmp_path / name
    shutil.copytree(runs / name, target)
    return target


@pytest.fixture
def lora_model():
    from slimtune.data import get_task, read_examples
    from slimtune.models import load_model_and_tokenizer

    examples = read_examples(TRAIN, get_task("sst2"))
    model, tok = load_model_and_tokenizer("tiny-llama", texts=[e.prompt for e in examples])
    torch.manual_seed(0)
    model = slimtune.apply_peft(model, "lora", r=2)
    model.eval()
    batch = tok([e.prompt for e in examples[:4]], return_tensors="pt", padding=True)
    return model, batch


# -- resume -----------------------------------------------------------------------------------------------------------
def test_a_checkpoint_old_left_by_a_save_interrupted_in_its_cleanup_does_not_break_every_later_save(runs, tmp_path):
    """A second Ctrl-C while save_checkpoint removes checkpoint.old (after the new checkpoint is in place) leaves a
    non-empty checkpoint.old; the next save's os.replace(checkpoint, checkpoint.old) then fails with ENOTEMPTY:
    `--resume` trains, then dies with 'internal error (OSError: [Errno 39] Directory not empty)', exit 1, every time."""
    out = copy_run(runs, "hizoo", tmp_path)
    (out / "checkpoint.old").mkdir()
    shutil.copy(out / "checkpoint" / "trainer_state.json", out / "checkpoint.old" / "trainer_state.json")
    res = cli("train", "--resume", "--out", out, "--steps", "3", "--quiet")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 3


def test_resuming_a_hybrid_run_with_the_fo_layers_it_trained_with_is_not_refused(runs, tmp_path):
    """config.json stores fo_layers null (never resolved), so repeating the value the run used (the default 2) is
    refused as 'optim.fo_layers: None -> 2'; the same for --sparsity, --mask-every, --fo-clip."""
    out = copy_run(runs, "hybrid", tmp_path)
    res = cli("train", "--resume", "--out", out, "--steps", "3", "--quiet", "--fo-layers", "2")
    assert res.exit_code == 0, res.output


def test_resuming_with_another_optimizer_names_the_optimizer_not_a_flag_the_user_never_gave(runs, tmp_path):
    """`--resume --optimizer mezo` on a hizoo run said '--hessian-smooth is a setting of hizoo, ..., not of
    --optimizer mezo' (the run's stored value, not given by the user) instead of the refused difference."""
    out = copy_run(runs, "hizoo", tmp_path)
    message = one_line_error(cli("train", "--resume", "--out", out, "--steps", "3", "--quiet", "--optimizer", "mezo"))
    assert "--hessian-smooth" not in message
    assert "hizoo" in message and "mezo" in message and "optimizer" in message


# -- flags silently ignored or accepted without sense ----------------------------------------------------------------
def test_fzoo_honours_or_refuses_an_explicit_gaussian_perturbation(lora_model):
    """build_optimizer turns perturbation 'gaussian' into 'rademacher' for fzoo ("FZOO's own choice"), so an explicit
    `--perturbation gaussian` / `slimtune.FZOO(perturbation="gaussian")` is silently ignored and config.json records
    'gaussian' for a run that drew Rademacher directions."""
    from slimtune.optim import build_optimizer
    from slimtune.optim.defaults import resolve
    from slimtune.settings.train import TrainSettings

    model, _ = lora_model
    try:
        opt = slimtune.FZOO(model, perturbation="gaussian")
    except SlimtuneError:
        opt = None
    assert opt is None or opt.impl.source.name == "gaussian"
    values = {"data": TRAIN, "model": "tiny-llama", "optimizer": "fzoo", "perturbation": "gaussian"}
    try:
        settings = TrainSettings.build(values, set(values))
    except SlimtuneError:
        return
    config = settings.to_config()
    resolve(config)
    assert build_optimizer("fzoo", model, config.optim).source.name == config.optim.perturbation


def test_hybrid_with_every_trainable_parameter_on_top_does_not_silently_drop_the_zo_settings(tmp_path):
    """tiny-llama has 2 blocks: `--fo-layers 2` with LoRA puts every trainable value under AdamW (Hybrid: 'plain
    AdamW at one forward per step'), and `--eps 0.5` (or --perturbation pool) is accepted and never used."""
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "hybrid", "--fo-layers", "2", "--eps", "0.5",
              "--out", tmp_path / "out")
    message = one_line_error(res)
    assert "--fo-layers" in message or "--eps" in message


def test_fo_layers_beyond_the_models_blocks_is_refused_before_the_output_is_created(tmp_path):
    """The check lives in the optimizer's construction, after the run directory is claimed: the refused run leaves
    OUT/.lock and a status.json saying 'failed'."""
    out = tmp_path / "out"
    message = one_line_error(cli("train", "--data", TRAIN, *TINY, "--optimizer", "hybrid", "--fo-layers", "5",
                                 "--out", out))
    assert "--fo-layers 5" in message
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_fo_lr_zero_is_refused_like_lr_zero():
    """--lr must be > 0, but --fo-lr 0 is accepted: the top blocks are backpropagated every step and never move."""
    from slimtune.settings.train import TrainSettings

    values = {"data": TRAIN, "model": "tiny-llama", "optimizer": "hybrid", "fo_lr": 0.0}
    with pytest.raises(SlimtuneError, match="--fo-lr"):
        TrainSettings.build(values, set(values))


def test_sparse_mezo_leaves_the_asked_fraction_unperturbed_on_a_fresh_lora_adapter(lora_model):
    """The mask is 1[|w| <= quantile]; LoRA's B starts at 0 (every value ties with the quantile), so with sparsity
    0.75 every B value is perturbed (mask mean 1.0), 57% of the trainable values in all instead of 25%, until the
    first mask refresh (50 steps). SVFit's relative scales (all 1.0) tie the same way."""
    from slimtune.zo.sparse import unpack_mask

    model, batch = lora_model
    opt = slimtune.SparseMeZO(model, sparsity=0.75)
    opt.step(lambda: model(**batch, labels=batch["input_ids"]).loss)
    fractions = {n: float(unpack_mask(m, 0, p.numel()).float().mean())
                 for m, (n, p, _) in zip(opt.impl.masks, opt.impl.params)}
    assert all(f <= 0.3 for f in fractions.values()), fractions


# -- Python API and slimtune.hf ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_loss", [lambda loss: float(loss), lambda loss: loss.detach()],
                         ids=["float", "detached"])
def test_hybrid_names_a_closure_whose_loss_has_no_graph(lora_model, make_loss):
    """The API accepts a float from the closure (it is wrapped in a tensor), but Hybrid backpropagates through it:
    'RuntimeError: element 0 of tensors does not require grad and does not have a grad_fn' from autograd."""
    model, batch = lora_model
    opt = slimtune.Hybrid(model, fo_layers=1)
    with pytest.raises(SlimtuneError, match="slimtune.Hybrid"):
        opt.step(lambda: make_loss(model(**batch, labels=batch["input_ids"]).loss))


def test_hybrid_errors_name_the_python_argument_not_the_cli_flag(lora_model):
    """slimtune.Hybrid(model, fo_layers=9) said '--fo-layers 9: must be between 1 and the model's 2 blocks' and
    slimtune.Hybrid(nn.Linear(3, 3)) '--optimizer hybrid: cannot find this model's transformer blocks'."""
    model, _ = lora_model
    with pytest.raises(SlimtuneError) as too_many:
        slimtune.Hybrid(model, fo_layers=9)
    assert "slimtune.Hybrid" in str(too_many.value) and "fo_layers" in str(too_many.value)
    with pytest.raises(SlimtuneError) as no_blocks:
        slimtune.Hybrid(torch.nn.Linear(3, 3))
    assert str(no_blocks.value).startswith("slimtune.Hybrid")


def test_zotrainer_hybrid_clips_its_backprop_gradient_by_max_grad_norm_or_refuses_it(tmp_path):
    """transformers clips gradients at max_grad_norm (default 1.0) after training_step; a hybrid ZOTrainer has
    already applied AdamW inside the step, so the setting is silently ignored: max_grad_norm=1e-6 and 0 (off) give
    bit-identical weights, while the logs show a grad_norm as if it had been clipped."""
    pytest.importorskip("datasets")
    from test_hf import model_for, tokenizer, trainable, trainer_for
    from slimtune.hf import ZOArguments

    weights = []
    for max_grad_norm in (0.0, 1e-6):
        tok = tokenizer()
        try:
            trainer = trainer_for(tmp_path / str(max_grad_norm), model_for(tok, "lora"), tok,
                                  ZOArguments(optimizer="hybrid", fo_layers=1), max_steps=2,
                                  max_grad_norm=max_grad_norm)
        except SlimtuneError:
            assert max_grad_norm  # refusing a clip it cannot apply is fine; refusing "off" is not
            return
        trainer.train()
        weights.append(trainable(trainer.model))
    assert not all(torch.equal(a, b) for a, b in zip(*weights))


def test_a_run_recorded_before_its_settings_were_resolved_resumes_with_what_it_trained_with(tmp_path):
    """config.json files written before review 9 record null for hybrid's fo_layers / fo_clip and sparse-mezo's
    sparsity / mask_every, and FZOO's perturbation 'gaussian' and n_spsa 1 although it drew 8 Rademacher directions:
    read as trained, so resuming such a run (SST-2's fzoo-lora row, the E2E hybrid row) is neither refused nor
    changed."""
    from slimtune.train.resume import read_stored

    def stored(optimizer, **optim):
        (tmp_path / optimizer).mkdir()
        (tmp_path / optimizer / "config.json").write_text(json.dumps({"optimizer": optimizer, "optim": optim}))
        return read_stored(tmp_path / optimizer)["optim"]

    assert stored("fzoo", n_spsa=1, perturbation="gaussian") == {"n_spsa": 8, "perturbation": "rademacher"}
    assert stored("dphybrid", fo_layers=None, fo_clip=None, perturbation="gaussian") == {
        "fo_layers": 2, "fo_clip": 1.0, "perturbation": "gaussian"}
    assert stored("sparse-mezo", sparsity=None, mask_every=None) == {"sparsity": 0.75, "mask_every": 50}
    assert stored("mezo", fo_layers=None) == {"fo_layers": None}

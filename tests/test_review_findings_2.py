"""Findings of a second adversarial review (after 6e778c2). Each test reproduces one bug and FAILED on the code it was
written against; its docstring states the finding and the behaviour expected instead. Tiny models only, seconds each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimtune import SlimtuneError
from test_review_findings import DEV, TRAIN, cli  # noqa: F401  (the first review's helpers)


def one_line_error(res, needle: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert needle in " ".join(res.output.split()), res.output


# -- hostile federation ----------------------------------------------------------------------------------------------
@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _fed(**kw):
    from test_federated import make_cfg
    return make_cfg((TRAIN, DEV), **kw)


@pytest.mark.parametrize("reshape", ["row", "column", "codes-2d"])
def test_a_quantized_reply_with_misshaped_arrays_is_rejected_not_a_server_crash(task_identity, reshape):
    """HIGH (one client takes the server down). With --upload-bits < 32 a reply carries `NAME::codes` (uint8) and
    `NAME::scales` (fp16); replies.py checked their dtypes and *total sizes* only. A scales array of the right size but
    shape (1, k) made `dequantize` broadcast [k, block] against [1, 1, k] -> RuntimeError, and parse_reply's caller
    caught ValueError only, so the exception escaped `aggregate_train` and ended the server's run (every honest
    client's work lost). A (k, 1) scales array was accepted and broadcast to a [k, k, block] tensor (memory blow-up
    quadratic in the tensor's size, a garbage decoded update); 2-D codes were accepted.
    Expected: any array whose shape is not exactly what the server sent is a rejected reply (a log line), and nothing
    a reply holds can raise anything but a rejection."""
    from test_federated import instructions, reply

    from slimtune.federated.strategy import FedLPP
    from slimtune.federated.wire import encode_state

    theta = {"l.lora_A.weight": torch.randn(2, 16), "l.lora_B.weight": torch.randn(200, 2)}
    strategy = FedLPP(_fed(bits=4, upload_bits=4), theta)
    msgs = instructions(strategy)
    honest, _ = encode_state({k: 0.01 * torch.ones_like(v) for k, v in theta.items()}, 4, strategy.cfg.block_size)
    bad = dict(honest)
    for name, value in honest.items():
        if reshape == "row" and name.endswith("scales"):
            bad[name] = value.reshape(1, -1)
        if reshape == "column" and name.endswith("scales"):
            bad[name] = value.reshape(-1, 1)
        if reshape == "codes-2d" and name.endswith("codes"):
            bad[name] = value.reshape(1, -1)
    _, metrics = strategy.aggregate_train(1, [reply(msgs[0], honest, 10, 11), reply(msgs[1], bad, 10, 12)])
    assert metrics["replies"] == 1 and metrics["rejected"] == 1


def test_an_empty_zo_seeds_reply_does_not_crash_the_server(task_identity):
    """HIGH (one client takes the server down). A zo-seeds reply may hold 0..local_steps (seed, scalar) pairs. When the
    round's accepted replies and the window's earlier rounds hold no scalar at all (round 1, one client replying with
    empty arrays), `InfluenceBound.scalar_cap` took the median of an empty list: IndexError out of aggregate_train,
    the server's run ends. Expected: an empty reply is a zero update (or rejected); the round completes."""
    from test_federated import instructions, reply

    from slimtune.federated.model import build_model, lora_state
    from slimtune.federated.server_app import make_replay
    from slimtune.federated.strategy import FedLPP

    cfg = _fed(bits=32, mode="zo-seeds", local_steps=3, lr=1e-2)
    model = build_model(cfg)[0]
    theta = lora_state(model)
    strategy = FedLPP(cfg, theta, replay=make_replay(model, cfg))
    msgs = instructions(strategy)
    empty = reply(msgs[0], {"seeds": np.zeros(0, np.int64), "grads": np.zeros(0, np.float32)}, 10, 11)
    _, metrics = strategy.aggregate_train(1, [empty])
    assert metrics["replies"] + metrics["rejected"] == 1
    assert all(torch.equal(strategy.theta[k], theta[k].float()) for k in theta)


# -- privacy ---------------------------------------------------------------------------------------------------------
def test_k_shot_is_refused_for_private_runs():
    """MEDIUM (the guarantee does not hold for the data the user gave). `--k-shot k` keeps k rows per class drawn
    with `random.Random(seed).sample(pool, k)` from the training file, and the accountant then counts the k-shot
    subset as the dataset. The selection is not stable: removing one row that was *not* selected shifts the pool,
    and the public seed then selects a different subset (on the demo file, removing one unselected row changes
    most of the selected rows). Two neighbouring training files thus give training sets that differ in many rows,
    so the (epsilon, delta) reported for the subset says nothing about any row of the file (group privacy over up to
    k x classes rows). Expected: a private run refuses --k-shot with one line (make the subset file yourself, or an
    accounted selection)."""
    from slimtune.data import k_shot, read_examples, get_task

    rows = read_examples(TRAIN, get_task("sst2"), "train")
    chosen = k_shot(rows, 8, 0, 2)
    unselected = next(i for i, r in enumerate(rows) if r not in chosen)
    neighbour = k_shot(rows[:unselected] + rows[unselected + 1:], 8, 0, 2)
    assert sum(r not in chosen for r in neighbour) > 2  # the instability that makes the accounting wrong
    one_line_error(cli("train", "--data", TRAIN, "--model", "tiny-llama", "--optimizer", "dpzero", "--k-shot", "8",
                       "--dry-run", "--out", "unused-run"), "--k-shot")


def test_a_non_finite_per_example_gradient_is_clipped_in_dp_sgd():
    """MEDIUM (per-example signal; the sensitivity bound fails). DPZero maps a non-finite per-example difference to 0
    (last review), but DP-SGD / DP-AdamW hand Opacus the per-example gradients as they are: one example whose
    gradient is inf or NaN gives a clip factor C / (inf + 1e-6) = 0 and 0 * inf = NaN, so the noised sum and every
    trained weight become NaN, and the run stops at that step with "the released update ... is not finite". Whether
    a private run dies, and at which step, then reveals whether one row was in a batch (a canary row that overflows,
    e.g. in bf16), at any epsilon. Expected: an example whose per-example gradient is not finite contributes 0 (its
    clipped gradient has norm <= C like every other), so the step equals the step without that example's gradient."""
    from slimtune.optim.first_order import FirstOrderConfig
    from slimtune.privacy.accountant import PrivacySpec
    from slimtune.privacy.dpsgd import DPFirstOrder
    from slimtune.privacy.secret import KeyedNoise, RunKey

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))

    def step(poison: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 1))
        spec = PrivacySpec(delta=1e-5, noise_multiplier=1.0, clip=1.0)
        opt = DPFirstOrder(model, FirstOrderConfig(lr=0.1), "sgd", spec, 1.0, 3,
                           KeyedNoise(RunKey(b"k" * 32), 0, 1))

        def closure():
            losses = model(x).squeeze(-1) ** 2
            scale = torch.tensor([1.0, float("inf") if poison else 0.0, 1.0])
            return losses * scale

        opt.step(closure)
        return model[0].weight.detach().clone()

    poisoned, without = step(True), step(False)
    assert torch.isfinite(poisoned).all(), "one example's non-finite gradient made the released update NaN"
    assert torch.allclose(poisoned, without)


# -- settings --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [["--patience", "2"], ["--eval-max", "5"], ["--best-metric", "loss"],
                                   ["--save", "best"]])
def test_evaluation_settings_with_evaluation_off_are_refused(flags):
    """LOW (flag silently ignored). `--eval-every 0` turns evaluation off (no step-0, periodic or final evaluation),
    yet `--patience`, `--eval-max`, `--best-metric` and an explicit `--save best` were accepted with --eval-data and
    did nothing (early stopping never triggers; the last adapter is saved, not the best). Their applicability rule
    was "runs with --eval-data". Expected: one-line error naming the flag, exit 2, before any work."""
    one_line_error(cli("train", "--data", TRAIN, "--eval-data", DEV, "--model", "tiny-llama", "--eval-every", "0",
                       *flags, "--dry-run", "--out", "unused-run"), flags[0])


@pytest.mark.parametrize("optimizer", ["mezo", "dpzero", "hybrid"])
def test_lora_dropout_with_a_zeroth_order_optimizer_is_refused(optimizer):
    """LOW (flag silently ignored). Zeroth-order steps (and the hybrid's) run the model with dropout off — both
    measurements of a step must see the same function (trainer: `model.train(not zeroth_order)`) — so
    `--lora-dropout 0.1` with mezo, dpzero, ..., hybrid was accepted and had no effect. Expected: one-line error."""
    one_line_error(cli("train", "--data", TRAIN, "--model", "tiny-llama", "--optimizer", optimizer,
                       "--lora-dropout", "0.1", "--dry-run", "--out", "unused-run"), "--lora-dropout")


@pytest.mark.parametrize("name,text", [("dup.yaml", "lr: 1.0e-3\nsteps: 3\nlr: 0.5\n"),
                                       ("dup.json", '{"lr": 0.001, "steps": 3, "lr": 0.5}'),
                                       ("alias.yaml", "batch-size: 4\nbatch_size: 8\n")])
def test_a_config_file_key_given_twice_is_refused(tmp_path, name, text):
    """LOW-MEDIUM (config-file key silently ignored). PyYAML's safe_load and json.loads keep the *last* of two equal
    keys without a word, and `batch-size` / `batch_size` (both accepted spellings) were folded into one setting
    the same way: a config file that sets `lr` twice (an edit appended below an old line) trained with whichever
    came last, and the first value was silently dropped. Expected: one-line error naming the file and the key."""
    config = tmp_path / name
    config.write_text(text)
    one_line_error(cli("train", "--config", config, "--data", TRAIN, "--model", "tiny-llama", "--dry-run", "--out",
                       tmp_path / "run"), "twice")


@pytest.mark.parametrize("flags,named", [(["--lr", "1e-3", "--lr", "0.5"], "--lr"),
                                         (["--steps=3", "--steps", "4"], "--steps"),
                                         (["--svfit-relative", "--svfit-absolute"], "--svfit-absolute")])
def test_a_flag_given_twice_is_refused(flags, named):
    """LOW (flag silently ignored; reported by the second review, fixed after it). click keeps the last of two
    equal options: `--lr 1e-3 ... --lr 0.5` (a flag pasted twice into a long command line) trained at 0.5 without a
    word. Expected: one-line error naming the flag, exit 2, before any work. A value that looks like a flag is a
    value (checked below)."""
    one_line_error(cli("train", "--data", TRAIN, "--model", "tiny-llama", *flags, "--dry-run", "--out",
                       "unused-run"), named)


def test_an_option_value_that_looks_like_the_flag_is_not_a_repeat(tmp_path):
    """The scan skips each option's value: `--template '--lr {text}'`-like values are not counted as flags."""
    from slimtune.settings.cli import refuse_repeated_options
    from typer.main import get_command
    from slimtune.cli import app
    train = get_command(app).commands["train"]
    refuse_repeated_options(train, ["--out", "--lr", "--lr", "1e-3"])  # --out's value is "--lr": one --lr
    with pytest.raises(Exception, match="--lr given twice"):
        refuse_repeated_options(train, ["--lr", "1e-3", "--lr", "2e-3"])


# -- Hugging Face trainer: held-out evaluation, whichever way it is given ------------------------------------------
def test_private_zotrainer_refuses_evaluate_on_the_training_rows(tmp_path, monkeypatch):
    """MEDIUM (reported by the second review, fixed after it). The held-out check ran only on the constructor's
    eval_dataset: `trainer.evaluate(eval_dataset=train_ds)` on a private ZOTrainer computed and logged the un-noised
    loss of the private rows. Expected: the same one-line SlimtuneError as in the constructor."""
    from test_review_findings import _hf_private_trainer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trainer = _hf_private_trainer(tmp_path, max_steps=2)
    with pytest.raises(SlimtuneError, match="shares rows"):
        trainer.evaluate(eval_dataset=trainer.train_dataset)
    with pytest.raises(SlimtuneError, match="shares rows"):
        trainer.evaluate(eval_dataset=trainer.train_dataset.select(range(3)))


def test_private_zotrainer_refuses_an_eval_dataset_it_cannot_compare():
    """A dataset that cannot be indexed row by row was taken as "no common row": a private run then evaluated on
    data nobody checked. Expected: refused (unknown = not shown to be held out)."""
    from slimtune.hf import shares_rows

    class Stream:
        def __iter__(self):
            yield {"input_ids": [1, 2]}

    assert shares_rows([{"input_ids": [1, 2]}], Stream()) is None
    assert shares_rows([{"input_ids": [1, 2]}], [{"input_ids": [3]}]) is False

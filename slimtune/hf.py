"""Zeroth-order training inside Hugging Face's `Trainer` and TRL's trainers: swap the class, pass `zo_args`.

    from slimtune.hf import ZOArguments, ZOTrainer
    trainer = ZOTrainer(model=model, args=TrainingArguments(...), train_dataset=ds, data_collator=collator,
                        zo_args=ZOArguments(optimizer="mezo"))          # lr, eps: slimtune's defaults table
    trainer.train()

    from trl import SFTTrainer
    class ZOSFTTrainer(ZOTrainerMixin, SFTTrainer): ...                  # TRL gets the same

What changes: `training_step` takes one slimtune optimizer step on the batch instead of forward + backward. The
model is put in `eval()` mode for the step (every forward of a step must see the same function: no dropout, as in
MeZO's reference trainer) and back in training mode after it, the closure evaluates the batch's loss with the trainer's own `compute_loss` under
`torch.inference_mode()`, and the optimizer perturbs, measures and updates the trainable weights in place (no
autograd graph, no gradients). The optimizer is a `torch.optim.Optimizer` (slimtune/optimizers.py), so transformers'
learning-rate schedule drives it, its state goes into every checkpoint's optimizer.pt, and `resume_from_checkpoint`
continues the same trajectory (the perturbation seeds follow the step counter it restores).

What stays Hugging Face's: datasets, collators, PEFT models (peft or TRL's `peft_config`), evaluation, callbacks,
`report_to`, `save_model`, checkpoints and their rotation.

Settings (`ZOArguments`): the optimizer's name and its settings, with `slimtune train`'s names and checks; a setting
left at None takes the optimizer's default from slimtune's table for the model's kind. The learning rate is
`zo_args.lr`, else `TrainingArguments.learning_rate` when you changed it from its default, else the table's;
weight decay is `TrainingArguments.weight_decay`; the seed of the perturbations is `zo_args.seed`, else
`TrainingArguments.seed`. Gradient accumulation, several processes, DeepSpeed and FSDP are refused (a ZO step uses
one batch's losses; data-parallel ZO is `slimtune train` under torchrun), and so is, by name, every setting a ZO step
cannot honour (`NOT_HONOURED`: fp16, gradient_checkpointing, optim, ...); `adam_beta1/2` and `adam_epsilon` set the
hybrids' top-block AdamW.

Private training (`optimizer="dpzero"`, `"dplozo"`, `"dphizoo"` or `"dphybrid"`): batches are Poisson samples drawn from a key that
exists only in the optimizer's memory (each example joins each step with probability batch_size / N; batch sizes are
random, possibly 0), the closure returns one loss per example (each example's mean token cross-entropy over its
labels, `ZOTrainerMixin.per_example_losses`), and the noise is calibrated at the start of `train()` for its
`max_steps`. The training loss and speed of private batches are not released: they are left out of the logs (which
carry `epsilon` and the noisy `projected_grad` instead), and the progress bar counts steps without a clock. Resuming a private run from a checkpoint is refused (the key
is not saved anywhere, so its noise and batches cannot be continued); run `slimtune train` for resumable private runs.
"""

from __future__ import annotations

import inspect
import json
import numbers
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback

from slimtune import SlimtuneError
from slimtune.optim.methods import METHODS, mechanism_refusal
from slimtune.optimizers import OPTIMIZERS, PrivateOptimizer, ZerothOrderOptimizer, peft_kind, table_row
from slimtune.privacy.withhold import silenced

# Trainer settings a zeroth-order step cannot honour: refused by name when one differs from its default (a
# TrainingArguments field's own default; None for a Trainer argument). (argument, the runs it concerns: "all",
# "zeroth-order" (not the hybrids, whose top blocks' AdamW honours it) or "private", why)
NO_WARMUP = ("constant", "reduce_lr_on_plateau")  # transformers' schedules that ignore num_warmup_steps

NOT_HONOURED = (
    ("fp16", "all", "a zeroth-order step runs no backward for fp16's loss scaler to scale (accelerate's GradScaler "
     "fails at the first step, the hybrids' included): use bf16=True, or fp32"),
    ("gradient_checkpointing", "all", "the step runs the model in eval() mode, where checkpointing is off, and with "
     "a hybrid it makes backward run through every block below the top ones: leave it off (a ZO step keeps no "
     "activations)"),
    ("optim", "all", "the optimizer is ZOArguments.optimizer (transformers' own optimizers: use Trainer)"),
    ("optim_args", "all", "the optimizer is ZOArguments.optimizer; give its settings in ZOArguments"),
    ("optimizer_cls_and_kwargs", "all", "the optimizer is ZOArguments.optimizer; give its settings in ZOArguments"),
    ("adam_beta1", "zeroth-order", "a zeroth-order optimizer has no Adam moments (the hybrids' AdamW uses it)"),
    ("adam_beta2", "zeroth-order", "a zeroth-order optimizer has no Adam moments (the hybrids' AdamW uses it)"),
    ("adam_epsilon", "zeroth-order", "a zeroth-order optimizer has no Adam moments (the hybrids' AdamW uses it)"),
    ("neftune_noise_alpha", "all", "NEFTune adds its noise to the embeddings in training mode only, and the step "
     "runs the model in eval() mode"),
    ("debug", "private", "transformers' underflow/overflow detector prints the activations of a private batch"),
    ("label_smoothing_factor", "private", "a private step's loss is per_example_losses' plain cross-entropy (one "
     "loss per example, each clipped)"),
    ("max_grad_norm", "zeroth-order", "a zeroth-order step has no gradient to clip (a private run's per-example "
     "clip is ZOArguments.clip; the hybrids' AdamW honours it)"),
    ("data_seed", "private", "private batches are Poisson samples drawn from the run's secret key, not by "
     "transformers' sampler"),
    ("dataloader_drop_last", "private", "private batches are Poisson samples drawn from the run's secret key, each "
     "step's (an empty or small one included) as drawn"),
    ("train_sampling_strategy", "private", "private batches are Poisson samples drawn from the run's secret key, not "
     "by transformers' sampler"),
    ("dataloader_in_order", "private", "each Poisson batch is drawn for its step and checked against that step's "
     "draw: batches must reach the steps in the order they were drawn"),
    ("auto_find_batch_size", "private", "the noise is calibrated for one sampling rate (batch size / dataset size); "
     "a batch halved after an out-of-memory error would be priced at the first"),
)
OFF_WHEN_FALSY = ("max_grad_norm",)  # 0 or None: no clipping, which is what a zeroth-order step does
ACT_WHEN_ON = ("fp16", "gradient_checkpointing", "neftune_noise_alpha", "debug")  # whatever class made them the default

EMPTY_BATCH = "slimtune_empty_batch"  # the collated form of an empty Poisson batch
EXAMPLES = "slimtune_examples"  # how many examples a private batch was collated from (checked, then dropped)


ZO_ALIASES = {"rank": "lozo_rank", "nu": "lozo_nu", "n_perturbations": "n_spsa"}  # field -> the train setting it is


@dataclass
class ZOArguments:
    """The zeroth-order optimizer a `ZOTrainer` uses. None: the optimizer's default (slimtune's defaults table for
    the model's kind, or the method's own default). Names and rules as `slimtune train`'s flags and the
    `slimtune.MeZO` / `slimtune.DPZero` / ... keyword arguments."""

    optimizer: str = "mezo"  # mezo, lozo, lozo-m, fzoo, hizoo, hizoo-l, sparse-mezo, hybrid; private: dpzero, dplozo,
    #                         dphizoo, dphybrid
    lr: float | None = None
    eps: float | None = None
    n_spsa: int | None = None  # mezo, lozo, dpzero, dplozo: directions averaged per step
    perturbation: str | None = None  # gaussian, rademacher, pool
    rank: int | None = None  # lozo, dplozo
    nu: int | None = None  # lozo, dplozo
    momentum: float | None = None  # lozo-m
    n_perturbations: int | None = None  # fzoo
    hessian_smooth: float | None = None  # hizoo, hizoo-l, dphizoo
    sparsity: float | None = None  # sparse-mezo
    mask_every: int | None = None  # sparse-mezo
    fo_layers: int | None = None  # hybrid, dphybrid
    fo_lr: float | None = None  # hybrid, dphybrid
    fo_clip: float | None = None  # dphybrid: per-example L2 clip of the top part's gradient
    seed: int | None = None  # None: TrainingArguments.seed
    # private optimizers (dpzero, dplozo, dphizoo, dphybrid)
    epsilon: float | None = None  # the budget of the whole run (None: 6 unless noise_multiplier is given)
    delta: float | None = None  # None: 1e-5
    noise_multiplier: float | None = None
    clip: float | None = None
    clipping: str | None = None  # auto, adaptive, fixed
    target_quantile: float | None = None
    clip_lr: float | None = None
    clip_multiplier: float | None = None
    mechanism: str | None = None  # gaussian, laplace
    accountant: str | None = None  # rdp, pld
    warmup_steps: int | None = None  # None: TrainingArguments' warm-up if set, else the defaults table's; 0: none

    def __post_init__(self) -> None:
        from slimtune.settings.python import check_types, python_number
        self.warmup_steps = python_number(self.warmup_steps, "int")  # np.int64(100): the int it stands for
        if self.warmup_steps is not None and (isinstance(self.warmup_steps, bool) or
                                              not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise SlimtuneError(f"ZOArguments: warmup_steps={self.warmup_steps!r}: a whole number of steps, 0 or more")
        checked = check_types("ZOArguments", {f.name: getattr(self, f.name) for f in fields(self)}, ZO_ALIASES)
        for name, value in checked.items():  # the Python values (np.float32(1e-3) -> 1e-3), as the settings take them
            setattr(self, name, value)
        if self.optimizer not in OPTIMIZERS:
            raise SlimtuneError(f"ZOArguments: optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)} "
                                "(first-order optimizers are transformers' own: use Trainer)")
        if self.optimizer == "lozo-m" and self.momentum is not None and self.momentum == 0:
            from slimtune.settings.train import LOZO_M_MOMENTUM
            raise SlimtuneError(LOZO_M_MOMENTUM.format(given="ZOArguments: momentum=0"))
        accepted = self.accepted()
        for name, value in self.given().items():
            if name not in accepted:
                takes = sorted(accepted & {f.name for f in fields(self)})  # ZOArguments' own fields only (weight
                # decay comes from TrainingArguments)
                raise SlimtuneError(f"ZOArguments: {name} is not a setting of optimizer {self.optimizer} (its "
                                    f"settings: {', '.join(takes)})")
        if self.optimizer == "fzoo" and self.n_perturbations is not None:  # the rule slimtune.FZOO applies
            from slimtune.optimizers import FZOO
            FZOO.check_directions("ZOArguments: n_perturbations", self.n_perturbations)

    @property
    def cls(self) -> type[ZerothOrderOptimizer]:
        return OPTIMIZERS[self.optimizer]

    @property
    def private(self) -> bool:
        return issubclass(self.cls, PrivateOptimizer)

    def accepted(self) -> set[str]:
        params = inspect.signature(self.cls.__init__).parameters
        return {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY} - {"dataset_size", "batch_size", "steps"}

    def given(self) -> dict:
        """The optimizer's settings given here (not `optimizer` itself, nor the trainer's `warmup_steps`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("optimizer", "warmup_steps") and getattr(self, f.name) is not None}

    def build(self, model: torch.nn.Module, *, lr: float | None, weight_decay: float, seed: int,
              dataset_size: int | None = None, batch_size: int | None = None,
              steps: int | None = None) -> ZerothOrderOptimizer:
        """The optimizer over `model`'s trainable parameters (private ones calibrated for `steps` Poisson batches of
        expected size `batch_size` out of `dataset_size`)."""
        kwargs = {"weight_decay": weight_decay, "seed": seed, **self.given()}
        if lr is not None and self.lr is None:
            kwargs["lr"] = lr
        if self.optimizer == "lozo-m" and self.momentum is None:
            kwargs["momentum"] = 0.9  # as --optimizer lozo-m
        if self.private:
            kwargs.update(dataset_size=dataset_size, batch_size=batch_size, steps=steps)
        return self.cls(model, **kwargs)


def classification_loss_kind(config, labels: torch.Tensor) -> str:
    """The loss a transformers sequence classifier computes (its forward's own rule): config.problem_type if set,
    else regression for one label, single-label for integer labels, multi-label otherwise."""
    kind = getattr(config, "problem_type", None)
    if kind:
        return kind
    if getattr(config, "num_labels", 2) == 1:
        return "regression"
    return "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"


CAUSAL_HEADS = ("ForCausalLM", "ForConditionalGeneration")  # loss_type of heads whose loss shifts the labels
ALIGNED_HEADS = ("ForTokenClassification", "ForMaskedLM")  # one label per position, compared where it stands
SEQUENCE_HEADS = ("ForSequenceClassification",)
# decoder LM heads whose class names no head transformers' loss mapping knows, and whose own loss shifts the labels
SHIFTING_LM_HEADS = ("GPT2LMHeadModel", "GPT2DoubleHeadsModel", "OpenAIGPTLMHeadModel", "OpenAIGPTDoubleHeadsModel",
                     "CTRLLMHeadModel", "ReformerModelWithLMHead", "ImageGPTForCausalImageModeling")


def prompt_learning(model) -> bool:
    """A peft prompt-learning model (prompt tuning, P-tuning, prefix tuning): its logits start with its virtual
    tokens' positions, which carry no label."""
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, dict) and any(getattr(c, "is_prompt_learning", False) for c in configs.values())


def base_of(model):
    """The transformers model under a peft wrapper (get_base_model) or a DDP one (module)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "module", model)


def loss_alignment(model) -> str | None:
    """How the model's own loss pairs its logits with its labels, for its per-example form: "causal" (logits at t
    against labels at t + 1: a decoder LM), "aligned" (labels where they stand: an encoder-decoder, whose collator
    shifts the decoder's inputs, a token classifier, a masked LM), "sequence" (one label per example), or None (a head
    whose loss per_example_losses does not know: override it)."""
    base = base_of(model)
    config = getattr(base, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "aligned"
    loss_type = getattr(base, "loss_type", None)
    if loss_type in ALIGNED_HEADS:
        return "aligned"
    if loss_type in SEQUENCE_HEADS:
        return "sequence"
    if loss_type in CAUSAL_HEADS or type(base).__name__ in SHIFTING_LM_HEADS:
        return "causal"
    return None  # (XLNet's and XLM's LM heads generate but compare labels in place: not assumed either way)


class ZOTrainerMixin:
    """Turns a `transformers.Trainer` (or a subclass such as TRL's `SFTTrainer`) into a zeroth-order trainer:
    put it first in the bases, `class ZOSFTTrainer(ZOTrainerMixin, SFTTrainer)`, and pass `zo_args=ZOArguments(...)`
    to the constructor (default: MeZO with the table's defaults)."""

    def __init__(self, *args, zo_args: ZOArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.zo_args = zo_args if zo_args is not None else ZOArguments()
        if not isinstance(self.zo_args, ZOArguments):
            raise SlimtuneError(f"zo_args must be a slimtune.hf.ZOArguments, got {type(self.zo_args).__name__}")
        self._zo_last: dict = {}
        self._check_zo_setup()
        if self.zo_args.private:
            self._progress_without_clock()

    # -- settings ---------------------------------------------------------------------------------------------------
    def _check_zo_setup(self) -> None:
        """One-line errors for trainer settings a zeroth-order step cannot honour (before any training): the
        constructor's, and `_check_trainer_settings` (which `train()` runs again)."""
        self._check_trainer_settings()
        if self.optimizer is not None:
            raise SlimtuneError("ZOTrainer: optimizers=(...): the optimizer is built from zo_args (a private one is "
                                "calibrated for the trainer's own Poisson batches and max_steps); give its settings "
                                "in ZOArguments")

    def _check_trainer_settings(self) -> None:
        """The checks of what the trainer holds now (`args`, datasets, collator, loss): in the constructor and again
        at `train()`, since any of them may be set on the trainer in between (`trainer.args.x = ...`)."""
        from slimtune.settings.python import check_keywords, in_python_terms

        args, zo = self.args, self.zo_args
        if args.gradient_accumulation_steps != 1:
            raise SlimtuneError(f"gradient_accumulation_steps={args.gradient_accumulation_steps}: a zeroth-order step "
                                "uses one batch's losses (raise per_device_train_batch_size instead)")
        if args.world_size > 1 or getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled",
                                                                                             False):
            raise SlimtuneError("ZOTrainer runs in one process (no DDP, DeepSpeed or FSDP); for data-parallel "
                                "zeroth-order training use `torchrun -m slimtune.cli train`")
        if zo.lr is not None and self._lr_was_set() and args.learning_rate != zo.lr:
            raise SlimtuneError(f"two learning rates: TrainingArguments.learning_rate={args.learning_rate} and "
                                f"ZOArguments.lr={zo.lr}; set one")
        self._check_not_honoured()
        self._check_warmup_settings()
        self._check_no_lora_dropout()
        # the values the optimizer takes from TrainingArguments, by the rules of `--lr` and `--weight-decay`, named as
        # the user set them (the optimizer built at train() would name its own keywords: "slimtune.MeZO: lr -1")
        check_keywords("ZOTrainer", {"TrainingArguments.learning_rate": args.learning_rate,
                                     "TrainingArguments.weight_decay": args.weight_decay},
                       {"optimizer": zo.optimizer}, {"TrainingArguments.learning_rate": "lr",
                                                     "TrainingArguments.weight_decay": "weight_decay"})
        table_row("ZOArguments", self.model, {"lr": zo.lr if zo.lr is not None else self._trainer_lr(), "eps": zo.eps})
        given = {k: v for k, v in zo.given().items() if k != "n_perturbations"}
        aliases = ZO_ALIASES
        check_keywords("ZOArguments", given, {"optimizer": zo.optimizer, "peft": peft_kind(self.model),
                                              "clipping": zo.clipping or "auto", "accountant": zo.accountant or "rdp"},
                       aliases, explicit=True)
        if zo.private:
            refusal = mechanism_refusal(zo.optimizer, zo.mechanism or "gaussian", zo.n_spsa, zo.clipping or "auto")
            if refusal:  # before any work (the optimizer refuses it too, when train() builds it)
                named = ", ".join(f"{k}={getattr(zo, k)!r}" for k in ("optimizer", "mechanism", "n_spsa", "clipping")
                                  if getattr(zo, k) is not None)
                raise SlimtuneError(in_python_terms(f"ZOArguments({named})", refusal))
            self._check_private_loss()
            dataset = self.train_dataset
            if dataset is not None and (isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__")):
                raise SlimtuneError(f"ZOArguments(optimizer={zo.optimizer!r}): private training samples Poisson "
                                    "batches from a dataset of known size; an iterable dataset cannot be sampled")
            if dataset is not None and not 1 <= self._train_batch_size <= len(dataset):  # (none yet: set before
                # train(), which checks again)
                raise SlimtuneError(f"per_device_train_batch_size={args.per_device_train_batch_size}: a private run's "
                                    "Poisson batches hold each example with probability batch size / dataset size, "
                                    f"so it must be from 1 to the {len(self.train_dataset)} training rows")
            if getattr(args, "packing", False):  # TRL packs the dataset itself, before the trainer sees it
                raise SlimtuneError("packing=True: a packed row holds several examples (and one example can shift "
                                    "every later row), while private training samples and clips one example per "
                                    "row: set packing=False")
            if type(self.data_collator).__name__ == "DataCollatorWithFlattening" or getattr(args, "padding_free",
                                                                                             False) \
                    or getattr(self, "padding_free", False):  # TRL's own attribute (bfd packing sets it)
                raise SlimtuneError("private training clips one loss per example; a padding-free or flattening "
                                    "collator packs several examples into one row: use a padding collator")
            if getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False):
                raise SlimtuneError("include_num_input_tokens_seen counts the tokens of private batches, which is "
                                    "not released by a private run: leave it off")
            if self.eval_dataset is not None:
                self._check_held_out(self.eval_dataset)

    def _check_private_loss(self) -> None:
        """A private step clips `per_example_losses` (one loss per example): a loss the trainer was given another
        way would be silently replaced, so it is refused by name."""
        override = "override per_example_losses for another per-example objective"
        if getattr(self, "compute_loss_func", None) is not None:
            raise SlimtuneError(f"ZOTrainer: compute_loss_func: a private step clips one loss per example, from "
                                f"per_example_losses, and would not call it: {override}")
        if "compute_loss" in vars(self):  # set on the trainer object itself
            raise SlimtuneError(f"ZOTrainer: compute_loss set on the trainer: a private step clips one loss per "
                                f"example, from per_example_losses, and would not call it: {override}")
        owner = next(c for c in type(self).__mro__ if "compute_loss" in vars(c))
        if owner.__module__.split(".")[0] not in ("transformers", "trl"):  # the user's class, wherever in the bases
            raise SlimtuneError(f"ZOTrainer: {owner.__name__}.compute_loss: a private step clips one loss per "
                                f"example, from per_example_losses, and would not call it: {override}")
        if type(self).per_example_losses is ZOTrainerMixin.per_example_losses and loss_alignment(self.model) is None:
            raise SlimtuneError(f"ZOTrainer: {type(base_of(self.model)).__name__}: a private step clips one loss per example and per_example_losses "
                                "knows causal LMs, encoder-decoders, token and sequence classifiers and masked LMs, "
                                f"not this model's head: {override}")
        loss_type = getattr(self.args, "loss_type", None)  # TRL: "nll" (the default) or another objective
        if loss_type not in (None, "nll"):
            raise SlimtuneError(f"ZOTrainer: loss_type={loss_type!r}: a private step's loss is per_example_losses' "
                                f"cross-entropy: {override}")

    def _check_not_honoured(self) -> None:
        """One line naming the first setting of NOT_HONOURED that is set for a run it concerns. Those that act whoever
        set them (ACT_WHEN_ON: TRL's SFTConfig turns gradient checkpointing on by default) are judged against
        transformers' own TrainingArguments defaults, the others against the args class's."""
        from transformers import TrainingArguments
        base = {f.name: f.default for f in fields(TrainingArguments)}
        defaults = {f.name: (base[f.name] if f.name in ACT_WHEN_ON and f.name in base else f.default)
                    for f in fields(type(self.args))}
        kind = METHODS[self.zo_args.optimizer].kind
        for name, runs, why in NOT_HONOURED:
            if runs == "private" and not self.zo_args.private or runs == "zeroth-order" and kind != "zeroth-order":
                continue
            value = getattr(self.args, name) if name in defaults else getattr(self, name, None)
            default = defaults.get(name)
            if value == default or not value and not default:  # gradient_checkpointing=False: its default is None
                continue
            if name in OFF_WHEN_FALSY and not value:
                continue
            value = getattr(value, "value", value)  # optim: an OptimizerNames member
            shown = f"={value!r}" if isinstance(value, (str, int, float)) else ""
            raise SlimtuneError(f"ZOTrainer: {name}{shown}: {why}")

    def _check_held_out(self, evaluation) -> None:
        """A private run evaluates (and predicts) only on rows shown to be held out (its metrics are logged
        un-noised). The evaluation rows are compared at every call (an eval list may gain a training row between two
        evaluations); the training rows' keys are computed once per training dataset (`_training_row_keys`)."""
        if isinstance(evaluation, dict):  # several eval splits: each (a dict's entries may change)
            for split in evaluation.values():
                self._check_held_out(split)
            return
        shared = shares_rows(self.train_dataset, evaluation, self._training_row_keys(), self._pad_id())
        if shared:
            raise SlimtuneError("eval_dataset shares rows with train_dataset: a private run's evaluations would "
                                "be computed on training rows without noise; give held-out data")
        if shared is None:
            raise SlimtuneError("eval_dataset cannot be compared with train_dataset row by row (not indexable): a "
                                "private run evaluates only on data shown to be held out; give a map-style dataset")

    def _pad_id(self) -> int | None:
        """The tokenizer's pad token id (the trainer's processing_class, or its collator's tokenizer), if any."""
        for tokenizer in (getattr(self, "processing_class", None), getattr(self.data_collator, "tokenizer", None)):
            pad = getattr(tokenizer, "pad_token_id", None)
            if isinstance(pad, int):
                return pad
        return None

    def _training_row_keys(self) -> set | None:
        """`training_keys` of the training dataset, kept while it is the same object of the same length (None: not
        indexable)."""
        train = self.train_dataset
        kept = self.__dict__.get("_train_row_keys")
        try:
            if kept is None or kept[0] is not train or kept[1] != len(train):
                with silenced():  # reading every training row (a set_transform tokenizer) may warn about one
                    kept = (train, len(train), training_keys(train, self._pad_id()))
        except (TypeError, KeyError, IndexError, NotImplementedError, AttributeError):
            return None
        self.__dict__["_train_row_keys"] = kept
        return kept[2]

    def _progress_without_clock(self) -> None:
        """A private run's progress bar counts steps only: transformers' bar (tqdm, or the notebook's) shows elapsed
        time, ETA and it/s, which depend on the rows and realised sizes of the Poisson batches."""
        handler = self.callback_handler
        bars = [cb for cb in handler.callbacks if type(cb).__name__ in ("ProgressCallback", "NotebookProgressCallback")]
        for cb in bars:
            handler.remove_callback(cb)
        if bars:
            self.add_callback(StepCountProgress())

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        """Trainer.evaluate; a private run checks the dataset it scores as the constructor's: the one given here, or
        `self.eval_dataset` (or one of its entries, by name) as it is now, which may have been set after construction
        (the training loop's evaluations use it)."""
        if self.zo_args.private:
            scored = self.eval_dataset if eval_dataset is None else eval_dataset
            if isinstance(scored, str) and isinstance(self.eval_dataset, dict):
                scored = self.eval_dataset.get(scored)
            if scored is not None and not isinstance(scored, str):
                self._check_held_out(scored)
        return super().evaluate(eval_dataset, *args, **kwargs)

    def predict(self, test_dataset, *args, **kwargs):
        """Trainer.predict; a private run's predictions are scored and returned un-noised, so only on held-out rows."""
        if self.zo_args.private:
            self._check_held_out(test_dataset)
        return super().predict(test_dataset, *args, **kwargs)

    def _lr_was_set(self) -> bool:
        field = next(f for f in fields(type(self.args)) if f.name == "learning_rate")
        return self.args.learning_rate != field.default

    def _trainer_lr(self) -> float | None:
        """TrainingArguments.learning_rate when it was changed from its default, else None (the table's)."""
        return self.args.learning_rate if self._lr_was_set() else None

    # -- optimizer --------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """The slimtune optimizer (instead of AdamW). Private optimizers are calibrated here, for the run's
        max_steps, which transformers has computed by now."""
        if self.optimizer is None:
            target = self.model if model is None else model
            size = len(self.train_dataset) if self.zo_args.private else None
            self.optimizer = self.zo_args.build(
                target, lr=self._trainer_lr(),
                weight_decay=self.args.weight_decay, seed=self.args.seed if self.zo_args.seed is None else
                self.zo_args.seed, dataset_size=size, batch_size=self._train_batch_size,
                steps=self.state.max_steps if self.zo_args.private else None)
            if METHODS[self.zo_args.optimizer].kind == "hybrid":  # its backprop part clips as transformers' would,
                self.optimizer.impl.config.max_grad_norm = self.args.max_grad_norm or None  # with Adam's settings
                for group in self.optimizer.impl.fo.param_groups:
                    group.update(betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon)
            self._say_table_values()
        return self.optimizer

    def _say_table_values(self) -> None:
        """One warning naming the values taken from slimtune's defaults table (as the CLI prints what it resolved):
        a learning_rate left at transformers' default (5e-05, the tutorials' value) is read as unset."""
        settings, table, given = self.optimizer.settings, [], self.zo_args.given()
        if self.zo_args.lr is None and not self._lr_was_set():
            table.append(f"lr {settings['lr']:g} (TrainingArguments.learning_rate is at transformers' default "
                         f"{self.args.learning_rate:g}, read as unset; set ZOArguments.lr to choose)")
        if self.zo_args.eps is None and settings.get("eps") is not None:
            table.append(f"eps {settings['eps']:g}")
        defaults = getattr(self.optimizer, "defaults_used", None)
        for name, value in getattr(defaults, "extra", ()):  # the method's own (hybrid's fo_lr, HiZOO's alpha, ...)
            if name not in given and settings.get(name) == value:
                table.append(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}")
        if table:
            import warnings
            warnings.warn(f"ZOTrainer: {self.zo_args.optimizer}+{settings['peft']} takes {', '.join(table)} from "
                          "slimtune's defaults table", stacklevel=3)

    def _check_no_lora_dropout(self) -> None:
        """A dropout of the adapter's own (peft's lora_dropout, vera_dropout, OFT/BOFT's, LoHa/LoKr's module_dropout
        and rank_dropout, apply_peft's) is refused, as `slimtune train --lora-dropout` is for these optimizers: their
        steps run the model in eval() mode, where it is off."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        for layer in self.model.modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            rates = {name: sub.p for name, sub in layer.named_modules()  # nn.Dropout, OFT/BOFT's multiplicative one
                     if "Dropout" in type(sub).__name__ and isinstance(getattr(sub, "p", None), (int, float))
                     and sub.p and not name.startswith("base_layer")}
            for attr in ("module_dropout", "rank_dropout"):  # LoHa / LoKr: rates, not modules
                rates.update({attr: rate for rate in (getattr(layer, attr, None) or {}).values()
                              if isinstance(rate, (int, float)) and rate})
            if rates:
                name, rate = next(iter(rates.items()))
                raise SlimtuneError(f"ZOTrainer: the model's adapter layers have a dropout ({name.split('.')[0]}="
                                    f"{rate}): a {self.zo_args.optimizer} step runs the model in eval() mode, where "
                                    "dropout is off; build the adapter without it (0)")

    def _check_warmup_settings(self) -> bool:
        """ZOArguments.warmup_steps against TrainingArguments' warm-up and schedule (when the trainer is built and
        again at train()); returns whether the schedule takes no warm-up."""
        schedule = str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type))
        warmup = self.zo_args.warmup_steps
        if warmup is not None:
            if getattr(self.args, "warmup_ratio", 0) or self.args.warmup_steps not in (0, warmup):
                raise SlimtuneError(f"ZOTrainer: ZOArguments.warmup_steps={warmup} and TrainingArguments' "
                                    "warmup_steps / warmup_ratio are both set: give one")
            if warmup and schedule in NO_WARMUP:
                raise SlimtuneError(f"ZOTrainer: ZOArguments.warmup_steps={warmup}: lr_scheduler_type={schedule!r} "
                                    "takes no warm-up (use constant_with_warmup, linear or cosine)")
        return schedule in NO_WARMUP

    def _warmup_steps(self, num_training_steps: int) -> tuple[int | None, bool]:
        """(warm-up steps, taken from the defaults table): ZOArguments.warmup_steps if given (0: none); else None (the
        trainer's own) where TrainingArguments sets warmup_steps or warmup_ratio; else the table's, as the CLI takes
        it: int(warmup_ratio x steps) (the hybrids warm up their AdamW part)."""
        no_warmup = self._check_warmup_settings()
        if self.zo_args.warmup_steps is not None:
            if self.zo_args.warmup_steps and self.zo_args.warmup_steps >= num_training_steps:  # as --warmup-steps
                max_steps = f"TrainingArguments.max_steps={self.args.max_steps}" if self.args.max_steps > 0 else \
                    "from TrainingArguments.num_train_epochs"
                raise SlimtuneError(f"ZOTrainer: ZOArguments.warmup_steps={self.zo_args.warmup_steps}: must be below "
                                    f"the run's {num_training_steps} training steps ({max_steps}): the whole run "
                                    "would train inside the warm-up")
            return self.zo_args.warmup_steps, False
        if self.args.warmup_steps or getattr(self.args, "warmup_ratio", 0) or self.optimizer is None or no_warmup:
            return None, False
        table = getattr(self.zo_optimizer(), "defaults_used", None)
        steps = int(getattr(table, "warmup_ratio", 0.0) * num_training_steps)
        return (steps, True) if steps else (None, False)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """transformers' scheduler, with ZOArguments' warm-up, else the defaults table's where the trainer sets
        none (a warning says so)."""
        if self.lr_scheduler is None:
            warmup, from_table = self._warmup_steps(num_training_steps)
            if warmup is not None:
                from transformers import get_scheduler
                self.lr_scheduler = get_scheduler(
                    self.args.lr_scheduler_type, optimizer=self.optimizer if optimizer is None else optimizer,
                    num_warmup_steps=warmup, num_training_steps=num_training_steps,
                    scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
                self._created_lr_scheduler = True
            if from_table:
                import warnings
                warnings.warn(f"ZOTrainer: {self.zo_args.optimizer} warms up over {warmup} of {num_training_steps} "
                              "steps, from slimtune's defaults table (TrainingArguments' warmup_steps and "
                              "warmup_ratio are unset; ZOArguments.warmup_steps=0 for none)", stacklevel=2)
        return super().create_scheduler(num_training_steps, optimizer)

    def zo_optimizer(self) -> ZerothOrderOptimizer:
        """The slimtune optimizer inside accelerate's wrapper."""
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        if not isinstance(opt, ZerothOrderOptimizer):
            raise SlimtuneError("ZOTrainer's optimizer is not a slimtune optimizer (do not pass `optimizers=` to a "
                                "ZOTrainer: zo_args chooses it)")
        return opt

    # -- the step ---------------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        """One zeroth-order step on `inputs`: returns the loss it measured (NaN for private runs: not released)."""
        opt = self.zo_optimizer()
        model.eval()
        inputs = self._prepare_inputs(inputs) if EMPTY_BATCH not in inputs else inputs
        with self._metrics_count_as_training():
            out = self._private_step(opt, model, inputs) if opt.private else opt.step(self._zo_closure(model, inputs,
                                                                                                         False))
        model.train()  # between steps the model is in training mode, as transformers' own training_step leaves it
        if not opt.private:
            self._count_trl_tokens(inputs)
        opt._trainer_step_taken = True  # transformers' optimizer.step() that follows is this step
        self._zo_last = {"projected_grad": out.info.get("projected_grad")}
        loss = float("nan") if opt.private else out.loss
        return torch.tensor(loss, device=self.args.device)

    def _private_step(self, opt, model, inputs):
        """A private step raises no warning and, when it fails, no detail of the batch (as `slimtune train`): an
        exception's text or a warning may hold training rows, their lengths or the realised batch size."""
        from slimtune.privacy.withhold import withheld
        examples = inputs.pop(EXAMPLES, None)
        rows = batch_rows(inputs, 0)
        if examples is not None and rows != examples:  # no count in the message: the batch size is private
            raise SlimtuneError(f"{NOT_ONE_ROW_PER_EXAMPLE}: use a padding collator")
        with withheld(f"a private training step failed at step {opt.steps_taken + 1}"):
            return opt.step(self._zo_closure(model, inputs, True, rows))

    def _zo_closure(self, model, inputs, private: bool, examples: int = 0):
        if private:
            if EMPTY_BATCH in inputs:
                return lambda: torch.zeros(0, device=self.args.device)

            def losses():
                out = self.per_example_losses(model, inputs)
                if not isinstance(out, torch.Tensor) or out.ndim != 1 or out.numel() != examples:
                    raise SlimtuneError(  # no count in the message: the batch size is private
                        "private training clips one loss per example: per_example_losses must return a 1-D tensor "
                        "with one loss per example of the batch (per-token losses would each be clipped, so one "
                        "example could move a release by more than the clip)")
                return out
            return losses

        def mean_loss():
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, dict(inputs))
            return loss.mean() if self.args.n_gpu > 1 else loss
        return mean_loss

    def per_example_losses(self, model, inputs) -> torch.Tensor:
        """One loss per example for the private optimizers, the per-example form of the model's own loss:
        - a causal LM: each example's mean token cross-entropy over its labels (positions labelled -100 are ignored;
          logits at t are compared with labels at t + 1);
        - an encoder-decoder (config.is_encoder_decoder), a token classifier or a masked LM: the same without the
          shift (loss_alignment: an encoder-decoder's logits at t already predict labels[t], the collator shifted its
          decoder's inputs; the others label each position itself);
        - a sequence classifier, as transformers chooses its loss (problem_type, else num_labels == 1: regression,
          integer labels: single-label, float labels: multi-label): squared error, cross-entropy, or binary
          cross-entropy with logits averaged over the labels.
        Override for another per-example objective."""
        import torch.nn.functional as F

        labels = inputs.get("labels")
        if labels is None:
            raise SlimtuneError("private training needs `labels` in each batch to compute one loss per example "
                                "(use a collator that sets them, e.g. DataCollatorForLanguageModeling)")
        with self.compute_loss_context_manager():
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()
        config = getattr(base_of(model), "config", None)
        if logits.ndim == 2:  # sequence classification: one label (or one vector of labels) per example
            kind = classification_loss_kind(config, labels)
            if kind == "regression":  # MSE over the example's outputs (one, for num_labels == 1)
                return (logits - labels.to(logits.dtype).reshape(logits.shape)).pow(2).mean(dim=1)
            if kind == "multi_label_classification":
                bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
                return bce.mean(dim=1)
            return F.cross_entropy(logits, labels, reduction="none")
        if logits.ndim == 3 and logits.shape[1] > labels.shape[1] and prompt_learning(model):
            # peft's virtual tokens come first and carry no label (as peft's own loss: the last one predicts the
            # first real token)
            unlabelled = labels.new_full((labels.shape[0], logits.shape[1] - labels.shape[1]), -100)
            labels = torch.cat([unlabelled, labels], dim=1)
        if loss_alignment(model) == "causal":
            logits, labels = logits[:, :-1], labels[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        mask = labels != -100
        return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    def _count_trl_tokens(self, inputs) -> None:
        """TRL's `num_tokens` metric counts training tokens only in training mode; count this step's here."""
        metrics = getattr(self, "_metrics", None)
        if hasattr(self, "_total_train_tokens") and isinstance(metrics, dict) and "attention_mask" in inputs:
            self._total_train_tokens += int(inputs["attention_mask"].sum())
            metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def _metrics_count_as_training(self):
        """TRL's trainers file compute_loss's metrics under `train` or `eval` by `model.training`; a ZO step runs the
        model in eval mode, so the entries it adds to `eval` are moved to `train`."""
        return _TrainingMetrics(getattr(self, "_metrics", None))

    # -- data -------------------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        """Private optimizers: Poisson batches drawn from the optimizer's secret key (DPZero's accounting assumes
        them); otherwise transformers' own loader."""
        if not self.zo_args.private:
            return super().get_train_dataloader()
        dataset, collator = self._private_training_data()
        batches = PoissonBatches(len(dataset), self._train_batch_size, self)
        # the loader yields indices; EmptyAware reads the rows (a set_transform tokenizer, a Dataset's __getitem__)
        # and collates them inside `withheld`
        workers = self.args.dataloader_num_workers  # the trainer's loader settings, as transformers' own loader
        loader = DataLoader(range(len(dataset)), batch_sampler=batches,
                            collate_fn=EmptyAware(collator, dataset, self.args.seed),
                            num_workers=workers, pin_memory=self.args.dataloader_pin_memory,
                            prefetch_factor=self.args.dataloader_prefetch_factor if workers else None,
                            persistent_workers=bool(self.args.dataloader_persistent_workers and workers),
                            multiprocessing_context=self.args.dataloader_multiprocessing_context if workers else None)
        # (dataloader_in_order=False is refused for private runs: NOT_HONOURED)
        return self.accelerator.prepare(loader)

    def _private_training_data(self):
        """(dataset, collator) as the private loader reads them: unused columns removed as transformers' loader does."""
        import datasets

        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        return dataset, collator

    def _check_private_rows(self, chunk: int = 64) -> None:
        """Every training row read and collated once before the first step, as `slimtune train` checks its rows: a row
        that cannot be read or collated, or that the collator turns into several rows (an overflowing tokenizer), is
        refused here, with no detail, instead of failing the run at the secret step whose Poisson batch drew it (that
        step, and the failure itself, would say the row exists and which batch held it)."""
        from slimtune.privacy.withhold import withheld
        dataset, collator = self._private_training_data()
        n, limits = len(dataset), self._model_limits()
        read = EmptyAware(collator, dataset, self.args.seed)  # as the Poisson batches are read: each collation's
        # randomness seeded, the process's global generators left as they were
        with withheld("a training row cannot be read or collated as the private batches read them (checked before "
                      "the first step)", "read and collate the training rows outside the trainer to see which"):
            for start in range(0, n, chunk):
                batch = read(list(range(start, min(n, start + chunk))))
                examples = batch.pop(EXAMPLES)
                if batch_rows(batch, examples) != examples:
                    raise SlimtuneError(f"{NOT_ONE_ROW_PER_EXAMPLE}: checked before the first step; use a collator "
                                        "and transform that give one row per example")
                _check_fits_the_model(batch, limits)

    def _model_limits(self) -> dict:
        """What the model's forward and per_example_losses refuse, where it says: its input embedding rows
        (`vocab`), positions, and the labels its loss takes (`labels`: (low, high) of the class or token ids, -100
        ignored; None: not checked, e.g. float labels of a regression)."""
        model = base_of(self.model)
        config = getattr(model, "config", None)
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
        positions = getattr(config, "max_position_embeddings", None)
        output = getattr(model, "get_output_embeddings", lambda: None)()
        weight = getattr(output, "weight", None)
        if type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
            labels = getattr(config, "num_labels", None)
        else:
            labels = weight.shape[0] if isinstance(weight, torch.Tensor) else None
        return {"vocab": getattr(embeddings, "num_embeddings", None),
                "positions": positions if isinstance(positions, int) else None,
                "labels": labels if isinstance(labels, int) and labels > 1 else None}

    def _save_rng_state(self, output_dir: str) -> None:
        """Not in private runs: the generator state after a collator's random draws (masking, augmentation: one per
        example) counts the realised batch sizes; a private run is never resumed from a checkpoint anyway."""
        if not self.zo_args.private:
            super()._save_rng_state(output_dir)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._check_trainer_settings()  # again: args, data or the loss may have been set after construction
        if self.zo_args.private and resume_from_checkpoint:
            raise SlimtuneError("a private ZOTrainer run cannot be resumed: its noise and batches come from a key "
                                "that is kept in memory only; start a new run, or use `slimtune train --resume`")
        if self.zo_args.private and self.optimizer is not None and self.zo_optimizer().steps_taken:
            raise SlimtuneError("a private ZOTrainer trains once: its optimizer has already taken steps under its key, "
                                "and a second train() would start its Poisson batches from the first step's again "
                                "(released already); build a new trainer for a new run")
        if self.zo_args.private:
            if self.train_dataset is None:
                raise SlimtuneError("ZOTrainer: train() needs a train_dataset (set it when building the trainer, or "
                                    "as trainer.train_dataset before train())")
            self._check_private_rows()
        out = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.zo_args.private:  # no loss is released: transformers' NaN filter would report the mean of none, 0.0
            from transformers.trainer_utils import TrainOutput
            out = TrainOutput(out.global_step, float("nan"), out.metrics)
        return out

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Hugging Face's `save_model`, except for a model with slimtune's SVFit or adapter layers
        (`slimtune.apply_peft(model, "svfit" | "adapter")`): transformers would save the wrapped layers as a
        checkpoint of the base architecture whose own weights are missing (nothing can load it), so they are saved as
        slimtune's adapter (peft/registry.py: `write_adapter`, with the trainer's tokenizer), which `slimtune eval
        --adapter`, `merge` and `slimtune.peft.read_adapter` read back. Checkpoints written during training stay
        Hugging Face's (`resume_from_checkpoint` loads them into the same wrapped model). Either way, the directory gets
        slimtune.json (`adapter_meta_of`: the base model, its dtype and quantization, which `read_adapter` rebuilds and
        checks), and the files of an adapter of another kind saved there before are removed (`drop_stale_adapter`)."""
        from slimtune.peft.registry import (ADAPTER_META, LORA_FILES, _tuner_class, adapter_meta_of,
                                            drop_stale_adapter, write_adapter)

        directory = output_dir or self.args.output_dir
        if _internal_call or _tuner_class(self.model) is None:
            super().save_model(output_dir, _internal_call)
            if not _internal_call and self.args.should_save:
                from peft import PeftModel
                # the base, dtype and quantization `slimtune eval --adapter` rebuilds, as every producer records them
                (Path(directory) / ADAPTER_META).write_text(json.dumps(adapter_meta_of(self.model)))
                # an adapter of another kind saved there before would be what read_adapter loads (its files come first)
                drop_stale_adapter(directory, {*LORA_FILES, ADAPTER_META} if isinstance(self.model, PeftModel)
                                   else {ADAPTER_META})
            return None
        if self.args.should_save:  # the tokenizer transformers would save: processing_class, else the collator's
            tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
            write_adapter(self.model, tokenizer, directory, meta=adapter_meta_of(self.model), keep_others=True)
        return None

    def _track_num_input_tokens(self, inputs) -> None:
        """transformers' token count (logged, and kept in trainer_state.json): in a private run it would count the
        secret Poisson batches' tokens, so it counts nothing there (include_num_input_tokens_seen is refused too)."""
        if not self.zo_args.private:
            super()._track_num_input_tokens(inputs)

    def floating_point_ops(self, inputs) -> int:
        """transformers sums this over the training batches into `total_flos` (logged and checkpointed); a private
        run's batches are secret Poisson batches, so it counts nothing there."""
        if self.zo_args.private:
            return 0
        return super().floating_point_ops(inputs)

    # -- logs -------------------------------------------------------------------------------------------------------
    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Training logs get the step's `projected_grad`; private runs add `epsilon`/`delta` and drop the training
        loss and the training speed (train_runtime, samples / steps per second: functions of the private batches);
        ZO runs drop `grad_norm` (there is no gradient)."""
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        if isinstance(opt, ZerothOrderOptimizer) and not any(k.startswith("eval_") for k in logs):
            if self._zo_last.get("projected_grad") is not None:
                logs["projected_grad"] = self._zo_last["projected_grad"]
            if opt.method != "hybrid":
                logs.pop("grad_norm", None)
            elif "grad_norm" in logs and getattr(getattr(opt, "impl", None), "last_grad_norm", None) is not None:
                logs["grad_norm"] = opt.impl.last_grad_norm  # before the hybrid's own clip, as transformers reports
            if opt.private:  # the loss and the speed of training steps are measured on the private batches
                for key in [k for k in logs if k in ("loss", "total_flos") or k.startswith("train_")]:
                    logs.pop(key, None)
                logs.update(epsilon=opt.epsilon_spent, delta=opt.delta)
        super().log(logs, start_time)


def shares_rows(train, evaluation, train_keys: set | None = None, pad_id: int | None = None) -> bool | None:
    """Whether two datasets hold a common row (the same object, or equal rows by content; eval datasets of several
    splits, a dict, are each checked). None: they cannot be compared row by row (not indexable). `train_keys`: the
    training rows' `training_keys`, if already computed."""
    if isinstance(evaluation, dict):
        answers = [shares_rows(train, d, train_keys, pad_id) for d in evaluation.values()]
        return True if any(answers) else (None if None in answers else False)
    if evaluation is train:
        return True
    try:
        seen = train_keys if train_keys is not None else training_keys(train, pad_id)
        return any(_row_key(evaluation[i], pad_id) in seen for i in range(len(evaluation)))
    except (TypeError, KeyError, IndexError, NotImplementedError, AttributeError):
        return None  # not indexable: unknown


NOT_SHOWN = ("labels", "label", "label_ids", "attention_mask")  # columns a row's key leaves out (`_row_key`)


def training_keys(train, pad_id: int | None = None) -> set[str]:
    """`_row_key` of every training row, and of the prompt of each tokenized one (its input_ids where labels is
    -100, the tokens before its target): scoring a training prompt alone, for predict(), says what the model learned
    of that row too."""
    keys = set()
    for i in range(len(train)):
        row = train[i]
        keys.add(_row_key(row, pad_id))
        if isinstance(row, dict) and "input_ids" in row and "labels" in row:
            ids, labels, shown = _as_list(row["input_ids"]), _as_list(row["labels"]), _attended(row)
            if len(ids) == len(labels) and -100 in labels:
                prompt = [t for t, l, a in zip(ids, labels, shown) if l == -100 and a]
                keys.add(_row_key({"input_ids": prompt}, pad_id))
    return keys


def _as_list(value) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _unpadded(ids: list, pad_id: int | None) -> list:
    """`ids` without runs of the pad token at either end (a copy padded without an attention mask is the row)."""
    if pad_id is None:
        return ids
    start, end = 0, len(ids)
    while start < end and ids[start] == pad_id:
        start += 1
    while end > start and ids[end - 1] == pad_id:
        end -= 1
    return ids[start:end]


def _attended(row: dict) -> list[bool]:
    """Which of a tokenized row's positions the model attends to (its attention_mask; every position without one):
    padding is not part of the row (a padded copy of a training row scores exactly as the row)."""
    ids = _as_list(row["input_ids"])
    mask = row.get("attention_mask")
    mask = _as_list(mask) if mask is not None else None
    return [bool(m) for m in mask] if mask is not None and len(mask) == len(ids) else [True] * len(ids)


def _row_key(row, pad_id: int | None = None) -> str:
    """A row as text, its strings compared up to case and spacing as the CLI's and the federated checks do; of a dict
    row, what the model is shown. A tokenized row (input_ids) is its tokens alone: transformers drops the columns the
    model's forward does not take (a `text` column a `map(tokenize)` kept, an `idx`), and labels and the attention
    mask are not the input. Of a raw row, its label columns and attention mask are left out (NOT_SHOWN), and so are
    its numbers (an `idx`, a score), which no collator turns into text: a training row given to predict() without
    its labels, or with a column of its own, is still that training row."""
    from slimtune.train.objectives import overlap_key

    if isinstance(row, dict):
        if "input_ids" in row:  # the attended tokens, less padding at either end: a padded copy of a row is it
            row = {"input_ids": _unpadded([t for t, a in zip(_as_list(row["input_ids"]), _attended(row)) if a],
                                          pad_id)}
        else:
            row = {k: v for k, v in row.items() if k not in NOT_SHOWN and not isinstance(v, numbers.Number)}

    def normalised(value):
        if isinstance(value, str):
            return overlap_key(value)
        if isinstance(value, dict):
            return {k: normalised(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [normalised(v) for v in value]
        return value
    return json.dumps(normalised(row), sort_keys=True, default=str)


class ZOTrainer(ZOTrainerMixin, Trainer):
    """`transformers.Trainer` with a slimtune zeroth-order optimizer (see the module's description and
    `ZOArguments`)."""


class StepCountProgress(ProgressCallback):
    """transformers' training progress bar without its clock: `40%|████      | 8/20`, no elapsed time, ETA or it/s
    (a private run's step times are functions of its batches). Evaluation bars are transformers' own."""

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True,
                                     bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}")
        self.current_step = 0


class PoissonBatches:
    """A batch sampler of Poisson batches: the batch of global step t holds each example independently with
    probability batch_size / n, drawn by the private optimizer from K("sampling", 0, t) of its key (it keeps each
    draw's size: its step refuses losses of another count). Its length (batches per epoch) is round(n / batch_size);
    steps are numbered across epochs (`set_epoch`), so a loader that reads ahead never shifts them."""

    def __init__(self, n: int, batch_size: int, trainer):
        self.n, self.batch_size, self.trainer, self.epoch = n, batch_size, trainer, 0
        self.batches_per_epoch = max(1, round(n / batch_size))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        opt = self.trainer.zo_optimizer()
        for i in range(self.batches_per_epoch):  # each draw is registered: the step checks its batch against it
            yield opt._draw(self.epoch * self.batches_per_epoch + i)


NOT_ONE_ROW_PER_EXAMPLE = ("private training clips one loss per example, but the data collator does not give one row "
                           "per example (an overflowing tokenizer, a padding-free or flattening collator packs several "
                           "into one, so one example could move a release by more than the clip)")


def batch_rows(batch: dict, default: int) -> int:
    """The rows of a collated batch (its first tensor of one or more dimensions), `default` when it holds none."""
    return next((len(v) for k, v in batch.items() if k != EMPTY_BATCH and isinstance(v, torch.Tensor) and v.ndim),
                default)


def _check_fits_the_model(batch: dict, limits: dict) -> None:
    """A collated chunk of training rows against what the model's forward and loss refuse (an index past its
    embedding, a sequence past its positions, a label its loss cannot take): such a row would fail the run only at
    the secret step whose Poisson batch drew it. The message names no row."""
    vocab, positions, classes = limits["vocab"], limits["positions"], limits["labels"]
    labels = batch.get("labels")
    if classes is not None and isinstance(labels, torch.Tensor) and not labels.dtype.is_floating_point \
            and labels.numel():
        taken = labels[labels != -100]
        if taken.numel() and (int(taken.min()) < 0 or int(taken.max()) >= classes):
            raise SlimtuneError(f"a training row's label is outside the {classes} the model's loss takes (0 to "
                                f"{classes - 1}; -100 marks a position without one): checked before the first step")
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or not ids.numel():
        return
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise SlimtuneError(f"a training row holds token ids outside the model's embedding of {vocab} rows (a "
                            "tokenizer with added tokens and the model not resized?): checked before the first step; "
                            "call model.resize_token_embeddings(len(tokenizer))")
    if positions is not None and ids.ndim == 2 and ids.shape[1] > positions:
        raise SlimtuneError(f"a training row is longer than the model's {positions} positions: checked before the "
                            "first step; truncate the rows (the tokenizer's truncation=True, max_length)")


class EmptyAware:
    """The collator of private Poisson batches: an empty batch passes on as {EMPTY_BATCH: tensor([])} (collators fail
    on []); any other carries its number of examples (EXAMPLES) and is collated inside `withheld`, as the step itself
    is (transformers fetches a batch before `training_step`): a collator's warnings and log lines (a tokenizer's
    "sequence length ... (36 > 5)") and the text of its errors name the rows of a secret batch."""

    def __init__(self, collator, dataset, seed: int | None = None):
        """`seed`: the trainer's (public); each batch's collation draws its randomness from (seed, worker, call) and
        leaves the process's global generators as they were (`kept_random_state`)."""
        self.collator, self.dataset, self.seed, self.calls = collator, dataset, seed, 0

    def __call__(self, indices: list):
        if not indices:
            return {EMPTY_BATCH: torch.zeros(0)}
        from slimtune.privacy.withhold import kept_random_state, withheld
        self.calls += 1
        worker = getattr(torch.utils.data.get_worker_info(), "id", -1)
        seed = None if self.seed is None else hash((self.seed, worker, self.calls)) & (2**63 - 1)
        with withheld("reading or collating a private training batch failed",
                      "read and collate public rows the same way to see why"), kept_random_state(seed):
            reader = getattr(self.dataset, "__getitems__", None)
            examples = reader(list(indices)) if reader is not None else [self.dataset[i] for i in indices]
            batch = self.collator(examples)
        batch[EXAMPLES] = len(indices)  # ZOTrainer._private_step checks one row per example
        return batch


class _TrainingMetrics:
    def __init__(self, metrics):
        self.metrics = metrics if isinstance(metrics, dict) and {"train", "eval"} <= set(metrics) else None

    def __enter__(self):
        if self.metrics is not None:
            self.before = {k: len(v) for k, v in self.metrics["eval"].items() if isinstance(v, list)}
        return self

    def __exit__(self, *exc):
        if self.metrics is None:
            return False
        for key, values in list(self.metrics["eval"].items()):
            if key == "num_tokens" or not isinstance(values, list):
                continue
            start = self.before.get(key, 0)
            self.metrics["train"][key].extend(values[start:])
            del values[start:]
            if not values:
                del self.metrics["eval"][key]  # TRL averages every list it holds
        return False


__all__ = ["ZOArguments", "ZOTrainerMixin", "ZOTrainer", "PoissonBatches"]

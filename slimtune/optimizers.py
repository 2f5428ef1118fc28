"""Optimizers you construct from a model and drive from your own loop (or from `slimtune.hf.ZOTrainer`).

    opt = slimtune.MeZO(model, lr=1e-3, eps=1e-2)
    for batch in loader:
        out = opt.step(lambda: model(**batch).loss)      # two forward passes, no backward, no graph
        print(out.loss, out.info["projected_grad"])

Each class is a `torch.optim.Optimizer` over the model's trainable parameters, so torch and transformers learning-
rate schedulers drive `param_groups[0]["lr"]`, and `state_dict()` / `load_state_dict()` save and restore everything a
step depends on (the step counter the perturbation seeds come from, LOZO's factors, HiZOO's curvature, ...). The work
is done by the same code as `slimtune train --optimizer NAME` (`slimtune.optim.build_optimizer`), and arguments left
out come from the same defaults table (`slimtune.optim.defaults`), looked up for the kind of model you pass: a peft
LoRA/PiSSA model, a `slimtune.apply_peft` SVFit/adapter model, or a plain model (full-parameter values); a peft model
of another type (IA3, LoKr, ...) has no row and must be given `lr` and `eps`. Arguments are checked by the rules of
the matching `slimtune train` flags. `load_state_dict` refuses a state saved with another seed, eps, direction source
or parameter shapes, and `add_param_group` is refused (the step trains the model's parameters it was built over).

`step(closure)`: the closure runs the model on one batch and returns its loss, either the mean (a 0-d tensor or a
float) or one loss per example (a 1-D tensor). The optimizer calls it under `torch.inference_mode()` (two or more times
per step, at perturbed weights) and never calls `backward` (a closure that does is refused); the model should be in
`eval()` mode, so that every call sees the same function (no dropout). The private optimizers (`DPZero`, `DPLOZO`,
`DPHiZOO`) need per-example losses: each example's contribution is clipped before noise is added, so a closure
returning a mean is refused.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import fields
from types import SimpleNamespace
from typing import Callable, ClassVar, Union

import torch

from slimtune import SlimtuneError
from slimtune.optim import OptimizerArgs
from slimtune.optim.base import StepOutput
from slimtune.optim.methods import METHODS, mechanism_refusal
from slimtune.settings.python import (check_keywords, default, in_python_terms, python_number, python_terms,
                                      require_model)

Loss = Union[torch.Tensor, float]
Closure = Callable[[], Loss]

PEFT_KINDS = ("lora", "pissa", "adapter", "svfit", "none")  # the defaults table's rows


def peft_kind(model: torch.nn.Module) -> str:
    """Which kind of model this is for the defaults table: `lora` or `pissa` (a peft LoRA model), `svfit` or `adapter`
    (a model from `slimtune.apply_peft`), `none` (every model that is not a peft model: full-parameter values), or,
    for a peft model of another type, its peft type in lower case (`ia3`, `lokr`, `prompt_tuning`): the table has no
    row for it (`table_row`)."""
    tuner = getattr(model, "slimtune_tuner", None)
    if tuner is not None:
        return tuner.method
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and configs:
        config = configs.get(getattr(model, "active_adapter", None)) or next(iter(configs.values()))
        peft_type = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "")))
        if peft_type.upper() != "LORA":
            return peft_type.lower() or "unknown"
        return "pissa" if str(getattr(config, "init_lora_weights", "")).startswith("pissa") else "lora"
    return "none"


def table_row(owner: str, model: torch.nn.Module, given: dict) -> str:
    """The defaults-table row a model's optimizer takes its unset values from (`peft_kind`). A peft model of a type the
    table has no row for (IA3, LoKr, prompt tuning, ...) must be given `lr` and `eps` (LoRA's tuned values would be
    silently wrong for it); its other unset values are the full-parameter row's."""
    kind = peft_kind(model)
    if kind in PEFT_KINDS:
        return kind
    missing = [name for name in ("lr", "eps") if given.get(name) is None]
    if missing:
        raise SlimtuneError(f"{owner}: the model is a peft {kind.upper()} model, and slimtune's defaults table has "
                            "rows only for LoRA, PiSSA, SVFit, adapters and full-parameter training: give "
                            f"{' and '.join(missing)}")
    return "none"


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Base class of the public optimizers: a `torch.optim.Optimizer` whose `step(closure)` is a slimtune step.

    Attributes: `method` (the `--optimizer` name), `defaults_used` (the defaults-table entry for this model),
    `settings` (every value the step uses, given or from the table)."""

    method: ClassVar[str] = ""
    private: ClassVar[bool] = False
    aliases: ClassVar[dict] = {}  # keyword -> train setting, where the names differ

    def __init__(self, model: torch.nn.Module, given: dict, private: tuple | None = None,
                 private_given: dict | None = None):
        from slimtune.optim import OptimizerArgs, build_optimizer
        from slimtune.models.loading import builtin_architecture
        from slimtune.optim.defaults import defaults_for, method_settings

        owner = f"slimtune.{type(self).__name__}"
        require_model(owner, model)
        kind, row = peft_kind(model), table_row(owner, model, given)
        checked = check_keywords(owner, given, {"optimizer": self.method, "peft": kind}, self.aliases)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise SlimtuneError(f"{owner}: the model has no trainable parameters (apply PEFT, or set requires_grad)")
        table = defaults_for(self.method, row, builtin_architecture(model))
        values = {k: v for k, v in checked.items() if v is not None}
        values.setdefault("lr", table.lr)
        if table.eps is not None:
            values.setdefault("eps", table.eps)
        for name, value in method_settings(self.method, row, builtin_architecture(model)).items():
            values.setdefault(name, value)  # the method's own (HiZOO's alpha, hybrid's fo_lr, the z source)
        args = OptimizerArgs(**{k: v for k, v in values.items() if k in OPTIMIZER_ARGS})
        self.defaults_used, self.settings = table, {**values, "peft": kind}
        try:
            self.impl = build_optimizer(self.method, model, args, private)
        except SlimtuneError as exc:  # the registry's messages name flags; a Python caller gave keywords
            raise SlimtuneError(in_python_terms(owner, str(exc), self.aliases)) from None
        if METHODS[self.method].kind == "hybrid" and not self.impl.params:  # every trainable layer is on top
            from slimtune.optim.hybrid import zo_part_settings
            named = [k for k, v in given.items() if v is not None] + [  # privacy values: given when not the default
                k for k, v in (private_given or {}).items() if v is not None and v != default(k)]
            unused = [k for k in named if k in zo_part_settings(self.method)]
            if unused:
                raise SlimtuneError(f"{owner}: {unused[0]}: every trainable layer is in the top {args.fo_layers} "
                                    f"blocks (fo_layers), so nothing is trained by ZO and {unused[0]} would be "
                                    "ignored; lower fo_layers or leave it out")
        super().__init__(params, {"lr": values["lr"]})
        self._trainer_step_taken = False
        self._built = True  # torch's constructor adds the param group; later ones are refused (add_param_group)

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_built", False):
            raise SlimtuneError(f"slimtune.{type(self).__name__}.add_param_group: the step perturbs and updates only "
                                "the trainable parameters of the model it was built over; set requires_grad on the "
                                "new parameters (as part of the model) and build the optimizer again")
        super().add_param_group(param_group)

    # -- the step ---------------------------------------------------------------------------------------------------
    def step(self, closure: Closure | None = None) -> StepOutput | None:  # type: ignore[override]
        """One optimizer step on the batch the closure evaluates; returns the measured loss and the step's scalars
        (`info`: `projected_grad`, and for private optimizers `clip` and the private diagnostics)."""
        if closure is None:
            if self._trainer_step_taken:  # slimtune.hf.ZOTrainer took this step in training_step
                self._trainer_step_taken = False
                return None
            raise SlimtuneError(f"slimtune.{type(self).__name__}.step needs a closure that returns the batch's loss "
                                "(a zeroth-order step evaluates the model several times)")
        self.impl.set_lr(self.param_groups[0]["lr"])
        return self.impl.step(self._checked(closure))

    def _examples_drawn(self) -> int | None:
        """The number of per-example losses this step's closure must return (private optimizers: the size of the
        batch `sample_batch()` drew); None: any."""
        return None

    def _checked(self, closure: Closure) -> Callable[[], torch.Tensor]:
        name = type(self).__name__
        examples = self._examples_drawn()

        params = [p for group in self.param_groups for p in group["params"]]

        def call() -> torch.Tensor:
            grads = [p.grad for p in params]
            try:
                loss = closure()
            except RuntimeError as exc:  # backward() under the step's torch.inference_mode()
                if "does not require grad" not in str(exc):
                    raise
                raise SlimtuneError(BACKWARD_IN_CLOSURE.format(name=name)) from None
            if any(p.grad is not g for p, g in zip(params, grads)):  # the hybrid's call runs with autograd on
                raise SlimtuneError(BACKWARD_IN_CLOSURE.format(name=name))
            if not isinstance(loss, torch.Tensor):
                if not isinstance(loss, (int, float)):
                    raise SlimtuneError(f"slimtune.{name}: the closure returned {type(loss).__name__}; return the "
                                        "loss as a tensor (0-d mean or 1-D per example) or a float")
                loss = torch.tensor(float(loss))
            # the number of dimensions only, never the shape: a private batch's size is not released
            if self.private and loss.ndim != 1:
                raise SlimtuneError(f"slimtune.{name} needs per-example losses: the closure must return a 1-D tensor "
                                    f"with one loss per example (got a {loss.ndim}-D tensor); each example's "
                                    "difference is clipped before the noise is added")
            if loss.ndim > 1:
                raise SlimtuneError(f"slimtune.{name}: the closure returned a {loss.ndim}-D tensor; return the "
                                    "mean loss (0-d) or one loss per example (1-D)")
            if examples is not None and loss.numel() != examples:  # no count in the message: the size is private
                raise SlimtuneError(f"slimtune.{name}: the closure returned another number of per-example losses "
                                    "than the examples sample_batch() drew for this step (another batch, or a loss per "
                                    "token): evaluate exactly the drawn examples, one loss each (the accountant prices "
                                    "one clipped term per sampled example)")
            graph_needed = METHODS[self.method].kind == "hybrid" and torch.is_grad_enabled()  # its backprop call
            if graph_needed and loss.numel() and not loss.requires_grad:
                raise SlimtuneError(f"slimtune.{name}: the closure's loss has no autograd graph (a float, .item(), "
                                    ".detach() or torch.no_grad()); the top blocks train by backprop through it: "
                                    "return the loss tensor the model computed")
            return loss
        return call

    @property
    def forwards_per_step(self) -> int:
        """Closure calls (forward passes over the batch) one step makes."""
        return self.impl.forwards_per_step

    @property
    def steps_taken(self) -> int:
        return self.impl.step_count

    # -- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's param_groups (learning rates) and slimtune's state: tensors and plain values only, so that
        `torch.load(..., weights_only=True)` reads it back (transformers' checkpoints do). `run` records what the
        steps depend on besides the step counter (`_run_identity`), which `load_state_dict` checks."""
        state = super().state_dict()
        state["slimtune"] = {"method": self.impl.name, "optimizer": self.impl.state_dict(),
                             "run": self._run_identity()}
        return state

    def _run_identity(self) -> dict:
        """The seed, eps and direction source the perturbations follow, the shapes of the parameters the state
        (LOZO's factors, HiZOO's curvature, AdamW's moments) is laid out over, and every other value the step uses
        (`settings`: the rank, n_spsa, sparsity, lr, ...)."""
        config = getattr(self.impl, "config", None)
        return {"seed": getattr(config, "seed", None), "eps": getattr(config, "eps", None),
                "perturbation": getattr(config, "perturbation", None),
                "shapes": [list(p.shape) for group in self.param_groups for p in group["params"]],
                "settings": {k: v for k, v in sorted(self.settings.items()) if isinstance(v, (int, float, str, bool,
                                                                                               type(None)))}}

    def load_state_dict(self, state_dict: dict) -> None:
        where = f"slimtune.{type(self).__name__}.load_state_dict"
        own = state_dict.get("slimtune") if isinstance(state_dict, dict) else None
        if own is None:
            raise SlimtuneError(f"{where}: not a slimtune optimizer state")
        if own["method"] != self.impl.name:
            raise SlimtuneError(f"{where}: the state is {own['method']!r}'s, this optimizer is {self.impl.name!r}")
        saved, here = own.get("run") or {}, self._run_identity()  # states saved before `run`: unchecked, unless private
        if "shapes" in saved and saved["shapes"] != here["shapes"]:
            raise SlimtuneError(f"{where}: the state was saved over parameters of other shapes ({len(saved['shapes'])} "
                                f"tensors; this optimizer has {len(here['shapes'])}, or the same number shaped "
                                "differently: another model, peft rank or target modules); build the optimizer over "
                                "the model the state was saved with")
        if "privacy" in here and "privacy" not in saved:
            raise SlimtuneError(f"{where}: the state was saved without its privacy settings (an older slimtune, or "
                                "a non-private optimizer), so its steps cannot be priced: start a new private run")
        if "privacy" in saved and saved["privacy"] != here.get("privacy"):
            changed = _differences(saved["privacy"], here.get("privacy") or {})
            raise SlimtuneError(f"{where}: the state was saved under other privacy settings ({changed}); its steps would be priced at this optimizer's noise and sampling rate (epsilon_spent "
                                "would under-report): build the optimizer with the settings the state was saved with")
        for name in ("seed", "eps", "perturbation"):
            if name in saved and saved[name] != here[name]:
                raise SlimtuneError(f"{where}: the state was saved with {name}={saved[name]!r}, this optimizer has "
                                    f"{name}={here[name]!r} (the steps would continue on another trajectory); build "
                                    f"it with {name}={saved[name]!r}")
        if "settings" in saved and saved["settings"] != here["settings"]:  # states saved before `settings`: unchecked
            changed = _differences(saved["settings"], here["settings"])
            raise SlimtuneError(f"{where}: the state was saved with other settings ({changed}): the steps would "
                                "continue on another trajectory; build the optimizer with the settings it was saved "
                                "with")
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        self.impl.load_state_dict(own["optimizer"])


def _differences(saved: dict, here: dict) -> str:
    """'noise_multiplier 0.26 -> 1.9, dataset_size 72 -> 100': the saved and current values that differ."""
    return ", ".join(f"{k} {saved.get(k)!r} -> {here.get(k)!r}" for k in sorted(set(saved) | set(here))
                     if saved.get(k) != here.get(k))


BACKWARD_IN_CLOSURE = ("slimtune.{name}: the closure changed the parameters' gradients (it called backward() or "
                       "zero_grad()); it must only return the loss (a zeroth-order step only measures losses; the "
                       "hybrids backpropagate by themselves)")

OPTIMIZER_ARGS = tuple(f.name for f in fields(OptimizerArgs))  # derived: a hand-kept copy dropped fo_clip


class MeZO(ZerothOrderOptimizer):
    """MeZO (Malladi et al., 2023): ZO-SGD with two-sided SPSA and the seed trick.

    g = (L(theta + eps z) - L(theta - eps z)) / (2 eps),  theta <- theta - lr g z,  z ~ N(0, I) regenerated from a
    seed (never stored). Two forward passes per step (2 n_spsa with n_spsa directions averaged).

    Args:
        model: the model to train; only parameters with `requires_grad` are perturbed and updated.
        lr: learning rate (None: the defaults table for this model).
        eps: perturbation scale (None: the table's).
        weight_decay: decoupled weight decay on matrices.
        n_spsa: directions averaged per step.
        perturbation: `gaussian`, `rademacher` or `pool` (slices of a seeded Gaussian pool); None: gaussian (FZOO:
            rademacher).
        seed: the public seed the directions z are drawn from.
    """

    method = "mezo"

    def __init__(self, model: torch.nn.Module, *, lr: float | None = None, eps: float | None = None,
                 weight_decay: float = 0.0, n_spsa: int = 1, perturbation: str | None = None, seed: int = 0):
        super().__init__(model, dict(lr=lr, eps=eps, weight_decay=weight_decay, n_spsa=n_spsa,
                                     perturbation=perturbation, seed=seed))


class LOZO(ZerothOrderOptimizer):
    """LOZO (Chen et al., 2024): MeZO with low-rank perturbations U V^T per matrix, V kept for `nu` steps; with
    `momentum` > 0 it is LOZO-M (momentum kept as m x rank factors). Arguments as `MeZO`, plus:

    Args:
        rank: rank of the perturbation (`--lozo-rank`).
        nu: steps between resampling V (`--lozo-nu`).
        momentum: LOZO-M's momentum (0: plain LOZO).
    """

    method = "lozo"
    aliases = {"rank": "lozo_rank", "nu": "lozo_nu"}

    def __init__(self, model: torch.nn.Module, *, lr: float | None = None, eps: float | None = None,
                 weight_decay: float = 0.0, n_spsa: int = 1, rank: int = 2, nu: int = 50, momentum: float = 0.0,
                 seed: int = 0):
        if momentum:
            self.method = "lozo-m"
        super().__init__(model, dict(lr=lr, eps=eps, weight_decay=weight_decay, n_spsa=n_spsa, rank=rank, nu=nu,
                                     momentum=momentum, seed=seed))


class FZOO(ZerothOrderOptimizer):
    """FZOO (Dang et al., 2025): N one-sided Rademacher directions per step on one batch, the step divided by the
    standard deviation of their losses (N + 1 forward passes per step).

    The other arguments are `MeZO`'s (FZOO's lr is on its own, normalised scale).

    Args:
        n_perturbations: N directions per step (>= 2: their losses' spread scales the step).
    """

    method = "fzoo"

    def __init__(self, model: torch.nn.Module, *, lr: float | None = None, eps: float | None = None,
                 weight_decay: float = 0.0, n_perturbations: int = 8, perturbation: str | None = None,
                 seed: int = 0):
        FZOO.check_directions("slimtune.FZOO: n_perturbations", n_perturbations)
        super().__init__(model, dict(lr=lr, eps=eps, weight_decay=weight_decay, n_spsa=n_perturbations,
                                     perturbation=perturbation, seed=seed))


    @staticmethod
    def check_directions(named: str, n_perturbations) -> None:
        """FZOO's N (`named`: how the caller wrote it, "slimtune.FZOO: n_perturbations"), refused where it is given
        (slimtune.FZOO, ZOArguments): the step is divided by the spread of N losses."""
        n_perturbations = python_number(n_perturbations, "int")  # np.int64(8): the int it stands for
        if isinstance(n_perturbations, bool) or not isinstance(n_perturbations, int) or n_perturbations < 2:
            raise SlimtuneError(f"{named}={n_perturbations!r}: must be an integer >= 2 (the step is divided by the "
                                "spread of their losses)")


class HiZOO(ZerothOrderOptimizer):
    """HiZOO: MeZO preconditioned by a diagonal Hessian estimate H (one extra forward L(theta) per step, 3 in all):
    theta <- theta - lr g H^{-1/2} z, H a moving average of the curvature along z.

    The other arguments are `MeZO`'s.

    Args:
        hessian_smooth: the moving average's weight alpha (None: the table's).
    """

    method = "hizoo"

    def __init__(self, model: torch.nn.Module, *, lr: float | None = None, eps: float | None = None,
                 weight_decay: float = 0.0, hessian_smooth: float | None = None, perturbation: str | None = None,
                 seed: int = 0):
        super().__init__(model, dict(lr=lr, eps=eps, weight_decay=weight_decay, hessian_smooth=hessian_smooth,
                                     perturbation=perturbation, seed=seed))


class HiZOOL(HiZOO):
    """HiZOO-L: HiZOO with H kept as rank-1 row x column factors per matrix (~2/hidden of the trainable values)."""

    method = "hizoo-l"


class SparseMeZO(ZerothOrderOptimizer):
    """Sparse MeZO: perturb only the `1 - sparsity` smallest-magnitude values of each tensor (bit-packed masks,
    recomputed every `mask_every` steps).

    The other arguments are `MeZO`'s.

    Args:
        sparsity: fraction of each tensor left unperturbed (None: 0.75).
        mask_every: steps between recomputing the masks (None: 50).
    """

    method = "sparse-mezo"

    def __init__(self, model: torch.nn.Module, *, lr: float | None = None, eps: float | None = None,
                 weight_decay: float = 0.0, sparsity: float | None = None, mask_every: int | None = None,
                 perturbation: str | None = None, seed: int = 0):
        super().__init__(model, dict(lr=lr, eps=eps, weight_decay=weight_decay, sparsity=sparsity,
                                     mask_every=mask_every, perturbation=perturbation, seed=seed))


class Hybrid(ZerothOrderOptimizer):
    """AdamW (backprop) on the top `fo_layers` transformer blocks and the head, MeZO on everything below, in one step:
    the closure is called once with autograd on (through the top only) and once in inference mode.

    The other arguments are `MeZO`'s, for the ZO part.

    Args:
        fo_layers: top blocks trained by backprop (None: 2).
        fo_lr: their AdamW learning rate (None: the table's); it follows the schedule of `lr` proportionally.
    """

    method = "hybrid"

    def __init__(self, model: torch.nn.Module, *, lr: float | None = None, eps: float | None = None,
                 weight_decay: float = 0.0, fo_layers: int | None = None, fo_lr: float | None = None,
                 perturbation: str | None = None, seed: int = 0):
        super().__init__(model, dict(lr=lr, eps=eps, weight_decay=weight_decay, fo_layers=fo_layers, fo_lr=fo_lr,
                                     perturbation=perturbation, seed=seed))


# -- private ----------------------------------------------------------------------------------------------------------
_RELEASED_INTO: dict[int, tuple] = {}  # id(parameter) -> (a weak reference to it, optimizer token, steps released)
_TOKENS = itertools.count(1)  # an optimizer's identity in the record (never reused, unlike id())
PRIVATE_STEPS_ATTR = "_slimtune_private_steps"  # also on the model: a deep copy of it carries its record


def released_into(model: torch.nn.Module, params: list) -> tuple[int, int]:
    """(steps, optimizer token) of the private optimizer that released the most steps into `model` or any of
    `params` in this process ((0, 0): none): a second optimizer built over the same weights must continue that one's
    count. (Keyed by id, with a weak reference to tell a live parameter from a new one at a freed address: tensors
    compare by value; the model's own record survives copy.deepcopy. A state_dict loaded into fresh weights carries
    no record: docs/how-to/private-training.md.)"""
    found = [(steps, owner) for p in params if (entry := _RELEASED_INTO.get(id(p))) and entry[0]() is p
             for _, owner, steps in [entry]]
    on_model = getattr(model, PRIVATE_STEPS_ATTR, None)
    if on_model is not None:
        found.append((on_model[1], on_model[0]))
    return max(found, default=(0, 0))


def record_release(model: torch.nn.Module, params: list, owner: int, steps: int) -> None:
    if model is not None:  # a plain attribute (not a module or buffer): copy.deepcopy copies it
        object.__setattr__(model, PRIVATE_STEPS_ATTR, (owner, steps))
    for p in params:
        key = id(p)
        _RELEASED_INTO[key] = (weakref.ref(p, lambda _, key=key: _RELEASED_INTO.pop(key, None)), owner, steps)


class PrivateOptimizer(ZerothOrderOptimizer):
    """Base of the differentially private ZO optimizers (DPZero's mechanism on the projected gradient).

    Private training needs Poisson sampling: draw each step's batch with `sample_batch()` (each example joins
    independently with probability batch_size / dataset_size, decided by a 256-bit key that exists only in this
    object's memory) and return one loss per example from the closure: `step()` refuses a step with no draw and a loss
    count other than the drawn batch's (it cannot see which rows were read). The noise is calibrated when the optimizer is
    built, for `steps` steps of Poisson batches of expected size `batch_size` out of `dataset_size` examples, so that
    the whole run spends (epsilon, delta); a step beyond `steps` is refused. `epsilon_spent` is the accountant's
    epsilon after the steps taken. The state_dict holds public values only (step count, the clip), never the key: a
    restored optimizer continues with a fresh key (fresh noise and batches). An empty batch is a valid Poisson draw:
    the closure then returns `torch.zeros(0)` and the step releases noise alone, as the accounted mechanism requires.

    What `step()` returns is for your own loop, and only part of it is released: `info`'s `projected_grad`, `clip`
    (DP-HiZOO: also `curvature`, `curvature_clip`) and `epsilon_spent` are; `loss` and the rest of `info` (clipped
    fractions, `batch_size`: the realised Poisson size) are measured on the private batch, so printing or storing
    them (or the step's time or memory) is outside the (epsilon, delta) guarantee.
    """

    private = True

    def __init__(self, model: torch.nn.Module, given: dict, privacy: dict, dataset_size: int, batch_size: int,
                 steps: int | None):
        from slimtune.optim.builders import private_releases
        from slimtune.optim.defaults import defaults_for
        from slimtune.privacy.accountant import PrivacySpec, plan
        from slimtune.privacy.secret import KeyedNoise, RunKey
        from slimtune.train.trainer import adaptive_clipping

        owner = f"slimtune.{type(self).__name__}"
        require_model(owner, model)
        dataset_size, batch_size = python_number(dataset_size, "int"), python_number(batch_size, "int")
        for name, value in (("dataset_size", dataset_size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SlimtuneError(f"{owner}: {name}={value!r}: must be an integer >= 1 (the number of training "
                                    "examples and the expected Poisson batch size)")
        if batch_size > dataset_size:  # each example joins with probability batch_size / dataset_size
            raise SlimtuneError(f"{owner}: batch_size={batch_size} is larger than dataset_size={dataset_size}: a "
                                "Poisson batch holds each example with probability batch_size / dataset_size")
        row = table_row(owner, model, given)
        checked = check_keywords(owner, {**privacy, "steps": steps},
                                 {"optimizer": self.method, "peft": peft_kind(model), "accountant": privacy.get(
                                     "accountant", "rdp"), "clipping": privacy.get("clipping", "auto")})
        steps = checked["steps"] or defaults_for(self.method, row).steps
        target = checked["epsilon"]
        if target is None and checked["noise_multiplier"] is None:
            target = 6.0  # the CLI's default budget
        spec = PrivacySpec(target, checked["delta"], checked["noise_multiplier"], checked["clip"], "poisson",
                           checked["mechanism"], checked["accountant"], checked["pld_discretization"],
                           checked["clipping"], checked["target_quantile"], checked["clip_lr"],
                           checked["clip_multiplier"])
        refusal = mechanism_refusal(self.method, spec.mechanism, given.get("n_spsa"), spec.clipping)
        if refusal:
            raise SlimtuneError(in_python_terms(owner, refusal, self.aliases))
        releases = private_releases(self.method, given.get("n_spsa", 1))
        adaptive = adaptive_clipping(SimpleNamespace(privacy=spec, optimizer=self.method))
        with python_terms(owner, self.aliases):  # the accountant's refusals are the CLI's ("omit --noise-multiplier")
            self.accountant = plan(spec, dataset_size, batch_size, steps, releases, adaptive)
            spends = self.accountant.epsilon(steps)
        if target is not None and spends > target * (1 + 1e-9):  # plan() tolerates 0.1%; the budget is strict
            raise SlimtuneError(f"{owner}: noise_multiplier={self.accountant.noise:g} spends epsilon {spends:.6g} in "
                                f"{steps} steps, over epsilon={target:g}: raise it, or leave it out to calibrate")
        self._released = 0
        self._drawn: dict[int, int] = {}  # step -> the size of the Poisson batch drawn for it (in memory only)
        self._key = RunKey.fresh()
        self._plan = {"dataset_size": dataset_size, "batch_size": batch_size, "steps": steps}  # what was priced
        self._token, self._model = next(_TOKENS), weakref.ref(model)  # the release record's (released_into)
        noise = KeyedNoise(self._key)
        super().__init__(model, given, (spec, self.accountant.noise, batch_size, noise,
                                        self.accountant.quantile_noise), privacy)
        self.impl._owner = owner  # its own step() refuses to be called but through this one
        self.settings.update(privacy, steps=steps, noise_multiplier=self.accountant.noise)

    def _run_identity(self) -> dict:
        """Also what prices a step in the accountant: the noise, the sampling rate, delta, the mechanism, the
        accountant and the releases per step (a restored step count is priced at this optimizer's settings, so a
        state saved under others would under-report epsilon_spent)."""
        acc = self.accountant
        return {**super()._run_identity(), "privacy": {
            "noise_multiplier": acc.noise, "quantile_noise": acc.quantile_noise, "dataset_size": acc.n,
            "batch_size": acc.batch_size, "delta": acc.spec.delta, "mechanism": acc.spec.mechanism,
            "accountant": acc.spec.accountant, "releases": acc.releases}}

    def _planned(name: str, doc: str):  # noqa: N805  (a property factory, used in the class body)
        def get(self):
            return self._plan[name]

        def refuse(self, value):
            raise SlimtuneError(f"slimtune.{type(self).__name__}: {name} is what the noise was calibrated for "
                                f"({self._plan[name]}); changing it would sample or stop at what the accountant did "
                                "not price: build a new optimizer (a model that holds private steps needs their "
                                "state: load_state_dict)")
        return property(get, refuse, doc=doc)

    dataset_size = _planned("dataset_size", "The number of training examples the sampling rate is priced at.")
    batch_size = _planned("batch_size", "The expected Poisson batch size the sampling rate is priced at.")
    steps = _planned("steps", "The steps the noise was calibrated for; a further step is refused.")
    del _planned

    @property
    def noise_multiplier(self) -> float:
        """sigma: the noise on one released scalar, relative to the clipped sum's sensitivity."""
        return self.accountant.noise

    @property
    def epsilon_spent(self) -> float:
        """Epsilon after the steps taken so far (at the accountant's delta)."""
        with python_terms(f"slimtune.{type(self).__name__}", self.aliases):
            return self.accountant.epsilon(self.impl.step_count)

    @property
    def delta(self) -> float:
        return self.accountant.spec.delta

    def sample_batch(self) -> list[int]:
        """Indices (into the dataset of `dataset_size` examples) of the next step's Poisson batch, drawn from the
        secret key: possibly empty, of random size; the closure must evaluate exactly these examples (step()
        refuses a step with no draw, or a closure returning another number of losses)."""
        return self._draw(self.impl.step_count)

    def _draw(self, step: int) -> list[int]:
        """The Poisson batch of step `step` (`slimtune.hf.PoissonBatches` draws ahead of the steps), its size kept for
        that step's check."""
        from slimtune.data import PoissonSampler
        indices = PoissonSampler(self.dataset_size, self.batch_size, key=self._key).indices(step)
        self._drawn[step] = len(indices)
        return indices

    def _examples_drawn(self) -> int | None:
        return self._drawn[self.impl.step_count]

    def step(self, closure: Closure | None = None) -> StepOutput | None:  # type: ignore[override]
        name = type(self).__name__
        if closure is not None and self.impl._broken:  # a failed step's weights: nothing is checked against them
            raise SlimtuneError(self.impl._broken)
        if closure is not None and self.impl.step_count >= self.steps:
            raise SlimtuneError(f"slimtune.{name}: the noise was calibrated for {self.steps} steps "
                                f"(epsilon {self.accountant.spec.target_epsilon}); a further step would spend more "
                                "than the budget (build it with a larger `steps`)")
        if closure is not None and self.impl.step_count not in self._drawn:
            raise SlimtuneError(f"slimtune.{name}.step: no batch was drawn for this step: call sample_batch() before "
                                "each step and evaluate exactly its examples (the accountant prices a Poisson sample "
                                "drawn from this optimizer's secret key; a DataLoader's batches, or the draw of "
                                "another step, are not it)")
        params, model = [p for group in self.param_groups for p in group["params"]], self._model()
        held, owner = released_into(model, params)
        if closure is not None and owner != self._token and held > self.impl.step_count:
            raise SlimtuneError(f"slimtune.{name}: these weights already hold {held} private steps of another "
                                "optimizer, which this one's epsilon_spent would leave out: continue that optimizer, "
                                "or build this one and load_state_dict its state; to train on other data under a budget "
                                "of its own, start from a fresh copy of the model")
        before = self.impl.step_count
        self.impl._owner_stepping = True
        try:
            return super().step(closure)
        finally:
            self.impl._owner_stepping = False  # also when the step never reached the inner one
            if self.impl.step_count > before:  # counted once its update began, even if it failed there
                self._released += 1  # never goes down: load_state_dict cannot make this key's releases unspent
                self._drawn = {t: n for t, n in self._drawn.items() if t >= self.impl.step_count}
                record_release(model, params, self._token, self.impl.step_count)

    def load_state_dict(self, state_dict: dict) -> None:
        """As `ZerothOrderOptimizer.load_state_dict`, into an optimizer that has released nothing yet: rolling one
        back to an earlier state would forget what its key already released (epsilon_spent would drop, and the same
        secret batch would be measured again along the same direction with fresh noise)."""
        if self._released:
            raise SlimtuneError(f"slimtune.{type(self).__name__}.load_state_dict: this optimizer has already released "
                                f"{self._released} steps under its key, which a restored state would forget: build a "
                                "new optimizer to load a state into")
        super().load_state_dict(state_dict)


def _privacy(epsilon, delta, noise_multiplier, clip, clipping, target_quantile, clip_lr, clip_multiplier, mechanism,
             accountant) -> dict:
    return dict(epsilon=epsilon, delta=delta, noise_multiplier=noise_multiplier, clip=clip, clipping=clipping,
                target_quantile=target_quantile, clip_lr=clip_lr, clip_multiplier=clip_multiplier,
                mechanism=mechanism, accountant=accountant, pld_discretization=default("pld_discretization"))


class DPZero(PrivateOptimizer):
    """DPZero (Zhang et al., 2024): MeZO whose projected gradient is released privately.

    Per example i: g_i = (l_i(theta + eps z) - l_i(theta - eps z)) / (2 eps), clipped to [-C, C]; released
    g = (sum_i clip(g_i) + N(0, (sigma C)^2)) / batch_size; theta <- theta - lr g z. sigma is calibrated so that `steps`
    Poisson-sampled steps spend (epsilon, delta); with adaptive clipping (the default) C tracks the `target_quantile`
    of |g_i| through a noisy, accounted count. See `PrivateOptimizer` for sampling, the key and the state.

    Args:
        model: the model; only trainable parameters are perturbed.
        epsilon: the budget of the whole run (None: 6, unless `noise_multiplier` is given).
        delta: the budget's delta (< 1 / dataset_size).
        dataset_size: N, the number of training examples batches are sampled from.
        batch_size: the expected Poisson batch size B (sampling rate B / N).
        steps: the steps the budget covers (None: the defaults table's, 2,000).
        noise_multiplier: a fixed sigma instead of calibrating to epsilon.
        clip: the clipping threshold C (the starting C with adaptive clipping).
        clipping: `auto` (adaptive with Gaussian noise), `adaptive` or `fixed`.
        target_quantile: adaptive clipping: the quantile of |g_i| tracked.
        clip_lr: adaptive clipping: Q <- Q exp(-clip_lr (fraction below Q - target_quantile)).
        clip_multiplier: adaptive clipping: C = clip_multiplier x the tracked quantile.
        mechanism: `gaussian` or `laplace`.
        accountant: `rdp` or `pld` (tighter).
        lr: as `MeZO`.
        eps: as `MeZO`.
        weight_decay: as `MeZO`.
        n_spsa: directions per step; each is one more release in the accountant.
        perturbation: as `MeZO`.
        seed: as `MeZO` (public: it decides the directions, not the noise or the batches).
    """

    method = "dpzero"

    def __init__(self, model: torch.nn.Module, *, dataset_size: int, batch_size: int, epsilon: float | None = None,
                 delta: float = 1e-5, steps: int | None = None, noise_multiplier: float | None = None,
                 clip: float = 1.0, clipping: str = "auto", target_quantile: float = 0.9, clip_lr: float = 0.2,
                 clip_multiplier: float = 2.0, mechanism: str = "gaussian", accountant: str = "rdp",
                 lr: float | None = None, eps: float | None = None, weight_decay: float = 0.0, n_spsa: int = 1,
                 perturbation: str | None = None, seed: int = 0):
        super().__init__(model, dict(lr=lr, eps=eps, weight_decay=weight_decay, n_spsa=n_spsa,
                                     perturbation=perturbation, seed=seed),
                         _privacy(epsilon, delta, noise_multiplier, clip, clipping, target_quantile, clip_lr,
                                  clip_multiplier, mechanism, accountant), dataset_size, batch_size, steps)


class DPLOZO(PrivateOptimizer):
    """DP-LOZO: LOZO's low-rank directions with DPZero's private scalar. Arguments as `DPZero`, plus LOZO's `rank`
    and `nu`."""

    method = "dplozo"
    aliases = {"rank": "lozo_rank", "nu": "lozo_nu"}

    def __init__(self, model: torch.nn.Module, *, dataset_size: int, batch_size: int, epsilon: float | None = None,
                 delta: float = 1e-5, steps: int | None = None, noise_multiplier: float | None = None,
                 clip: float = 1.0, clipping: str = "auto", target_quantile: float = 0.9, clip_lr: float = 0.2,
                 clip_multiplier: float = 2.0, mechanism: str = "gaussian", accountant: str = "rdp",
                 lr: float | None = None, eps: float | None = None, weight_decay: float = 0.0, n_spsa: int = 1,
                 rank: int = 2, nu: int = 50, seed: int = 0):
        super().__init__(model, dict(lr=lr, eps=eps, weight_decay=weight_decay, n_spsa=n_spsa, rank=rank, nu=nu,
                                     seed=seed),
                         _privacy(epsilon, delta, noise_multiplier, clip, clipping, target_quantile, clip_lr,
                                  clip_multiplier, mechanism, accountant), dataset_size, batch_size, steps)


class DPHiZOO(PrivateOptimizer):
    """DP-HiZOO: HiZOO whose projected gradient and curvature scalar are both DPZero releases (2 per step in the
    accountant). Arguments as `DPZero`, plus HiZOO's `hessian_smooth`."""

    method = "dphizoo"

    def __init__(self, model: torch.nn.Module, *, dataset_size: int, batch_size: int, epsilon: float | None = None,
                 delta: float = 1e-5, steps: int | None = None, noise_multiplier: float | None = None,
                 clip: float = 1.0, clipping: str = "auto", target_quantile: float = 0.9, clip_lr: float = 0.2,
                 clip_multiplier: float = 2.0, mechanism: str = "gaussian", accountant: str = "rdp",
                 lr: float | None = None, eps: float | None = None, weight_decay: float = 0.0,
                 hessian_smooth: float | None = None, perturbation: str | None = None, seed: int = 0):
        super().__init__(model, dict(lr=lr, eps=eps, weight_decay=weight_decay, hessian_smooth=hessian_smooth,
                                     perturbation=perturbation, seed=seed),
                         _privacy(epsilon, delta, noise_multiplier, clip, clipping, target_quantile, clip_lr,
                                  clip_multiplier, mechanism, accountant), dataset_size, batch_size, steps)


class DPHybrid(PrivateOptimizer):
    """DP-hybrid: `Hybrid` made private. The ZO scalar of the low part is DPZero's release; the top blocks' gradient is
    DP-AdamW's (each example's gradient clipped to L2 norm `fo_clip`, summed, Gaussian noise of the same sigma
    relative to its sensitivity, divided by batch_size). Two releases per step in the accountant. Arguments as
    `DPZero`, plus `Hybrid`'s `fo_layers` and `fo_lr`, and `fo_clip` (default 1)."""

    method = "dphybrid"

    def __init__(self, model: torch.nn.Module, *, dataset_size: int, batch_size: int, epsilon: float | None = None,
                 delta: float = 1e-5, steps: int | None = None, noise_multiplier: float | None = None,
                 clip: float = 1.0, clipping: str = "auto", target_quantile: float = 0.9, clip_lr: float = 0.2,
                 clip_multiplier: float = 2.0, accountant: str = "rdp", lr: float | None = None,
                 eps: float | None = None, weight_decay: float = 0.0, fo_layers: int | None = None,
                 fo_lr: float | None = None, fo_clip: float | None = None, perturbation: str | None = None,
                 seed: int = 0):
        super().__init__(model, dict(lr=lr, eps=eps, weight_decay=weight_decay, fo_layers=fo_layers, fo_lr=fo_lr,
                                     fo_clip=fo_clip, perturbation=perturbation, seed=seed),
                         _privacy(epsilon, delta, noise_multiplier, clip, clipping, target_quantile, clip_lr,
                                  clip_multiplier, "gaussian", accountant), dataset_size, batch_size, steps)


# name (as `--optimizer`) -> class; what slimtune.hf.ZOArguments(optimizer=...) builds
OPTIMIZERS: dict[str, type[ZerothOrderOptimizer]] = {
    "mezo": MeZO, "lozo": LOZO, "lozo-m": LOZO, "fzoo": FZOO, "hizoo": HiZOO, "hizoo-l": HiZOOL,
    "sparse-mezo": SparseMeZO, "hybrid": Hybrid, "dpzero": DPZero, "dplozo": DPLOZO, "dphizoo": DPHiZOO,
    "dphybrid": DPHybrid}

__all__ = ["ZerothOrderOptimizer", "PrivateOptimizer", "MeZO", "LOZO", "FZOO", "HiZOO", "HiZOOL", "SparseMeZO",
           "Hybrid", "DPZero", "DPLOZO", "DPHiZOO", "DPHybrid", "OPTIMIZERS", "StepOutput", "peft_kind"]

"""Optimizer registry: every optimizer, first-order or zeroth-order, private or not, behind `step(closure)`."""

from __future__ import annotations

from dataclasses import dataclass

from slimtune import SlimtuneError
from slimtune.optim.methods import FIRST_ORDER, HYBRID, OPTIMIZERS, PRIVATE, ZEROTH_ORDER, mechanism_refusal


@dataclass
class OptimizerArgs:
    """Everything an optimizer may read; each optimizer takes the fields it knows."""

    lr: float | None = None  # None: the per-method default (optim/defaults.py)
    weight_decay: float = 0.0
    eps: float | None = None  # ZO perturbation scale; None: the per-method default
    n_spsa: int = 1
    seed: int = 0
    rank: int = 2  # LOZO
    nu: int = 50  # LOZO
    momentum: float = 0.0  # LOZO-M, SGD
    perturbation: str | None = None  # gaussian, rademacher or pool (zo/perturbation.py); None: the method's own
    # issue 36 (optim/builders.py); None: the defaults table's value or the method's own default
    hessian_smooth: float | None = None  # HiZOO/HiZOO-L/DP-HiZOO: alpha of the diagonal Hessian's moving average
    sparsity: float | None = None  # sparse-mezo: fraction of each tensor left unperturbed (its largest |w|; 0.75)
    mask_every: int | None = None  # sparse-mezo: masks recomputed from the weights every this many steps (50)
    fo_layers: int | None = None  # hybrid: top transformer blocks trained by backprop, with the head (2)
    fo_lr: float | None = None  # hybrid: AdamW lr of the top part
    fo_clip: float | None = None  # dphybrid: per-example L2 clip of the top part's gradient (1.0)


# the names by kind, from the one table (optim/methods.py)
ZO_OPTIMIZERS, FO_OPTIMIZERS, HYBRID_OPTIMIZERS, PRIVATE_OPTIMIZERS = ZEROTH_ORDER, FIRST_ORDER, HYBRID, PRIVATE


def __getattr__(name: str):
    """SlimOptimizer and StepOutput load with torch, on first use (this package's import stays torch-free)."""
    if name in ("SlimOptimizer", "StepOutput"):
        from slimtune.optim import base
        return getattr(base, name)
    raise AttributeError(f"module 'slimtune.optim' has no attribute {name!r}")


def build_optimizer(name: str, model, args: OptimizerArgs, private=None) -> "SlimOptimizer":
    """`private`: (PrivacySpec, noise_multiplier, expected_batch_size, noise[, quantile_noise]) for the DP
    optimizers. noise: the run's `KeyedNoise` (slimtune.privacy.secret; None: a fresh in-memory key from the OS).
    quantile_noise > 0 turns on DPZero's adaptive clipping (its count noise sigma_b, accounted by
    privacy.accountant.plan).
    """
    from slimtune.optim.first_order import FirstOrder, FirstOrderConfig
    from slimtune.zo import FZOO, LOZO, LOZOConfig, MeZO, MeZOConfig
    from slimtune.zo.fzoo import FZOOConfig

    if name not in OPTIMIZERS:
        raise SlimtuneError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if (name in PRIVATE_OPTIMIZERS) != (private is not None):
        raise SlimtuneError(f"optimizer {name}: privacy settings are {'required' if private is None else 'not used'}")
    refusal = private is not None and mechanism_refusal(name, private[0].mechanism, args.n_spsa, private[0].clipping)
    if refusal:
        raise SlimtuneError(refusal)
    unset = {k: v for k, v in vars(args).items() if v is None}
    if unset:  # a caller without a TrainConfig (federated clients, always LoRA): the method's LoRA defaults
        from dataclasses import replace
        from slimtune.optim.defaults import defaults_for, method_settings
        d = defaults_for(name, "lora")
        table = {"lr": d.lr, "eps": d.eps or 1e-3, **method_settings(name, "lora")}
        args = replace(args, **{k: table[k] for k in unset if k in table})
    from slimtune.optim import builders
    from slimtune.zo.perturbation import check_perturbation
    check_perturbation(args.perturbation, name)
    builders.check_optimizer_args(name, args)
    params = list(model.named_parameters())
    if name in ("adamw", "sgd"):
        return FirstOrder(params, FirstOrderConfig(args.lr, args.weight_decay, args.momentum), name)
    if name in ("dp-adamw", "dp-sgd"):
        from slimtune.privacy.dpsgd import DPFirstOrder
        spec, sigma, batch, keyed_noise = private[:4]
        return DPFirstOrder(model, FirstOrderConfig(args.lr, args.weight_decay, args.momentum), name[3:], spec,
                            sigma, batch, keyed_noise)
    mezo_cfg = dict(lr=args.lr, eps=args.eps, weight_decay=args.weight_decay, n_spsa=args.n_spsa, seed=args.seed)
    if name in builders.BUILT_HERE:
        opt = builders.build(name, params, model, args, private, mezo_cfg)
        opt.name = name
        return opt
    estimator = None if private is None else builders.private_difference(private)
    if name == "fzoo":
        n = args.n_spsa if args.n_spsa > 1 else 8  # --n-spsa: FZOO's N one-sided directions per step
        opt = FZOO(params, FZOOConfig(**{**mezo_cfg, "n_spsa": 1}, n_perturbations=n, perturbation=args.perturbation))
    elif name in ("mezo", "dpzero"):
        opt = MeZO(params, MeZOConfig(**mezo_cfg, perturbation=args.perturbation), estimator)
    else:
        momentum = args.momentum if name == "lozo-m" else 0.0
        if name == "lozo-m" and not momentum:
            momentum = 0.9
        opt = LOZO(params, LOZOConfig(**mezo_cfg, rank=args.rank, nu=args.nu, momentum=momentum), estimator,
                   model=model)
    opt.name = name
    return opt


__all__ = ["OptimizerArgs", "OPTIMIZERS", "ZO_OPTIMIZERS", "HYBRID_OPTIMIZERS", "PRIVATE_OPTIMIZERS", "build_optimizer",
           "SlimOptimizer", "StepOutput"]

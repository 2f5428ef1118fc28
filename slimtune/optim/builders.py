"""Construction and settings checks of the curvature, sparse and hybrid optimizers (issue 36): `hizoo`, `hizoo-l`,
`dphizoo` (zo/hizoo.py), `sparse-mezo` (zo/sparse.py), `hybrid` and `dphybrid` (optim/hybrid.py). The registry
(optim/__init__.py) dispatches here."""

from __future__ import annotations

from slimtune import SlimtuneError
from slimtune.optim.methods import HYBRID as HYBRIDS, METHODS

HIZOO_OPTIMIZERS = ("hizoo", "hizoo-l", "dphizoo")
BUILT_HERE = (*HIZOO_OPTIMIZERS, "sparse-mezo", *HYBRIDS)

# setting -> (flag, optimizers that read it)
SETTING_USERS = {
    "hessian_smooth": ("--hessian-smooth", HIZOO_OPTIMIZERS),
    "sparsity": ("--sparsity", ("sparse-mezo",)),
    "mask_every": ("--mask-every", ("sparse-mezo",)),
    "fo_layers": ("--fo-layers", HYBRIDS),
    "fo_lr": ("--fo-lr", HYBRIDS),
    "fo_clip": ("--fo-clip", ("dphybrid",)),
}


def private_releases(optimizer: str, n_spsa: int) -> int:
    """Noisy scalars one private step releases on its batch (each with its own clipped sum and Gaussian noise; with
    adaptive clipping each comes with its noisy count): DPZero / DP-LOZO one per SPSA direction; DP-HiZOO two, the
    projected gradient and the curvature; DP-hybrid two, the scalar below and the top part's gradient; DP-SGD /
    DP-AdamW one gradient."""
    method = METHODS[optimizer]
    return method.releases * (n_spsa if method.n_spsa else 1)


def check_optimizer_args(optimizer: str, args) -> None:
    """One-line errors for settings `optimizer` cannot use or values out of range (before any model is loaded)."""
    for field, (flag, users) in SETTING_USERS.items():
        value = getattr(args, field, None)
        if value is not None and optimizer not in users:
            raise SlimtuneError(f"{flag} is a setting of {', '.join(users)}, not of --optimizer {optimizer}")
    if args.hessian_smooth is not None and not 0 < args.hessian_smooth < 1:
        raise SlimtuneError(f"--hessian-smooth {args.hessian_smooth}: must be in (0, 1)")
    if args.sparsity is not None and not 0 <= args.sparsity < 1:
        raise SlimtuneError(f"--sparsity {args.sparsity}: the fraction of each tensor left unperturbed must be in "
                            "[0, 1)")
    for flag, value in (("--mask-every", args.mask_every), ("--fo-layers", args.fo_layers)):
        if value is not None and value < 1:
            raise SlimtuneError(f"{flag} must be >= 1, got {value}")
    if args.fo_clip is not None and not args.fo_clip > 0:
        raise SlimtuneError(f"--fo-clip must be > 0, got {args.fo_clip}")
    if args.fo_lr is not None and not args.fo_lr > 0:
        raise SlimtuneError(f"--fo-lr must be > 0, got {args.fo_lr}")
    if optimizer in HIZOO_OPTIMIZERS and args.n_spsa != 1:
        raise SlimtuneError(f"--n-spsa {args.n_spsa}: {optimizer} takes one direction per step (its Hessian update "
                            "follows each one); leave --n-spsa at 1")
    if optimizer in HYBRIDS and args.n_spsa != 1:
        raise SlimtuneError(f"--n-spsa {args.n_spsa}: {optimizer} takes one ZO direction per step; leave --n-spsa "
                            "at 1")


def build(name: str, params: list, model, args, private, mezo_cfg: dict):
    """The optimizer `name` (one of BUILT_HERE) over `params`, every setting in `args` resolved
    (optim.defaults.method_settings); `private` as in optim.build_optimizer."""
    if name in HIZOO_OPTIMIZERS:
        from slimtune.zo.hizoo import HiZOO, HiZOOConfig
        estimator = curvature = None
        if private is not None:
            estimator, curvature = private_pair(private)
        config = HiZOOConfig(**mezo_cfg, perturbation=args.perturbation, hessian_smooth=args.hessian_smooth,
                             factored=name == "hizoo-l")
        return HiZOO(params, config, estimator, curvature)
    if name == "sparse-mezo":
        from slimtune.zo.sparse import SparseMeZO, SparseMeZOConfig
        config = SparseMeZOConfig(**mezo_cfg, perturbation=args.perturbation,
                                  sparsity=args.sparsity, mask_every=args.mask_every)
        return SparseMeZO(params, config)
    if name in HYBRIDS:
        from slimtune.optim.hybrid import DPHybrid, Hybrid, HybridConfig
        config = HybridConfig(**mezo_cfg, perturbation=args.perturbation, fo_layers=args.fo_layers,
                              fo_lr=args.fo_lr, fo_clip=args.fo_clip)
        if name == "hybrid":
            return Hybrid(params, config, model)
        spec, sigma, batch = private[:3]
        return DPHybrid(params, config, model, private_difference(private), spec, sigma, batch)
    raise SlimtuneError(f"unknown optimizer {name!r}")


def private_difference(private):
    """DPZero's mechanism (privacy/dpzero.py) from the registry's `private` tuple (spec, sigma, expected batch size,
    KeyedNoise or None for a fresh in-memory key[, quantile_noise > 0: adaptive clipping])."""
    from slimtune.privacy.dpzero import PrivateDifference

    spec, sigma, batch, keyed_noise, *rest = private
    return PrivateDifference(spec, sigma, batch, keyed_noise, quantile_noise=rest[0] if rest else 0.0)


def private_pair(private):
    """DP-HiZOO's two DPZero mechanisms: the projected gradient's and the curvature's. Both draw from the run's one
    KeyedNoise (draws are numbered within a step, so the four values of a step — two scalars, two counts when
    adaptive — are distinct PRF outputs); the curvature has its own clip (adaptive when the gradient's is)."""
    from slimtune.zo.hizoo import PrivateCurvature

    gradient = private_difference(private)
    shared = (*private[:3], gradient.keyed_noise, *private[4:])  # a fresh key when none was given: one for both
    return gradient, PrivateCurvature(private_difference(shared))

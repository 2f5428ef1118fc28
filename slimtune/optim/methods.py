"""What each optimizer is: one table, from which every list of optimizer names in the package is derived (the
settings' flags and rules, the registry, the memory planner, the perturbation sources, the accountant's releases,
the defaults table's families). A new optimizer is one row here plus its code. Torch-free: the CLI checks settings
before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # as --optimizer
    kind: str  # "first-order" (backprop), "zeroth-order" (forward passes only) or "hybrid" (both, one step)
    family: str  # its entry in the defaults table (optim/defaults.py): a private method shares its base's
    private: bool = False  # a DP optimizer: calibrated noise, Poisson batches, an accountant
    releases: int = 1  # private: noisy values released per step (per SPSA direction)
    adaptive_clipping: bool = False  # private ZO scalar: its clip can track a quantile privately
    sources: bool = False  # --perturbation gaussian / rademacher / pool (a chunked z buffer)
    n_spsa: bool = False  # --n-spsa: several directions per step
    laplace: bool = False  # private: its release is one scalar (L1 = L2 sensitivity), so Laplace noise may replace
    #                        Gaussian; a vector (DP-SGD's gradient) or two releases a step are accounted as Gaussian


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("adamw", "first-order", "adamw"),
    Method("sgd", "first-order", "sgd"),
    Method("dp-adamw", "first-order", "adamw", private=True),
    Method("dp-sgd", "first-order", "sgd", private=True),
    Method("mezo", "zeroth-order", "mezo", sources=True, n_spsa=True),
    Method("lozo", "zeroth-order", "lozo", n_spsa=True),
    Method("lozo-m", "zeroth-order", "lozo", n_spsa=True),
    Method("fzoo", "zeroth-order", "fzoo", sources=True, n_spsa=True),
    Method("dpzero", "zeroth-order", "mezo", private=True, adaptive_clipping=True, sources=True, n_spsa=True,
           laplace=True),
    Method("dplozo", "zeroth-order", "lozo", private=True, adaptive_clipping=True, n_spsa=True, laplace=True),
    Method("hizoo", "zeroth-order", "hizoo", sources=True),
    Method("hizoo-l", "zeroth-order", "hizoo-l", sources=True),
    Method("dphizoo", "zeroth-order", "hizoo", private=True, releases=2, adaptive_clipping=True, sources=True),
    Method("sparse-mezo", "zeroth-order", "sparse-mezo", sources=True),
    Method("hybrid", "hybrid", "hybrid", sources=True),
    Method("dphybrid", "hybrid", "hybrid", private=True, releases=2, adaptive_clipping=True, sources=True),
)}


# A method-specific setting's value when neither a flag nor the defaults table (optim/defaults.py, whose entries may
# give their own) says: the one copy the configs' defaults, the settings, the planner and the resolution read.
# (train/resume.py USED_FOR_NULL keeps its own copy on purpose: what runs recorded before these were resolved used.)
METHOD_CONSTANTS = {"hessian_smooth": 1e-4, "sparsity": 0.75, "mask_every": 50, "fo_layers": 2, "fo_lr": 1e-3,
                    "fo_clip": 1.0}


def mechanism_refusal(optimizer: str, mechanism: str, n_spsa: int | None, clipping: str = "auto") -> str | None:
    """Why `mechanism` cannot noise `optimizer`'s releases (None: it can). Laplace noise is accounted for one scalar a
    step, its L1 sensitivity the clip: DPZero's and DP-LOZO's with one direction, at a fixed clip (adaptive clipping's
    quantile estimate is accounted with Gaussian noise only). The CLI's settings, the registry (every Python and
    federated path), the Hugging Face trainer and the accountant's callers all ask here."""
    if mechanism != "laplace" or optimizer not in METHODS or not METHODS[optimizer].private:
        return None
    if optimizer in ("dphizoo", "dphybrid"):
        what = "gradient and curvature" if optimizer == "dphizoo" else "the ZO scalar and the top gradient"
        return (f"--mechanism laplace: {optimizer} releases two values per step ({what}) and Laplace noise is "
                "accounted for one; use --mechanism gaussian")
    if not METHODS[optimizer].laplace:
        return (f"--mechanism laplace: {optimizer} releases a clipped gradient vector with Gaussian noise (Opacus), "
                "whose L2 sensitivity Laplace accounting does not cover; use --mechanism gaussian")
    if (n_spsa or 1) > 1:
        return (f"--mechanism laplace releases one scalar per step; --n-spsa {n_spsa} would release {n_spsa}: use "
                "--mechanism gaussian or --n-spsa 1")
    if clipping == "adaptive":
        return ("--clipping adaptive: its quantile estimate is accounted with Gaussian noise only; with --mechanism "
                "laplace use --clipping fixed (or auto)")
    return None


SOURCES = ("gaussian", "rademacher", "pool")  # where z comes from (zo/perturbation.py)


def perturbation_refusal(source: str | None, optimizer: str) -> str | None:
    """Why --perturbation `source` cannot be used with `optimizer` (None: it can, or None given: the method's own,
    optim.defaults.default_perturbation): a source that does not exist, one an optimizer without sources would
    ignore, or Gaussian for FZOO, which draws Rademacher directions or the pool's slices (its Gaussian option was
    silently Rademacher, and a run's config.json that says gaussian for FZOO means that)."""
    if source is None:
        return None
    if source not in SOURCES:
        return f"--perturbation {source!r}: choose one of {', '.join(SOURCES)}"
    with_sources = names(sources=True)
    if source != "gaussian" and optimizer not in with_sources:
        return f"--perturbation {source} is for {', '.join(with_sources)}, not {optimizer}"
    if source == "gaussian" and optimizer == "fzoo":
        return ("--perturbation gaussian: fzoo draws Rademacher directions (its default) or slices of the Gaussian "
                "pool (--perturbation pool)")
    return None


def names(**where) -> tuple[str, ...]:
    """The optimizers whose fields equal `where` (names(kind="hybrid"), names(private=True)), in table order."""
    return tuple(m.name for m in METHODS.values() if all(getattr(m, k) == v for k, v in where.items()))


FIRST_ORDER = names(kind="first-order")
ZEROTH_ORDER = names(kind="zeroth-order")
HYBRID = names(kind="hybrid")
PRIVATE = names(private=True)
ADAPTIVE_CLIPPING = names(adaptive_clipping=True)
WITH_SOURCES = names(sources=True)
N_SPSA = names(n_spsa=True)
OPTIMIZERS = tuple(METHODS)

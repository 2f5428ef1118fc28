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


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("adamw", "first-order", "adamw"),
    Method("sgd", "first-order", "sgd"),
    Method("dp-adamw", "first-order", "adamw", private=True),
    Method("dp-sgd", "first-order", "sgd", private=True),
    Method("mezo", "zeroth-order", "mezo", sources=True, n_spsa=True),
    Method("lozo", "zeroth-order", "lozo", n_spsa=True),
    Method("lozo-m", "zeroth-order", "lozo", n_spsa=True),
    Method("fzoo", "zeroth-order", "fzoo", sources=True, n_spsa=True),
    Method("dpzero", "zeroth-order", "mezo", private=True, adaptive_clipping=True, sources=True, n_spsa=True),
    Method("dplozo", "zeroth-order", "lozo", private=True, adaptive_clipping=True, n_spsa=True),
    Method("hizoo", "zeroth-order", "hizoo", sources=True),
    Method("hizoo-l", "zeroth-order", "hizoo-l", sources=True),
    Method("dphizoo", "zeroth-order", "hizoo", private=True, releases=2, adaptive_clipping=True, sources=True),
    Method("sparse-mezo", "zeroth-order", "sparse-mezo", sources=True),
    Method("hybrid", "hybrid", "hybrid", sources=True),
    Method("dphybrid", "hybrid", "hybrid", private=True, releases=2, adaptive_clipping=True, sources=True),
)}


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

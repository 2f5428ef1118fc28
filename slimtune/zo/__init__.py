"""Zeroth-order (forward-only) optimizers: MeZO (ZO-SGD with SPSA), LOZO and LOZO-M (low-rank perturbations),
FZOO (batched one-sided Rademacher steps scaled by the loss spread)."""

from slimtune.zo.estimators import MeanDifference
from slimtune.zo.fzoo import FZOO, FZOOConfig
from slimtune.zo.lozo import LOZO, LOZOConfig
from slimtune.zo.mezo import MeZO, MeZOConfig, ZOOptimizer

__all__ = ["FZOO", "FZOOConfig", "MeanDifference", "LOZO", "LOZOConfig", "MeZO", "MeZOConfig", "ZOOptimizer"]

"""Zeroth-order (forward-only) optimizers: MeZO (ZO-SGD with SPSA), LOZO and LOZO-M (low-rank perturbations)."""

from slimtune.zo.estimators import MeanDifference
from slimtune.zo.lozo import LOZO, LOZOConfig
from slimtune.zo.mezo import MeZO, MeZOConfig, ZOOptimizer

__all__ = ["MeanDifference", "LOZO", "LOZOConfig", "MeZO", "MeZOConfig", "ZOOptimizer"]

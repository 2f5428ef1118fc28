"""Turn the two SPSA measurements into the scalar projected gradient. DP variants live in slimtune.privacy."""

from __future__ import annotations

import torch


class MeanDifference:
    """g = (mean L(theta + eps z) - mean L(theta - eps z)) / (2 eps)."""

    def __call__(self, losses_plus: torch.Tensor, losses_minus: torch.Tensor, eps: float) -> tuple[float, dict]:
        if losses_plus.numel() == 0:
            return 0.0, {}
        diff = (losses_plus.float().mean() - losses_minus.float().mean()).item()
        return diff / (2 * eps), {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

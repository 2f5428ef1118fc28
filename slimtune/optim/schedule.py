"""Learning-rate schedules with the names and meaning of `transformers.get_scheduler`.

The multiplier is a pure function of the step (the schedule's LambdaLR lambda), so a resumed run continues the same
curve without scheduler state, and zeroth-order optimizers (which have no torch optimizer) use it the same way:
lr_t = lr * multiplier(t).
"""

from __future__ import annotations

from typing import Callable

import torch

from slimtune import SlimtuneError

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
             "inverse_sqrt")


def lr_multiplier(name: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """transformers' schedule `name` over `total_steps`, with `warmup_steps` of linear warm-up from 0."""
    from transformers import get_scheduler

    if name not in SCHEDULES:
        raise SlimtuneError(f"--lr-scheduler {name!r}: choose one of {', '.join(SCHEDULES)}")
    if not 0 <= warmup_steps < max(total_steps, 1):
        raise SlimtuneError(f"--warmup-steps {warmup_steps}: must be >= 0 and below --steps ({total_steps})")
    if name == "constant" and warmup_steps:
        name = "constant_with_warmup"
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return get_scheduler(name, dummy, num_warmup_steps=warmup_steps, num_training_steps=total_steps).lr_lambdas[0]

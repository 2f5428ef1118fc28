"""One torch-like interface for every optimizer: `step(closure)` where the closure returns per-example losses."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

Closure = Callable[[], torch.Tensor]


@dataclass
class StepOutput:
    loss: float  # mean training loss measured in this step
    info: dict = field(default_factory=dict)  # optimizer-specific scalars (projected gradient, clipped fraction...)


class SlimOptimizer:
    """Base class. `zeroth_order` optimizers call the closure under inference mode and never call backward."""

    name = "base"
    zeroth_order = False

    def step(self, closure: Closure) -> StepOutput:
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next step (schedules call this before each step)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


@contextmanager
def deferred_interrupt():
    """Ctrl-C (SIGINT) inside the block is held until the block ends, then handed to the handler that was in place
    (Python's: KeyboardInterrupt; `slimtune train`'s: stop after this step): a sweep over the weights is never cut
    part-way. Signal handlers live in the main thread; elsewhere the block runs as it is."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None:  # not the main thread, or a handler installed outside Python: nothing to hold it with
        yield
        return
    held: list = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for frame in held:  # each press, in order (`slimtune train`: the second one stops at once)
            if callable(previous):
                previous(signal.SIGINT, frame)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)  # the default action, now that the sweep is whole


def trainable(named_params) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in named_params if p.requires_grad]


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices only: never to biases, norms or other 1-D parameters."""
    return param.ndim >= 2 and "norm" not in name.lower() and "bias" not in name.lower()


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 steps)."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1

"""Hybrid ZO/backprop: AdamW on the top k transformer blocks and everything after them (final norm, LM head),
MeZO (two-sided SPSA, seed trick) on every trainable parameter below, in one step on one batch (the ElasticZO /
Addax idea: backprop where it is cheap, forward-only where it is not).

Split: a trainable parameter is *top* if every module that uses it runs after the first of the top k blocks begins
(found once, by a 2-token forward with pre-hooks that record the call order); the rest is *low*. A weight tied
between the embedding and the LM head is used below too, so it is low (ZO estimates its whole directional
derivative). One step, with z over the low parameters from the step seed:

    theta_low += eps z;   L_+ = L(theta),  grad_top = dL_+/d theta_top        (forward + backward through the top only)
    theta_low -= 2 eps z; L_- = L(theta)                                       (forward, inference mode)
    g = (L_+ - L_-) / (2 eps);  theta_low += eps z;  theta_low -= lr g z      (MeZO's fused restore + update)
    theta_top <- AdamW(theta_top, grad_top, lr = fo_lr)

The top gradient is taken at theta_low + eps z, an O(eps) shift of the point (eps ~ 1e-2 on LoRA, 1e-3 full).
Memory: during the first forward the low parameters have requires_grad off and no input of the low part requires a
gradient, so autograd records nothing below block L - k: the only memory beyond MeZO's is the top blocks'
activations kept for backward, their gradients and AdamW's two moments (report/memory_model.py, "hybrid").
Dropout is off as in every ZO method (`zeroth_order`): the two measurements must see the same function.

Learning rates: `lr` (the schedule's base) is the ZO lr of the low part; the top part runs AdamW at
fo_lr * (current lr / base lr), so one schedule drives both. Not for data-parallel runs (the top gradient would need an
all-reduce; only per-example losses are exchanged) and not private.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from slimtune import SlimtuneError
from slimtune.optim.base import StepOutput, mix_seed, trainable
from slimtune.optim.first_order import param_groups
from slimtune.zo.mezo import MeZOConfig, ZOOptimizer


@dataclass
class HybridConfig(MeZOConfig):
    fo_layers: int = 2  # k: transformer blocks (from the top) trained with backprop, with everything after them
    fo_lr: float = 1e-3  # AdamW's lr for the top part
    betas: tuple[float, float] = (0.9, 0.999)


class Hybrid(ZOOptimizer):
    name = "hybrid"

    def __init__(self, named_params, config: HybridConfig, model: nn.Module):
        params = trainable(named_params)
        top_ids = top_parameters(model, config.fo_layers)
        self.top = [(n, p) for n, p in params if id(p) in top_ids]
        low = [(n, p) for n, p in params if id(p) not in top_ids]
        if not self.top:
            raise SlimtuneError(f"--fo-layers {config.fo_layers}: no trainable parameter in the top "
                                f"{config.fo_layers} blocks or after them (raise --fo-layers or choose --target-modules "
                                "there)")
        self.config = config
        if low:
            super().__init__(low, config)
        else:  # everything trainable is on top: plain AdamW at one forward per step
            self.params, self.step_count = [], 0
        self.fo = torch.optim.AdamW(param_groups(self.top, config.weight_decay), lr=config.fo_lr, betas=config.betas)
        self.base_lr = config.lr

    @property
    def forwards_per_step(self) -> int:
        return 2 if self.params else 1

    def step(self, closure) -> StepOutput:
        eps = self.config.eps
        seed = mix_seed(self.config.seed, self.step_count, 0)
        self.fo.zero_grad(set_to_none=True)
        if self.params:
            self._sweep(seed, "add", alpha=eps)
        with torch.enable_grad(), _frozen([p for _, p, _ in self.params]):
            lp = closure()
            if lp.numel():
                lp.float().mean().backward()
        lp = lp.detach()
        info: dict = {}
        if self.params:
            lm = self._measure(closure, seed, -2 * eps)
            g, info = self.estimator(lp, lm, eps)
            self._sweep(seed, "restore_update", eps=eps, coef=g, decay=True, last=True)
            info = {"projected_grad": g, **info}
            loss = ((lp.float().mean() + lm.float().mean()) / 2).item()
        else:
            loss = lp.float().mean().item()
        self.fo.step()
        self.step_count += 1
        return StepOutput(loss, info)

    def set_lr(self, lr: float) -> None:
        self.config.lr = lr
        scale = lr / self.base_lr if self.base_lr else 1.0
        for group in self.fo.param_groups:
            group["lr"] = self.config.fo_lr * scale

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "fo": self.fo.state_dict(),
                "estimator": self.estimator.state_dict() if self.params else {}}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self.fo.load_state_dict(state["fo"])
        if self.params:
            self.estimator.load_state_dict(state.get("estimator", {}))

    @property
    def top_values(self) -> int:
        return sum(p.numel() for _, p in self.top)


@contextmanager
def _frozen(params: list[torch.Tensor]):
    """requires_grad off for `params` inside the block (restored after, also on errors)."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the first nn.ModuleList as long as config.num_hidden_layers."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers:
            return module
    raise SlimtuneError("--optimizer hybrid: cannot find this model's transformer blocks (a ModuleList of "
                        "config.num_hidden_layers layers)")


def top_parameters(model: nn.Module, k: int) -> set[int]:
    """ids of the parameters every user of which runs after block L - k starts (found by one 2-token forward)."""
    users = parameter_users(model)
    after = modules_after(model, k, [m for ms in users.values() for m in ms])
    return {pid for pid, ms in users.items() if all(id(m) in after for m in ms)}


def parameter_users(model: nn.Module) -> dict[int, list[nn.Module]]:
    """id(parameter) -> the modules holding it directly (several for tied weights)."""
    users: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for q in module._parameters.values():
            if q is not None:
                users.setdefault(id(q), []).append(module)
    return users


def modules_after(model: nn.Module, k: int, modules: list[nn.Module]) -> set[int]:
    """ids of the `modules` first called after block L - k starts, in a 2-token forward (pre-hooks record the order)."""
    blocks = transformer_blocks(model)
    if not 1 <= k <= len(blocks):
        raise SlimtuneError(f"--fo-layers {k}: must be between 1 and the model's {len(blocks)} blocks")
    order: dict[int, int] = {}  # id(module) -> index of its first call
    mark: dict = {}

    def record(module, _args):
        order.setdefault(id(module), len(order))

    def top_starts(_module, _args):
        mark.setdefault("top_from", len(order))

    handles = [m.register_forward_pre_hook(record) for m in {id(m): m for m in modules}.values()]
    handles.append(blocks[len(blocks) - k].register_forward_pre_hook(top_starts, prepend=True))  # before `record`
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2]], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {mid for mid, index in order.items() if index >= mark["top_from"]}

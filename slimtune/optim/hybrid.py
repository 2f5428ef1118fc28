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
all-reduce; only per-example losses are exchanged). Private: `DPHybrid` below (`--optimizer dphybrid`).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from slimtune import SlimtuneError
from slimtune.optim.base import StepOutput, mix_seed, trainable
from slimtune.optim.first_order import adamw, param_groups
from slimtune.optim.methods import METHOD_CONSTANTS
from slimtune.zo.mezo import MeZOConfig, ZOOptimizer


@dataclass
class HybridConfig(MeZOConfig):
    fo_layers: int = METHOD_CONSTANTS["fo_layers"]  # k: top transformer blocks trained with backprop (and after)
    fo_lr: float = METHOD_CONSTANTS["fo_lr"]  # AdamW's lr for the top part
    fo_clip: float = METHOD_CONSTANTS["fo_clip"]  # DPHybrid: per-example L2 clip S of the top part's gradient
    max_grad_norm: float | None = None  # clip of the top part's (released) gradient before AdamW (slimtune.hf:
    #                                     TrainingArguments.max_grad_norm, which transformers applies after the step)
    betas: tuple[float, float] = (0.9, 0.999)


class Hybrid(ZOOptimizer):
    name = "hybrid"

    def __init__(self, named_params, config: HybridConfig, model: nn.Module, estimator=None):
        params = trainable(named_params)
        top_ids = top_parameters(model, config.fo_layers)
        self.top = [(n, p) for n, p in params if id(p) in top_ids]
        low = [(n, p) for n, p in params if id(p) not in top_ids]
        if not self.top:
            raise SlimtuneError(f"--fo-layers {config.fo_layers}: no trainable parameter in the top "
                                f"{config.fo_layers} blocks or after them (raise --fo-layers or choose --target-modules "
                                "there)")
        self.config = config
        from slimtune.optim.first_order import check_full_precision
        check_full_precision(self.top, "hybrid (its top blocks, trained by backprop)")
        if low:
            super().__init__(low, config, estimator)
        else:  # everything trainable is on top: plain AdamW at one forward per step
            self.params, self.step_count = [], 0
        self.fo = adamw(param_groups(self.top, config.weight_decay), config.fo_lr, config.betas)
        self.base_lr = config.lr

    @property
    def forwards_per_step(self) -> int:
        return 2 if self.params else 1

    def _step(self, closure) -> StepOutput:
        eps = self.config.eps
        seed = mix_seed(self.config.seed, self.step_count, 0)
        self.fo.zero_grad(set_to_none=True)
        if self.params:
            self._perturb(seed, eps)
        with torch.enable_grad(), _frozen([p for _, p, _ in self.params]), self._recording():
            lp = closure()
            if lp.numel():
                lp.float().mean().backward()
        lp = lp.detach()
        self._top_gradients_ready(lp)
        info: dict = {}
        if self.params:
            lm = self._measure(closure, seed, -2 * eps)
            g, info = self.estimator(lp, lm, eps)
            info = {"projected_grad": g, **info}
            loss = ((lp.float().mean() + lm.float().mean()) / 2).item()
        else:
            loss = lp.float().mean().item()
        with self._updating():  # the top's step first: its per-example clipping is where memory runs out
            self._top_step()
            if self.params:
                self._sweep(seed, "restore_update", eps=eps, coef=g, decay=True, last=True)
            self._end_step()
        return StepOutput(loss, info)

    def _after_failed_step(self) -> None:
        """Any failed step, before its update or inside it: the top part's gradients go (the next step's backward
        would add to them; a private one's may be un-noised) with whatever per-example state the step left."""
        self.fo.zero_grad(set_to_none=True)
        self._end_gradients(failed=True)

    def _end_gradients(self, failed: bool = False) -> None:
        pass

    def _top_step(self) -> None:
        self._clip_top()
        self.fo.step()

    def _clip_top(self) -> None:
        """max_grad_norm on the top part's gradient; `last_grad_norm` keeps its norm before the clip (what
        transformers' Trainer logs as grad_norm: an exploding gradient shows there)."""
        if self.config.max_grad_norm:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in self.top],
                                                                       self.config.max_grad_norm))

    # hooks for DPHybrid: per-example gradients of the top part, and the end of a step's noise
    def _recording(self):
        return nullcontext()

    def _top_gradients_ready(self, losses: torch.Tensor) -> None:
        pass

    def _end_step(self) -> None:
        pass

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


class DPHybrid(Hybrid):
    """Private hybrid: DPZero's scalar below, DP-AdamW's gradient on top, both on one Poisson batch per step:

        g_hat = (sum_i clip_C(g_i) + N(0, (sigma Delta_C)^2)) / (q N)              (privacy/dpzero.py)
        G_hat = (sum_i clip_S(grad_top l_i) + N(0, (sigma Delta_S)^2 I)) / (q N)   (privacy/dpsgd.py, Opacus)

    g_i = (l_i(theta + eps z) - l_i(theta - eps z)) / (2 eps) as in DPZero; grad_top l_i is example i's gradient of the
    top part at theta_low + eps z, from Opacus' per-sample hooks in the one backward (recorded on the top layers only:
    the low part is frozen during that forward and the second forward runs in inference mode). clip_S scales a
    vector to L2 norm <= S (`fo_clip`, fixed); C adapts as DPZero's (its noisy count is a third release). Delta is C or
    S under Poisson sampling, 2C / 2S for fixed-size batches. The same sigma on each release, relative to its own
    sensitivity, so a step is two Gaussian mechanisms on the batch: the accountant counts `releases = 2`
    (optim/builders.private_releases). The low update -lr g_hat z and AdamW on G_hat are post-processing; the loss
    a step returns is private (the trainer logs only released values). Both noises come from the run's KeyedNoise,
    numbered within the step; nothing random is saved. With every trainable parameter on top (a model of <= k
    blocks) only G_hat is released: the accountant's two releases are then an upper bound.
    """

    name = "dphybrid"

    def __init__(self, named_params, config: HybridConfig, model: nn.Module, estimator, spec, noise_multiplier: float,
                 expected_batch_size: float):
        from slimtune.privacy.accountant import sensitivity
        from slimtune.privacy.dpsgd import keyed_dp_optimizer, per_example_hooks

        super().__init__(named_params, config, model, estimator)
        self.keyed_noise = estimator.keyed_noise
        with _frozen([p for _, p, _ in self.params]):  # hooks on the top's layers only: a low layer on the top's
            self.grad_sample_module = per_example_hooks(model)  # backward path (a tied head) records nothing
        top_ids = {id(p) for _, p in self.top}
        self.top_modules = [m for m in model.modules()
                            if any(q is not None and id(q) in top_ids for q in m._parameters.values())]
        clip = config.fo_clip
        self.fo = keyed_dp_optimizer(self.keyed_noise)(
            self.fo, noise_multiplier=noise_multiplier * sensitivity(spec, clip) / clip, max_grad_norm=clip,
            expected_batch_size=expected_batch_size, loss_reduction="mean")

    @contextmanager
    def _recording(self):
        """Opacus records activations of layers in training mode only; the run keeps the model in eval mode (dropout
        off, as every ZO method). The layers that hold top parameters (linear, norm, SVFit: no mode-dependent
        behaviour) are switched to training mode for the backward forward only."""
        modes = [m.training for m in self.top_modules]
        for m in self.top_modules:
            m.training = True
        try:
            with warnings.catch_warnings():  # nothing below the top needs a gradient, which is what Opacus reads
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                yield
        finally:
            for m, mode in zip(self.top_modules, modes):
                m.training = mode

    def _top_step(self) -> None:
        """Opacus' step (clip per example, sum, noise: the release), then max_grad_norm on the released gradient
        (post-processing), then AdamW."""
        if self.fo.pre_step():
            self._clip_top()
            self.fo.original_optimizer.step()

    def _top_gradients_ready(self, losses: torch.Tensor) -> None:
        from slimtune.privacy.dpsgd import per_example_gradients_ready
        per_example_gradients_ready([p for _, p in self.top], losses.numel())

    def _end_step(self) -> None:
        self.keyed_noise.end_step()
        self._end_gradients()

    def _end_gradients(self, failed: bool = False) -> None:
        from slimtune.privacy.dpsgd import drop_per_example_state
        drop_per_example_state([p for _, p in self.top], self.grad_sample_module, failed)  # nothing per example


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


def zo_part_settings(optimizer: str) -> tuple[str, ...]:
    """The settings only the ZO part of a hybrid reads, so unused when every trainable layer is on top: its lr (the top
    part's lr follows the schedule's multiplier, fo_lr x lr_t / lr, not the base lr), eps, the z source; dphybrid's
    scalar clip and its adaptation."""
    names = ("lr", "eps", "perturbation")
    if optimizer == "dphybrid":
        names += ("clip", "clipping", "target_quantile", "clip_lr", "clip_multiplier")
    return names


def check_split(model: nn.Module, k: int, adapted: list[nn.Module] | None, zo_given: list[str]) -> None:
    """--fo-layers k against a loaded model before a run writes anything: k within its blocks, some trainable layer
    (`adapted`: the PEFT's layers; None: every weight) in the top k, and, when every one is there (the hybrid is
    plain AdamW), no ZO setting given (`zo_given`, flags) that would go unused."""
    if adapted is None:  # every weight trains: the embedding (used first) is always below, the head always on top
        modules_after(model, k, [])
        return
    after = modules_after(model, k, adapted)
    on_top = sum(id(m) in after for m in adapted)
    if not on_top:
        raise SlimtuneError(f"--fo-layers {k}: no trainable parameter in the top {k} blocks or after them (raise "
                            "--fo-layers or choose --target-modules there)")
    if on_top == len(adapted) and zo_given:
        raise SlimtuneError(f"{zo_given[0]}: every trainable layer is in the top {k} blocks (--fo-layers {k}), so "
                            f"nothing is trained by ZO and {zo_given[0]} would be ignored; lower --fo-layers or leave "
                            f"{zo_given[0]} out")


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


def check_fo_layers(k: int, blocks: int) -> None:
    """--fo-layers k within a model of `blocks` transformer blocks (train's split check; plan, whose model may be on
    the meta device, counts them from the config)."""
    if not 1 <= k <= blocks:
        raise SlimtuneError(f"--fo-layers {k}: must be between 1 and the model's {blocks} blocks")


def modules_after(model: nn.Module, k: int, modules: list[nn.Module]) -> set[int]:
    """ids of the `modules` first called after block L - k starts, in a 2-token forward (pre-hooks record the order)."""
    blocks = transformer_blocks(model)
    check_fo_layers(k, len(blocks))
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

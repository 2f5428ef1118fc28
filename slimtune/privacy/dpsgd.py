"""First-order DP baseline: DP-SGD / DP-AdamW through Opacus (per-example clipping + Gaussian noise on gradients).

Uses the same sampler and the same dp-accounting accountant as DPZero, so epsilon is comparable. Opacus adds noise of
std `noise_multiplier * max_grad_norm` to the sum of per-example gradients clipped to norm C. The accountant's sigma
is relative to the sensitivity Delta of that sum (C under Poisson / add-remove, 2C for fixed-size batches /
replace-one), so Opacus is given noise_multiplier = sigma * Delta / C: the std is sigma * Delta in both cases.
The noise comes from the run's `KeyedNoise` (privacy/secret.py: HMAC of the 256-bit run key -> Philox, per step and
parameter), never from torch's generator (whose CPU state is keyed by 32 bits) or public settings; no generator state
is kept or saved. An empty Poisson batch
still takes a step: zero clipped sum plus noise, as the accounted mechanism requires.

SVFit layers get their own per-example gradient (`svfit_grad_sample`): with h = x V_r^T and g the gradient at the
layer's output, dL_i/dvalues = sum_t h_it * (g_it U_r), then the chain rule through values = sv * scale. Their
buffers (U_r, V_r, S_0: the SVD of the pretrained weight) hold no training data, so Opacus' "trainable layer with
buffers" check is waived for them only.
"""

from __future__ import annotations

import torch

from slimtune import SlimtuneError
from slimtune.optim.base import SlimOptimizer, StepOutput
from slimtune.optim.first_order import FirstOrder, FirstOrderConfig
from slimtune.privacy.accountant import PrivacySpec, sensitivity
from slimtune.privacy.secret import KeyedNoise, RunKey
from slimtune.peft.svfit import SVFitLinear


def svfit_grad_sample(layer: SVFitLinear, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradients of an SVFit layer's trainable values (Opacus grad-sampler signature)."""
    x = activations[0]
    h = x @ layer.Vh.T  # [B, ..., r]
    gu = backprops @ layer.U  # [B, ..., r]
    per_value = (h * gu).reshape(h.shape[0], -1, h.shape[-1]).sum(1)  # [B, r]
    grads = {}
    if layer.sv.requires_grad:
        grads[layer.sv] = per_value * layer.scale if layer.scale is not None else per_value
    if layer.scale is not None and layer.scale.requires_grad:
        grads[layer.scale] = per_value * layer.sv
    return grads


def _check_opacus_support(model: torch.nn.Module) -> None:
    """Opacus refuses trainable layers with buffers; SVFit's are data-free (its own grad sampler is registered)."""
    from opacus.utils.module_utils import trainable_modules

    for name, m in trainable_modules(model):
        if list(m.buffers()) and not isinstance(m, SVFitLinear):
            raise SlimtuneError(f"DP-SGD: layer {name} ({type(m).__name__}) is trainable and holds buffers, which "
                                "Opacus cannot make private; choose another --peft")


def keyed_dp_optimizer(noise: KeyedNoise):
    """Opacus' DPOptimizer with its noise drawn from `noise` (std noise_multiplier * max_grad_norm per coordinate)."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class KeyedDPOptimizer(DPOptimizer):
        """Precision: per-example norms in float64 and the clipped sum in at least float32 (Opacus computes both in
        the parameters' dtype: a bf16 norm let one clipped example weigh 1.0046 C), and the noise added in float64
        before one rounding to the parameters' dtype (Opacus rounded the noise to bf16 and added in bf16, so which
        outputs were possible depended on the data: Mironov's floating-point attack)."""

        def clip_and_accumulate(self):
            samples = self.grad_samples
            if len(samples[0]) == 0:
                factor = torch.zeros((0,), dtype=torch.float64, device=samples[0].device)
            else:
                norms = torch.stack([g.reshape(len(g), -1).double().norm(2, dim=-1).to(samples[0].device)
                                     for g in samples], dim=1).norm(2, dim=1)
                factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for p in self.params:
                _check_processed_flag(p.grad_sample)
                sample = self._get_flat_grad_sample(p)
                dtype = torch.promote_types(p.dtype, torch.float32)
                grad = torch.einsum("i,i...", factor.to(device=sample.device, dtype=dtype), sample.to(dtype))
                p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
                _mark_as_processed(p.grad_sample)

        def add_noise(self):
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                draw = torch.from_numpy(noise.normal(tuple(p.summed_grad.shape))).to(p.summed_grad.device)
                p.grad = (p.summed_grad.double() + std * draw).to(p.dtype).view_as(p)
                _mark_as_processed(p.summed_grad)

    return KeyedDPOptimizer


def per_example_gradients_ready(params: list, batch_size: int) -> None:
    """After the backward of a batch of `batch_size` examples: each example's gradient is finite or zero
    (drop_non_finite_examples); an empty Poisson batch has no backward, so each parameter gets an empty per-example
    gradient, and the step still releases its noise on a zero clipped sum, as the accounted mechanism requires."""
    if batch_size == 0:
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        return
    if any(s.shape[0] != batch_size for p in params for s in _as_list(getattr(p, "grad_sample", None))):
        raise SlimtuneError("private training clips one gradient per example, but the model's forward rows are not "
                            "the closure's examples (one forward per example, or packed rows): evaluate the drawn "
                            "examples as one batch, one row each")  # no count: the batch's size is private
    drop_non_finite_examples(params)


def drop_per_example_state(params: list, module: torch.nn.Module | None = None, failed: bool = False) -> None:
    """Remove what Opacus leaves after a step, finished or failed: on each parameter `grad_sample` (the batch's
    per-example gradients), `_current_grad_sample` (the same before Opacus promotes it: a backward whose forward
    count was left up by a failed step never promotes it), `_norm_sample`, `summed_grad` (their clipped sum before
    the noise), and the forward counter back to 0 (else every later step's per-example gradients stay unpromoted);
    on each layer of `module` the `activations` its forward hooks captured (the batch's inputs to the layer: a step
    that fails between the forward and the backward leaves them) and `max_batch_len`. None is a release; kept, they
    travel with the model wherever it goes (torch.save(model), deepcopy, a queue). `.grad` holds the noised gradient
    and stays after a finished step; `failed`: the step raised, and `.grad` may be the un-noised batch gradient: it
    goes too."""
    for p in params:
        p.grad_sample = p.summed_grad = None
        for name in ("_current_grad_sample", "_norm_sample"):
            p.__dict__.pop(name, None)
        if "_forward_counter" in p.__dict__:
            p._forward_counter = 0
        if failed:
            p.grad = None
    for layer in module.modules() if module is not None else ():
        for name in ("activations", "max_batch_len"):
            if name in layer.__dict__:
                delattr(layer, name)


def drop_non_finite_examples(params: list) -> None:
    """An example whose per-example gradient holds inf or NaN contributes 0 to the clipped sum (as DPZero maps a
    non-finite difference to 0): Opacus would clip it by C / (inf + 1e-6) = 0 and 0 * inf = NaN, making the released
    sum, and every weight, NaN; whether a run failed would then reveal one row. A zero gradient keeps the bound C."""
    samples = [s for p in params for s in _as_list(getattr(p, "grad_sample", None))]
    if not samples:
        return
    finite = torch.stack([s.reshape(s.shape[0], -1).isfinite().all(dim=1) for s in samples]).all(dim=0)
    if not bool(finite.all()):
        for s in samples:
            s[~finite] = 0


def _as_list(grad_sample) -> list:
    if grad_sample is None:
        return []
    return list(grad_sample) if isinstance(grad_sample, (list, tuple)) else [grad_sample]


def per_example_hooks(model: torch.nn.Module):
    """Opacus' per-sample gradient hooks on `model`'s trainable layers (SVFit's sampler registered): after a backward
    of the mean loss, each trainable parameter holds `grad_sample` [B, ...]. Returns the GradSampleModule."""
    from opacus import GradSampleModule
    from opacus.grad_sample.utils import register_grad_sampler

    register_grad_sampler(SVFitLinear)(svfit_grad_sample)
    _check_opacus_support(model)
    return GradSampleModule(model, loss_reduction="mean", strict=False)


class DPFirstOrder(SlimOptimizer):
    def __init__(self, model: torch.nn.Module, config: FirstOrderConfig, kind: str, spec: PrivacySpec,
                 noise_multiplier: float, expected_batch_size: int, noise: KeyedNoise | None = None):
        self.name = f"dp-{kind}"
        self.grad_sample_module = per_example_hooks(model)  # hooks on the layers
        from slimtune.optim.first_order import check_full_precision
        check_full_precision(list(model.named_parameters()), f"dp-{kind}")
        self.inner = FirstOrder(model.named_parameters(), config, kind)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.keyed_noise = noise if noise is not None else KeyedNoise(RunKey.fresh())
        self.torch_optimizer = keyed_dp_optimizer(self.keyed_noise)(
            self.inner.torch_optimizer, noise_multiplier=noise_multiplier * sensitivity(spec) / spec.clip,
            max_grad_norm=spec.clip, expected_batch_size=expected_batch_size, loss_reduction="mean")

    def step(self, closure) -> StepOutput:
        self.torch_optimizer.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                losses = closure()
                loss = float("nan")  # an empty Poisson batch has none
                if losses.numel():
                    mean = losses.mean()
                    mean.backward()
                    loss = mean.item()
                per_example_gradients_ready(self.params, losses.numel())
            self.torch_optimizer.step()
        except BaseException:  # nothing per example, nor an un-noised gradient, is kept after a failed step
            drop_per_example_state(self.params, self.grad_sample_module, failed=True)
            raise
        drop_per_example_state(self.params, self.grad_sample_module)  # nothing per example is kept between steps
        self.keyed_noise.end_step()
        return StepOutput(loss, {"batch_size": int(losses.numel())})

    def set_lr(self, lr: float) -> None:
        self.inner.set_lr(lr)  # DPOptimizer shares the wrapped optimizer's param groups

    def state_dict(self) -> dict:
        """The inner optimizer's state (a function of noised gradients: post-processing); no noise state exists."""
        return {"optimizer": self.torch_optimizer.original_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.torch_optimizer.original_optimizer.load_state_dict(state["optimizer"])

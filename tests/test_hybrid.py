"""Hybrid ZO/backprop (optim/hybrid.py): the top/low split, no graph below the top blocks, convergence, learning-rate
coupling, and peak memory against the planner's prediction (report/memory_model.py)."""

import weakref
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from slimtune import SlimtuneError
from slimtune.optim import OptimizerArgs, build_optimizer
from slimtune.optim.hybrid import Hybrid, HybridConfig, top_parameters
from slimtune.report import memory_model


class QuadraticBlock(nn.Module):
    """Adds 0.5 sum a (w - t)^2 to the running per-example value."""

    def __init__(self, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(dim, generator=g))
        self.register_buffer("t", torch.randn(dim, generator=g))
        self.register_buffer("a", torch.rand(dim, generator=g) + 0.5)

    def forward(self, h):
        return h + 0.5 * (self.a * (self.w - self.t) ** 2).sum()


class QuadraticStack(nn.Module):
    """A 'transformer' of quadratic blocks: the loss is the sum of every block's own quadratic."""

    def __init__(self, layers=3, dim=5):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=layers)
        self.layers = nn.ModuleList(QuadraticBlock(dim, i) for i in range(layers))

    def forward(self, input_ids=None, use_cache=False):
        h = torch.zeros(input_ids.shape[0])
        for layer in self.layers:
            h = layer(h)
        return h


def test_converges_on_a_quadratic_with_backprop_on_top_and_zo_below():
    model = QuadraticStack()
    ids = torch.zeros(4, 2, dtype=torch.long)
    opt = Hybrid(model.named_parameters(), HybridConfig(lr=2e-2, eps=1e-3, fo_layers=1, fo_lr=5e-2, seed=1), model)
    assert [n for n, _ in opt.top] == ["layers.2.w"] and [n for n, _, _ in opt.params] == ["layers.0.w", "layers.1.w"]
    start = model(ids)[0].item()
    for _ in range(600):
        opt.step(lambda: model(ids))
    assert model(ids)[0].item() < 1e-3 * start
    assert model.layers[0].w.grad is None and model.layers[1].w.grad is None  # ZO part: no graph, no gradient
    assert model.layers[2].w.grad is not None
    assert all(p.requires_grad for p in model.parameters())  # restored after the step


def test_requires_grad_is_restored_when_the_forward_fails():
    model = QuadraticStack()
    opt = Hybrid(model.named_parameters(), HybridConfig(lr=1e-3, eps=1e-3, fo_layers=1), model)

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(broken)
    assert all(p.requires_grad for p in model.parameters())


def test_top_split_on_llama_and_a_tied_head(tiny):
    from slimtune.models import load_model_and_tokenizer

    model, _, _ = tiny
    top = {n for n, p in model.named_parameters() if id(p) in top_parameters(model, 1)}
    assert top == {n for n, _ in model.named_parameters() if n.startswith(("model.layers.1.", "model.norm", "lm_head"))}
    gpt2, _ = load_model_and_tokenizer("tiny-gpt2", texts=["a b c"])
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tied: used below too, so it stays ZO
    top = {n for n, p in gpt2.named_parameters() if id(p) in top_parameters(gpt2, 1)}
    assert "transformer.wte.weight" not in top and "transformer.ln_f.weight" in top
    assert all(n.startswith(("transformer.h.1.", "transformer.ln_f")) for n in top)


def test_bad_fo_layers_are_one_line_errors(tiny):
    from slimtune.peft import PeftSettings, apply_peft

    model, _, _ = tiny
    with pytest.raises(SlimtuneError, match="--fo-layers 3: must be between 1 and the model's 2 blocks"):
        build_optimizer("hybrid", model, OptimizerArgs(lr=1e-3, eps=1e-2, fo_layers=3))
    lora = apply_peft(model, PeftSettings("lora", r=2, target_modules=["embed_tokens"]))
    with pytest.raises(SlimtuneError, match="no trainable parameter in the top 1 blocks"):
        build_optimizer("hybrid", lora, OptimizerArgs(lr=1e-3, eps=1e-2, fo_layers=1))
    with pytest.raises(SlimtuneError, match="--fo-layers is a setting of hybrid"):
        build_optimizer("mezo", model, OptimizerArgs(lr=1e-3, eps=1e-2, fo_layers=1))


def test_the_schedule_scales_both_learning_rates():
    model = QuadraticStack()
    opt = Hybrid(model.named_parameters(), HybridConfig(lr=1e-3, eps=1e-3, fo_layers=1, fo_lr=4e-2), model)
    opt.set_lr(5e-4)
    assert opt.config.lr == 5e-4 and opt.fo.param_groups[0]["lr"] == pytest.approx(2e-2)


class AllocationPeak(TorchDispatchMode):
    """Peak bytes of tensor storages allocated inside the block (those alive before it, given, are not counted):
    every aten op's outputs are seen, each storage counted once until it is freed."""

    def __init__(self, existing=()):
        super().__init__()
        self.refs = {t.untyped_storage()._cdata: None for t in existing}
        self.current = self.peak = 0

    def _freed(self, key, size):
        self.refs.pop(key, None)
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.refs:
                    size = storage.nbytes()
                    self.refs[key] = weakref.ref(storage, lambda _, k=key, n=size: self._freed(k, n))
                    self.current += size
                    self.peak = max(self.peak, self.current)
        return out


def _step_peak_mb(optimizer_name, peft, fo_layers, tiny):
    """Measured peak of the first step (AdamW moments are created in it) and the planner's prediction, both without
    the weights, on a 4-block LLaMA of hidden size 128 with batch 16 of the demo prompts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.peft import PeftSettings, apply_peft
    from slimtune.train.classification import encode, label_token_ids, per_example_losses
    from slimtune.data import get_task

    _, tok, examples = tiny
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                        tie_word_embeddings=False))
    batch = encode(tok, examples[:16])
    shape = memory_model.ModelShape.from_model(base)
    trainable = memory_model.trainable_count(base, peft, 8)
    hybrid = optimizer_name in ("hybrid", "dphybrid")
    top = memory_model.top_trainable_count(base, peft, 8, None, fo_layers) if hybrid else None
    predicted = memory_model.predict_peak_mb(shape, optimizer_name, trainable, 16, batch.input_ids.shape[1],
                                             fo_layers=fo_layers or 2, fo_trainable=top)
    model = apply_peft(base, PeftSettings(peft, r=8))
    ids = label_token_ids(tok, get_task("sst2"))
    private = None
    if optimizer_name == "dphybrid":
        from slimtune.privacy import PrivacySpec
        private = (PrivacySpec(noise_multiplier=1.0, clipping="fixed"), 1.0, 16.0, None)
    opt = build_optimizer(optimizer_name, model, OptimizerArgs(lr=1e-3, eps=1e-2, fo_layers=fo_layers),
                          private=private)
    tracker = AllocationPeak([*model.parameters(), *model.buffers()])
    with tracker:
        opt.step(lambda: per_example_losses(model, batch, ids))
    parts = predicted["parts_mb"]
    return tracker.peak / 2**20, predicted["peak_mb"] - parts["weights"], parts.get("zo_buffer", 0.0)


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_peak_memory_is_within_the_planners_prediction_and_grows_with_the_backprop_blocks(peft, tiny):
    measured = {}
    for name, k in (("mezo", None), ("hybrid", 1), ("hybrid", 2), ("adamw", None)):
        got, predicted, z_buffer = _step_peak_mb(name, peft, k, tiny)
        assert got <= predicted, f"{name} k={k}: measured {got:.3f} MB > predicted {predicted:.3f} MB"
        # not a vacuous bound (the z buffer is planned as min(chunk, trainable values): a whole tiny model here, one
        # chunk of a tensor on a real one)
        assert got >= 0.4 * (predicted - z_buffer), f"{name} k={k}: {predicted:.3f} MB is no useful bound of {got:.3f}"
        measured[name, k] = got
    assert measured["mezo", None] < measured["hybrid", 1] < measured["hybrid", 2] < measured["adamw", None]


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_the_private_hybrid_stays_within_its_prediction_and_pays_for_per_example_gradients(peft, tiny):
    """dphybrid keeps B per-example gradients of the top part (Opacus) on top of the hybrid's memory (planned as
    B x the top's values); the measured peak stays under the plan and never below the hybrid's."""
    got, predicted, z_buffer = _step_peak_mb("dphybrid", peft, 1, tiny)
    assert got <= predicted, f"measured {got:.3f} MB > predicted {predicted:.3f} MB"
    assert got >= 0.4 * (predicted - z_buffer), f"{predicted:.3f} MB is no useful bound of {got:.3f}"
    assert got >= _step_peak_mb("hybrid", peft, 1, tiny)[0]

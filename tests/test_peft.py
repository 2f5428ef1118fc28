"""PEFT methods: SVFit exactness, merge round trip, PiSSA matches peft, save -> load -> identical logits."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from slimtune.models.loading import load_model_and_tokenizer
from slimtune.peft import PeftSettings, SVFitConfig, SVFitLinear, apply_peft, load_peft, merge_peft, peft_summary, save_peft


def fresh(kind="tiny-llama"):
    torch.manual_seed(0)
    return load_model_and_tokenizer(kind, texts=["a fine film it was great and terrible"])


def ids(tok):
    return torch.tensor([tok.encode("a fine film it was great")])


@pytest.mark.parametrize("layer", [torch.nn.Linear(40, 24), Conv1D(24, 40)])
def test_svfit_at_init_reproduces_w(layer):
    w = (layer.weight.T if isinstance(layer, Conv1D) else layer.weight).detach().clone()
    module = SVFitLinear(layer, SVFitConfig(r=5))
    x = torch.randn(3, 40)
    dense = w.float()
    merged = module.delta_weight() + (module.base.weight.T if isinstance(layer, Conv1D) else module.base.weight)
    assert torch.linalg.norm(merged - dense) / torch.linalg.norm(dense) < 1e-5
    assert torch.allclose(module(x), x @ dense.T + module.base.bias, atol=1e-5)
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["sv"]


def test_svfit_trains_only_r_values_per_matrix():
    model, _ = fresh()
    model = apply_peft(model, PeftSettings("svfit", r=4))
    n_matrices = sum(isinstance(m, SVFitLinear) for m in model.modules())
    assert n_matrices == 2 * 7
    assert peft_summary(model)["trainable_params"] == 4 * n_matrices


@pytest.mark.parametrize("method", ["svfit", "svfit-relative", "lora", "pissa", "adapter"])
def test_save_load_gives_identical_logits(method, tmp_path):
    model, tok = fresh()
    relative = method == "svfit-relative"
    model = apply_peft(model, PeftSettings(method.split("-")[0], r=4, svfit_relative=relative), work_dir=tmp_path)
    with torch.no_grad():  # move away from init so the test sees trained values
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    expected = model(ids(tok)).logits
    save_peft(model, tmp_path / "adapter", work_dir=tmp_path)
    base, _ = fresh()
    loaded = load_peft(base, tmp_path / "adapter")
    assert torch.allclose(loaded(ids(tok)).logits, expected, atol=1e-5)


def test_lora_adapter_is_in_peft_format(tmp_path):
    from peft import PeftModel

    model, tok = fresh()
    model = apply_peft(model, PeftSettings("lora", r=4))
    save_peft(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    base, _ = fresh()
    assert isinstance(PeftModel.from_pretrained(base, str(tmp_path)), PeftModel)


@pytest.mark.parametrize("method", ["svfit", "lora"])
def test_merge_round_trip(method):
    model, tok = fresh()
    model = apply_peft(model, PeftSettings(method, r=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    expected = model(ids(tok)).logits
    merged = merge_peft(model)
    assert not any(isinstance(m, SVFitLinear) for m in merged.modules())
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert torch.allclose(merged(ids(tok)).logits, expected, atol=1e-5)


def test_pissa_matches_peft_init_and_the_top_singular_triplets():
    model, _ = fresh()
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = apply_peft(model, PeftSettings("pissa", r=4))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    principal = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(scaling * b @ a, principal, atol=1e-5)  # adapter holds the top-r part
    assert torch.allclose(layer.base_layer.weight, w - principal, atol=1e-5)  # base holds the residual


def test_gpt2_svfit_and_lora_work():
    for method in ("svfit", "lora", "adapter"):
        model, tok = fresh("tiny-gpt2")
        model = apply_peft(model, PeftSettings(method, r=2))
        assert peft_summary(model)["trainable_params"] > 0
        assert model(ids(tok)).logits.shape[-1] == len(tok)


def test_relative_svfit_trains_scales_of_the_singular_values():
    model, _ = fresh()
    model = apply_peft(model, PeftSettings("svfit", r=4, svfit_relative=True))
    layer = next(m for m in model.modules() if isinstance(m, SVFitLinear))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["scale"]
    assert torch.equal(layer.scale, torch.ones(4))
    with torch.no_grad():
        layer.scale.mul_(1.1)  # a relative move: every singular value grows by 10%
    assert torch.allclose(layer.values(), 1.1 * layer.S0)


def test_zo_svfit_lowers_the_loss(tmp_path, demo_paths):
    """ZO + SVFit (relative scales, the default under ZO) moves the model: the training loss goes down."""
    from slimtune.optim import OptimizerArgs
    from slimtune.train import TrainConfig, prepare
    from slimtune.train.classification import encode, per_example_losses

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=demo_paths[0], model="tiny-llama", optimizer="mezo",
                      optim=OptimizerArgs(lr=10.0, eps=1e-2), peft=PeftSettings("svfit", r=4), steps=60,
                      batch_size=32, progress=False)
    run = prepare(cfg)
    assert cfg.peft.svfit_relative is True  # the default, recorded in config.json
    batch = encode(run.tokenizer, run.train_examples[:32])
    loss = lambda: per_example_losses(run.model, batch, run.label_ids)
    with torch.no_grad():
        before = loss().mean().item()
    for _ in range(60):
        run.optimizer.step(loss)
    with torch.no_grad():
        after = loss().mean().item()
    assert after < before - 0.004


@pytest.mark.parametrize("optimizer,given,expected", [("adamw", None, True), ("dp-adamw", None, True),
                                                       ("adamw", False, False), ("mezo", None, True)])
def test_svfit_trains_relative_scales_unless_told_otherwise(tmp_path, demo_paths, optimizer, given, expected):
    """Relative scales are the default for every optimizer (AdamW: 0.81 against 0.73 on the values in the sweep);
    --svfit-absolute keeps the values themselves, and config.json records which."""
    from slimtune.optim import OptimizerArgs
    from slimtune.privacy.accountant import PrivacySpec
    from slimtune.train import TrainConfig, prepare

    privacy = PrivacySpec(target_epsilon=6.0) if optimizer.startswith("dp") else None
    peft = PeftSettings("svfit", r=4, **({} if given is None else {"svfit_relative": given}))  # None: not given
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=demo_paths[0], model="tiny-llama", optimizer=optimizer,
                      optim=OptimizerArgs(lr=1e-2), peft=peft, steps=2, progress=False, privacy=privacy)
    run = prepare(cfg)
    assert cfg.peft.svfit_relative is expected
    trainable = {n.rsplit(".", 1)[-1] for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable == ({"scale"} if expected else {"sv"})


@pytest.mark.parametrize("relative", [False, True])
def test_dp_sgd_per_example_gradients_of_svfit_are_exact(tiny, relative):
    """SVFit's Opacus grad sampler gives each example's own gradient (checked one example at a time)."""
    from opacus import GradSampleModule
    from opacus.grad_sample.utils import register_grad_sampler

    from slimtune.peft.svfit import SVFitLinear
    from slimtune.privacy.dpsgd import _check_opacus_support, svfit_grad_sample
    from slimtune.train.classification import encode, label_token_ids, per_example_losses
    from slimtune.data import get_task

    model, tok, examples = tiny
    model = apply_peft(model, PeftSettings("svfit", r=3, learn_scale=True, svfit_relative=relative))
    register_grad_sampler(SVFitLinear)(svfit_grad_sample)
    _check_opacus_support(model)
    labels = label_token_ids(tok, get_task("sst2"))
    batch = encode(tok, examples[:4])
    params = [p for p in model.parameters() if p.requires_grad]
    expected = []
    for i in range(4):
        one = type(batch)(*(t[i:i + 1] for t in (batch.input_ids, batch.attention_mask, batch.position_ids,
                                                  batch.labels)))
        expected.append(torch.autograd.grad(per_example_losses(model, one, labels).sum(), params))
    gsm = GradSampleModule(model, loss_reduction="sum", strict=False)
    per_example_losses(model, batch, labels).sum().backward()
    for j, p in enumerate(params):
        for i in range(4):
            assert torch.allclose(p.grad_sample[i], expected[i][j], atol=1e-5, rtol=1e-4)
    gsm._close()

"""Eleventh review round: an adversary and a careless user against the changes of reviews 9 and 10 and federated
review 9 (74645f1..HEAD): the hybrid's split check, the privacy floor of a node, the Python API's messages, the
adapter writer's temporaries, symlink refusals, the deployment's allowed nodes.

Each test fails on the code it was written against."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import slimtune
from slimtune import SlimtuneError

from test_review_findings_9 import TINY, TRAIN, cli, one_line_error  # one CLI runner for the review tests
from test_review_findings_9 import lora_model as lora_model_and_batch  # noqa: F401  (a fixture)


@pytest.fixture
def lora_model(lora_model_and_batch):
    """tiny-llama (2 blocks) with LoRA r=2: with the default --fo-layers 2 every trainable value is on top."""
    return lora_model_and_batch[0]


# -- the hybrid with nothing left for ZO: only --eps and --perturbation are checked ---------------------------------
@pytest.mark.parametrize("optimizer, flag, value", [("hybrid", "--lr", "0.5"), ("dphybrid", "--clip", "0.3")])
def test_hybrid_with_every_trainable_layer_on_top_refuses_every_zo_setting_not_only_eps(tmp_path, optimizer, flag,
                                                                                         value):
    """trainer.prepare's zo_given lists --eps and --perturbation only. With every trainable layer in the top k blocks
    the ZO part is empty: Hybrid.set_lr scales fo_lr by lr / base_lr, so --lr 0.5 changes nothing (same weights as
    the default), and dphybrid's --clip (the ZO scalar's clip) has no scalar to clip. Both runs finish, exit 0."""
    out = tmp_path / "out"
    message = one_line_error(cli("train", "--data", TRAIN, *TINY, "--optimizer", optimizer, "--fo-layers", "2", flag,
                                 value, "--out", out))
    assert flag in message
    assert not out.exists()


@pytest.mark.parametrize("keyword", ["eps", "lr"])
def test_python_hybrid_with_every_trainable_layer_on_top_refuses_zo_keywords(lora_model, keyword):
    """The CLI refuses `--eps` when nothing is trained by ZO (optim.hybrid.check_split), but slimtune.Hybrid (and
    ZOTrainer's ZOArguments(optimizer="hybrid", eps=...)) builds plain AdamW and drops the keyword silently."""
    with pytest.raises(SlimtuneError, match=keyword):
        slimtune.Hybrid(lora_model, **{keyword: 0.5})


# -- Python API messages -----------------------------------------------------------------------------------------
def test_dpzero_laplace_with_several_directions_is_refused_in_python_terms(lora_model):
    """in_python_terms translates build_optimizer's messages, but PrivateOptimizer calls accountant.plan first, whose
    check_releases (a second copy of mechanism_refusal's rule) says 'Laplace noise is accounted ... (--n-spsa, or an
    optimizer that releases several: dphizoo, dphybrid): use --mechanism gaussian', with no slimtune.DPZero."""
    with pytest.raises(SlimtuneError) as refused:
        slimtune.DPZero(lora_model, mechanism="laplace", n_spsa=2, dataset_size=100, batch_size=4, steps=10)
    message = str(refused.value)
    assert message.startswith("slimtune.DPZero"), message
    assert "--" not in message, message


# -- a node's privacy floor -----------------------------------------------------------------------------------------
def test_a_node_pinning_local_dp_noise_refuses_a_round_that_trains_without_dp():
    """check_node_floor compares local_dp_noise only: a server that asks for --local-optimizer adamw (no DP at all;
    local_dp_noise keeps its default 1.0, or any value) passes a node's `local-dp-noise=0.5` floor, and the node trains
    on its rows without noise."""
    from slimtune.federated.client_app import check_node_floor
    from slimtune.federated.config import FederatedConfig

    server = FederatedConfig(data=TRAIN, local_optimizer="adamw", local_dp_noise=3.0)
    with pytest.raises(SlimtuneError, match="local-dp-noise"):
        check_node_floor(server, {"local-dp-noise": 0.5})


def test_a_node_floor_given_as_a_string_is_a_one_line_error_not_a_type_error():
    """`--node-config 'local-dp-noise="2.0"'` (quoted: Flower reads a string) reaches `server >= node` and raises
    TypeError: '>=' not supported between instances of 'float' and 'str'."""
    from slimtune.federated.client_app import check_node_floor
    from slimtune.federated.config import FederatedConfig

    server = FederatedConfig(data=TRAIN, local_optimizer="dp-adamw", local_dp_noise=3.0)
    with pytest.raises(SlimtuneError, match="local-dp-noise"):
        check_node_floor(server, {"local-dp-noise": "2.0"})


def test_allowed_nodes_that_are_not_node_ids_are_refused_by_validate():
    """allowed_nodes can be written in the server's settings file (read_settings accepts every field); 'n1,n2'
    passes validate and check_run, and the server dies with ValueError (int('n1')) in MembersOnly after it loaded the
    model, instead of a one-line error before any work."""
    from slimtune.federated.config import FederatedConfig

    with pytest.raises(SlimtuneError, match="allowed"):
        FederatedConfig(data=TRAIN, allowed_nodes="n1,n2").validate()


# -- outputs: nothing of the user's lost ------------------------------------------------------------------------------
def test_write_adapter_keeps_the_previous_adapter_when_the_final_rename_fails(lora_model, tmp_path, monkeypatch):
    """write_adapter moves the existing adapter to a temporary `old` name, then renames the new one into place; if
    that rename fails, the `finally` removes `old` too: the user's previous adapter is deleted (before review 10 it at
    least stayed in DIR.old)."""
    from slimtune.peft import write_adapter

    final = tmp_path / "adapter"
    write_adapter(lora_model, None, final)
    before = sorted(p.name for p in final.iterdir())
    real = os.replace

    def failing(src, dst):
        if Path(dst) == final:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        write_adapter(lora_model, None, final)
    monkeypatch.setattr(os, "replace", real)
    assert final.is_dir() and sorted(p.name for p in final.iterdir()) == before


def test_demo_out_may_be_a_symbolic_link_to_an_empty_directory(tmp_path):
    """check_new_directory now refuses a symlink ('the final rename would replace the link'), but `slimtune demo`
    never renames its --out: it trains into OUT/zo-lora and OUT/fo-lora and writes OUT/report. A demo pointed at an
    empty directory on another disk through a link worked before and is now refused."""
    from slimtune.settings.commands import DemoSettings

    target = tmp_path / "big-disk"
    target.mkdir()
    link = tmp_path / "demo"
    link.symlink_to(target)
    DemoSettings.build({"out": str(link), "model": "tiny-llama"}, {"out", "model"})

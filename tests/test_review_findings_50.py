"""Review 50: private data-parallel runs (torchrun) and the private optimizers' saved state, as a privacy attacker.

1. DP-SGD / DP-AdamW (privacy/dpsgd.DPFirstOrder) leave, after every step, each trainable parameter's Opacus
   attributes `grad_sample` (the per-example gradients of the batch, B x the parameter) and `summed_grad` (the clipped
   sum *before* the noise) on the parameter. They stay there after the last step (the trainer's run.model, a model
   trained through the Python layer) and travel with the model wherever it is pickled: torch.save(model),
   copy.deepcopy, a multiprocessing queue. DP-hybrid clears the same attributes after each step (`_end_gradients`:
   "the per-example gradients are not kept between steps"); DPFirstOrder does not.
2. A data-parallel resume where a rank's --out (per-rank paths are allowed: PER_RANK) holds another checkpoint than
   rank 0's (a stale copy of the run on a node): the ranks resume different steps, weights and batches. Nothing
   compares what they resumed (check_ranks_agree compares settings, data, the base model and the key): the run dies
   in a gloo abort (SIGABRT, "collective mismatch"), rank 0's status.json is left "running", and when the
   collectives' sizes happen to agree, a release mixes rank 0's shard of step t with rank 1's shard of another step's
   batch at other weights (one row in both shards: sensitivity 2C, silently).
"""

import io
import json
import shutil
from pathlib import Path

import torch

from test_distributed_review import common, errors, launch


def dp_sgd_on_tiny(tiny):
    """(the tiny model with LoRA, a DP-SGD optimizer over it, the closure of 4 rows' per-example losses)."""
    from slimtune.optim import OptimizerArgs, build_optimizer
    from slimtune.peft import PeftSettings, apply_peft
    from slimtune.privacy.accountant import PrivacySpec
    from slimtune.data import get_task
    from slimtune.train.classification import encode, label_token_ids, per_example_losses

    model, tok, examples = tiny
    model = apply_peft(model, PeftSettings("lora", 2))
    spec = PrivacySpec(target_epsilon=None, delta=1e-3, noise_multiplier=1.0, clip=1.0, clipping="fixed")
    opt = build_optimizer("dp-sgd", model, OptimizerArgs(lr=1e-2), (spec, 1.0, 8, None))
    labels = label_token_ids(tok, get_task("sst2"))
    batch = encode(tok, examples[:4], 64)
    return model, opt, lambda: per_example_losses(model, batch, labels)


def _dp_sgd_after_one_step(tiny):
    model, opt, losses = dp_sgd_on_tiny(tiny)
    opt.step(losses)
    return model


def test_dp_sgd_keeps_no_per_example_gradient_or_unnoised_sum_on_the_weights_after_a_step(tiny):
    model = _dp_sgd_after_one_step(tiny)
    kept = {n: [a for a in ("grad_sample", "summed_grad") if getattr(p, a, None) is not None]
            for n, p in model.named_parameters() if p.requires_grad}
    kept = {n: a for n, a in kept.items() if a}
    held = sorted({a for names in kept.values() for a in names})
    assert not kept, f"after a DP-SGD step {len(kept)} trainable parameters still hold {held} (per-example " \
                     "gradients / the clipped sum before noise)"


def test_a_pickled_dp_sgd_model_carries_no_unnoised_gradient(tiny):
    """torch.save(model) (or copy.deepcopy) of a model a DP-SGD step trained: the loaded parameters carry the batch's
    per-example gradients and the clipped sum without noise."""
    model = _dp_sgd_after_one_step(tiny)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    leaked = [n for n, p in loaded.named_parameters() if p.requires_grad
              and (getattr(p, "summed_grad", None) is not None or getattr(p, "grad_sample", None) is not None)]
    assert not leaked, f"{len(leaked)} pickled parameters carry grad_sample / summed_grad, e.g. {leaked[0]}"


def test_ranks_resuming_different_checkpoints_are_refused_in_one_line(tmp_path, demo_paths):
    """Rank 0 resumes --out a (at step 2), rank 1 --out b, a copy of the same run taken at step 1."""
    from slimtune.privacy.secret import create_key_file
    create_key_file(tmp_path / "key")

    def argv(out, steps):
        a = common(demo_paths[0], out, "dpzero", steps, "--secret-key-file", str(tmp_path / "key"),
                   "--checkpoint-every", "1")
        i = a.index("--epsilon")
        del a[i:i + 2]
        return [*a, "--noise-multiplier", "1.0"]

    assert launch(tmp_path, argv(tmp_path / "a", 1), ranks=1).returncode == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert launch(tmp_path, [*argv(tmp_path / "a", 2), "--resume"], ranks=1).returncode == 0
    res = launch(tmp_path, [*argv(tmp_path / "a", 3), "--resume"],
                 RANK_ARGS=json.dumps({"1": {"--out": str(tmp_path / "b")}}))
    assert res.returncode != 0, "ranks resumed from checkpoints of different steps and trained to completion"
    assert "collective mismatch" not in res.stderr and "SIGABRT" not in res.stderr, res.stderr[-1500:]
    assert any("checkpoint" in line or "step" in line for line in errors(res)), res.stderr[-2000:]
    status = json.loads((Path(tmp_path) / "a" / "status.json").read_text())
    assert status.get("state") != "running", status

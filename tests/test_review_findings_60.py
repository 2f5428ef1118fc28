"""Review 60 (private runs, as a real attacker): what a private run leaves behind that depends on single training
rows. Each test fails on the code it was written against (see the lead's report for the proposed fixes)."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from typer.testing import CliRunner

import slimtune
from slimtune import SlimtuneError
from slimtune.cli import app

runner = CliRunner()
SECRET = "John Smith 4111"


def _tiny_lora(seed=0):
    from slimtune.models.loading import tiny_model
    from slimtune.peft import PeftSettings, apply_peft
    return apply_peft(tiny_model("tiny-llama", 100, 0, 1, seed=seed), PeftSettings("lora", r=2))


def _per_example_state(model) -> dict:
    """name -> the tensors Opacus may leave on a trainable parameter (its per-example gradients)."""
    found = {}
    for name, p in model.named_parameters():
        held = {k: v for k, v in p.__dict__.items() if isinstance(v, torch.Tensor)}
        if held:
            found[name] = sorted(held)
    return found


# --- DPHybrid (Python API): a refused closure leaves Opacus' forward counter up, and the next step's per-example
# gradients stay on the weights -------------------------------------------------------------------------------------
def test_a_dphybrid_step_after_a_refused_closure_leaves_no_per_example_gradients_on_the_model():
    """slimtune.DPHybrid, a user's loop: a closure that returns one loss too many is refused after its forward ran
    (Opacus' capture hook raised each top parameter's `_forward_counter` to 1; drop_per_example_state removes the
    activations but not the counter). The corrected retry's backward leaves the counter at 1, so Opacus never
    promotes `_current_grad_sample` (the secret batch's per-example gradients, its realised size as their first
    dimension) to grad_sample; the step then fails inside its update, where DPHybrid drops nothing (no `finally`, and
    `_fail` only calls `_drop_transients`). The per-example gradients stay on the parameters and go wherever the model
    is pickled (torch.save(model), deepcopy, a queue), with the un-noised batch gradient in `.grad`."""
    model = _tiny_lora()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = slimtune.DPHybrid(model, epsilon=3.0, dataset_size=40, batch_size=8, steps=5, fo_layers=1)
    data = torch.randint(0, 100, (41, 6), generator=torch.Generator().manual_seed(1))

    def losses(ids):
        out = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(out.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    drawn = opt.sample_batch()
    with pytest.raises(SlimtuneError, match="another number of per-example losses"):
        opt.step(lambda: losses(data[:len(drawn) + 1]))  # a user's mistake, refused (after the forward)
    try:
        opt.step(lambda: losses(data[drawn]))  # the corrected closure on the drawn batch
    except Exception:  # noqa: BLE001 - today: Opacus' "Per sample gradient is not initialized"
        pass
    left = _per_example_state(model)
    assert not left, f"per-example state left on the weights after a failed private step: {left}"
    restored = pickle.loads(pickle.dumps(model))
    assert not _per_example_state(restored), "the pickled model carries the batch's per-example gradients"


# --- data errors of a private run: a JSONL row's duplicated key is quoted ------------------------------------------
def test_a_private_runs_duplicate_jsonl_key_error_does_not_quote_the_rows_key(tmp_path):
    """`train --optimizer dp-adamw` on a JSONL file one row of which repeats a key inside a nested object
    ({"notes": {"John Smith 4111": 1, "John Smith 4111": 2}}): readers.unique_keys says "key 'John Smith 4111'
    appears twice", ignoring rows_unquoted (review 58's rule: a private run's data errors name the file, line and
    field, never a value of a row; a nested object's keys are the row's values)."""
    path = tmp_path / "secret.jsonl"
    path.write_text('{"sentence": "a lovely film", "label": 1}\n'
                    f'{{"sentence": "a bad film", "label": 0, "notes": {{"{SECRET}": 1, "{SECRET}": 2}}}}\n'
                    '{"sentence": "ok film", "label": 1}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = runner.invoke(app, [str(a) for a in ("train", "--model", "tiny-llama", "--data", path, "--steps", 1,
                                                 "--batch-size", 2, "--eval-every", 0, "--out", tmp_path / "run",
                                                 "--quiet", "--optimizer", "dp-adamw")])
    assert r.exit_code == 2, r.output[-400:]
    assert "secret.jsonl:2" in r.output and "twice" in r.output, r.output[-400:]
    assert "John Smith" not in r.output, r.output[-400:]

"""Review 66: the output side (merge, export, generate, eval, saved adapters) as a Hugging Face practitioner uses it.
Each test fails on the code it was written against (see the lead's report for the proposed fixes)."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from slimtune.cli import app

runner = CliRunner()
DEMO = Path(__file__).resolve().parents[1] / "slimtune" / "data" / "demo"
TRAIN, DEV = DEMO / "sst2_demo_train.tsv", DEMO / "sst2_demo_dev.tsv"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res, needle: str) -> bool:
    text = " ".join(res.output.split())
    return res.exit_code == 2 and needle in text and "Traceback" not in res.output


@pytest.mark.parametrize("peft", ["lora", "svfit"])
def test_merge_of_an_adapter_on_a_tied_lm_head_reproduces_the_adapted_model_or_is_refused(tmp_path, peft):
    """tiny-gpt2 (like SmolLM2, the default model, and Gemma 3) ties lm_head to the input embeddings. With
    --target-modules lm_head, `merge` folds the update into the shared matrix, so the merged model's *input
    embeddings* move too: LoRA's merged logits differ from the adapter's by ~10x their std (peft only warns);
    SVFit already overwrote the shared matrix with the residual at init (the embeddings the run trained with are
    W - U S V^T), and the merge puts W + delta back. (On sst2 only the label words' rows move, so the prompt holds
    one.) The merged checkpoint is not the model the run evaluated."""
    run = tmp_path / "run"
    res = cli("train", "--model", "tiny-gpt2", "--data", TRAIN, "--optimizer", "adamw", "--lr", "5e-2", "--steps", 3,
              "--batch-size", 8, "--peft", peft, "--target-modules", "lm_head", "--save", "last", "--out", run,
              "--quiet")
    if res.exit_code == 2:  # refusing a tied target before training is a fix too
        assert one_line_error(res, "--target-modules"), res.output
        return
    assert res.exit_code == 0, res.output
    merged = tmp_path / "merged"
    res = cli("merge", run / "adapter", "--model", "tiny-gpt2", "--out", merged)
    if res.exit_code == 2:
        assert one_line_error(res, "lm_head") and not merged.exists(), res.output
        return
    assert res.exit_code == 0, res.output

    from transformers import AutoModelForCausalLM

    from slimtune.peft import read_adapter
    adapted, tok = read_adapter(run / "adapter", "tiny-gpt2")
    plain = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    ids = tok("Review: a positive , not a negative movie\nSentiment:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = adapted.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4 * a.std(), f"merged differs from the adapter by {(a - b).abs().max():.3g}"


def test_eval_scores_an_adapter_as_its_run_did(tmp_path):
    """`eval --adapter` adopts the run's task and prompt so that it reproduces the run's numbers, but not its
    --max-length: a run trained and evaluated with --max-length 12 is re-scored at eval's default 256, and the loss
    differs from the run's own best_eval on the same data (0.6941 vs 0.6930 here) with nothing said."""
    run = tmp_path / "run"
    res = cli("train", "--model", "tiny-llama", "--data", TRAIN, "--eval-data", DEV, "--optimizer", "adamw", "--lr",
              "5e-2", "--steps", 2, "--eval-every", 2, "--batch-size", 8, "--max-length", 12, "--out", run, "--quiet")
    assert res.exit_code == 0, res.output
    best = json.loads((run / "summary.json").read_text())["best_eval"]
    res = cli("eval", "--data", DEV, "--adapter", run / "adapter", "--model", "tiny-llama")
    assert res.exit_code == 0, res.output
    scored = json.loads(res.output[res.output.index("{"):])
    assert scored["loss"] == pytest.approx(best["loss"], rel=1e-6)


def test_an_exported_gguf_is_not_named_after_a_temporary_directory(tmp_path):
    """llama.cpp's converter names the model (general.name, what Ollama / LM Studio / llama-server show) after the
    directory it converts; export saves the merged model to a tempfile directory first, so every file is called
    e.g. 'Tmpcuqcqs32'."""
    import gguf
    from transformers import AutoTokenizer

    from slimtune.export import export_gguf
    from slimtune.models.loading import SMOLLM2_GGUF, smollm2_gguf_dir, tiny_model

    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF)
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id)
    out = tmp_path / "sentiment-model.gguf"
    export_gguf(model, tok, out, "f16", verify=False)
    field = gguf.GGUFReader(str(out)).fields["general.name"]
    name = field.contents() if hasattr(field, "contents") else bytes(field.parts[-1]).decode()
    assert not name.lower().startswith("tmp"), name


def test_merging_an_adapter_saved_on_a_tied_lm_head_before_the_refusal_is_refused(tmp_path):
    """(lead) The refusal at apply_peft covers new runs; an adapter saved before it (peft's own get_peft_model on a
    tied lm_head) must not be merged into the shared matrix either: merge refuses it in one line, writing nothing."""
    from peft import LoraConfig, get_peft_model

    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft.registry import adapter_meta, write_adapter
    base, tok = load_model_and_tokenizer("tiny-gpt2", texts=["a positive movie", "a negative movie"])
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    write_adapter(model, tok, tmp_path / "adapter", meta=adapter_meta("tiny-gpt2"))
    res = cli("merge", tmp_path / "adapter", "--model", "tiny-gpt2", "--out", tmp_path / "merged")
    assert one_line_error(res, "lm_head") and not (tmp_path / "merged").exists(), res.output


def test_an_adapter_records_how_its_run_scored_it_and_a_copy_elsewhere_keeps_it(tmp_path):
    """(lead) The run's --max-length is in the adapter's own record (slimtune.json), so an adapter copied out of its
    run directory is still scored as its run did; a --max-length given to eval wins."""
    import shutil

    from slimtune.peft.registry import read_adapter_meta
    run = tmp_path / "run"
    res = cli("train", "--model", "tiny-llama", "--data", TRAIN, "--eval-data", DEV, "--optimizer", "adamw", "--lr",
              "5e-2", "--steps", 2, "--eval-every", 2, "--batch-size", 8, "--max-length", 12, "--out", run, "--quiet")
    assert res.exit_code == 0, res.output
    assert read_adapter_meta(run / "adapter")["max_length"] == 12
    copy = tmp_path / "elsewhere"
    shutil.copytree(run / "adapter", copy)
    best = json.loads((run / "summary.json").read_text())["best_eval"]
    scored = lambda *extra: json.loads((r := cli("eval", "--data", DEV, "--adapter", copy, "--model", "tiny-llama",
                                                 *extra)).output[r.output.index("{"):])
    assert scored()["loss"] == pytest.approx(best["loss"], rel=1e-6)
    assert scored("--max-length", 8)["loss"] != pytest.approx(best["loss"], rel=1e-6)

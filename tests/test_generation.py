"""Generation: prompt -> completion and chat data, completion-only loss, decoding metrics, every optimizer, CLI."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from slimtune import SlimtuneError
from slimtune.cli import app
from slimtune.generation.data import generation_task, group_references, rows_to_examples
from slimtune.generation.metrics import bleu, generation_metrics, token_f1
from slimtune.generation.objective import IGNORE, encode_generation, per_example_generation_losses
from slimtune.models import load_model_and_tokenizer
from slimtune.optim import OptimizerArgs
from slimtune.peft import PeftSettings
from slimtune.privacy import PrivacySpec
from slimtune.train import TrainConfig, prepare, train
from slimtune.train.objectives import GenerationSettings

runner = CliRunner()
FOODS, AREAS = ["pizza", "sushi", "pasta", "curry"], ["riverside", "centre"]


def pairs(n=32):
    return [{"prompt": f"food[{FOODS[i % 4]}], area[{AREAS[i // 4 % 2]}]\n",
             "completion": f"A {FOODS[i % 4]} place by the {AREAS[i // 4 % 2]}."} for i in range(n)]


@pytest.fixture
def gen_files(tmp_path):
    rows = pairs()
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["completion"]}]}) + "\n"
                            for r in rows))
    table = tmp_path / "e2e.csv"
    table.write_text("mr,ref\n" + "".join(f"\"{r['prompt'].strip()}\",{r['completion']}\n" for r in rows))
    return jsonl, chat, table


@pytest.fixture
def tiny_gen():
    texts = [r["prompt"] + " " + r["completion"] for r in pairs()]
    return load_model_and_tokenizer("tiny-llama", texts=texts)


# -- data --------------------------------------------------------------------------------------------------------
def test_three_formats_and_grouped_references(gen_files, tiny_gen):
    _, tok = tiny_gen
    jsonl, chat, table = gen_files
    from slimtune.data.readers import read_rows
    plain = rows_to_examples(read_rows(str(jsonl))[0], generation_task(), "f")
    assert plain[0].prompt == "food[pizza], area[riverside]\n" and plain[0].completion == "A pizza place by the riverside."
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    chats = rows_to_examples(read_rows(str(chat))[0], generation_task(), "f", tok)
    assert chats[0].prompt.startswith("[system] Be brief.\n[user] food[pizza]") and chats[0].prompt.endswith(
        "[assistant]") and chats[0].completion == plain[0].completion  # the tokenizer's own template
    tabled = rows_to_examples(read_rows(str(table))[0], generation_task("mr", "ref", "Describe: {mr}\n"), "f")
    assert tabled[0].prompt == "Describe: food[pizza], area[riverside]\n"
    grouped = group_references(tabled)
    assert len(grouped) == 8 and all(len(g.references) == 4 for g in grouped)


@pytest.mark.parametrize("row,message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages[0]"),
    ({"messages": "hello"}, "non-empty list"),
])
def test_bad_chat_rows_name_file_line_and_field(tmp_path, tiny_gen, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n" + json.dumps(row) + "\n")
    from slimtune.data.readers import read_rows
    with pytest.raises(SlimtuneError, match=rf"bad.jsonl:2: field .*{message.replace('[', '.').replace(']', '.')}"):
        rows_to_examples(read_rows(str(path))[0], generation_task(), str(path), tiny_gen[1])


def test_bad_table_rows_and_templates(tmp_path):
    from slimtune.data.readers import read_rows
    path = tmp_path / "t.tsv"
    path.write_text("input\ttarget\nhello\tworld\nagain\t\n")
    with pytest.raises(SlimtuneError, match=r"t.tsv:3: field 'target' is empty"):
        rows_to_examples(read_rows(str(path))[0], generation_task(), str(path))
    with pytest.raises(SlimtuneError, match="missing column.*'mr'"):
        rows_to_examples(read_rows(str(path))[0], generation_task("mr", "ref"), str(path))
    with pytest.raises(SlimtuneError, match="must contain {input}"):
        generation_task(template="Describe:")


# -- objective ---------------------------------------------------------------------------------------------------
def test_loss_covers_completion_tokens_and_eos_only(tiny_gen):
    model, tok = tiny_gen
    examples = rows_to_examples([(i, r) for i, r in enumerate(pairs(4))], generation_task(), "f")
    batch = encode_generation(tok, examples[:2], max_length=64)
    for i, e in enumerate(examples[:2]):
        target = tok.encode(e.completion, add_special_tokens=False) + [tok.eos_token_id]
        assert batch.labels[i][batch.labels[i] != IGNORE].tolist() == target  # prompt and padding masked
    losses = per_example_generation_losses(model, batch)
    logits = model(input_ids=batch.input_ids[:1], attention_mask=batch.attention_mask[:1],
                   position_ids=batch.position_ids[:1]).logits[0, :-1]
    labels = batch.labels[0, 1:]
    manual = torch.nn.functional.cross_entropy(logits[labels != IGNORE], labels[labels != IGNORE])
    assert losses.shape == (2,) and torch.allclose(losses[0], manual, atol=1e-5)


def test_truncated_targets_warn(tiny_gen):
    _, tok = tiny_gen
    examples = rows_to_examples([(1, {"prompt": "food[pizza]", "completion": " ".join(["pizza"] * 50)})],
                                generation_task(), "f")
    with pytest.warns(UserWarning, match="truncated to fit --max-length 16"):
        batch = encode_generation(tok, examples, max_length=16)
    assert batch.input_ids.shape[1] == 16


# -- metrics -----------------------------------------------------------------------------------------------------
def test_metrics_match_their_definitions():
    refs = [("the cat sat on the mat", "a cat was on the mat"), ("hello world",)]
    perfect = generation_metrics(["the cat sat on the mat", "hello world"], refs)
    assert perfect["bleu"] > 99 and perfect["rougeL"] == 100 and perfect["exact_match"] == 100 and perfect["f1"] == 100
    import sacrebleu
    preds = ["a cat sat on a mat", "hello"]
    padded = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs], [refs[0][1], None]]).score
    assert bleu(preds, refs) == pytest.approx(padded)
    empty_padded = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs], [refs[0][1], ""]]).score
    assert bleu(preds, refs) != pytest.approx(empty_padded)  # "" would be a real (empty) reference
    assert token_f1("The Eiffel tower", "eiffel tower in Paris") == pytest.approx(2 * 1.0 * 0.5 / 1.5)


# -- training: every optimizer family ------------------------------------------------------------------------------
def gen_config(tmp_path, path, name="run", **kw):
    base = dict(out_dir=str(tmp_path / name), train_data=str(path), eval_data=str(path), model="tiny-llama",
                task="generation", optimizer="adamw", optim=OptimizerArgs(lr=2e-2, eps=1e-2),
                peft=PeftSettings("lora", r=4), steps=30, batch_size=8, eval_every=10, checkpoint_every=10,
                progress=False, generation=GenerationSettings(max_new_tokens=12))
    base.update(kw)
    return TrainConfig(**base)


def test_adamw_lora_learns_the_completions(tmp_path, gen_files):
    summary = train(prepare(gen_config(tmp_path, gen_files[0], steps=40, lr_scheduler="constant")))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    zero = lines[0]
    assert zero["step"] == 0 and {"eval_loss", "eval_perplexity", "eval_bleu", "eval_rougeL", "eval_exact_match",
                                  "eval_f1"} <= set(zero)
    assert summary["best_eval"]["loss"] < zero["eval_loss"] - 0.3
    assert summary["best_bleu"] > zero["eval_bleu"]
    assert summary["best_metric"] == "loss" and summary["final_accuracy"] is None


@pytest.mark.parametrize("optimizer,peft", [("mezo", "lora"), ("lozo", "svfit"), ("dpzero", "adapter"),
                                            ("dp-adamw", "lora"), ("sgd", "none")])
def test_every_optimizer_trains_on_generation_data(tmp_path, gen_files, optimizer, peft):
    privacy = PrivacySpec(target_epsilon=6.0, delta=1e-3) if optimizer.startswith("dp") else None
    held_out = tmp_path / "held_out.jsonl"  # private runs refuse evaluation rows that are training rows
    held_out.write_text("".join(json.dumps({"prompt": r["prompt"] + " (dev)", "completion": r["completion"]}) + "\n"
                                for r in pairs()[:6]))
    summary = train(prepare(gen_config(tmp_path, gen_files[1], optimizer=optimizer, peft=PeftSettings(peft, r=2),
                                       eval_data=str(held_out), privacy=privacy, steps=4, eval_every=2,
                                       generation=GenerationSettings(max_new_tokens=4))))
    assert summary["steps"] == 4 and math.isfinite(summary["best_eval"]["loss"])
    assert (summary["epsilon"] is not None) == optimizer.startswith("dp")
    assert (tmp_path / "run" / "adapter").exists()


def test_best_metric_bleu_and_resume(tmp_path, gen_files):
    cfg = dict(best_metric="bleu", lr_scheduler="constant", warmup_steps=0)  # the two runs differ in steps
    straight = train(prepare(gen_config(tmp_path, gen_files[0], "a", steps=20, **cfg)))
    train(prepare(gen_config(tmp_path, gen_files[0], "b", steps=10, **cfg)))
    resumed = train(prepare(gen_config(tmp_path, gen_files[0], "b", steps=20, **cfg), resume=True))
    assert straight["best_metric"] == "bleu" and straight["best_bleu"] == max(
        json.loads(l).get("eval_bleu", -1) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
    assert resumed["best_eval"] == straight["best_eval"] and resumed["best_step"] == straight["best_step"]
    with pytest.raises(SlimtuneError, match="--best-metric 'accuracy'"):
        prepare(gen_config(tmp_path, gen_files[0], "c", best_metric="accuracy"))


# -- CLI ---------------------------------------------------------------------------------------------------------
def test_cli_train_eval_generate_merge(tmp_path, gen_files):
    _, _, table = gen_files
    common = ["--model", "tiny-llama", "--task", "generation", "--input-column", "mr", "--target-column", "ref",
              "--template", "{mr}\n", "--max-new-tokens", "8"]
    res = runner.invoke(app, ["train", "--data", str(table), "--eval-data", str(table), "--out", str(tmp_path / "run"),
                              "--optimizer", "adamw", "--lr", "2e-2", "--steps", "10", "--eval-every", "5",
                              "--batch-size", "8", "--quiet", *common])
    assert res.exit_code == 0, res.output
    assert "BLEU" in res.output
    preds = tmp_path / "preds.jsonl"
    res = runner.invoke(app, ["eval", "--data", str(table), "--adapter", str(tmp_path / "run" / "adapter"),
                              "--predictions", str(preds), *common])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    best = json.loads((tmp_path / "run" / "summary.json").read_text())["best_eval"]
    assert metrics["examples"] == 32 and metrics["loss"] == pytest.approx(best["loss"], rel=1e-4)
    assert metrics["bleu"] == pytest.approx(best["bleu"])
    lines = [json.loads(l) for l in preds.read_text().splitlines()]
    assert len(lines) == 8 and len(lines[0]["references"]) == 4 and isinstance(lines[0]["prediction"], str)
    again = runner.invoke(app, ["eval", "--data", str(table), "--predictions", str(preds), *common])
    assert again.exit_code == 2 and "nothing was overwritten" in again.output

    res = runner.invoke(app, ["generate", "--model", "tiny-llama", "--adapter", str(tmp_path / "run" / "adapter"),
                              "--prompt", "food[pizza], area[riverside]\n", "--max-new-tokens", "6"])
    assert res.exit_code == 0 and res.output.strip()  # streamed to the terminal
    out = tmp_path / "gen.jsonl"
    res = runner.invoke(app, ["generate", "--model", "tiny-llama", "--adapter", str(tmp_path / "run" / "adapter"),
                              "--input", str(table), "--input-column", "mr", "--template", "{mr}\n", "--output",
                              str(out), "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    produced = {r["prompt"]: r["completion"] for r in map(json.loads, out.read_text().splitlines())}
    assert all(produced[p["prompt"]] == p["prediction"] for p in lines)  # the same greedy outputs as eval

    res = runner.invoke(app, ["merge", str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "merged"),
                              "--model", "tiny-llama"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", "--data", str(table), *common[:0], "--model", str(tmp_path / "merged"),
                              *common[2:]])
    assert res.exit_code == 0, res.output
    merged = json.loads(res.output[res.output.index("{"):])  # after transformers' loading progress bar
    assert merged["loss"] == pytest.approx(metrics["loss"], rel=1e-4)  # (decoding a random tiny model flips ties)


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "tiny-llama"], "exactly one of --prompt or --input"),
    (["train", "--task", "generation", "--best-metric", "accuracy"], "--best-metric 'accuracy'"),
    (["train", "--task", "generation", "--num-beams", "0"], "--num-beams 0: must be >= 1"),
])
def test_generation_cli_errors_are_one_line(tmp_path, gen_files, args, message):
    extra = ["--data", str(gen_files[0]), "--eval-data", str(gen_files[0]), "--out", str(tmp_path / "x"),
             "--model", "tiny-llama"] if args[0] == "train" else []
    res = runner.invoke(app, [*args, *extra])
    assert res.exit_code == 2 and message in " ".join(res.output.split())


# -- federated: the same local objective on generation data ---------------------------------------------------------
def test_federated_clients_train_on_generation_data_and_the_server_scores_loss(tmp_path, gen_files):
    from slimtune.federated import FederatedConfig
    from slimtune.federated.client_app import local_train
    from slimtune.federated.model import build_model, lora_state
    from slimtune.federated.wire import decode_state, encode_state

    cfg = FederatedConfig(data=str(gen_files[2]), eval_data=str(gen_files[2]), task="generation", input_column="mr",
                          target_column="ref", template="{mr}\n", num_clients=2, local_steps=3, lr=2e-2, bits=4)
    model, tok, train_examples, evals, objective = build_model(cfg)
    assert objective.kind == "generation" and train_examples[0].prompt.endswith("\n")
    theta = lora_state(model)
    payload, _ = encode_state(theta, cfg.bits, cfg.block_size)
    arrays, metrics = local_train(cfg, 0, payload, server_round=1)
    assert math.isfinite(metrics["train-loss"]) and metrics["num-examples"] > 0
    delta = decode_state(arrays, {k: tuple(v.shape) for k, v in theta.items()}, cfg.upload_bits, cfg.block_size)
    assert any(v.abs().sum() > 0 for k, v in delta.items() if "lora_B" in k)  # the completion loss moved B
    before = objective.evaluate(model, evals, "cpu")["loss"]
    from slimtune.federated.model import load_lora_state
    load_lora_state(model, {k: theta[k] + delta[k] for k in theta})
    assert objective.evaluate(model, evals, "cpu")["loss"] < before


@pytest.mark.slow
def test_federated_simulation_on_generation_data(tmp_path, gen_files, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, None)
    res = runner.invoke(app, ["federate", "--data", str(gen_files[0]), "--eval-data", str(gen_files[0]), "--model",
                              "tiny-llama", "--task", "generation", "--clients", "2", "--rounds", "2",
                              "--local-steps", "3", "--lr", "2e-2", "--out", str(tmp_path / "fed")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "fed" / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] and summary["client_visible_loss"] is not None


def test_models_that_expect_bos_get_it_once_at_the_start_of_prompts():
    """Gemma-style tokenizers add BOS; slimtune puts it before prompts itself (and never before completions)."""
    from tokenizers.processors import TemplateProcessing
    from slimtune.models import bos_prefix, tiny_tokenizer
    from slimtune.train.classification import encode
    from slimtune.data.tasks import Example

    plain = tiny_tokenizer(["food pizza place"])
    assert bos_prefix(plain) == ""
    tok = tiny_tokenizer(["food pizza place"], extra_words=("<bos>",))
    tok.add_special_tokens({"bos_token": "<bos>"})
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    assert bos_prefix(tok) == "<bos>"
    batch = encode(tok, [Example("food pizza", 0), Example("food", 1)])
    assert batch.input_ids[0, 0] == tok.bos_token_id and (batch.input_ids == tok.bos_token_id).sum() == 2
    from slimtune.generation.objective import token_ids
    from slimtune.generation.data import GenerationExample
    p, c, _ = token_ids(tok, GenerationExample("food", "pizza place"), 32)
    assert p[0] == tok.bos_token_id and tok.bos_token_id not in c

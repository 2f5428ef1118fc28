"""`slimtune eval` and `slimtune generate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.markup import escape

from slimtune import SlimtuneError
from slimtune.settings.cli import command
from slimtune.settings.commands import EvalSettings, GenerateSettings
from slimtune.settings.train import resolve_device


def register(app) -> None:
    command(app, EvalSettings, run_eval, name="eval")
    command(app, GenerateSettings, run_generate, with_config=False)


def run_eval(s: EvalSettings):
    """Accuracy (classification) or loss, perplexity, BLEU, ROUGE-L, EM, F1 (generation) of a model, optionally with
    a trained adapter."""
    from slimtune.cli import console, fail
    from slimtune.models.loading import check_positions
    from slimtune.train.objectives import GenerationSettings, make_objective, unseen_words

    try:
        objective = make_objective(s.task, s.text_column, s.label_column, s.template, s.label_words,
                                   GenerationSettings(s.input_column, s.target_column, s.max_new_tokens,
                                                      s.num_beams, True, s.batch_size, s.learned_generation_prompt()),
                                   s.max_length, s.batch_size)
        from slimtune.data.readers import dataset_splits
        raw, texts = objective.load(s.data, "validation")
        if s.data.startswith("hf:") and dataset_splits(s.data[3:]):
            print(f"note: scoring the 'validation' split of {s.data}", file=sys.stderr)
        dev = resolve_device(s.device)
        m, tok = load_for_inference(s.model, s.adapter, dev, texts + unseen_words(objective.public_words, texts))
        check_positions(m, s.max_length, s.max_new_tokens if objective.kind == "generation" else 0)
        objective.bind(tok)
        examples = objective.examples(raw, tok)
        outputs = [] if s.predictions else None
        res = objective.evaluate(m, examples, dev, predictions=outputs)
        if outputs is not None:
            write_jsonl(s.predictions, outputs, "--predictions")
    except SlimtuneError as exc:
        fail(exc)
    console.print_json(json.dumps({"examples": len(examples), **res}))


def run_generate(s: GenerateSettings):
    """Generate completions with a model and (optionally) a trained adapter."""
    from slimtune.cli import console, fail
    from slimtune.generation.decode import DecodeSettings, generate_texts, stream_generate
    from slimtune.generation.prompts import prompt_texts, read_prompt_items, render_prompts
    from slimtune.models.loading import check_prompt_and_new_tokens, max_positions

    try:
        learned = s.learned_generation_prompt() or {}
        column = s.input_column or learned.get("input_column")
        items = [s.prompt] if s.prompt is not None else read_prompt_items(s.input, s.input_column, column)
        unused = [flag for flag, given in (("--template", s.template is not None), ("--chat", s.chat),
                                           ("--input-column", s.input_column is not None)) if given]
        if unused and any(isinstance(item, list) for item in items):
            raise SlimtuneError(f"{unused[0]}: {s.input} holds conversations (`messages` rows), which are rendered "
                                f"with the model's chat template as they are; leave {unused[0]} out")
        template, note = learned_template(s, learned, column, items)
        dev = resolve_device(s.device)
        m, tok = load_for_inference(s.model, s.adapter, dev, prompt_texts(items))
        # the default --max-length (1024) is cut to fit the model (decode.prompt_room); a given one must fit
        # (GenerateSettings.check did so from the config where it could be read without loading)
        check_prompt_and_new_tokens(max_positions(m), s.max_length if s.given("max_length") else None,
                                    s.max_new_tokens)
        if note:
            from slimtune.cli import errors
            errors.print(note, soft_wrap=True, highlight=False, markup=False)
        prompts = render_prompts(items, tok, s.template, column, s.chat, template)
        settings = DecodeSettings(s.max_new_tokens, s.num_beams, s.batch_size, s.max_length)
        if s.prompt is not None and s.num_beams == 1 and not s.output:
            stream_generate(m, tok, prompts[0], settings, dev)
            console.print()
            return
        outputs = generate_texts(m, tok, prompts, settings, dev)
        if s.output:
            write_jsonl(s.output, [{"prompt": p, "completion": o} for p, o in zip(prompts, outputs)], "--output")
    except SlimtuneError as exc:
        fail(exc)
    if s.output:
        console.print(f"{len(outputs)} completions written to [bold]{escape(s.output)}[/]")
    else:
        for o in outputs:
            print(o, flush=True)


def learned_template(s: GenerateSettings, learned: dict, column: str | None, items: list) -> tuple[str | None,
                                                                                                   str | None]:
    """(the template a generation adapter learned, over `column`, for the plain prompts it wraps where --template is
    left out; the note to say on stderr once the checks pass, with how to send prompts as they are, since it changes
    what the model is given)."""
    from slimtune.generation.data import generation_task
    from slimtune.generation.prompts import WrittenPrompt

    if s.template is not None or not learned.get("template"):
        return None, None
    template = generation_task(column, None, None, learned).template
    wrapped = [item for item in items if isinstance(item, str) and not isinstance(item, WrittenPrompt)]
    if wrapped and template != "{" + (column or "input") + "}":
        return template, (f"note: prompts go through the template the adapter learned, {template!r} (from "
                          f"{s.recorded[1]}); --template '{{{column or 'input'}}}' sends them as they are")
    return template, None


def load_for_inference(model: str, adapter: str | None, device: str, texts: list[str]):
    """(model, tokenizer): the base alone (a tiny model fits its tokenizer to `texts`; a checkpoint slimtune wrote,
    such as a merge, in the dtype its record names), or with `adapter` the model its run evaluated, through the one
    loader of saved adapters (peft/registry.py: read_adapter)."""
    if adapter:
        from slimtune.peft import read_adapter
        return read_adapter(adapter, model, device)
    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft.registry import DTYPES, read_adapter_meta
    recorded = read_adapter_meta(model).get("dtype") if Path(model).is_dir() else None
    return load_model_and_tokenizer(model, dtype=recorded if recorded in DTYPES else "float32", device=device,
                                    texts=texts)


def write_jsonl(path: str, rows: list[dict], flag: str) -> None:
    """Write whole or not at all (checked before any work; a failure here still names the flag)."""
    from slimtune.train.run_dir import write_new_file

    text = "".join(json.dumps(r) + "\n" for r in rows)
    write_new_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), flag)

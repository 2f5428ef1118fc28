"""`slimtune merge` and `slimtune export`."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import typer
from rich.markup import escape

from slimtune import SlimtuneError
from slimtune.settings.cli import command
from slimtune.settings.commands import ExportSettings, MergeSettings

ADAPTER = inspect.Parameter("adapter", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                            default=typer.Argument(..., help="adapter directory (run_dir/adapter), or for export a "
                                                   "merged checkpoint"))


def register(app) -> None:
    command(app, MergeSettings, run_merge, arguments=[ADAPTER], with_config=False)
    command(app, ExportSettings, run_export, arguments=[ADAPTER], with_config=False)


def note_quantized_base(adapter: str) -> None:
    """Merging folds the adapter into the dense base weights; one trained on a quantized base differs slightly."""
    from slimtune.peft.registry import read_adapter_meta
    kind = read_adapter_meta(adapter).get("base_quant")
    if kind:
        print(f"note: {adapter} was trained on an {kind} base; it is merged into the dense base, whose outputs "
              "differ slightly from the run's evaluation", file=sys.stderr)


def run_merge(s: MergeSettings):
    """Fold an adapter into the base weights and save a plain transformers checkpoint."""
    import torch

    from slimtune.cli import console, fail
    from slimtune.peft import merge_peft, read_adapter
    from slimtune.peft.registry import read_adapter_meta, recorded_scoring

    try:
        note_quantized_base(s.adapter)
        adapted, tok = read_adapter(s.adapter, s.model, dense=True)
        dtype = read_adapter_meta(s.adapter).get("dtype") or "float32"
        merged = merge_peft(adapted).to(getattr(torch, dtype))  # merged in float32, saved in the run's dtype
        save_checkpoint_dir(merged, tok, s.out, {**prompt_meta(s.adapter), **recorded_scoring(s.adapter),
                                                 "dtype": dtype})  # scored as its run scored the adapter
    except SlimtuneError as exc:
        fail(exc)
    console.print(f"merged checkpoint written to [bold]{escape(str(s.out))}[/]")


def prompt_meta(adapter: str) -> dict:
    """The prompt an adapter learned (registry.recorded_prompt: what `eval --adapter` scores it with), for the merged
    checkpoint to carry in its slimtune.json, so that eval scores the merged weights with the same prompt."""
    from slimtune.peft.registry import recorded_prompt
    found = recorded_prompt(adapter)
    return {k: v for k, v in found[0].items() if v is not None} if found else {}


def save_checkpoint_dir(model, tokenizer, out: str, prompt: dict | None = None) -> None:
    """Save whole or not at all: a failure or a Ctrl-C leaves no half-written checkpoint."""
    from slimtune.peft.registry import ADAPTER_META
    from slimtune.train.run_dir import write_new_directory

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if prompt:
            (tmp / ADAPTER_META).write_text(json.dumps(prompt))

    write_new_directory(out, save, "--out")


def run_export(s: ExportSettings):
    """Merge an adapter into its base model and write one GGUF file (verified by reloading it)."""
    from slimtune.cli import console, fail
    from slimtune.export import export_gguf
    from slimtune.peft import merge_peft, read_adapter

    try:
        note_quantized_base(s.adapter)
        adapted, tok = read_adapter(s.adapter, s.model, dense=True)  # a merged checkpoint is read as it is
        merged = merge_peft(adapted)
        prompt = prompt_meta(s.adapter)
        report = export_gguf(merged, tok, Path(s.out), s.quant, s.verify, prompt)
    except SlimtuneError as exc:
        fail(exc)
    if prompt:
        report["prompt"] = prompt
        print(f"note: the model learned the prompt {json.dumps(prompt, ensure_ascii=False)}; prompt it in that form "
              "(recorded in the file's general.description)", file=sys.stderr)
    console.print_json(json.dumps(report))

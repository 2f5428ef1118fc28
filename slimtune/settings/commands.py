"""Settings of `slimtune eval | generate | merge | export | plan | report | demo` (train: settings/train.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slimtune import SlimtuneError
from slimtune.optim.methods import METHOD_CONSTANTS
from slimtune.settings.base import Settings, setting, when
from slimtune.settings.rules import (adopt_recorded_base, check_adapter_and_model, check_device, check_model,
                                     check_new_directory,
                                     check_output_file, check_outside, check_task_text, check_template,
                                     require_input_file)
from slimtune.settings.train import CLASSIFICATION, MAX_NUM_BEAMS, TASKS

generation = when(task=("generation",))


class UsesRecordedPrompt:
    """eval and generate use a saved model with the prompt it learned: the record of the adapter, else of a checkpoint
    given as --model (peft.registry.recorded_prompt), read once before the flags are checked against it."""

    recorded = None  # (the recorded prompt, its file)

    def adopt_records(self) -> None:
        self.recorded = _record(self)

    def learned_generation_prompt(self) -> dict | None:
        """A generation adapter's recorded {template, input_column, target_column}: what fills the settings left out
        (generation.data.generation_task; rows that carry their own prompts use none of it)."""
        record = (self.recorded or (None,))[0]
        if record is None or record["task"] != "generation" or getattr(self, "task", "generation") != "generation":
            return None
        return record


@dataclass
class EvalSettings(UsesRecordedPrompt, Settings):
    command = "eval"

    data: str | None = setting(None, "evaluation data (required, here or in --config)")
    model: str = setting("smollm2", "the base model (smollm2, gemma3-270m, tiny-llama, tiny-gpt2 or a directory; "
                         "left out with --adapter: the one the adapter records)")
    adapter: str | None = setting(None, "a saved adapter directory (run_dir/adapter)")
    task: str = setting("sst2", "sst2, rte, custom or generation (left out: the adapter's, where recorded)",
                        choices=TASKS)
    text_column: str | None = setting(None, "sst2: the text column", applies=when(task=("sst2",)))
    label_column: str | None = setting(None, "classification: the label column", applies=when(task=CLASSIFICATION))
    template: str | None = setting(None, "prompt template (custom task, another prompt for sst2/rte, or generation; "
                                   "\\n: a newline); left out: the one the adapter (or checkpoint) learned, where "
                                   "recorded", escapes=True)
    label_words: str | None = setting(None, "classification label words (custom task; sst2/rte: instead of the "
                                      "task's own)", applies=when(task=CLASSIFICATION))
    input_column: str | None = setting(None, "generation, tables: prompt column", applies=generation)
    target_column: str | None = setting(None, "generation, tables: reference column", applies=generation)
    max_new_tokens: int = setting(64, "generation: tokens generated per prompt", low=1, applies=generation)
    num_beams: int = setting(1, "generation: beam search width (1: greedy)", low=1, high=MAX_NUM_BEAMS,
                             applies=generation)
    max_length: int = setting(256, "tokens kept per example (prompts truncated from the left; left out: the "
                              "adapter's run's, where recorded)", low=8)
    predictions: str | None = setting(None, "generation: write each prompt's output and references to this JSONL "
                                      "file", applies=generation)
    batch_size: int = setting(32, "examples per forward pass", low=1)
    device: str = setting("auto", "cpu, cuda, cuda:N or auto")

    def adopt_records(self) -> None:
        super().adopt_records()
        adopt_recorded_task(self)
        adopt_recorded_scoring(self)

    def check(self) -> None:
        if not self.data:
            raise SlimtuneError("--data is required (on the command line or in --config)")
        require_input_file(self.data, self.where("data"))
        adopt_recorded_base(self)
        check_model(self.model)
        if self.adapter is not None:
            check_adapter_and_model(self.adapter, self.model, self.given("model"))
        check_device(self.device)
        adopt_recorded_prompt(self)
        if self.task == "generation" and (learned := self.learned_generation_prompt()) is not None:
            from slimtune.generation.data import generation_task
            generation_task(self.input_column, self.target_column, self.template, learned)  # the template's column
        else:
            check_task_text(self)
        if self.predictions:
            check_output_file(self.predictions, self.where("predictions"))
            check_outside(self.predictions, self.adapter or "", "--predictions", "--adapter")


def _record(s: EvalSettings):
    """recorded_prompt of what eval scores: the adapter, else a checkpoint given as --model (not a built-in name)."""
    from slimtune.models.loading import BUILTIN_MODELS
    from slimtune.peft.registry import recorded_prompt
    carrier = s.adapter if s.adapter is not None else s.model if s.model not in BUILTIN_MODELS else None
    return recorded_prompt(carrier) if carrier is not None and Path(carrier).is_dir() else None


def adopt_recorded_scoring(s: EvalSettings) -> None:
    """--max-length (and a generation adapter's --max-new-tokens, --num-beams) left out are those the run scored the
    adapter (or the saved model given as --model: a --peft none run's, a merge) with (peft.registry.recorded_scoring),
    so that eval reproduces the run's numbers on the same data."""
    from slimtune.models.loading import BUILTIN_MODELS
    carrier = s.adapter if s.adapter is not None else s.model if s.model not in BUILTIN_MODELS else None
    if carrier is None or not Path(carrier).is_dir():  # the adapter, else a saved model (a --peft none run, a merge)
        return
    from slimtune.peft.registry import recorded_scoring
    for name, value in recorded_scoring(carrier).items():
        if name != "max_length" and s.task != "generation":
            continue
        if not s.given(name):
            setattr(s, name, value)


def adopt_recorded_task(s: EvalSettings) -> None:
    """--task left out is the recorded one, before the flags are checked against it (a generation adapter's
    --target-column applies to its task, not to the default sst2)."""
    if not s.given("task") and s.recorded is not None and s.recorded[0]["task"] in TASKS:
        s.task = s.recorded[0]["task"]


def check_generation_record(record: dict, source) -> None:
    """A generation record's template and input column, checked as the flags are; a failure names its file."""
    from slimtune.generation.data import generation_task
    for key in ("template", "input_column", "target_column"):
        if record.get(key) is not None and (not isinstance(record[key], str) or not record[key].strip()):
            raise SlimtuneError(f"{source}: {key} {record[key]!r} is not a non-empty text")
    try:
        generation_task(record.get("input_column"), None, record.get("template"))
    except SlimtuneError as exc:
        raise SlimtuneError(f"{source}: {exc}") from None


def adopt_recorded_prompt(s: EvalSettings) -> None:
    """Eval scores a saved model with the prompt it learned, however it is named: the adapter's record, or, with no
    adapter, that of the checkpoint given as --model (a merged checkpoint, a --peft none run's adapter/), read by
    peft.registry.recorded_prompt. --task left out is the recorded task; for that task, --template and
    --label-words left out are the recorded ones (a prompt given is used as given, and another --task given gets its
    own prompt). The record is checked as the flags are, and a failure names its file."""
    from types import SimpleNamespace

    if s.recorded is None:
        return
    record, source = s.recorded
    kind = {True: "generation", False: "classification"}
    if s.given("task") and (s.task == "generation") != (record["task"] == "generation"):
        raise SlimtuneError(f"--task {s.task}: {source} records a {kind[record['task'] == 'generation']} model (task "
                            f"{record['task']!r}), which learned no {kind[s.task == 'generation']} prompt; leave "
                            "--task out, or give a task of its kind")
    if record["task"] == "generation":
        check_generation_record(record, source)
        return  # the objective fills the prompt settings left out (learned_generation_prompt)
    if record["task"] not in CLASSIFICATION:
        raise SlimtuneError(f"{source}: task {record['task']!r} is none of {', '.join(CLASSIFICATION)}")
    try:
        check_task_text(SimpleNamespace(**record, input_column=None))
    except SlimtuneError as exc:
        raise SlimtuneError(f"{source}: {exc}") from None
    if not s.given("task"):
        s.task = record["task"]
        s.check_applicable()  # a flag of the default task's that the recorded task does not take
    if s.task == record["task"]:
        s.template = s.template if s.template is not None else record["template"]
        s.label_words = s.label_words if s.label_words is not None else record["label_words"]


@dataclass
class GenerateSettings(UsesRecordedPrompt, Settings):
    command = "generate"

    prompt: str | None = setting(None, "one prompt; the completion streams to the terminal (or goes to --output)")
    input: str | None = setting(None, "a file of prompts (.jsonl with prompt or messages, .tsv/.csv with "
                                "--input-column, .txt one per line)")
    output: str | None = setting(None, "write {prompt, completion} JSONL here (default: print)")
    model: str = setting("smollm2", "the base model the adapter was trained on (left out: the one its slimtune.json "
                         "records, else smollm2)")
    adapter: str | None = setting(None, "a saved adapter directory (run_dir/adapter)")
    chat: bool = setting(False, "wrap each prompt as a user message in the model's chat template")
    template: str | None = setting(None, "prompt template over the input column, e.g. '{input}\\n'", escapes=True)
    input_column: str | None = setting(None, "tables: the prompt column (default input)")
    max_new_tokens: int = setting(128, "tokens generated per prompt", low=1)
    num_beams: int = setting(1, "beam search width (1: greedy; streaming needs 1)", low=1, high=MAX_NUM_BEAMS)
    max_length: int = setting(1024, "prompt tokens kept (from the left)", low=1)
    batch_size: int = setting(8, "prompts per batch", low=1)
    device: str = setting("auto", "cpu, cuda, cuda:N or auto")

    def check(self) -> None:
        if (self.prompt is None) == (self.input is None):
            raise SlimtuneError("give exactly one of --prompt or --input")
        if self.input is not None:
            require_input_file(self.input, self.where("input"))
        if self.given("input_column") and self.input is None:
            raise SlimtuneError("--input-column applies to --input files (tables), not to --prompt")
        if self.given("batch_size") and self.prompt is not None:
            raise SlimtuneError("--batch-size applies to --input files (prompts per batch); --prompt is one prompt")
        if self.given("input_column") and Path(self.input).suffix.lower() == ".txt":
            raise SlimtuneError(f"--input-column applies to tables (.tsv, .csv, .jsonl); {self.input} holds one "
                                "prompt per line")
        adopt_recorded_base(self)
        check_model(self.model)
        if self.adapter is not None:
            check_adapter_and_model(self.adapter, self.model, self.given("model"))
        from slimtune.models.loading import check_prompt_and_new_tokens, model_positions
        check_prompt_and_new_tokens(model_positions(self.model), self.max_length if self.given("max_length") else None,
                                    self.max_new_tokens)  # before any work, where the config says without loading
        learned = self.learned_generation_prompt()
        if learned is not None:
            check_generation_record(learned, self.recorded[1])
        column = self.input_column or (learned or {}).get("input_column")
        if self.template is not None:
            check_template(self.template, (column or "input",), "--template",
                           hint="" if column else " (name another column with --input-column)")
        if self.output is not None:
            check_output_file(self.output, self.where("output"))
            check_outside(self.output, self.adapter or "", "--output", "--adapter")
        check_device(self.device)


@dataclass
class MergeSettings(Settings):
    command = "merge"

    adapter: str = setting("", "adapter directory (run_dir/adapter)", cli=False, name="ADAPTER")
    out: str = setting("", "directory for the merged checkpoint (new or empty)")
    model: str = setting("smollm2", "the base model the adapter was trained on (left out: the one its slimtune.json "
                         "records, else smollm2)")

    def check(self) -> None:
        if not self.out:
            raise SlimtuneError("--out is required: the directory for the merged checkpoint")
        adopt_recorded_base(self)
        check_model(self.model)
        check_adapter_and_model(self.adapter, self.model, self.given("model"), "ADAPTER")
        from slimtune.peft.registry import check_mergeable
        from slimtune.train.run_dir import check_finished_run
        check_mergeable(self.adapter, "ADAPTER")
        check_finished_run(self.adapter, "ADAPTER")
        check_new_directory(self.out, self.where("out"))
        check_outside(self.out, self.adapter)


@dataclass
class ExportSettings(Settings):
    command = "export"

    adapter: str = setting("", "an adapter directory (run_dir/adapter) or a merged checkpoint", cli=False,
                           name="ADAPTER")
    out: str = setting("", "the .gguf file to write (never overwritten)")
    format: str = setting("gguf", "gguf (llama.cpp, Ollama)", choices=("gguf",))
    quant: str = setting("f16", "f32, f16, bf16 or q8_0", choices=("f32", "f16", "bf16", "q8_0"))
    model: str = setting("smollm2", "the base model the adapter was trained on (left out: the one its slimtune.json "
                         "records, else smollm2)")
    verify: bool = setting(True, "reload the file with transformers and compare logits with the merged model",
                           bool_flags="--verify/--no-verify")

    def check(self) -> None:
        if not self.out:
            raise SlimtuneError("--out is required: the .gguf file to write")
        adopt_recorded_base(self)
        check_model(self.model)
        check_adapter_and_model(self.adapter, self.model, self.given("model"), "ADAPTER")
        from slimtune.peft.registry import check_mergeable
        from slimtune.train.run_dir import check_finished_run
        check_mergeable(self.adapter, "ADAPTER")
        check_finished_run(self.adapter, "ADAPTER")
        check_output_file(self.out, self.where("out"))
        check_outside(self.out, self.adapter)
        if Path(self.out).suffix.lower() != ".gguf":
            raise SlimtuneError(f"--out {self.out}: name the file .gguf")


@dataclass
class PlanSettings(Settings):
    command = "plan"

    model: str = setting("smollm2", "the model to plan for: a name, a checkpoint directory, or a config.json")
    batch_size: int = setting(16, "examples per step", low=1)
    max_length: int = setting(128, "tokens per example", low=1)
    r: int = setting(8, "LoRA/PiSSA rank, SVFit values, adapter bottleneck", low=1)
    dtype: str = setting("float32", "weights' dtype: float32, bfloat16 (bf16) or float16 (fp16)",
                         choices=("fp32", "float32", "bf16", "bfloat16", "fp16", "float16"))
    base_quant: str | None = setting(None, "the table for LoRA on a frozen int8 or int4 base (bitsandbytes); the "
                                     "ranking tries both anyway", choices=("int8", "int4"))
    fo_layers: int = setting(METHOD_CONSTANTS["fo_layers"], "the hybrid rows: top transformer blocks trained by "
                             "backprop (as train --fo-layers)", low=1)
    device: str = setting("auto", "cpu, cuda, cuda:N or auto")
    private: bool = setting(False, "plan a private run (train --epsilon): only the private optimizers' rows and "
                            "ranking (DP-AdamW, DPZero, the private hybrid, ...)")

    def check(self) -> None:
        from slimtune.settings.rules import normalise_dtype
        self.dtype = normalise_dtype(self.dtype)
        check_device(self.device, self.dtype)  # auto on a machine without CUDA is cpu: no float16 rows to propose
        if self.model.endswith(".json"):
            if not Path(self.model).is_file():
                raise SlimtuneError(f"--model {self.model}: no such file")
        else:
            check_model(self.model)


@dataclass
class ReportSettings(Settings):
    command = "report"

    runs: list = setting(help="run directories (each with summary.json)", factory=list, cli=False)
    out: str = setting("report", "output directory for report.html, report.md and plots (new or empty)")

    def check(self) -> None:
        if not self.runs:
            raise SlimtuneError("give at least one run directory")
        check_new_directory(self.out, self.where("out"))


@dataclass
class DemoSettings(Settings):
    command = "demo"

    out: str = setting("runs/demo", "directory for the demo's two runs and report (new or empty; without --out, the "
                       "first free one of runs/demo, runs/demo-2, ...)")
    steps: int = setting(60, "training steps of each run", low=1)
    model: str = setting("smollm2", "the model to fine-tune")

    def check(self) -> None:
        if not self.given("out"):  # `make demo` twice: a new directory, the first demo's results stay
            base, n = self.out, 1
            while Path(self.out).exists() and any(Path(self.out).iterdir()):
                n += 1
                self.out = f"{base}-{n}"
        check_new_directory(self.out, "--out", renamed_onto=False)  # the runs and the report are written inside it
        check_model(self.model)

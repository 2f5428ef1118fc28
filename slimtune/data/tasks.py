"""Prompt-based classification tasks: a template per task and one label word per class (the MeZO setup)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from slimtune import SlimtuneError

_QUOTE_ROWS = ContextVar("slimtune_quote_rows", default=True)


def quoting_rows() -> bool:
    """Whether data errors may quote a value of a row (not inside `rows_unquoted`)."""
    return _QUOTE_ROWS.get()


def shown_columns(columns) -> str:
    """The column names a missing-column message lists; inside `rows_unquoted` their number only (a file without a
    header line has its first row read as the names)."""
    if quoting_rows():
        return ", ".join(map(repr, sorted(columns)))
    return f"{len(columns)} columns, names withheld: a file without a header line would show its first row"


@contextmanager
def rows_unquoted(when: bool = True):
    """Inside (where `when`: a private run): data errors name the file, line and field but quote no value of a row
    (an error message leaves the process, and a file without a header line would show its first row as column
    names)."""
    token = _QUOTE_ROWS.set(not when and _QUOTE_ROWS.get())
    try:
        yield
    finally:
        _QUOTE_ROWS.reset(token)


@dataclass(frozen=True)
class Example:
    prompt: str
    label: int  # index into Task.label_words
    source: str = ""  # "file:line" for error messages


@dataclass(frozen=True)
class Task:
    """`template` is a str.format pattern over the text columns; the model scores each label word after it."""

    name: str
    template: str
    text_columns: tuple[str, ...]
    label_column: str
    label_values: tuple[str, ...]  # raw label values as they appear in files, one per class
    label_words: tuple[str, ...]  # the word the LM should predict for each class (leading space matters)
    aliases: dict[str, int] = field(default_factory=dict)  # extra accepted raw label spellings

    def accepts(self, raw) -> bool:
        """Whether `raw` is one of the task's label values or their accepted spellings."""
        key = str(raw).strip()
        return key in self.label_values or key.lower() in self.aliases

    def label_index(self, raw, where: str) -> int:
        if raw is None:  # a JSONL null, or a table row that lost its last field(s)
            raise SlimtuneError(f"{where}: field {self.label_column!r} is missing")
        key = str(raw).strip()
        if key in self.label_values:
            return self.label_values.index(key)
        if key.lower() in self.aliases:
            return self.aliases[key.lower()]
        allowed = ", ".join(repr(v) for v in self.label_values)
        shown = repr(key) if quoting_rows() else "(value withheld: private run)"
        raise SlimtuneError(f"{where}: field {self.label_column!r}: unknown label {shown} (expected one of {allowed})")

    def prompt(self, row: dict, where: str) -> str:
        return self.template.format(**{col: text_field(row, col, where).strip() for col in self.text_columns})


JSON_KINDS = {list: "a list", dict: "an object", bool: "true/false", int: "a number", float: "a number"}


def text_field(row: dict, key: str, where: str, allow_empty: bool = False) -> str:
    """Field `key` of a data row (`where`: "file:line") as the text it must be: missing, not a string (a JSONL list,
    object or number, which str() would turn into the prompt "['bad'] It was") or empty is a one-line error.
    Classification prompts (Task.prompt) and generation pairs (generation/data.py) read their text through it."""
    value = row.get(key)
    if value is None:
        raise SlimtuneError(f"{where}: field {key!r} is missing")
    if not isinstance(value, str):
        raise SlimtuneError(f"{where}: field {key!r} is not text ({JSON_KINDS.get(type(value), type(value).__name__)})")
    if not allow_empty and not value.strip():
        raise SlimtuneError(f"{where}: field {key!r} is empty")
    if "\x00" in value:
        raise SlimtuneError(f"{where}: field {key!r} holds a NUL byte (a damaged file?)")
    return value


# SST-2's prompt. The MeZO paper's "{sentence} It was" terrible/great starts SmolLM2-135M at chance (0.58 zero-shot on
# 400 train rows; "Review: ... Sentiment:" negative/positive 0.77), and on the defaults sweep's split MeZO + LoRA
# reached 0.840 from it against 0.714 (AdamW + LoRA: 0.896 against 0.846 at step 60): docs/benchmarks/zo-cost.md.
# Runs recorded before the change (config.json template null) keep the old prompt (train/resume.PROMPT_FOR_NULL).
TASKS: dict[str, Task] = {
    "sst2": Task("sst2", "Review: {sentence}\nSentiment:", ("sentence",), "label", ("0", "1"),
                 (" negative", " positive"), aliases={"negative": 0, "positive": 1}),
    "rte": Task("rte", '{sentence1}\nDoes this mean that "{sentence2}" is true? Yes or No?\n', ("sentence1", "sentence2"),
                "label", ("0", "1"), (" Yes", " No"), aliases={"entailment": 0, "not_entailment": 1}),
}


def get_task(name: str, text_column: str | None = None, label_column: str | None = None,
             template: str | None = None, label_words: str | None = None) -> Task:
    """A built-in task, optionally with its own prompt (`template` over the task's columns, `label_words` for its
    label values) and renamed columns, or a custom one ("custom" needs template + label words).

    `label_words`: "0=terrible,1=great" (raw label value = word).
    """
    if name == "custom":
        if not (template and label_words):
            raise SlimtuneError("task 'custom' needs --template (e.g. '{text} It was') and --label-words "
                                "(e.g. '0=terrible,1=great')")
        pairs = [p.split("=", 1) for p in label_words.split(",")]
        if any(len(p) != 2 for p in pairs):
            raise SlimtuneError(f"--label-words {label_words!r}: expected 'value=word,value=word'")
        from slimtune.settings.rules import template_fields
        cols = tuple(template_fields(template, "--template"))
        if template != template.rstrip():  # the label word carries its own leading space
            warnings.warn(f"--template ends with whitespace; removed (label words are scored as ' word', so a "
                          f"trailing space would leave a bare space token before them)", stacklevel=2)
            template = template.rstrip()
        return Task("custom", template, cols, label_column or "label", tuple(v.strip() for v, _ in pairs),
                    tuple(" " + w.strip() for _, w in pairs))
    if name not in TASKS:
        raise SlimtuneError(f"unknown task {name!r}: choose one of {', '.join([*TASKS, 'custom'])}")
    task = TASKS[name]
    if template:
        from slimtune.settings.rules import check_template
        check_template(template, task.text_columns, "template")
        if template != template.rstrip(" \t"):  # as the custom task's; RTE's final newline is its own
            warnings.warn("template ends with a space; removed (label words are scored as ' word')", stacklevel=2)
            template = template.rstrip(" \t")
        task = Task(task.name, template, task.text_columns, task.label_column, task.label_values,
                    task.label_words, task.aliases)
    if label_words:
        words = dict(builtin_label_words(name, label_words))
        task = Task(task.name, task.template, task.text_columns, task.label_column, task.label_values,
                    tuple(" " + words[v] for v in task.label_values), task.aliases)
    if text_column and len(task.text_columns) == 1:
        task = Task(task.name, task.template.replace("{" + task.text_columns[0] + "}", "{" + text_column + "}"),
                    (text_column,), task.label_column, task.label_values, task.label_words, task.aliases)
    if label_column:
        task = Task(task.name, task.template, task.text_columns, label_column, task.label_values, task.label_words,
                    task.aliases)
    return task


def builtin_label_words(name: str, label_words: str) -> list[tuple[str, str]]:
    """(label value, word) pairs of `label_words` for built-in task `name`, in the task's label order: one word for
    each of its label values, or a one-line error."""
    from slimtune.settings.rules import check_label_words
    pairs = dict(check_label_words(label_words))
    values = TASKS[name].label_values
    if sorted(pairs) != sorted(values):
        raise SlimtuneError(f"--label-words {label_words!r}: task {name} has the label values {', '.join(values)}: give "
                            f"one word for each (e.g. {builtin_prompt(name)[1]!r})")
    return [(v, pairs[v]) for v in values]


def canonical_label_words(name: str, label_words: str | None) -> str | None:
    """A built-in task's `label_words` in its label order ('1=good,0=bad' -> '0=bad,1=good': the same task), as runs
    record and compare them; others as given (a custom task's classes are numbered in the order given)."""
    if label_words is None or name not in TASKS:
        return label_words
    return ",".join(f"{v}={w}" for v, w in builtin_label_words(name, label_words))


def builtin_prompt(name: str) -> tuple[str, str] | None:
    """(template, label words as --label-words writes them) of built-in task `name` today; None for others. A run
    records them in its config.json, so that a later change of the task's prompt never changes what it resumes or is
    evaluated with."""
    task = TASKS.get(name)
    if task is None:
        return None
    return task.template, ",".join(f"{v}={w.strip()}" for v, w in zip(task.label_values, task.label_words))


def with_builtin_prompt(name: str, template: str | None, label_words: str | None) -> tuple[str | None, str | None]:
    """(template, label words) with what was not given filled from built-in task `name`'s prompt today (others: as
    given): what a run records and a federated server sends its clients."""
    prompt = builtin_prompt(name)
    if prompt is None:
        return template, label_words
    return (template if template is not None else prompt[0], label_words if label_words is not None else prompt[1])

"""Generation data: prompt -> completion pairs from JSONL (`prompt`/`completion`), chat JSONL (`messages`, rendered
with the tokenizer's own chat template) or TSV/CSV columns (`--input-column/--target-column`, default `input`/`target`,
with an optional `--template` such as 'Describe: {input}\n').

Rows that share a prompt are kept as separate training examples (one target each) and, for evaluation, grouped
into one input scored against all of its references (`group_references`), as E2E NLG and SQuAD are scored.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from slimtune import SlimtuneError
from slimtune.data.tasks import text_field

ROLES = ("system", "user", "assistant", "tool")
# ChatML, for tokenizers without a chat template of their own (tiny test models); a warning says so.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class GenerationExample:
    prompt: str  # what the model is given (already rendered: template or chat template applied)
    completion: str  # the target the model learns to produce (EOS is appended at encoding)
    references: tuple[str, ...] = ()  # evaluation: every reference of this prompt (grouped rows)
    source: str = ""  # "file:line"
    label: int = 0  # unused (lets class-balanced helpers treat every example alike)


@dataclass(frozen=True)
class GenerationTask:
    """How rows become (prompt, completion): columns and template for plain rows; chat rows carry `messages`.
    `given`: the prompt flags the user set (they apply to tables only, and are refused for rows that carry their own
    prompts); a value left out is the one the adapter learned (`learned`), else the default."""

    name: str = "generation"
    input_column: str = "input"
    target_column: str = "target"
    template: str = "{input}"
    given: tuple[str, ...] = ()

    @property
    def label_words(self) -> tuple[str, ...]:  # k-shot sampling treats generation as a single class
        return ("",)


def generation_task(input_column: str | None = None, target_column: str | None = None,
                    template: str | None = None, learned: dict | None = None) -> GenerationTask:
    """The task from the flags; `learned`: a generation adapter's record ({template, input_column, target_column}, as
    peft.registry.recorded_prompt reads it), whose values fill those left out. Another --input-column given renames
    the learned template's field (the same prompt around another column)."""
    learned = learned or {}
    given = tuple(flag for flag, value in (("--template", template), ("--target-column", target_column),
                                           ("--input-column", input_column)) if value is not None)
    inp = input_column or learned.get("input_column") or "input"
    if template is None and learned.get("template"):
        template = learned["template"].replace("{" + (learned.get("input_column") or "input") + "}", "{" + inp + "}")
    tpl = template or "{" + inp + "}"
    if "{" + inp + "}" not in tpl:
        raise SlimtuneError(f"--template {tpl!r} must contain {{{inp}}} (the input column)")
    try:
        tpl.format(**{inp: ""})
    except (KeyError, IndexError, ValueError) as exc:
        raise SlimtuneError(f"--template {tpl!r}: only {{{inp}}} can be filled in ({exc})") from None
    target = target_column or learned.get("target_column") or "target"
    return GenerationTask("generation", inp, target, tpl, given)


def rows_to_examples(rows: list[tuple[int, dict]], task: GenerationTask, name: str, tokenizer=None) -> list:
    """One GenerationExample per row. JSONL rows may be {prompt, completion} or {messages: [...]}; delimited rows use
    the task's columns. Chat rows need the tokenizer (its chat template)."""
    if not rows:
        raise SlimtuneError(f"{name}: no examples (file is empty)")
    first, given = rows[0][1], list(task.given)
    if "messages" in first:
        _refuse_unused(given, name, "conversations (`messages` rows), rendered with the chat template as they are")
        return [_chat_example(row, f"{name}:{line}", tokenizer) for line, row in rows]
    if "prompt" in first and "completion" in first and "--input-column" not in given \
            and not (task.input_column != "input" and task.input_column in first):  # a learned column they hold
        _refuse_unused(given, name, "prompt/completion pairs, used as they are")
        return [_pair(row, "prompt", "completion", f"{name}:{line}", "{prompt}") for line, row in rows]
    missing = [c for c in (task.input_column, task.target_column) if c not in first]
    if missing:
        from slimtune.data.tasks import shown_columns
        raise SlimtuneError(f"{name}: missing column(s) {', '.join(map(repr, missing))} (found "
                            f"{shown_columns(first)}; JSONL rows need prompt/completion or messages, "
                            "tables need --input-column/--target-column)")
    return [_pair(row, task.input_column, task.target_column, f"{name}:{line}", task.template) for line, row in rows]


def _refuse_unused(given: list[str], name: str, what: str) -> None:
    """A prompt setting the rows do not use is refused, not ignored (the scores would be of another evaluation)."""
    if given:
        raise SlimtuneError(f"{given[0]}: {name} holds {what}; {given[0]} applies to tables (leave it out)")


def _pair(row: dict, inp: str, target: str, where: str, template: str) -> GenerationExample:
    if "messages" in row:  # a later row of a file whose first row is a pair: its conversation would be dropped
        raise SlimtuneError(f"{where}: holds 'messages' in a file of {inp}/{target} rows (its first row's kind): a "
                            "file holds conversations or pairs, not both")
    prompt = template.format(**{inp: text_field(row, inp, where).strip()}) if template != "{prompt}" else \
        text_field(row, inp, where)
    return GenerationExample(prompt, text_field(row, target, where).strip(), source=where)


def check_conversation(row: dict, where: str, target: bool = True) -> list[dict]:
    """A row's `messages`, checked without the tokenizer (so before the model loads): a non-empty list of {role,
    content} objects with a known role and text; `target`: the last is the assistant's (training and scoring);
    either way a turn comes before an assistant's last one (it is what the model is prompted with)."""
    both = [k for k in ("prompt", "completion") if k in row]
    if both:  # one of the two would be dropped without a word
        raise SlimtuneError(f"{where}: holds both 'messages' and {' and '.join(map(repr, both))}: a row is one "
                            "conversation or one prompt/completion pair, not both")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SlimtuneError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SlimtuneError(f"{where}: field 'messages[{i}]' needs a role ({', '.join(ROLES)}) and text content")
        if not m["content"].strip():
            raise SlimtuneError(f"{where}: field 'messages[{i}]': empty content")
        if "\x00" in m["content"]:
            raise SlimtuneError(f"{where}: field 'messages[{i}]': a NUL byte (a damaged file?)")
    if target and messages[-1]["role"] != "assistant":
        raise SlimtuneError(f"{where}: field 'messages': the last message must be the assistant's (the target)")
    if messages[-1]["role"] == "assistant" and len(messages) < 2:
        raise SlimtuneError(f"{where}: field 'messages': needs a turn before the assistant's (the prompt)")
    return messages


def _chat_example(row: dict, where: str, tokenizer) -> GenerationExample:
    messages = check_conversation(row, where)
    if tokenizer is None:
        raise SlimtuneError(f"{where}: chat rows need the model's tokenizer to render")
    prompt = render_chat(tokenizer, messages[:-1], where)
    return GenerationExample(prompt, messages[-1]["content"].strip(), source=where)


def render_chat(tokenizer, messages: list[dict], where: str | None = None) -> str:
    """The conversation so far plus the assistant's turn header, in the model's own chat format. `where` ("file:line"):
    a conversation the template refuses (its raise_exception: roles that do not alternate, a system turn it does not
    take, ...) is a one-line error naming it, with the template's own message where rows may be quoted (a template
    may quote the row); without `where` (a prompt given on the command line) the template's message alone."""
    from jinja2 import TemplateError

    from slimtune.data.tasks import quoting_rows

    template = tokenizer.chat_template
    if not template:
        warnings.warn("the tokenizer has no chat template; rendering chat data as ChatML", stacklevel=2)
        template = CHATML
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - whatever the template's code raises on this conversation
        # jinja's TemplateError (raise_exception, an undefined name, ...) or an error the template's expressions raise
        # on this row (a TypeError, ZeroDivisionError, OverflowError, KeyError, a RecursionError or MemoryError, ...):
        # the template failed on this conversation, which is named; never an internal error
        if isinstance(exc, ImportError):  # jinja2 itself missing: no error of the template's
            raise
        text = " ".join(str(exc).split())
        if not isinstance(exc, TemplateError):
            text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        said = f" ({text})" if quoting_rows() and text else \
            ("" if quoting_rows() else " (its message withheld: private run)")
        raise SlimtuneError(f"{where + ': ' if where else ''}the model's chat template refuses this conversation"
                            f"{said}") from None


def group_references(examples: list[GenerationExample]) -> list[GenerationExample]:
    """One example per distinct prompt (first occurrence order), with every row's target as a reference."""
    groups: dict[str, list[GenerationExample]] = {}
    for e in examples:
        groups.setdefault(e.prompt, []).append(e)
    return [GenerationExample(p, rows[0].completion, tuple(r.completion for r in rows), rows[0].source)
            for p, rows in groups.items()]

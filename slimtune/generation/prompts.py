"""Prompts for `slimtune generate`: one given on the command line or a file of them (.txt one per line; .jsonl with
`prompt`, `messages` or the input column; .tsv/.csv with the input column), optionally through a template or the
model's chat template."""

from __future__ import annotations

from pathlib import Path

from slimtune import SlimtuneError


class FilePrompt(str):
    """A prompt read from a file, with the "file:line" it came from (`source`): what an error rendering it names."""

    source = ""

    def __new__(cls, text: str, source: str = ""):
        self = super().__new__(cls, text)
        self.source = source
        return self


class WrittenPrompt(FilePrompt):
    """A row's `prompt` field (JSONL, or a table's column) where it is not the column the model learned from: a whole
    prompt its writer composed, which the learned template does not wrap (as eval uses prompt/completion rows as they
    are); a --template given still does."""


class Conversation(list):
    """A row's `messages` (a list of {role, content}), with the "file:line" it came from: rendering it with the
    model's chat template happens once the model is loaded, and a conversation the template refuses is named by it."""

    def __init__(self, messages: list, source: str = ""):
        super().__init__(messages)
        self.source = source


def read_prompt_items(source: str, input_column: str | None = None, learned_column: str | None = None) -> list:
    """The prompts of a file, unrendered: a string per plain prompt, a message list per conversation.
    `learned_column`: the column a generation adapter learned from, read where --input-column is left out."""
    return _read(source, input_column, learned_column)


def prompt_texts(items: list) -> list[str]:
    """Every text in the items (for fitting a tiny model's tokenizer before it exists)."""
    return [t for item in items for t in ([m["content"] for m in item] if isinstance(item, list) else [item])]


def render_prompts(items: list, tokenizer, template: str | None = None, input_column: str | None = None,
                   chat: bool = False, learned: str | None = None) -> list[str]:
    """Prompts as the model sees them: through the template (`learned`, a generation adapter's own over
    `input_column`, where none is given: not around a WrittenPrompt), and the chat template for conversations or
    `chat`."""
    from slimtune.generation.data import render_chat

    column = input_column or "input"
    out = []
    for item in items:
        where = getattr(item, "source", None) or None
        if isinstance(item, list):  # a conversation: everything up to the assistant's next turn
            out.append(render_chat(tokenizer, item[:-1] if item[-1]["role"] == "assistant" else list(item), where))
            continue
        fill = template or (None if isinstance(item, WrittenPrompt) else learned)
        text = fill.format(**{column: item}) if fill else str(item)
        out.append(render_chat(tokenizer, [{"role": "user", "content": text}], where) if chat else text)
    return out


def _read(source: str, column: str | None, learned_column: str | None = None) -> list:
    """`column` None: a JSONL row's `prompt`, else the learned column or `input`; a column given is used as given."""
    from slimtune.data.readers import lines_of, not_utf8, open_data_file, read_rows, require_data_file
    from slimtune.data.tasks import text_field

    path = Path(source)
    if path.suffix.lower() == ".txt":
        require_data_file(source)  # a regular file (not a pipe or a device, which would block or never end)
        try:
            with open_data_file(path, newline="\n") as f:  # each line read with the readers' bound on its length
                # one prompt a line: only \n (and \r\n) end one; str.splitlines would also split at a form feed,
                # U+2028, ...
                read = [line.removesuffix("\n") for line in lines_of(f, source)]
        except UnicodeDecodeError:
            raise SlimtuneError(not_utf8(source, newline="\n")) from None
        except OSError as exc:  # the file went away (or became unreadable) since require_data_file looked
            raise SlimtuneError(f"{source}: cannot be read ({exc.strerror or exc})") from None
        lines = []
        for number, line in enumerate(read, 1):
            line = line.removesuffix("\r")
            if "\x00" in line:
                raise SlimtuneError(f"{source}:{number}: a NUL byte (a damaged file, or UTF-16 saved as text?)")
            if "\r" in line:
                raise SlimtuneError(f"{source}:{number}: a carriage return inside the line; prompts end at \\n "
                                    "(save the file with Unix or Windows line ends)")
            if line.strip():
                lines.append(FilePrompt(line, f"{source}:{number}"))
        if not lines:
            raise SlimtuneError(f"{source}: no prompts (file is empty)")
        return lines
    rows, name = read_rows(source, "test")
    if not rows:
        raise SlimtuneError(f"{name}: no prompts (file is empty)")
    items = []
    for line, row in rows:
        where = f"{name}:{line}"
        if "messages" in row:
            from slimtune.generation.data import check_conversation
            items.append(Conversation(check_conversation(row, where, target=False), where))  # as train and eval
            continue
        written = "prompt" in row and column is None and (learned_column is None or learned_column not in row)
        key = "prompt" if written else (column or learned_column or "input")
        try:
            text = text_field(row, key, where)
            items.append(WrittenPrompt(text, where) if written else FilePrompt(text, where))
        except SlimtuneError as exc:
            raise SlimtuneError(f"{exc} (choose the column with --input-column)") from None
    return items

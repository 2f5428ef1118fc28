"""Read labelled examples from TSV/CSV/JSONL files or a local HF dataset, with errors that name file, line, field."""

from __future__ import annotations

import csv
import json
import re
import stat
import sys
from pathlib import Path

from slimtune import SlimtuneError
from slimtune.data.tasks import Example, Task, quoting_rows, shown_columns


# UTF-8, and a leading byte order mark is no part of the text: Excel and Notepad write one, which made a table's first
# column '\ufeffsentence' and a JSONL file's first line invalid JSON
ENCODING = "utf-8-sig"
# The longest line (its line end included) a data or prompt file may hold: 64 Mi characters, thousands of times any
# real example (a whole book is a few MB), so that a file that is no text (a binary file, a crash-zeroed or sparse file
# named .jsonl: one "line" of gigabytes) is one line naming FILE:LINE, read in pieces of this size, never a
# MemoryError from reading it whole. A CSV/TSV field (a quoted one may run over lines) is bounded alike: csv's own
# limit (131,072 characters) ended a table holding one long document in 'internal error (Error: field larger than
# field limit)'.
MAX_LINE_CHARS = 64 * 2**20
FIELD_LIMIT = MAX_LINE_CHARS


class DuplicateKey(Exception):
    """A mapping names one key twice: a config file's setting, a JSONL row's field (JSON and YAML parsers keep the
    last one without a word)."""


def unique_keys(pairs: list) -> dict:
    """json.loads' object_pairs_hook: a dict, or DuplicateKey for a key given twice (not named in a private run's
    data: a nested object's keys are a row's values)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(f"key {key!r} appears twice" if quoting_rows() else
                               "a key appears twice (name withheld: private run)")
        seen[key] = value
    return seen


def read_text(path: str | Path, newline: str | None = None) -> str:
    """A text file's contents (a prompt list, a config file); not UTF-8 is a one-line error. `newline`: as open()'s
    ("" keeps every line end as written; None turns \r\n and a bare \r into \n)."""
    try:
        with open(path, encoding=ENCODING, newline=newline) as f:
            return f.read()
    except UnicodeDecodeError:
        raise SlimtuneError(not_utf8(path)) from None


def not_utf8(path: str | Path, newline: str | None = None) -> str:
    """The message for a file that is not UTF-8: the line of its first undecodable byte, counted as the reader that
    failed counts lines (`newline`: as its open(); None and "" end a line at \r\n, a lone \r or \n, as the table
    and JSONL readers do, a quoted CSV field's lines included; "\n" at \n only, as a prompt list), and that byte's
    offset in the file (a decoding error's own offset is into the reader's internal buffer, neither the file nor a
    line). Read in pieces of at most MAX_LINE_CHARS bytes: a file with no line end is never read whole."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        # latin-1 maps each byte to one character: the pieces are the file's bytes, split where the reader splits
        with open_data_file(path, encoding="latin-1", newline="" if newline is None else newline) as f:
            number, offset, after_cr = 1, 0, False
            while piece := f.readline(MAX_LINE_CHARS):
                data = piece.encode("latin-1")
                if offset == 0 and data.startswith(b"\xef\xbb\xbf"):  # utf-8-sig's mark: no part of the text
                    data, offset = data[3:], 3
                pending = len(decoder.getstate()[0])  # a character's first bytes, held from the last piece
                try:
                    decoder.decode(data)
                except UnicodeDecodeError as exc:
                    return (f"{path}:{number}: not UTF-8 text (byte {offset - pending + exc.start} of the file); "
                            "save it as UTF-8")
                offset += len(data)
                # a line end: a piece cut at MAX_LINE_CHARS may end between the \r and \n of one line end
                if piece.endswith("\r") or (piece.endswith("\n") and not (after_cr and piece == "\n")):
                    number += 1
                after_cr = piece.endswith("\r")
    except (OSError, SlimtuneError):
        pass
    return f"{path}: not UTF-8 text; save it as UTF-8"


def lines_of(f, name: str | Path):
    """The lines of an open text file as iterating it yields them (split as its `newline` says), each read with a
    bound: a line longer than MAX_LINE_CHARS (its line end included) is a one-line error naming FILE:LINE before more
    of it is read (a file with no line ends would otherwise be read whole: a MemoryError, or the machine's memory)."""
    number = 0
    while line := f.readline(MAX_LINE_CHARS + 1):
        number += 1
        if len(line) > MAX_LINE_CHARS:
            raise SlimtuneError(f"{name}:{number}: a line of more than {MAX_LINE_CHARS:,} characters: not a data "
                                "row (a binary file, or a file with no line ends?)")
        yield line


def open_data_file(path: str | Path, mode: str = "r", encoding: str | None = None, newline: str | None = None,
                   errors: str = "strict", refusal=None):
    """`path` opened for reading, as the regular file it must be: the path is opened first (not blocking: a named
    pipe put in its place after require_data_file looked would wait for a writer) and the open file's own status
    checked, so a path that stopped being a regular file between the check and the open is refused in one line (a
    device such as /dev/zero never ends). Text (`mode` "r") in `encoding` (default UTF-8, a byte order mark
    skipped); an OSError as open() raises it. `refusal(path, st_mode)`: the message for a path that is no regular
    file (default: a data file's, `not_a_file`)."""
    import os

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode_bits = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode_bits):
            raise SlimtuneError((refusal or not_a_file)(str(path), mode_bits))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        if "b" in mode:
            return os.fdopen(fd, "rb")
        return os.fdopen(fd, "r", encoding=encoding or ENCODING, newline=newline, errors=errors)
    except BaseException:
        os.close(fd)
        raise


FILE_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISSOCK, "a socket"))


def require_data_file(source: str) -> Path:
    """`source` as the regular file a data reader reads (symbolic links followed): a missing file, a directory, or
    anything else that is no regular file is a one-line error before it is opened. A named pipe (mkfifo, a shell's
    process substitution) would block until a writer appears, and a device such as /dev/zero is an endless stream:
    a data file is read whole, more than once (its rows, its digest), so it must be a file."""
    path = Path(source)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SlimtuneError(f"{source}: file not found") from None
    except OSError as exc:
        raise SlimtuneError(f"{source}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise SlimtuneError(not_a_file(source, mode))
    return path


def not_a_file(source: str, mode: int) -> str:
    """The message for a data path that is no regular file (its st_mode)."""
    if stat.S_ISDIR(mode):
        return f"{source}: is a directory (a dataset saved with save_to_disk is read as hf:{source})"
    return (f"{source}: not a regular file ({file_kind(mode)}); a data file must be a file (save the stream to one "
            "first)")


def read_regular_text(path: str | Path, what: str, errors: str = "strict") -> str:
    """The UTF-8 text of a file slimtune reads whole (a run's records, an adapter's settings), opened as the regular
    file it must be (`open_data_file`): a directory, a named pipe (which would wait forever for a writer) or a device
    in its place is one line naming it and saying it is not `what`, as is a file that cannot be read. A
    UnicodeDecodeError passes to the caller (unless `errors` is "replace")."""
    def refusal(name: str, mode: int) -> str:
        return f"{name}: is {file_kind(mode)}, not {what}"
    try:
        with open_data_file(path, encoding="utf-8", errors=errors, refusal=refusal) as f:
            return f.read()
    except OSError as exc:
        raise SlimtuneError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def file_kind(mode: int) -> str:
    """What a path that is no regular file is, by its st_mode: "a directory", "a named pipe", ..."""
    if stat.S_ISDIR(mode):
        return "a directory"
    return next((name for test, name in FILE_KINDS if test(mode)), "not a file")


def read_examples(source: str, task: Task, split: str = "train", column_flags: bool = True) -> list[Example]:
    """Examples from `source`: a .tsv/.csv/.jsonl/.json file, or `hf:DIR` (a dataset saved with `save_to_disk`).
    `column_flags`: whether the command takes --text-column / --label-column (`federate` does not), which a missing
    column's message names."""
    rows, name = read_rows(source, split, task)
    return _to_examples(rows, task, name, column_flags)


def column_hint(task: Task, column_flags: bool) -> str:
    """How to point a missing column's message at the task's columns, with the flags the command has."""
    if not column_flags:
        return f"this command reads the task's columns {', '.join(map(repr, (*task.text_columns, task.label_column)))}"
    if task.name == "sst2":
        return "choose with --text-column/--label-column"
    if task.name == "custom":
        return "--template's placeholders name the text columns; choose the label's with --label-column"
    return "choose the label's with --label-column"


def read_rows(source: str, split: str = "train", task: Task | None = None) -> tuple[list[tuple[int, dict]], str]:
    """(line number, row) pairs and the name errors should use ("file" or "hf:DIR[split]"); `task`: the
    classification task whose label names a saved dataset's ClassLabel may use (_hf_rows)."""
    if source.startswith("hf:"):
        return _hf_rows(source[3:], split, task)
    path = require_data_file(source)
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".csv", ".jsonl", ".json"):
        raise SlimtuneError(f"{source}: unsupported file type {suffix!r} (use .tsv, .csv, .jsonl or hf:DIR)")
    try:
        if suffix in (".tsv", ".csv"):
            return _read_delimited(path, "\t" if suffix == ".tsv" else ","), str(path)
        if suffix in (".jsonl", ".json"):
            return _read_jsonl(path), str(path)
    except UnicodeDecodeError:
        raise SlimtuneError(not_utf8(source)) from None
    except OSError as exc:  # the file went away (or became unreadable) since require_data_file looked
        raise SlimtuneError(f"{source}: cannot be read ({exc.strerror or exc})") from None


EVAL_IS_TRAINING = ("--eval-data is the training data: a private run's evaluations (and the best-model choice) "
                    "would be computed on training rows without noise; give held-out data")


def same_source(train: str | None, evaluation: str | None) -> bool:
    """Whether evaluation data names the training data itself: the same string or the same file (however it is
    spelled: a relative path, a symbolic or a hard link). hf:DIR holding splits (a DatasetDict) is never the same:
    training reads its train split and evaluation its validation split (rows they share are a matter for the row
    overlap check, `objectives.overlap_key`); hf:DIR holding one Dataset is read whole on both sides."""
    if not train or not evaluation:
        return False
    # Dataset.save_to_disk writes state.json at the top; a DatasetDict one directory per split
    if train.startswith("hf:") and not (Path(train[3:]) / "state.json").is_file():
        return False
    return same_path(train, evaluation)


def same_path(a: str | None, b: str | None) -> bool:
    """Whether two path settings name one file or directory: the same string, or the same file however spelled
    (relative to the working directory, absolute, through a symbolic or a hard link). hf:DIR compares its DIR."""
    import os

    if a == b:
        return True
    if not a or not b or a.startswith("hf:") != b.startswith("hf:"):
        return False
    first, second = Path(a.removeprefix("hf:")), Path(b.removeprefix("hf:"))
    try:
        return first.exists() and second.exists() and os.path.samefile(first, second)
    except OSError:
        return False


def _read_delimited(path: Path, delimiter: str) -> list[tuple[int, dict]]:
    """Rows of a CSV (quoted where needed, RFC 4180) or TSV file. A TSV is read as quoted first (pandas and Python's
    csv module quote a field that holds a quote, tab or newline); one that is not valid quoted TSV, as raw GLUE files
    are not (a text that starts with a quote), is read with quotes as text. A quoted field that holds a tab and runs
    over several lines is refused: raw rows whose stray quotes pair up read exactly so (a field with no tab is at most
    one raw piece, so it is read as quoted), and the file must say which it is as .csv or .jsonl. Strict: a stray
    quote in a CSV is a one-line error, never two rows merged into one or quotes silently dropped. A row with fewer
    fields than the header leaves the rest missing (None): a field that is read is then named missing."""
    if delimiter != "\t":
        return _parse_delimited(path, delimiter, csv.QUOTE_MINIMAL)
    try:
        rows = _parse_delimited(path, delimiter, csv.QUOTE_MINIMAL)
    except _NotQuoted:
        return _parse_delimited(path, delimiter, csv.QUOTE_NONE)
    if rows and len(rows[0][1]) > 1:  # (one column: no tab to tell by, the quotes were written; read as quoted)
        for start, (line, row) in zip([1 + (rows[i - 1][0] if i else 1) for i in range(len(rows))], rows):
            if any("\t" in v and ("\n" in v or "\r" in v) for v in row.values() if isinstance(v, str)):
                start = _opening_line(path, start)
                raise SlimtuneError(f"{path}:{start}: a quoted field holds a tab and runs over lines {start}-{line}: "
                                    "TSV cannot tell it from raw rows whose stray quotes pair up; write the file as "
                                    ".csv or .jsonl")
    return rows


def _opening_line(path: Path, start: int) -> int:
    """The first non-blank line from `start` on (csv skips blank lines before a row)."""
    with open_data_file(path, newline="") as f:
        for number, line in enumerate(lines_of(f, path), start=1):
            if number >= start and line.strip():
                return number
    return start


class _NotQuoted(Exception):  # noqa: N818
    """A TSV that is not valid quoted TSV (read again with quotes as text)."""


def _parse_delimited(path: Path, delimiter: str, quoting: int) -> list[tuple[int, dict]]:
    """The rows of a table with csv's field limit at FIELD_LIMIT while it is read; the process's own limit (a caller
    of the library may have raised it for its own files) is put back after."""
    previous = csv.field_size_limit(FIELD_LIMIT)
    try:
        return _parse_bounded(path, delimiter, quoting)
    finally:
        csv.field_size_limit(previous)


def _parse_bounded(path: Path, delimiter: str, quoting: int) -> list[tuple[int, dict]]:
    kind, separator = ("TSV", "tab") if delimiter == "\t" else ("CSV", "comma")
    raw_tsv = quoting == csv.QUOTE_NONE
    with open_data_file(path, newline="") as f:
        reader = csv.DictReader(lines_of(f, path), delimiter=delimiter, quoting=quoting, strict=True,
                                **({"quotechar": None} if raw_tsv else {}))
        try:
            if reader.fieldnames is None:
                raise SlimtuneError(f"{path}: file is empty (no header line)")
            named = [c for c in reader.fieldnames if c.strip()]  # unnamed (trailing) columns are never read
            if not named:
                raise SlimtuneError(f"{path}:1: the header line is empty (the first line must name the columns)")
            twice = next((c for i, c in enumerate(named) if c in named[:i]), None)
            if twice is not None:  # DictReader would keep the last such column's values without a word
                shown = repr(twice) if quoting_rows() else f"{named.index(twice) + 1} (name withheld)"
                raise SlimtuneError(f"{path}:{reader.line_num}: the header names column {shown} twice; rename or "
                                    "remove one")
            rows = []
            for row in reader:
                if None in row:  # more fields than the header names: csv puts the rest under None
                    raise SlimtuneError(f"{path}:{reader.line_num}: {len(reader.fieldnames) + len(row[None])} "
                                        f"fields, the header has {len(reader.fieldnames)} (a stray {separator} in "
                                        "the text?)")
                if any(isinstance(v, str) and "\x00" in v for v in row.values()):
                    raise SlimtuneError(f"{path}:{reader.line_num}: a NUL byte (a damaged file, or UTF-16 saved "
                                        "without its byte-order mark?)")
                rows.append((reader.line_num, row))
            if not rows:
                raise SlimtuneError(f"{path}: only a header line, no rows")
        except csv.Error as exc:  # a stray quote, an unterminated quote at the end of the file, ...
            if "field larger than field limit" in str(exc):  # a quoted field over many lines (an unclosed quote?)
                raise SlimtuneError(f"{path}:{reader.reader.line_num}: a field of more than {FIELD_LIMIT:,} "
                                    "characters (a quote that is never closed?)") from None
            if delimiter == "\t" and not raw_tsv:
                raise _NotQuoted from None
            raise SlimtuneError(f"{path}:{reader.reader.line_num}: not a valid {kind} line ({exc})") from None
    return rows


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open_data_file(path) as f:
        for line_no, line in enumerate(lines_of(f, path), start=1):
            if not line.strip():
                continue
            if not rows and line.lstrip().startswith("["):
                raise SlimtuneError(f"{path}:{line_no}: a JSON array; write one JSON object per line (JSON Lines)")
            try:
                row = json.loads(line, object_pairs_hook=unique_keys)
            except json.JSONDecodeError as exc:
                raise SlimtuneError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            except DuplicateKey as exc:
                raise SlimtuneError(f"{path}:{line_no}: {exc} (JSON would keep its last value); keep one") from None
            except RecursionError:  # json's own depth limit (the interpreter's recursion limit)
                raise SlimtuneError(f"{path}:{line_no}: not valid JSON (values nested too deeply to read)") from None
            except ValueError as exc:  # Python's limit on a number's digits (sys.get_int_max_str_digits)
                what = (f"a number of more than {sys.get_int_max_str_digits()} digits"
                        if "integer string conversion" in str(exc) else "a value that cannot be read")
                raise SlimtuneError(f"{path}:{line_no}: not valid JSON ({what})") from None
            if not isinstance(row, dict):
                raise SlimtuneError(f"{path}:{line_no}: expected a JSON object per line")
            if _ESCAPED_SURROGATE.search(line):  # only a \uD800-\uDFFF escape makes a str that is no Unicode text
                _check_unicode(row, f"{path}:{line_no}", rows[0][1] if rows else row)
            rows.append((line_no, row))
    return rows


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(row: dict, where: str, first: dict) -> None:
    """Every text of a JSONL row (its values and keys, at any depth) is Unicode text: JSON's escapes can spell a lone
    surrogate ("\\ud800" without its pair), which json.loads returns in a str that no UTF-8 encoder takes (a
    tokenizer, a file written, a digest would fail far from the file and line). Named: the row's field; in a private
    run only where the first row has it too (a column of the file, not a key only this row holds)."""
    def bad(text: str) -> bool:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False

    for key, value in row.items():
        if isinstance(key, str) and bad(key):
            raise SlimtuneError(f"{where}: a field name is not valid Unicode text (a lone surrogate escape, "
                                "\\uD800-\\uDFFF without its pair)")
        stack = [value]
        while stack:  # iterative: a value json.loads accepted may be nested near the recursion limit
            item = stack.pop()
            if isinstance(item, str):
                found = bad(item)
            elif isinstance(item, dict):
                found = any(isinstance(k, str) and bad(k) for k in item)
                stack.extend(item.values())
            elif isinstance(item, list):
                found = False
                stack.extend(item)
            else:
                found = False
            if found:
                field = f"field {key!r}" if quoting_rows() or key in first else "a field (name withheld: private run)"
                raise SlimtuneError(f"{where}: {field} is not valid Unicode text (a lone surrogate escape, "
                                    "\\uD800-\\uDFFF without its pair); write the character itself or its pair")


def _hf_rows(directory: str, split: str, task: Task | None = None) -> tuple[list[tuple[int, dict]], str]:
    """Rows of a saved dataset's split. Its label column, where a ClassLabel whose every name `task` accepts (its
    values or their spellings), is read by name: a ClassLabel in another order than the task's would otherwise flip
    the labels; a ClassLabel of other names keeps its integers (the task's order, as before)."""
    import datasets

    name = f"hf:{directory}[{split}]"
    splits, where = dataset_splits(directory), directory
    if splits:  # a DatasetDict: only the split read (an empty other split cannot stop it)
        if split not in splits:
            raise SlimtuneError(f"hf:{directory}: no split {split!r} (has {', '.join(splits)})")
        where = str(Path(directory) / split)
    try:
        ds = datasets.load_from_disk(where)
    except (FileNotFoundError, ValueError) as exc:
        raise SlimtuneError(f"hf:{directory}: not a dataset saved with save_to_disk ({exc})") from None
    except IndexError:  # datasets cannot load a dataset of no shards: one saved with no rows
        raise SlimtuneError(f"{name}: no examples") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SlimtuneError(f"hf:{directory}: no split {split!r} (has {', '.join(ds)})")
        ds = ds[split]
    names = {column: feature.int2str for column, feature in ds.features.items()
             if isinstance(feature, datasets.ClassLabel) and task is not None and column == task.label_column
             and all(task.accepts(n) for n in feature.names)}  # its integer means its name, in its own order
    return [(i + 1, {k: names[k](v) if k in names and v is not None and v >= 0 else v for k, v in row.items()})
            for i, row in enumerate(ds)], name


def dataset_splits(directory: str) -> list[str]:
    """The splits of a DatasetDict saved with save_to_disk (its dataset_dict.json); [] for a Dataset or an unreadable
    record (load_from_disk then says what it is)."""
    try:
        splits = json.loads((Path(directory) / "dataset_dict.json").read_text(encoding=ENCODING)).get("splits")
    except (OSError, ValueError, AttributeError):
        return []
    return [s for s in splits if isinstance(s, str)] if isinstance(splits, list) else []


def _to_examples(rows: list[tuple[int, dict]], task: Task, name: str, column_flags: bool = True) -> list[Example]:
    if not rows:
        raise SlimtuneError(f"{name}: no examples (file is empty)")
    columns = set(rows[0][1])
    missing = [c for c in (*task.text_columns, task.label_column) if c not in columns]
    if missing:
        where = name if Path(name).suffix.lower() in (".tsv", ".csv") else f"{name}:{rows[0][0]}"  # tables: header
        raise SlimtuneError(f"{where}: missing column(s) {', '.join(map(repr, missing))} "
                            f"(found {shown_columns(columns)}; {column_hint(task, column_flags)})")
    examples = []
    for line, row in rows:
        where = f"{name}:{line}"
        examples.append(Example(task.prompt(row, where), task.label_index(row.get(task.label_column), where), where))
    return examples

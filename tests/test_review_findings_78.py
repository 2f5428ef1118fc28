"""Review round 78: training/evaluation data files as a careless user or an adversary supplies them (train, eval,
generate). Project rule: bad data is ONE `error:` line naming the file and line/field, exit code 2, before any work;
never an internal error; a private run's errors quote no value of a row.

Each test failed on the code it was written against (tiny random models only)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from conftest import DEMO, cli, one_line_error

TINY = ["--model", "tiny-llama"]
FAST = [*TINY, "--steps", "1", "--batch-size", "2", "--quiet", "--r", "2", "--eval-every", "0"]
WHOLE_BATCH = [*TINY, "--steps", "1", "--batch-size", "7", "--quiet", "--r", "2", "--eval-every", "0"]  # every row
PRIVATE = ["--optimizer", "dpzero", "--epsilon", "3", "--delta", "1e-3"]
ROWS = "".join('{"sentence": "film number %d", "label": %d}\n' % (i, i % 2) for i in range(6))


def slimtune(*args, timeout: int = 120, memory: int | None = None):
    """`slimtune ARGS` in a child process (a hang or a runaway allocation stays there); (exit code, stderr)."""
    def limit():
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    try:
        res = subprocess.run([sys.executable, "-m", "slimtune.cli", *map(str, args)], capture_output=True, text=True,
                             timeout=timeout, preexec_fn=limit, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"slimtune {' '.join(map(str, args))}: still running after {timeout} s (hung on the data file)")
    return res.returncode, res.stderr


def assert_one_line_child(code: int, stderr: str, needle: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, stderr[-800:])
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-800:]
    assert needle in lines[0], lines[0]
    return lines[0]


# -- 1. a FIFO given as data: the reader blocks forever waiting for a writer ------------------------------------------
def test_a_fifo_given_as_data_is_refused_not_waited_on(tmp_path):
    """`--data pipe.tsv` where pipe.tsv is a named pipe (mkfifo; also what a process substitution hands over):
    require_input_file accepts it (it exists, is no directory, is readable), then _read_delimited opens it and
    blocks until some writer appears: `slimtune train` hangs with no message. A data file must be a regular file
    (or hf:DIR): one line, exit 2."""
    fifo = tmp_path / "pipe.tsv"
    os.mkfifo(fifo)
    code, err = slimtune("train", "--data", fifo, *FAST, "--out", tmp_path / "out", timeout=90)
    assert_one_line_child(code, err, str(fifo))
    assert not (tmp_path / "out").exists()


# -- 2. /dev/zero (behind a data-file name): unbounded read, MemoryError as an internal error -------------------------
def test_a_character_device_given_as_data_is_refused(tmp_path):
    """`--data zero.jsonl` where zero.jsonl links to /dev/zero (or any device/endless stream): the JSONL reader
    reads one endless "line" until memory runs out, then `internal error (MemoryError: )`, exit 1 (without a memory
    limit: the machine's memory). Expected: one line naming the file (not a regular file), exit 2, nothing read."""
    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")
    code, err = slimtune("train", "--data", link, *FAST, "--out", tmp_path / "out", timeout=120, memory=4 << 30)
    line = assert_one_line_child(code, err, str(link))
    assert "internal error" not in line


# -- 3./4. JSON that json.loads rejects with something other than JSONDecodeError -------------------------------------
@pytest.mark.parametrize("private", [False, True], ids=["public", "private"])
@pytest.mark.parametrize("bad,what", [
    ('{"sentence": "b", "label": ' + "9" * 5000 + '}\n', "integer-of-5000-digits"),  # ValueError (int digit limit)
    ('{"sentence": ' + "[" * 100_000 + "]" * 100_000 + ', "label": 0}\n', "deeply-nested"),  # RecursionError
], ids=["huge-int", "deep-nesting"])
def test_jsonl_values_json_refuses_otherwise_are_one_line(tmp_path, bad, what, private):
    """_read_jsonl catches json.JSONDecodeError only. A label written as a 5000-digit number raises ValueError
    (Python's int-string conversion limit) and a deeply nested value RecursionError: both end as `internal error
    (...)`, exit 1, no file or line. Expected: `FILE:7: not valid JSON (...)`, exit 2."""
    path = tmp_path / "train.jsonl"
    path.write_text(ROWS + bad)
    res = cli("train", "--data", path, *FAST, *(PRIVATE if private else []), "--out", tmp_path / "out")
    line = one_line_error(res)
    assert f"{path}:7:" in line and "internal error" not in line, line
    assert not (tmp_path / "out").exists()


# -- 5. a lone surrogate escape: accepted by the reader, fails later (a private run: after the run started) ----------
@pytest.mark.parametrize("private", [False, True], ids=["public", "private"])
def test_a_lone_surrogate_in_jsonl_text_is_refused_with_its_line(tmp_path, private):
    """`"sentence": "bad \\ud800 film"` is syntactically valid JSON and json.loads returns a str holding a lone
    surrogate, which is no Unicode text (it cannot be encoded as UTF-8). text_field lets it through; then a public
    run ends in `internal error (UnicodeEncodeError ...)`, exit 1, with no file or line, and a private run claims
    its directory, writes its key, starts training and fails at the step that samples that row ('a private training
    step failed at step 1; its details are withheld'), long after "before any work". Expected, either way:
    `FILE:7: field 'sentence' ...` (no value), exit 2, nothing written."""
    path = tmp_path / "train.jsonl"
    path.write_text(ROWS + '{"sentence": "bad \\ud800 film", "label": 0}\n')
    res = cli("train", "--data", path, *WHOLE_BATCH, *(PRIVATE if private else []), "--out", tmp_path / "out")
    line = one_line_error(res)
    assert f"{path}:7:" in line and "sentence" in line, line
    assert not (tmp_path / "out").exists()


def test_a_lone_surrogate_in_eval_data_is_one_line(tmp_path):
    """The same row in `slimtune eval --data`: an internal error, not the file and line."""
    path = tmp_path / "dev.jsonl"
    path.write_text(ROWS + '{"sentence": "bad \\udc00 film", "label": 0}\n')
    line = one_line_error(cli("eval", "--data", path, *TINY))
    assert f"{path}:7:" in line, line


# -- 6. chat rows the model's own chat template refuses ---------------------------------------------------------------
ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def strict_chat_model(tmp_path):
    """A tiny checkpoint directory whose chat template refuses roles that do not alternate, as Gemma 3's (the
    built-in gemma3-270m), Llama 2's and Mistral's do (raise_exception)."""
    from slimtune.models import tiny_tokenizer
    from slimtune.models.loading import tiny_model

    tok = tiny_tokenizer(["hello there food pizza user assistant"])
    tok.chat_template = ALTERNATING
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id)
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


CHAT = ('{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "food"}]}\n'
        '{"messages": [{"role": "user", "content": "hello"}, {"role": "user", "content": "there"}, '
        '{"role": "assistant", "content": "pizza"}]}\n')


@pytest.mark.parametrize("command", ["train", "train-private", "eval", "generate"])
def test_a_chat_row_the_models_template_refuses_names_its_line(tmp_path, strict_chat_model, command):
    """Line 2 has two user turns in a row. check_conversation accepts it, the model loads, then render_chat's
    apply_chat_template raises jinja2's TemplateError, which nothing catches: `internal error (TemplateError:
    Conversation roles must alternate ...)`, exit 1, no file or line, after the model was loaded. Expected: one line
    naming FILE:2 (the template's own message may follow), exit 2."""
    path = tmp_path / "chat.jsonl"
    path.write_text(CHAT)
    model = ["--model", strict_chat_model]
    if command.startswith("train"):
        res = cli("train", "--task", "generation", *model, "--data", path, "--steps", "1", "--batch-size", "1",
                  "--quiet", "--r", "2", *(PRIVATE if command == "train-private" else []), "--out", tmp_path / "out")
    elif command == "eval":
        res = cli("eval", "--task", "generation", *model, "--data", path)
    else:
        res = cli("generate", *model, "--input", path)
    line = one_line_error(res)
    assert f"{path}:2" in line and "internal error" not in line, line
    assert not (tmp_path / "out").exists()


# -- 7. not UTF-8: the error names no line --------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["tsv", "jsonl"])
def test_not_utf8_names_the_line(tmp_path, suffix):
    """A Latin-1 byte on line 3002 of a 3002-line file: `FILE: not UTF-8 text (byte 6756 of its first undecodable
    line's block)`; the byte offset is into an internal decoding chunk (neither the file nor a line), and no line is
    named, against the rule 'one line naming the file and line'. Expected: FILE:3002 (or the file's byte offset)."""
    if suffix == "tsv":
        text = "sentence\tlabel\n" + "".join(f"film number {i}\t{i % 2}\n" for i in range(3000)) + "caf\xe9\t1\n"
    else:
        text = "".join('{"sentence": "film %d", "label": %d}\n' % (i, i % 2) for i in range(3001)) + \
            '{"sentence": "caf\xe9", "label": 1}\n'
    path = tmp_path / f"latin1.{suffix}"
    path.write_bytes(text.encode("latin-1"))
    line = one_line_error(cli("train", "--data", path, *FAST, "--out", tmp_path / "out"))
    position = text.encode("latin-1").index(b"\xe9")
    assert f"{path}:3002" in line or f"byte {position}" in line, line


def test_a_fifo_given_as_data_is_refused_by_a_dry_run_too(tmp_path):
    """(lead) The fixer's note: --dry-run reads no data, so a named pipe passed the input check there (the reader
    refuses it when it reads). The flag check refuses anything that is not a regular file, naming the flag; a key file
    may still come through a pipe (--secret-key-file <(...))."""
    import os

    from conftest import DEMO, cli, one_line_error
    fifo = tmp_path / "p.tsv"
    os.mkfifo(fifo)
    res = cli("train", "--data", fifo, "--model", "tiny-llama", "--out", tmp_path / "o", "--dry-run")
    line = one_line_error(res)
    assert "--data" in line and "named pipe" in line, line
    res = cli("train", "--data", DEMO / "sst2_demo_train.tsv", "--eval-data", fifo, "--model", "tiny-llama",
              "--out", tmp_path / "o", "--dry-run")
    line = one_line_error(res)
    assert "--eval-data" in line and "named pipe" in line, line
    assert not (tmp_path / "o").exists()

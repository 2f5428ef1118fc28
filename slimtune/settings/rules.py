"""Checks shared by several commands' settings: devices and dtypes, templates, label words, input and output paths."""

from __future__ import annotations

import os
import string
from pathlib import Path

from slimtune import SlimtuneError

DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                 "fp16": "float16", "float16": "float16"}
DTYPES = tuple(DTYPE_ALIASES)


def normalise_dtype(dtype: str) -> str:
    if dtype not in DTYPE_ALIASES:
        raise SlimtuneError(f"--dtype {dtype!r}: choose float32, bfloat16 (bf16) or float16 (fp16)")
    return DTYPE_ALIASES[dtype]


def check_device(device: str, dtype: str = "float32") -> None:
    """cpu, cuda, cuda:N or auto; CUDA only where there is one; fp16 only on CUDA (CPU kernels are bf16/fp32)."""
    import torch

    if device not in ("auto", "cpu") and not (device == "cuda" or device.startswith("cuda:")):
        raise SlimtuneError(f"--device {device!r}: choose cpu, cuda, cuda:N or auto")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SlimtuneError(f"--device {device}: no CUDA device is available here (use --device cpu or auto)")
        if ":" in device:
            index = device.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise SlimtuneError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if DTYPE_ALIASES.get(dtype, dtype) == "float16" and not on_cuda:
        raise SlimtuneError("--dtype float16 needs a CUDA device (CPU training uses float32 or bfloat16)")


def template_fields(template: str, flag: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise SlimtuneError(f"{flag} {template!r}: not a valid template ({exc}); write literal braces as {{{{ }}}}") \
            from None
    names = [f for _, f, _, _ in parsed if f is not None]
    for _, name, spec, conversion in parsed:  # '{sentence:.0}' empties a prompt, '{sentence:>999999999}' fills memory
        if name is not None and (spec or conversion):
            raise SlimtuneError(f"{flag} {template!r}: {{{name}{'!' + conversion if conversion else ''}"
                                f"{':' + spec if spec else ''}}}: placeholders take no format spec or conversion "
                                f"(write {{{name}}})")
    for name in names:
        if name == "" or name.isdigit():
            raise SlimtuneError(f"{flag} {template!r}: placeholders need a column name, e.g. {{text}} (not {{}})")
        if not name.isidentifier():
            raise SlimtuneError(f"{flag} {template!r}: {{{name}}} is not a column name")
    return names


def check_template(template: str, allowed: tuple[str, ...] | None, flag: str, hint: str = "") -> None:
    """At least one placeholder, each a plain column name (and one of `allowed` when given)."""
    names = template_fields(template, flag)
    if not names:
        raise SlimtuneError(f"{flag} {template!r} has no placeholder: every prompt would be the same text; put the "
                            f"text column in braces, e.g. {{{allowed[0] if allowed else 'text'}}}")
    if allowed is not None:
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise SlimtuneError(f"{flag} {template!r}: only {', '.join('{' + a + '}' for a in allowed)} can be filled "
                                f"in, not {{{unknown[0]}}}{hint}")


def check_label_words(label_words: str) -> list[tuple[str, str]]:
    pairs = [p.split("=", 1) for p in label_words.split(",")]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise SlimtuneError(f"--label-words {label_words!r}: expected 'value=word,value=word'")
    values = [v.strip() for v, _ in pairs]
    words = [w.strip() for _, w in pairs]
    for kind, items in (("label value", values), ("label word", words)):
        repeated = sorted({x for x in items if items.count(x) > 1})
        if repeated:
            raise SlimtuneError(f"--label-words {label_words!r}: {kind} {repeated[0]!r} appears twice (one word per "
                                "class, one class per word)")
    if len(pairs) < 2:
        raise SlimtuneError(f"--label-words {label_words!r}: at least two classes are needed")
    return list(zip(values, words))


def check_task_text(s) -> None:
    """The prompt settings of a command with `task`, `template`, `label_words` and `input_column` (train, eval)."""
    if s.task == "custom":
        if not (s.template and s.label_words):
            raise SlimtuneError("--task custom needs --template (e.g. '{text} It was') and --label-words "
                                "(e.g. '0=terrible,1=great')")
        check_template(s.template, None, "--template")
        check_label_words(s.label_words)
    from slimtune.data.tasks import TASKS, builtin_label_words
    if s.task in TASKS:
        if s.template is not None:
            check_template(s.template, TASKS[s.task].text_columns, "--template",
                           hint=f" (task {s.task}'s columns; a column of another name in the data: --text-column)"
                           if s.task == "sst2" and hasattr(s, "text_column") else f" (task {s.task}'s columns)")
        if s.label_words is not None:
            builtin_label_words(s.task, s.label_words)
    if s.task == "generation" and s.template is not None:
        check_template(s.template, (s.input_column or "input",), "--template",
                       hint="" if s.input_column else " (name another column with --input-column)")


def require_input_file(path: str, flag: str, regular: bool = True) -> None:
    """An input that must exist (files, or hf:DIR datasets saved with save_to_disk). `regular`: a data file, never a
    pipe or a device (one would hang or fill memory: data/readers.require_data_file refuses them when read, and
    --dry-run reads nothing); a key file may come through a pipe (`--secret-key-file <(...)`)."""
    import stat
    target = Path(path[3:]) if path.startswith("hf:") else Path(path)
    if not target.exists():
        raise SlimtuneError(f"{flag} {path}: no such file")
    if not path.startswith("hf:") and target.is_dir():
        raise SlimtuneError(f"{flag} {path}: is a directory (for a saved dataset write hf:{path})")
    if regular and not path.startswith("hf:") and not stat.S_ISREG(mode := target.stat().st_mode):
        from slimtune.data.readers import not_a_file
        raise SlimtuneError(f"{flag} {not_a_file(path, mode)}")
    if not os.access(target, os.R_OK):
        raise SlimtuneError(f"{flag} {path}: not readable")


def require_directory(path: str, flag: str, what: str = "directory") -> None:
    if not Path(path).is_dir():
        raise SlimtuneError(f"{flag} {path}: no such {what}")


def check_output_file(path: str, flag: str) -> None:
    from slimtune.train.run_dir import check_output_file as check
    check(path, flag)


def check_new_directory(path: str, flag: str, renamed_onto: bool = True) -> None:
    """An output directory the command creates: may exist only if empty; its parent must be writable. `renamed_onto`:
    the command writes it whole (run_dir.write_new_directory) by a rename onto the path, which would replace a
    symbolic link there rather than fill what it points to: refused (a command that writes inside it takes one)."""
    p = Path(path)
    if renamed_onto and p.is_symlink():
        raise SlimtuneError(f"{flag} {path}: is a symbolic link; give the directory itself, or a new name")
    if p.exists() and not p.is_dir():
        raise SlimtuneError(f"{flag} {path}: is a file, not a directory")
    if p.is_dir() and any(p.iterdir()):
        raise SlimtuneError(f"{flag} {path}: exists and is not empty (nothing was overwritten)")
    parent = next((q for q in (p, *p.parents) if q.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SlimtuneError(f"{flag} {path}: {parent} is not writable")
    from slimtune.train.run_dir import check_not_in_a_run
    check_not_in_a_run(path, flag)


def is_whole(value, low: int = 1) -> bool:
    """A whole number >= low, as a setting read from JSON or TOML may not be (True, 2.5, "8")."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_outside(out: str, source: str, flag: str = "--out", named: str = "ADAPTER") -> None:
    """An output written outside the directory it is made from: inside RUN/adapter it would be deleted when
    `train --resume` replaces that adapter (and an adapter directory holding other files is no longer one)."""
    if not source or not Path(source).is_dir():
        return
    inside, root = Path(out).resolve(), Path(source).resolve()
    if inside == root or root in inside.parents:
        raise SlimtuneError(f"{flag} {out}: inside {named} {source}, which a later `train --resume` of its run "
                            f"replaces (it would be deleted with it): write it elsewhere")


def check_model(model: str, flag: str = "--model") -> None:
    """A built-in name or a local checkpoint directory (config.json or a .gguf file): checked before any work (the
    federated paths started Ray, or a SuperLink and its SuperNodes, before the model was looked for)."""
    from slimtune.models.loading import BUILTIN_MODELS as builtins

    if model in builtins:
        return
    path = Path(model)
    if not path.is_dir():
        raise SlimtuneError(f"{flag} {model}: not a directory, and not one of {', '.join(builtins)} (slimtune never "
                            "downloads from a hub: pass a local checkpoint directory)")
    if not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
        raise SlimtuneError(f"{flag} {model}: no config.json and no .gguf file in the directory")
    check_not_prequantized(path / "config.json", f"{flag} {model}")


def check_not_prequantized(config_file: Path, where: str) -> None:
    """A checkpoint saved already quantized (its config.json records a `quantization_config`: a "-bnb-4bit"
    download, GPTQ, AWQ) is refused in one line: slimtune casts and quantizes its own bases (--dtype, --base-quant),
    which transformers refuses to do to such a model (an internal error after it was loaded)."""
    import json
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the loader names a damaged config
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if quant:
        method = quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"
        raise SlimtuneError(f"{where}: a checkpoint saved quantized ({method}: quantization_config in its "
                            "config.json); slimtune quantizes its own bases: give the full-precision checkpoint, "
                            "with --base-quant int4 or int8 to train LoRA on a quantized base")


def adopt_recorded_base(s) -> None:
    """--model left out for an adapter (eval, generate, merge, export): the base its slimtune.json records (a built-in
    name, or a checkpoint directory that is still there), as peft's adapter_config names its base; else the default.
    (A recorded base that is gone leaves the default, which check_adapter refuses naming both.)"""
    if not s.adapter or s.given("model") or not Path(s.adapter).is_dir():
        return
    from slimtune.models.loading import BUILTIN_MODELS
    from slimtune.peft.registry import read_adapter_meta
    base = read_adapter_meta(s.adapter).get("base_model")
    if isinstance(base, str) and (base in BUILTIN_MODELS or Path(base).is_dir()):
        s.model = base


def check_adapter_and_model(adapter: str, model: str, model_given: bool, flag: str = "--adapter") -> None:
    """The adapter directory of eval, generate, merge and export against --model, before any model is loaded:
    a run directory given for its adapter (RUN for RUN/adapter) is named as such, and an explicit --model with a
    whole model that records no base (a merged checkpoint, read as it is) is refused instead of ignored."""
    from slimtune.peft.registry import is_whole_model, read_adapter_meta, refuse_run_directory

    require_directory(adapter, flag, "adapter directory")
    refuse_run_directory(adapter)
    # a merged checkpoint's slimtune.json carries only its prompt: the base is what is recorded, not the file
    if model_given and is_whole_model(adapter) and read_adapter_meta(adapter).get("base_model") is None:
        raise SlimtuneError(f"--model {model}: {adapter} is a whole model (a merged checkpoint), read as it is with "
                            "no base model; leave --model out")

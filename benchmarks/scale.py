"""Scale runs (issue 38, item 3): Llama- and Gemma-shaped models built from configs with random weights at ~1B, ~3B
and ~7B parameters, per size and method the planner's prediction, the measured peak RSS (or the planner's refusal)
and the step time against two forward passes of the same model, at batch 2 x 64 tokens. Accuracy is not the point.

Each configuration runs in its own process, one at a time (`--child`); the parent reads the child's peak RSS from
os.wait4 (ru_maxrss of that child alone) and its timings from its last stdout line. Models are built on the meta
device and materialised tensor by tensor with a cheap fill (a 1 Mi-value Gaussian block, std 0.02, tiled at random
offsets: seconds instead of minutes of RNG); a quantized base is materialised one linear layer at a time and quantized
at once, so its peak never holds the dense model. Norm weights are 1 (Llama) or 0 (Gemma's 1 + w).

Methods (dtype / base / optimizer / trainable):
  inference-bf16   bf16, two forward passes only (the reference peak for MeZO full bf16)
  adamw-lora       bf16 base, LoRA r 8 fp32 (q_proj, v_proj), AdamW
  adamw-full       fp32, AdamW on every weight
  mezo-full-bf16   bf16, MeZO on every weight (zo/precision.py sweeps), perturbation pool (the fast source on CPU)
  mezo-lora-int8   int8 base (bitsandbytes LLM.int8 weights), bf16 compute, LoRA r 8, MeZO
  mezo-lora-int4   NF4 base, bf16 compute, LoRA r 8, MeZO
Times: the fastest of 3 forward passes (after a warm-up) and of the steps after the first (the machine is shared:
noise only adds). A configuration the planner predicts over the budget (default: 90% of what this machine has available, as `train`)
is not run: its row says so, with the prediction. Results merge into benchmarks/results/scale.json (so sizes can be
run in separate sessions); `--readme` writes the table into the pages marked <!-- scale:start/end --> (the docs'
memory-scaling page; the README's targets table reads the 7B rows through benchmarks/targets.py).

On a GPU (`--device cuda`) the model is built on the device, the peak is CUDA's allocator peak
(torch.cuda.max_memory_allocated, the figure the planner predicts there: no CPU runtime), the timings are taken after
torch.cuda.synchronize, and the rows go to benchmarks/results/scale_cuda.json (their own table). A method whose library
is missing there (bitsandbytes for int8/int4) gets a row saying so.

Usage: python benchmarks/scale.py --arch llama --sizes 1b 3b 7b [--methods ...] [--steps 3] [--threads 1]
       python benchmarks/scale.py --device cuda --sizes 7b --methods inference-bf16 mezo-full-bf16 adamw-lora
       python benchmarks/scale.py --arch llama --sizes 0.4b          (the end-to-end check, ~5 min)
       python benchmarks/scale.py --table | --readme
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
CUDA_RESULTS = ROOT / "benchmarks" / "results" / "scale_cuda.json"
sys.path.insert(0, str(ROOT))

# nominal size -> config (transformers names); Llama: 0.4b a small check, 1b/3b Llama-3.2's shapes, 7b Llama-2-7B's;
# Gemma: Gemma 3 1B's and 4B's text shapes, and Gemma 7B's (v1) shape in Gemma 3's architecture
CONFIGS = {
    "llama": {
        "0.4b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                     num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False),
        "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
        "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
        "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    },
    "gemma": {
        "0.3b": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=256, vocab_size=262144),
        "1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=256, vocab_size=262144),
        "4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=256, vocab_size=262208),
        "7b": dict(hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
                   num_key_value_heads=16, head_dim=256, vocab_size=256000),
    },
}
# method -> (dtype, base_quant, optimizer, peft, optimizer settings)
METHODS = {
    "inference-bf16": ("bfloat16", None, "inference", "none", {}),
    "adamw-lora": ("bfloat16", None, "adamw", "lora", {"lr": 1e-4}),
    "adamw-full": ("float32", None, "adamw", "none", {"lr": 1e-5}),
    "mezo-full-bf16": ("bfloat16", None, "mezo", "none", {"lr": 1e-6, "eps": 1e-3, "perturbation": "pool"}),
    "mezo-lora-int8": ("bfloat16", "int8", "mezo", "lora", {"lr": 1e-3, "eps": 1e-2}),
    "mezo-lora-int4": ("bfloat16", "int4", "mezo", "lora", {"lr": 1e-3, "eps": 1e-2}),
}
LORA_R = 8
FILL_BLOCK = 1 << 20


# -- building a model of any size cheaply ----------------------------------------------------------------------------
def make_config(arch: str, size: str):
    from transformers import Gemma3TextConfig, LlamaConfig

    values = CONFIGS[arch][size]
    if arch == "llama":
        return LlamaConfig(**values, max_position_embeddings=4096)
    return Gemma3TextConfig(**values, max_position_embeddings=4096)


def meta_model(arch: str, size: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(make_config(arch, size), dtype=dtype)


def build(arch: str, size: str, dtype_name: str, base_quant: str | None, device: str = "cpu"):
    """The model on `device`: dense tensors materialised there one by one with the cheap fill; with `base_quant` every
    quantizable linear layer is materialised dense and quantized before the next one exists."""
    import torch

    from slimtune.models.loading import fold_head_inputs
    from slimtune.models.quantize import import_bitsandbytes, quantizable, quantized_linear, release_freed_memory

    dtype = getattr(torch, dtype_name)
    model = meta_model(arch, size, dtype)
    gen = torch.Generator().manual_seed(0)
    block = torch.randn(FILL_BLOCK, generator=gen).mul_(0.02).to(device)
    gemma = arch == "gemma"
    if base_quant:
        bnb = import_bitsandbytes()
        for name, layer in quantizable(model):
            layer.weight = torch.nn.Parameter(fill(torch.empty(layer.weight.shape, dtype=dtype, device=device), block, gen),
                                              requires_grad=False)
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, name.rpartition(".")[2], quantized_linear(bnb, layer, base_quant, dtype))
            release_freed_memory()
    done: dict = {}
    for module_name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in done:  # tied weights: one tensor
                t = torch.empty(p.shape, dtype=p.dtype, device=device)
                if p.ndim >= 2:
                    fill(t, block, gen)
                else:
                    t.fill_(0.0 if gemma or "bias" in pname else 1.0)
                done[id(p)] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
            module._parameters[pname] = done[id(p)]
    for module in model.modules():  # rotary tables are buffers computed at construction: rebuild them on CPU
        for bname, b in list(module._buffers.items()):
            if b is not None and b.device.type == "meta":
                module._buffers[bname] = rebuilt_buffer(module, bname, model.config)
    if base_quant:
        for p in model.parameters():
            p.requires_grad_(False)
    fold_head_inputs(model)  # as slimtune's loader does (models/loading.py)
    return model.to(device)  # the rebuilt buffers (the parameters are there already)


def fill(t, block, gen):
    """t <- the Gaussian block tiled at random offsets (std 0.02), in t's dtype."""
    import torch

    flat = t.view(-1)
    for start in range(0, flat.numel(), FILL_BLOCK // 2):
        part = flat[start:start + FILL_BLOCK // 2]
        offset = int(torch.randint(0, FILL_BLOCK - part.numel() + 1, (1,), generator=gen))
        part.copy_(block[offset:offset + part.numel()])
    return t


def rebuilt_buffer(module, name: str, config):
    """A buffer left on the meta device: rotary inverse frequencies (recomputed by the module's own class on CPU) or
    Gemma's embedding scale."""
    import torch

    fresh = None
    if "Rotary" in type(module).__name__:
        with torch.device("cpu"):
            fresh = type(module)(getattr(module, "config", config))
    if fresh is not None and name in fresh._buffers:
        return fresh._buffers[name]
    if name == "embed_scale":  # Gemma scales embeddings by sqrt(hidden)
        return torch.tensor(config.hidden_size ** 0.5, dtype=module.weight.dtype)
    raise RuntimeError(f"cannot rebuild buffer {name} of {type(module).__name__}")


# -- one configuration (a child process) -------------------------------------------------------------------------------
def batch_of(vocab: int, batch: int, seq: int, device: str = "cpu"):
    import torch

    from slimtune.train.classification import EncodedBatch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (batch, seq), generator=gen)
    ones = torch.ones(batch, seq, dtype=torch.long)
    return EncodedBatch(ids, ones, torch.arange(seq).expand(batch, seq).contiguous(),
                        torch.tensor([0, 1] * batch)[:batch]).to(device)


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(spec: dict) -> dict:
    import torch

    from slimtune.optim import OptimizerArgs, build_optimizer
    from slimtune.peft import PeftSettings, apply_peft
    from slimtune.train.classification import per_example_losses

    torch.set_num_threads(spec["threads"])
    device = spec.get("device", "cpu")
    cuda = device.startswith("cuda")
    clock = lambda: (torch.cuda.synchronize() if cuda else None, time.perf_counter())[1]  # noqa: E731
    dtype_name, quant, optimizer, peft, settings = METHODS[spec["method"]]
    start = time.perf_counter()
    model = build(spec["arch"], spec["size"], dtype_name, quant, device)
    build_s = time.perf_counter() - start
    rss_built = rss_mb()
    if peft != "none":
        model = apply_peft(model, PeftSettings(peft, r=LORA_R))
    batch = batch_of(model.config.vocab_size, spec["batch"], spec["seq"], device)
    label_ids = [11, 13]
    closure = lambda: per_example_losses(model, batch, label_ids)  # noqa: E731
    model.eval()
    with torch.inference_mode():
        closure()  # warm-up (bitsandbytes repacks 4-bit weights for its CPU kernel on the first call)
        forwards = []
        for _ in range(3):
            t = clock()
            loss0 = closure().float().mean().item()
            forwards.append(clock() - t)
        forward_s = min(forwards)  # the fastest of 3: the machine is shared, noise only adds
    out = {"build_s": build_s, "rss_after_build_mb": rss_built, "forward_s": forward_s, "loss": loss0}
    if optimizer == "inference":
        return {**out, **cuda_peak(cuda)}
    opt = build_optimizer(optimizer, model, OptimizerArgs(**settings))
    model.train(not opt.zeroth_order)
    times = []
    for _ in range(spec["steps"]):
        t = clock()
        result = opt.step(closure)
        times.append(clock() - t)
    timed = times[1:] or times
    out.update(step_s=min(timed), mean_step_s=sum(timed) / len(timed), first_step_s=times[0], steps=len(times),
               step_loss=result.loss, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    out["step_over_two_forwards"] = out["step_s"] / (2 * forward_s)
    return {**out, **cuda_peak(cuda)}


def cuda_peak(cuda: bool) -> dict:
    """On CUDA, the allocator's peak (what the planner predicts there) and the device's name."""
    if not cuda:
        return {}
    import torch
    return {"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20, "gpu": torch.cuda.get_device_name()}


# -- the parent: plan, run one at a time, record -----------------------------------------------------------------------
def prediction(arch: str, size: str, method: str, batch: int, seq: int, device: str = "cpu") -> tuple[float, int]:
    import torch

    from slimtune.report.memory_model import predict_run_mb

    from slimtune.report.memory_model import ModelShape, predict_run_mb

    dtype_name, quant, optimizer, peft, _ = METHODS[method]
    model = meta_model(arch, size, getattr(torch, dtype_name))
    predicted, trainable = predict_run_mb(model, optimizer, peft, LORA_R, batch, seq, device, dtype=dtype_name,
                                          base_quant=quant)
    return predicted, trainable, ModelShape.from_model(model).total_params


def run_one(spec: dict, budget: float) -> dict:
    device = spec.get("device", "cpu")
    predicted, trainable, total = prediction(spec["arch"], spec["size"], spec["method"], spec["batch"], spec["seq"],
                                             device)
    row = {**spec, "predicted_mb": predicted, "planned_trainable": trainable, "params": total, "budget_mb": budget}
    if predicted > budget:
        return {**row, "status": "refused by the planner"}
    if METHODS[spec["method"]][1] and importlib.util.find_spec("bitsandbytes") is None:
        return {**row, "status": "not run: bitsandbytes is not installed here"}
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    start = time.perf_counter()
    _, status, usage = os.wait4(proc.pid, 0)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    row["wall_s"] = time.perf_counter() - start
    row["peak_rss_mb"] = usage.ru_maxrss / 1024  # kB on Linux: this child's own peak
    if status != 0:
        return {**row, "status": "failed", "error": stderr.strip().splitlines()[-1:] or [f"exit {status}"]}
    row.update(json.loads(stdout.strip().splitlines()[-1]))
    if "cuda_peak_mb" in row:  # on a GPU the planner predicts device memory, not the process's RSS
        row["peak_mb"] = row["cuda_peak_mb"]
    row["measured_over_predicted"] = row.get("peak_mb", row["peak_rss_mb"]) / predicted
    return {**row, "status": "ran"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(CONFIGS), default="llama")
    ap.add_argument("--sizes", nargs="+", default=["1b", "3b", "7b"])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (the first is not timed)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (the CUDA allocator's peak)")
    ap.add_argument("--gpu", action="store_true", help="the same as --device cuda (as the other benchmarks)")
    ap.add_argument("--budget-gb", type=float, default=None, help="planner budget (default: 90%% of available, as train)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--table", action="store_true", help="print the README table from scale.json")
    ap.add_argument("--readme", action="store_true", help="write the table into the marked pages (docs/benchmarks/memory-scaling.md)")
    args = ap.parse_args()
    if args.gpu:
        args.device = "cuda"
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    cuda = args.device.startswith("cuda")
    if args.table or args.readme:
        text = scale_table(cuda)
        if args.readme:
            from readme_tables import write_block
            write_block("scale-cuda" if cuda else "scale", text)
        print(text)
        return
    from slimtune.report.memory_model import budget_mb

    budget = args.budget_gb * 1024 if args.budget_gb else budget_mb(args.device)
    results = CUDA_RESULTS if cuda else RESULTS
    doc = json.loads(results.read_text()) if results.exists() else {"rows": {}}
    for size in args.sizes:
        if size not in CONFIGS[args.arch]:
            sys.exit(f"--sizes {size}: {args.arch} has {', '.join(CONFIGS[args.arch])}")
        for method in args.methods:
            spec = dict(arch=args.arch, size=size, method=method, batch=args.batch, seq=args.seq,
                        steps=args.steps, threads=args.threads, device=args.device)
            row = run_one(spec, budget)
            doc["rows"][f"{args.arch}-{size}-{method}"] = row
            doc["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                              "torch": __import__("torch").__version__, **gpu_name(args.device)}
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(json.dumps(doc, indent=2))
            print(summary_line(row), flush=True)


def gpu_name(device: str) -> dict:
    import torch
    return {"gpu": torch.cuda.get_device_name()} if device.startswith("cuda") else {}


def summary_line(r: dict) -> str:
    text = f"{r['arch']}-{r['size']} {r['method']}: predicted {r['predicted_mb']:,.0f} MB, {r['status']}"
    if r["status"] == "ran":
        text += f", peak {r.get('peak_mb', r['peak_rss_mb']):,.0f} MB ({r['measured_over_predicted']:.2f}x)"
        if "step_s" in r:
            text += f", step {r['step_s']:.1f} s = {r['step_over_two_forwards']:.2f} x two forwards"
    return text


def scale_table(cuda: bool = False) -> str:
    """The rows of scale.json (peak RSS, CPU) or scale_cuda.json (the CUDA allocator's peak) as a table."""
    results = CUDA_RESULTS if cuda else RESULTS
    if not results.exists():
        return "not run yet"
    rows = json.loads(results.read_text())["rows"].values()
    peak_name = "peak CUDA (MB)" if cuda else "peak RSS (MB)"
    out = [f"| model | params | method | planner (MB) | {peak_name} | measured / planned | step (s) | step / 2 forwards |",
           "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["arch"], float(r["size"].rstrip("b")), list(METHODS).index(r["method"]))):
        params = r["params"]
        ran = r["status"] == "ran"
        peak = f"{r.get('peak_mb', r.get('peak_rss_mb')):,.0f}" if ran else r["status"]
        ratio = f"{r['measured_over_predicted']:.2f}" if ran else ""
        step = f"{r['step_s']:.{3 if cuda else 1}f}" if ran and "step_s" in r else ""
        per = f"{r['step_over_two_forwards']:.2f}" if ran and "step_s" in r else ""
        out.append(f"| {r['arch']}-{r['size']} | {params / 1e9:.2f}B | {r['method']} | {r['predicted_mb']:,.0f} | "
                   f"{peak} | {ratio} | {step} | {per} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()

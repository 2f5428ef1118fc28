#!/usr/bin/env bash
# The GPU checks (run on a lent CUDA machine through the workplace's device tool, from the repo root; the wheels of
# the locked versions travel in .whl/ since that machine reaches no registry): tests/test_cuda.py on the device, then
# benchmarks/scale.py's Llama-shaped rows (7B, 3B, 1B) on CUDA. Logs and results go to $OUT (default: ./gpu_out).
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 SLIMTUNE_CACHE=/tmp/slimtune_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, opacus; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'opacus', opacus.__version__)" | tee -a "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
timeout 300 python3 benchmarks/scale.py --device cuda --arch llama --sizes ${SIZES:-7b 3b 1b} --steps 4 --threads 8 \
  --methods inference-bf16 mezo-full-bf16 adamw-lora adamw-full mezo-lora-int4 2>&1 | tee "$OUT/scale.log"
cp benchmarks/results/scale_cuda.json "$OUT/" 2>/dev/null
true

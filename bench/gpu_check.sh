#!/usr/bin/env bash
# Issues 14 and 15's one prepared GPU run, meant to finish in under 8 minutes on one H100 or H200:
#   1. the CUDA tests (the Triton kernels, masked and gather-first, against the masked dense
#      computation; sparse decoding on CUDA; CUDA-graph decoding against eager decoding; issue 15's
#      SAE training under bf16 autocast against float32);
#   2. bench/sparsify_gpu.py --sweep --compile on the Llama-3-8B shape in bfloat16, batch 1 and 4:
#      the kernel table on the 8B shapes (cuBLAS vs the masked and the gather-first kernel), then
#      TEAL 25/40/50/70% decoding with CUDA graphs, the gather-first kernel at 50%, and the
#      compiled CUDA-graph step at 50%.
# Usage: bash bench/gpu_check.sh   (OUT=folder for the logs and JSON; default bench/out)
# Each stage has its own time limit, so a slow stage cannot eat the next one; rows are printed
# as they are measured, so a cut-off run still leaves what it measured in the log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$LOG"
echo "== CUDA tests" | tee -a "$LOG"
timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_sparsify.py tests/test_sparse_kernel.py tests/test_sparse_decoding.py tests/sae/test_sae_cuda.py \
  -k "cuda" 2>&1 | tail -20 | tee -a "$LOG"
echo "== bench/sparsify_gpu.py --sweep --compile, llama-8b-shape, bfloat16, batch 1 and 4" | tee -a "$LOG"
timeout 330 "$PY" bench/sparsify_gpu.py --sweep --compile --models llama-8b-shape --batches 1,4 \
  --out "$OUT/sparsify-gpu-8b.json" 2>&1 | grep -v "^Loading weights" | tee -a "$LOG"
echo "== done (exit codes: tests and bench above; 124 = stage timed out)" | tee -a "$LOG"

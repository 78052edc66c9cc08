#!/usr/bin/env bash
# Issue 14's one prepared GPU run, under 9.5 minutes on one H100 or H200 (stage limits 150+140+270 s):
#   1. the CUDA tests: the Triton kernels (default, gather-first, one launch, the one-row kernel
#      with prefetch and a 2-D accumulator, the fused mask) against the masked dense computation;
#      sparse decoding on CUDA; CUDA-graph decoding against eager decoding; issue 15's SAE
#      training under bf16 autocast against float32;
#   2. bench/sparsify_gpu_tune.py: one Llama-8B layer's seven linears per CUDA graph: cuBLAS, the
#      kernel as apply runs it, one launch, a grid of tile settings (the best written to
#      $OUT/gpu-tiles.json: the general and the one-row kernel, gather-first), 70%; then 4 rows:
#      the masked dense path with the mask by torch ops or by one kernel, and the tensor-core
#      kernel;
#   3. bench/sparsify_gpu.py on the 8B shape in bfloat16, TEAL 50% and 70%, 128 new tokens,
#      batch 4 then 1, each variant against dense in the same run: the defaults, the fused mask
#      (batch 4); one launch with the tuned tiles, gather-first, the compiled step (batch 1).
#      A row whose kernel failed says so (it timed dense matmuls); the JSON is written per row.
# Usage: bash bench/gpu_check.sh   (OUT=folder for the logs and JSON; default bench/out; the whole
# pytest output goes to $OUT/tests.log)
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
timeout -k 10 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_sparsify.py tests/test_sparse_kernel.py tests/test_sparse_decoding.py tests/sae/test_sae_cuda.py \
  -k "cuda" 2>&1 | tee "$OUT/tests.log" | tail -20 | tee -a "$LOG"
echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"
echo "== bench/sparsify_gpu_tune.py: one 8B layer per graph, variants and tiles" | tee -a "$LOG"
timeout -k 10 140 "$PY" bench/sparsify_gpu_tune.py --out "$OUT/gpu-tiles.json" 2>&1 | tee -a "$LOG"
echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"
TILES=()
[ -s "$OUT/gpu-tiles.json" ] && TILES=(--tiles "$OUT/gpu-tiles.json")
# batch 4 first, the compiled step last: what a time limit cuts is the slowest row. At batch 4 the
# 8B shape takes the masked dense path, so one launch and gather-first are batch-1 variants.
VARIANTS=graph,one-launch@1,gather+one-launch@1,mask@4,compiled+one-launch@1
[ -s "$OUT/gpu-tiles.json" ] && VARIANTS=graph,one-launch+tuned@1,gather+one-launch+tuned@1,mask@4,compiled+one-launch+tuned@1
echo "== bench/sparsify_gpu.py, llama-8b-shape, bfloat16, TEAL 50/70%, batch 4 and 1: $VARIANTS" | tee -a "$LOG"
timeout -k 10 270 "$PY" bench/sparsify_gpu.py --skip-kernel --models llama-8b-shape --batches 4,1 --methods teal \
  --sparsities 0.5,0.7 --new-tokens 128 "${TILES[@]}" --variants "$VARIANTS" \
  --out "$OUT/sparsify-gpu-8b.json" 2>&1 | grep -v "^Loading weights" | tee -a "$LOG"
echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"
echo "== done (exit codes: tests and bench above; 124 = stage timed out)" | tee -a "$LOG"

#!/usr/bin/env bash
# Full-size run of benchmarks/real_size.py on one lent GPU (H100 / H200), sized for ~5 minutes of the device's
# 10-minute command limit. Writes $OUT/real_size.md (the table), $OUT/real_size.json and $OUT/log.txt.
#   run: bash benchmarks/real_size_gpu.sh          (device tool: carry .venv is not needed if torch is installed there)
# What it measures (official shapes, bf16, random weights; harness.flops gives the FLOPs and the memory model):
#   MMaDA-8B 512 px (L 1539), configs/mmada sampler (preset mmada, 12 steps, CFG 3.0): rollouts at batch 1, 8, 16;
#   one step of each method with 1 prompt x G=9, LoRA r=128, micro-batch 3, gradient checkpointing, K=2 inner
#   iterations (the configs' K=6 costs 3x the estimator and update parts; the table's FLOPs are for the K run);
#   full fine-tuning where the memory model fits (not on 80 GB: weights + grads + AdamW + reference = 81 GB);
#   Lumina-DiMOO-8B 512x512 (configs/lumina_dimoo sampler: 32 steps, CFG 4.0): rollouts at batch 1, 8, one ht-grpo step;
#   the tiny default's rows; MFU against the bf16 matmul peak measured in the run and the nominal 989 TFLOP/s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/real_size_gpu}"
mkdir -p "$OUT"
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/log.txt"
{
  timeout 240 "$PY" benchmarks/real_size.py --size full --device cuda --backbones mmada --batches 1,8,16 \
      --inner 2 --nominal-peak-tflops 989 --no-tiny --out "$OUT/mmada" || echo "mmada part failed (rc $?)"
  timeout 150 "$PY" benchmarks/real_size.py --size full --device cuda --backbones lumina-dimoo --batches 1,8 \
      --methods ht-grpo --inner 2 --full-ft off --nominal-peak-tflops 989 --no-tiny --out "$OUT/dimoo" || echo "dimoo part failed (rc $?)"
  timeout 60 "$PY" benchmarks/real_size.py --tiny-only --device cuda --nominal-peak-tflops 989 --out "$OUT/tiny" || echo "tiny part failed (rc $?)"
} 2>&1 | tee -a "$OUT/log.txt"
cat "$OUT"/mmada/real_size.md "$OUT"/dimoo/real_size.md "$OUT"/tiny/real_size.md > "$OUT/real_size.md" 2>/dev/null || true

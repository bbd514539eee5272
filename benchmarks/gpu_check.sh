#!/usr/bin/env bash
# One-shot GPU check for imgclf on a machine with an NVIDIA GPU, in under 8 minutes.
#
# Run from the repo root in a venv after `pip install -e .` (nothing else is installed).
# Prints: an nvidia-smi summary; ResNet-50 at 224 px images/s for the book's fp32 loop,
# AMP (bf16 where supported, else fp16), AMP + channels_last and + torch.compile, on
# synthetic batches; the same on a generated folder of JPEGs through imgclf's data path, and
# that data path alone; one checkpoint/resume round trip of `imgclf train` on CUDA; a
# 2-process DDP smoke run and `imgclf train --nproc 2` when there is more than one GPU.
# Without a CUDA GPU it says "no CUDA GPU" and exits 0.
#
#   bash benchmarks/gpu_check.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
HELPER=benchmarks/_gpu_check.py

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no CUDA GPU: nvidia-smi is missing or sees no GPU; nothing to check"
    exit 0
fi

echo "== nvidia-smi"
nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw,power.limit \
    --format=csv
gpus=$(nvidia-smi -L | wc -l)

echo "== ResNet-50 training throughput (single GPU)"
# 5 minutes at most, so that the resume and DDP runs (<= 75 s each) still fit in 8
timeout 300 "$PYTHON" "$HELPER" bench

echo "== checkpoint/resume round trip (imgclf train on CUDA, SIGTERM, rerun)"
timeout 75 "$PYTHON" "$HELPER" resume || echo "resume check did not finish in time"

if [ "$gpus" -gt 1 ]; then
    echo "== DDP smoke run (2 processes)"
    timeout 60 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 "$HELPER" ddp --steps 5
    echo "== imgclf train --nproc 2 (NCCL), SIGTERM and resume"
    timeout 60 "$PYTHON" "$HELPER" resume --nproc 2 || echo "DDP resume did not finish in time"
else
    echo "== DDP smoke run skipped: $gpus GPU"
fi

echo "== nvidia-smi after the run"
nvidia-smi --query-gpu=index,memory.used,utilization.gpu,temperature.gpu,power.draw --format=csv

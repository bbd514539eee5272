#!/usr/bin/env bash
# One-shot GPU check for imgclf on a machine with an NVIDIA GPU, in under 8 minutes.
#
# Run from the repo root in a venv after `pip install -e .` (nothing else is installed).
# Prints: an nvidia-smi summary; ResNet-50 at 224 px images/s for the book's fp32 loop,
# AMP (bf16 where supported, else fp16), AMP + channels_last and + torch.compile, on
# synthetic batches; the same on a generated folder of JPEGs through imgclf's data path, and
# that data path alone; a 2-process DDP smoke run when there is more than one GPU.
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
# 6 minutes at most, so that the DDP run and the summary still fit in 8
timeout 360 "$PYTHON" "$HELPER" bench

if [ "$gpus" -gt 1 ]; then
    echo "== DDP smoke run (2 processes)"
    timeout 60 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 "$HELPER" ddp --steps 5
else
    echo "== DDP smoke run skipped: $gpus GPU"
fi

echo "== nvidia-smi after the run"
nvidia-smi --query-gpu=index,memory.used,utilization.gpu,temperature.gpu,power.draw --format=csv

#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent GPU machine (CI never has one).
# Expects the four MNIST raw files gzipped in .mnist/ and writes its records and log to $OUT.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" MNIST_DATA_DIR=/tmp/mnist
OUT="${OUT:-/tmp/device_out}"; mkdir -p "$OUT" /tmp/mnist/MNIST/raw
log="$OUT/device.log"
for f in .mnist/*.gz; do gunzip -c "$f" > "/tmp/mnist/MNIST/raw/$(basename "$f" .gz)"; done
step() { echo "=== $* ($(date -u +%H:%M:%S))" | tee -a "$log"; }
step environment
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; free -g | head -2
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, torchvision.__version__)"; } 2>&1 | tee -a "$log"
PYTEST=(python3 -m pytest -q -o addopts= -p no:cacheprovider)
step "GPU tests"
"${PYTEST[@]}" tests/test_gpu.py 2>&1 | tee -a "$log"
step "study: gpu"
python3 -m ddp_helpers.study gpu --out "$OUT" 2>&1 | tee -a "$log"
step "main job: python -m ddp_helpers train --world-size 1 --epochs 5"
python3 -m ddp_helpers train --world-size 1 --epochs 5 --output-dir "$OUT" --run-name train_ws1_gpu --no-progress 2>&1 | tee -a "$log"
step "multi-process test files"
"${PYTEST[@]}" --durations=5 ${TEST_FILES:-tests/test_distributed.py tests/test_faults.py tests/test_strategies.py} 2>&1 | tee -a "$log"
step done

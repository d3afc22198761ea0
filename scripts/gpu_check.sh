#!/usr/bin/env bash
# The GPU checks: the CUDA tests (skipped elsewhere) and the optimizer benchmark on CUDA.
#   bash scripts/gpu_check.sh          (from the repository root, after `make venv`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
$PY -m pytest -q tests/test_cuda.py tests/test_step_math.py tests/test_exact_fisher.py
$PY scripts/bench_optimizer.py --device cuda --statistics-rows 2048 --factor-update-interval 10 \
    --background --blocks 5

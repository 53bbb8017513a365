#!/usr/bin/env bash
# On a CUDA machine: build pyeff against that machine's torch, run the GPU tests and the GPU
# benchmarks, and write logs and result files to OUTDIR.
#   bash bench/gpu_check.sh OUTDIR [pytest -k expression]
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR [pytest -k expression]}
SELECT=${2:-}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

{ $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# build for this GPU only (its compute capability), against this machine's torch
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  export TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "gpu_check: build failed"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
$PY -m pyeff.info | tee "$OUT/info.txt"

status=0
if [ -n "$SELECT" ]; then
  $PY -m pytest -q -ra tests -k "$SELECT" 2>&1 | tee "$OUT/tests.log" || status=1
else
  $PY -m pytest -q -ra tests/test_build.py tests/test_fake_quant.py 2>&1 | tee "$OUT/tests.log" || status=1
fi
for b in $($PY -c "from pyeff.bench import BENCHMARKS; print(*BENCHMARKS)"); do
  $PY -m "pyeff.bench.$b" --device cuda --out "$OUT" 2>&1 | tee -a "$OUT/bench.log" || status=1
done
exit $status

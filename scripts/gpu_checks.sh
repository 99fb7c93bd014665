#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks behind the README's GPU figures, in one go.
#   bash scripts/gpu_checks.sh [OUT_DIR]
# Needs a CUDA device, metarun importable (pip install -e '.[dev,bench]') and, for the CLI run,
# the Omniglot minimal splits under $METARUN_DATA/omniglot. Each part's output goes to OUT_DIR
# (default: outputs/gpu_checks) and to the terminal.
set -uo pipefail
out=${1:-outputs/gpu_checks}
mkdir -p "$out"
py=${PYTHON:-python}
export PYTHONUNBUFFERED=1

run() {  # run NAME CMD...: time one part, keep its output, go on if it fails
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$out/$name.txt"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

"$py" - <<'EOF' | tee "$out/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0))
EOF
run tests "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py
run bench_unroll "$py" scripts/bench_unroll.py --device cuda --repeats 9
run bench_batching "$py" scripts/bench_batching.py --part batching --device cuda --repeats 9
if [ -f scripts/bench_runner.py ]; then
  run bench_runner "$py" scripts/bench_runner.py --device cuda
fi
run cli_omniglot "$py" -m metarun.cli device=cuda dataset=omniglot dataset.split=random \
  outer_steps=300 meta_batch_size=32 eval.every=150 eval.num_tasks=600 log.progress=false \
  "hydra.run.dir=$out/cli_omniglot_run"

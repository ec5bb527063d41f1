#!/bin/bash
# Device-side half of the GPU benchmark (see benchmarks/bench_gpu.py): installs the carried
# wheels into a temporary site folder and runs both stacks; results land in $OUT.
#   run(command="bash benchmarks/gpu_bench.sh", carry=[".gpu_bench"], timeout_s=600)
set -uo pipefail
SITE=/tmp/bench_site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu_bench/wheels/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/bench_gpu}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|optax|orbax-checkpoint|torch) " 
timeout 560 python3 benchmarks/bench_gpu.py --anchors .gpu_bench/anchors --site "$SITE" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_gpu.log"

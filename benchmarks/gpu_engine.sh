#!/usr/bin/env bash
# One device call: engine latency figures on Llama-3.1-8B shapes with dummy weights. Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
python3 -c "import jax, jaxllm; print(jax.__version__, jax.devices())" || exit 1
timeout 480 python3 -m benchmarks.latency --output-json "$OUT/latency.json" "$@" 2>&1 | tee "$OUT/latency.log"

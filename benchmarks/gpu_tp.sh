#!/usr/bin/env bash
# Tensor parallelism on one host of 4 GPUs, one device call of under 10 minutes. Results land in $OUT: tp.log and
# tp.tgz (JSON files and the profile's timeline). Order is by priority: a run cut short keeps what came first.
#   bash benchmarks/gpu_tp.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
exec > >(tee "$OUT/tp.log") 2>&1
source benchmarks/device_call.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nvidia-smi topo -m | head -6
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1

b8=benchmarks/configs/llama-3.1-8b
b70=benchmarks/configs/llama-3.1-70b
step allreduce 90 python3 -m benchmarks.allreduce --tp 2 4 --hidden 8192 --tokens 1 8 64 256 \
    --output-json "$OUT/allreduce.json"
step 70b-tp4 170 python3 -m benchmarks.latency --model $b70 -tp 4 --cases 1x1024,64x1024 \
    --output-json "$OUT/latency_70b_tp4.json" \
    || step 70b-tp4-nccl 170 python3 -m benchmarks.latency --model $b70 -tp 4 --cases 1x1024,64x1024 \
        --disable-custom-all-reduce --output-json "$OUT/latency_70b_tp4_nccl.json"
step 8b-tp2 80 python3 -m benchmarks.latency --model $b8 -tp 2 --cases 1x1024,64x1024 \
    --output-json "$OUT/latency_8b_tp2.json"
step 8b-tp2-nccl 80 python3 -m benchmarks.latency --model $b8 -tp 2 --cases 1x1024,64x1024 \
    --disable-custom-all-reduce --output-json "$OUT/latency_8b_tp2_nccl.json"
step profile-70b-tp4 120 python3 -m benchmarks.profile_decode --model $b70 -tp 4 --batch 1 --context 1024 \
    --trace-dir /tmp/traces/70b_tp4_b1 --output-json "$OUT/profile_70b_tp4.json"
step t1-8b-tp2 120 python3 -m benchmarks.throughput --model $b8 --load-format dummy --dtype bfloat16 \
    --skip-tokenizer-init -tp 2 --input-len 1024 --output-len 128 --num-prompts 1000 --output-json "$OUT/t1_8b_tp2.json"
pack_results tp

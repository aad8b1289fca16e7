#!/usr/bin/env bash
# Tensor parallelism on one host of 4 GPUs, as suites of one device call each (under 10 minutes). Everything lands
# in $OUT: <suite>.log and <suite>.tgz (the JSON files, the profiles' timelines). Within a suite the order is by
# priority: a run cut short keeps what came first.
#   bash benchmarks/gpu_tp.sh table     # 70B tp 4 and 8B tp 2 latency, T1 of 8B at tp 2, the all-reduce alone
#   bash benchmarks/gpu_tp.sh t1-70b    # T1 of 70B at tp 4 (its start-up alone takes ~100 s)
#   bash benchmarks/gpu_tp.sh profile   # traced batch-1 decode of 70B at tp 4 and of 8B at tp 2
set -uo pipefail
suite=${1:?table, t1-70b or profile}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
exec > >(tee "$OUT/$suite.log") 2>&1
source benchmarks/device_call.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nvidia-smi topo -m | head -6
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1

b8=benchmarks/configs/llama-3.1-8b
b70=benchmarks/configs/llama-3.1-70b
latency_70b() {  # batch-1 and batch-64 decode and TTFT of 70B at tp 4; if it does not start, its device memory
    step 70b-tp4 170 python3 -m benchmarks.latency --model $b70 -tp 4 --cases 1x1024,64x1024 \
        --output-json "$OUT/latency_70b_tp4.json" \
        || step memory-70b-tp4 90 python3 -m benchmarks.memory --model $b70 -tp 4 --output-json "$OUT/memory_70b_tp4.json"
}
profile_of() {  # profile_of NAME MODEL TP SECONDS: a traced batch-1 decode at 1024 tokens of context
    step "profile-$1" "$4" python3 -m benchmarks.profile_decode --model "$2" -tp "$3" --batch 1 --context 1024 \
        --trace-dir "/tmp/traces/${1//-/_}_b1" --output-json "$OUT/profile_${1//-/_}.json"
}
t1() {  # t1 NAME MODEL TP SECONDS: T1, 1000 random prompts of 1024 in / 128 out
    step "t1-$1" "$4" python3 -m benchmarks.throughput --model "$2" --load-format dummy --dtype bfloat16 \
        --skip-tokenizer-init -tp "$3" --input-len 1024 --output-len 128 --num-prompts 1000 \
        --output-json "$OUT/t1_${1//-/_}.json"
}

case $suite in
table)
    latency_70b
    step 8b-tp2 90 python3 -m benchmarks.latency --model $b8 -tp 2 --cases 1x1024,64x1024 \
        --output-json "$OUT/latency_8b_tp2.json"
    t1 8b-tp2 $b8 2 130
    step allreduce 90 python3 -m benchmarks.allreduce --tp 2 4 --hidden 8192 --tokens 1 8 64 256 \
        --output-json "$OUT/allreduce.json"
    ;;
t1-70b)
    t1 70b-tp4 $b70 4 450
    ;;
profile)
    profile_of 70b-tp4 $b70 4 150
    profile_of 8b-tp2 $b8 2 100
    ;;
*)
    echo "unknown suite: $suite"
    exit 2
    ;;
esac
pack_results "$suite"

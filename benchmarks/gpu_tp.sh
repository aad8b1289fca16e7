#!/usr/bin/env bash
# Tensor parallelism on one host of 4 GPUs, device calls of under 10 minutes each. Results land in $OUT: <part>.log
# and <part>.tgz (JSON files and the profiles' timelines). Order is by priority: a run cut short keeps what came first.
#   bash benchmarks/gpu_tp.sh latency   # step options at tp 2, 70B tp 4 latency and profile, T1 at tp 2
#   bash benchmarks/gpu_tp.sh more      # T1 of 70B at tp 4, a tp-2 profile, the tp-2 step's collectives in its HLO
#   bash benchmarks/gpu_tp.sh recheck   # after a change: 70B tp 4 latency and profile, 8B tp 2 latency
set -uo pipefail
part=${1:?latency, more or recheck}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
exec > >(tee "$OUT/$part.log") 2>&1
source benchmarks/device_call.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nvidia-smi topo -m | head -6
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1

b8=benchmarks/configs/llama-3.1-8b
b70=benchmarks/configs/llama-3.1-70b
latency_70b() {  # batch-1 and batch-64 decode and TTFT of 70B at tp 4
    step 70b-tp4 170 python3 -m benchmarks.latency --model $b70 -tp 4 --cases 1x1024,64x1024 \
        --output-json "$OUT/latency_70b_tp4.json"
}
profile_70b() {  # a traced batch-1 decode of 70B at tp 4
    step profile-70b-tp4 100 python3 -m benchmarks.profile_decode --model $b70 -tp 4 --batch 1 --context 1024 \
        --trace-dir /tmp/traces/70b_tp4_b1 --output-json "$OUT/profile_70b_tp4.json"
}
t1() {  # t1 NAME MODEL TP SECONDS: T1, 1000 random prompts of 1024 in / 128 out
    step "t1-$1" "$4" python3 -m benchmarks.throughput --model "$2" --load-format dummy --dtype bfloat16 \
        --skip-tokenizer-init -tp "$3" --input-len 1024 --output-len 128 --num-prompts 1000 \
        --output-json "$OUT/t1_${1//-/_}.json"
}

case $part in
latency)
    step options-8b-tp2 150 python3 -m benchmarks.step_options --model $b8 -tp 2 --cases 1x1024,64x1024 \
        --variants engine,collectives-outside-graph,nccl --output-json "$OUT/options_8b_tp2.json"
    latency_70b \
        || step memory-70b-tp4 90 python3 -m benchmarks.memory --model $b70 -tp 4 --output-json "$OUT/memory_70b_tp4.json"
    profile_70b
    t1 8b-tp2 $b8 2 120
    ;;
more)
    t1 70b-tp4 $b70 4 330
    step profile-8b-tp2 90 python3 -m benchmarks.profile_decode --model $b8 -tp 2 --batch 1 --context 1024 \
        --trace-dir /tmp/traces/8b_tp2_b1 --output-json "$OUT/profile_8b_tp2.json"
    # Which collectives the compiled tp-2 step holds (the 70B trace shows an all-gather that waits 4.5 ms).
    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=.*step_fn.*" step hlo-8b-tp2 90 \
        python3 -m benchmarks.latency --model $b8 -tp 2 --cases 1x1024 --decode-steps 4
    grep -h -E "all-gather|all-reduce|collective|custom-call" /tmp/dump/*after_optimizations.txt | cut -c1-400 \
        > "$OUT/collectives_8b_tp2.txt"
    ;;
recheck)
    latency_70b
    profile_70b
    step 8b-tp2 80 python3 -m benchmarks.latency --model $b8 -tp 2 --cases 1x1024,64x1024 \
        --output-json "$OUT/latency_8b_tp2.json"
    ;;
esac
pack_results $part

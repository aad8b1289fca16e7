#!/usr/bin/env bash
# The issue-6 table on one GPU, in two device calls of under 10 minutes each. Results land in $OUT:
# <part>.log (everything printed) and <part>.tgz (the JSON files and profiler timelines).
#   bash benchmarks/gpu_single.sh engine   # latency (+ a baseline from .baseline/), decode profile, T1, T3-500/1000
#   bash benchmarks/gpu_single.sh online   # HF generate() vs jaxllm on the same requests, start-up, serving
#   bash benchmarks/gpu_single.sh verify   # a change's check: latency and T3-500 with a baseline, a decode profile
#   bash benchmarks/gpu_single.sh graph    # XLA's CUDA-graph updates, latency with a baseline, T3-500, profiles
#   bash benchmarks/gpu_single.sh norm     # kernel correctness, latency with a baseline, a batch-1 profile, T3-500
#   bash benchmarks/gpu_single.sh merge    # kernel correctness, latency (all cases) with a baseline, profile, T3, T1
#   bash benchmarks/gpu_single.sh rotary   # new kernels' checks, latency with a baseline, profile, TTFT trace, T3
#   bash benchmarks/gpu_single.sh tail     # edge tiles read only their keys: checks, step-shape variants, latency
#   bash benchmarks/gpu_single.sh b256host # warm start; the batch-256 graph updates and the XLA options around them
#   bash benchmarks/gpu_single.sh layers   # one lowering per layer shape: start-up, latency with a baseline, T3
#   bash benchmarks/gpu_single.sh vmm      # which buffer moves at batch 256; XLA's SKIP_TEMP on its VMM allocator
#   bash benchmarks/gpu_single.sh grid     # decode tiling vs a baseline; every gemm on cuBLAS; b256 reduce fusions
#   bash benchmarks/gpu_single.sh table-engine  # latency (all cases), a b256 profile, T1, T3-500
#   bash benchmarks/gpu_single.sh table-online  # the HF ratio, start-up cold and warm, the serving table
#   bash benchmarks/gpu_single.sh loading  # a real safetensors checkpoint: load_model (with a baseline), start-up
#                                          # (a warm start that adds compile-cache files recompiled: call Q)
#   bash benchmarks/gpu_single.sh threads  # threaded loading's engine against .baseline/: latency (every case), T1
#   bash benchmarks/gpu_single.sh pages    # decode attention with the engine's page order vs scattered pages, a
#                                          # batch-256 profile, the card's clocks meanwhile
#   bash benchmarks/gpu_single.sh cachekeys  # a warm start from safetensors: the compile cache keys, a baseline
#   bash benchmarks/gpu_single.sh tiling   # a step-option change (made the engine's default) against .baseline/
#   bash benchmarks/gpu_single.sh closing  # the latency table, the serving table with the server's log, T1
#   bash benchmarks/gpu_single.sh table    # a TTFT trace, a batch-256 profile, the HF ratio, start-up
#   bash benchmarks/gpu_single.sh serving  # start-up cold and warm, the serving table, then T1
#   bash benchmarks/gpu_single.sh more     # a prefill trace, T1, the XLA step-option variants, start-up
#   bash benchmarks/gpu_single.sh t2       # device memory per start-up phase; T2: random 1024/1024 and 128/2048 x 1000
#   bash benchmarks/gpu_single.sh final    # latency (new and baseline engine), decode profiles, the HF ratio
#   bash benchmarks/gpu_single.sh reverse  # verify with the baseline run first, then batch-256 and batch-1 profiles
# Wheels the GPU image lacks (fastapi, uvicorn, ...) come in .whl/ (README "Benchmarks"). The baseline is the code
# before a change, unpacked in .baseline/ (`git archive <commit> jaxllm pallas_kernels benchmarks`) and run from
# inside it: `python -m` puts the working directory ahead of PYTHONPATH, so PYTHONPATH=.baseline alone would
# import the current code.
set -uo pipefail
part=${1:?engine, online, verify, more, t2 or final}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
results=$(cd "$OUT" && pwd)  # JSON files land in $OUT as they are made, so a run cut short still returns them
exec > >(tee "$results/$part.log") 2>&1
source benchmarks/device_call.sh
model=benchmarks/configs/llama-3.1-8b
dummy=(--model "$model" --load-format dummy --dtype bfloat16 --skip-tokenizer-init)
baseline=(env -C .baseline PYTHONPATH=.)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1


hf_ratio() {  # HF generate() and jaxllm on the same 32 ShareGPT-like requests, one after the other
    step hf-sharegpt 100 python3 -m benchmarks.hf_baseline --dataset sharegpt-like --num-prompts 32 --batch-size 32 \
        --max-duration-s 80 --output-json "$results/hf_sharegpt.json"
    step ours-sharegpt 100 python3 -m benchmarks.throughput "${dummy[@]}" --dataset sharegpt-like --num-prompts 32 \
        --no-roofline --output-json "$results/ours_sharegpt.json"
}

latency_of() {  # latency_of current|baseline SECONDS CASES: benchmarks.latency on that code
    local suffix="" code=()
    if [ "$1" = baseline ]; then suffix=_baseline code=("${baseline[@]}"); fi
    step "latency${suffix//_/-}" "$2" "${code[@]}" python3 -m benchmarks.latency --cases "$3" \
        --output-json "$results/latency$suffix.json"
}

t3_500_of() {  # t3_500_of current|baseline SECONDS: T3, 500 ShareGPT-like requests, on that code
    local suffix="" code=()
    if [ "$1" = baseline ]; then suffix=_baseline code=("${baseline[@]}"); fi
    step "t3-500${suffix//_/-}" "$2" "${code[@]}" python3 -m benchmarks.throughput "${dummy[@]}" \
        --dataset sharegpt-like --num-prompts 500 --no-roofline --output-json "$results/t3_500$suffix.json"
}

t1_of() {  # t1_of SECONDS: T1, 1000 random requests of 1024 prompt and 128 output tokens, with its roofline
    step t1 "$1" python3 -m benchmarks.throughput "${dummy[@]}" --input-len 1024 --output-len 128 --num-prompts 1000 \
        --output-json "$results/t1.json"
}

profile_of() {  # profile_of SECONDS BATCH...: a traced steady decode at 1024 tokens of context per batch size
    local limit=$1 b
    shift
    for b in "$@"; do
        step "profile-b$b" "$limit" python3 -m benchmarks.profile_decode --batch "$b" --context 1024 \
            --trace-dir "/tmp/traces/b$b" --output-json "$results/profile_b$b.json"
    done
}

startup_of() {  # startup_of SECONDS: the real server launched cold, then warm, to its first token (needs the wheels)
    PYTHONPATH=.:/tmp/site step startup "$1" python3 -m benchmarks.startup --model "$model" --load-format dummy \
        --dtype bfloat16 --output-json "$results/startup.json"
}

checkpoint=/tmp/jaxllm-checkpoint-8b  # a real safetensors checkpoint of $model, written by benchmarks.loading

startup_from_checkpoint_of() {  # ...of current|baseline SECONDS: startup_of, the server reading $checkpoint
    local suffix="" dir=.
    if [ "$1" = baseline ]; then suffix=_baseline dir=.baseline; fi
    step "startup-safetensors${suffix//_/-}" "$2" env -C $dir PYTHONPATH=.:/tmp/site python3 -m benchmarks.startup \
        --model $checkpoint --load-format safetensors --dtype bfloat16 \
        --output-json "$results/startup_safetensors$suffix.json"
}

serving_of() {  # serving_of SECONDS: streaming clients against the real server, whose log is kept (needs the wheels)
    PYTHONPATH=.:/tmp/site step serving "$1" python3 -m benchmarks.serving --model "$model" --load-format dummy \
        --input-len 1024 --output-len 128 --num-prompts 200 --request-rates 1,4,16,inf --concurrencies 1,8,32,128 \
        --max-duration-s 15 --output-json "$results/serving.json"
    cp /tmp/jaxllm-server-*.log "$results/"  # the server's own account, should a setting fail
}

case $part in
engine)
    if [ -d .baseline ]; then  # the code before this change, same card, same call
        latency_of baseline 150 1x1024,64x1024
    fi
    step latency 200 python3 -m benchmarks.latency --trace-dir /tmp/traces/ttft --output-json "$results/latency.json"
    profile_of 100 1
    t1_of 170
    for n in 500 1000; do
        step "t3-$n" 90 python3 -m benchmarks.throughput "${dummy[@]}" --dataset sharegpt-like --num-prompts $n \
            --no-roofline --output-json "$results/t3_$n.json"
    done
    step hf-random 150 python3 -m benchmarks.hf_baseline --batch-sizes 1,32,128 --input-len 512 --output-len 128 \
        --output-json "$results/hf_random.json"
    ;;
verify)  # a change against the code before it, same card, same call: latency, T3-500, then a batch-256 profile
    latency_of current 120 1x1024,64x1024,256x1024
    latency_of baseline 100 1x1024,64x1024,256x1024
    t3_500_of current 100
    t3_500_of baseline 100
    profile_of 70 256
    ;;
reverse)  # verify with the baseline run first (is a difference the code or the order?), then batch-1/256 profiles
    latency_of baseline 100 1x1024,64x1024,256x1024
    latency_of current 100 1x1024,64x1024,256x1024
    t3_500_of baseline 90
    t3_500_of current 90
    profile_of 60 256 1
    ;;
graph)  # does the step's CUDA graph still get re-recorded? XLA's log of updates, then latency, T3 and profiles
    TF_CPP_VMODULE=command_buffer_thunk=3 TF_CPP_MIN_LOG_LEVEL=0 step graph-updates 60 \
        python3 -m benchmarks.profile_decode --batch 1 --context 1024 >/tmp/updates.log 2>&1
    grep -c "Update command buffer" /tmp/updates.log; grep "Update command buffer" /tmp/updates.log | tail -3
    grep -c "Execute command buffer" /tmp/updates.log
    latency_of current 120 1x1024,64x1024,256x1024
    latency_of baseline 100 1x1024,64x1024,256x1024
    t3_500_of current 90
    profile_of 60 1 64 256
    ;;
norm)  # the fused add + RMSNorm and the decode merge without a scatter: kernel correctness, latency, profile, T3
    step kernels-check 150 python3 benchmarks/kernels_check.py --out "$results"
    latency_of current 110 1x1024,64x1024,256x1024
    latency_of baseline 100 1x1024,64x1024,256x1024
    profile_of 50 1
    t3_500_of current 90
    ;;
merge)  # the split-decode merge as one reduction: kernel correctness, latency with a baseline, profile, T1, T3
    step kernels-check 150 python3 benchmarks/kernels_check.py --out "$results"
    latency_of current 110 1x32,1x1024,1x8192,64x1024,256x1024
    latency_of baseline 80 1x1024,64x1024,256x1024
    profile_of 50 1
    t3_500_of current 90
    t1_of 150
    ;;
rotary)  # rotary + KV write and the split merge as kernels, the TTFT host path
    step kernels-check 80 python3 benchmarks/kernels_check.py --kernels rotary_write_kv,decode --out "$results"
    latency_of current 110 1x1024,64x1024,256x1024
    latency_of baseline 100 1x1024,64x1024,256x1024
    profile_of 50 1
    step ttft-trace 60 python3 -m benchmarks.latency --cases 1x1024 --decode-steps 4 --ttft-repeats 1 \
        --trace-dir /tmp/traces/ttft --output-json "$results/latency_traced.json"
    t3_500_of current 90
    ;;
tail)  # edge tiles that read only their keys: GPU checks, decode variants at a step's shapes (new, baseline), latency
    step kernels-check 90 python3 benchmarks/kernels_check.py --kernels ragged,decode --out "$results"
    step step-shapes 100 python3 benchmarks/kernels.py --step-shapes 256x1024,256x1030,64x1030 --out "$results/new"
    step step-shapes-baseline 80 "${baseline[@]}" python3 benchmarks/kernels.py --step-shapes 256x1030,64x1030 \
        --out "$results/baseline"
    latency_of current 120 1x32,1x1024,1x8192,64x1024,256x1024
    latency_of baseline 90 1x1024,256x1024
    profile_of 60 256
    ;;
b256host)  # warm start; why a batch-256 step's CUDA graph is updated every step, and the XLA options around it
    install_wheels || exit 1
    startup_of 230
    step step-options 190 python3 -m benchmarks.step_options --cases 256x1024 \
        --variants engine,triton-gemms,cublas-outside-graph --output-json "$results/step_options.json"
    TF_CPP_VMODULE=command_buffer_thunk=3 TF_CPP_MIN_LOG_LEVEL=0 step graph-updates 70 \
        python3 -m benchmarks.profile_decode --batch 256 --context 1024 >/tmp/updates.log 2>&1
    grep -c "Update command buffer" /tmp/updates.log; grep "Update command buffer" /tmp/updates.log | tail -3
    grep -c "Execute command buffer" /tmp/updates.log; grep -i "error\|warn" /tmp/updates.log | head -5
    ;;
vmm)  # which allocation the batch-256 graph update is for; SKIP_TEMP with the VMM allocator it needs; gemm tiling
    vlog=gpu_executable=5,gpu_executable_buffer_allocator=3,gpu_executable_va_remap_allocator=3,command_buffer_thunk=3
    TF_CPP_VMODULE=$vlog TF_CPP_MIN_LOG_LEVEL=0 step graph-updates 80 \
        python3 -m benchmarks.profile_decode --batch 256 --context 1024 >/tmp/updates.log 2>&1
    grep -c "Update command buffer" /tmp/updates.log
    grep -E "changed address|allocation policy|VA remapping|kVmm|copy-protection" /tmp/updates.log | cut -c1-400 \
        | sort | uniq -c | sort -rn | head -20
    latency_of current 110 1x1024,64x1024,256x1024
    # XLA_FLAGS is read when the client is made: only then does XLA pick the VMM allocator that SKIP_TEMP's fixed
    # temporary addresses need (a per-compile option alone leaves the default allocator).
    XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP TF_CPP_VMODULE=gpu_executable_buffer_allocator=3 \
        TF_CPP_MIN_LOG_LEVEL=0 step latency-vmm 120 python3 -m benchmarks.latency --cases 1x1024,64x1024,256x1024 \
        --output-json "$results/latency_vmm.json" 2>&1 | tee /tmp/vmm.log | grep -vE "^[IWE][0-9]{4} "
    grep -E "kVmm|allocation policy|VA remapping" /tmp/vmm.log | cut -c1-300 | sort | uniq -c | head
    step step-options 160 python3 -m benchmarks.step_options --cases 256x1024 --variants engine,exhaustive-tiling \
        --output-json "$results/step_options.json"
    ;;
grid)  # a decode-tiling change against .baseline/ (call M: the wide-grid tiling, since reverted): kernel variants at
      # a step's shapes, latency; every gemm on cuBLAS as a step option; the batch-256 reduce fusions (optimized HLO)
    step step-shapes 90 python3 benchmarks/kernels.py --step-shapes 128x1030,256x1030 --out "$results/kernels"
    latency_of current 80 256x1024
    latency_of baseline 80 256x1024
    step step-options 190 python3 -m benchmarks.step_options --cases 1x1024,256x1024 --variants engine,cublas-gemms \
        --output-json "$results/step_options.json"
    XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=step_fn" step hlo-dump 80 \
        python3 -m benchmarks.profile_decode --batch 256 --context 1024 >/tmp/hlo.log 2>&1
    for f in /tmp/hlo/*step_fn*after_optimizations.txt; do  # the reduce fusions and the gemms that feed them
        echo "### $f"
        grep -E "reduce_fusion|cublas|gemm_fusion|triton_gemm" "$f" | grep -v "^ *//" | cut -c1-400 | head -60
    done > "$results/reduce_fusions.txt"
    ;;
table-engine)  # the table's engine rows in one call: decode variants at longer contexts, latency (every case),
              # a batch-256 profile, T1, T3-500
    step step-shapes 60 python3 benchmarks/kernels.py --step-shapes 128x4100,256x4100 --out "$results/kernels"
    latency_of current 150 1x32,1x1024,1x8192,64x1024,256x1024
    profile_of 60 256
    t1_of 160
    t3_500_of current 90
    ;;
table-online)  # the table's other rows in one call: the HF ratio, start-up cold and warm, the serving table
    hf_ratio
    install_wheels || exit 1
    startup_of 170
    serving_of 250
    ;;
loading)  # a real safetensors checkpoint (written here, random): load_model with .baseline/ and the current code,
         # then start-up cold and warm from it
    step loading-baseline 150 "${baseline[@]}" python3 -m benchmarks.loading --model "$model" \
        --checkpoint-dir $checkpoint --output-json "$results/loading_baseline.json"
    step loading 80 python3 -m benchmarks.loading --model "$model" --checkpoint-dir $checkpoint \
        --output-json "$results/loading.json"
    step loading-baseline-again 80 "${baseline[@]}" python3 -m benchmarks.loading --model "$model" \
        --checkpoint-dir $checkpoint --output-json "$results/loading_baseline_again.json"
    install_wheels || exit 1
    startup_from_checkpoint_of current 200
    ;;
threads)  # the engine with threaded loading (its KV cache sized from resident bytes) against .baseline/, every
         # latency case; T1
    latency_of current 110 1x32,1x1024,1x8192,64x1024,256x1024
    latency_of baseline 110 1x32,1x1024,1x8192,64x1024,256x1024
    t1_of 120
    ;;
pages)  # why the engine's batch-256 attention (279 us a layer, T) is slower than kernels.py's (266 us, M): the
       # order of the pages, or the clocks under a whole step's load (nvidia-smi every 200 ms)
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
        --format=csv -lms 200 > "$results/clocks.csv" &
    step step-shapes 90 python3 benchmarks/kernels.py --step-shapes 256x1030 --page-orders random,ascending \
        --out "$results/kernels"
    profile_of 60 256
    kill %1
    ;;
cachekeys)  # why a warm start from a safetensors checkpoint recompiled (call Q): the cache key's parts, cold vs warm,
           # and the same start-up on .baseline/
    step checkpoint 90 python3 -m benchmarks.loading --model "$model" --checkpoint-dir $checkpoint --loads 1
    install_wheels || exit 1
    JAX_DEBUG_LOG_MODULES=jax._src.cache_key,jax._src.compilation_cache startup_from_checkpoint_of current 150
    for f in /tmp/jaxllm-startup-*.log; do gzip -c "$f" > "$results/$(basename "$f").gz"; done
    startup_from_checkpoint_of baseline 150
    ;;
tiling)  # a step option made the engine's default (call K: the whole gemm tiling search, since reverted): what it
         # costs a cold start, what it gives each step against .baseline/, T3-500
    install_wheels || exit 1
    startup_of 200
    latency_of current 110 1x1024,64x1024,256x1024
    latency_of baseline 100 1x1024,64x1024,256x1024
    t3_500_of current 90
    ;;
layers)  # the decoder layer lowered once per bucket: start-up cold and warm, latency with a baseline, kernels, T3
    install_wheels || exit 1
    startup_of 200
    latency_of current 110 1x1024,64x1024,256x1024
    latency_of baseline 100 1x1024,64x1024,256x1024
    profile_of 45 1
    t3_500_of current 90
    ;;
closing)  # the session's last call: the latency table, the serving table (with the server's log), T1
    install_wheels || exit 1
    latency_of current 100 1x32,1x1024,1x8192,64x1024,256x1024
    serving_of 280
    t1_of 150
    ;;
table)  # rows not re-run since earlier sessions, and a TTFT trace to split host from GPU time
    step ttft-trace 70 python3 -m benchmarks.latency --cases 1x1024 --decode-steps 8 --trace-dir /tmp/traces/ttft \
        --output-json "$results/latency_traced.json"
    profile_of 60 256
    hf_ratio
    install_wheels || exit 1
    startup_of 170
    ;;
serving)  # start-up, streaming clients against the real server (Poisson rates and fixed concurrencies), then T1
    install_wheels || exit 1
    startup_of 170
    serving_of 260
    t1_of 170
    ;;
serving-only)  # the serving table alone, with the server's log
    install_wheels || exit 1
    serving_of 300
    ;;
more)  # a traced prefill-heavy step, T1, the step-option variants in one process, start-up cold and warm
    step profile-prefill 70 python3 -m benchmarks.profile_decode --prefill --batch 16 --context 1024 \
        --trace-dir /tmp/traces/prefill --output-json "$results/profile_prefill.json"
    t1_of 170
    step step-options 110 python3 -m benchmarks.step_options --cases 1x1024 --variants engine,skip-profiled \
        --output-json "$results/step_options.json"
    install_wheels || exit 1
    startup_of 170
    ;;
final)  # the latency table (new and baseline engine, the same benchmark code), decode idle at 1 and 64, HF ratio
    step latency 140 python3 -m benchmarks.latency --output-json "$results/latency.json"
    latency_of baseline 110 1x1024,64x1024,256x1024
    profile_of 50 1 64
    hf_ratio
    ;;
t2)  # device memory after each start-up phase, then T2
    step memory 60 python3 -m benchmarks.memory --model "$model" --output-json "$results/memory.json"
    step t2-1024 280 python3 -m benchmarks.throughput "${dummy[@]}" --input-len 1024 --output-len 1024 \
        --num-prompts 1000 --output-json "$results/t2_1024.json"
    step t2-2048 280 python3 -m benchmarks.throughput "${dummy[@]}" --input-len 128 --output-len 2048 \
        --num-prompts 1000 --output-json "$results/t2_2048.json"
    ;;
online)
    install_wheels || exit 1
    export PYTHONPATH=.:/tmp/site
    for b in 1 32 128; do
        step "ours-random-$b" 60 python3 -m benchmarks.throughput "${dummy[@]}" --input-len 512 --output-len 128 \
            --num-prompts $b --no-roofline --output-json "$results/ours_random_$b.json"
    done
    hf_ratio
    startup_of 150
    serving_of 240
    ;;
esac
pack_results "$part"

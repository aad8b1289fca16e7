#!/usr/bin/env bash
# The results table on one GPU, as suites of one device call each (under 10 minutes). Everything lands in $OUT:
# <suite>.log (all that was printed) and <suite>.tgz (the JSON files, the profiler timelines); nothing is written
# into the tree.
#   bash benchmarks/gpu_single.sh table     # latency (every case, TTFT included), T1, T3-500
#   bash benchmarks/gpu_single.sh verify    # latency and T3-500 of the current code and of .baseline/, taking turns
#   bash benchmarks/gpu_single.sh kernels   # kernel correctness against the references, then the kernel tables
#   bash benchmarks/gpu_single.sh profile   # traced decode at batch 1 / 64 / 256 (clocks sampled), TTFT and prefill
#   bash benchmarks/gpu_single.sh startup   # the real server's start-up to first token, cold then warm
#   bash benchmarks/gpu_single.sh serving   # streaming clients against the real server: the serving table
#   bash benchmarks/gpu_single.sh hf        # Hugging Face generate() and jaxllm on the same requests
#   bash benchmarks/gpu_single.sh loading   # a real safetensors checkpoint: load_model, device memory, start-up
#   bash benchmarks/gpu_single.sh t2        # T2: random 1024/1024 and 128/2048 x 1000
#   bash benchmarks/gpu_single.sh quant     # W4A16 kernels alone, then 8B decode / TTFT: bf16, AWQ, GPTQ layouts
#   bash benchmarks/gpu_single.sh quant-t   # T1 and T3-500 of 8B W4A16 (AWQ layout) and bf16
#   bash benchmarks/gpu_single.sh quant-70b # Llama-3.1-70B W4A16 on one GPU: batch-1 and batch-64 decode
# startup, serving and loading need the server's wheels the GPU image lacks (fastapi, uvicorn, ...) in .whl/
# (README "Benchmarks"). verify needs the previous code in .baseline/, made here before the call:
#   mkdir .baseline && git archive <commit> jaxllm pallas_kernels benchmarks | tar -x -C .baseline
# .whl is git-ignored, so the device call names it in `carry`; an untracked .baseline travels by itself (if your
# checkout ignores it, carry it too). The baseline runs from inside .baseline/: `python -m` puts the working
# directory ahead of PYTHONPATH, so PYTHONPATH=.baseline alone would import the current code.
set -uo pipefail
suite=${1:?table, verify, kernels, profile, startup, serving, hf, loading, t2, quant, quant-t or quant-70b}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
results=$(cd "$OUT" && pwd)  # JSON files land in $OUT as they are made, so a run cut short still returns them
exec > >(tee "$results/$suite.log") 2>&1
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

compare_verify() {  # the verify suite's table: each row of the current code beside the baseline's, and their ratio
    python3 - "$results" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None
new, old = load("latency.json"), load("latency_baseline.json")
print("| row | current | baseline | current / baseline |\n|---|---|---|---|")
def row(label, a, b, unit):
    cells = [f"{x:.2f} {unit}" if x is not None else "missing" for x in (a, b)]
    ratio = f"{a / b:.3f}" if a is not None and b else "-"
    print(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")
by_case = lambda r: {(x["batch"], x["context"]): x for x in r["rows"]} if r else {}
n, o = by_case(new), by_case(old)
for case in sorted(set(n) | set(o)):
    a, b = n.get(case), o.get(case)
    row(f"decode step, batch {case[0]}, ctx {case[1]}", a and a["decode_step_s"] * 1e3, b and b["decode_step_s"] * 1e3,
        "ms")
    if case[0] == 1:
        row(f"TTFT, {case[1]} tokens", a and a["ttft_s"] * 1e3, b and b["ttft_s"] * 1e3, "ms")
t_new, t_old = load("t3_500.json"), load("t3_500_baseline.json")
row("T3-500", t_new and t_new["requests_per_s"], t_old and t_old["requests_per_s"], "req/s")
print("card:", (new or t_new or {}).get("card"), "| lower is better, but for T3-500")
EOF
}

case $suite in
table)  # the latency and throughput rows of RESULTS.md
    latency_of current 170 1x32,1x1024,1x8192,64x1024,256x1024
    t1_of 170
    t3_500_of current 100
    ;;
verify)  # a change against .baseline/, same card, same call: the machine warmed up first (its first process has
         # come out slow), then latency current / baseline and T3-500 baseline / current (each code once first)
    cases=1x1024,64x1024,256x1024,1x32,1x8192  # the batch-1/64/256 rows first: a run cut short keeps them
    step warm-up 60 python3 -m benchmarks.latency --cases 1x32 --decode-steps 8 --ttft-repeats 1
    latency_of current 140 $cases
    latency_of baseline 140 $cases
    t3_500_of baseline 90
    t3_500_of current 90
    compare_verify
    ;;
kernels)  # every kernel against its reference on the GPU, then decode / prefill timings with JAX's own kernels
    step kernels-check 250 python3 benchmarks/kernels_check.py --out "$results"
    step kernels 300 python3 benchmarks/kernels.py --sweep --out "$results"
    ;;
profile)  # where the time goes: traced decode (the card's clocks and power sampled meanwhile), TTFT and prefill
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
        --format=csv -lms 200 > "$results/clocks.csv" &
    clocks=$!
    profile_of 80 1 64 256
    kill $clocks
    step ttft-trace 70 python3 -m benchmarks.latency --cases 1x1024 --decode-steps 8 --trace-dir /tmp/traces/ttft \
        --output-json "$results/latency_traced.json"
    step profile-prefill 70 python3 -m benchmarks.profile_decode --prefill --batch 16 --context 1024 \
        --trace-dir /tmp/traces/prefill --output-json "$results/profile_prefill.json"
    ;;
startup)  # launch to first token, cold (empty compile cache) then warm
    install_wheels || exit 1
    startup_of 300
    ;;
serving)  # Poisson rates and fixed concurrencies against the real server
    install_wheels || exit 1
    serving_of 330
    ;;
hf)  # the HF ratio: the same 32 requests; then HF's static batches of random 512/128 prompts
    hf_ratio
    step hf-random 150 python3 -m benchmarks.hf_baseline --batch-sizes 1,32,128 --input-len 512 --output-len 128 \
        --output-json "$results/hf_random.json"
    ;;
loading)  # a real safetensors checkpoint (written here, random): load_model twice, device memory per start-up phase,
          # then the server's start-up from it, cold and warm
    step loading 120 python3 -m benchmarks.loading --model "$model" --checkpoint-dir $checkpoint \
        --output-json "$results/loading.json"
    step memory 60 python3 -m benchmarks.memory --model "$model" --output-json "$results/memory.json"
    install_wheels || exit 1
    startup_from_checkpoint_of current 250
    ;;
t2)  # T2: decode-heavy offline throughput with its roofline
    step t2-1024 280 python3 -m benchmarks.throughput "${dummy[@]}" --input-len 1024 --output-len 1024 \
        --num-prompts 1000 --output-json "$results/t2_1024.json"
    step t2-2048 280 python3 -m benchmarks.throughput "${dummy[@]}" --input-len 128 --output-len 2048 \
        --num-prompts 1000 --output-json "$results/t2_2048.json"
    ;;
quant)  # weight-only int4 against bf16, same call: the kernel at each projection shape, then whole decode steps
    step quant-kernel 150 python3 -m benchmarks.quant_kernel --output-json "$results/quant_kernel.json"
    for q in none awq gptq; do
        flag=() && [ $q != none ] && flag=(--quantization $q)
        step "latency-$q" 140 python3 -m benchmarks.latency "${flag[@]}" --cases 1x1024,16x1024,64x1024,256x1024 \
            --output-json "$results/latency_$q.json"
    done
    ;;
quant-t)  # offline throughput of the W4A16 8B against bf16
    step t1-awq 170 python3 -m benchmarks.throughput "${dummy[@]}" --quantization awq --input-len 1024 \
        --output-len 128 --num-prompts 1000 --output-json "$results/t1_awq.json"
    step t3-500-awq 100 python3 -m benchmarks.throughput "${dummy[@]}" --quantization awq --dataset sharegpt-like \
        --num-prompts 500 --no-roofline --output-json "$results/t3_500_awq.json"
    t3_500_of current 100
    ;;
quant-70b)  # Llama-3.1-70B W4A16 (~37 GB packed) on one card, against its W4A16 roofline
    step 70b-awq 400 python3 -m benchmarks.latency --model benchmarks/configs/llama-3.1-70b --quantization awq \
        --cases 1x1024,64x1024 --ttft-repeats 3 --output-json "$results/latency_70b_awq.json"
    ;;
*)
    echo "unknown suite: $suite"
    exit 2
    ;;
esac
pack_results "$suite"

# Sourced by the device-call scripts (gpu_single.sh, gpu_tp.sh): a time budget for the whole call, `step`, and
# install_wheels.
# Results go to $OUT; a step cut short, or skipped, leaves what earlier steps wrote there.
deadline=570  # seconds: the device call's 600 s limit, less the packing at the end
mkdir -p /tmp/traces

step() {  # step NAME SECONDS CMD...: run with a time limit (never past the deadline), say how long it took
    local name=$1 limit=$2 left=$((deadline - SECONDS))
    shift 2
    if [ "$left" -lt 30 ]; then echo "=== $name: skipped, ${left} s left"; return 1; fi
    echo "=== $name ($(date +%T))"
    local start=$SECONDS
    timeout $((limit < left ? limit : left)) "$@"
    local rc=$?
    echo "=== $name: exit $rc, $((SECONDS - start)) s"
    return $rc
}

install_wheels() {  # the server's packages the GPU image lacks (fastapi, uvicorn, ...), from .whl/ into /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

pack_results() {  # pack_results NAME: the JSON files and the traces' timelines (not the large .xplane.pb) in one file
    cd "$OUT" && tar czf "$1.tgz" --exclude="*.xplane.pb" *.json -C /tmp traces 2>/dev/null && rm -f *.json
}

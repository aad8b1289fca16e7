"""`jaxllm bench throughput|latency|serve|startup|kernels|hf`: the scripts in benchmarks/ (run from the repo root)."""

import importlib

_COMMANDS = {"throughput": "benchmarks.throughput", "latency": "benchmarks.latency", "serve": "benchmarks.serving",
             "startup": "benchmarks.startup", "kernels": "benchmarks.kernels", "hf": "benchmarks.hf_baseline"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in _COMMANDS:
        print(f"usage: jaxllm bench {{{','.join(_COMMANDS)}}} [args]  (run from the jaxllm repository root)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    importlib.import_module(_COMMANDS[argv[0]]).main(argv[1:])
    return 0

"""The `jaxllm` command: `jaxllm serve [MODEL] [flags]` (the OpenAI-compatible server) and `jaxllm bench ...`."""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: jaxllm {serve,bench} ...\n  serve [MODEL] [flags]   OpenAI-compatible server (see --help)\n"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from serving.cli import main as serve  # the web stack is an optional extra: import it only here

        return serve(rest)
    if command == "bench":
        from benchmarks.cli import main as bench

        return bench(rest)
    print(usage, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

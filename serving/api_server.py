"""`python -m serving.api_server --model MODEL [flags]`: vLLM's way to start its server, the same as
`jaxllm serve MODEL [flags]` (serving/cli.py)."""

import sys

from serving.cli import serve

if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))

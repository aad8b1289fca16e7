"""`jaxllm bench ...`, the installed console script, reaches the benchmark scripts from any directory."""

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.server


def test_jaxllm_bench_lists_and_runs_the_benchmarks(tmp_path):
    jaxllm = pathlib.Path(sys.executable).parent / "jaxllm"  # the console script pip installed beside python
    listing = subprocess.run([str(jaxllm), "bench", "--help"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    assert listing.returncode == 0, listing.stderr
    for name in ("throughput", "latency", "serve", "startup", "kernels", "hf"):
        assert name in listing.stdout
    usage = subprocess.run([str(jaxllm), "bench", "throughput", "--help"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert usage.returncode == 0, usage.stderr
    assert "--num-prompts" in usage.stdout and "sharegpt-like" in usage.stdout

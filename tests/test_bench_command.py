"""`jaxllm bench ...` reaches the benchmark scripts from any directory. The `jaxllm` console script runs
`serving.cli:main` (test_server_cli.py checks pyproject.toml says so); here that code runs as `python -m serving.cli`,
so the test exercises this checkout and not whichever copy was pip-installed."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.server


def jaxllm(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_jaxllm_bench_lists_and_runs_the_benchmarks(tmp_path):
    listing = jaxllm("bench", "--help", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    for name in ("throughput", "latency", "serve", "startup", "kernels", "hf"):
        assert name in listing.stdout
    usage = jaxllm("bench", "throughput", "--help", cwd=tmp_path)
    assert usage.returncode == 0, usage.stderr
    assert "--num-prompts" in usage.stdout and "sharegpt-like" in usage.stdout

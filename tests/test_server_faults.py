"""Health through a real engine's life in one in-process server: 503 while it loads, 503 while a step stalls (the
watchdog), and after an injected step failure: in-flight requests fail with an error instead of hanging, /health
turns 503 and new requests get 503."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from jaxllm import AsyncLLMEngine, EngineConfig
from server_harness import TINY_MODEL, InProcessServer, sse_events, wait_healthy
from serving.app import build_app
from serving.context import ServerContext
from serving.engine_host import EngineHost
from serving.metrics import ServerMetrics
from serving.options import ServerOptions
from waiting import wait_until

pytestmark = pytest.mark.server

STALL_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def served():
    gate = threading.Event()

    def build_when_allowed():
        assert gate.wait(120), "the test never opened the start-up gate"
        return AsyncLLMEngine(EngineConfig(model=TINY_MODEL, max_model_len=2048, max_num_seqs=8,
                                           kv_cache_memory_bytes=32 * 2**20))

    host = EngineHost(build_when_allowed, stall_timeout_s=STALL_TIMEOUT_S)
    ctx = ServerContext(host=host, metrics=ServerMetrics(host, "tiny"), served_model_names=["tiny"])
    server = InProcessServer(build_app(ctx, ServerOptions(disable_log_stats=True)))
    yield SimpleNamespace(url=server.url, gate=gate, host=host)
    gate.set()
    server.stop()


def completion(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hello", **body}, timeout=60)


def test_health_is_503_until_the_engine_is_ready(served):
    for _ in range(3):
        r = httpx.get(f"{served.url}/health")
        assert r.status_code == 503 and r.json()["error"]["message"] == "starting"
        r = completion(served.url, max_tokens=2)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_starting" and r.headers["retry-after"]
        time.sleep(0.1)  # checks spread over time: it stays 503 while the gate holds the engine back
    served.gate.set()
    wait_healthy(served.url, timeout=300)
    assert completion(served.url, max_tokens=2).status_code == 200


def test_a_stalled_step_turns_health_503_until_it_moves_again(served):
    engine = served.host.engine.engine
    original_step = engine.step
    stalled_once, watchdog_fired = threading.Event(), threading.Event()

    def slow_step():
        if not stalled_once.is_set():
            stalled_once.set()
            watchdog_fired.wait(STALL_TIMEOUT_S * 30)  # the stall under test, held until /health has said 503
        return original_step()

    engine.step = slow_step
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(completion, served.url, max_tokens=3)
            try:
                wait_until(lambda: httpx.get(f"{served.url}/health").status_code == 503,
                           timeout=STALL_TIMEOUT_S * 3, interval=0.05, message="the watchdog never reported the stall")
            finally:
                watchdog_fired.set()
            assert pending.result(timeout=60).status_code == 200
    finally:
        engine.step = original_step
    wait_healthy(served.url, timeout=10)


def test_an_injected_step_failure_fails_in_flight_requests_and_health(served):
    engine = served.host.engine.engine
    started = threading.Event()

    def stream_until_error():
        body = {"model": "tiny", "prompt": "fail me", "max_tokens": 2000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                started.set()
            return r.status_code, sse_events(lines)

    def failing_step():
        raise RuntimeError("injected step failure at /secret/path.py")

    with ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(stream_until_error)
        non_streaming = pool.submit(completion, served.url, max_tokens=2000, ignore_eos=True)
        assert started.wait(60)
        wait_until(lambda: served.host.engine.stats().num_requests_running >= 2, timeout=30,
                   message="the two requests never ran together")
        engine.step = failing_step
        status, events = streaming.result(timeout=30)
        failed = non_streaming.result(timeout=30)

    assert status == 200 and events[-1] == "[DONE]" and "error" in events[-2]
    assert events[-2]["error"]["type"] == "server_error"
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_error"
    assert "/secret" not in failed.text and "/secret" not in str(events)
    health = httpx.get(f"{served.url}/health")
    assert health.status_code == 503 and health.json()["error"]["message"] == "engine is dead"
    after = completion(served.url, max_tokens=2)
    assert after.status_code == 503 and after.json()["error"]["code"] == "engine_dead"

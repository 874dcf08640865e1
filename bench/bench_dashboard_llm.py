"""The embedded model as a nurse meets it: click a patient in chromium, time the summary; one and two at once."""

# Run: .venv/bin/python -m bench.bench_dashboard_llm [--patients 8] [--model-cache DIR]
# Needs Debian chromium and playwright (never `playwright install`). Prints a Markdown section for the docs.

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from tests.browser import (  # noqa: E402
    chromium_contexts,
    missing_requirements,
    streamlit_server,
    wait_rendered,
)

SECTION = "## Embedded model in the browser (issue 16)"
FIRST_ROW = """() => { const r = document.querySelector('.st-key-census-row-0 [data-testid="stPageLink-NavLink"]');
  return !!r && r.getBoundingClientRect().height > 0; }"""
# The patient page streams sentences with "composing…" under them, then shows the finished summary with its
# "Composed by …" caption and the synopsis ("In short").
STREAMING = "() => /composing…|Composed by/.test(document.body.innerText)"
DONE = "() => document.body.innerText.includes('Composed by')"


def _until(page: Any, js: str, timeout: float = 180.0) -> float:
    t0 = time.perf_counter()
    while not page.evaluate(js):
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(js)
        time.sleep(0.02)
    return time.perf_counter()


def _open_census(page: Any, base: str) -> None:
    page.goto("about:blank")
    page.goto(base)  # a new session: nothing cached in it
    _until(page, FIRST_ROW, timeout=300)


def _click(page: Any, n: int) -> float:
    t0 = time.perf_counter()
    page.locator(f'.st-key-census-row-{n} [data-testid="stPageLink-NavLink"]').first.click()
    return t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=8, help="patients opened one at a time (census order)")
    ap.add_argument("--pairs", type=int, default=3, help="pairs opened at once in two sessions")
    ap.add_argument("--model-cache", help="folder holding the ONNX export (default: NVA_DATA_DIR/models)")
    ap.add_argument("--backend", default="onnx", help="NVA_LLM_BACKEND (none: the page and template alone)")
    args = ap.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"skipped: {missing}")
        return 0
    from assistant.demo_ward import generate_demo_ward

    anchor = datetime.now(UTC).replace(hour=7, minute=0, second=0, microsecond=0)
    alone: list[tuple[float, float]] = []  # (first sentences shown, summary finished) after the click
    pairs: list[tuple[float, float, float]] = []  # (slower of two at once, the same two alone: a, b)
    with tempfile.TemporaryDirectory(prefix="nva-bench-llm-ui-") as tmp:
        demo = Path(tmp) / "demo-ward"
        generate_demo_ward(demo, anchor=anchor, seed=7)
        env = {
            "NVA_SOURCE": str(demo),
            "NVA_DATA_DIR": str(Path(tmp) / "data"),
            "NVA_LLM_BACKEND": args.backend,
            "NVA_SECRETS_FILE": str(Path(tmp) / "none.toml"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        if args.model_cache:
            env["NVA_LLM_CACHE_DIR"] = str(Path(args.model_cache).resolve())
        t_start = time.perf_counter()
        # One browser per session (two nurses are two browsers): the figures of 2026-12-01 16:31 were taken in
        # two tabs of one browser, the clicks in a throttled background tab.
        with streamlit_server(env, startup_s=600) as base, chromium_contexts(2) as contexts:
            page, other = (c.new_page() for c in contexts)
            _open_census(page, base)
            # the dashboard warms the model at start; wait for a first summary so the warm-up is not counted
            t0 = _click(page, 0)
            _until(page, DONE, timeout=600)
            ready_s = time.perf_counter() - t_start
            for n in range(args.patients):
                _open_census(page, base)
                t0 = _click(page, n)
                first = _until(page, STREAMING) - t0
                done = _until(page, DONE) - t0
                alone.append((first, done))
                print(f"patient {n}: first sentences {first:.2f} s, finished {done:.2f} s", flush=True)
            for k in range(args.pairs):
                a, b = 2 * k, 2 * k + 1
                if b >= len(alone):
                    break
                _open_census(page, base)
                _open_census(other, base)
                ta = _click(page, a)
                tb = _click(other, b)
                da = _until(page, DONE) - ta
                db = _until(other, DONE) - tb
                pairs.append((max(da, db), alone[a][1], alone[b][1]))
                print(f"pair {a},{b}: {da:.2f} s and {db:.2f} s together", flush=True)
            wait_rendered(page, ("Composed by",), finished=False)
    firsts = [f for f, _ in alone]
    dones = [d for _, d in alone]
    ratios = [slow / ((x + y) / 2) for slow, x, y in pairs]
    text = "\n".join(
        [
            "",
            SECTION,
            "",
            f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}; load average at the end "
            f"{os.getloadavg()[0]:.1f}. `streamlit run dashboard/app.py` on the demo ward (seed 7) with "
            f"NVA_LLM_BACKEND={args.backend}, Debian chromium via Playwright; each patient in a new session "
            "(nothing cached), timed from the click on its census row. Server start to the first finished "
            f"summary (model load and warm-up included): {ready_s:.0f} s.",
            "",
            "| measure | median | max | runs | target |",
            "| --- | --- | --- | --- | --- |",
            f"| first summary sentences on screen | {statistics.median(firsts):.2f} s | {max(firsts):.2f} s | "
            f"{len(firsts)} | - |",
            f"| whole summary incl. synopsis on screen | {statistics.median(dones):.2f} s | {max(dones):.2f} s | "
            f"{len(dones)} | <= 5 s |",
            (
                f"| two sessions at once: slower / the same two alone | {statistics.median(ratios):.2f}x | "
                f"{max(ratios):.2f}x | {len(ratios)} pairs | <= 1.5x |"
            )
            if ratios
            else "| two sessions at once | n/a | | | |",
            "",
        ]
    )
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

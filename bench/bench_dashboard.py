"""Dashboard latency in a real browser: census first paint, patient view after selection, handoff; medians."""

# Run: .venv/bin/python bench/bench_dashboard.py [--runs 7] [--data-dir DIR] [--out docs/BENCHMARKS.md]
# Needs Debian chromium and playwright (never `playwright install`). Writes its section of docs/BENCHMARKS.md.

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from tests.browser import chromium, chromium_path, missing_requirements, streamlit_server, wait_rendered  # noqa: E402

CENSUS_BUDGET_S = 2.0
PATIENT_BUDGET_S = 1.0
HANDOFF_BUDGET_S = 3.0
SECTION = "## Dashboard in the browser: census and patient view (issue 15, H4b)"
FIRST_ROW = """() => { const r = document.querySelector('.st-key-census-row-0 [data-testid="stPageLink-NavLink"]');
  return !!r && r.getBoundingClientRect().height > 0; }"""


def _machine() -> str:
    try:
        chrome = subprocess.run(
            [chromium_path() or "chromium", "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        chrome = "chromium (version unknown)"
    import streamlit

    return f"{machine()}, Streamlit {streamlit.__version__}, {chrome}"


def _poll(page: Any, js: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not page.evaluate(js):
        if time.monotonic() > deadline:
            raise TimeoutError(js)
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument(
        "--data-dir", help="NVA_DATA_DIR with an ingested guideline store (default: empty temp dir)"
    )
    ap.add_argument(
        "--out", default=str(REPO / "docs" / "BENCHMARKS.md"), help="appends/replaces its section"
    )
    ap.add_argument(
        "--baseline-ref",
        help="a git revision to measure side by side: its census first paint, new sessions alternating with ours "
        "under the same load (the tree is exported with `git archive` into a temp dir)",
    )
    args = ap.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"skipped: {missing}")
        return 0

    from assistant.demo_ward import generate_demo_ward
    from assistant.pipeline import patient_view
    from assistant.views import sort_by_acuity
    from connectors import open_source

    anchor = datetime.now(UTC).replace(hour=7, minute=0, second=0, microsecond=0)
    load_before = os.getloadavg()[0]
    census_paint: list[float] = []
    baseline_paint: list[float] = []
    loads: list[float] = []
    census_done: list[float] = []
    patient_s: list[float] = []
    handoff_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="nva-bench-") as tmp:
        demo = Path(tmp) / "demo-ward"
        generate_demo_ward(demo, anchor=anchor, seed=7)
        with open_source(demo) as src:
            ids = [e.patient_id for e in src.ward_census("Location/ward-4b")]
            views = sort_by_acuity([patient_view(src.patient_chart(p), anchor, patient_id=p) for p in ids])
        # The server's own work for one census (CPU seconds, so the shared machine's load does not count).
        from assistant.pipeline import ward_view

        cpu: list[float] = []
        with open_source(demo) as src:
            for _ in range(5):
                t0 = time.process_time()
                ward_view(src, "Location/ward-4b", anchor)
                cpu.append(time.process_time() - t0)
        env = {
            "NVA_SOURCE": str(demo),
            "NVA_DATA_DIR": args.data_dir or str(Path(tmp) / "data"),
            "NVA_LLM_BACKEND": "none",
            "NVA_SECRETS_FILE": str(Path(tmp) / "none.toml"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        baseline_dir = Path(tmp) / "baseline"
        if args.baseline_ref:
            baseline_dir.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", args.baseline_ref], capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(baseline_dir)], input=archive, check=True)
        with contextlib.ExitStack() as stack:
            base = stack.enter_context(streamlit_server(env))
            old = stack.enter_context(streamlit_server(env, cwd=baseline_dir)) if args.baseline_ref else None
            context = stack.enter_context(chromium())
            page = context.new_page()
            # Warm-up: the server imports pandas/altair/rules and opens its stores once per process.
            for url in (base, old) if old else (base,):
                page.goto(url)
                _poll(page, FIRST_ROW, timeout=300)
                wait_rendered(page, ("Ward census", views[-1].chart.patient.name), timeout=300)
            page.goto(f"{base}/handoff")
            wait_rendered(page, ("Ward handoff", "I — Illness severity"), timeout=300)
            for i in range(args.runs):
                loads.append(os.getloadavg()[0])
                if old:  # the baseline first, then ours: alternating new sessions under the same load
                    page.goto("about:blank")
                    t0 = time.perf_counter()
                    page.goto(old)
                    _poll(page, FIRST_ROW)
                    baseline_paint.append(time.perf_counter() - t0)
                    wait_rendered(page, ("Ward census",), timeout=120)
                page.goto("about:blank")
                t0 = time.perf_counter()
                page.goto(base)  # a new session: nothing cached in the session, the server process is warm
                _poll(page, FIRST_ROW)
                census_paint.append(time.perf_counter() - t0)
                wait_rendered(page, ("Ward census", views[-1].chart.patient.name), timeout=120)
                census_done.append(time.perf_counter() - t0)
                v = views[i % len(views)]
                n = views.index(v)
                link = page.locator(f'.st-key-census-row-{n} [data-testid="stPageLink-NavLink"]').first
                t0 = time.perf_counter()
                link.click()
                # Usable: header, flags, NEWS2 and the doses due (the summary and charts may still stream).
                wait_rendered(
                    page,
                    (v.chart.patient.name, f"Flags ({len(v.findings)})", "NEWS2", "What to do now"),
                    finished=False,
                    timeout=120,
                )
                patient_s.append(time.perf_counter() - t0)
                page.goto("about:blank")
                t0 = time.perf_counter()
                page.goto(f"{base}/handoff")
                wait_rendered(page, ("Ward handoff", "I — Illness severity", "Export PDF"), timeout=120)
                handoff_s.append(time.perf_counter() - t0)
                print(
                    f"run {i + 1} (load {loads[-1]:.1f}): census first row {census_paint[-1]:.2f} s "
                    f"(all rows {census_done[-1]:.2f} s), patient {patient_s[-1]:.2f} s, handoff {handoff_s[-1]:.2f} s"
                    + (f"; baseline census first row {baseline_paint[-1]:.2f} s" if baseline_paint else "")
                )

    load_after = os.getloadavg()[0]
    med = {
        k: statistics.median(x)
        for k, x in (("cp", census_paint), ("cd", census_done), ("p", patient_s), ("h", handoff_s))
    }
    ok_c, ok_p, ok_h = (
        med["cp"] <= CENSUS_BUDGET_S,
        med["p"] <= PATIENT_BUDGET_S,
        med["h"] <= HANDOFF_BUDGET_S,
    )

    def runs(xs: list[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in xs)

    baseline_row = (
        f"| Census first paint, same runs, baseline `{args.baseline_ref}` (sessions alternating with the above) | "
        f"{statistics.median(baseline_paint):.2f} s | {runs(baseline_paint)} | - | - |\n"
        if baseline_paint
        else ""
    )
    report = f"""{SECTION}

Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {_machine()}.
Load: 1-minute load average {load_before:.1f} before, {load_after:.1f} after, {min(loads):.1f}-{max(loads):.1f} at
the start of the runs (shared machine: upper bounds).
Data: demo ward 4B Med-Surg, {len(views)} patients; NVA_LLM_BACKEND=none; guideline store
{"ingested (" + args.data_dir + ")" if args.data_dir else "empty"}.
Method: `bench/bench_dashboard.py --runs {args.runs}`: `streamlit run` on 127.0.0.1, Playwright driving Debian chromium
(headless). Census: from about:blank to the landing page in a new session, until the first census row's link is laid
out (first paint) and until every row is rendered and the script run is over. Patient: one click on a census row
(same tab and session) until the header, `Flags (N)`, NEWS2 and "What to do now" are on screen. One warm-up
navigation per page is not counted.

| Measure | Median | Runs (s) | Target | Result |
| --- | --- | --- | --- | --- |
| Census first paint (first row) | {med["cp"]:.2f} s | {runs(census_paint)} | <= {CENSUS_BUDGET_S:.0f} s | {"met" if ok_c else "**missed**"} |
{baseline_row}| Census server work: `pipeline.ward_view` for {len(views)} patients, CPU time | {statistics.median(cpu):.2f} s | {runs(cpu)} | - | - |
| Census, all {len(views)} rows rendered | {med["cd"]:.2f} s | {runs(census_done)} | - | - |
| Patient view after selection (header, flags, NEWS2, due doses) | {med["p"]:.2f} s | {runs(patient_s)} | <= {PATIENT_BUDGET_S:.0f} s | {"met" if ok_p else "**missed**"} |
| Ward handoff, {len(views)} patients (no LLM) | {med["h"]:.2f} s | {runs(handoff_s)} | <= {HANDOFF_BUDGET_S:.0f} s | {"met" if ok_h else "**missed**"} |
"""
    out = Path(args.out)
    text = out.read_text(encoding="utf-8") if out.exists() else "# Benchmarks\n"
    if SECTION in text:  # replace our own section only (up to the next "## " heading)
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + report + (text[nxt + 1 :] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + report
    out.write_text(text, encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

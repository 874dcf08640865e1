"""Dashboard latency in a real browser: patient view usable and ward handoff rendered, medians of several runs."""

# Run: .venv/bin/python bench/bench_dashboard.py [--runs 5] [--data-dir DIR] [--out docs/BENCHMARKS_dashboard.md]
# Needs Debian chromium and websocket-client. Writes a Markdown report with the date and the machine.

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from tests.browser import chromium, chromium_path, missing_requirements, streamlit_server  # noqa: E402

PATIENT_BUDGET_S = 2.0
HANDOFF_BUDGET_S = 3.0


def _machine() -> str:
    try:
        chrome = subprocess.run(
            [chromium_path() or "chromium", "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        chrome = "chromium (version unknown)"
    import streamlit

    return f"{machine()}, Streamlit {streamlit.__version__}, {chrome}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--data-dir", help="NVA_DATA_DIR with an ingested guideline store (default: empty temp dir)"
    )
    ap.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS_dashboard.md"))
    args = ap.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"skipped: {missing}")
        return 0

    from assistant.demo_ward import generate_demo_ward
    from assistant.rules.engine import evaluate
    from connectors import open_source

    anchor = datetime.now(UTC).replace(hour=7, minute=0, second=0, microsecond=0)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="nva-bench-") as tmp:
        demo = Path(tmp) / "demo-ward"
        generate_demo_ward(demo, anchor=anchor, seed=7)
        with open_source(demo) as src:
            census = [e.patient_id for e in src.ward_census("Location/ward-4b")]
            charts = {p: src.patient_chart(p) for p in census}
        flagged = sorted(census, key=lambda p: -len(evaluate(charts[p], now=anchor)))
        env = {
            "NVA_SOURCE": str(demo),
            "NVA_DATA_DIR": args.data_dir or str(Path(tmp) / "data"),
            "NVA_LLM_BACKEND": "none",
            "NVA_SECRETS_FILE": str(Path(tmp) / "none.toml"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        patient_s: list[float] = []
        patient_done_s: list[float] = []
        handoff_s: list[float] = []
        with streamlit_server(env) as base, chromium() as browser:
            # Warm-up: the server imports pandas/altair/rules and opens its stores once per process.
            browser.navigate(f"{base}/?patient={flagged[0]}")
            browser.wait_for((charts[flagged[0]].patient.name, "Labs"), finished=True, timeout=300)
            browser.navigate(f"{base}/handoff")
            browser.wait_for(("Ward handoff", "I — Illness severity"), finished=True, timeout=300)
            for i in range(args.runs):
                pid = flagged[i % len(flagged)]
                browser.navigate("about:blank")
                t0 = time.perf_counter()
                browser.navigate(f"{base}/?patient={pid}")
                # Usable: header, flags and labs on screen (guideline passages and the summary may still stream).
                browser.wait_for(
                    (charts[pid].patient.name, "Flags (", "Labs", "Trend"), finished=False, timeout=120
                )
                patient_s.append(time.perf_counter() - t0)
                browser.wait_for((charts[pid].patient.name,), finished=True, timeout=300)
                patient_done_s.append(time.perf_counter() - t0)
                browser.navigate("about:blank")
                t0 = time.perf_counter()
                browser.navigate(f"{base}/handoff")
                browser.wait_for(
                    ("Ward handoff", "I — Illness severity", "Export PDF"), finished=True, timeout=120
                )
                handoff_s.append(time.perf_counter() - t0)
                print(
                    f"run {i + 1}: patient usable {patient_s[-1]:.2f} s (complete {patient_done_s[-1]:.2f} s), "
                    f"handoff {handoff_s[-1]:.2f} s"
                )

    load_after = os.getloadavg()[0]
    med_p, med_pd, med_h = (statistics.median(x) for x in (patient_s, patient_done_s, handoff_s))
    ok_p, ok_h = med_p <= PATIENT_BUDGET_S, med_h <= HANDOFF_BUDGET_S
    report = f"""# Dashboard benchmark

Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC
Machine: {_machine()}
Load: 1-minute load average {load_before:.1f} before, {load_after:.1f} after (the machine is shared; figures are
upper bounds on an idle machine).
Data: demo ward 4B Med-Surg, {len(census)} patients, anchor {anchor:%Y-%m-%d %H:%M} UTC; NVA_LLM_BACKEND=none;
guideline store: {"ingested (" + args.data_dir + ")" if args.data_dir else "empty"}.
Method: `bench/bench_dashboard.py --runs {args.runs}`; `streamlit run` on 127.0.0.1 and headless chromium driven over
the DevTools protocol. Each run navigates from about:blank to the page (a new session) and polls the DOM every 50 ms
through `Runtime.evaluate` until the expected text is present (and, where stated, Streamlit's script state is no
longer `running`). One warm-up navigation per page is not counted.

| Measure | Median | Runs (s) | Budget | Result |
| --- | --- | --- | --- | --- |
| Patient view usable (header, flags, labs rendered) | {med_p:.2f} s | {", ".join(f"{x:.2f}" for x in patient_s)} | <= {PATIENT_BUDGET_S:.0f} s | {"pass" if ok_p else "FAIL"} |
| Patient view complete (guidelines + template summary) | {med_pd:.2f} s | {", ".join(f"{x:.2f}" for x in patient_done_s)} | - | - |
| Ward handoff, {len(census)} patients, rendered (no LLM) | {med_h:.2f} s | {", ".join(f"{x:.2f}" for x in handoff_s)} | <= {HANDOFF_BUDGET_S:.0f} s | {"pass" if ok_h else "FAIL"} |
"""
    Path(args.out).write_text(report, encoding="utf-8")
    print(report)
    return 0 if ok_p and ok_h else 1


if __name__ == "__main__":
    raise SystemExit(main())

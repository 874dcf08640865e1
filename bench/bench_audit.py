"""Audit throughput and memory on a Synthea-grown population vs a fhir.resources R4B validation baseline."""

# Usage: .venv/bin/python bench/bench_audit.py [--small 1000] [--large 2000] [--out docs/BENCHMARKS_audit.md]
#        [--mode snapshot|retrospective] (retrospective: `nva audit --period`, episodes over each chart's own span;
#        its section replaces the "## Retrospective audit" section of --out and leaves the snapshot tables alone)
# Grows /work/shared/data/synthea-r4 to N patients as NDJSON with fresh ids (every id of a patient's own resources
# gets a per-clone suffix; references are rewritten with them), then runs `nva audit` in subprocesses: local engine
# with 1 and 2 workers and a dask LocalCluster (2 worker processes), sampling the process tree's RSS.

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from connectors.base import SHARED_TYPES  # noqa: E402
from connectors.bundle_dir import bundle_resources, read_json_file  # noqa: E402

SYNTHEA = Path("/work/shared/data/synthea-r4")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MARK = "\x00"
NOW = "2026-03-02T07:00:00Z"


def load_templates() -> list[dict[str, list[str]]]:
    """Per base patient: resource type -> NDJSON lines with a marker after every id the clone must change."""
    templates = []
    for path in sorted(SYNTHEA.glob("*.json*")):
        resources, _ = bundle_resources(read_json_file(path), str(path))
        own = {
            r["id"]
            for r in resources
            if r.get("resourceType") not in SHARED_TYPES and isinstance(r.get("id"), str)
        }
        by_type: dict[str, list[str]] = {}
        for r in resources:
            if r.get("resourceType") in SHARED_TYPES:
                continue
            line = json.dumps(r, separators=(",", ":"))
            line = UUID_RE.sub(
                lambda m, own=own: m.group(0) + MARK if m.group(0) in own else m.group(0), line
            )
            by_type.setdefault(r["resourceType"], []).append(line)
        templates.append(by_type)
    return templates


def grow(templates: list[dict[str, list[str]]], n: int, outdir: Path) -> int:
    """Write n patients (clones of the base set with fresh ids) as one NDJSON file per type."""
    outdir.mkdir(parents=True, exist_ok=True)
    handles: dict[str, object] = {}
    count = 0
    try:
        for i in range(n):
            base = templates[i % len(templates)]
            suffix = f"-c{i // len(templates)}"
            for rtype, lines in base.items():
                fh = handles.get(rtype)
                if fh is None:
                    fh = handles[rtype] = (outdir / f"{rtype}.ndjson").open("w", encoding="utf-8")
                fh.write("\n".join(lines).replace(MARK, suffix) + "\n")  # type: ignore[attr-defined]
                count += len(lines)
    finally:
        for fh in handles.values():
            fh.close()  # type: ignore[attr-defined]
    return count


class PeakRss:
    """Samples the RSS of a process and all its descendants; keeps the peak sum."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_audit(
    source: Path, out: Path, *extra: str, judged: tuple[str, ...] = ("--now", NOW)
) -> tuple[float, int, str, float, float]:
    cmd = [
        sys.executable,
        "-m",
        "assistant.cli",
        "audit",
        str(source),
        "--out",
        str(out),
        *judged,
        "--no-progress",
        *extra,
    ]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PeakRss(proc.pid)
    stdout, stderr = proc.communicate(timeout=900)
    peak = sampler.stop()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"audit failed: {stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return seconds, peak, stdout.strip(), cpu, load


def baseline(source: Path, budget_s: float, *, cpu: list[float] | None = None) -> tuple[int, float]:
    """Read + parse + validate every resource with fhir.resources R4B, round-robin over types, for budget_s."""
    from fhir.resources.R4B import get_fhir_model_class

    files = sorted(source.glob("*.ndjson"))
    handles = [f.open("r", encoding="utf-8") for f in files]
    n = 0
    start = time.perf_counter()
    cpu0 = time.process_time()
    try:
        while handles and time.perf_counter() - start < budget_s:
            for fh in list(handles):
                for _ in range(50):
                    line = fh.readline()
                    if not line:
                        handles.remove(fh)
                        break
                    r = json.loads(line)
                    try:
                        get_fhir_model_class(r["resourceType"]).model_validate(r)
                    except Exception:  # noqa: S110 - an invalid resource still costs its validation
                        pass
                    n += 1
    finally:
        for fh in handles:
            fh.close()
    if cpu is not None:
        cpu.append(time.process_time() - cpu0)  # CPU seconds: comparable with the audit's on a loaded machine
    return n, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--baseline-seconds", type=float, default=40.0)
    parser.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS_audit.md"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--mode", choices=("snapshot", "retrospective"), default="snapshot")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="nva-bench-audit-"))
    t0 = time.perf_counter()
    templates = load_templates()
    small_dir, large_dir = work / f"pop-{args.small}", work / f"pop-{args.large}"
    small_res = grow(templates, args.small, small_dir)
    large_res = grow(templates, args.large, large_dir)
    gen_s = time.perf_counter() - t0
    print(
        f"generated {args.small} and {args.large} patients ({small_res} / {large_res} resources) in {gen_s:.0f} s",
        file=sys.stderr,
    )

    if args.mode == "retrospective":
        return retrospective(args, work, templates, (small_dir, small_res), (large_dir, large_res))
    rows = []
    runs = [
        ("local, 1 worker", args.small, small_dir, small_res, ()),
        ("local, 1 worker", args.large, large_dir, large_res, ()),
        ("local, 2 workers", args.large, large_dir, large_res, ("--workers", "2")),
        (
            "dask LocalCluster, 2 worker processes",
            args.large,
            large_dir,
            large_res,
            ("--engine", "dask", "--workers", "2"),
        ),
    ]
    outputs = {}
    extras: list[tuple[float, float]] = []
    for label, n, src, res, extra in runs:
        out = work / f"out-{len(rows)}.jsonl"
        seconds, peak, summary, cpu, load = run_audit(src, out, *extra)
        rows.append((label, n, res, seconds, peak))
        extras.append((cpu, load))
        outputs[(label, n)] = out
        print(
            f"{label} @ {n}: {seconds:.1f} s, {n / seconds:.0f} patients/s, {res / seconds:.0f} resources/s, "
            f"peak RSS {peak / 2**20:.0f} MiB -- {summary}",
            file=sys.stderr,
        )
    identical = len({outputs[(lbl, args.large)].read_bytes() for lbl, n, *_ in rows if n == args.large}) == 1
    base_n, base_s = baseline(large_dir, args.baseline_seconds)
    base_rate = base_n / base_s

    one = next(r for r in rows if r[0] == "local, 1 worker" and r[1] == args.large)
    two = next(r for r in rows if r[0] == "local, 2 workers")
    small_one = next(r for r in rows if r[0] == "local, 1 worker" and r[1] == args.small)
    lines = [
        "# Audit benchmark",
        "",
        f"Generated by `bench/bench_audit.py` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"Python {platform.python_version()}, {platform.platform()}.",
        "",
        f"Population: the {len(templates)} Synthea R4 patients of `/work/shared/data/synthea-r4`, cloned with fresh "
        f"ids to {args.small} and {args.large} patients as a Bulk-Data style NDJSON directory (all resource types, "
        "including claims, which the audit skips after routing). Each run is a fresh `nva audit` process "
        "(start-up, partitioning, audit and JSONL output included); peak RSS is the sum over the process tree.",
        "",
        "| Engine | Patients | Resources | Wall time (s) | Patients/s | Resources/s | Peak RSS (MiB) | CPU s "
        "(process tree) | CPUs busy (CPU s / wall s) | Load avg at start |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (label, n, res, seconds, peak), (cpu, load) in zip(rows, extras, strict=True):
        lines.append(
            f"| {label} | {n} | {res} | {seconds:.1f} | {n / seconds:.1f} | {res / seconds:.0f} | "
            f"{peak / 2**20:.0f} | {cpu:.1f} | {cpu / seconds:.2f} | {load:.1f} |"
        )
    lines.append(
        f"| baseline: json.loads + fhir.resources R4B `model_validate` per resource, 1 process | - | "
        f"{base_n} (sampled for {base_s:.0f} s) | - | - | {base_rate:.0f} | - | - | - | - |"
    )
    lines += [
        "",
        f"- Audit (1 worker) vs validation baseline: **{(one[2] / one[3]) / base_rate:.1f}x** resources/s; "
        f"2 workers: **{(two[2] / two[3]) / base_rate:.1f}x**.",
        f"- Second worker: **{one[3] / two[3]:.2f}x** wall-clock speed-up (partitioning is a single serial pass in "
        "the driver). The machine is shared with other jobs: with a load average above 2 on 2 CPUs the audit gets "
        "only part of the cores (see 'CPUs busy'), which caps the measurable parallel gain; the CPU seconds show "
        "the work itself does not grow with workers.",
        f"- Peak memory, 1 worker: {small_one[4] / 2**20:.0f} MiB at {args.small} patients vs "
        f"{one[4] / 2**20:.0f} MiB at {args.large} patients (flat: each partition is read on its own).",
        f"- Findings identical across engines at {args.large} patients: **{'yes' if identical else 'NO'}**.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text, encoding="utf-8")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


RETRO_HEADING = "## Retrospective audit (`nva audit --period`)"


def retrospective(args, work: Path, templates: list, small: tuple[Path, int], large: tuple[Path, int]) -> int:
    """The same population audited retrospectively: episodes over each chart's own span, per engine and size."""
    from collections import Counter

    small_dir, small_res = small
    large_dir, large_res = large
    period = ("--period",)
    runs = [
        ("local, 1 worker", args.small, small_dir, small_res, ()),
        ("local, 1 worker", args.large, large_dir, large_res, ()),
        ("local, 2 workers", args.large, large_dir, large_res, ("--workers", "2")),
        (
            "dask LocalCluster, 1 worker process",
            args.large,
            large_dir,
            large_res,
            ("--engine", "dask", "--workers", "1"),
        ),
        (
            "dask LocalCluster, 2 worker processes",
            args.large,
            large_dir,
            large_res,
            ("--engine", "dask", "--workers", "2"),
        ),
    ]
    rows = []
    outputs: dict[tuple[str, int], Path] = {}
    for label, n, src, res, extra in runs:
        out = work / f"retro-{len(rows)}.jsonl"
        seconds, peak, summary, cpu, load = run_audit(src, out, *extra, judged=period)
        rows.append((label, n, res, seconds, peak, cpu, load))
        outputs[(label, n)] = out
        print(
            f"{label} @ {n}: {seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB -- {summary}", file=sys.stderr
        )
    large_outputs = [outputs[(r[0], args.large)] for r in rows if r[1] == args.large]
    identical = len({p.read_bytes() for p in large_outputs}) == 1
    episodes = [
        json.loads(line) for line in large_outputs[0].read_text(encoding="utf-8").splitlines() if line
    ]
    episodes = [e for e in episodes if e.get("record") != "run-status"]
    by_rule = Counter(e["rule_id"] for e in episodes)
    patients_with = len({e["patient"] for e in episodes})
    doses = sum(e["doses_count"] for e in episodes)
    instants = [e for e in episodes if e["end_reason"] == "order-stop-unknown" and not e["duration_hours"]]
    instant = len(instants)
    instant_rules = Counter(e["rule_id"] for e in instants)
    base_cpu: list[float] = []
    base_n, base_s = baseline(large_dir, args.baseline_seconds, cpu=base_cpu)
    base_rate = base_n / base_s
    base_cpu_rate = base_n / max(base_cpu[0], 1e-9)

    def pick(label: str, n: int) -> tuple:
        return next(r for r in rows if r[0] == label and r[1] == n)

    one, two = pick("local, 1 worker", args.large), pick("local, 2 workers", args.large)
    d1 = pick("dask LocalCluster, 1 worker process", args.large)
    d2 = pick("dask LocalCluster, 2 worker processes", args.large)
    small_one = pick("local, 1 worker", args.small)
    per_k = 1000 / args.large
    lines = [
        RETRO_HEADING,
        "",
        f"Generated by `bench/bench_audit.py --mode retrospective` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"Python {platform.python_version()}.",
        "",
        f"The same Synthea-grown populations ({len(templates)} base patients cloned to {args.small} and {args.large}), "
        "audited with `nva audit --period` over each chart's own span: every rule judged at each moment its inputs "
        "change, episodes written as JSONL. Each run is a fresh process (start-up, partitioning, audit, output).",
        "",
        "| Engine | Patients | Resources | Wall time (s) | Patients/s | Resources/s | Peak RSS (MiB) | CPU s | "
        "CPUs busy | Load avg at start |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, n, res, seconds, peak, cpu, load in rows:
        lines.append(
            f"| {label} | {n} | {res} | {seconds:.1f} | {n / seconds:.1f} | {res / seconds:.0f} | "
            f"{peak / 2**20:.0f} | {cpu:.1f} | {cpu / seconds:.2f} | {load:.1f} |"
        )
    lines.append(
        f"| baseline: json.loads + fhir.resources R4B `model_validate` per resource, 1 process | - | "
        f"{base_n} (sampled for {base_s:.0f} s) | - | - | {base_rate:.0f} | - | - | - | - |"
    )
    lines += [
        "",
        f"- Retrospective audit (1 worker) vs validation baseline: **{(one[2] / one[3]) / base_rate:.1f}x** "
        f"resources/s; 2 workers: **{(two[2] / two[3]) / base_rate:.1f}x**. Per CPU second (robust to the "
        f"shared machine's load): audit {one[2] / one[5]:.0f} resources per CPU-s vs baseline {base_cpu_rate:.0f} "
        f"per CPU-s = **{(one[2] / one[5]) / base_cpu_rate:.1f}x**.",
        f"- Second worker: local **{one[3] / two[3]:.2f}x**, dask **{d1[3] / d2[3]:.2f}x** wall-clock speed-up "
        "(partitioning is one serial pass in the driver; the machine's 2 cores are shared, see 'CPUs busy').",
        f"- Peak memory, local 1 worker: {small_one[4] / 2**20:.0f} MiB at {args.small} patients vs "
        f"{one[4] / 2**20:.0f} MiB at {args.large} patients.",
        f"- Episodes identical across engines and worker counts at {args.large} patients: "
        f"**{'yes' if identical else 'NO'}**.",
        f"- **{len(episodes) * per_k:.0f} episodes per 1,000 patients** ({patients_with * per_k:.0f} patients per "
        f"1,000 with at least one); {doses * per_k:.0f} doses per 1,000 patients given while an episode held (Synthea "
        "exports no MedicationAdministration, so this is 0 here). "
        f"{instant * per_k:.0f} per 1,000 are instants (an order stopped with no stop time and no renewal: only "
        "its prescribing moment is known; "
        + (", ".join(f"`{r}` {n * per_k:.0f}" for r, n in instant_rules.most_common()) or "none")
        + "; copies of one stopped prescription written at one moment are no episode, rule "
        "`duplicate-order-record`). Per rule, per 1,000 patients:",
        "",
        "| Rule | Episodes per 1,000 patients |",
        "|---|---:|",
        *[f"| `{rule}` | {n * per_k:.0f} |" for rule, n in by_rule.most_common()],
        "",
        "The clones repeat the base patients, so these rates are those of the 74-patient sample; they show that a "
        "historical population, where a snapshot sees only what still holds at one instant, yields the monitoring "
        "episodes (warfarin without INR, ARB at 75+ without renal tests) an auditor expects.",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    out = Path(args.out)
    text = out.read_text(encoding="utf-8") if out.exists() else "# Audit benchmark\n\n"
    if RETRO_HEADING in text:
        text = text[: text.index(RETRO_HEADING)]
    out.write_text(text.rstrip("\n") + "\n\n" + section, encoding="utf-8")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

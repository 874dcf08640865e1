"""Connector benchmarks: concurrent REST vs sequential, normalization vs R4B validation, NDJSON read by content."""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

from assistant.normalize import CHART_TYPES, build_chart, validate_strict
from bench.common import SYNTHEA_DIR, median, stamp, table
from connectors.bundle_dir import BundleDirSource, bundle_resources
from connectors.ndjson_dir import NdjsonDirSource, write_ndjson_export
from connectors.partition import partition_export
from connectors.rest import PATIENT_SEARCHES, RestFhirSource, RestOptions
from tests.fhir_test_server import FhirTestServer


def sequential_patient(base: str, pid: str, session: requests.Session) -> int:
    """The baseline: the same searches as NVA, one request after another, following next links."""
    count = 0
    session.get(f"{base}/Patient/{pid}", timeout=30).raise_for_status()
    for _label, rtype, extra in PATIENT_SEARCHES:
        url, params = f"{base}/{rtype}", {"patient": pid, "_count": 200, **extra}
        while url:
            bundle = session.get(url, params=params, timeout=30).json()
            count += len(bundle.get("entry") or [])
            url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
            params = None
    return count


def bench_rest(ward_dir: Path, latency_ms: int, runs: int) -> str:
    server = FhirTestServer(ward_dir, everything=False, latency_ms=latency_ms).start()
    try:
        ids = sorted(e.patient_id for e in BundleDirSource(ward_dir).ward_census("Location/ward-4b"))
        one = ids[0]
        rows = []
        slowest: list[float] = []

        def one_patient_nva():
            server.reset_stats()
            RestFhirSource(server.base_url, options=RestOptions()).patient_chart(one)
            slowest.append(max(r.duration or 0 for r in server.requests))

        # The dashboard's case: the source already knows the server's capabilities and the ward's Locations
        # (from the census), so selecting a patient costs one round of concurrent searches.
        warm = RestFhirSource(server.base_url, options=RestOptions())
        warm.patient_chart(ids[1])

        for label, fn in (
            ("one patient, NVA, cold source (capabilities, searches, Locations: 3 rounds)", one_patient_nva),
            ("one patient, NVA, warm source (as in the dashboard: 1 round)", lambda: warm.patient_chart(one)),
            (
                "one patient, sequential client",
                lambda: sequential_patient(server.base_url, one, requests.Session()),
            ),
            (
                "whole ward, NVA (4 patients at once, 16 requests in flight)",
                lambda: list(
                    RestFhirSource(server.base_url, options=RestOptions()).charts_concurrently(ids, workers=4)
                ),
            ),
            (
                "whole ward, sequential client",
                lambda: [
                    sequential_patient(server.base_url, p, s) for s in [requests.Session()] for p in ids
                ],
            ),
        ):
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            rows.append([label, f"{median(times):.2f} s", runs])
        single = median(slowest)
        ratio_ward = float(rows[4][1][:-2]) / float(rows[3][1][:-2])
        ratio_one = float(rows[0][1][:-2]) / single
        ratio_warm = float(rows[1][1][:-2]) / single
        text = table(
            [f"load over REST, {latency_ms} ms latency per request, {len(ids)} patients", "median", "runs"],
            rows,
        )
        text += (
            f"\n\nWhole ward: NVA is **{ratio_ward:.1f}x** faster than the sequential client (target >= 5x). "
            f"One patient: **{ratio_warm:.1f}x** (warm source) and {ratio_one:.1f}x (cold source) the slowest single request of the same load "
            f"({single * 1000:.0f} ms median, server-side, including the {latency_ms} ms injected latency; "
            "target <= 2x)."
        )
        return text
    finally:
        server.stop()


def bench_normalize(runs: int) -> str:
    bundles = []
    for path in sorted(SYNTHEA_DIR.glob("*.json.gz")):
        resources, _ = bundle_resources(json.loads(gzip.decompress(path.read_bytes())), str(path))
        bundles.append((resources[0]["id"], resources))
    total = sum(1 for _, rs in bundles for r in rs if r["resourceType"] in CHART_TYPES)

    def normalize():
        for pid, resources in bundles:
            build_chart(resources, source="bench", patient_id=pid)

    def validate():
        for _pid, resources in bundles:
            for r in resources:
                if r["resourceType"] in CHART_TYPES:  # the same resources normalization reads
                    validate_strict(r)

    rows = []
    results = {}
    for label, fn, n in (
        ("NVA normalization (fast path, checked accessors)", normalize, runs),
        ("fhir.resources R4B full validation (baseline)", validate, 1),
    ):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        results[label] = median(times)
        rows.append([label, f"{total / median(times):,.0f} resources/s", f"{median(times):.2f} s", n])
    ratio = results[rows[1][0]] / results[rows[0][0]]
    return (
        table(
            [
                f"Synthea set, {len(bundles)} patients, {total:,} chart resources",
                "throughput",
                "median time",
                "runs",
            ],
            rows,
        )
        + f"\n\nNormalization is **{ratio:.0f}x** faster than validating the same resources with "
        "fhir.resources (which builds a pydantic model per resource and does not normalize)."
    )


def _export_variants(root: Path) -> dict[str, Path]:
    """The Synthea set as NDJSON exports whose files are named and packed the ways export servers do it."""
    records = ((r.patient_id, r.resources) for r in BundleDirSource(SYNTHEA_DIR).iter_patient_records())
    plain = write_ndjson_export(records, root / "type-named")
    files = sorted(plain.glob("*.ndjson"))
    numbered, gz, dup = root / "numbered", root / "numbered-gz", root / "duplicated"
    for d in (numbered, gz, dup):
        d.mkdir()
    for n, path in enumerate(files, start=1):
        text = path.read_text(encoding="utf-8")
        name = f"{n}.{path.name.split('.')[0]}.ndjson"
        (numbered / name).write_text(text, encoding="utf-8")
        with gzip.open(gz / (name + ".gz"), "wt", encoding="utf-8", compresslevel=6) as fh:
            fh.write(text)
        (dup / name).write_text(text, encoding="utf-8")
        (dup / f"{n + len(files)}.{path.name.split('.')[0]}.ndjson").write_text(text, encoding="utf-8")
    return {
        "type-named (Patient.ndjson)": plain,
        "numbered (1.Patient.ndjson)": numbered,
        "numbered, gzip": gz,
        "numbered, every resource twice": dup,
    }


def bench_partition(runs: int) -> str:
    """Partition an export by patient (one streaming pass, each line's type read from its content) and read
    every patient back whole (merged across files, duplicates dropped)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in _export_variants(Path(tmp)).items():
            times, cpu, lines, patients, dropped = [], [], 0, 0, 0
            for _ in range(runs):
                t0, c0 = time.perf_counter(), time.process_time()
                export = partition_export(NdjsonDirSource(path), keep_types=CHART_TYPES)  # as the audit does
                records = list(export.iter_records())
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                lines = export.resources
                patients = sum(1 for r in records if r.error is None)
                dropped = sum(r.duplicates for r in records)
            rows.append(
                [
                    label,
                    f"{lines:,}",
                    patients,
                    f"{dropped:,}",
                    f"{lines / median(cpu):,.0f} lines/CPU-s",
                    f"{median(times):.2f} s",
                    f"{median(cpu):.2f} s",
                    runs,
                ]
            )
    return table(
        [
            "NDJSON export of the Synthea set",
            "lines",
            "patients",
            "duplicates dropped",
            "throughput",
            "median wall",
            "median CPU",
            "runs",
        ],
        rows,
    ) + (
        "\n\nEvery variant yields the same patients: file names play no part (each line's resourceType is read "
        "from its first bytes), and a patient's resources spread over several files are merged, with repeats "
        "of the same type and id dropped (newest meta.lastUpdated kept). Types the audit does not use (claims) "
        "are routed past unparsed, as in `nva audit`. Wall time on 2 shared cores varies with the load; "
        "throughput is per CPU second, the work itself."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--latency-ms", type=int, default=50)
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", choices=("ndjson",), help="run the NDJSON part only")
    args = parser.parse_args(argv)
    if args.only == "ndjson":
        text = f"## NDJSON exports read by content\n\nMeasured {stamp()}.\n\n{bench_partition(args.runs)}\n"
        sys.stdout.write(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0
    from assistant.demo_ward import generate_demo_ward

    with tempfile.TemporaryDirectory() as tmp:
        ward = Path(tmp) / "ward"
        generate_demo_ward(ward, anchor=datetime(2026, 3, 16, 7, tzinfo=UTC), seed=7)
        rest = bench_rest(ward, args.latency_ms, args.runs)
    norm = bench_normalize(args.runs)
    text = f"## Chart loading and normalization\n\nMeasured {stamp()}.\n\n{rest}\n\n{norm}\n"
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

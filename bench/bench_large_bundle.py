"""One large multi-patient bundle: index once, then a chart reads only its own entries (time and peak memory)."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script (python bench/bench_large_bundle.py) or as a module
    sys.path.insert(0, str(REPO))

from bench.common import SYNTHEA_DIR, median, stamp, table  # noqa: E402

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
CHARTS = 8  # charts read per run after the index (their median is reported)


def build_big_bundle(out: Path, target_mb: float, *, gz: bool) -> tuple[int, int]:
    """Synthea patients (copies with fresh ids) in ONE Bundle of at least target_mb; written entry by entry."""
    files = sorted(SYNTHEA_DIR.glob("*.json.gz"))
    if not files:
        raise SystemExit(f"no Synthea bundles in {SYNTHEA_DIR}; set NVA_SYNTHEA_DIR")
    written = patients = 0
    opener = gzip.open if gz else open
    with opener(out, "wt", encoding="utf-8") as fh:  # type: ignore[operator]
        fh.write('{"resourceType":"Bundle","type":"collection","entry":[')
        first, copy = True, 0
        while written < target_mb * 1e6:
            for path in files:
                text = gzip.decompress(path.read_bytes()).decode("utf-8")
                if copy:
                    text = UUID.sub(lambda m, c=copy: f"{m.group(0)}-c{c}", text)
                for entry in json.loads(text)["entry"]:
                    chunk = json.dumps(entry, separators=(",", ":"))
                    fh.write(("" if first else ",") + chunk)
                    first = False
                    written += len(chunk) + 1
                patients += 1
                if written >= target_mb * 1e6:
                    break
            copy += 1
        fh.write("]}")
    return patients, written


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, folder: Path, ids: list[str]) -> dict:
    """One measurement in a fresh process, so peak memory is this mode's alone."""
    from assistant.normalize import build_chart
    from connectors.bundle_dir import BundleDirSource, bundle_resources, read_json_file, split_by_patient

    out: dict = {"start_mib": rss_mib()}  # resident after the imports, before any file is opened
    if mode == "audit":
        import io

        from assistant.cli import main as nva

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            batch = ["--batch-size", str(ids[0])] if ids else []
            nva(["audit", str(folder), "--out", str(Path(tmp) / "audit.jsonl"), *batch], out=io.StringIO())
        out["audit_s"] = time.perf_counter() - t0
    elif mode == "whole-file":
        # The baseline: what the connector did before the index (every chart parsed its whole file).
        times = []
        for pid in ids[:2]:
            t0 = time.perf_counter()
            [path] = sorted(folder.iterdir())
            resources, _ = bundle_resources(read_json_file(path), str(path))
            by_patient, shared = split_by_patient(resources)
            build_chart(by_patient[pid] + shared, source=str(folder), patient_id=pid)
            del resources, by_patient, shared
            times.append(time.perf_counter() - t0)
        out["chart_s"] = median(times)
    else:
        source = BundleDirSource(folder)
        t0 = time.perf_counter()
        pids = list(source.iter_patient_ids())
        out["index_s"] = time.perf_counter() - t0
        out["index_mib"] = peak_mib()
        out["patients"] = len(pids)
        [info] = source._files  # the single big file's index
        sizes = {pid: sum(e - s for s, e in spans) for pid, spans in info.patients.items()}
        out["largest_patient_mb"] = max(sizes.values()) / 1e6
        out["largest_patient"] = max(sizes, key=sizes.__getitem__)
        if mode == "charts":
            times = []
            for pid in ids:
                t0 = time.perf_counter()
                source.patient_chart(pid)
                times.append(time.perf_counter() - t0)
            out["chart_s"] = median(times)
            t0 = time.perf_counter()
            source.patient_chart(out["largest_patient"])
            out["largest_chart_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            census = source.ward_census(None)
            out["census_s"] = time.perf_counter() - t0
            out["census"] = len(census)
    out["peak_mib"] = peak_mib()
    return out


def run_child(mode: str, folder: Path, ids: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--ids", ",".join(ids)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS_large_bundle.md")
    parser.add_argument("--child")
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--ids", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, [i for i in args.ids.split(",") if i])))
        return
    rows = []
    load_before = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="nva-bench-large-") as tmp:
        for gz in (False, True):
            folder = Path(tmp) / ("gz" if gz else "plain")
            folder.mkdir()
            big = folder / ("ward.bundle.json.gz" if gz else "ward.bundle.json")
            patients, size = build_big_bundle(big, args.size_mb, gz=gz)
            probe = run_child("index", folder, [])
            from connectors.bundle_dir import BundleDirSource

            ids = sorted(BundleDirSource(folder).iter_patient_ids())
            step = max(1, len(ids) // CHARTS)
            sample = ids[::step][:CHARTS]
            new = run_child("charts", folder, sample)
            old = run_child("whole-file", folder, sample) if not gz else None
            audit = run_child("audit", folder, [])
            small = run_child("audit", folder, ["5"])  # 5 patients per batch instead of the default 50
            on_disk = f" (gzip, {big.stat().st_size / 1e6:.1f} MB on disk)" if gz else ""
            label = f"{size / 1e6:.0f} MB JSON{on_disk}"
            rows.append(
                [
                    label,
                    f"{patients}",
                    f"{probe['largest_patient_mb']:.1f} MB",
                    f"{new['index_s']:.1f} s / {new['index_mib']:.0f} MiB",
                    f"{new['chart_s'] * 1000:.0f} ms",
                    f"{new['largest_chart_s'] * 1000:.0f} ms",
                    f"{new['census_s'] * 1000:.0f} ms ({new['census']} in census)",
                    f"{new['peak_mib']:.0f} MiB (start {new['start_mib']:.0f})",
                    f"{old['chart_s']:.1f} s / {old['peak_mib']:.0f} MiB" if old else "—",
                    f"{audit['audit_s']:.1f} s / {audit['peak_mib']:.0f} MiB",
                    f"{small['audit_s']:.1f} s / {small['peak_mib']:.0f} MiB",
                ]
            )
            print(rows[-1], file=sys.stderr)
    load_after = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    headers = [
        "input",
        "patients",
        "largest patient",
        "index once (time / peak RSS)",
        "chart, median of 8",
        "largest chart",
        "ward census (from the index)",
        "peak RSS, index + 9 charts + census",
        "baseline: chart by parsing the whole file (time / peak RSS)",
        "`nva audit` of the folder, default batches of 50 patients (time / peak RSS)",
        "same, `--batch-size 5`",
    ]
    page = f"""# Benchmark: large bundle folder (issue 12.9)

Run {stamp()} (a shared, noisy machine: 2 cores; load average {load_before} at the start, {load_after} at the end).
`python bench/bench_large_bundle.py --size-mb {args.size_mb:g}`.

The input is ONE Bundle file built from the Synthea set (copies of the 74 patients with fresh ids, compact JSON),
in a folder of its own. Each measurement runs in a fresh process, so "peak RSS" is that process's maximum resident
set, Python and the imports included ("start" is the resident set of that process after its imports, before the
source is opened; a peak equal to it means reading charts never needed more than importing the code did).

{table(headers, rows)}

How: the first use of a `BundleDirSource` streams every file once (`iter_entries`: the C JSON decoder parses one
entry at a time from 1 MiB chunks) and keeps, per patient, the byte spans of its entries (adjacent entries merged
into one span), the Locations, and each patient's current Encounters (for the census). A chart then seeks to its
own spans and parses only those bytes; other patients' entries and unrelated files are never parsed again (a test
breaks an unrelated file after indexing and still reads the chart). Gzip files are read the same way; seeking
forward in a gzip stream decompresses (but does not keep) what lies before, so a chart from a large .json.gz costs
time in proportion to its offset while memory stays flat.

The baseline column is the previous connector's per-chart path (parse the whole file, split by patient), measured
on the plain file only. The audit column runs `nva audit FOLDER --out audit.jsonl` in-process (default local engine):
records come file by file in one forward pass, and the audit holds one batch of patient records at a time (50 by
default, so its peak follows batch size x patient size, not the file); issue 12 measured 11 s at 715 MB RSS for a
100 MB bundle before (a different bundle and load, so compare the memory, not the time).
"""
    args.out.write_text(page)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

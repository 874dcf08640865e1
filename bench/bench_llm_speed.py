"""Embedded-model speed options side by side on the demo ward: tokens/s, first verified sentence, whole summary, RSS."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from assistant.demo_ward import generate_demo_ward  # noqa: E402
from bench.common import median, patient_views, stamp, table  # noqa: E402
from connectors import open_source  # noqa: E402

ANCHOR_ISO = "2026-03-16T07:00:00+00:00"
OPTIONS = ("onnx-sequential", "onnx-batched")  # the default run: the chosen path, before and after batching
ALL_OPTIONS = (
    "onnx-sequential",
    "onnx-batched",
    "onnx-int8",
    "onnx-int4",
    "transformers",
    "transformers-batched",
    "llama-cpp",
)
SECTION = "## Embedded model speed options (issue 16)"
BATCH_SECTION = "## Embedded model: sequential vs batched (issue 16)"
SPEED_FACT = "Potassium 5.9 mmol/L (high) at 2026-03-16 04:30"


def _anchor() -> Any:
    from datetime import datetime

    return datetime.fromisoformat(ANCHOR_ISO)


def _views(ward: Path, limit: int | None) -> list[Any]:
    with open_source(ward) as src:
        views = patient_views(src, _anchor())
    views = [v for v in views if v.chart is not None]
    return views[:limit] if limit else views


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _decode_speed(backend: Any, runs: int = 3) -> tuple[float, float]:
    """Median (tokens/s, first token s) on the per-fact prompt, warm (its prefix already cached where supported)."""
    from assistant.summary.composer import build_fact_messages
    from assistant.summary.facts import Fact

    fact = Fact(tag="F1", kind="result", label="Potassium", text=SPEED_FACT, provenance=())
    speeds, firsts = [], []
    for _ in range(runs):
        res = backend.chat(build_fact_messages(fact), max_tokens=40, temperature=0.0)
        if res.tokens_per_s:
            speeds.append(res.tokens_per_s)
        if res.first_token_s is not None:
            firsts.append(res.first_token_s)
    return (median(speeds) if speeds else 0.0, median(firsts) if firsts else 0.0)


def _summaries(backend: Any, views: list[Any], timeout: float) -> dict[str, Any]:
    """The dashboard's summary path on each patient: first verified model sentence, whole summary, synopsis."""
    from assistant import pipeline

    firsts, totals, synopsis_llm, verified, written, shown = [], [], 0, 0, 0, []
    for view in views:
        t0 = time.perf_counter()
        stream = pipeline.summary_stream(view, backend, (), timeout=timeout)
        for _ in stream:
            pass
        res = stream.result
        totals.append(time.perf_counter() - t0)
        if res.first_llm_sentence_s is not None:
            firsts.append(res.first_llm_sentence_s)
        llm = res.llm_sentences()
        written += len(llm)
        verified += sum(1 for s in llm if s.verified)
        shown.append(sum(1 for s in llm if s.verified))
        synopsis_llm += res.synopsis_source == "llm"
    return {
        "patients": len(views),
        "first_llm": firsts,
        "totals": totals,
        "llm_written": written,
        "llm_verified": verified,
        "synopsis_llm_patients": synopsis_llm,
        "llm_shown": shown,
    }


def _concurrent(backend: Any, views: list[Any], timeout: float) -> list[float]:
    """Two patients opened at once (two threads, as two dashboard sessions): each one's whole-summary time."""
    return [t for t, _, _ in _pair(backend, views, timeout)]


def _pair(backend: Any, views: list[Any], timeout: float) -> list[tuple[float, float | None, int]]:
    """Two patients at once: (whole summary s, first verified model sentence s, model sentences shown) each."""
    from assistant import pipeline

    out: list[tuple[float, float | None, int]] = [(0.0, None, 0), (0.0, None, 0)]

    def one(i: int) -> None:
        t0 = time.perf_counter()
        res = pipeline.summary_stream(views[i], backend, (), timeout=timeout).collect()
        shown = sum(1 for s in res.llm_sentences() if s.verified)
        out[i] = (time.perf_counter() - t0, res.first_llm_sentence_s, shown)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _rows_speed(backend: Any, views: list[Any]) -> dict[str, float]:
    """Aggregate decode rate of one patient's per-fact prompts submitted together (all rows, wall clock)."""
    from assistant.summary.composer import (
        PER_FACT_KINDS,
        PER_FACT_LIMIT,
        PER_FACT_MAX_TOKENS,
        build_fact_messages,
    )
    from assistant.summary.facts import build_fact_sheet

    tokens, wall = 0, 0.0
    for view in views[:3]:
        sheet = build_fact_sheet(view.chart, view.findings, now=view.now)
        facts = [f for f in sheet.facts if f.kind in PER_FACT_KINDS and not f.quoted][:PER_FACT_LIMIT]
        t0 = time.perf_counter()
        streams = backend.stream_many(
            [build_fact_messages(f) for f in facts], max_tokens=PER_FACT_MAX_TOKENS, temperature=0.0
        )
        tokens += sum(s.collect().completion_tokens or 0 for s in streams)
        wall += time.perf_counter() - t0
    return {"rows_tokens": tokens, "rows_wall_s": wall}


def _batched_generate(views: list[Any], runs: int) -> dict[str, Any]:
    """transformers: one left-padded batched `generate` of a patient's per-fact prompts (measured, not shipped)."""
    import torch

    from assistant.llm import make_backend
    from assistant.summary.composer import PER_FACT_KINDS, PER_FACT_LIMIT, build_fact_messages
    from tests.llm_server import model_cache_dir

    backend = make_backend(
        {"NVA_LLM_BACKEND": "transformers", "NVA_LLM_CACHE_DIR": str(model_cache_dir().parent)}
    )
    tokenizer, model = backend._load()  # noqa: SLF001 -- the benchmark drives generate() itself
    tokenizer.padding_side = "left"
    totals, tokens = [], 0
    for view in views[:runs]:
        from assistant.summary.facts import build_fact_sheet

        sheet = build_fact_sheet(view.chart, view.findings, now=view.now)
        facts = [f for f in sheet.facts if f.kind in PER_FACT_KINDS and not f.quoted][:PER_FACT_LIMIT]
        texts = [
            tokenizer.apply_chat_template(
                [m.as_dict() for m in build_fact_messages(f)], add_generation_prompt=True, tokenize=False
            )
            for f in facts
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        totals.append(time.perf_counter() - t0)
        new = out[:, batch["input_ids"].shape[1] :]
        tokens += int((new != tokenizer.pad_token_id).sum())
    return {"batch_totals": totals, "batch_tokens": tokens}


def worker(
    option: str,
    ward: Path,
    limit: int | None,
    timeout: float,
    work: Path,
    model_cache: str | None = None,
    pairs: int = 6,
) -> dict[str, Any]:
    """One option in its own process, so peak RSS and first-run preparation are its own."""
    from assistant.llm import make_backend

    views = _views(ward, limit)
    out: dict[str, Any] = {"option": option}
    t0 = time.perf_counter()
    if option == "transformers-batched":
        out.update(_batched_generate(views, runs=min(len(views), 4)))
        out["prepare_s"] = None
        out["peak_rss_mb"] = _peak_rss_mb()
        return out
    if option in ("onnx-sequential", "onnx-batched"):
        from assistant.llm.config import LlmSettings
        from assistant.llm.onnx_backend import OnnxBackend, prepare_onnx
        from assistant.llm.transformers_backend import default_gguf

        cache = Path(model_cache) if model_cache else work / "models"
        c0 = time.perf_counter()
        path, _ = prepare_onnx(default_gguf(), cache)
        out["prepare_s"] = time.perf_counter() - c0
        settings = LlmSettings(backend="onnx", model_path=str(path), timeout=timeout)
        backend = OnnxBackend(settings, batched=option == "onnx-batched")
    elif option.startswith("onnx"):
        from assistant.llm.onnx_backend import prepare_onnx
        from assistant.llm.transformers_backend import default_gguf

        cache = work / "models"
        if option == "onnx-int8":
            # first-run preparation on a fresh machine (GGUF -> plain copy -> int8 ONNX) as `make model` runs it:
            # in its own process, so this worker's peak RSS is the runtime's alone
            c0 = time.perf_counter()
            cmd = [sys.executable, "-m", "assistant.llm.onnx_backend", "--cache-dir", str(cache)]
            subprocess.run(cmd, check=True, capture_output=True)  # noqa: S603 -- fixed argv
            spent = time.perf_counter() - c0
            path, _ = prepare_onnx(default_gguf(), cache)
        else:
            path = work / "onnx-int4"
            hf = next(cache.glob("*-hf"))
            c0 = time.perf_counter()
            subprocess.run(  # noqa: S603 -- fixed argv
                [
                    sys.executable,
                    "-m",
                    "onnxruntime_genai.models.builder",
                    "-i",
                    str(hf),
                    "-o",
                    str(path),
                    "-p",
                    "int4",
                    "-e",
                    "cpu",
                    "-c",
                    str(work / "c4"),
                ],
                check=True,
                capture_output=True,
            )
            spent = time.perf_counter() - c0
        out["prepare_s"] = spent
        backend = make_backend({"NVA_LLM_BACKEND": "onnx", "NVA_LLM_MODEL_PATH": str(path)})
    elif option == "transformers":
        from tests.llm_server import model_cache_dir

        backend = make_backend(
            {"NVA_LLM_BACKEND": "transformers", "NVA_LLM_CACHE_DIR": str(model_cache_dir().parent)}
        )
        out["prepare_s"] = None
    else:
        from assistant.llm import LlmConfigError

        try:
            backend = make_backend({"NVA_LLM_BACKEND": "llama-cpp"})
        except LlmConfigError as exc:
            return {"option": option, "skipped": str(exc)[:200]}
        out["prepare_s"] = None
    from assistant.summary.warmup import warm_summary_model

    w0 = time.perf_counter()
    warm_summary_model(backend)
    out["warm_s"] = time.perf_counter() - w0
    out["load_total_s"] = time.perf_counter() - t0
    out["tokens_per_s"], out["first_token_s"] = _decode_speed(backend)
    out.update(_summaries(backend, views, timeout))
    if option in ("onnx-sequential", "onnx-batched"):
        out.update(_rows_speed(backend, views))
        # pairs of demo-ward patients opened at once; each pair against the same two alone (from _summaries)
        out["pairs"] = []
        for k in range(min(pairs, len(views) // 2)):
            both = _pair(backend, views[2 * k : 2 * k + 2], timeout)
            out["pairs"].append(
                {
                    "together": [t for t, _, _ in both],
                    "first_llm": [f for _, f, _ in both],
                    "llm_shown": [n for _, _, n in both],
                    "alone": out["totals"][2 * k : 2 * k + 2],
                    "llm_shown_alone": out["llm_shown"][2 * k : 2 * k + 2],
                }
            )
    out["concurrent"] = _concurrent(backend, views[:2], timeout)
    out["single"] = out["totals"][:2]
    out["peak_rss_mb"] = _peak_rss_mb()
    out["load_end"] = os.getloadavg()[0]
    return out


def _s(xs: list[float]) -> str:
    return f"{median(xs):.2f} s / {max(xs):.2f} s" if xs else "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--options", default=",".join(OPTIONS))
    ap.add_argument("--patients", type=int, default=0, help="demo-ward patients per option (0 = all)")
    ap.add_argument("--slow-patients", type=int, default=4, help="patients for the transformers option")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--out", default="docs/BENCHMARKS_summary.md")
    ap.add_argument("--pairs", type=int, default=6, help="pairs of patients opened at once (onnx-* options)")
    ap.add_argument(
        "--model-cache", help="folder holding (or to hold) the ONNX export (default: a temp folder)"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ward", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = worker(
            args.worker,
            Path(args.ward),
            args.patients or None,
            args.timeout,
            Path(args.work),
            args.model_cache,
            args.pairs,
        )
        sys.stdout.write("RESULT " + json.dumps(res) + "\n")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="nva-bench-llm-"))
    ward = tmp / "ward"
    generate_demo_ward(ward, anchor=_anchor(), seed=7)
    results: list[dict[str, Any]] = []
    for option in args.options.split(","):
        n = args.slow_patients if option.startswith("transformers") else args.patients
        cmd = [sys.executable, "-m", "bench.bench_llm_speed", "--worker", option, "--ward", str(ward)]
        cmd += ["--work", str(tmp), "--patients", str(n), "--timeout", str(args.timeout)]
        cmd += ["--pairs", str(args.pairs)] + (
            ["--model-cache", args.model_cache] if args.model_cache else []
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            results.append({"option": option, "skipped": f"worker failed: {proc.stderr[-300:]}"})
        else:
            results.append(json.loads(line[7:]))
        sys.stderr.write(f"{option}: {results[-1]}\n")
    shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    compared = [r for r in results if r["option"] in ("onnx-sequential", "onnx-batched")]
    others = [r for r in results if r not in compared]
    text, section = (render_batched(compared), BATCH_SECTION) if compared else (render(others), SECTION)
    if compared and others:
        text += render(others)
    out = Path(args.out)
    doc = out.read_text(encoding="utf-8") if out.is_file() else ""
    # this script's section replaces its previous run; the rest of the page (bench_summary's) stays
    start = doc.find(section)
    if start >= 0:
        end = doc.find("\n## ", start + len(section))
        doc = doc[:start].rstrip("\n") + (doc[end:] if end >= 0 else "")
    out.write_text(doc.rstrip("\n") + "\n" + text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


def _survival(r: dict[str, Any]) -> str:
    return f"{r['llm_verified']}/{r['llm_written']} ({r['llm_verified'] / max(1, r['llm_written']):.0%})"


def render_batched(results: list[dict[str, Any]]) -> str:
    """Sequential cached engine vs the batched scheduler, same run, same patients."""
    rows, notes = [], []
    for r in results:
        if "skipped" in r:
            notes.append(f"{r['option']}: not run ({r['skipped']})")
            continue
        ratios = [max(p["together"]) / (sum(p["alone"]) / 2) for p in r["pairs"] if p["alone"]]
        firsts2 = [f for p in r["pairs"] for f in p["first_llm"] if f is not None]
        shown2 = [n for p in r["pairs"] for n in p.get("llm_shown", [])]
        shown1 = [n for p in r["pairs"] for n in p.get("llm_shown_alone", [])]
        rows.append(
            [
                r["option"],
                f"{r['tokens_per_s']:.1f}",
                f"{r['rows_tokens'] / r['rows_wall_s']:.1f}" if r.get("rows_wall_s") else "n/a",
                _s(r["first_llm"]),
                _s(r["totals"]),
                f"{median(ratios):.2f}x / {max(ratios):.2f}x ({len(ratios)} pairs)" if ratios else "n/a",
                _s(firsts2),
                f"{median(shown1):g} / {median(shown2):g}" if shown2 else "n/a",
                _survival(r),
                f"{r['synopsis_llm_patients']}/{r['patients']}",
                f"{r['peak_rss_mb']:.0f} MB",
            ]
        )
        notes.append(
            f"{r['option']}: {r['patients']} patients; load + warm-up {r['load_total_s']:.1f} s "
            f"(warm-up {r['warm_s']:.1f} s); load average at its end {r.get('load_end', float('nan')):.1f}"
        )
    headers = [
        "engine",
        "decode tokens/s (one prompt)",
        "tokens/s, a patient's per-fact prompts together",
        "first verified model sentence (median / max)",
        "whole summary incl. synopsis (median / max)",
        "two patients at once: slower / same two alone (median / max)",
        "first verified sentence, two at once (median / max)",
        "model sentences shown per patient, alone / two at once (median)",
        "model sentences verified",
        "synopsis model-written",
        "peak RSS",
    ]
    return "\n".join(
        [
            "",
            BATCH_SECTION,
            "",
            f"Run {stamp()}. Load average at the end: {os.getloadavg()[0]:.1f} (shared machine: figures move with "
            "the load). Dashboard path (`pipeline.summary_stream`, flags in their own column), demo ward seed 7, "
            "greedy, model warmed at start. Each engine in its own process, same patients. Targets: first verified "
            "model sentence <= 1 s, whole summary <= 5 s, two patients at once <= 1.5x one.",
            "",
            table(headers, rows),
            "",
            *[f"- {n}" for n in notes],
            "",
            "Reproduce: `.venv/bin/python -m bench.bench_llm_speed` (`--patients`, `--pairs`, `--model-cache DIR` "
            "to reuse an export; `--options onnx-int8,onnx-int4,transformers,...` for the older side-by-side).",
            "",
        ]
    )


def render(results: list[dict[str, Any]]) -> str:
    rows = []
    notes = []
    for r in results:
        name = r["option"]
        if "skipped" in r:
            notes.append(f"{name}: not run ({r['skipped']})")
            continue
        if name == "transformers-batched":
            tot = r["batch_totals"]
            tps = r["batch_tokens"] / sum(tot) if tot else 0
            rows.append(
                [
                    name,
                    f"{tps:.1f} (all rows)",
                    "n/a (whole batch at once)",
                    _s(tot),
                    "n/a",
                    "n/a",
                    f"{r['peak_rss_mb']:.0f} MB",
                    "n/a",
                ]
            )
            continue
        single = r["single"]
        conc = r["concurrent"]
        ratio = max(conc) / median(single) if single else float("nan")
        rows.append(
            [
                name,
                f"{r['tokens_per_s']:.1f}",
                _s(r["first_llm"]),
                _s(r["totals"]),
                f"{max(conc):.2f} s ({ratio:.2f}x one)",
                f"{r['synopsis_llm_patients']}/{r['patients']}",
                f"{r['peak_rss_mb']:.0f} MB",
                f"{r['prepare_s']:.0f} s" if r.get("prepare_s") else "none",
            ]
        )
        notes.append(
            f"{name}: {r['patients']} patients; model sentences verified {r['llm_verified']}/{r['llm_written']}; "
            f"load + warm-up {r['load_total_s']:.1f} s (warm-up {r['warm_s']:.1f} s); first token {r['first_token_s']:.2f} s"
        )
    headers = [
        "option",
        "tokens/s (decode, per-fact prompt)",
        "first verified model sentence (median / max)",
        "whole summary (median / max)",
        "two patients at once (slower one)",
        "synopsis model-written (verified)",
        "peak RSS",
        "first-run preparation",
    ]
    return "\n".join(
        [
            "",
            SECTION,
            "",
            f"Run {stamp()}. Load average at the end: {os.getloadavg()[0]:.1f} (shared machine: figures move with "
            "the load). Dashboard path (`pipeline.summary_stream`, flags in their own column), demo ward seed 7, "
            "greedy, model warmed at start (`warm_summary_model`). Targets: first verified model sentence <= 1 s, "
            "whole summary <= 5 s, two patients at once <= 1.5x one.",
            "",
            table(headers, rows),
            "",
            *[f"- {n}" for n in notes],
            "",
            "Reproduce: `.venv/bin/python -m bench.bench_llm_speed` (options: `--options`, `--patients`).",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())

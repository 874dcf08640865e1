"""Summaries on the demo ward per backend: verified share, unsupported claims shown, coverage, latency, tokens/s."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from assistant import pipeline  # noqa: E402
from assistant.demo_ward import generate_demo_ward  # noqa: E402
from assistant.summary.verifier import Verifier  # noqa: E402
from bench.common import median, patient_views, stamp, table  # noqa: E402
from connectors import open_source  # noqa: E402

ANCHOR = datetime(2026, 3, 16, 7, 0, tzinfo=UTC)


@dataclass
class Row:
    backend: str
    patients: int = 0
    llm_sentences: int = 0
    llm_verified: int = 0
    llm_shown: int = 0
    unsupported_shown: int = 0
    must_total: int = 0
    must_covered: int = 0
    high_flags: int = 0
    high_covered: int = 0
    totals: list[float] = field(default_factory=list)
    firsts: list[float] = field(default_factory=list)  # first displayed sentence
    first_llm: list[float] = field(default_factory=list)
    tps: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def cells(self) -> list[object]:
        return [
            self.backend,
            self.patients,
            pct(self.llm_verified, self.llm_sentences) if self.llm_sentences else "n/a",
            self.llm_shown,
            self.unsupported_shown,
            pct(self.high_covered, self.high_flags),
            pct(self.must_covered, self.must_total),
            ms(self.firsts),
            s(self.first_llm),
            s(self.totals) if self.backend != "template" else ms(self.totals),
            f"{median(self.tps):.1f}" if self.tps else "n/a",
        ]


def pct(a: int, b: int) -> str:
    return f"{100 * a / b:.0f} % ({a}/{b})" if b else "n/a"


def ms(xs: list[float]) -> str:
    return f"{median(xs) * 1000:.0f} ms / {max(xs) * 1000:.0f} ms" if xs else "n/a"


def s(xs: list[float]) -> str:
    return f"{median(xs):.2f} s / {max(xs):.2f} s" if xs else "n/a"


def run(
    backend_name: str, backend: Any, views: list, max_tokens: int, timeout: float, mode: str = "auto"
) -> Row:
    row = Row(backend_name)
    for view in views:
        findings = view.findings  # the pipeline's flags (catalogue + NEWS2), as the CLI and dashboard use
        t0 = time.perf_counter()
        stream = pipeline.summary_stream(  # stand-alone, as `nva summarize`: flags included
            view, backend, (), max_tokens=max_tokens, timeout=timeout, mode=mode, include_flags=True
        )
        for _ in stream:
            pass
        total = time.perf_counter() - t0
        res = stream.result
        row.patients += 1
        row.totals.append(total)
        if res.first_sentence_s is not None:
            row.firsts.append(res.first_sentence_s)
        if res.first_llm_sentence_s is not None:
            row.first_llm.append(res.first_llm_sentence_s)
        if res.tokens_per_s:
            row.tps.append(res.tokens_per_s)
        row.completion_tokens += res.completion_tokens or 0
        if res.prompt_tokens:
            row.prompt_tokens.append(res.prompt_tokens)
        for d in res.dropped:
            if d.origin == "llm" and d.reason:
                key = d.reason.split(":")[0].split("'")[0].strip()
                row.reasons[key] = row.reasons.get(key, 0) + 1
        row.failures += [n for n in res.notes if "unavailable" in n]
        llm = res.llm_sentences()
        row.llm_sentences += len(llm)
        row.llm_verified += sum(1 for s in llm if s.verified)
        row.llm_shown += sum(1 for s in res.sentences if s.origin == "llm")
        check = Verifier(res.facts)  # an independent re-check of everything displayed
        row.unsupported_shown += sum(
            1 for s in res.sentences if not s.verified or not check.verify(s.raw).verified
        )
        shown = {t for s in res.sentences if s.verified for t in s.tags}
        must = res.facts.must_cover()
        row.must_total += len(must)
        row.must_covered += sum(1 for f in must if f.tag in shown)
        high = [f for f in res.facts.facts if f.kind == "flag" and f.severity == "high"]
        assert len(high) == sum(f.severity == "high" for f in findings)
        row.high_flags += len(high)
        row.high_covered += sum(1 for f in high if f.tag in shown)
    return row


def _SPEED_PROMPT() -> list:  # noqa: N802 - a constant built lazily
    from assistant.llm import ChatMessage

    return [
        ChatMessage("system", "You write short nursing summaries."),
        ChatMessage(
            "user",
            "Summarize in three sentences: potassium 5.9 mmol/L at 05:00, rising from 4.6; "
            "potassium chloride 20 mEq PO twice daily is ordered; enoxaparin 40 mg SC daily.",
        ),
    ]


def speed_side_by_side(transformers_backend: Any, llama_backend: Any, runs: int = 3) -> str:
    """Same prompt, same GGUF weights, greedy, 64 new tokens: decode speed of the two in-process backends."""
    out = {}
    for name, backend in (("transformers", transformers_backend), ("llama-cpp", llama_backend)):
        speeds, firsts = [], []
        for _ in range(runs):
            stream = backend.stream(_SPEED_PROMPT(), max_tokens=64, temperature=0.0)
            for _delta in stream:
                pass
            if stream.result.tokens_per_s:
                speeds.append(stream.result.tokens_per_s)
            if stream.result.first_token_s is not None:
                firsts.append(stream.result.first_token_s)
        out[name] = (median(speeds) if speeds else 0.0, median(firsts) if firsts else 0.0)
    ratio = out["llama-cpp"][0] / out["transformers"][0] if out["transformers"][0] else float("nan")
    return (
        f"side by side, same prompt and GGUF, {runs} runs each: transformers {out['transformers'][0]:.1f} "
        f"tokens/s (first token {out['transformers'][1]:.2f} s), llama-cpp {out['llama-cpp'][0]:.1f} tokens/s "
        f"(first token {out['llama-cpp'][1]:.2f} s): llama-cpp is {ratio:.1f}x faster"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--llm-patients", type=int, default=4, help="patients summarized with each LLM backend")
    ap.add_argument("--backends", default="template,onnx,transformers,llama-cpp,openai")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--out", default="docs/BENCHMARKS_summary.md")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="nva-bench-summary-"))
    generate_demo_ward(tmp, anchor=ANCHOR, seed=7)
    with open_source(tmp) as src:
        charts = patient_views(src, ANCHOR)
    # LLM subset: the patients with the most high-severity flags (hardest coverage), then by id
    ranked = sorted(charts, key=lambda v: (-sum(f.severity == "high" for f in v.findings), v.patient_id))
    subset = ranked[: args.llm_patients]
    rows: list[Row] = []
    notes: list[str] = []
    wanted = args.backends.split(",")
    if "template" in wanted:
        run(
            "template", None, charts[:2], args.max_tokens, args.timeout
        )  # warm-up: imports, vocab, terminology
        rows.append(run("template", None, charts, args.max_tokens, args.timeout))
    if "onnx" in wanted:
        from assistant.llm import make_backend
        from assistant.summary.warmup import warm_summary_model
        from tests.llm_server import model_cache_dir

        onnx = make_backend({"NVA_LLM_BACKEND": "onnx", "NVA_LLM_CACHE_DIR": str(model_cache_dir().parent)})
        t0 = time.perf_counter()
        warm_summary_model(onnx)
        notes.append(
            f"onnx: model load and warm-up {time.perf_counter() - t0:.1f} s (not counted in the latencies)"
        )
        rows.append(
            run(
                "onnx (SmolLM2-135M int8, ONNX Runtime, per-fact)",
                onnx,
                subset,
                args.max_tokens,
                args.timeout,
            )
        )
    if "transformers" in wanted:
        from assistant.llm import make_backend
        from tests.llm_server import model_cache_dir

        backend = make_backend(
            {"NVA_LLM_BACKEND": "transformers", "NVA_LLM_CACHE_DIR": str(model_cache_dir().parent)}
        )
        t0 = time.perf_counter()
        backend.load()  # type: ignore[attr-defined]
        notes.append(
            f"transformers: model load {time.perf_counter() - t0:.1f} s (not counted in the latencies)"
        )
        rows.append(
            run(
                "transformers (SmolLM2-135M, in-process, per-fact)",
                backend,
                subset,
                args.max_tokens,
                args.timeout,
            )
        )
        rows.append(
            run(
                "transformers (SmolLM2-135M, in-process, whole sheet)",
                backend,
                subset,
                args.max_tokens,
                args.timeout,
                mode="sheet",
            )
        )
        transformers_backend = backend
    else:
        transformers_backend = None
    if "llama-cpp" in wanted:
        from assistant.llm import LlmConfigError, make_backend

        try:
            llama = make_backend({"NVA_LLM_BACKEND": "llama-cpp"})
            llama.chat(_SPEED_PROMPT(), max_tokens=4)  # loads the model
        except LlmConfigError as exc:
            notes.append(f"llama-cpp: not run ({str(exc)[:160]})")
        else:
            rows.append(
                run(
                    "llama-cpp (same GGUF, in-process, per-fact)",
                    llama,
                    subset,
                    args.max_tokens,
                    args.timeout,
                )
            )
            if transformers_backend is not None:
                notes.append(speed_side_by_side(transformers_backend, llama))
    if "openai" in wanted:
        try:
            from assistant.llm import make_backend
            from tests.llm_server import start_llm_server

            base_url, model, stop = start_llm_server()
        except Exception as exc:  # noqa: BLE001 -- the server is optional for the benchmark
            notes.append(f"openai via `transformers serve`: not run ({type(exc).__name__}: {str(exc)[:200]})")
        else:
            try:
                backend = make_backend(
                    {"NVA_LLM_BACKEND": "openai", "NVA_LLM_BASE_URL": base_url, "NVA_LLM_MODEL": model}
                )
                rows.append(
                    run(
                        "openai (`transformers serve`, SmolLM2-135M, whole sheet)",
                        backend,
                        subset,
                        args.max_tokens,
                        args.timeout,
                    )
                )
                rows.append(
                    run(
                        "openai (`transformers serve`, SmolLM2-135M, per-fact)",
                        backend,
                        subset,
                        args.max_tokens,
                        args.timeout,
                        mode="per-fact",
                    )
                )
            finally:
                stop()
    for r in rows:
        if r.prompt_tokens:
            notes.append(
                f"{r.backend}: prompt {int(median(r.prompt_tokens))} tokens (median), "
                f"{r.completion_tokens} completion tokens in all"
            )
        if r.reasons:
            top = sorted(r.reasons.items(), key=lambda kv: -kv[1])[:6]
            notes.append(
                f"{r.backend}: why LLM sentences were dropped: " + "; ".join(f"{k} ({n})" for k, n in top)
            )
        if r.failures:
            notes.append(
                f"{r.backend}: {len(r.failures)} LLM call(s) failed and fell back to the template: "
                f"{r.failures[0][:160]}"
            )
    headers = [
        "backend",
        "patients",
        "LLM sentences verified",
        "LLM sentences shown",
        "unsupported shown",
        "high flags covered",
        "high flags + critical values covered",
        "first sentence (median / max)",
        "first verified LLM sentence (median / max)",
        "whole summary (median / max)",
        "tokens/s (median)",
    ]
    doc = [
        "# Summary benchmark",
        "",
        f"Run {stamp()}. Load average at the end: {os.getloadavg()[0]:.1f} "
        "(the machine is shared with other contributors; LLM figures move with the load).",
        "",
        f"Demo ward (`generate_demo_ward`, anchor {ANCHOR.isoformat()}, seed 7): {len(charts)} patients. "
        f"Template composer on all of them; LLM backends on the {len(subset)} patients with the most "
        f"high-severity flags ({', '.join(c.patient_ref for c in subset)}), max_tokens {args.max_tokens}, "
        f"timeout {args.timeout:g} s, greedy decoding.",
        "",
        table(headers, [r.cells() for r in rows]),
        "",
        "- *LLM sentences verified*: share of the sentences the LLM wrote that passed the verifier (a copy of the "
        "prompt's worked example counts as failed).",
        "- *unsupported shown*: displayed sentences that are unverified or fail an independent re-check (target 0).",
        "- *first sentence*: the template flag sentences are shown before the LLM starts; *first verified LLM "
        "sentence* is when the first LLM sentence passed the verifier (n/a when none did).",
        "- Targets on this 2-core machine: template <= 200 ms per patient; embedded model first verified "
        "sentence <= 3 s, whole summary <= 20 s.",
        "",
        *[f"- {n}" for n in notes],
        "",
        "Reproduce: `.venv/bin/python -m bench.bench_summary` (options: `--llm-patients`, `--backends`, "
        "`--max-tokens`).",
        "",
    ]
    text = "\n".join(doc)
    Path(args.out).write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

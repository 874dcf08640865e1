"""Batched in-process generation: every row reaches only its own caller, early stops and failures stay local."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from assistant.llm import ChatMessage, LlmError, LlmTimeout
from assistant.llm.batching import LEAD_REQUESTS
from assistant.llm.fake import BatchingFakeBackend, ScriptedBackend

NOW = datetime(2026, 3, 16, 7, 0, tzinfo=UTC)


def _prompt(text: str) -> list[ChatMessage]:
    return [ChatMessage("user", text)]


def _echo(messages: list[ChatMessage]) -> str:
    """Answers with the prompt's own words, so a row that reached another caller shows."""
    return f"answer to {messages[-1].content} ends here."


# --- the scheduler with a scripted model (no weights) -----------------------------------------------


def test_concurrent_callers_each_get_only_their_own_rows():
    backend = BatchingFakeBackend(_echo, step_s=0.002)
    results: dict[tuple[int, int], str] = {}

    def caller(c: int) -> None:
        streams = backend.stream_many([_prompt(f"caller {c} request {i}") for i in range(6)], max_tokens=50)
        for i, s in enumerate(streams):
            results[(c, i)] = s.collect().text

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 18
    for (c, i), text in results.items():
        assert text == f"answer to caller {c} request {i} ends here."
    assert backend.engine.widest > 3  # rows of different callers shared decode steps
    backend.close()


def test_a_callers_first_requests_run_first_then_callers_take_turns():
    backend = BatchingFakeBackend(_echo, step_s=0.003)
    firsts: dict[str, float] = {}
    lasts: dict[str, float] = {}

    def caller(name: str) -> None:
        streams = backend.stream_many([_prompt(f"{name}{i}") for i in range(5)], max_tokens=50)
        for i, s in enumerate(streams):
            for _ in s:
                firsts.setdefault(f"{name}{i}", time.perf_counter())
            lasts[f"{name}{i}"] = time.perf_counter()

    a = threading.Thread(target=caller, args=("a",))
    b = threading.Thread(target=caller, args=("b",))
    a.start()
    time.sleep(0.01)
    b.start()
    a.join(30)
    b.join(30)
    # each caller's first answers (LEAD_REQUESTS of them) run before its other requests start ...
    for name in ("a", "b"):
        lead = max(lasts[f"{name}{i}"] for i in range(LEAD_REQUESTS))
        assert lead <= min(firsts[f"{name}{i}"] for i in range(LEAD_REQUESTS, 5))
    # ... and the second caller's first answer does not wait for the first caller's whole batch
    assert lasts["b0"] < max(lasts[f"a{i}"] for i in range(5))
    backend.close()


def test_after_its_first_answers_a_callers_other_requests_decode_together():
    """One patient alone: once its first answers are done, all its other prompts share decode steps (they ran
    one after another when the scheduler waited for each to finish: 8.5 s instead of 6 s a summary)."""
    backend = BatchingFakeBackend(_echo, step_s=0.002)
    words = " ".join(f"w{i}" for i in range(20))
    streams = backend.stream_many([_prompt(f"r{i} {words}") for i in range(8)], max_tokens=50)
    assert [s.collect().text for s in streams] == [f"answer to r{i} {words} ends here." for i in range(8)]
    assert backend.engine.widest == 8 - LEAD_REQUESTS
    assert backend.engine.idles >= 1  # the batch emptied at the end (its buffers offered back to the model)
    backend.close()


def test_closing_one_stream_stops_only_that_row():
    backend = BatchingFakeBackend(_echo, step_s=0.005)
    long = _prompt(" ".join(f"w{i}" for i in range(40)))
    streams = backend.stream_many([long, _prompt("kept one"), _prompt("kept two")], max_tokens=200)
    first = next(streams[0])
    streams[0].close()
    assert first and not streams[0].done
    assert streams[1].collect().text == "answer to kept one ends here."
    assert streams[2].collect().text == "answer to kept two ends here."
    # the closed row left the batch: a new request is still answered
    assert backend.stream(_prompt("after"), max_tokens=50).collect().text == "answer to after ends here."
    backend.close()


def test_a_timed_out_request_fails_alone():
    backend = BatchingFakeBackend(_echo, step_s=0.01)
    slow = backend.stream(_prompt(" ".join(f"w{i}" for i in range(60))), max_tokens=500, timeout=0.15)
    others = backend.stream_many([_prompt("one"), _prompt("two")], max_tokens=50, timeout=30)
    with pytest.raises(LlmTimeout):
        slow.collect()
    assert [s.collect().text for s in others] == ["answer to one ends here.", "answer to two ends here."]
    backend.close()


def test_stop_pattern_ends_a_row_and_the_result_says_so():
    backend = BatchingFakeBackend(lambda m: "First one. Second one. Third.")
    (s,) = backend.stream_many([_prompt("x")], max_tokens=50, stop=r"[.!?]\s")
    assert s.collect().text == "First one. " and s.result.finish_reason == "stop"
    capped = backend.stream(_prompt("y"), max_tokens=2).collect()
    assert capped.text == "First one. " and capped.finish_reason == "length"
    backend.close()


def test_an_engine_error_fails_the_rows_of_that_step_and_the_next_requests_are_served():
    backend = BatchingFakeBackend(_echo, step_s=0.002)
    backend.engine.fail_steps = 1
    streams = backend.stream_many([_prompt("a"), _prompt("b")], max_tokens=50)
    with pytest.raises(LlmError):
        streams[0].collect()
    assert backend.stream(_prompt("c"), max_tokens=50).collect().text == "answer to c ends here."
    # a request whose pre-fill fails fails alone
    bad = BatchingFakeBackend([RuntimeError("bad prompt"), "fine then."])
    broken, fine = bad.stream_many([_prompt("p"), _prompt("q")], max_tokens=50)
    with pytest.raises(LlmError, match="RuntimeError"):
        broken.collect()
    assert fine.collect().text == "fine then."
    backend.close()
    bad.close()


def test_sampled_rows_stay_within_their_own_answer():
    backend = BatchingFakeBackend(_echo)
    text = backend.stream(_prompt("hot"), max_tokens=50, temperature=0.7).collect().text
    assert text == "answer to hot ends here."  # peaked logits: sampling can only pick the row's own word
    backend.close()


def test_default_stream_many_starts_each_call_only_when_read():
    scripted = ScriptedBackend(["One. Two.", "Three. Four."])
    streams = scripted.stream_many([_prompt("a"), _prompt("b")], max_tokens=9, stop=r"[.!?]\s")
    assert scripted.calls == []
    assert streams[0].collect().text == "One. "
    assert len(scripted.calls) == 1 and scripted.calls[0][1]["max_tokens"] == 9
    streams[1].close()
    assert len(scripted.calls) == 1  # never read, never asked


# --- the composer over the batching scheduler -------------------------------------------------------


def _answer(messages: list[ChatMessage]) -> str:
    """Per-fact: the fact's own words (verifies); synopsis: nothing usable (template synopsis)."""
    last = messages[-1].content
    if last.startswith("FACT: "):
        return last.removeprefix("FACT: ").split(" (")[0].rstrip(".") + ". Then it rambles on."
    return "Nothing to add here."


@pytest.fixture(scope="module")
def ward_charts(demo_ward_judged):
    return demo_ward_judged[:4]


def _summary(res) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(s.origin, s.text, tuple(s.citations)) for s in res.sentences]


def test_patients_opened_at_once_get_exactly_their_own_summaries(ward_charts):
    """Safety: concurrent summaries through one batched engine equal the same summaries made one at a time,
    except that a fact the busy engine skipped shows its template sentence (same fact, same citations)."""
    from assistant.summary.composer import compose, template_summary

    alone = [
        compose(c, f, backend=ScriptedBackend(_answer), now=NOW, mode="per-fact") for c, f in ward_charts
    ]
    assert all(any(s.origin == "llm" for s in r.sentences) for r in alone)
    backend = BatchingFakeBackend(_answer, step_s=0.002)
    together: dict[int, object] = {}

    def one(i: int) -> None:
        c, f = ward_charts[i]
        together[i] = compose(c, f, backend=backend, now=NOW, mode="per-fact")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ward_charts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert backend.engine.widest > 1
    for i in range(len(ward_charts)):
        res = together[i]
        assert res.patient == alone[i].patient
        plain = _summary(template_summary(*ward_charts[i], now=NOW))
        got, want = _summary(res), _summary(alone[i])
        assert len(got) == len(want) == len(plain)
        assert all(g in (w, p) and g[2] == w[2] for g, w, p in zip(got, want, plain, strict=True))
        skipped = sum(g != w for g, w in zip(got, want, strict=True))
        assert not skipped or any("busy with other patients" in n for n in res.notes)
        own = {ref for fact in res.facts.facts for ref in fact.provenance}
        others = {
            ref for j, r in enumerate(alone) if j != i for fact in r.facts.facts for ref in fact.provenance
        }
        cited = {
            cit for s in res.sentences for cit in s.citations if "/" in cit and not cit.startswith("rule:")
        }
        assert cited and cited <= own and not cited & (others - own)
        assert res.synopsis and res.synopsis_source == "template"
    assert backend.scheduler.shed > 0  # four patients at once: the engine skipped optional prompts
    backend.close()


def test_several_callers_at_once_skip_optional_requests_and_a_lone_caller_does_not():
    backend = BatchingFakeBackend(_echo, step_s=0.002)
    lone = backend.stream_many([_prompt(f"r{i}") for i in range(6)], max_tokens=50, optional=True)
    assert [s.collect().text for s in lone] == [f"answer to r{i} ends here." for i in range(6)]
    assert backend.scheduler.shed == 0
    got: dict[str, list] = {}
    started = threading.Barrier(2)

    def caller(name: str) -> None:
        started.wait()
        required = backend.stream_many([_prompt(f"{name}{i}") for i in range(2)], max_tokens=50)
        extra = backend.stream_many([_prompt(f"{name}x{i}") for i in range(4)], max_tokens=50, optional=True)
        got[name] = [s.collect() for s in required + extra]

    threads = [threading.Thread(target=caller, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name in ("a", "b"):
        required, extra = got[name][:2], got[name][2:]
        assert [r.text for r in required] == [f"answer to {name}{i} ends here." for i in range(2)]
        # an optional request is answered in full or not at all (never a partial or another row's text)
        for i, r in enumerate(extra):
            assert (r.text, r.finish_reason) in ((f"answer to {name}x{i} ends here.", "stop"), ("", "shed"))
    assert backend.scheduler.shed > 0
    backend.close()


def test_a_caller_that_just_finished_does_not_make_the_next_one_skip_requests():
    """Patients opened one after another: the previous summary's last row (closed while a step runs) is gone
    before the next caller's requests are judged, so nothing is skipped (23 of 199 model sentences were)."""
    backend = BatchingFakeBackend(_echo, step_s=0.05)
    (long,) = backend.stream_many([_prompt(" ".join(f"w{i}" for i in range(40)))], max_tokens=200)
    next(long)
    long.close()  # cancelled while the scheduler is inside a decode step
    after = backend.stream_many([_prompt(f"n{i}") for i in range(4)], max_tokens=50, optional=True)
    assert [s.collect().text for s in after] == [f"answer to n{i} ends here." for i in range(4)]
    assert backend.scheduler.shed == 0
    backend.close()


def test_an_engine_failure_mid_summary_ends_in_the_template_summary(ward_charts):
    from assistant.summary.composer import compose, template_summary

    chart, findings = ward_charts[0]
    backend = BatchingFakeBackend(_answer, step_s=0.002)
    backend.engine.fail_steps = 10_000  # every decode step fails
    res = compose(chart, findings, backend=backend, now=NOW, mode="per-fact")
    plain = template_summary(chart, findings, now=NOW)
    assert all(s.origin == "template" and s.verified for s in res.sentences)
    assert [s.text for s in res.sentences] == [s.text for s in plain.sentences]
    assert any("LLM unavailable" in n for n in res.notes)
    assert res.synopsis and res.synopsis_source == "template"
    backend.close()


def test_the_synopsis_is_submitted_with_the_per_fact_prompts(ward_charts):
    from assistant.summary.composer import SYNOPSIS_AFTER, compose

    chart, findings = ward_charts[0]
    backend = BatchingFakeBackend(_answer)
    compose(chart, findings, backend=backend, now=NOW, mode="per-fact")
    kinds = ["fact" if m[-1].content.startswith("FACT: ") else "synopsis" for m in backend.calls]
    # after the first facts (those run first), before the rest: its decode overlaps the body
    assert kinds.count("synopsis") == 1 and kinds.index("synopsis") == min(
        SYNOPSIS_AFTER, kinds.count("fact")
    )
    backend.close()


# --- the real model (needs the exported ONNX copy) ---------------------------------------------------


@pytest.fixture(scope="module")
def onnx_pair():
    from assistant.llm.config import LlmSettings
    from assistant.llm.onnx_backend import OnnxBackend, is_onnx_dir, onnx_copy_dir
    from assistant.llm.transformers_backend import default_gguf
    from tests.llm_server import model_cache_dir

    cache = model_cache_dir().parent
    if not is_onnx_dir(onnx_copy_dir(default_gguf(), cache)):
        pytest.skip(f"no ONNX export under {cache}: tests/test_llm.py or `make model` prepares it")
    settings = LlmSettings(backend="onnx", cache_dir=str(cache))
    return OnnxBackend(settings, batched=False), OnnxBackend(settings, batched=True)


FACTS = [
    "Potassium 5.9 mmol/L (high) at 2026-03-16 04:30",
    "Dose due: Metoprolol 25 mg PO twice daily due 2026-03-16 09:00",
    "Creatinine 1.40 mg/dL (high) at 2026-03-15 22:00",
    "Hemoglobin 9.1 g/dL (low) at 2026-03-16 04:30",
]


def _fact_prompts(facts: list[str]) -> list[list[ChatMessage]]:
    from assistant.summary.composer import build_fact_messages
    from assistant.summary.facts import Fact

    return [
        build_fact_messages(Fact(tag="F1", kind="result", label="x", text=t, provenance=())) for t in facts
    ]


@pytest.mark.slow
def test_batched_rows_give_the_sequential_greedy_text(onnx_pair):
    """Rows of different lengths (right-padded, own attention length each) and prompt families (per-fact and
    synopsis) in one batch: the same greedy text as one generation at a time."""
    from assistant.summary import synopsis
    from assistant.summary.composer import SENTENCE_END
    from assistant.summary.facts import Fact

    sequential, batched = onnx_pair
    syn = synopsis.build_messages([Fact(tag="F1", kind="result", label="x", text=FACTS[0], provenance=())])
    prompts = [*_fact_prompts(FACTS), syn]
    want = [sequential.chat(p, max_tokens=40).text for p in prompts]
    got = [s.collect().text for s in batched.stream_many(prompts, max_tokens=40)]
    assert got == want
    batched.chat(prompts[1], max_tokens=2)
    assert batched.engine().model.last_reused > 100  # a per-fact prompt found the shared prefix in the cache
    # Whatever family came first: with another prompt cached first that shares only the first tokens of the
    # per-fact system prompt, the per-fact family is still kept and found by the next per-fact prompt.
    system = prompts[1][0].content
    other = [
        ChatMessage("system", system[:60] + " Then answer in French. " * 20),
        ChatMessage("user", "Bonjour"),
    ]
    batched.engine().model.prefixes.clear()
    batched.chat(other, max_tokens=1)
    batched.chat(prompts[1], max_tokens=1)
    assert 16 <= batched.engine().model.last_reused < 60  # only the shared start was reused
    batched.chat(prompts[2], max_tokens=1)
    assert batched.engine().model.last_reused > 100
    stopped = [s.collect().text for s in batched.stream_many(prompts[:2], max_tokens=40, stop=SENTENCE_END)]
    assert all(w.startswith(s.strip()) for s, w in zip(stopped, want, strict=False))


@pytest.mark.slow
def test_two_callers_on_the_real_model_each_get_their_own_text(onnx_pair):
    sequential, batched = onnx_pair
    sets = [FACTS[:2], FACTS[2:]]
    want = [[sequential.chat(p, max_tokens=30).text for p in _fact_prompts(s)] for s in sets]
    got: dict[int, list[str]] = {}

    def caller(i: int) -> None:
        got[i] = [s.collect().text for s in batched.stream_many(_fact_prompts(sets[i]), max_tokens=30)]

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got == {0: want[0], 1: want[1]}


@pytest.mark.slow
def test_batch_buffers_are_made_at_warm_up_and_reused_by_the_next_summary(onnx_pair):
    """The first patient does not pay for allocating the key/value buffers (up to 0.8 s), nor does the next."""
    _, batched = onnx_pair
    batched.warm([_fact_prompts(FACTS[:1])[0]])
    model = batched.engine().model
    spare = model.spare
    assert spare is not None and spare.row_cap >= 8 and spare.cap >= 640
    for _ in range(2):
        texts = [s.collect().text for s in batched.stream_many(_fact_prompts(FACTS), max_tokens=12)]
        assert all(texts)
        assert model.spare is spare  # the same buffers came back when the batch emptied

"""Continuous batching for an in-process model: every caller's requests share decode steps, admitted round-robin."""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .base import (
    ChatMessage,
    ChatResult,
    ChatStream,
    Clock,
    LlmBackend,
    LlmError,
    LlmTimeout,
    check_messages,
    check_params,
    log_result,
)

log = logging.getLogger(__name__)

MAX_BATCH = 16  # rows decoded together; beyond this a 2-core CPU is compute-bound and rows only wait longer
ADMIT_PER_STEP = 2  # prompts pre-filled between two decode steps (pre-fill is the compute-bound part)
# A caller's first requests run before its others are admitted: the first verified sentence comes early even when
# the first answer fails verification (about 4 in 10 do with the embedded model), at little cost to the rest.
# 2 rather than 3: the third pre-fill delayed the first two rows (12 demo patients, same run: first verified
# sentence 0.77 s median with 2, 0.90 s with 3; whole summary 3.99 s vs 4.02 s).
LEAD_REQUESTS = 2


class BatchModel(Protocol):
    """What the scheduler needs from a model: one-row pre-fill, ragged batched decode steps, batch rebuilds."""

    eos: frozenset[int]

    def prefill(self, ids: list[int]) -> tuple[Any, np.ndarray]:
        """Feed one prompt; (this row's cache, logits of its last position)."""

    def merge(
        self, batch: Any | None, keep: Sequence[int], new: Sequence[Any], lengths: Sequence[int]
    ) -> Any:
        """A batch of the `keep` rows of `batch` followed by the `new` row caches; `lengths` are all rows'."""

    def step(self, batch: Any, tokens: Sequence[int], lengths: Sequence[int]) -> tuple[Any, np.ndarray]:
        """Feed one token per row (row b holds lengths[b] tokens before it); (batch, logits [rows, vocab])."""

    def idle(self, batch: Any) -> None:
        """The batch emptied; the model may keep its buffers for the next merge with no batch."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated token ids (special tokens left out)."""


@dataclass(eq=False)
class Request:
    """One completion: the caller reads `events` (("delta", text), then ("done", info) or ("error", exc))."""

    ids: list[int]
    max_tokens: int
    temperature: float
    deadline: float  # time.monotonic()
    group: Hashable  # requests of one caller (e.g. one patient's summary) share a turn in the round-robin
    stop: re.Pattern[str] | None = None
    optional: bool = False  # the caller has a fallback: answered with no text when several callers wait
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    reused: int = 0  # prompt tokens found in a cached prefix (tests and benchmarks read it)

    def cancel(self) -> None:
        """Stop generating for this request (the others go on)."""
        self.cancelled.set()


@dataclass(eq=False)
class _Row:
    req: Request
    length: int  # tokens in this row's cache
    next_token: int = -1  # chosen from the last logits, fed on the next step
    generated: list[int] = field(default_factory=list)
    text: str = ""
    first_token_s: float | None = None
    finish: str | None = None
    rng: np.random.Generator | None = None


@dataclass
class _Group:
    waiting: deque[Request] = field(default_factory=deque)
    active: int = 0
    finished: int = 0
    admitted: int = 0


def choose(logits: np.ndarray, temperature: float, rng: np.random.Generator | None) -> int:
    """Greedy (temperature 0) or top-50 sampling from one row's logits."""
    if temperature <= 0 or rng is None:
        return int(np.argmax(logits))
    k = min(50, logits.shape[-1])
    top = np.argpartition(logits, -k)[-k:]
    z = logits[top].astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(top[rng.choice(len(top), p=p / p.sum())])


class BatchScheduler:
    """One thread owns the model: it pre-fills new requests (round-robin across groups) and decodes all active
    rows together, one token per row per step. Each row streams only to its own request's queue.

    A group's first `lead` requests run before its others are admitted (until all of them finished), so every
    caller gets its first sentences early; the rest of its requests then join the shared batch. Finished, cancelled and timed-out rows leave the batch at
    once; an error in a shared step fails the rows in that step (their callers fall back), not the scheduler.
    """

    def __init__(
        self,
        model: BatchModel,
        *,
        max_batch: int = MAX_BATCH,
        admit_per_step: int = ADMIT_PER_STEP,
        lead: int = LEAD_REQUESTS,
        name: str = "llm-batch",
    ) -> None:
        self.model = model
        self.lead = lead
        self.max_batch = max_batch
        self.admit_per_step = admit_per_step
        self.name = name
        self._inbox: deque[Request] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode steps run (benchmarks read it)
        self.max_rows = 0  # widest batch seen
        self.shed = 0  # optional requests answered with no text because several callers waited

    def submit(
        self,
        ids: list[int],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        timeout: float,
        group: Hashable | None = None,
        stop: str | re.Pattern[str] | None = None,
        optional: bool = False,
    ) -> Request:
        req = Request(
            ids=list(ids),
            max_tokens=max_tokens,
            temperature=temperature,
            deadline=time.monotonic() + timeout,
            group=group if group is not None else object(),
            stop=re.compile(stop) if isinstance(stop, str) else stop,
            optional=optional,
        )
        with self._cv:
            if self._closed:
                raise LlmError("local model was shut down: restart the app")
            self._inbox.append(req)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cv.notify()
        return req

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    # --- the scheduler thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        groups: OrderedDict[Hashable, _Group] = OrderedDict()
        active: list[_Row] = []
        batch: Any = None
        while True:
            with self._cv:
                while not self._inbox and not active and not any(g.waiting for g in groups.values()):
                    if self._closed:
                        return
                    self._cv.wait(timeout=5.0)
                while self._inbox:
                    req = self._inbox.popleft()
                    groups.setdefault(req.group, _Group()).waiting.append(req)
                closed = self._closed
            if closed:
                for row in active:
                    self._fail(row.req, LlmError("local model was shut down: restart the app"))
                for g in groups.values():
                    for req in g.waiting:
                        self._fail(req, LlmError("local model was shut down: restart the app"))
                return
            self._expire_waiting(groups)
            keep = [i for i, row in enumerate(active) if self._still_wanted(row)]
            for i, row in enumerate(active):
                if i not in keep:  # before admitting: a finished caller no longer counts as waiting (_shed)
                    self._release(groups, row)
            new = self._admit(groups, len(keep))
            rows = [active[i] for i in keep] + [r for r, _ in new]
            if len(keep) != len(active) or new:
                try:
                    batch = (
                        self.model.merge(batch, keep, [c for _, c in new], [r.length for r in rows])
                        if rows
                        else self.model.idle(batch)  # None: the model may keep the buffers for the next rows
                    )
                except Exception as exc:  # noqa: BLE001 -- fail these rows, keep serving
                    self._fail_all(groups, rows, exc)
                    active, batch = [], None
                    continue
            active = rows
            self.max_rows = max(self.max_rows, len(active))
            if not active:
                continue
            try:
                batch, logits = self.model.step(
                    batch, [r.next_token for r in active], [r.length for r in active]
                )
            except Exception as exc:  # noqa: BLE001 -- fail the rows of this step, keep serving the next ones
                self._fail_all(groups, active, exc)
                active, batch = [], None
                continue
            self.steps += 1
            for i, row in enumerate(active):
                row.length += 1
                self._emit(row, choose(logits[i], row.req.temperature, row.rng))

    def _expire_waiting(self, groups: OrderedDict[Hashable, _Group]) -> None:
        now = time.monotonic()
        for g in groups.values():
            for req in list(g.waiting):
                if req.cancelled.is_set():
                    g.waiting.remove(req)
                elif now > req.deadline:
                    g.waiting.remove(req)
                    self._fail(req, _timeout("waited"))
        for key in [k for k, g in groups.items() if not g.waiting and not g.active]:
            del groups[key]

    def _still_wanted(self, row: _Row) -> bool:
        if row.finish is not None:
            return False
        if row.req.cancelled.is_set():
            row.finish = "cancelled"
            return False
        if time.monotonic() > row.req.deadline:
            row.finish = "timeout"
            self._fail(row.req, _timeout("generating"))
            return False
        return True

    def _release(self, groups: OrderedDict[Hashable, _Group], row: _Row) -> None:
        g = groups.get(row.req.group)
        if g is not None:
            g.active -= 1
            g.finished += 1

    def _shed(self, groups: OrderedDict[Hashable, _Group]) -> None:
        """Several callers at once: answer their optional waiting requests with no text, so each caller's
        work shrinks to its first answers and its required requests (on 2 cores, two patients' full work would
        take twice as long as one's; an optional answer's caller shows its template sentence instead)."""
        if sum(1 for g in groups.values() if g.waiting or g.active) < 2:
            return
        for g in groups.values():
            for req in [r for r in g.waiting if r.optional]:
                g.waiting.remove(req)
                self.shed += 1
                _finish(req, "shed", completion_tokens=0, first_token_s=None)

    def _admit(self, groups: OrderedDict[Hashable, _Group], busy: int) -> list[tuple[_Row, Any]]:
        """Pre-fill up to `admit_per_step` waiting requests, one group at a time in turn."""
        self._shed(groups)
        out: list[tuple[_Row, Any]] = []
        while len(out) < self.admit_per_step and busy + len(out) < self.max_batch:
            pick = next(
                (
                    k
                    for k, g in groups.items()
                    # a group's lead goes first and alone: pre-filling others would stall its decode steps
                    if g.waiting and (g.admitted < self.lead or g.finished >= min(self.lead, g.admitted))
                ),
                None,
            )
            if pick is None:
                break
            g = groups[pick]
            groups.move_to_end(pick)  # round-robin: this group goes to the back of the line
            req = g.waiting.popleft()
            if req.cancelled.is_set():
                continue
            try:
                cache, logits = self.model.prefill(req.ids)
                req.reused = int(getattr(self.model, "last_reused", 0))
            except Exception as exc:  # noqa: BLE001 -- this request fails, the others go on
                self._fail(req, _as_llm_error(exc))
                continue
            g.admitted += 1
            row = _Row(req, length=len(req.ids))
            if req.temperature > 0:
                row.rng = np.random.default_rng()
            g.active += 1
            self._emit(row, choose(logits, req.temperature, row.rng))
            if row.finish is None:
                out.append((row, cache))
            else:
                g.active -= 1
                g.finished += 1
        return out

    def _emit(self, row: _Row, token: int) -> None:
        """Hand one generated token to the row's own request; mark the row finished when it is."""
        req = row.req
        if row.first_token_s is None:
            row.first_token_s = time.perf_counter() - req.submitted
        if token in self.model.eos:
            self._done(row, "stop", eos=True)
            return
        row.generated.append(token)
        text = self.model.decode(row.generated)
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")  # an incomplete multi-byte character: wait for the rest
        if len(text) > len(row.text) and text.startswith(row.text):
            req.events.put(("delta", text[len(row.text) :]))
            row.text = text
        row.next_token = token
        if req.stop is not None and req.stop.search(row.text):
            self._done(row, "stop")
        elif len(row.generated) >= req.max_tokens:
            self._done(row, "length")

    def _done(self, row: _Row, reason: str, eos: bool = False) -> None:
        row.finish = reason
        _finish(
            row.req,
            reason,
            completion_tokens=len(row.generated) + (1 if eos else 0),
            first_token_s=row.first_token_s,
        )

    def _fail(self, req: Request, exc: BaseException) -> None:
        req.events.put(("error", exc))

    def _fail_all(self, groups: OrderedDict[Hashable, _Group], rows: list[_Row], exc: BaseException) -> None:
        log.warning("batched local generation failed (%s); %d rows fall back", type(exc).__name__, len(rows))
        err = _as_llm_error(exc)
        for row in rows:
            if row.finish is None:
                row.finish = "error"
                self._fail(row.req, err)
            self._release(groups, row)


def _finish(req: Request, reason: str, *, completion_tokens: int, first_token_s: float | None) -> None:
    """Tell the request's reader it is done (read_events returns this info)."""
    req.events.put(
        (
            "done",
            {
                "prompt_tokens": len(req.ids),
                "completion_tokens": completion_tokens,
                "finish_reason": reason,
                "first_token_s": first_token_s,
                "reused": req.reused,
            },
        )
    )


def _timeout(where: str) -> LlmTimeout:
    return LlmTimeout(
        f"local model did not finish in time ({where}): raise NVA_LLM_TIMEOUT, or fewer patients at once"
    )


def _as_llm_error(exc: BaseException) -> LlmError:
    if isinstance(exc, LlmError):
        return exc
    err = LlmError(f"local batched generation failed ({type(exc).__name__}): check the model files")
    err.__cause__ = exc
    return err


def read_events(req: Request) -> Generator[str, None, dict[str, Any]]:
    """A request's text deltas; returns the "done" info. Closing it early cancels the request (only this one)."""
    try:
        while True:
            left = req.deadline - time.monotonic()
            try:
                kind, value = req.events.get(timeout=max(0.01, left + 1.0))
            except queue.Empty:
                raise _timeout("no answer from the scheduler") from None
            if kind == "delta":
                yield value
            elif kind == "done":
                return value
            else:
                raise value
    finally:
        req.cancel()  # a no-op once done; stops generation when the caller closes early


def submit_streams(
    backend: LlmBackend,
    scheduler: BatchScheduler,
    encode: Callable[[list[ChatMessage]], list[int]],
    requests: Sequence[Sequence[ChatMessage]],
    *,
    max_tokens: int,
    temperature: float,
    timeout: float,
    stop: str | None,
    group: Hashable | None,
    optional: bool = False,
    schema_asked: bool = False,
) -> list[ChatStream]:
    """Submit every request now (one group: one caller's turn in the round-robin); one ChatStream each."""
    check_params(max_tokens, temperature)
    checked = [check_messages(m) for m in requests]
    group = group if group is not None else object()
    streams = []
    for msgs in checked:
        clock = Clock()
        req = scheduler.submit(
            encode(msgs),
            max_tokens=max_tokens,
            temperature=temperature,
            timeout=timeout,
            group=group,
            stop=stop,
            optional=optional,
        )
        streams.append(ChatStream(_read(backend, req, clock, schema_asked)))
    return streams


def _read(
    backend: LlmBackend, req: Request, clock: Clock, schema_asked: bool
) -> Generator[str, None, ChatResult]:
    parts: list[str] = []
    events = read_events(req)
    try:
        while True:
            try:
                delta = next(events)
            except StopIteration as stop:
                info = stop.value
                break
            clock.mark_first()
            parts.append(delta)
            yield delta
    finally:
        events.close()
    result = ChatResult(
        text="".join(parts),
        model=backend.model,
        backend=backend.name,
        prompt_tokens=info["prompt_tokens"],
        completion_tokens=info["completion_tokens"],
        latency_s=clock.elapsed(),
        first_token_s=clock.first,
        finish_reason=info["finish_reason"],
        schema_fallback=schema_asked,
    )
    log_result(result)
    return result

"""In-process backend on ONNX Runtime GenAI: the packaged SmolLM2 GGUF exported once to int8 ONNX, prefix-cached."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import (
    DEFAULT_MAX_TOKENS,
    ChatMessage,
    ChatResult,
    ChatStream,
    Clock,
    LlmBackend,
    LlmConfigError,
    LlmError,
    LlmTimeout,
    check_messages,
    check_params,
    log_result,
)
from .config import LlmSettings
from .transformers_backend import ModelSource, export_hf_folder, hf_copy_dir, resolve_model_source

log = logging.getLogger(__name__)

# int8 weight-only quantization keeps the greedy output of the fp32 model on the demo prompts; int4 re-quantization
# of the Q4_1 GGUF weights garbles it (docs/BENCHMARKS_summary.md, speed options).
PRECISION = "int8"
EXPORT_FORMAT = 1  # bump when the export recipe changes, so an old copy is not reused
SLOT_TOKENS = 1024  # KV capacity of one cached generator (~47 MB for SmolLM2-135M)
MAX_SLOTS = 3  # prompt families kept warm at once: per-fact, synopsis, one more
BUILD_TIMEOUT_S = 900.0
KV_HEADROOM = 128  # free positions per row when a batch buffer is (re)built (>= a synopsis' 120 new tokens)
# One patient's summary decodes up to 8 rows (a synopsis and per-fact prompts) of up to ~640 positions (the
# synopsis prompt is ~620 tokens): buffers of that size (~280 MB for SmolLM2-135M) are made at warm-up and kept.
RESERVE_ROWS, RESERVE_POSITIONS = 8, 640
# An emptied batch keeps buffers up to this size for the next summary (no re-allocation); larger ones are freed.
IDLE_KEEP_BYTES = 320 << 20
SAME_PREFIX_MIN = 16  # fewer shared tokens than this: a different prompt family, take a free slot if any
# A batched pre-fill sharing less than this part of its prompt starts a prefix family of its own.
FAMILY_SHARE = 0.5


def onnx_copy_dir(source: ModelSource, cache_dir: str | os.PathLike[str]) -> Path:
    """Folder under `cache_dir` for the ONNX export of a GGUF source (size in the name: a new GGUF is re-exported)."""
    if not source.gguf_file:
        raise ValueError("only GGUF sources are exported to ONNX")
    gguf = Path(source.directory) / source.gguf_file
    return (
        Path(cache_dir).expanduser() / f"{gguf.stem}-{gguf.stat().st_size}-onnx-{PRECISION}-v{EXPORT_FORMAT}"
    )


def _genai() -> Any:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise LlmConfigError(
            "onnx backend needs onnxruntime-genai (and onnx, onnx-ir to export): pip install nva"
        ) from None
    if hasattr(og, "disable_telemetry_events"):
        og.disable_telemetry_events()  # no network at run time
    return og


def is_onnx_dir(path: Path) -> bool:
    return (path / "genai_config.json").is_file()


def prepare_onnx(
    source: ModelSource, cache_dir: str | os.PathLike[str], torch_threads: int = 2
) -> tuple[Path, float]:
    """The int8 ONNX copy of `source` under `cache_dir`, exported once; returns (folder, seconds spent exporting).

    GGUF -> plain transformers folder (the same copy the transformers backend loads) -> onnxruntime-genai model
    builder, in a subprocess so the export's memory is returned. Written to a temp folder and renamed, so a
    half-written export is never loaded.
    """
    out = onnx_copy_dir(source, cache_dir)
    if is_onnx_dir(out):
        return out, 0.0
    clock = Clock()
    hf = hf_copy_dir(source, cache_dir)
    if not (hf / "config.json").is_file():
        export_hf_folder(source, hf, torch_threads)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(torch_threads),
    }
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf),
        "-o",
        str(tmp),
        "-p",
        PRECISION,
        "-e",
        "cpu",
        "-c",
        str(tmp / "build-cache"),
    ]
    try:
        proc = subprocess.run(  # noqa: S603 -- fixed argv, no shell
            cmd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LlmConfigError(
            f"ONNX export did not finish in {BUILD_TIMEOUT_S:g}s: run `nva prepare-model` on an idle machine"
        ) from None
    if proc.returncode != 0 or not is_onnx_dir(tmp):
        tail = (proc.stderr or proc.stdout or "")[-800:]
        shutil.rmtree(tmp, ignore_errors=True)
        raise LlmConfigError(
            f"ONNX export failed (exit {proc.returncode}): install onnx, onnx-ir and onnxruntime-genai; log tail: {tail}"
        )
    shutil.rmtree(tmp / "build-cache", ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; its export is equivalent
    spent = clock.elapsed()
    log.info("exported the local model to ONNX %s in %.1fs", PRECISION, spent)
    return out, spent


@dataclass
class _Slot:
    """One generator and the tokens whose keys and values it holds (prompt plus fed completion tokens)."""

    generator: Any
    tokens: list[int] = field(default_factory=list)
    used: float = 0.0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class OnnxEngine:
    """The loaded model plus a few greedy generators whose KV caches keep recent prompt prefixes.

    A prompt that starts like an earlier one (the per-fact system prompt and worked example) rewinds that
    generator to the shared prefix and feeds only the rest, so a per-fact call pre-fills ~35 tokens, not ~170.
    One generation at a time per process: on a small CPU, parallel decoding only slows each other down.
    """

    def __init__(self, path: Path, threads: int) -> None:
        og = _genai()
        self.og = og
        self.path = path
        clock = Clock()
        cfg = og.Config(str(path))
        cfg.overlay(
            json.dumps(
                {
                    "model": {
                        "decoder": {
                            "session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
                        }
                    }
                }
            )
        )
        self.model = og.Model(cfg)
        self.tokenizer = og.Tokenizer(self.model)
        template = path / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() else None
        self.eos = {int(t) for t in self.tokenizer.eos_token_ids}
        self.slots: list[_Slot] = []
        self.lock = threading.Lock()
        self.last_reused = 0  # prompt tokens the last call found in a cache (tests and benchmarks read it)
        self.load_s = clock.elapsed()
        log.info("loaded ONNX model %s in %.2fs", path.name, self.load_s)

    def encode_chat(self, msgs: Sequence[ChatMessage]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            json.dumps([m.as_dict() for m in msgs]),
            template_str=self.chat_template,
            add_generation_prompt=True,
        )
        return [int(t) for t in self.tokenizer.encode(text)]

    def _new_generator(self, capacity: int, temperature: float) -> Any:
        params = self.og.GeneratorParams(self.model)
        opts: dict[str, Any] = {"max_length": capacity, "batch_size": 1}
        if temperature > 0:
            opts.update(do_sample=True, temperature=temperature, top_k=50, top_p=1.0)
        else:
            opts.update(do_sample=False)
        params.set_search_options(**opts)
        return self.og.Generator(self.model, params)

    def _slot_for(self, ids: list[int]) -> tuple[_Slot, int]:
        """(slot, tokens already in its cache) for `ids`; at least the last prompt token is always fed again."""
        best, best_len = None, -1
        for slot in self.slots:
            n = min(_common_prefix(slot.tokens, ids), len(ids) - 1)
            if n > best_len:
                best, best_len = slot, n
        if best is None or (best_len < SAME_PREFIX_MIN and len(self.slots) < MAX_SLOTS):
            slot = _Slot(self._new_generator(SLOT_TOKENS, 0.0))
            self.slots.append(slot)
            return slot, 0
        if best_len < SAME_PREFIX_MIN:
            best = min(self.slots, key=lambda s: s.used)  # least recently used prompt family makes room
            best_len = 0
        if best_len == 0:
            best.generator = self._new_generator(SLOT_TOKENS, 0.0)
            best.tokens = []
        else:
            # Always rewind: the generator's sequence also holds the last sampled token, which was never fed.
            best.generator.rewind_to(best_len)
            del best.tokens[best_len:]
        return best, best_len

    def generate(
        self, ids: list[int], max_tokens: int, temperature: float, deadline: float
    ) -> Generator[tuple[int, str], None, None]:
        """Yield (token id, text delta) greedily (or sampled); the caller holds `self.lock`."""
        if temperature > 0 or len(ids) + max_tokens > SLOT_TOKENS:
            # Sampling and long prompts use a one-off generator: they would evict the warm prefixes.
            slot, have = _Slot(self._new_generator(len(ids) + max_tokens + 1, temperature)), 0
            cached = False
        else:
            slot, have = self._slot_for(ids)
            cached = True
        import numpy as np

        self.last_reused = have
        gen = slot.generator
        gen.append_tokens(np.asarray([ids[have:]], dtype=np.int32))
        slot.tokens = list(ids)
        slot.used = time.monotonic()
        stream = self.tokenizer.create_stream()
        generated: list[int] = []
        try:
            for _ in range(max_tokens):
                if time.monotonic() > deadline:
                    raise LlmTimeout(
                        "local model did not finish in time: raise NVA_LLM_TIMEOUT or lower max_tokens"
                    )
                if gen.is_done():
                    break
                gen.generate_next_token()
                token = int(gen.get_next_tokens()[0])
                generated.append(token)
                if token in self.eos:
                    yield token, ""
                    break
                yield token, stream.decode(token)
        finally:
            if cached:
                # A sampled token is fed (in the cache) only on the next step: the last one never was.
                slot.tokens = list(ids) + generated[:-1]

    def prefill(self, msgs: Sequence[ChatMessage]) -> None:
        """Put a prompt prefix in a slot's cache (warm-up)."""
        ids = self.encode_chat(msgs)
        with self.lock:
            for _ in self.generate(ids, 1, 0.0, time.monotonic() + 120):
                pass


_ENGINES: dict[Path, OnnxEngine] = {}
_ENGINES_LOCK = threading.Lock()


def load_engine(path: Path, threads: int) -> OnnxEngine:
    """The sequential engine for `path`, loaded once per process (kept to measure against the batched one)."""
    with _ENGINES_LOCK:
        if path not in _ENGINES:
            _ENGINES[path] = OnnxEngine(path, threads)
        return _ENGINES[path]


@dataclass
class _Prefix:
    """A prompt whose keys and values are kept: later prompts that start the same way skip its pre-fill."""

    tokens: list[int]
    kv: list[Any]  # per layer key, value: [1, kv_heads, len(tokens), head_size]
    used: float = 0.0


LAST_LOGITS_FILE = "model-last-logits.onnx"


def last_logits_graph(path: Path, filename: str, logits: str) -> Path:
    """A copy of the decoder graph that computes logits for the last position only (same weights file).

    Pre-fill then skips the vocabulary projection (about a fifth of each token's work) for every prompt token
    but the last; decode steps are unchanged. Written once next to the export; the original if it cannot be.
    """
    out = path / LAST_LOGITS_FILE
    if out.is_file():
        return out
    try:
        import onnx
        from onnx import TensorProto, helper

        graph_model = onnx.load(str(path / filename), load_external_data=False)
        graph = graph_model.graph
        (i, head) = next((i, n) for i, n in enumerate(graph.node) if logits in n.output)
        hidden = head.input[0]
        last = f"{hidden}/last_position"
        graph.initializer.extend(
            [
                helper.make_tensor("last_position/starts", TensorProto.INT64, [1], [-1]),
                helper.make_tensor("last_position/ends", TensorProto.INT64, [1], [2**62]),
                helper.make_tensor("last_position/axes", TensorProto.INT64, [1], [1]),
            ]
        )
        graph.node.insert(
            i,
            helper.make_node(
                "Slice",
                [hidden, "last_position/starts", "last_position/ends", "last_position/axes"],
                [last],
                name="/lm_head/last_position",
            ),
        )
        head.input[0] = last
        tmp = path / f".{LAST_LOGITS_FILE}.tmp-{os.getpid()}"
        onnx.save(graph_model, str(tmp))  # the weights stay in the export's external data file
        tmp.replace(out)
        return out
    except Exception as exc:  # noqa: BLE001 -- an optimisation: the full graph gives the same last logits
        log.warning("could not write the last-position graph (%s); using the full one", type(exc).__name__)
        return path / filename


class OnnxBatchModel:
    """The exported decoder driven directly with ONNX Runtime, so rows of one batch may differ in length.

    ONNX Runtime GenAI 0.18 appends tokens only once per generator when batch_size > 1 (no prefix reuse, no
    continuous batching), and its GroupQueryAttention pre-fills with a past only one row at a time. So: each
    prompt is pre-filled alone on top of a cached prefix (per-fact and synopsis system prompts), then all rows
    decode together, right-padded, each row's own length in the attention mask (GQA reads only that many keys).
    Greedy rows give the same tokens as the one-at-a-time path (tests/test_onnx_batch.py).
    """

    def __init__(self, path: Path, threads: int) -> None:
        import numpy as np
        import onnxruntime as ort
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        clock = Clock()
        self.np = np
        cfg = json.loads((path / "genai_config.json").read_text())["model"]
        dec = cfg["decoder"]
        self.layers = int(dec["num_hidden_layers"])
        self.kv_heads = int(dec["num_key_value_heads"])
        self.head_size = int(dec["head_size"])
        names = dec["inputs"]
        outs = dec["outputs"]
        self.in_ids, self.in_mask = names["input_ids"], names["attention_mask"]
        self.past_names = [
            names[f"past_{kind}_names"] % i for i in range(self.layers) for kind in ("key", "value")
        ]
        self.out_names = [outs["logits"]] + [
            outs[f"present_{kind}_names"] % i for i in range(self.layers) for kind in ("key", "value")
        ]
        eos = cfg["eos_token_id"]
        self.eos = frozenset(int(t) for t in (eos if isinstance(eos, list) else [eos]))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        graph = last_logits_graph(path, dec["filename"], outs["logits"])
        self.session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.id_dtype = np.int64 if "int64" in types[self.in_ids] else np.int32
        self.mask_dtype = np.int64 if "int64" in types[self.in_mask] else np.int32
        self.kv_dtype = np.float16 if "float16" in types[self.past_names[0]] else np.float32
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        template = path / "chat_template.jinja"
        if not template.is_file():
            raise LlmConfigError(f"{path} has no chat_template.jinja: delete the folder to export it again")
        self.template = ImmutableSandboxedEnvironment().from_string(template.read_text())
        self.prefixes: list[_Prefix] = []
        self.last_reused = 0
        self.spare: _KvBatch | None = None  # an emptied batch's buffers, reused by the next merge
        self.load_s = clock.elapsed()
        log.info("loaded ONNX model %s for batched decoding in %.2fs", path.name, self.load_s)

    def encode_chat(self, msgs: Sequence[ChatMessage]) -> list[int]:
        text = self.template.render(messages=[m.as_dict() for m in msgs], add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _run(self, ids: Any, mask: Any, past: Sequence[Any]) -> tuple[Any, list[Any]]:
        feed = {self.in_ids: ids.astype(self.id_dtype), self.in_mask: mask.astype(self.mask_dtype)}
        feed.update(zip(self.past_names, past, strict=True))
        out = self.session.run(self.out_names, feed)
        return out[0], out[1:]

    def prefill(self, ids: list[int]) -> tuple[list[Any], Any]:
        np = self.np
        best, have = None, 0
        for p in self.prefixes:
            n = min(_common_prefix(p.tokens, ids), len(ids) - 1)
            if n > have:
                best, have = p, n
        if best is None or have < SAME_PREFIX_MIN:
            best, have = None, 0
            past = [np.zeros((1, self.kv_heads, 0, self.head_size), self.kv_dtype)] * (2 * self.layers)
        else:
            past = [np.ascontiguousarray(a[:, :, :have]) for a in best.kv]
            best.used = time.monotonic()
        logits, present = self._run(
            np.asarray([ids[have:]]), np.ones((1, len(ids)), dtype=self.mask_dtype), past
        )
        self.last_reused = have
        # A new prompt family (nothing shared, or only the chat template's first tokens, as the synopsis prompt
        # shares with the per-fact one): keep it for the prompts that follow, whatever family came first.
        if best is None or have < FAMILY_SHARE * len(ids):
            if len(self.prefixes) >= MAX_SLOTS:
                self.prefixes.remove(min(self.prefixes, key=lambda p: p.used))
            self.prefixes.append(_Prefix(list(ids), present, time.monotonic()))
        return present, logits[0, -1]

    def merge(
        self, batch: _KvBatch | None, keep: Sequence[int], new: Sequence[list[Any]], lengths: Sequence[int]
    ) -> _KvBatch:
        """Rows `keep` of `batch` (in order) then the `new` caches. In place when they fit the buffers: only
        moved and new rows are copied; otherwise into larger buffers (rows and positions rounded up)."""
        np = self.np
        rows, k = len(keep) + len(new), len(keep)
        need = max(lengths) + 1
        if batch is None and self.spare is not None:
            spare, self.spare = self.spare, None
            if rows <= spare.row_cap and need <= spare.cap:
                batch = spare
            else:
                spare.release()
        if batch is None or rows > batch.row_cap or need > batch.cap:
            shape = self._shape(rows, max(lengths))
            old = batch.release() if batch is not None else None  # consumed: freed layer by layer
            arrays = []
            for j in range(2 * self.layers):
                a = np.empty(shape, self.kv_dtype)
                if old is not None:
                    src, old[j] = old[j], None  # at most one layer held twice (peak memory)
                    for i, r in enumerate(keep):
                        a[i, :, : lengths[i]] = src[r, :, : lengths[i]]
                    del src
                arrays.append(a)
            batch = _KvBatch(self, arrays)
        else:
            for j in range(2 * self.layers):
                a = batch.arrays[j]
                for i, r in enumerate(keep):  # keep is ascending, so a row only moves down onto a free slot
                    if r != i:
                        a[i, :, : lengths[i]] = a[r, :, : lengths[i]]
        for j in range(2 * self.layers):
            a = batch.arrays[j]
            for i, cache in enumerate(new):
                n = cache[j].shape[2]
                a[k + i, :, :n] = cache[j][0]
        batch.bind(rows)
        return batch

    def idle(self, batch: _KvBatch | None) -> None:
        """The batch emptied: keep its buffers for the next rows unless large (allocating and faulting in
        ~100-300 MB again cost up to 0.8 s at the start of a summary)."""
        if batch is not None and sum(a.nbytes for a in batch.arrays) <= IDLE_KEEP_BYTES:
            batch.rows, batch.io = 0, None
            self.spare = batch
        elif batch is not None:
            batch.release()

    def reserve(self, rows: int, positions: int) -> None:
        """Allocate and touch batch buffers now (start-up), so the first summary does not pay for them."""
        want = self._shape(rows, positions)
        spare = self.spare
        if spare is None or spare.row_cap < want[0] or spare.cap < want[2]:
            self.spare = None
            if spare is not None:
                spare.release()
            fresh = self._new_batch(rows, positions)
            for a in fresh.arrays:
                a.fill(0)  # fault the pages in now
            self.spare = fresh

    def _new_batch(self, rows: int, positions: int) -> _KvBatch:
        shape = self._shape(rows, positions)
        return _KvBatch(self, [self.np.empty(shape, self.kv_dtype) for _ in range(2 * self.layers)])

    def _shape(self, rows: int, positions: int) -> tuple[int, int, int, int]:
        """Buffer shape for `rows` rows of up to `positions` tokens: rows and positions rounded up, so a batch
        is rebuilt only now and then as it grows."""
        row_cap = max(4, 1 << (rows - 1).bit_length())
        cap = -(-(positions + KV_HEADROOM) // 64) * 64
        return (row_cap, self.kv_heads, cap, self.head_size)

    def step(self, batch: _KvBatch, tokens: Sequence[int], lengths: Sequence[int]) -> tuple[_KvBatch, Any]:
        np = self.np
        if max(lengths) + 1 > batch.cap:  # a row outgrew the buffer: copy into a wider one
            batch = self.merge(batch, range(len(tokens)), [], lengths)
        lens = np.asarray(list(lengths))
        # Each row attends to its own tokens only; GQA writes the new token's keys and values at that row's
        # length, in place (past and present share one buffer, so no per-step copy of the cache). Positions
        # past a row's length hold stale values that its attention length never reaches.
        mask = np.arange(int(lens.max()) + 1)[None, :] < (lens + 1)[:, None]
        io = batch.io
        io.bind_cpu_input(self.in_ids, np.asarray(list(tokens), dtype=self.id_dtype).reshape(-1, 1))
        io.bind_cpu_input(self.in_mask, mask.astype(self.mask_dtype))
        self.session.run_with_iobinding(io)
        logits = io.get_outputs()[0].numpy()
        return batch, logits[:, -1]


class _KvBatch:
    """Key/value buffers of a batch, [row capacity, kv_heads, positions, head_size] per layer; the first `rows`
    rows are bound to the session in place (a contiguous view, so nothing is copied per step)."""

    def __init__(self, model: OnnxBatchModel, arrays: list[Any]) -> None:
        self.model = model
        self.arrays = arrays
        self.row_cap = arrays[0].shape[0]
        self.cap = arrays[0].shape[2]
        self.rows = 0
        self.io: Any = None

    def bind(self, rows: int) -> None:
        import onnxruntime as ort

        model = self.model
        self.rows = rows
        self.io = model.session.io_binding()
        self.io.bind_output(model.out_names[0])  # logits first: step() reads get_outputs()[0]
        for past, present, a in zip(model.past_names, model.out_names[1:], self.arrays, strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(a[:rows])  # shares the numpy array's memory
            self.io.bind_ortvalue_input(past, value)
            self.io.bind_ortvalue_output(present, value)

    def release(self) -> list[Any]:
        """Give up the buffers (the binding goes, so each layer's array is freed once the caller drops it)."""
        arrays, self.arrays = self.arrays, []
        self.io = None
        return arrays


class BatchEngine:
    """The batched model and the one scheduler thread that drives it (per process and model folder)."""

    def __init__(self, path: Path, threads: int) -> None:
        from .batching import BatchScheduler

        self.path = path
        self.model = OnnxBatchModel(path, threads)
        self.scheduler = BatchScheduler(self.model, name="onnx-batch")
        self.load_s = self.model.load_s

    def encode_chat(self, msgs: Sequence[ChatMessage]) -> list[int]:
        return self.model.encode_chat(msgs)

    def reserve(self) -> None:
        """Allocate one summary's batch buffers now (warm-up), so the first patient does not pay for them."""
        self.model.reserve(RESERVE_ROWS, RESERVE_POSITIONS)

    def prefill(self, msgs: Sequence[ChatMessage]) -> None:
        """Put a prompt prefix in the prefix cache (warm-up), through the scheduler like any request."""
        from .batching import read_events

        req = self.scheduler.submit(self.encode_chat(msgs), max_tokens=1, timeout=120.0)
        gen = read_events(req)
        try:
            while True:
                next(gen)
        except StopIteration:
            pass


_BATCH_ENGINES: dict[Path, BatchEngine] = {}


def load_batch_engine(path: Path, threads: int) -> BatchEngine:
    """The batched engine for `path`, loaded once per process."""
    with _ENGINES_LOCK:
        if path not in _BATCH_ENGINES:
            _BATCH_ENGINES[path] = BatchEngine(path, threads)
        return _BATCH_ENGINES[path]


def default_cache_dir(settings: LlmSettings) -> Path:
    if settings.cache_dir:
        return Path(settings.cache_dir).expanduser()
    from assistant import settings as nva_settings

    return nva_settings.data_dir() / "models"


class OnnxBackend(LlmBackend):
    """Local greedy generation on ONNX Runtime. `json_schema` is not enforced (the result's `schema_fallback`
    says so); prompt for JSON and validate it. NVA_LLM_MODEL_PATH may name a GGUF (exported once) or an
    onnxruntime-genai folder (with genai_config.json)."""

    name = "onnx"
    small_model = True

    def __init__(self, settings: LlmSettings, *, batched: bool = True) -> None:
        self.settings = settings
        # batched: one scheduler merges every caller's requests into shared decode steps (the default);
        # False: the earlier one-generation-at-a-time engine on ONNX Runtime GenAI (benchmarks compare the two)
        self.batched = batched
        path = Path(settings.model_path).expanduser() if settings.model_path else None
        self._ready_dir: Path | None = path if path is not None and is_onnx_dir(path) else None
        self.source = None if self._ready_dir else resolve_model_source(settings.model_path)
        if self.source is not None and not self.source.gguf_file:
            raise LlmConfigError(
                "onnx backend needs a .gguf file or an onnxruntime-genai folder (genai_config.json) in "
                "NVA_LLM_MODEL_PATH"
            )
        self.model = settings.model or (self.source.label if self.source else self._ready_dir.name)  # type: ignore[union-attr]
        self.prepare_s = 0.0

    def model_dir(self) -> Path:
        """The ONNX folder, exported now when missing (about a minute, once per machine and GGUF)."""
        if self._ready_dir is None:
            assert self.source is not None
            self._ready_dir, self.prepare_s = prepare_onnx(
                self.source, default_cache_dir(self.settings), self.settings.torch_threads
            )
        return self._ready_dir

    def engine(self) -> Any:
        """The process-wide engine: BatchEngine (batched) or OnnxEngine (sequential)."""
        if self.batched:
            return load_batch_engine(self.model_dir(), self.settings.torch_threads)
        return load_engine(self.model_dir(), self.settings.torch_threads)

    def load(self) -> None:
        """Load now rather than on the first call (e.g. at app start)."""
        self.engine()

    def warm(self, prompts: Sequence[Sequence[ChatMessage]] = ()) -> None:
        """Load the model and pre-fill the KV cache with prompt prefixes used on every patient."""
        engine = self.engine()
        for msgs in prompts:
            engine.prefill(msgs)
        if isinstance(engine, BatchEngine):
            engine.reserve()

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> ChatStream:
        msgs = check_messages(messages)
        check_params(max_tokens, temperature)
        if self.batched:
            return self.stream_many(
                [msgs],
                max_tokens=max_tokens,
                temperature=temperature,
                json_schema=json_schema,
                timeout=timeout,
            )[0]
        engine = self.engine()
        return ChatStream(
            self._run(
                engine,
                msgs,
                max_tokens,
                temperature,
                json_schema is not None,
                timeout or self.settings.timeout,
            )
        )

    def stream_many(
        self,
        requests: Sequence[Sequence[ChatMessage]],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        timeout: float | None = None,
        stop: str | None = None,
        group: Hashable | None = None,
        optional: bool = False,
    ) -> list[ChatStream]:
        """Submit all now, as one caller: the scheduler decodes them together with other callers' requests.

        The group's first request runs first (its caller's first sentence comes early), the rest join the shared
        batch. Each stream carries only its own row's text; closing one cancels only that one."""
        if not self.batched:
            return super().stream_many(
                requests,
                max_tokens=max_tokens,
                temperature=temperature,
                json_schema=json_schema,
                timeout=timeout,
                stop=stop,
                group=group,
                optional=optional,
            )
        from .batching import submit_streams

        engine: BatchEngine = self.engine()
        return submit_streams(
            self,
            engine.scheduler,
            engine.encode_chat,
            requests,
            max_tokens=max_tokens,
            temperature=temperature,
            timeout=timeout or self.settings.timeout,
            stop=stop,
            group=group,
            optional=optional,
            schema_asked=json_schema is not None,
        )

    def _run(
        self,
        engine: OnnxEngine,
        msgs: list[ChatMessage],
        max_tokens: int,
        temperature: float,
        schema_asked: bool,
        timeout: float,
    ) -> Generator[str, None, ChatResult]:
        clock = Clock()
        ids = engine.encode_chat(msgs)
        parts: list[str] = []
        completion = 0
        eos = False
        deadline = time.monotonic() + timeout
        if not engine.lock.acquire(timeout=timeout):
            raise LlmTimeout(
                f"local model busy with other patients for {timeout:g}s: raise NVA_LLM_TIMEOUT or retry"
            )
        try:
            for token, delta in engine.generate(ids, max_tokens, temperature, deadline):
                completion += 1
                if token in engine.eos:
                    eos = True
                    break
                if delta:
                    clock.mark_first()
                    parts.append(delta)
                    yield delta
        except LlmError:
            raise
        except (RuntimeError, ValueError) as exc:
            raise LlmError(
                f"local ONNX generation failed ({type(exc).__name__}): check the model files"
            ) from exc
        finally:
            engine.lock.release()
        result = ChatResult(
            text="".join(parts),
            model=self.model,
            backend=self.name,
            prompt_tokens=len(ids),
            completion_tokens=completion,
            latency_s=clock.elapsed(),
            first_token_s=clock.first,
            finish_reason="stop" if eos or completion < max_tokens else "length",
            schema_fallback=schema_asked,
        )
        log_result(result)
        return result


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m assistant.llm.onnx_backend [--cache-dir DIR]`: export the default model now (make run does)."""
    import argparse

    parser = argparse.ArgumentParser(description="Prepare the embedded model's ONNX copy (once per machine).")
    parser.add_argument("--cache-dir", help="where to keep it (default: NVA_DATA_DIR/models)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = LlmSettings(backend="onnx", cache_dir=args.cache_dir)
    backend = OnnxBackend(settings)
    clock = Clock()
    path = backend.model_dir()
    load_batch_engine(path, settings.torch_threads)
    log.info("ONNX model ready in %s (%.1fs, export %.1fs)", path, clock.elapsed(), backend.prepare_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

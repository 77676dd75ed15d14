"""One model's vLLM v1 `AsyncLLM`, behind the small interface the router needs.

This is the engine's logic as a plain class (the Serve deployment only wraps it):
turning an `EngineRequest` into token ids and SamplingParams, checking them against the
context length, and streaming coalesced `EngineChunk`s back: tokens are gathered here
and sent at most once per `stream_interval`, so a stream costs one Ray message per
interval, not one per token.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from helios.api.protocol import EngineChunk, EngineRequest
from helios.config import ModelConfig
from helios.errors import ContextLengthExceeded, EngineError, InvalidRequest
from helios.observability.logs import get_logger, log_event

logger = get_logger("engine")


def engine_kwargs(
    model: ModelConfig, model_dir: Path, loader: dict[str, Any] | None = None, kv_transfer: dict[str, Any] | None = None
) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for one model; `extra_args` are checked by name.

    `loader` set means the model sits in a Helios cache tier: vLLM loads it with the
    Helios loader (`load_format="helios"`), with these `model_loader_extra_config` keys.
    `kv_transfer` plugs in a KV connector: a dict from `kv_connector.kv_transfer_config()`."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    e = model.engine
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "served_model_name": model.id,
        "dtype": e.dtype,
        "max_model_len": e.max_model_len,
        "max_num_seqs": e.max_num_seqs,
        "enable_prefix_caching": e.enable_prefix_caching,
        "tensor_parallel_size": e.tensor_parallel_size,
        "enforce_eager": e.enforce_eager,
        "seed": e.seed,
        "disable_log_stats": True,
    }
    if e.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = e.max_num_batched_tokens
    if loader is not None:
        kwargs["load_format"] = "helios"
        kwargs["model_loader_extra_config"] = loader
    if kv_transfer is not None:
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(**kv_transfer)
    if model.deployment.accelerator == "gpu":
        kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
    known = set(AsyncEngineArgs.__dataclass_fields__)
    unknown = sorted(set(e.extra_args) - known)
    if unknown:
        raise InvalidRequest(f"models.{model.id}.engine.extra_args: unknown vLLM engine argument(s) {unknown}")
    kwargs.update(e.extra_args)
    return kwargs


class LLMEngine:
    """A started vLLM engine for one model, with tokenization and limits in front of it."""

    def __init__(
        self, model: ModelConfig, model_dir: Path, loader: dict[str, Any] | None = None, kv_transfer: dict[str, Any] | None = None
    ) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if model.deployment.accelerator == "cpu":
            # vLLM's CPU backend sizes its KV cache from this variable only.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(model.engine.kv_cache_space_gib)
        started = time.monotonic()
        self.model_id = model.id
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model, model_dir, loader, kv_transfer)))
        self.max_model_len: int = self.engine.model_config.max_model_len
        self.stream_interval_s = model.deployment.stream_interval_ms / 1000.0
        self.created = int(time.time())
        self.start_seconds = time.monotonic() - started
        self.timings: dict[str, float] = {"engine_init_s": self.start_seconds}

    def info(self) -> dict[str, Any]:
        return {"id": self.model_id, "max_model_len": self.max_model_len, "created": self.created, "timings": self.timings}

    def num_unfinished_requests(self) -> int:
        return self.engine.get_num_unfinished_requests()

    async def check_health(self) -> None:
        await self.engine.check_health()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def _prompt_ids(self, req: EngineRequest) -> list[int]:
        if req.messages is not None:
            try:
                return list(self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True, return_dict=False))
            except Exception as exc:  # noqa: BLE001 - a template that rejects these messages is the client's problem
                raise InvalidRequest(f"messages could not be rendered by the chat template: {exc}", param="messages") from None
        if isinstance(req.prompt, str):
            return self.tokenizer.encode(req.prompt, add_special_tokens=True)
        vocab = len(self.tokenizer)
        if any(t >= vocab for t in req.prompt):
            raise InvalidRequest(f"prompt token ids must be below the vocabulary size {vocab}", param="prompt")
        return list(req.prompt)

    def _sampling_params(self, req: EngineRequest, prompt_len: int):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        room = self.max_model_len - prompt_len
        max_tokens = req.sampling.get("max_tokens")
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            asked = max_tokens if max_tokens is not None else 1
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion). "
                "Please reduce the length of the prompt or max_tokens.",
                param="max_tokens" if room > 0 else "prompt",
            )
        params = {**req.sampling, "max_tokens": max_tokens if max_tokens is not None else room}
        if req.kv_transfer_params is not None:
            params["extra_args"] = {**(params.get("extra_args") or {}), "kv_transfer_params": req.kv_transfer_params}
        try:
            return SamplingParams(**params, output_kind=RequestOutputKind.DELTA)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(str(exc)) from None

    async def generate(self, req: EngineRequest, interval_s: float | None = None) -> AsyncIterator[EngineChunk]:
        """Stream a request's output; closing this iterator aborts the request in vLLM.

        The first token goes out at once; after that, tokens are gathered and sent at most
        every `interval_s` (the deployment's stream interval by default), and the last
        one the moment the request finishes, so a finished request never waits out a timer.
        """
        prompt_ids = self._prompt_ids(req)
        sampling = self._sampling_params(req, len(prompt_ids))
        interval = self.stream_interval_s if interval_s is None else interval_s
        stream = self.engine.generate({"prompt_token_ids": prompt_ids}, sampling, req.request_id)
        completion_tokens, finished = 0, False
        text: list[str] = []
        token_ids: list[int] = []
        loop = asyncio.get_running_loop()
        send_at = loop.time() if math.isfinite(interval) else math.inf  # inf: one chunk at the end
        try:
            async for out in stream:
                completion = out.outputs[0]
                completion_tokens += len(completion.token_ids)
                finished = out.finished
                text.append(completion.text)
                if req.return_token_ids:
                    token_ids.extend(completion.token_ids)
                now = loop.time()
                if finished or now >= send_at:
                    yield EngineChunk(
                        text="".join(text),
                        token_ids=token_ids if req.return_token_ids else None,
                        finish_reason=completion.finish_reason if finished else None,
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=completion_tokens,
                        kv_transfer_params=out.kv_transfer_params if finished else None,
                    )
                    text, token_ids, send_at = [], [], now + interval
        except (InvalidRequest, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001 - vLLM's errors are sorted into client and server ones below
            from vllm.exceptions import VLLMClientError

            if isinstance(exc, VLLMClientError):  # vLLM's own verdict on a bad request
                raise InvalidRequest(str(exc)) from None
            log_event(logger, "generate_failed", request_id=req.request_id, error=repr(exc))
            raise EngineError(str(exc)) from None
        finally:
            await stream.aclose()
            if not finished:
                await self.engine.abort(req.request_id)
                log_event(logger, "request_aborted", request_id=req.request_id, completion_tokens=completion_tokens)

    async def generate_full(self, req: EngineRequest) -> EngineChunk:
        """The whole output of a request as one chunk (for non-streamed responses)."""
        chunks = [chunk async for chunk in self.generate(req, interval_s=math.inf)]
        return chunks[-1]

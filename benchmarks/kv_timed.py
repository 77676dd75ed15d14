"""KV connectors with their transfer paths timed, for benchmarks/kv_cache.py.

The same wrapper goes around Helios's connector and vLLM's ExampleConnector, so both are
measured the same way: wall time inside the worker-side calls that move KV (loads:
`start_load_kv` + `wait_for_layer_load`; saves: `save_kv_layer` + `wait_for_save`), and
the KV bytes each call moved. Both engines' KV caches are pre-faulted at start (Helios's
connector does it itself; the ExampleConnector wrapper does the same), so neither pays
first-touch page faults inside a timed call. Each worker process appends its totals to
`$HELIOS_KV_TIMING.<pid>.json`. vLLM imports this module in its engine processes
(`kv_connector_module_path="kv_timed"`, with this directory on PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector

from helios.engine.kv_connector import HeliosConnector


class _Timing:
    def __init__(self) -> None:
        self.t = {"load_s": 0.0, "load_bytes": 0, "save_s": 0.0, "save_bytes": 0, "load_calls": 0, "save_calls": 0}

    def add(self, kind: str, seconds: float, nbytes: int) -> None:
        if nbytes <= 0:
            return
        self.t[f"{kind}_s"] += seconds
        self.t[f"{kind}_bytes"] += nbytes
        self.t[f"{kind}_calls"] += 1
        path = os.environ.get("HELIOS_KV_TIMING")
        if path:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.t, f)
            os.replace(tmp, f"{path}.{os.getpid()}.json")


class TimedHeliosConnector(HeliosConnector):
    """Helios's connector; bytes are whole blocks (every layer's K and V)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timing = _Timing()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        t = time.perf_counter()
        super().start_load_kv(forward_context, **kwargs)
        self._timing.add("load", time.perf_counter() - t, len(meta.loads) * self._payload)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        t = time.perf_counter()
        super().wait_for_save()
        if meta is not None:
            self._timing.add("save", time.perf_counter() - t, len(meta.saves) * self._payload)


class TimedExampleConnector(ExampleConnector):
    """vLLM's reference connector (safetensors, one file per layer per request)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timing = _Timing()
        self._pending_save = (0.0, 0)

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Pre-fault the cache as Helios's connector does, so both are timed on resident memory."""
        import torch

        for t in kv_caches.values():
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                flat = t.view(torch.uint8).numpy().reshape(-1)
                flat[::4096] = flat[::4096]
        super().register_kv_caches(kv_caches)

    @staticmethod
    def _token_bytes(kv: Any) -> int:
        return kv[0].nbytes // kv.shape[2]  # one block's bytes / tokens per block ([B, H, N, C] layout)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        tokens = sum(len(r.slot_mapping) for r in meta.requests if not r.is_store)
        per_token = sum(
            self._token_bytes(layer.kv_cache)
            for layer in forward_context.no_compile_layers.values()
            if getattr(layer, "kv_cache", None) is not None
        ) if tokens else 0
        t = time.perf_counter()
        super().start_load_kv(forward_context, **kwargs)
        self._timing.add("load", time.perf_counter() - t, tokens * per_token)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        tokens = sum(len(r.slot_mapping) for r in meta.requests if r.is_store)
        t = time.perf_counter()
        super().save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)
        if tokens:
            s, b = self._pending_save
            self._pending_save = (s + time.perf_counter() - t, b + tokens * self._token_bytes(kv_layer))

    def wait_for_save(self) -> None:
        t = time.perf_counter()
        super().wait_for_save()
        s, b = self._pending_save
        self._pending_save = (0.0, 0)
        self._timing.add("save", s + time.perf_counter() - t, b)

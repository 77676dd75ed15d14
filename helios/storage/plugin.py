"""vLLM general plug-in: registers Helios's model loader in every vLLM process.

vLLM builds the model inside its engine-core (and worker) processes, which import nothing of
Helios; the `vllm.general_plugins` entry point is how code runs there. vLLM calls `register()`
in every process, possibly more than once, so it is idempotent and imports only on first use.
"""

from __future__ import annotations

import logging

_registered = False


def _route_logs_to_vllm() -> None:
    """In vLLM's own processes nothing handles Helios's loggers; borrow vLLM's handlers there."""
    helios_logger = logging.getLogger("ray.serve.helios")
    if helios_logger.hasHandlers():
        return  # a Serve replica or an app that configured logging
    vllm_logger = logging.getLogger("vllm")
    for handler in vllm_logger.handlers:
        helios_logger.addHandler(handler)
    helios_logger.setLevel(logging.INFO)


def register() -> None:
    """Make `load_format="helios"` resolve to `HeliosModelLoader` in this process."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from helios.storage.loader import LOAD_FORMAT, HeliosModelLoader

    register_model_loader(LOAD_FORMAT)(HeliosModelLoader)
    _route_logs_to_vllm()
    _registered = True

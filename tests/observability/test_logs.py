"""Every Helios log event of a request carries its request id (and trace id when traced)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from helios.observability.logs import get_logger, log_event, request_context


def test_events_logged_while_serving_a_request_carry_its_ids(caplog: pytest.LogCaptureFixture) -> None:
    logger = get_logger("test")

    async def serve(request_id: str, trace_id: str | None) -> None:
        with request_context(request_id, trace_id):
            await asyncio.sleep(0)
            log_event(logger, "step", n=1)
            await asyncio.gather(asyncio.create_task(asyncio.sleep(0)))  # tasks it starts inherit it
            log_event(logger, "explicit", request_id="given")  # a field the caller sets wins

    async def both() -> None:
        await asyncio.gather(serve("r1", None), serve("r2", "ab" * 16))

    with caplog.at_level(logging.INFO, logger="ray.serve.helios"):
        asyncio.run(both())
        log_event(logger, "outside")
    lines = [r.getMessage() for r in caplog.records]
    assert "step request_id=r1 n=1" in lines
    assert f"step request_id=r2 trace_id={'ab' * 16} n=1" in lines
    assert "explicit request_id=given" in lines
    assert "outside " in lines

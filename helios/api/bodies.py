"""Request bodies at the edge: one JSON parse, a clear 400 for anything that is not an object."""

from __future__ import annotations

import json
from typing import Any

from helios.errors import InvalidRequest


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or InvalidRequest saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    return body

"""Server-sent-event framing for streamed completions: `data: <json>\n\n` frames and the `[DONE]` sentinel.

Payloads are always serialised by a JSON encoder (never formatted into strings), so quotes, newlines
and non-ASCII text in generated tokens or error messages cannot break a frame.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

MEDIA_TYPE = "text/event-stream"
# Proxies (nginx) buffer responses unless told otherwise; caches must never keep a token stream.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def frame(payload: BaseModel | Mapping[str, Any]) -> bytes:
    """One `data:` frame. JSON never contains a raw newline, so a frame is always one line."""
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json()
    else:
        body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return b"data: " + body.encode("utf-8") + b"\n\n"


def error_frame(error_body: Mapping[str, Any]) -> bytes:
    """An `{"error": {...}}` frame: how a failure is reported once the 200 headers have been sent."""
    return frame(error_body)

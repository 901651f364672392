"""One request's steering as it travels through vLLM: `SamplingParams.extra_args["ctxsteer"]`.

Plain JSON types only (vLLM serialises the params between its processes with msgpack). The same record
names the prefix-cache salt, so KV blocks computed under one steering are only ever reused by a request
with exactly the same steering (steering changes every layer's K/V after the first).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ctxsteer.steering.rows import SteerRow

EXTRA_ARGS_KEY = "ctxsteer"


def encode(row: SteerRow, prompt_len: int) -> dict[str, Any] | None:
    """The extra_args entry for a steered request; None when steering is off (stock path, shared cache)."""
    if not row.active:
        return None
    return {
        "alpha": row.alpha,
        "steered": [[s, e] for s, e in row.steered],
        "prompt_len": prompt_len,
        "layers": None if row.layers is None else list(row.layers),
        "heads": None if row.heads is None else {str(k): list(v) for k, v in sorted(row.heads.items())},
    }


def decode(obj: dict[str, Any]) -> tuple[SteerRow, int]:
    heads = obj.get("heads")
    row = SteerRow(
        alpha=float(obj["alpha"]),
        steered=tuple((int(s), int(e)) for s, e in obj.get("steered", ())),
        layers=None if obj.get("layers") is None else tuple(int(x) for x in obj["layers"]),
        heads=None if heads is None else {int(k): tuple(int(h) for h in v) for k, v in heads.items()},
    )
    return row, int(obj["prompt_len"])


def cache_salt(encoded: dict[str, Any] | None) -> str | None:
    """Prefix-cache salt: identical steering shares blocks, anything else (unsteered included) never does."""
    if encoded is None:
        return None
    blob = json.dumps(encoded, sort_keys=True, separators=(",", ":")).encode()
    return "ctxsteer-" + hashlib.sha256(blob).hexdigest()[:32]

"""Named head profiles: a JSON or TOML file mapping a name to {layer: [query heads]}.

Example (JSON): {"retrieval": {"10": [0, 3], "11": [2]}}. Validated against the loaded model once.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from ctxsteer.steering.params import parse_heads
from ctxsteer.steering.spec import HeadMap, SteeringError


def load_head_profiles(path: str | Path, *, num_layers: int, num_heads: int) -> dict[str, HeadMap]:
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SteeringError("head_profiles", f"cannot read {p}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw) if p.suffix == ".toml" else json.loads(raw)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise SteeringError(
            "head_profiles", f"{p} is not valid {p.suffix.lstrip('.') or 'JSON'}: {e}"
        ) from None
    if not isinstance(data, dict):
        raise SteeringError("head_profiles", f"{p} must map profile names to {{layer: [heads]}}")
    return {
        str(name): parse_heads(spec, f"head_profiles.{name}", num_layers, num_heads)
        for name, spec in data.items()
    }

"""The typed `steering` request object, validated client-side by the server's own rules.

Validation is the server's own model, `ctxsteer.steering.params.SteeringParams` (torch-free), so a bad
value fails here with the same `SteeringError` (and the same dotted field name) that the server would
answer with as a 400 `param`. What only the server can know is left to it: layer/head indices are checked
for type but not against the model's size, and a `head_profile` name is not checked against the server's
profiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from ctxsteer.steering.params import SteeringParams
from ctxsteer.steering.spec import SteeringError

__all__ = ["Steering", "SteeringError", "SteeringLike"]


def validate_steering(obj: Mapping[str, Any], field: str = "steering") -> None:
    """Raise `SteeringError` where the server would, as far as the client can tell."""
    SteeringParams.parse(obj, field)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Steering:
    """What to steer and how hard; every field is optional and omitted from the request when None.

    strength:     >= 1, 1 = off (the server's default applies when neither strength nor alpha is given).
    alpha:        the paper's factor on attention to non-steered prompt tokens, in (0, 1]; = 1/strength.
    targets:      roles whose messages are steered (server default: ["user"]).
    spans:        substrings of messages to steer; without `targets`, only these are steered.
    layers:       layer indices to steer, or "all".
    heads:        {layer: [heads]} or [heads] (in every steered layer).
    head_profile: name of a head profile the server was started with.
    """

    strength: float | None = None
    alpha: float | None = None
    targets: Sequence[str] | None = None
    spans: Sequence[str] | None = None
    layers: Sequence[int] | Literal["all"] | None = None
    heads: Mapping[int, Sequence[int]] | Sequence[int] | None = None
    head_profile: str | None = None

    def __post_init__(self) -> None:
        validate_steering(self._raw())
        # Freeze containers only after validation: tuple("user") would hide a str-for-list mistake.
        for name in ("targets", "spans"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.layers is not None and self.layers != "all":
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.heads, Mapping):
            object.__setattr__(self, "heads", {int(k): tuple(v) for k, v in self.heads.items()})
        elif self.heads is not None:
            object.__setattr__(self, "heads", tuple(self.heads))

    def __repr__(self) -> str:
        return f"Steering({', '.join(f'{k}={v!r}' for k, v in self._raw().items())})"

    def _raw(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """The JSON `steering` object of a request (only the fields that were set)."""
        out: dict[str, Any] = {}
        for name, value in self._raw().items():
            if isinstance(value, Mapping):
                out[name] = {str(k): list(v) for k, v in value.items()}
            elif isinstance(value, tuple):
                out[name] = list(value)
            else:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Steering:
        """Build from a request-shaped dict; unknown keys fail like on the server (not with a TypeError)."""
        validate_steering(obj)
        return cls(**obj)

    @classmethod
    def coerce(cls, value: SteeringLike) -> Steering | None:
        """Accept what the client methods take: a Steering, a dict, a bare strength, or None."""
        if value is None or isinstance(value, Steering):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return cls(strength=value)
        kind = type(value).__name__
        raise SteeringError("steering", f"must be a Steering, a dict or a strength, got {kind}")


SteeringLike = Steering | Mapping[str, Any] | float | None

"""The steering spec: what a request asks for, validated once (no torch, no HTTP).

Convention: `strength` >= 1 is the user-facing knob (1 = off); the paper's `alpha` = 1/strength is
the factor applied to the attention paid to every prompt token outside the steered context.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
DEFAULT_TARGETS = ("user",)
HeadMap = dict[int, tuple[int, ...]]


class SteeringError(ValueError):
    """Invalid steering input. `field` is the dotted request path of the culprit (e.g. "steering.alpha")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class AutoStrength:
    """`strength: "auto"`: per request, the smallest strength in [1, max_strength] whose predicted attention
    of the prompt's last position on the context reaches `target_ratio` (steering.auto_strength)."""

    target_ratio: float = 0.5
    max_strength: float = 4.0


METHODS = ("attention", "cad", "attention+cad")
# Context-aware decoding (Shi et al. 2023, arXiv 2305.14739): its paper's default weight (0.5; it used 1.0
# on its knowledge-conflict sets). Bounded so that (1 + beta) * logits stays far from overflow.
DEFAULT_CAD_BETA = 0.5
MAX_CAD_BETA = 10.0


@dataclass(frozen=True, slots=True)
class SteeringSpec:
    """A validated steering request.

    alpha:   factor on attention to non-steered prompt keys, in (0, 1]; 1 = off.
    targets: roles whose message contents are steered (per-message `steer` flags override).
    spans:   substrings of messages that are steered as well (PASTA-style emphasis).
    layers:  layer indices to steer, None = all.
    heads:   layer -> query heads to steer, None = all heads (in the selected layers).
    method:  "attention" (the bias above), "cad" (context-aware decoding: contrast the next-token logits
             with those of a twin prompt without the steered tokens, weight `cad_beta`) or both.
    """

    alpha: float = 1.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    spans: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    heads: HeadMap | None = None
    auto: AutoStrength | None = None  # strength "auto": alpha stays 1 until the engine picks one
    method: str = "attention"
    cad_beta: float | None = None  # set exactly when the method uses CAD

    @property
    def cad(self) -> bool:
        return self.cad_beta is not None

    @property
    def strength(self) -> float:
        return 1.0 / self.alpha

    @property
    def active(self) -> bool:
        return self.alpha != 1.0


# alpha and strength = 1/alpha are both used (the bias is log(alpha); responses report the strength), so
# both must stay finite and normal: alpha in [MIN_ALPHA, 1], strength in [1, MAX_STRENGTH].
MAX_STRENGTH = 1e300
MIN_ALPHA = 1.0 / MAX_STRENGTH
MAX_SPANS = 128  # each span is searched over the whole prompt
_LAYER_KEY = re.compile(r"-?[0-9]+")  # ASCII only: int() also takes " 1 ", "1_0" and other scripts' digits


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SteeringError(field, f"must be a number, got {type(value).__name__}")
    try:
        x = float(value)
    except OverflowError:  # an int beyond float range
        raise SteeringError(field, "must be a finite number, got an integer too large for a float") from None
    if not math.isfinite(x):
        raise SteeringError(field, "must be finite")
    return x


def _int_list(value: Any, field: str, upper: int, what: str) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise SteeringError(field, f"must be a non-empty list of {what} indices")
    out: list[int] = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise SteeringError(f"{field}[{i}]", f"must be an integer {what} index")
        if not -upper <= v < upper:
            raise SteeringError(f"{field}[{i}]", f"{what} {v} out of range (model has {upper})")
        out.append(v % upper)
    return tuple(sorted(set(out)))


def strength_to_alpha(strength: float, field: str = "strength") -> float:
    s = _number(strength, field)
    if s < 1.0:
        raise SteeringError(field, f"must be >= 1 (1 = off), got {s}")
    if s > MAX_STRENGTH:
        raise SteeringError(field, f"must be <= {MAX_STRENGTH:g} (its alpha = 1/strength must stay normal)")
    return 1.0 / s


def parse_heads(value: Any, field: str, num_layers: int, num_heads: int) -> HeadMap:
    """`{"layer": [heads]}` (JSON keys are strings) or a plain list = those heads in every layer."""
    if isinstance(value, Mapping):
        out: HeadMap = {}
        for key, heads in value.items():
            if isinstance(key, int) and not isinstance(key, bool):
                layer = key
            elif isinstance(key, str) and _LAYER_KEY.fullmatch(key):
                layer = int(key)
            else:
                raise SteeringError(f"{field}.{key}", "layer keys must be integers (ASCII digits)")
            if not -num_layers <= layer < num_layers:
                raise SteeringError(f"{field}.{key}", f"layer {layer} out of range (model has {num_layers})")
            out[layer % num_layers] = _int_list(heads, f"{field}.{key}", num_heads, "head")
        if not out:
            raise SteeringError(field, "must name at least one layer")
        return out
    heads = _int_list(value, field, num_heads, "head")
    return dict.fromkeys(range(num_layers), heads)


def parse_steering(
    obj: Mapping[str, Any] | None,
    *,
    num_layers: int,
    num_heads: int,
    head_profiles: Mapping[str, HeadMap] | None = None,
    default_strength: float = 1.0,
    field: str = "steering",
) -> SteeringSpec:
    """Validate a request's `steering` object; None means the server default strength."""
    if obj is None:
        return SteeringSpec(alpha=strength_to_alpha(default_strength, "default_steering_strength"))
    if not isinstance(obj, Mapping):
        raise SteeringError(field, "must be an object")
    known = {"strength", "alpha", "targets", "spans", "layers", "heads", "head_profile", "method", "cad_beta"}
    known |= AUTO_FIELDS
    unknown = sorted(set(obj) - known)
    if unknown:
        raise SteeringError(f"{field}.{unknown[0]}", f"unknown field; expected one of {sorted(known)}")

    has_s, has_a = obj.get("strength") is not None, obj.get("alpha") is not None
    if has_s and has_a:
        raise SteeringError(field, "give either strength or alpha, not both")
    auto = None
    if has_a:
        alpha = _number(obj["alpha"], f"{field}.alpha")
        if not MIN_ALPHA <= alpha <= 1.0:
            raise SteeringError(f"{field}.alpha", f"must be in [{MIN_ALPHA:g}, 1] (1 = off), got {alpha}")
    elif has_s and obj["strength"] == "auto":
        alpha, auto = 1.0, _parse_auto(obj, field)
    elif has_s:
        alpha = strength_to_alpha(obj["strength"], f"{field}.strength")
    else:
        alpha = strength_to_alpha(default_strength, "default_steering_strength")
    if auto is None and (extra := sorted(k for k in AUTO_FIELDS if obj.get(k) is not None)):
        raise SteeringError(f"{field}.{extra[0]}", 'only applies with "strength": "auto"')
    method, cad_beta = _parse_method(obj, field)
    if method == "cad":
        if (has_s or has_a) and (auto is not None or alpha != 1.0):
            raise SteeringError(
                field,
                'method "cad" applies no attention bias; "attention+cad" combines CAD with a strength',
            )
        alpha = 1.0  # a server default strength does not apply either

    spans = obj.get("spans")
    spans = () if spans is None else spans
    if spans == "auto":  # the chat endpoint replaces it with located spans before it gets here
        raise SteeringError(f"{field}.spans", '"auto" is only available on /v1/chat/completions')
    if not isinstance(spans, Sequence) or isinstance(spans, str):
        raise SteeringError(f"{field}.spans", "must be a list of strings")
    if len(spans) > MAX_SPANS:
        raise SteeringError(f"{field}.spans", f"at most {MAX_SPANS} spans are allowed, got {len(spans)}")
    for i, s in enumerate(spans):
        if not isinstance(s, str) or not s:
            raise SteeringError(f"{field}.spans[{i}]", "must be a non-empty string")

    # With spans and no explicit targets, only the spans are steered (PASTA-style emphasis).
    targets = obj.get("targets")
    if targets is None:
        targets = () if spans else DEFAULT_TARGETS
    if not isinstance(targets, Sequence) or isinstance(targets, str):
        raise SteeringError(f"{field}.targets", "must be a list of roles")
    for i, role in enumerate(targets):
        if role not in ROLES:
            raise SteeringError(f"{field}.targets[{i}]", f"unknown role {role!r}; expected one of {ROLES}")

    layers_v = obj.get("layers", "all")
    layers = (
        None if layers_v in ("all", None) else _int_list(layers_v, f"{field}.layers", num_layers, "layer")
    )

    heads: HeadMap | None = None
    if obj.get("heads") is not None and obj.get("head_profile") is not None:
        raise SteeringError(field, "give either heads or head_profile, not both")
    if obj.get("heads") is not None:
        heads = parse_heads(obj["heads"], f"{field}.heads", num_layers, num_heads)
    elif obj.get("head_profile") is not None:
        name = obj["head_profile"]
        if not isinstance(name, str) or name not in (head_profiles or {}):
            raise SteeringError(
                f"{field}.head_profile",
                f"unknown head profile {name!r}; known: {sorted(head_profiles or {})}",
            )
        heads = dict(head_profiles[name])  # type: ignore[index]
    return SteeringSpec(
        alpha=alpha, targets=tuple(targets), spans=tuple(spans), layers=layers, heads=heads, auto=auto,
        method=method, cad_beta=cad_beta,
    )  # fmt: skip


def _parse_method(obj: Mapping[str, Any], field: str) -> tuple[str, float | None]:
    method = obj.get("method")
    method = "attention" if method is None else method
    if method not in METHODS:
        raise SteeringError(f"{field}.method", f"unknown method {method!r}; expected one of {list(METHODS)}")
    beta = obj.get("cad_beta")
    if "cad" not in method:
        if beta is not None:
            raise SteeringError(f"{field}.cad_beta", 'only applies with method "cad" or "attention+cad"')
        return method, None
    beta = DEFAULT_CAD_BETA if beta is None else _number(beta, f"{field}.cad_beta")
    if not 0.0 < beta <= MAX_CAD_BETA:
        raise SteeringError(f"{field}.cad_beta", f"must be in (0, {MAX_CAD_BETA:g}], got {beta}")
    return method, beta


AUTO_FIELDS = frozenset({"target_ratio", "max_strength"})


def _parse_auto(obj: Mapping[str, Any], field: str) -> AutoStrength:
    default = AutoStrength()  # null = not given, as for every steering field
    target = obj.get("target_ratio")
    target = default.target_ratio if target is None else _number(target, f"{field}.target_ratio")
    if not 0.0 < target < 1.0:
        raise SteeringError(f"{field}.target_ratio", f"must be in (0, 1), got {target}")
    bound = obj.get("max_strength")
    bound = default.max_strength if bound is None else bound
    strength_to_alpha(bound, f"{field}.max_strength")  # the same rule as any strength
    return AutoStrength(target_ratio=target, max_strength=float(bound))

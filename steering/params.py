"""The request's `steering` object, declared once (pydantic, torch-free: clients use it too).

From `SteeringParams` come: validation (`parse` raises `SteeringError` naming the dotted field, e.g.
`steering.strength`; the server answers it as a 400, the client checks it before sending), the OpenAPI
schema (`steering.schema`, with the serving model's layer/head ranges filled in) and the spec
(`to_spec`, which checks what needs the model: index ranges, head profiles, the default strength).
The rules that tie fields together are data (`EXCLUSIVE`, `ONLY_WITH`, `NO_BIAS_METHODS`), read by both
the validator and the schema (steering/schema.py), so the two cannot drift apart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, NamedTuple, Protocol

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic import model_validator as _model_validator

from ctxsteer.steering.spec import (
    BETA_METHODS,
    DEFAULT_CAD_BETA,
    DEFAULT_TARGETS,
    MAX_CAD_BETA,
    MAX_SPANS,
    MAX_STRENGTH,
    METHODS,
    MIN_ALPHA,
    NO_BIAS_METHODS,
    ROLES,
    AutoStrength,
    HeadMap,
    Method,
    Role,
    SteeringError,
    SteeringSpec,
    strength_to_alpha,
)

_LAYER_KEY = re.compile(r"-?[0-9]+")  # ASCII only: int() also takes " 1 ", "1_0" and other scripts' digits
BOUND = "x-bound"  # schema marker: filled from the serving model by `steering_json_schema`
AUTO_SPANS_DOC = ' "auto": the model first quotes the sentences that answer the question; those are steered.'


# ---------------------------------------------------------------- value checks (paths relative to the object)


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SteeringError(path, f"must be a number, got {type(value).__name__}")
    try:
        x = float(value)
    except OverflowError:  # an int beyond float range
        raise SteeringError(path, "must be a finite number, got an integer too large for a float") from None
    if not math.isfinite(x):
        raise SteeringError(path, "must be finite")
    return x


def checked_strength(value: Any, path: str = "strength") -> float:
    """A strength: a number in [1, MAX_STRENGTH] (so that its alpha stays a normal float)."""
    s = _number(value, path)
    if s < 1.0:
        raise SteeringError(path, f"must be >= 1 (1 = off), got {s}")
    if s > MAX_STRENGTH:
        raise SteeringError(path, f"must be <= {MAX_STRENGTH:g} (its alpha = 1/strength must stay normal)")
    return s


def _in(
    path: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False, note: str = ""
) -> Any:
    """The check of a number field in the interval lo..hi (each end closed unless `*_open`)."""
    shown = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}{note}"

    def check(value: Any) -> float:
        x = _number(value, path)
        if (x <= lo if lo_open else x < lo) or (x >= hi if hi_open else x > hi):
            raise SteeringError(path, f"must be in {shown}, got {x}")
        return x

    return check


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _indices(value: Any, path: str, what: str) -> tuple[int, ...]:
    """A non-empty list of integer indices (their range is the model's: `_in_range`)."""
    if not _is_list(value) or not value:
        raise SteeringError(path, f"must be a non-empty list of {what} indices")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise SteeringError(f"{path}[{i}]", f"must be an integer {what} index")
    return tuple(value)


def _in_range(values: Sequence[int], path: str, upper: int, what: str) -> tuple[int, ...]:
    for i, v in enumerate(values):
        if not -upper <= v < upper:
            raise SteeringError(f"{path}[{i}]", f"{what} {v} out of range (model has {upper})")
    return tuple(sorted({v % upper for v in values}))


def _heads_shape(value: Any, path: str = "heads") -> tuple[int, ...] | dict[str, tuple[int, ...]]:
    """`{"layer": [heads]}` (JSON keys are strings) or a plain list = those heads in every layer."""
    if not isinstance(value, Mapping):
        return _indices(value, path, "head")
    out: dict[str, tuple[int, ...]] = {}
    for key, heads in value.items():
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        elif not (isinstance(key, str) and _LAYER_KEY.fullmatch(key)):
            raise SteeringError(f"{path}.{key}", "layer keys must be integers (ASCII digits)")
        out[key] = _indices(heads, f"{path}.{key}", "head")
    if not out:
        raise SteeringError(path, "must name at least one layer")
    return out


def _heads_map(
    heads: tuple[int, ...] | Mapping[str, Sequence[int]], path: str, layers: int, n: int
) -> HeadMap:
    if not isinstance(heads, Mapping):
        return dict.fromkeys(range(layers), _in_range(heads, path, n, "head"))
    out: HeadMap = {}
    for key, hs in heads.items():
        layer = int(key)
        if not -layers <= layer < layers:
            raise SteeringError(f"{path}.{key}", f"layer {layer} out of range (model has {layers})")
        out[layer % layers] = _in_range(hs, f"{path}.{key}", n, "head")
    return out


def parse_heads(value: Any, field: str, num_layers: int, num_heads: int) -> HeadMap:
    """A heads value (request or head-profile file) checked against the model: layer -> sorted heads."""
    return _heads_map(_heads_shape(value, field), field, num_layers, num_heads)


def _targets(value: Any) -> tuple[str, ...]:
    if not _is_list(value):
        raise SteeringError("targets", "must be a list of roles")
    for i, role in enumerate(value):
        if role not in ROLES:
            raise SteeringError(f"targets[{i}]", f"unknown role {role!r}; expected one of {ROLES}")
    return tuple(value)


def _spans(value: Any) -> tuple[str, ...] | str:
    if value == "auto":  # the chat endpoint resolves it before `to_spec`
        return value
    if not _is_list(value):
        raise SteeringError("spans", "must be a list of strings")
    if len(value) > MAX_SPANS:
        raise SteeringError("spans", f"at most {MAX_SPANS} spans are allowed, got {len(value)}")
    for i, s in enumerate(value):
        if not isinstance(s, str) or not s:
            raise SteeringError(f"spans[{i}]", "must be a non-empty string")
    return tuple(value)


def _method(value: Any) -> str:
    if value not in METHODS:
        raise SteeringError("method", f"unknown method {value!r}; expected one of {list(METHODS)}")
    return str(value)


def _profile_name(value: Any) -> str:
    if not isinstance(value, str):
        raise SteeringError("head_profile", f"must be a head profile name, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- the model

# Rules across fields (null = not given): pairs that exclude each other (checked first); fields that only
# apply when an earlier one has one of some values (checked before their own value); and NO_BIAS_METHODS
# apply no bias (any strength or alpha given must be 1; checked last).
EXCLUSIVE = (("strength", "alpha"), ("heads", "head_profile"))
ONLY_WITH: dict[str, tuple[str, tuple[str, ...], str]] = {
    "max_strength": ("strength", ("auto",), 'only applies with "strength": "auto"'),
    "target_ratio": ("strength", ("auto",), 'only applies with "strength": "auto"'),
    "cad_beta": ("method", BETA_METHODS, 'only applies with method "cad" or "attention+cad" (not adacad)'),
}
_NO_BIAS = 'method "{0}" applies no attention bias; "attention+{0}" combines it with a strength'


def _gated(name: str, check: Any) -> BeforeValidator:
    """`check`, after `ONLY_WITH[name]` (the field it needs was validated before: declared earlier)."""
    needs, values, message = ONLY_WITH[name]

    def run(value: Any, info: ValidationInfo) -> Any:
        if info.data.get(needs) not in values:
            raise SteeringError(name, message)
        return check(value)

    return BeforeValidator(run)


# Each field's wire type: the annotation gives the JSON schema, the BeforeValidator the check (and message).
_Strength = Annotated[
    Annotated[float, Field(ge=1, le=MAX_STRENGTH)] | Literal["auto"],
    BeforeValidator(lambda v: v if v == "auto" else checked_strength(v)),
]
_Alpha = Annotated[
    float, Field(ge=MIN_ALPHA, le=1), BeforeValidator(_in("alpha", MIN_ALPHA, 1, note=" (1 = off)"))
]
_Ratio = Annotated[
    float, Field(gt=0, lt=1), _gated("target_ratio", _in("target_ratio", 0, 1, lo_open=True, hi_open=True))
]
_Bound = Annotated[
    float, Field(ge=1, le=MAX_STRENGTH), _gated("max_strength", lambda v: checked_strength(v, "max_strength"))
]
_Method = Annotated[Method, BeforeValidator(_method)]
_Beta = Annotated[
    float, Field(gt=0, le=MAX_CAD_BETA), _gated("cad_beta", _in("cad_beta", 0, MAX_CAD_BETA, lo_open=True))
]
_SpanList = Annotated[tuple[Annotated[str, Field(min_length=1)], ...], Field(max_length=MAX_SPANS)]
_AutoSpans = Annotated[Literal["auto"], WithJsonSchema({"const": "auto", BOUND: "auto_spans"})]
_Spans = Annotated[_SpanList | _AutoSpans, BeforeValidator(_spans)]
_Targets = Annotated[tuple[Role, ...], BeforeValidator(_targets)]
_LayerList = Annotated[
    tuple[Annotated[int, Field(json_schema_extra={BOUND: "layers"})], ...], Field(min_length=1)
]
_Layers = Annotated[
    _LayerList | Literal["all"],
    BeforeValidator(lambda v: v if v == "all" else _indices(v, "layers", "layer")),
]
_HeadList = Annotated[
    tuple[Annotated[int, Field(json_schema_extra={BOUND: "heads"})], ...], Field(min_length=1)
]
_HeadDict = Annotated[dict[Annotated[str, Field(pattern=r"^-?[0-9]+$")], _HeadList], Field(min_length=1)]
_Heads = Annotated[_HeadList | _HeadDict, BeforeValidator(_heads_shape)]
_Profile = Annotated[str, WithJsonSchema({BOUND: "profiles"}), BeforeValidator(_profile_name)]


class ModelShape(Protocol):
    """What `to_spec` needs of the served model (the server's ModelInfo is one)."""

    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...


class Shape(NamedTuple):
    num_layers: int
    num_heads: int


class SteeringParams(BaseModel):
    """Attention steering toward the given roles' messages (see README). 1 = off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # null = not given, for every field. Declaration order = the order errors are reported in.
    strength: _Strength | None = Field(
        None,
        description='"auto": the server picks the smallest strength up to max_strength whose predicted '
        "attention of the prompt on the context reaches target_ratio (local engine).",
    )
    alpha: _Alpha | None = None
    max_strength: _Bound | None = None
    target_ratio: _Ratio | None = None
    method: _Method | None = Field(
        None,
        description='"cad": context-aware decoding (contrast with the prompt without its steered tokens, '
        'weight cad_beta); "adacad": the same contrast weighted per token by the Jensen-Shannon divergence '
        'of the two next-token distributions; "attention+cad", "attention+adacad": with the attention bias '
        "too (local engine, --max-num-seqs >= 2).",
    )
    cad_beta: _Beta | None = None
    spans: _Spans | None = Field(
        None, description="Substrings of the messages to steer; each must occur in one."
    )
    targets: _Targets | None = None
    layers: _Layers | None = None
    heads: _Heads | None = None
    head_profile: _Profile | None = None

    @_model_validator(mode="before")
    @classmethod
    def _object(cls, obj: Any) -> Any:
        """Shape first: an object, known fields, no excluded pair (before any value is looked at)."""
        if not isinstance(obj, Mapping):
            raise SteeringError("", "must be an object")
        if unknown := sorted((k for k in obj if k not in cls.model_fields), key=str):
            raise SteeringError(str(unknown[0]), f"unknown field; expected one of {sorted(cls.model_fields)}")
        for a, b in EXCLUSIVE:
            if obj.get(a) is not None and obj.get(b) is not None:
                raise SteeringError("", f"give either {a} or {b}, not both")
        return dict(obj)

    @_model_validator(mode="after")
    def _together(self) -> SteeringParams:
        biased = self.strength not in (None, 1.0) or self.alpha not in (None, 1.0)
        if self.method in NO_BIAS_METHODS and biased:
            raise SteeringError("", _NO_BIAS.format(self.method))
        return self

    @classmethod
    def parse(cls, obj: Any, field: str = "steering") -> SteeringParams:
        """Validate a request's steering object; `SteeringError` names the culprit under `field`."""
        try:
            return cls.model_validate(obj)
        except ValidationError as e:
            first = e.errors()[0]
            err = first.get("ctx", {}).get("error")
            if not isinstance(err, SteeringError):  # pydantic's own type check, after ours passed
                loc = ".".join(str(p) for p in first["loc"] if isinstance(p, str) and p[:1].islower())
                err = SteeringError(loc, first["msg"])
            sub = err.field
            raise SteeringError(
                field + ("." if sub[:1] not in ("", "[") else "") + sub, err.message
            ) from None

    def to_spec(
        self,
        model: ModelShape,
        *,
        head_profiles: Mapping[str, HeadMap] | None = None,
        default_strength: float = 1.0,
        default_targets: Sequence[str] = DEFAULT_TARGETS,
        field: str = "steering",
    ) -> SteeringSpec:
        """The spec for `model`: index ranges and profile names checked, defaults filled in (the server's
        default strength and targets apply where the request gives none)."""
        alpha, auto = self._alpha(default_strength)
        method = self.method or "attention"
        cad_beta = None
        if method in BETA_METHODS:
            cad_beta = DEFAULT_CAD_BETA if self.cad_beta is None else self.cad_beta
        if method in NO_BIAS_METHODS:
            alpha = 1.0  # a server default strength does not apply either
        if self.spans == "auto":
            raise SteeringError(f"{field}.spans", '"auto" is only available on /v1/chat/completions')
        spans = tuple(self.spans or ())
        # With spans and no explicit targets, only the spans are steered (PASTA-style emphasis).
        targets = self.targets if self.targets is not None else (() if spans else default_targets)
        layers = None
        if self.layers not in (None, "all"):
            layers = _in_range(self.layers, f"{field}.layers", model.num_layers, "layer")  # type: ignore[arg-type]
        return SteeringSpec(
            alpha=alpha, targets=tuple(targets), spans=spans, layers=layers,
            heads=self._heads(model, head_profiles, field), auto=auto, method=method, cad_beta=cad_beta,
        )  # fmt: skip

    def _alpha(self, default_strength: float) -> tuple[float, AutoStrength | None]:
        if self.alpha is not None:
            return self.alpha, None
        if self.strength == "auto":
            default = AutoStrength()
            target = default.target_ratio if self.target_ratio is None else self.target_ratio
            bound = default.max_strength if self.max_strength is None else self.max_strength
            return 1.0, AutoStrength(target_ratio=target, max_strength=bound)
        strength = checked_strength(default_strength, "default_steering_strength")
        return strength_to_alpha(strength if self.strength is None else float(self.strength)), None

    def _heads(self, model: ModelShape, profiles: Mapping[str, HeadMap] | None, field: str) -> HeadMap | None:
        if self.heads is not None:
            return _heads_map(self.heads, f"{field}.heads", model.num_layers, model.num_heads)
        if self.head_profile is None:
            return None
        known = profiles or {}
        if self.head_profile not in known:
            raise SteeringError(
                f"{field}.head_profile", f"unknown head profile {self.head_profile!r}; known: {sorted(known)}"
            )
        return dict(known[self.head_profile])


def parse_steering(
    obj: Mapping[str, Any] | None,
    *,
    num_layers: int,
    num_heads: int,
    head_profiles: Mapping[str, HeadMap] | None = None,
    default_strength: float = 1.0,
    default_targets: Sequence[str] = DEFAULT_TARGETS,
    field: str = "steering",
) -> SteeringSpec:
    """Validate a request's `steering` object into a spec; None means the server defaults."""
    params = SteeringParams() if obj is None else SteeringParams.parse(obj, field)
    shape = Shape(num_layers, num_heads)
    return params.to_spec(
        shape, head_profiles=head_profiles, default_strength=default_strength,
        default_targets=default_targets, field=field,
    )  # fmt: skip

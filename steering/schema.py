"""The steering object's JSON Schema, generated from `SteeringParams` (the OpenAPI document embeds it).

The model's layer/head ranges and head-profile names are only known to the serving server: the model
marks those nodes with `BOUND`, and `steering_json_schema` fills them in. The cross-field rules come from
the same tables the validator reads (`EXCLUSIVE`, `ONLY_WITH`, `NO_BIAS_METHODS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic.json_schema import GenerateJsonSchema

from ctxsteer.steering.params import AUTO_SPANS_DOC, BOUND, EXCLUSIVE, ONLY_WITH, SteeringParams
from ctxsteer.steering.spec import NO_BIAS_METHODS


class _PlainSchema(GenerateJsonSchema):
    """JSON Schema as a client reads it: no generated titles, literals as bare `const`/`enum`."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def literal_schema(self, schema: Any) -> dict[str, Any]:
        out = super().literal_schema(schema)
        out.pop("type", None)
        return out

    def dict_schema(self, schema: Any) -> dict[str, Any]:
        """Keys with a pattern: every key must match it (pydantic's patternProperties lets others through)."""
        out = super().dict_schema(schema)
        if len(patterns := out.get("patternProperties", {})) == 1:
            [(pattern, values)] = patterns.items()
            del out["patternProperties"]
            out.update(propertyNames={"pattern": pattern}, additionalProperties=values)
        return out


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def not_both(a: str, b: str) -> dict[str, Any]:
    """Schema: `a` and `b` are not both given (null counts as not given)."""
    given = {"not": {"type": "null"}}
    return {"not": {"required": [a, b], "properties": {a: given, b: given}}}


def if_given(field: str, then: dict[str, Any], given: dict[str, Any] | None = None) -> dict[str, Any]:
    cond = given or {"not": {"type": "null"}}
    return {"if": {"required": [field], "properties": {field: cond}}, "then": then}


def _fill(node: Any, bounds: Mapping[str, dict[str, Any] | None]) -> Any:
    """Replace each `BOUND` marker by its entry in `bounds` (None: drop that node from its list)."""
    if isinstance(node, list):
        return [x for x in (_fill(n, bounds) for n in node) if x is not None]
    if not isinstance(node, dict):
        return node
    if BOUND in node:
        extra = bounds[node[BOUND]]
        return None if extra is None else {**{k: v for k, v in node.items() if k != BOUND}, **extra}
    return {k: _fill(v, bounds) for k, v in node.items()}


def steering_json_schema(
    num_layers: int, num_heads: int, profiles: Sequence[str], *, auto_spans: bool = False
) -> dict[str, Any]:
    """The steering object's JSON Schema for this server's model; `auto_spans`: spans "auto" is accepted
    (chat completions only)."""
    schema = SteeringParams.model_json_schema(schema_generator=_PlainSchema)
    schema.pop("title", None)
    bounds = {
        "layers": {"minimum": -num_layers, "maximum": num_layers - 1},
        "heads": {"minimum": -num_heads, "maximum": num_heads - 1},
        "profiles": {"enum": list(profiles)} if profiles else {"type": "null"},
        "auto_spans": {} if auto_spans else None,
    }
    schema = _fill(schema, bounds)
    for name, prop in schema["properties"].items():  # each: {"anyOf": [given, null]}, null = not given
        members = prop.pop("anyOf")[:-1]  # pydantic puts the null of `X | None` last
        prop.pop("default", None)
        given = members[0] if len(members) == 1 else {"anyOf": members}
        schema["properties"][name] = nullable({**given, **prop})
    if auto_spans:
        schema["properties"]["spans"]["anyOf"][0]["description"] += AUTO_SPANS_DOC
    rules = [not_both(a, b) for a, b in EXCLUSIVE]
    rules += [
        if_given(name, {"required": [needs], "properties": {needs: {"enum": list(values)}}})
        for name, (needs, values, _) in ONLY_WITH.items()
    ]
    no_bias = {"properties": {k: nullable({"const": 1}) for k in ("strength", "alpha")}}
    rules.append(if_given("method", no_bias, {"enum": list(NO_BIAS_METHODS)}))
    schema["allOf"] = rules
    return schema

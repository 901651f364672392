"""The one steering model: its validator, its JSON schema and its spec agree; the engine-capability check and
the response's `steering` report each live in one place."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jsonschema_rs
import pytest

from ctxsteer.clients.steering import Steering
from ctxsteer.server.api.capabilities import CONTEXT_REPORT, FEATURES, INDICATOR_AUTO, require
from ctxsteer.server.engine.interface import Capability, ModelInfo
from ctxsteer.server.errors import CtxsteerError
from ctxsteer.server.responses import steering_info
from ctxsteer.steering import spec as spec_mod
from ctxsteer.steering.params import Shape, SteeringParams, parse_steering
from ctxsteer.steering.schema import steering_json_schema
from ctxsteer.steering.spec import SteeringError, SteeringSpec, alpha_to_strength, strength_to_alpha

LAYERS, HEADS, PROFILES = 4, 8, {"p": {0: (1,)}}
VALUES: dict[str, list[Any]] = {
    "strength": [1, 2, 0.5, "auto", "x", True, 1e301],
    "alpha": [0.5, 1, 0, 2, "a"],
    "target_ratio": [0.3, 1.0, 0],
    "max_strength": [2, 0.5],
    "targets": [["user"], ["robot"], "user", []],
    "spans": [["x"], [""], "x", [1]],
    "layers": ["all", [0], [9], [], [True], [-4]],
    "heads": [[0], {"1": [0]}, {"9": [0]}, {"x": [0]}, {}, [99], {"-1": [1]}],
    "head_profile": ["p", "nope"],
    "method": ["cad", "attention", "attention+cad", "adacad", "attention+adacad", "bad"],
    "cad_beta": [0.5, 0, 11],
}


def _objects() -> list[dict[str, Any]]:
    """Every steering object of one or two fields drawn from VALUES (a few thousand), plus the empty one."""
    out: list[dict[str, Any]] = [{}]
    for n in (1, 2):
        for keys in itertools.combinations(VALUES, n):
            out += [
                dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(VALUES[k] for k in keys))
            ]
    return out


def _accepted(obj: dict[str, Any]) -> bool:
    try:
        parse_steering(obj, num_layers=LAYERS, num_heads=HEADS, head_profiles=PROFILES)
    except SteeringError:
        return False
    return True


def test_the_schema_accepts_exactly_what_the_validator_accepts() -> None:
    """The schema and the validator come from one model: they may not disagree on any of these objects."""
    schema = steering_json_schema(LAYERS, HEADS, list(PROFILES))
    validator = jsonschema_rs.validator_for(schema)
    disagree = [o for o in _objects() if validator.is_valid(o) != _accepted(o)]
    # A layer key's range is the one rule JSON Schema cannot state ("01" and "1" are the same layer).
    assert disagree and all(o["heads"] == {"9": [0]} for o in disagree)
    assert validator.is_valid({"strength": None, "alpha": 0.5})  # null = not given, in both
    assert _accepted({"strength": None, "alpha": 0.5})


def test_spans_auto_is_in_the_chat_schema_only() -> None:
    chat = jsonschema_rs.validator_for(steering_json_schema(LAYERS, HEADS, [], auto_spans=True))
    other = jsonschema_rs.validator_for(steering_json_schema(LAYERS, HEADS, []))
    assert chat.is_valid({"spans": "auto"}) and not other.is_valid({"spans": "auto"})
    assert not chat.is_valid({"head_profile": "p"})  # no profiles: only null


@pytest.mark.parametrize(
    ("obj", "field", "message"),
    [
        ({"strength": 0.5}, "steering.strength", "must be >= 1 (1 = off), got 0.5"),
        ({"alpha": 0}, "steering.alpha", "must be in [1e-300, 1] (1 = off), got 0.0"),
        ({"strength": 2, "alpha": 0.5}, "steering", "give either strength or alpha, not both"),
        ({"targets": ["robot"]}, "steering.targets[0]", "unknown role 'robot'; expected one of"),
        ({"heads": {"1": [8]}}, "steering.heads.1[0]", "head 8 out of range (model has 8)"),
        ({"target_ratio": 1.0}, "steering.target_ratio", 'only applies with "strength": "auto"'),
        ({"cad_beta": 0}, "steering.cad_beta", 'only applies with method "cad"'),
        ({"method": "cad", "cad_beta": 0}, "steering.cad_beta", "must be in (0, 10], got 0.0"),
        ({"method": "cad", "strength": 2}, "steering", 'method "cad" applies no attention bias'),
        ({"method": "adacad", "alpha": 0.5}, "steering", 'method "adacad" applies no attention bias'),
        ({"method": "adacad", "cad_beta": 1}, "steering.cad_beta", 'only applies with method "cad"'),
        ({"spans": "auto"}, "steering.spans", '"auto" is only available on /v1/chat/completions'),
        ({"colour": 1}, "steering.colour", "unknown field; expected one of ['alpha', "),
    ],
)
def test_errors_name_the_field_with_the_servers_message(obj: Any, field: str, message: str) -> None:
    with pytest.raises(SteeringError) as err:
        parse_steering(obj, num_layers=LAYERS, num_heads=HEADS)
    assert err.value.field == field and err.value.message.startswith(message)


def test_to_spec_fills_defaults_from_the_model() -> None:
    params = SteeringParams.parse({"layers": [-1], "heads": [7]})
    spec = params.to_spec(Shape(LAYERS, HEADS), default_strength=2.0)
    assert spec == SteeringSpec(alpha=0.5, layers=(3,), heads=dict.fromkeys(range(LAYERS), (7,)))
    assert SteeringParams.parse({"method": "cad"}).to_spec(Shape(1, 1), default_strength=4.0).alpha == 1.0
    with pytest.raises(SteeringError, match="layer 4 out of range"):
        SteeringParams.parse({"layers": [4]}).to_spec(Shape(LAYERS, HEADS))


def test_the_client_checks_with_the_same_model() -> None:
    with pytest.raises(SteeringError) as err:
        Steering(strength=2, alpha=0.5)
    assert err.value.field == "steering"
    Steering(layers=[10**6])  # the model's size is the server's to check


def test_strength_and_alpha_convert_in_one_place() -> None:
    assert strength_to_alpha(4.0) == 0.25 and alpha_to_strength(0.25) == 4.0
    assert alpha_to_strength is strength_to_alpha
    auto = parse_steering({"strength": "auto"}, num_layers=1, num_heads=1)
    info = steering_info(auto, [(0, 3)], 10, auto_pick=(2.0, 0.1, 0.5))
    assert (info.strength, info.alpha, info.steered_tokens) == (2.0, 0.5, 3)
    assert info.auto is not None and (info.auto.unsteered_ratio, info.auto.predicted_ratio) == (0.1, 0.5)
    plain = steering_info(parse_steering({"alpha": 0.9}, num_layers=1, num_heads=1), [], 5)
    assert plain.alpha == 0.9 and plain.auto is None and plain.layers == "all"


INFO = ModelInfo("m", "m", "cpu", "float32", 64, 2, 2)


def test_capabilities_come_from_the_engine_flags() -> None:
    assert INFO.capabilities == {Capability.STEERING}
    full = dataclasses.replace(INFO, cad=True, context_attention=True)
    assert full.capabilities == set(Capability)
    assert dataclasses.replace(INFO, steering_unsupported="ALiBi").capabilities == set()


@pytest.mark.parametrize("feature", list(FEATURES))
def test_one_check_refuses_each_feature_the_engine_lacks(feature: str) -> None:
    lacking = dataclasses.replace(INFO, steering_unsupported="no steering here")
    with pytest.raises(CtxsteerError) as err:
        require(lacking, feature, "cad")
    f = FEATURES[feature]
    assert (err.value.status, err.value.param, err.value.code) == (400, f.param, f.code)
    assert err.value.message == ("no steering here" if f.message is None else f.message.format(value="cad"))
    full = dataclasses.replace(INFO, cad=True, context_attention=True)
    require(full, feature)  # served: no error


def test_every_spec_feature_has_a_check() -> None:
    specs = [
        parse_steering(o, num_layers=1, num_heads=1)
        for o in ({"strength": 2}, {"method": "attention+cad", "strength": 2}, {"strength": "auto"})
    ]
    used = {f for s in specs for f in s.features}
    assert used == {spec_mod.ATTENTION, spec_mod.CAD, spec_mod.AUTO_STRENGTH}
    # every contrastive method needs the twin rows (CAD); the "attention+" ones the bias as well
    for method in spec_mod.CAD_METHODS:
        alone = method in spec_mod.NO_BIAS_METHODS
        obj = {"method": method} if alone else {"method": method, "strength": 2}
        features = parse_steering(obj, num_layers=1, num_heads=1).features
        assert features == ((spec_mod.CAD,) if alone else (spec_mod.ATTENTION, spec_mod.CAD)), method
    assert used | {INDICATOR_AUTO, CONTEXT_REPORT} == set(FEATURES)

"""Steering spec validation: one error type, naming the field."""

from __future__ import annotations

import json

import pytest

from ctxsteer.steering.params import parse_steering
from ctxsteer.steering.profiles import load_head_profiles
from ctxsteer.steering.spec import SteeringError


def parse(obj, **kw):
    return parse_steering(obj, num_layers=4, num_heads=8, **kw)


def test_defaults_and_conversions() -> None:
    assert parse(None).alpha == 1.0
    assert parse(None, default_strength=2.0).alpha == 0.5
    s = parse({"strength": 4})
    assert (
        s.alpha == 0.25
        and s.strength == 4
        and s.targets == ("user",)
        and s.layers is None
        and s.heads is None
    )
    assert parse({"alpha": 0.9}).strength == pytest.approx(1 / 0.9)
    assert parse({"strength": 1}).active is False
    assert parse({"strength": 2, "spans": ["x"]}).targets == ()  # spans alone: PASTA-style emphasis
    assert parse({"strength": 2, "layers": [0, -1]}).layers == (0, 3)
    assert parse({"strength": 2, "heads": {"1": [0, 7]}}).heads == {1: (0, 7)}
    assert parse({"strength": 2, "heads": [2]}).heads == {0: (2,), 1: (2,), 2: (2,), 3: (2,)}


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"strength": float("nan")}, "steering.strength"),
        ({"strength": float("inf")}, "steering.strength"),
        ({"strength": 0.5}, "steering.strength"),
        ({"strength": -2}, "steering.strength"),
        ({"strength": "2"}, "steering.strength"),
        ({"strength": True}, "steering.strength"),
        ({"alpha": 0}, "steering.alpha"),
        ({"alpha": 1.5}, "steering.alpha"),
        ({"alpha": -0.1}, "steering.alpha"),
        ({"alpha": 0.5, "strength": 2}, "steering"),
        ({"strength": 2, "targets": ["robot"]}, "steering.targets[0]"),
        ({"strength": 2, "targets": "user"}, "steering.targets"),
        ({"strength": 2, "layers": [4]}, "steering.layers[0]"),
        ({"strength": 2, "layers": []}, "steering.layers"),
        ({"strength": 2, "heads": {"1": [8]}}, "steering.heads.1[0]"),
        ({"strength": 2, "heads": {"9": [0]}}, "steering.heads.9"),
        ({"strength": 2, "head_profile": "nope"}, "steering.head_profile"),
        ({"strength": 2, "spans": [""]}, "steering.spans[0]"),
        ({"strength": 2, "bogus": 1}, "steering.bogus"),
        ("strong", "steering"),
    ],
)
def test_invalid_values_name_the_field(obj, field: str) -> None:
    with pytest.raises(SteeringError) as err:
        parse(obj)
    assert err.value.field == field


def test_head_profiles_file(tmp_path) -> None:
    p = tmp_path / "heads.json"
    p.write_text(json.dumps({"retrieval": {"0": [1, 2], "3": [0]}}))
    profiles = load_head_profiles(p, num_layers=4, num_heads=8)
    assert parse({"strength": 2, "head_profile": "retrieval"}, head_profiles=profiles).heads == {
        0: (1, 2),
        3: (0,),
    }
    t = tmp_path / "heads.toml"
    t.write_text('[retrieval]\n"1" = [5]\n')
    assert load_head_profiles(t, num_layers=4, num_heads=8) == {"retrieval": {1: (5,)}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": {"0": [99]}}))
    with pytest.raises(SteeringError):
        load_head_profiles(bad, num_layers=4, num_heads=8)

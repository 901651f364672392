"""`steering.strength: "auto"`: the chooser (steering.auto_strength), its parsing, and the served path on a
real `ctxsteer serve` (tiny model): the chosen strength is reported, generates exactly what a request at
that fixed strength generates, and the measured unsteered ratio is the strength-1 request's first-token
context attention."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from server_process import ServerProcess, greedy_chat, serve
from tiny import save_tiny_model

from ctxsteer.steering.auto_strength import choose_strength, head_gates, predicted_ratio
from ctxsteer.steering.params import parse_steering
from ctxsteer.steering.rows import SteerRow
from ctxsteer.steering.spec import AutoStrength, SteeringError

MASSES = [[0.1, 0.3, 0.5], [0.2, 0.0, 0.9]]
ALL = [[True] * 3, [True] * 3]


def test_prediction_is_the_per_head_rule() -> None:
    alpha = 0.25
    want = sum(c / (c + alpha * (1 - c)) for row in MASSES for c in row) / 6
    assert predicted_ratio(MASSES, ALL, alpha) == pytest.approx(want)
    assert predicted_ratio(MASSES, ALL, 1.0) == pytest.approx(sum(map(sum, MASSES)) / 6)
    gates = [[True, False, True], [False, False, False]]  # ungated heads keep their mass
    mixed = (0.1 / (0.1 + 0.25 * 0.9) + 0.3 + 0.5 / (0.5 + 0.25 * 0.5) + 0.2 + 0.0 + 0.9) / 6
    assert predicted_ratio(MASSES, gates, 0.25) == pytest.approx(mixed)


def test_choice_is_the_smallest_strength_reaching_the_target() -> None:
    auto = AutoStrength(target_ratio=0.55, max_strength=8.0)
    s, unsteered, predicted = choose_strength(MASSES, ALL, auto)
    assert 1.0 < s < 8.0 and unsteered == pytest.approx(predicted_ratio(MASSES, ALL, 1.0))
    assert predicted >= 0.55 > predicted_ratio(MASSES, ALL, 1 / (s - 1e-6))
    assert choose_strength(MASSES, ALL, AutoStrength(0.2, 8.0))[0] == 1.0  # already there: off
    assert choose_strength(MASSES, ALL, AutoStrength(0.99, 3.0))[0] == 3.0  # out of reach: the bound


def test_head_gates_follow_the_row() -> None:
    row = SteerRow(alpha=0.5, layers=(1,), heads={1: (0, 2)})
    assert head_gates(row, 2, 3) == [[False] * 3, [True, False, True]]
    assert head_gates(SteerRow(), 2, 2) == [[True, True], [True, True]]


def _parse(obj: dict[str, Any]):
    return parse_steering(obj, num_layers=3, num_heads=4)


def test_parsing() -> None:
    spec = _parse({"strength": "auto"})
    assert spec.auto == AutoStrength() and spec.alpha == 1.0 and not spec.active
    spec = _parse({"strength": "auto", "target_ratio": 0.7, "max_strength": 6})
    assert spec.auto == AutoStrength(0.7, 6.0)
    assert _parse({"strength": "auto", "target_ratio": None}).auto == AutoStrength()  # null = not given
    for bad, field in [
        ({"strength": "auto", "target_ratio": 1.0}, "steering.target_ratio"),
        ({"strength": "auto", "target_ratio": "high"}, "steering.target_ratio"),
        ({"strength": "auto", "max_strength": 0.5}, "steering.max_strength"),
        ({"strength": 2, "target_ratio": 0.5}, "steering.target_ratio"),
        ({"max_strength": 3}, "steering.max_strength"),
        ({"strength": "auto", "alpha": 0.5}, "steering"),
        ({"strength": "automatic"}, "steering.strength"),
    ]:
        with pytest.raises(SteeringError) as e:
            _parse(bad)
        assert e.value.field == field, bad


# ---- served --------------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "Answer from the notes."},
    {
        "role": "user",
        "content": "Notes: the north gate opens at dawn.\nQuestion: when does the north gate open?",
    },
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model_dir = save_tiny_model(tmp_path_factory.mktemp("m") / "qwen2", "qwen2")
    with serve(str(model_dir), log_dir=tmp_path_factory.mktemp("logs")) as sp:
        yield sp


def _chat(sp: ServerProcess, steering: dict[str, Any], **body: Any) -> dict[str, Any]:
    r = greedy_chat(sp, MESSAGES, 6, steering=steering, **body)
    assert r.status_code == 200, r.text
    return r.json()


def test_auto_picks_reports_and_equals_that_fixed_strength(server: ServerProcess) -> None:
    plain = _chat(server, {"strength": 1}, report={"context_attention": True})
    base = plain["context_attention"]["choices"][0]["per_token"][0]  # the prompt's last position
    target = min(0.95, base + 0.2)
    auto = _chat(server, {"strength": "auto", "target_ratio": target, "max_strength": 50})
    info = auto["steering"]
    assert info["auto"]["unsteered_ratio"] == pytest.approx(base, abs=1e-5)
    assert 1.0 < info["strength"] < 50 and info["alpha"] == pytest.approx(1 / info["strength"])
    assert info["auto"]["predicted_ratio"] >= target and info["auto"]["target_ratio"] == target
    fixed = _chat(server, {"strength": info["strength"]})
    assert auto["choices"][0]["message"]["content"] == fixed["choices"][0]["message"]["content"]
    drop = "prompt_tokens_details"  # the prefix cache served the later request more of its prompt
    assert {**auto["usage"], drop: None} == {**fixed["usage"], drop: None}


def test_auto_stays_off_when_the_prompt_already_reads_its_context(server: ServerProcess) -> None:
    low = _chat(server, {"strength": "auto", "target_ratio": 0.001})
    assert low["steering"]["strength"] == 1.0 and low["steering"]["auto"]["predicted_ratio"] >= 0.001
    capped = _chat(server, {"strength": "auto", "target_ratio": 0.999, "max_strength": 1.5})
    assert capped["steering"]["strength"] == 1.5


def test_streamed_auto_reports_the_choice(server: ServerProcess) -> None:
    import json

    r = greedy_chat(server, MESSAGES, 4, steering={"strength": "auto", "max_strength": 3}, stream=True)
    frames = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    steering = [f["steering"] for f in frames if "steering" in f]
    assert len(steering) == 1 and steering[0]["auto"]["max_strength"] == 3.0
    assert 1.0 <= steering[0]["strength"] <= 3.0 and "unsteered_ratio" in steering[0]["auto"]


def test_eval_harness_takes_auto() -> None:
    """`ctxsteer eval ... --strengths 1,2,auto`: auto is sent as "auto" and labelled so in tables/files."""
    from ctxsteer.clients.eval.api import AUTO_STRENGTH, steering_payload
    from ctxsteer.clients.eval.cli import _strengths
    from ctxsteer.clients.eval.plots import file_label, strength_label

    assert _strengths("1,2,auto") == [1.0, 2.0, AUTO_STRENGTH]
    assert steering_payload(AUTO_STRENGTH) == {"steering": {"strength": "auto"}}
    assert steering_payload(2) == {"steering": {"strength": 2.0}}
    assert strength_label(AUTO_STRENGTH) == "auto" and file_label(AUTO_STRENGTH) == "auto"
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        _strengths("0.5")

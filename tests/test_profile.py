"""`ctxsteer profile` against a real `ctxsteer serve` of a tiny model: the probes it sends (baseline, one
layer, one head), resume, the profile file that `--head-profiles` loads, the figure; and the choice rule."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from server_process import serve
from tiny import save_tiny_model

from ctxsteer.clients.eval.profile import WHOLE_LAYER, choose, gains
from ctxsteer.clients.eval.profile import main as profile
from ctxsteer.steering.profiles import load_head_profiles


def test_gains_and_choice() -> None:
    cells = [
        {"id": "a", "layer": -1, "head": -1, "f1": 0.5},
        {"id": "b", "layer": -1, "head": -1, "f1": 0.0},
        {"id": "a", "layer": 0, "head": -1, "f1": 1.0},
        {"id": "b", "layer": 0, "head": -1, "f1": 0.0},
        {"id": "a", "layer": 1, "head": -1, "f1": 0.0},
        {"id": "b", "layer": 1, "head": -1, "f1": 0.0},
        {"id": "a", "layer": 0, "head": 2, "f1": 1.0},
        {"id": "b", "layer": 0, "head": 2, "f1": 1.0},
        {"id": "a", "layer": 0, "head": 1, "f1": 0.5},  # no baseline for "c": left out
        {"id": "c", "layer": 0, "head": 1, "f1": 1.0},
    ]
    g = gains(cells, "f1")
    assert g == {(0, WHOLE_LAYER): 0.25, (1, WHOLE_LAYER): -0.25, (0, 2): 0.75, (0, 1): 0.0}
    assert choose(g, 4, 3, heads=False) == {"0": [0, 1, 2, 3]}  # layer 1 did not help
    assert choose(g, 4, 3, heads=True) == {"0": [2]}  # head 1 gained nothing
    assert choose({(1, WHOLE_LAYER): -0.1}, 4, 3, heads=False) == {}


def test_profile_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    rows = [
        {"id": f"q{i}", "context": f"Box {i} has code {100 + i}.", "question": f"What is box {i}'s code?",
         "answer": str(100 + i)}
        for i in range(5)
    ]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = save_tiny_model(tmp_path / "m", "llama")
    out = tmp_path / "prof"
    with serve(str(model_dir), log_dir=tmp_path) as sp:
        card = httpx.get(f"{sp.url}/v1/models").json()["data"][0]
        assert (card["num_layers"], card["num_heads"]) == (3, 4)
        args = ["--url", sp.url, "--task", str(data), "--limit", "3", "--heads", "--top-layers", "2",
                "--max-tokens", "3", "--out", str(out), "--no-progress"]  # fmt: skip
        assert profile(args) == 0
        stored = json.loads((out / "results.json").read_text())
        cells = stored["cells"]
        # 3 items x (baseline + 3 layers) + 3 items x 2 best layers x 4 heads; the last 3 items only
        assert len(cells) == 3 * 4 + 3 * 2 * 4 and {c["id"] for c in cells} == {"q2", "q3", "q4"}
        summary = json.loads((out / "summary.json").read_text())
        assert summary["ran"] == len(cells) and len(summary["layer_gains"]) == 3
        assert len(summary["head_gains"]) == 8 and (out / "scores.png").stat().st_size > 1000
        assert profile(args) == 0  # resumed: nothing runs again
        assert json.loads((out / "summary.json").read_text())["ran"] == 0
        profiles = load_head_profiles(out / "profile.json", num_layers=3, num_heads=4)
        assert set(profiles) <= {"profiled"}

    # the file serves: a request naming the profile steers exactly its heads
    profiled = json.loads((out / "profile.json").read_text()) or {"profiled": {"1": [0, 3]}}
    (out / "serve.json").write_text(json.dumps(profiled))
    with serve(str(model_dir), "--head-profiles", str(out / "serve.json"), log_dir=tmp_path) as sp:
        body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2, "temperature": 0,
                "steering": {"strength": 3, "head_profile": "profiled"}}  # fmt: skip
        r = httpx.post(f"{sp.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        body["steering"] = {"strength": 3, "heads": profiled["profiled"]}
        same = httpx.post(f"{sp.url}/v1/chat/completions", json=body, timeout=60).json()
        assert r.json()["choices"][0]["message"] == same["choices"][0]["message"]


def test_profile_refuses_a_bad_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert profile(["--url", "http://127.0.0.1:9", "--task", "trivia", "--out", str(tmp_path)]) == 1
    assert "--task must be one of" in capsys.readouterr().err

"""Context-aware decoding (`steering.method` "cad" / "attention+cad"): the twin's prompt, the spec, the
engine's logits against a direct computation of the formula (tiny models, eager reference attention, no
KV cache), batching invisible both to CAD rows and to their plain neighbours, seats and aborts, and the
served API (reported method, errors, usage, streaming, n)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from server_process import ServerProcess, greedy_chat, serve
from steer_reference import RefSteer, register_reference
from tiny import make_model, make_tokenizer, save_tiny_model

from ctxsteer.server.engine.interface import ModelInfo
from ctxsteer.server.engine.local.engine import LocalEngine
from ctxsteer.server.engine.request import GenerationOutput, GenerationRequest, SamplingParams
from ctxsteer.steering.attention import ATTN_NAME, register
from ctxsteer.steering.cad import CadPlan, cad_logits, context_free_ids
from ctxsteer.steering.params import parse_steering
from ctxsteer.steering.rows import SteerRow
from ctxsteer.steering.spec import DEFAULT_CAD_BETA, SteeringError

TOL = 1e-4  # fp32 logprobs: the engine (SDPA, KV cache, batched) vs eager attention without a cache


def test_context_free_prompt_drops_exactly_the_steered_tokens() -> None:
    ids = list(range(10, 20))
    assert context_free_ids(ids, [(2, 5), (7, 8)]) == [10, 11, 15, 16, 18, 19]
    assert context_free_ids(ids, [(2, 5), (3, 6)]) == [10, 11, 16, 17, 18, 19]  # overlaps once
    assert context_free_ids(ids, []) == ids
    assert context_free_ids(ids, [(0, 10)]) == []


def test_cad_formula() -> None:
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 2.5, 1.0])
    assert torch.allclose(cad_logits(a, b, 0.5), 1.5 * a - 0.5 * b)


def _parse(obj: dict[str, Any], default_strength: float = 1.0):
    return parse_steering(obj, num_layers=3, num_heads=4, default_strength=default_strength)


def test_spec() -> None:
    assert _parse({}).method == "attention" and _parse({}).cad_beta is None
    cad = _parse({"method": "cad"}, default_strength=2.0)
    assert cad.cad_beta == DEFAULT_CAD_BETA and cad.alpha == 1.0  # CAD alone: no bias, default or not
    both = _parse({"method": "attention+cad", "strength": 2, "cad_beta": 1})
    assert both.alpha == 0.5 and both.cad_beta == 1.0 and both.method == "attention+cad"
    for bad, field in [
        ({"method": "contrastive"}, "steering.method"),
        ({"method": 3}, "steering.method"),
        ({"cad_beta": 0.5}, "steering.cad_beta"),
        ({"method": "attention", "cad_beta": 0.5}, "steering.cad_beta"),
        ({"method": "cad", "cad_beta": 0}, "steering.cad_beta"),
        ({"method": "cad", "cad_beta": 11}, "steering.cad_beta"),
        ({"method": "cad", "cad_beta": "big"}, "steering.cad_beta"),
        ({"method": "cad", "strength": 2}, "steering"),
        ({"method": "cad", "strength": "auto"}, "steering"),
    ]:
        with pytest.raises(SteeringError) as e:
            _parse(bad)
        assert e.value.field == field, bad


# ---- the engine ------------------------------------------------------------------------------------


def _engine(arch: str, **kw: Any) -> LocalEngine:
    register()
    model = make_model(arch, attn_implementation=ATTN_NAME)
    cfg = model.config
    info = ModelInfo(arch, arch, "cpu", "float32", 512, cfg.num_hidden_layers, cfg.num_attention_heads)
    return LocalEngine(model, make_tokenizer(), info, **kw)


def _prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 500, (length,), generator=g).tolist()


def _request(
    rid: str, ids: list[int], *, alpha: float = 1.0, beta: float | None = 0.7, max_tokens: int = 8
) -> GenerationRequest:
    steered = ((3, len(ids) * 2 // 3),)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=5
    )
    cad = None if beta is None else CadPlan(tuple(context_free_ids(ids, steered)), beta)
    return GenerationRequest(rid, ids, params, SteerRow(alpha=alpha, steered=steered), cad=cad)


async def _outputs(engine: LocalEngine, req: GenerationRequest) -> list[GenerationOutput]:
    return [out async for out in engine.generate(req)]


def _solo_then_busy(
    engine: LocalEngine, reqs: list[GenerationRequest]
) -> tuple[list[list[GenerationOutput]], list[list[GenerationOutput]], int]:
    async def main() -> tuple[list[list[GenerationOutput]], list[list[GenerationOutput]], int]:
        await engine.start()
        solo = [await _outputs(engine, r) for r in reqs]
        busy = list(await asyncio.gather(*(_outputs(engine, r) for r in reqs)))
        live = engine.runner.live_rows
        await engine.shutdown()
        return solo, busy, live

    return asyncio.run(main())


def _tokens(outs: list[GenerationOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def _logprobs(outs: list[GenerationOutput]) -> list[dict[int, float]]:
    return [{t: lp for t, _, lp in p.top} for o in outs for p in o.logprobs]


@torch.no_grad()
def two_rows(arch: str, req: GenerationRequest, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(with context, without) next-token logits of each generated token's step, computed directly: full
    forwards without a cache, the paper's rule in eager attention for the steered row, the plain model on
    the context-free prompt for the twin."""
    model = make_model(arch, attn_implementation=register_reference())
    assert req.cad is not None
    out = []
    for t in range(len(tokens)):
        full = torch.tensor([req.prompt_ids + tokens[:t]])
        ref = RefSteer([req.steer], [len(req.prompt_ids)], [0])
        with_ctx = model(input_ids=full, ctxsteer_ref=ref).logits[0, -1].float()
        free = torch.tensor([list(req.cad.free_ids) + tokens[:t]])
        out.append((with_ctx, model(input_ids=free).logits[0, -1].float()))
    return out


def _reference(arch: str, req: GenerationRequest, tokens: list[int]) -> list[torch.Tensor]:
    """CAD log-probabilities of each generated token's step: the formula on `two_rows`."""
    assert req.cad is not None and req.cad.beta is not None
    beta = req.cad.beta
    return [torch.log_softmax((1 + beta) * w - beta * wo, -1) for w, wo in two_rows(arch, req, tokens)]


@pytest.mark.parametrize(("arch", "alpha"), [("llama", 1.0), ("qwen2", 0.4), ("gemma3", 0.5)])
def test_engine_cad_equals_the_formula(arch: str, alpha: float) -> None:
    """method "cad" (alpha 1) and "attention+cad": greedy tokens are the argmax of the CAD distribution
    and the reported logprobs are its log-softmax (top 5, 1e-4)."""
    req = _request("cad", _prompt(1, 40), alpha=alpha)
    engine = _engine(arch, max_num_seqs=4, prefill_chunk=16)  # chunked prefill of both rows
    (outs,), _, _ = _solo_then_busy(engine, [req])
    tokens = _tokens(outs)
    assert len(tokens) == 8
    assert_follows(_reference(arch, req, tokens), outs)


def assert_follows(refs: list[torch.Tensor], outs: list[GenerationOutput]) -> None:
    """Each greedy token is the argmax of its step's reference log-probabilities, and the reported top-5
    logprobs are those (TOL)."""
    tokens = _tokens(outs)
    for step, (ref, got) in enumerate(zip(refs, _logprobs(outs), strict=True)):
        assert int(ref.argmax()) == tokens[step]
        top = torch.topk(ref, 5)
        assert set(got) == set(top.indices.tolist()), step
        for tid, lp in got.items():
            assert lp == pytest.approx(float(ref[tid]), abs=TOL)


def assert_same_outputs(a: list[list[GenerationOutput]], b: list[list[GenerationOutput]]) -> None:
    """The same tokens and top logprobs (TOL), request by request."""
    for s, o in zip(a, b, strict=True):
        assert _tokens(s) == _tokens(o)
        for ls, lo in zip(_logprobs(s), _logprobs(o), strict=True):
            assert ls.keys() == lo.keys() and all(abs(ls[k] - lo[k]) < TOL for k in ls)


def test_cad_batched_equals_solo_and_leaves_neighbours_unchanged() -> None:
    plain = [_request(f"p{i}", _prompt(10 + i, 20 + 7 * i), alpha=0.5, beta=None) for i in range(4)]
    cads = [
        _request(f"c{i}", _prompt(20 + i, 30 + 5 * i), alpha=[1.0, 0.5][i], beta=0.3 + i) for i in range(2)
    ]
    reqs = [plain[0], cads[0], plain[1], plain[2], cads[1], plain[3]]
    engine = _engine("llama", max_num_seqs=8, prefill_chunk=16)
    solo, busy, live = _solo_then_busy(engine, reqs)
    assert_same_outputs(solo, busy)
    assert live == 0  # every row and twin left its slot
    # CAD changes what the row computes (the same request without it differs)
    no_cad = _request("n", cads[1].prompt_ids, alpha=0.5, beta=None)
    (outs,), _, _ = _solo_then_busy(_engine("llama", max_num_seqs=8), [no_cad])
    assert _logprobs(outs) != _logprobs(solo[4])


def test_cad_takes_two_seats_and_leaves_with_its_twin() -> None:
    """max_num_seqs 3: two CAD requests cannot run at once (4 rows), but both finish; an aborted CAD
    request frees its twin's slot too."""
    engine = _engine("llama", max_num_seqs=3)
    reqs = [_request(f"c{i}", _prompt(30 + i, 24), max_tokens=6) for i in range(2)]

    async def main() -> tuple[list[list[int]], int, int]:
        await engine.start()
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, engine.runner.live_rows)
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        done = await asyncio.gather(*(_outputs(engine, r) for r in reqs))
        long = _request("long", _prompt(40, 24), max_tokens=400)
        agen = engine.generate(long)
        await agen.__anext__()  # the first token: running, with its twin
        rows_while_running = engine.runner.live_rows
        await agen.aclose()  # the client goes away
        for _ in range(200):
            if engine.runner.live_rows == 0:
                break
            await asyncio.sleep(0.01)
        watcher.cancel()
        left = engine.runner.live_rows
        await engine.shutdown()
        assert rows_while_running == 2
        return [_tokens(o) for o in done], peak, left

    tokens, peak, left = asyncio.run(main())
    assert [len(t) for t in tokens] == [6, 6] and peak == 2 and left == 0


# ---- served -------------------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "Answer from the notes."},
    {"role": "user", "content": "Notes: the north gate opens at dawn."},
    {"role": "user", "content": "When does the north gate open?", "steer": False},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model_dir = save_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama")
    with serve(str(model_dir), log_dir=tmp_path_factory.mktemp("logs")) as sp:
        yield sp


def _tokenize(sp: ServerProcess, messages: list[dict[str, Any]]) -> int:
    import httpx

    r = httpx.post(f"{sp.url}/tokenize", json={"messages": messages}, timeout=30)
    assert r.status_code == 200, r.text
    return int(r.json()["count"])


def test_served_cad_reports_method_and_counts_the_twin(server: ServerProcess) -> None:
    steering = {"method": "attention+cad", "strength": 2, "cad_beta": 1.5}
    r = greedy_chat(server, MESSAGES, 5, steering=steering)
    assert r.status_code == 200, r.text
    body = r.json()
    info = body["steering"]
    assert info["method"] == "attention+cad" and info["cad_beta"] == 1.5 and info["strength"] == 2.0
    n_prompt = _tokenize(server, MESSAGES)
    # the twin: the prompt without the steered notes (steered_tokens of them)
    assert body["usage"]["prompt_tokens"] == 2 * n_prompt - info["steered_tokens"]
    assert body["usage"]["completion_tokens"] == 5
    plain = greedy_chat(server, MESSAGES, 5).json()
    assert plain["steering"]["method"] == "attention" and "cad_beta" not in plain["steering"]
    assert plain["usage"]["prompt_tokens"] == n_prompt

    # streamed and n=2: the same greedy text per choice as the plain request of the same settings
    s = greedy_chat(server, MESSAGES, 5, steering=steering, stream=True, n=2)
    frames = [json.loads(line[6:]) for line in s.text.splitlines() if line.startswith("data: {")]
    texts = ["", ""]
    for f in frames:
        for c in f.get("choices", []):
            texts[c["index"]] += c["delta"].get("content") or ""
    assert texts == [body["choices"][0]["message"]["content"]] * 2


def test_served_cad_errors(server: ServerProcess) -> None:
    for steering, param in [
        ({"method": "cads"}, "steering.method"),
        ({"method": "cad", "cad_beta": -1}, "steering.cad_beta"),
        ({"cad_beta": 1}, "steering.cad_beta"),
    ]:
        r = greedy_chat(server, MESSAGES, 2, steering=steering)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param


def test_eval_harness_sends_cad_with_the_context_as_the_span(server: ServerProcess, tmp_path) -> None:  # noqa: ANN001
    from ctxsteer.clients.eval.api import steering_payload
    from ctxsteer.clients.eval.qa import QAConfig, run_qa

    assert steering_payload(1, "cad", 1.0, "the notes") == {
        "steering": {"strength": 1.0, "method": "cad", "cad_beta": 1.0, "spans": ["the notes"]}
    }
    assert steering_payload(2, "attention", None, "the notes") == {"steering": {"strength": 2.0}}
    extra = {"head_profile": "profiled"}  # `ctxsteer eval --steering JSON`
    assert steering_payload(2, None, None, "x", extra) == {"steering": {"strength": 2.0, **extra}}
    import argparse

    from ctxsteer.clients.eval.cli import _json_object

    assert _json_object('{"spans": "auto"}') == {"spans": "auto"}
    for bad in ("[1]", "{oops"):
        with pytest.raises(argparse.ArgumentTypeError):
            _json_object(bad)
    cfg = QAConfig(
        url=server.url, task="conflict", out=tmp_path, limit=3, strengths=[1], max_tokens=3, progress=False,
        method="cad", cad_beta=1.0,
    )  # fmt: skip
    res = asyncio.run(run_qa(cfg))
    # the tiny model's 512-token context skips long items; nothing else may fail
    assert res.cells and all(s["reason"].startswith("context too long") for s in res.report.skipped)
    assert len(res.cells) + len(res.report.skipped) == 3
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["meta"]["method"] == "cad" and stored["meta"]["cad_beta"] == 1.0

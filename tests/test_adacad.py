"""AdaCAD (`steering.method` "adacad" / "attention+adacad"; Wang et al., NAACL 2025, arXiv 2409.07394): the
per-token weight and the contrast against a literal implementation of the paper's formula written here in
plain Python (float64), the spec and its 400s, the engine's tokens and logprobs against the formula on
full forwards (tiny models, fp32), batching invisible to AdaCAD rows and to their neighbours, and the served
API (reported method, usage, the refusal where the engine has no twin rows)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import pytest
import torch
from fake_engine import FakeEngine, make_byte_tokenizer
from fastapi.testclient import TestClient
from server_process import ServerProcess, greedy_chat, serve
from test_cad import (
    MESSAGES,
    _engine,
    _logprobs,
    _prompt,
    _request,
    _solo_then_busy,
    _tokenize,
    _tokens,
    assert_follows,
    assert_same_outputs,
    two_rows,
)
from tiny import save_tiny_model

from ctxsteer.server.api.capabilities import FEATURES, require
from ctxsteer.server.app import build_app
from ctxsteer.server.config import ServerConfig
from ctxsteer.server.engine.interface import ModelInfo
from ctxsteer.server.engine.request import GenerationRequest
from ctxsteer.server.errors import CtxsteerError
from ctxsteer.steering import spec as spec_mod
from ctxsteer.steering.cad import CONTRASTS, CadPlan, adacad_logits, cad_logits, jsd_bits
from ctxsteer.steering.params import parse_steering
from ctxsteer.steering.spec import SteeringError

# ---- the formula, literally ---------------------------------------------------------------------------


def _softmax(z: Sequence[float]) -> list[float]:
    top = max(z)
    e = [math.exp(x - top) for x in z]
    total = sum(e)
    return [x / total for x in e]


def literal_adacad(with_ctx: Sequence[float], without: Sequence[float]) -> tuple[float, list[float]]:
    """(alpha, logits): alpha = JSD(p || q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, in bits;
    logits = (1 + alpha) * with - alpha * without."""
    p, q = _softmax(with_ctx), _softmax(without)
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]

    def kl(x: list[float]) -> float:
        return sum(a * math.log2(a / b) for a, b in zip(x, m, strict=True) if a > 0)

    alpha = 0.5 * kl(p) + 0.5 * kl(q)
    return alpha, [(1 + alpha) * a - alpha * b for a, b in zip(with_ctx, without, strict=True)]


def test_weight_and_logits_equal_the_literal_formula() -> None:
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 1.0, 4.0, 12.0]).view(4, 1, 1)
    w = torch.randn(4, 3, 64, generator=g) * scales  # from near-uniform to peaked distributions
    wo = torch.randn(4, 3, 64, generator=g) * scales
    got_alpha, got = jsd_bits(w, wo), adacad_logits(w, wo)
    assert got_alpha.shape == (4, 3, 1) and got.shape == w.shape and got.dtype == torch.float32
    alphas = []
    for i in range(4):
        for j in range(3):
            alpha, logits = literal_adacad(w[i, j].tolist(), wo[i, j].tolist())
            alphas.append(alpha)
            assert float(got_alpha[i, j, 0]) == pytest.approx(alpha, abs=1e-6)
            assert got[i, j].tolist() == pytest.approx(logits, abs=1e-4)
    assert min(alphas) < 0.05 and max(alphas) > 0.5  # the cases span the weight's range
    # a single row [V] as the engine passes it
    alpha, logits = literal_adacad(w[3, 0].tolist(), wo[3, 0].tolist())
    assert adacad_logits(w[3, 0], wo[3, 0]).tolist() == pytest.approx(logits, abs=1e-4)


def test_agreeing_distributions_are_not_pushed() -> None:
    """Identical distributions (even from logits shifted by a constant): weight 0, the same distribution."""
    w = torch.randn(2, 300, generator=torch.Generator().manual_seed(1)) * 5
    for wo in (w.clone(), w + 2.5):
        assert float(jsd_bits(w, wo).max()) < 1e-6
        out = adacad_logits(w, wo)
        assert torch.allclose(torch.softmax(out, -1), torch.softmax(w, -1), atol=1e-6)
    # CAD at a fixed weight moves the same pair once the distributions differ; AdaCAD barely, when they
    # differ barely
    near = w + 0.01 * torch.randn(2, 300, generator=torch.Generator().manual_seed(2))
    ada, cad = adacad_logits(w, near), cad_logits(w, near, 1.0)
    assert (ada - w).abs().max() < 0.01 * (cad - w).abs().max()


def test_disjoint_distributions_get_the_full_weight() -> None:
    w = torch.tensor([60.0, 0.0, 0.0, 0.0])
    wo = torch.tensor([0.0, 60.0, 0.0, 0.0])
    assert float(jsd_bits(w, wo)) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(adacad_logits(w, wo), 2 * w - wo, atol=1e-4)


def test_low_precision_logits_keep_their_dtype() -> None:
    w = torch.randn(5, 40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    wo = torch.randn(5, 40, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    out = adacad_logits(w, wo)
    assert out.dtype == torch.bfloat16
    ref = torch.tensor(
        [literal_adacad(a.tolist(), b.tolist())[1] for a, b in zip(w.float(), wo.float(), strict=True)]
    )
    assert torch.allclose(out.float(), ref, atol=0.1)  # bf16 rounding of logits of size ~3


def test_the_plan_dispatches_by_rule() -> None:
    w, wo = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.5, 1.0])
    assert torch.equal(CadPlan((1,), None, "adacad").combine(w, wo), adacad_logits(w, wo))
    assert torch.equal(CadPlan((1,), 0.5).combine(w, wo), cad_logits(w, wo, 0.5))
    for beta, rule in [(0.5, "adacad"), (None, "cad"), (1.0, "contrastive")]:
        with pytest.raises(ValueError, match="no contrast rule"):
            CadPlan((1,), beta, rule)
    assert set(spec_mod.CONTRAST_RULES.values()) == set(CONTRASTS)


# ---- the spec and its 400s ---------------------------------------------------------------------------


def _parse(obj: dict[str, object], default_strength: float = 1.0) -> spec_mod.SteeringSpec:
    return parse_steering(obj, num_layers=3, num_heads=4, default_strength=default_strength)


def test_spec() -> None:
    alone = _parse({"method": "adacad"}, default_strength=2.0)
    assert (alone.alpha, alone.cad_beta, alone.contrast, alone.cad) == (1.0, None, "adacad", True)
    both = _parse({"method": "attention+adacad", "strength": 2})
    assert (both.alpha, both.cad_beta, both.contrast) == (0.5, None, "adacad")
    assert _parse({"method": "cad"}).contrast == "cad" and _parse({}).contrast is None
    for bad, field, message in [
        ({"method": "adacad", "cad_beta": 1}, "steering.cad_beta", 'only applies with method "cad"'),
        ({"method": "attention+adacad", "cad_beta": 1}, "steering.cad_beta", "only applies with"),
        ({"method": "adacad", "strength": 2}, "steering", 'method "adacad" applies no attention bias'),
        ({"method": "adacad", "strength": "auto"}, "steering", 'method "adacad" applies no'),
        ({"method": "ada-cad"}, "steering.method", "unknown method 'ada-cad'"),
    ]:
        with pytest.raises(SteeringError) as e:
            _parse(bad)
        assert e.value.field == field and e.value.message.startswith(message), bad


def test_engines_without_twin_rows_refuse_it() -> None:
    """--engine vllm (like the fake engine and --max-num-seqs 1) has no twin rows: the CAD refusal."""
    info = ModelInfo("m", "m", "cpu", "float32", 64, 2, 2)
    feature = FEATURES[spec_mod.CAD]
    for method in ("adacad", "attention+adacad"):
        assert spec_mod.CAD in _parse({"method": method}).features
        with pytest.raises(CtxsteerError) as err:
            require(info, spec_mod.CAD, method)
        assert (err.value.status, err.value.param, err.value.code) == (400, feature.param, feature.code)
        assert repr(method) in err.value.message
    require(dataclasses.replace(info, cad=True), spec_mod.CAD, "adacad")
    app = build_app(ServerConfig(), FakeEngine(make_byte_tokenizer()))
    with TestClient(app) as client:
        body = {"model": "fake-model", "messages": MESSAGES, "steering": {"method": "adacad"}}
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (
        "steering.method",
        "unsupported_method",
    )


# ---- the engine ----------------------------------------------------------------------------------------


def _adacad(req: GenerationRequest) -> GenerationRequest:
    assert req.cad is not None
    return dataclasses.replace(req, cad=CadPlan(req.cad.free_ids, None, "adacad"))


def _reference(arch: str, req: GenerationRequest, tokens: list[int]) -> list[torch.Tensor]:
    """AdaCAD log-probabilities of each step: the literal formula on the two rows' direct forwards."""
    out = []
    for w, wo in two_rows(arch, req, tokens):
        _, logits = literal_adacad(w.double().tolist(), wo.double().tolist())
        out.append(torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1))
    return out


@pytest.mark.parametrize(("arch", "alpha"), [("llama", 1.0), ("qwen2", 0.4), ("gemma3", 0.5)])
def test_engine_adacad_equals_the_formula(arch: str, alpha: float) -> None:
    """ "adacad" (alpha 1) and "attention+adacad": greedy tokens are the argmax of the AdaCAD distribution
    and the reported logprobs its log-softmax (top 5, 1e-4), through chunked prefill."""
    req = _adacad(_request("ada", _prompt(1, 40), alpha=alpha))
    engine = _engine(arch, max_num_seqs=4, prefill_chunk=16)
    (outs,), _, _ = _solo_then_busy(engine, [req])
    tokens = _tokens(outs)
    assert len(tokens) == 8
    assert_follows(_reference(arch, req, tokens), outs)


def test_adacad_batched_equals_solo_and_leaves_neighbours_unchanged() -> None:
    plain = [_request(f"p{i}", _prompt(50 + i, 18 + 6 * i), alpha=0.5, beta=None) for i in range(3)]
    ada = [_adacad(_request(f"a{i}", _prompt(60 + i, 28 + 5 * i), alpha=[1.0, 0.5][i])) for i in range(2)]
    cad = _request("c", _prompt(70, 33), beta=1.0)
    reqs = [plain[0], ada[0], plain[1], cad, ada[1], plain[2]]
    solo, busy, live = _solo_then_busy(_engine("llama", max_num_seqs=10, prefill_chunk=16), reqs)
    assert_same_outputs(solo, busy)
    assert live == 0  # every row and twin left its slot
    # the contrast changes what the row computes: the same request without it, or with CAD, differs
    for other in (
        dataclasses.replace(ada[1], cad=None),
        _request("b", ada[1].prompt_ids, alpha=0.5, beta=1.0),
    ):
        (outs,), _, _ = _solo_then_busy(_engine("llama", max_num_seqs=4), [other])
        assert _logprobs(outs) != _logprobs(solo[4])


# ---- served ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model_dir = save_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama")
    with serve(str(model_dir), log_dir=tmp_path_factory.mktemp("logs")) as sp:
        yield sp


def test_served_adacad(server: ServerProcess) -> None:
    r = greedy_chat(server, MESSAGES, 5, steering={"method": "attention+adacad", "strength": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    info = body["steering"]
    assert info["method"] == "attention+adacad" and info["strength"] == 2.0 and "cad_beta" not in info
    n_prompt = _tokenize(server, MESSAGES)
    assert body["usage"]["prompt_tokens"] == 2 * n_prompt - info["steered_tokens"]  # the twin counts
    assert greedy_chat(server, MESSAGES, 5, steering={"method": "adacad"}).json()["steering"]["alpha"] == 1.0
    for steering, param in [
        ({"method": "adacad", "cad_beta": 1}, "steering.cad_beta"),
        ({"method": "adacad", "strength": 3}, "steering"),
    ]:
        bad = greedy_chat(server, MESSAGES, 2, steering=steering)
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == param

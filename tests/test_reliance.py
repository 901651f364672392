"""`steering.reliance`: the attention mass on the user's tokens, measured inside the fast attention (one
extra value column), equals the same quantity computed from the eager reference's full attention maps,
unsteered and steered (the paper's rule), on the four tiny architectures. fp32, tolerance 1e-5."""

from __future__ import annotations

import pytest
import torch
from steer_reference import RefSteer, register_reference
from tiny import ARCHS, make_model

from ctxsteer.steering.attention import ATTN_NAME, register
from ctxsteer.steering.bias import build_steer_batch
from ctxsteer.steering.generate import left_pad
from ctxsteer.steering.reliance import attention_ratio
from ctxsteer.steering.rows import SteerRow

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    register()
    register_reference()


def _eager_ratio(model, ids, mask, key_mask, query_mask, ref: RefSteer | None) -> torch.Tensor:
    """From the full [B, H, Q, K] maps: sum over selected keys, mean over heads and selected queries,
    mean over layers."""
    model.set_attn_implementation("ctxsteer_ref")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = {} if ref is None else {"ctxsteer_ref": ref}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True, **kw)
    per_layer = []
    for probs in out.attentions:  # [B, H, Q, K]
        mass = (probs * key_mask[:, None, None, :]).sum(-1).mean(1)  # [B, Q]
        per_layer.append((mass * query_mask).sum(-1) / query_mask.sum(-1))
    return torch.stack(per_layer).mean(0)


@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_equals_the_eager_maps(arch: str) -> None:
    model = make_model(arch)
    g = torch.Generator().manual_seed(4)
    lens, prompts = [40, 29, 33], [30, 20, 25]  # total tokens and prompt tokens (the rest: the response)
    user = [(5, 22), (3, 15), (2, 18)]  # the user content's token range within each prompt
    seqs = [torch.randint(10, model.config.vocab_size, (n,), generator=g).tolist() for n in lens]
    ids, mask = left_pad(seqs, pad_id=0)
    width = ids.shape[1]
    key_mask = torch.zeros(len(lens), width)
    query_mask = torch.zeros(len(lens), width)
    for b, (n, p, (s, e)) in enumerate(zip(lens, prompts, user, strict=True)):
        off = width - n
        key_mask[b, off + s : off + e] = 1.0
        query_mask[b, off + p : off + n] = 1.0  # response positions
    rows = [SteerRow(alpha=0.25, steered=((s, e),)) for s, e in user]
    rows[1] = SteerRow()  # one row unsteered inside the steered batch

    model.set_attn_implementation(ATTN_NAME)
    plain = attention_ratio(model, ids, mask, key_mask, query_mask)
    want_plain = _eager_ratio(model, ids, mask, key_mask, query_mask, None)
    assert (plain - want_plain).abs().max().item() <= TOL

    model.set_attn_implementation(ATTN_NAME)
    # the bias covers prompt keys only: the response is part of the sequence, not of the prompt
    cfg = model.config.get_text_config()
    steer = build_steer_batch(
        rows, prompts, width=width, num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
        offsets=[width - n for n in lens],
    )  # fmt: skip
    steered = attention_ratio(model, ids, mask, key_mask, query_mask, ctxsteer=steer)
    ref = RefSteer(rows, prompts, [width - n for n in lens])
    want_steered = _eager_ratio(model, ids, mask, key_mask, query_mask, ref)
    assert (steered - want_steered).abs().max().item() <= TOL
    # steering toward the user tokens raises their share, and only in the steered rows
    assert steered[0] > plain[0] and steered[2] > plain[2]
    assert abs(steered[1] - plain[1]) <= TOL


def test_bench_steering_reports_the_cost_of_the_ratio(tmp_path) -> None:
    """`ctxsteer bench steering --json` carries ratio_prefill_ratio / ratio_decode_ratio (measured vs
    unsteered), per length and worst over lengths."""
    import json

    from tiny import save_tiny_model

    from ctxsteer.server.bench.steering import main

    model_dir = save_tiny_model(tmp_path / "llama", "llama")
    out = tmp_path / "bench.json"
    args = ["--model", str(model_dir), "--lengths", "40,60", "--reps", "1", "--new-tokens", "2"]
    assert main([*args, "--no-eager", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    for key in ("ratio_prefill_ratio", "ratio_decode_ratio"):
        per_length = [r[key] for r in doc["results"]]
        assert len(per_length) == 2 and all(x > 0 for x in per_length)
        assert doc[key] == max(per_length)


def test_bench_steering_names_the_long_prompt_ratios() -> None:
    from ctxsteer.server.bench.steering import long_prompt_keys

    results = [
        {"length": n, "prefill_ratio": r} for n, r in ((512, 1.0), (2000, 1.1), (4003, 1.2), (7990, 1.3))
    ]
    assert long_prompt_keys(results) == {"steered_prefill_ratio_4k": 1.2, "steered_prefill_ratio_8k": 1.3}

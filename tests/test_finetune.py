"""`ctxsteer finetune` end to end on a tiny model: `ctxsteer score` a small chat set, fine-tune with the
[IND] indicator on the context-dependent half, and serve the result: the tokenizer has [IND], only the
examples above the threshold were marked (at the end of their user turn), the loss fell, the weights and
the indicator's embedding changed, and `ctxsteer serve DIR` answers with `context_indicator` applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from server_process import greedy_chat, serve
from tiny import make_tokenizer, save_tiny_model

pytest.importorskip("peft", reason="ctxsteer finetune needs the [train] extra (peft)")

from ctxsteer.server.training.finetune import build_examples  # noqa: E402
from ctxsteer.server.training.finetune import main as finetune  # noqa: E402
from ctxsteer.server.training.score import main as score  # noqa: E402
from ctxsteer.steering.indicator import INDICATOR  # noqa: E402

FACTS = ["The vault code is 4127.", "The ferry leaves at 7:15.", "The gate opens at dawn.", "The cat is Tom."]


def _dataset(path: Path) -> Path:
    rows = []
    for fact in FACTS:  # context QA: the answer is in the user turn
        rows.append({"messages": [
            {"role": "user", "content": f"Context: {fact}\nQuestion: what does the context say?"},
            {"role": "assistant", "content": fact},
        ]})  # fmt: skip
    for topic in ("rain", "bread", "music", "stars"):  # general chat: nothing to read
        rows.append({"messages": [
            {"role": "user", "content": f"Say something about {topic}."},
            {"role": "assistant", "content": f"I like {topic} very much, it is nice."},
        ]})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_indicator_marks_only_dependent_examples_at_the_end_of_the_user_turn() -> None:
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [INDICATOR]})
    ind = tok.convert_tokens_to_ids(INDICATOR)
    msgs = [{"role": "user", "content": "Context: x.\nQuestion: y?"}, {"role": "assistant", "content": "x"}]
    rows = [
        {"messages": msgs, "user_attention_ratio": 0.9},
        {"messages": msgs, "user_attention_ratio": 0.1},
        {"messages": msgs, "user_attention_ratio": None},
    ]
    examples, skipped = build_examples(rows, tok, 0.5, 512)
    assert [e.marked for e in examples] == [True, False] and skipped == {"not scored": 1}
    marked, plain = examples
    assert marked.ids.count(ind) == 1 and ind not in plain.ids and len(marked.ids) == len(plain.ids) + 1
    at = marked.ids.index(ind)
    assert tok.decode(marked.ids[at + 1 : at + 2]) == "<|im_end|>"  # before the template's end of turn
    assert all(label == -100 for label in marked.labels[: at + 1])  # no loss on the prompt
    response = [t for t in marked.labels if t != -100]
    assert tok.decode(response).startswith("x")


def test_score_finetune_serve(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "base", "llama")
    data = _dataset(tmp_path / "data.jsonl")
    scored = tmp_path / "scored.jsonl"
    common = ["--model", str(model_dir), "--no-progress"]
    assert score([str(data), "--out", str(scored), "--percentile", "50", *common]) == 0
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    dependent = sum(bool(r["context_dependent"]) for r in rows)
    assert 0 < dependent < len(rows)

    out = tmp_path / "tuned"
    args = [str(scored), "--out", str(out), "--epochs", "3", "--lr", "5e-3", "--batch-size", "4", *common]
    assert finetune(args) == 0
    report = json.loads((out / "finetune.json").read_text())
    assert report["examples"] == len(rows) and report["marked"] == dependent
    assert report["epoch_losses"][-1] < report["epoch_losses"][0]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ind = tok.convert_tokens_to_ids(INDICATOR)
    assert ind == report["indicator_token_id"] and INDICATOR in tok.get_added_vocab()
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tuned = AutoModelForCausalLM.from_pretrained(out)
    assert tuned.get_input_embeddings().weight.shape[0] == len(tok)
    q_base = base.model.layers[0].self_attn.q_proj.weight
    q_tuned = tuned.model.layers[0].self_attn.q_proj.weight
    assert not q_base.equal(q_tuned)  # the LoRA update was merged

    with serve(str(out), log_dir=tmp_path) as sp:
        msgs = [{"role": "user", "content": "Context: The vault code is 4127.\nQuestion: what is the code?"}]
        r = greedy_chat(sp, msgs, 4, context_indicator="on")
        assert r.status_code == 200, r.text
        assert r.json()["context_indicator"] == {"mode": "on", "applied": True}

        # `ctxsteer eval --context-indicator`: the harness sends it and records what the server applied
        import asyncio

        from ctxsteer.clients.eval.qa import QAConfig, run_qa

        for mode, applied in (("on", True), ("off", False)):
            cfg = QAConfig(
                url=sp.url, task="conflict", out=tmp_path / f"eval-{mode}", limit=2, strengths=[1],
                max_tokens=2, progress=False, context_indicator=mode,
            )  # fmt: skip
            res = asyncio.run(run_qa(cfg))
            assert len(res.cells) == 2 and {c["indicator_applied"] for c in res.cells} == {applied}
            stored = json.loads((tmp_path / f"eval-{mode}" / "results.json").read_text())
            assert stored["meta"]["context_indicator"] == mode

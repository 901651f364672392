"""`ctxsteer finetune SCORED.jsonl --out DIR`: the paper's conditional instruction fine-tuning.

Input: the output of `ctxsteer score` (chat examples with `user_attention_ratio` and `context_dependent`).
The tokenizer gets `[IND]` as a special token; the examples above the threshold (the score's, or
`--threshold`) get it appended to their last user turn (`steering.indicator.mark_messages`), the others are
trained as they are, so the model learns "with [IND], answer from the context". Training is LoRA (peft, the
`ctxsteer[train]` extra) on every linear layer plus the new token's embedding row, loss on the response
tokens only, a plain AdamW loop. The merged weights and the tokenizer are saved to DIR, which
`ctxsteer serve DIR` loads (then `context_indicator` works), with `finetune.json` (settings, counts,
losses).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxsteer.server.training.score import read_jsonl


@dataclass(frozen=True, slots=True)
class Example:
    ids: list[int]
    labels: list[int]  # -100 on the prompt: the loss is on the response only
    marked: bool


def build_examples(
    rows: list[dict[str, Any]], tokenizer: Any, threshold: float | None, max_len: int
) -> tuple[list[Example], dict[str, int]]:
    """Tokenized training examples (the dependent ones marked) and why the others were left out."""
    from ctxsteer.steering.indicator import mark_messages
    from ctxsteer.steering.spans import render_chat
    from ctxsteer.steering.spec import SteeringError

    examples: list[Example] = []
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for row in rows:
        msgs = row.get("messages")
        ratio = row.get("user_attention_ratio")
        if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            skip("not a chat ending in an assistant response")
            continue
        if ratio is None:
            skip("not scored")
            continue
        dependent = ratio > threshold if threshold is not None else bool(row.get("context_dependent"))
        prompt_msgs = mark_messages(msgs[:-1]) if dependent else list(msgs[:-1])
        try:
            prompt = render_chat(tokenizer, prompt_msgs).ids
            full = render_chat(tokenizer, [*prompt_msgs, msgs[-1]], add_generation_prompt=False).ids
        except (SteeringError, ValueError):
            skip("cannot render")
            continue
        if full[: len(prompt)] != prompt or len(full) <= len(prompt):
            skip("the template renders the prompt differently once the response follows")
            continue
        if len(full) > max_len:
            skip(f"longer than --max-len {max_len}")
            continue
        labels = [-100] * len(prompt) + full[len(prompt) :]
        examples.append(Example(full, labels, dependent))
    return examples, skipped


def _batches(examples: list[Example], size: int, pad_id: int, rng: random.Random) -> list[dict[str, Any]]:
    import torch

    # Grouped by length (as transformers' group_by_length): within each shuffled window of 50 batches the
    # examples are sorted by length, so a batch pads to a similar width; the batch order is shuffled again.
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = size * 50
    grouped = []
    for w in range(0, len(order), window):
        part = sorted(order[w : w + window], key=lambda i: len(examples[i].ids))
        grouped += [part[b : b + size] for b in range(0, len(part), size)]
    rng.shuffle(grouped)
    out = []
    for group in grouped:
        chunk = [examples[i] for i in group]
        width = max(len(e.ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, e in enumerate(chunk):  # right padding: positions stay 0..n-1
            n = len(e.ids)
            ids[b, :n] = torch.tensor(e.ids)
            labels[b, :n] = torch.tensor(e.labels)
            mask[b, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def train(model: Any, examples: list[Example], args: argparse.Namespace, pad_id: int) -> list[float]:
    """The plain loop: AdamW over the trainable (LoRA + indicator row) parameters; mean loss per epoch."""
    import torch
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    model.train()
    losses = []
    for epoch in range(args.epochs):
        batches = _batches(examples, args.batch_size, pad_id, rng)
        bar = tqdm(
            batches, desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress, file=sys.stderr
        )
        total = 0.0
        for batch in bar:
            batch = {k: v.to(model.device) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += float(loss.detach())
            bar.set_postfix(loss=f"{total / (bar.n + 1):.3f}")
        losses.append(total / max(len(batches), 1))
    model.eval()
    return losses


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, checked: a bad value exits 2 with argparse's usage line before any model is loaded."""
    ap = argparse.ArgumentParser(prog="ctxsteer finetune", description=__doc__.split("\n")[0])
    ap.add_argument("scored", type=Path, help="JSONL written by `ctxsteer score`")
    ap.add_argument("--out", type=Path, required=True, help="directory for the merged model and tokenizer")
    ap.add_argument("--model", default=None, help="HF id, directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--threshold", type=float, help="mark examples above this ratio (default: the score's)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    ap.add_argument("--max-len", type=int, default=1024, help="longest example in tokens (longer: left out)")
    ap.add_argument("--limit", type=int, help="train on the first N usable examples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if (
        args.epochs < 1
        or args.batch_size < 1
        or args.lora_r < 1
        or not math.isfinite(args.lr)
        or args.lr <= 0
    ):
        ap.error("--epochs, --batch-size and --lora-r must be >= 1 and --lr > 0")
    return args


def _add_indicator_token(model: Any, tokenizer: Any) -> int:
    """Register [IND] as a special token (growing the embeddings if the vocabulary has no spare row)."""
    from ctxsteer.steering.indicator import INDICATOR

    tokenizer.add_special_tokens({"additional_special_tokens": [INDICATOR]})
    ind = tokenizer.convert_tokens_to_ids(INDICATOR)
    if ind >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return ind


def _with_lora(peft: Any, model: Any, rank: int, ind: int) -> Any:
    """LoRA on every linear layer, plus the [IND] embedding row: the new token must learn a meaning."""
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        trainable_token_indices={"embed_tokens": [ind]},
    )
    return peft.get_peft_model(model, config)


def _report(
    args: argparse.Namespace,
    examples: list[Example],
    skipped: dict[str, int],
    losses: list[float],
    seconds: float,
    ind: int,
) -> dict[str, Any]:
    """finetune.json: what was trained, on what and how it went, beside the weights it describes."""
    return {
        "base_model": args.model or "default",
        "examples": len(examples),
        "marked": sum(e.marked for e in examples),
        "skipped": skipped,
        "epoch_losses": losses,
        "train_seconds": round(seconds, 1),
        "indicator_token_id": ind,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        import peft
    except ImportError:
        print("ctxsteer finetune: needs peft: pip install 'ctxsteer[train]'", file=sys.stderr)
        return 2
    import torch

    from ctxsteer.server.engine.loader import load_model
    from ctxsteer.steering.indicator import INDICATOR

    torch.manual_seed(args.seed)
    rows = read_jsonl(args.scored)
    model, tokenizer, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    ind = _add_indicator_token(model, tokenizer)
    examples, skipped = build_examples(rows, tokenizer, args.threshold, args.max_len)
    if args.limit is not None:
        examples = examples[: args.limit]
    if not examples:
        print(f"ctxsteer finetune: no usable examples in {args.scored} ({skipped})", file=sys.stderr)
        return 1
    peft_model = _with_lora(peft, model, args.lora_r, ind)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    losses = train(peft_model, examples, args, int(pad))
    seconds = time.perf_counter() - t0
    merged = peft_model.merge_and_unload()
    args.out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    report = _report(args, examples, skipped, losses, seconds, ind)
    (args.out / "finetune.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(
        f"trained on {report['examples']} examples ({report['marked']} with {INDICATOR}) in {seconds:.0f} s; "
        f"loss per epoch {', '.join(f'{x:.3f}' for x in losses)}; saved to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

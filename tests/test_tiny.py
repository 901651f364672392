"""The hermetic tiny tokenizer and models that the rest of the suite builds on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import (
    ARCHS,
    DEFAULT_SYSTEM_PROMPT,
    SLIDING_WINDOW,
    SPECIAL_TOKENS,
    make_model,
    make_tokenizer,
    save_tiny_model,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

TEXT = (
    "The Eiffel Tower is in Paris, France. It was completed in 1889 and is 330 metres tall. "
    "Question: where is the tower, and when was it finished? Answer briefly, please."
)
OTHER_TEXT = "She sells sea shells by the sea shore; the capital of Germany is Berlin, and of Italy Rome."

UNICODE_SAMPLES = [
    "plain ascii, with  double  spaces and\ttabs\nand newlines\r\n",
    "Café naïve résumé — “quotes” and ‘apostrophes’ … ¿qué? ¡sí!",
    "e\u0301 (decomposed) vs é (composed); Ångström; ﬁ ligature",
    "日本語のテキスト。中文文本。한국어 텍스트. Ελληνικά, русский, עברית, العربية",
    "emoji 😀🚀 skin tone 👍🏽 zwj family 👨‍👩‍👧‍👦 flag 🇫🇷 heart ❤️",
    "控制字符\x00\x01\x7f and private use \ue000 and astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "   leading and trailing spaces   ",
    "",
]


def _ids(tokenizer: PreTrainedTokenizerFast, text: str, n: int) -> torch.Tensor:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) >= n, f"need {n} tokens, text has {len(ids)}"
    return torch.tensor([ids[:n]])


@torch.no_grad()
def _logits(model: PreTrainedModel, input_ids: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, **kwargs).logits


# --- tokenizer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_unicode_round_trips(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_vocab_and_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    assert 512 <= len(tokenizer) <= 1000
    assert tokenizer.is_fast
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == expected_id
        assert tokenizer.encode(token, add_special_tokens=False) == [expected_id]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # Special tokens inside text are matched whole; no BOS/EOS is added implicitly.
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids[1:-1] and 1 not in ids[1:] and 2 not in ids[:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_offsets_mapping(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "Context: the tower is in Paris.\nQ: where?  "
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    assert len(offsets) == len(enc["input_ids"])
    # Untrimmed, contiguous offsets: the pieces tile the text exactly.
    assert "".join(text[a:b] for a, b in offsets) == text
    assert all(b1 == a2 for (_, b1), (a2, _) in zip(offsets, offsets[1:], strict=False))

    # Multi-byte characters split over several byte-level tokens share that character's span.
    uni = "naïve 😀 日本"
    offsets = tokenizer(uni, return_offsets_mapping=True)["offset_mapping"]
    assert offsets[0][0] == 0 and offsets[-1][1] == len(uni)
    assert all(0 <= a < b <= len(uni) for a, b in offsets)


def test_make_tokenizer_returns_independent_objects() -> None:
    first = make_tokenizer()
    first.add_tokens(["<|tool|>"], special_tokens=True)
    first.chat_template = "mutated"
    second = make_tokenizer()
    assert len(second) == len(first) - 1
    assert second.chat_template != "mutated"


def test_chat_template_injects_default_system_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_chat_template_keeps_given_system_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert DEFAULT_SYSTEM_PROMPT not in rendered


def test_chat_template_generation_prompt_and_whitespace(
    tokenizer: PreTrainedTokenizerFast, trimming_tokenizer: PreTrainedTokenizerFast
) -> None:
    messages = [{"role": "user", "content": "  padded \n"}]
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert plain.endswith("<|im_start|>user\n  padded \n<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.apply_chat_template(messages, tokenize=False).endswith("<|im_end|>\n")

    trimmed = trimming_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert trimmed == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\npadded<|im_end|>\n<|im_start|>assistant\n"
    )
    # Tokenized rendering: specials are single ids, the prompt ends on "assistant\n".
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


# --- models ------------------------------------------------------------------------------------------------


def test_model_config_matches_tokenizer(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    config = tiny_model.config
    assert not tiny_model.training
    assert config.vocab_size == len(tokenizer)
    assert config.max_position_embeddings == 512
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert tiny_model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tiny_model.config._attn_implementation == "sdpa"
    assert next(tiny_model.parameters()).dtype == torch.float32


def test_attention_is_not_near_uniform(tiny_arch: str, tokenizer: PreTrainedTokenizerFast) -> None:
    model = make_model(tiny_arch, attn_implementation="eager")
    with torch.no_grad():
        out = model(input_ids=_ids(tokenizer, TEXT, 40), output_attentions=True)
    for attn in out.attentions:  # (batch, heads, query, key)
        top = attn[0, :, 20:].max(dim=-1).values.mean().item()
        # Uniform attention over >= 16 visible keys would put <= 1/16 on the top key.
        assert top > 4 / SLIDING_WINDOW, f"{tiny_arch}: mean top attention weight {top:.3f}"


def test_seed_determinism_and_dtype(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = _ids(tokenizer, TEXT, 12)
    assert torch.equal(_logits(make_model("qwen2", seed=3), ids), _logits(make_model("qwen2", seed=3), ids))
    assert not torch.allclose(_logits(make_model("qwen2", seed=3), ids), _logits(make_model("qwen2"), ids))
    half = make_model("qwen2", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16 and half.config.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown tiny arch"):
        make_model("gpt2")


def test_sdpa_matches_eager(tiny_arch: str, tokenizer: PreTrainedTokenizerFast) -> None:
    ids = _ids(tokenizer, TEXT, 40)  # > SLIDING_WINDOW, so mistral/gemma3 windows cut in
    sdpa = _logits(make_model(tiny_arch, attn_implementation="sdpa"), ids)
    eager = _logits(make_model(tiny_arch, attn_implementation="eager"), ids)
    assert sdpa.shape == (1, 40, len(tokenizer))
    torch.testing.assert_close(sdpa, eager, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_is_active(
    arch: str, attn_implementation: str, tokenizer: PreTrainedTokenizerFast
) -> None:
    ids = _ids(tokenizer, TEXT, 40)
    windowed = _logits(make_model(arch, attn_implementation=attn_implementation), ids)
    full = _logits(make_model(arch, attn_implementation=attn_implementation, sliding_window=512), ids)
    # Same weights; a query sees SLIDING_WINDOW keys (itself included), so only later positions change.
    torch.testing.assert_close(windowed[:, :SLIDING_WINDOW], full[:, :SLIDING_WINDOW], atol=1e-5, rtol=0)
    assert (windowed[:, SLIDING_WINDOW:] - full[:, SLIDING_WINDOW:]).abs().amax(dim=-1).min() > 1e-3


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_left_padding_matches_unpadded(
    tiny_arch: str, attn_implementation: str, tokenizer: PreTrainedTokenizerFast
) -> None:
    model = make_model(tiny_arch, attn_implementation=attn_implementation)
    long, short = _ids(tokenizer, TEXT, 40), _ids(tokenizer, OTHER_TEXT, 25)
    pad = 40 - 25
    input_ids = torch.cat([long, torch.cat([torch.full((1, pad), tokenizer.pad_token_id), short], dim=1)])
    attention_mask = (torch.arange(40) >= torch.tensor([[0], [pad]])).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() derives them
    batched = _logits(model, input_ids, attention_mask=attention_mask, position_ids=position_ids)
    torch.testing.assert_close(batched[0], _logits(model, long)[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(batched[1, pad:], _logits(model, short)[0], atol=1e-4, rtol=0)


# --- saved directories -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload_round_trip(arch: str, tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = save_tiny_model(tmp_path / arch, arch, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    loaded_tok = AutoTokenizer.from_pretrained(path)

    assert not model.training and model.config._attn_implementation == "sdpa"
    ids = _ids(tokenizer, TEXT, 40)
    torch.testing.assert_close(_logits(model, ids), _logits(make_model(arch, seed=1), ids), atol=0, rtol=0)

    # (For model_type "qwen2", AutoTokenizer builds a Qwen2Tokenizer from vocab + merges; the pipeline the
    # tiny tokenizer uses is that one's, so the encodings still agree, NFC-normalised text included.)
    assert loaded_tok.chat_template == tokenizer.chat_template
    assert len(loaded_tok) == len(tokenizer) and loaded_tok.eos_token_id == tokenizer.eos_token_id
    text = TEXT + " naïve 😀 日本 <|im_end|> 12345\n\n"
    for option in ({}, {"return_offsets_mapping": True}):
        assert loaded_tok(text, **option) == tokenizer(text, **option)
    messages = [{"role": "user", "content": "hi"}]
    assert loaded_tok.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_tiny_model_dir_fixture(tiny_model_dir: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    assert (tiny_model_dir / "config.json").is_file() and (tiny_model_dir / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    ids = _ids(tokenizer, TEXT, 8)
    torch.testing.assert_close(_logits(model, ids), _logits(make_model("llama"), ids), atol=0, rtol=0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)

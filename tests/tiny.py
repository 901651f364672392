"""Hermetic tiny models and a tokenizer built in code, for the test suite.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in a few milliseconds on a
built-in corpus, and the models are random-weight causal LMs built from configs.

Special tokens (SmolLM2-style ids): ``<|endoftext|>`` = 0 (pad), ``<|im_start|>`` = 1 (bos),
``<|im_end|>`` = 2 (eos).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = [
    "ARCHS",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SLIDING_WINDOW",
    "SPECIAL_TOKENS",
    "TRIMMING_CHAT_TEMPLATE",
    "make_model",
    "make_tokenizer",
    "make_trimming_tokenizer",
    "save_tiny_model",
]

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
#: In id order: ``<|endoftext|>`` = 0, ``<|im_start|>`` = 1, ``<|im_end|>`` = 2.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
DEFAULT_SYSTEM_PROMPT = "You are a tiny test assistant."

VOCAB_SIZE = 768
#: Qwen2's pre-tokenizer split (= ``transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX``).
_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Sliding window (tokens, the query's own included) of the "mistral" and "gemma3" tiny models.
SLIDING_WINDOW = 16
ARCHS: tuple[str, ...] = ("llama", "qwen2", "mistral", "gemma3")


def _chat_template(content: str) -> str:
    """ChatML with a default system prompt; ``content`` is the Jinja expression for a message body."""
    return (
        "{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}"
        "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + " + content + " + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|im_start|>assistant\\n' -}}"
        "{%- endif -%}"
    )


#: SmolLM2/Qwen2-style ChatML: injects the default system prompt when the first message isn't "system".
CHAT_TEMPLATE = _chat_template("message['content']")
#: Same, but message content is stripped of surrounding whitespace (like Llama 3's template).
TRIMMING_CHAT_TEMPLATE = _chat_template("(message['content'] | trim)")

_CORPUS_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer the question using the context below.",
    "Context: The Eiffel Tower is in Paris, France. It was completed in 1889.",
    "Question: Where is the Eiffel Tower? Answer: It is in Paris.",
    "The capital of Germany is Berlin, and the capital of Italy is Rome.",
    "Please summarise the following document in one sentence.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    '{"role": "user", "content": "Hello, how are you today?"}',
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159",
    "Attention steering biases the model toward the tokens of the user's context.",
    "The server speaks the OpenAI chat completions API and streams tokens back.",
    "Café, naïve, résumé, façade, jalapeño, Zürich, São Paulo.",
    "日本語のテキスト。中文文本。한국어 텍스트.",
    "Emoji: 😀 🚀 🎉 👍🏽 ❤️",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    "In the beginning there was nothing, and then there was a tiny test model.",
    "Tokens, tokenizers, and templates: testing them takes time and thought.",
)


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE once per process and return it serialised (callers build fresh copies)."""
    tok = Tokenizer(models.BPE())
    # Qwen2's split regex, then bytes -> printable chars: transformers' AutoTokenizer rebuilds exactly this
    # pipeline (plus NFC) for a directory whose config says model_type "qwen2", so all tiny dirs agree.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat with small variations so that there are enough pair frequencies for ~500 merges.
    corpus = [f"{s} {s.lower()} {s.upper()}" for s in _CORPUS_SENTENCES] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok.to_str()


def _build_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = chat_template
    return tok


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer with special tokens and the default-system-prompt ChatML template.

    Training is cached per process; every call returns a new, independently mutable object.
    """
    return _build_tokenizer(CHAT_TEMPLATE)


def make_trimming_tokenizer() -> PreTrainedTokenizerFast:
    """Like :func:`make_tokenizer`, but the chat template applies ``| trim`` to message content."""
    return _build_tokenizer(TRIMMING_CHAT_TEMPLATE)


_MODEL_CLASSES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
}


def _config_kwargs(arch: str, vocab_size: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Config fields of the tiny ``arch``: 64 wide, 3 layers, 4 query heads of 16 dims."""
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA, except llama (MHA) below
        "head_dim": 16,
        "max_position_embeddings": 512,
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "tie_word_embeddings": True,
    }
    if arch == "llama":
        kwargs["num_key_value_heads"] = 4
    elif arch == "mistral":
        kwargs["sliding_window"] = SLIDING_WINDOW  # every layer
    elif arch == "gemma3":
        kwargs["sliding_window"] = SLIDING_WINDOW
        kwargs["query_pre_attn_scalar"] = 16  # scores scaled by 16 ** -0.5 = head_dim ** -0.5
    kwargs.update(overrides)
    if arch == "gemma3" and "layer_types" not in overrides:
        # Sliding, full, sliding, ...: both kinds of layer (and both rope thetas) are exercised.
        kwargs["layer_types"] = [
            "full_attention" if i % 2 else "sliding_attention" for i in range(kwargs["num_hidden_layers"])
        ]
    return kwargs


#: Query/key projection multiplier: random init gives attention logits with std ~0.03 (near-uniform);
#: x9 on both q and k brings it to ~2 (a softmax that clearly prefers some keys).
QK_SCALE = 9.0
#: Gemma 3 RMS-normalises q and k (gain ``1 + w``), so there the gain is set instead: std ~2 too.
QK_NORM_GAIN = 1.4


@torch.no_grad()
def _sharpen_attention(model: PreTrainedModel, arch: str) -> None:
    """Scale query/key projections so attention is far from uniform (random init gives ~uniform)."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if arch == "gemma3":
            # q/k are RMS-normalised after projection, so scale the norms' gains: output = x_hat * (1 + w).
            attn.q_norm.weight.fill_(QK_NORM_GAIN - 1.0)
            attn.k_norm.weight.fill_(QK_NORM_GAIN - 1.0)
        else:
            attn.q_proj.weight.mul_(QK_SCALE)
            attn.k_proj.weight.mul_(QK_SCALE)


def make_model(
    arch: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **config_overrides: Any,
) -> PreTrainedModel:
    """A tiny random-weight causal LM of family ``arch`` (one of :data:`ARCHS`), in eval mode.

    Deterministic in ``seed``; the vocabulary is that of :func:`make_tokenizer`. ``config_overrides`` are set
    on the config before the weights are drawn (e.g. ``sliding_window=512``; overrides that keep the weight
    shapes keep the weights).
    """
    if arch not in _MODEL_CLASSES:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {ARCHS}")
    config_cls, model_cls = _MODEL_CLASSES[arch]
    config = config_cls(**_config_kwargs(arch, len(make_tokenizer()), config_overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
        _sharpen_attention(model, arch)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model = model.to(dtype).eval()
    model.config.dtype = dtype  # what save_pretrained records
    return model


def save_tiny_model(path: str | Path, arch: str = "llama", *, seed: int = 0, **config_overrides: Any) -> Path:
    """Save ``make_model(arch, seed=seed, **config_overrides)`` and :func:`make_tokenizer` into ``path``.

    The result is a local HF directory that ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` load.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_model(arch, seed=seed, **config_overrides).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path

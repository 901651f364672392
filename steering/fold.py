"""The bias fold shared by every steered attention path: the paper's additive key bias carried by two
extra head dimensions, so a stock attention kernel computes the steered scores itself.

    k' = [k, hi, lo, 0...], q' = [q, g, g, 0...], v' = [v, 0...]   with hi + lo = bias / scale

gives scale * q'.k' = scale * q.k + g * bias (g = 1 on steered heads, 0 elsewhere). `hi` is the column
rounded to the attention dtype and `lo` its remainder (also in that dtype), so the bias survives a bf16 or
fp16 KV cache to ~2^-16 relative instead of ~2^-8.
"""

from __future__ import annotations

import torch

FOLD_COLUMNS = 2


def bias_columns(bias: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """[...] fp32 bias -> [..., 2] key columns (hi, lo) in `dtype`."""
    col = bias.float() / scale
    hi = col.to(dtype)
    lo = (col - hi.float()).to(dtype)
    return torch.stack([hi, lo], dim=-1)

"""Per-token FP8 activation quantization as one fused Triton kernel (row amax, scale, divide, clamp, cast).

In eager PyTorch the same computation (:func:`mpq.numerics.fp8_per_token`) takes about eight kernel launches, which at
decode sizes cost more than the FP8 GEMM they feed. This kernel reads each row once and writes the E4M3 values and
the row's float32 scale, zero-filling the padding rows that ``torch._scaled_mm`` needs (M a multiple of 16). Its
arithmetic is fake-quant's: ``scale = amax / 448`` (1 for an all-zero row) in float32, ``q = e4m3(clamp(x / scale))``
with round-to-nearest-even. Triton is imported on first use; without it (or without CUDA) callers fall back to eager.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from mpq.numerics import FP8_MAX


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows(x_ptr, q_ptr, s_ptr, m, k, stride_x, stride_q, fp8_max, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < k
        live = row < m
        x = tl.load(x_ptr + row * stride_x + cols, mask=inside & live, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.where(amax > 0, amax / fp8_max, 1.0)
        q = tl.minimum(tl.maximum(x / scale, -fp8_max), fp8_max)
        tl.store(q_ptr + row * stride_q + cols, q.to(tl.float8e4nv), mask=inside)
        tl.store(s_ptr + row, scale)

    return quantize_rows, triton.next_power_of_2


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def fp8_quantize_rows(x: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """E4M3 values ``[rows, K]`` and scales ``[rows, 1]`` of a CUDA ``[M, K]`` matrix (rows >= M; rows beyond M are
    zeros with scale 1)."""
    m, k = x.shape
    x = x.contiguous()
    q = torch.empty(rows, k, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    kernel, next_pow2 = _kernel()
    block = next_pow2(k)
    kernel[(rows,)](x, q, s, m, k, x.stride(0), q.stride(0), FP8_MAX, BLOCK=block,
                    num_warps=4 if block <= 4096 else 8)
    return q, s

"""W8A8 (INT8) and FP8 (E4M3) layers at decode sizes in one launch: mpq's weight-streaming kernel with the
per-token activation quantisation fused in (``kernels/csrc/w8_decode.cuh``, built just in time, no CUTLASS inside).

It reads the plain ``[N, K]`` weight bytes that the prefill kernels read too (CUTLASS's W8A8 GEMM and
``torch._scaled_mm``), so the W8A8 and FP8 modules keep one copy and switch kernels by token count
(:data:`DECODE_M`). Where the kernel cannot be built (no nvcc) the modules stay on their prefill kernels at every m.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from mpq.errors import KernelUnavailableError

log = logging.getLogger(__name__)

FORMATS = {"int8": 0, "e4m3": 1}
CONFIGS = (1, 2, 3, 4)  # (row tiles per block, 64-k superblocks in flight per warp): (1, 2) (1, 4) (2, 2) (2, 4)
CLUSTERS = (1, 2, 4, 8)  # blocks sharing one pass over the activations for their amax (sm_90)
DECODE_M = 8  # up to this many tokens the modules run this kernel (at 16 the unfused prefill paths measured as fast)


@functools.lru_cache(maxsize=1)
def ops():
    from mpq.kernels.cuda_build import load_extension

    load_extension("mpq_w8_decode", "w8_decode", cutlass=False)
    return torch.ops.mpq_w8_decode


@functools.lru_cache(maxsize=1)
def decode_available() -> bool:
    """Whether the kernel builds and loads here (checked once; a failure is logged and the callers fall back)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    try:
        ops()
    except KernelUnavailableError as e:
        log.warning("the fused INT8/FP8 decode kernel is unavailable (%s): W8A8 and FP8 layers use their prefill "
                    "kernels at every size", e)
        return False
    return True


def w8_decode_config(m: int, n: int, k: int, fmt: str = "int8") -> tuple[int, int]:
    """(configuration, cluster) from the H200 sweep (``bench/gpu_kernels.py --all-configs``, m = 1 and 16): four
    superblocks in flight per warp on narrow layers, two row tiles per block on wide ones (and, for FP8 with
    k < 8192, one tile with two in flight); clusters did not pay (each block reading its tokens' rows from L2 cost
    less than the cluster barriers), so none."""
    if n < 8192:
        return 2, 1
    if k >= 8192:
        return 4, 1
    return (3 if fmt == "int8" else 1), 1


def w8_decode(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None = None, fmt: str = "int8",
              config: int = 0, cluster: int = 0, pdl: bool | None = None) -> Tensor:
    """``s_x * s_w * (q(x) @ w.T) (+ bias)`` in bf16 for bf16 ``x`` ``[m, k]``, ``x`` quantised per token in the
    kernel (``amax / 127`` to INT8 for ``fmt='int8'`` with int8 ``w``; ``amax / 448`` to E4M3 for ``'e4m3'`` with
    float8_e4m3fn ``w``); ``w_scale`` float32 per row of ``w``, ``bias`` float32 or None; ``pdl`` None:
    :func:`mpq.kernels.cuda_build.pdl_enabled`."""
    if x.data_ptr() % 16:  # a view at an odd offset: the kernel reads activations 16 bytes at a time
        x = x.clone()
    if not config or not cluster:
        c, cl = w8_decode_config(x.shape[0], w.shape[0], x.shape[1], fmt)
        config, cluster = config or c, cluster or cl
    if pdl is None:
        from mpq.kernels.cuda_build import pdl_enabled

        pdl = pdl_enabled()
    return ops().w8_decode(x, w, w_scale.reshape(-1), bias, FORMATS[fmt], config, cluster, pdl)

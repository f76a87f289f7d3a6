"""W8A8 INT8 GEMM on Hopper with CUTLASS (``kernels/csrc/w8a8_sm90.cu``, built just in time).

Weights are INT8 symmetric per output channel (float32 scales), packed once at conversion as a contiguous
``[N, K]`` int8 matrix; activations are quantized per token on every call by a CUDA kernel with fake-quant's rule
(``scale = amax * (1 / 127)``, as torch divides by a number), and the CUTLASS epilogue applies both scales and the
bias and writes bf16, so a timing of this module includes the activation quantization. CUTLASS needs K a multiple of
16 and N of 8: other layers get no option from this kernel.

Registered on every machine, :meth:`~mpq.registry.Kernel.available` only on compute capability 9.0 with nvcc and the
CUTLASS headers present; nothing is built or imported from CUDA until a layer is converted.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from mpq.config import LayerBits
from mpq.errors import KernelUnavailableError
from mpq.kernels.gemm import QuantGemm, gemm_supported
from mpq.layers import LayerInfo
from mpq.quant import ActQuantSpec, QuantizedWeight, QuantScheme, WeightQuantSpec
from mpq.registry import Kernel, register_kernel

W8A8 = LayerBits(8, 8)
K_ALIGN, N_ALIGN = 16, 8


@functools.lru_cache(maxsize=1)
def ops():
    """The extension's ops (``w8a8_sm90``, ``quantize_int8_rows``), built on first use."""
    from mpq.kernels.cuda_build import load_extension

    load_extension("mpq_cutlass_w8a8", "w8a8_sm90")
    return torch.ops.mpq_cutlass_w8a8


def quantize_int8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token symmetric INT8 of a CUDA ``[M, K]`` matrix: int8 values and float32 scales ``[M]``."""
    return ops().quantize_int8_rows(x)


# Tile configuration by m (tokens), as (largest m, config); see kernels/csrc/w8a8_sm90_c<N>.cu. Chosen from
# bench/gpu_kernels.py, which times every configuration on the suite's shapes.
W8A8_TILES = ((128, 1), (None, 4))
W8A8_CONFIGS = (1, 2, 3, 4, 5)


def w8a8_tile_config(m: int) -> int:
    return next(config for largest, config in W8A8_TILES if largest is None or m <= largest)


def w8a8_gemm(q: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None = None,
              out_dtype: torch.dtype = torch.bfloat16, config: int = 0) -> Tensor:
    """``a_scale[m] * w_scale[n] * (q @ w.T)`` (+ bias) in ``out_dtype``; ``config`` 0 picks the tile by m."""
    return ops().w8a8_sm90(q, w, a_scale, w_scale, bias, out_dtype, config or w8a8_tile_config(q.shape[0]))


class CutlassW8A8Gemm(QuantGemm):
    """W8A8: ``[N, K]`` int8 weight and ``[N]`` float32 scales; activations quantized per token per call."""

    input_dtype = torch.bfloat16

    def __init__(self, layer: LayerInfo, qweight: QuantizedWeight, bias: Tensor | None):
        super().__init__(layer, bias)
        self.register_buffer("qweight", qweight.q[:, : self.k].to(torch.int8).contiguous())
        self.register_buffer("scale", qweight.scale.reshape(-1).float().contiguous())
        self.register_buffer("bias_bf16", None if bias is None else bias.detach().to(torch.bfloat16).contiguous())

    def gemm(self, x: Tensor) -> Tensor:
        q, s = quantize_int8_rows(x.contiguous())
        return w8a8_gemm(q, s, self.qweight, self.scale, self.bias_bf16)


def hopper_ready() -> bool:
    """Compute capability 9.0 with the tools to build: the CUTLASS headers and nvcc."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    from mpq.kernels.cuda_build import cutlass_include_dirs, nvcc_path

    try:
        cutlass_include_dirs()
        nvcc_path()
    except KernelUnavailableError:
        return False
    return True


@register_kernel
class CudaCutlassW8A8(Kernel):
    name = "cuda-cutlass-w8a8-sm90"
    device = "cuda"
    version = "1"

    def available(self) -> bool:
        return hopper_ready()

    def options(self, layer: LayerInfo) -> list[LayerBits]:
        if not gemm_supported(layer) or layer.k % K_ALIGN or layer.n % N_ALIGN:
            return []
        return [W8A8]

    def scheme(self, bits: LayerBits) -> QuantScheme:
        return QuantScheme(WeightQuantSpec(8, symmetric=True, group_size=None, scale_dtype="float32"),
                           ActQuantSpec(8, "int", "token", dynamic=True, symmetric=True), out_dtype="bfloat16")

    def convert(self, module: nn.Module, layer: LayerInfo, bits: LayerBits, qweight: QuantizedWeight) -> nn.Module:
        return CutlassW8A8Gemm(layer, qweight, getattr(module, "bias", None))

"""W8A8 INT8 GEMM on Hopper with CUTLASS (``kernels/csrc/w8a8_sm90.cu``, built just in time).

Weights are INT8 symmetric per output channel (float32 scales), packed once at conversion as a contiguous
``[N, K]`` int8 matrix; activations are quantized per token on every call by a CUDA kernel with fake-quant's rule
(``scale = amax * (1 / 127)``, as torch divides by a number), and the CUTLASS epilogue applies both scales and the
bias and writes bf16, so a timing of this module includes the activation quantization. Up to ``DECODE_M`` (8)
tokens the module runs :mod:`mpq.kernels.cuda_decode8` instead: the same weights streamed once, the quantization fused (one launch). CUTLASS needs K a multiple of
16 and N of 8: other layers get no option from this kernel.

Registered on every machine, :meth:`~mpq.kernel_registry.Kernel.available` only on compute capability 9.0 with nvcc and the
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
from mpq.numerics import ActQuantSpec, QuantizedWeight, QuantScheme, WeightQuantSpec
from mpq.kernel_registry import Kernel, register_kernel

W8A8 = LayerBits(8, 8)
K_ALIGN, N_ALIGN = 16, 8


# The two builds: CUTLASS 3 (wgmma, TMA) for Hopper, CUTLASS 2 (mma.sync, cp.async) for Ampere and Ada; as
# (extension, source stem, GEMM op).
EXTENSIONS = {"sm90": ("mpq_cutlass_w8a8", "w8a8_sm90", "w8a8_sm90"),
              "sm80": ("mpq_cutlass_w8a8_sm80", "w8a8_sm80", "w8a8_sm80")}


@functools.lru_cache(maxsize=None)
def ops(arch: str = "sm90"):
    """The ``arch`` extension's ops (its GEMM, ``quantize_int8_rows``), built on first use."""
    from mpq.kernels.cuda_build import load_extension

    name, stem, _ = EXTENSIONS[arch]
    load_extension(name, stem)
    return getattr(torch.ops, name)


def quantize_int8_rows(x: Tensor, arch: str = "sm90") -> tuple[Tensor, Tensor]:
    """Per-token symmetric INT8 of a CUDA ``[M, K]`` matrix: int8 values and float32 scales ``[M]``."""
    return ops(arch).quantize_int8_rows(x)


# Tile configuration by m (tokens), as (largest m, config); see kernels/csrc/w8a8_sm90_c<N>.cu and w8a8_sm80_c<N>.cu.
# The sm_90 table was chosen from bench/gpu_kernels.py, which times every configuration on the suite's shapes.
W8A8_TILES = {"sm90": ((128, 1), (None, 4)), "sm80": ((64, 1), (None, 2))}
W8A8_CONFIGS = {"sm90": (1, 2, 3, 4, 5), "sm80": (1, 2)}


def w8a8_tile_config(m: int, arch: str = "sm90") -> int:
    return next(config for largest, config in W8A8_TILES[arch] if largest is None or m <= largest)


def w8a8_gemm(q: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None = None,
              out_dtype: torch.dtype = torch.bfloat16, config: int = 0, arch: str = "sm90") -> Tensor:
    """``a_scale[m] * w_scale[n] * (q @ w.T)`` (+ bias) in ``out_dtype``; ``config`` 0 picks the tile by m."""
    gemm = getattr(ops(arch), EXTENSIONS[arch][2])
    return gemm(q, w, a_scale, w_scale, bias, out_dtype, config or w8a8_tile_config(q.shape[0], arch))


class CutlassW8A8Gemm(QuantGemm):
    """W8A8: ``[N, K]`` int8 weight and ``[N]`` float32 scales; activations quantized per token per call."""

    input_dtype = torch.bfloat16

    def __init__(self, layer: LayerInfo, qweight: QuantizedWeight, bias: Tensor | None, arch: str = "sm90"):
        super().__init__(layer, bias)
        self.arch = arch
        self.register_buffer("qweight", qweight.q[:, : self.k].to(torch.int8).contiguous())
        self.register_buffer("scale", qweight.scale.reshape(-1).float().contiguous())
        # CUTLASS's epilogue takes the bias in bf16: a copy of the float32 bias, not saved (the state dict, and so the
        # cost table, counts the float32 one)
        self.register_buffer("bias_bf16", None if bias is None else bias.detach().to(torch.bfloat16).contiguous(),
                             persistent=False)

    def gemm(self, x: Tensor) -> Tensor:
        from mpq.kernels.cuda_decode8 import DECODE_M, decode_available, w8_decode

        x = x.contiguous()
        if x.shape[0] <= DECODE_M and decode_available():  # one launch: quantisation fused into a weight stream
            return w8_decode(x, self.qweight, self.scale, self.bias, "int8")
        q, s = quantize_int8_rows(x, self.arch)
        return w8a8_gemm(q, s, self.qweight, self.scale, self.bias_bf16, arch=self.arch)


def hopper_ready() -> bool:
    """Compute capability 9.0 with the tools to build: the CUTLASS headers and nvcc."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and _tools_ready()


def ampere_ready(hopper_too: bool = False) -> bool:
    """Compute capability 8.x (or also 9.0, where the CUTLASS 2 kernels run too) with the tools to build."""
    if not torch.cuda.is_available():
        return False
    major = torch.cuda.get_device_capability()[0]
    return (major == 8 or (hopper_too and major == 9)) and _tools_ready()


def _tools_ready() -> bool:
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
    version = "2"  # 2: mpq's fused decode kernel up to DECODE_M (8) tokens
    arch = "sm90"

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
        return CutlassW8A8Gemm(layer, qweight, getattr(module, "bias", None), self.arch)


@register_kernel
class CudaCutlassW8A8Sm80(CudaCutlassW8A8):
    """The same option on Ampere and Ada GPUs (A100, A10, L4, L40), from the CUTLASS 2 build."""

    name = "cuda-cutlass-w8a8-sm80"
    arch = "sm80"

    def available(self) -> bool:
        return ampere_ready()

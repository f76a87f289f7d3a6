"""FP8 (E4M3) W8A8 GEMM on NVIDIA GPUs with FP8 tensor cores (sm_89 Ada, sm_90 Hopper), via ``torch._scaled_mm``.

Weights are E4M3 values with one float32 scale per output channel (``amax / 448``), quantized once at conversion;
activations are quantized per token (row) on every call with the same rule (:func:`mpq.numerics.fp8_per_token`), and
``_scaled_mm`` applies both scales in its epilogue (row-wise scaling), writing bf16; the bias is added after, in
float, as fake-quant does. ``_scaled_mm`` wants K and N multiples of 16 (layers that are not get no FP8 option) and
the weight column-major, which the transpose of a row-major ``[N, K]`` weight is. M is padded to 16 rows. The
activation quantization is one fused Triton kernel (:mod:`mpq.kernels.triton_fp8`) where Triton is installed. Up to
8 bf16 tokens (DECODE_M) the module runs :mod:`mpq.kernels.cuda_decode8` instead (one launch, the same weights).

The kernel registers on every machine but is :meth:`~mpq.kernel_registry.Kernel.available` only where CUDA reports compute
capability 8.9 or higher, so a CPU machine never offers FP8 and imports this file without touching CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mpq.config import LayerBits
from mpq.kernels.gemm import QuantGemm, gemm_supported, pad_to, round_up
from mpq.kernels.triton_fp8 import fp8_quantize_rows, triton_available
from mpq.layers import LayerInfo
from mpq.numerics import ActQuantSpec, QuantizedWeight, QuantScheme, WeightQuantSpec, fp8_per_token
from mpq.kernel_registry import Kernel, register_kernel

FP8 = LayerBits(8, 8, None, "e4m3")
ALIGN = 16


def fp8_supported() -> bool:
    """CUDA with FP8 tensor cores (compute capability >= 8.9) and a torch that has ``_scaled_mm``."""
    if not hasattr(torch, "_scaled_mm") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (8, 9)


class FP8Gemm(QuantGemm):
    """W8A8 E4M3: ``[N, K]`` float8 weight and ``[N]`` float32 scales; activations quantized per token per call."""

    def __init__(self, layer: LayerInfo, qweight: QuantizedWeight, bias: Tensor | None):
        super().__init__(layer, bias)
        self.register_buffer("qweight", qweight.q[:, : self.k].to(torch.float8_e4m3fn).contiguous())
        self.register_buffer("scale", qweight.scale.reshape(1, -1).float().contiguous())

    fused_quantization = True  # the Triton kernel when available; False: eager PyTorch (for comparison)

    def gemm(self, x: Tensor) -> Tensor:
        from mpq.kernels.cuda_decode8 import DECODE_M, decode_available, w8_decode

        m = x.shape[0]
        if m <= DECODE_M and x.is_cuda and x.dtype == torch.bfloat16 and decode_available():
            # one launch: the per-token E4M3 quantisation fused into a stream over the same weights
            return w8_decode(x.contiguous(), self.qweight, self.scale, self.bias, "e4m3")
        rows = round_up(max(m, 1), ALIGN)
        if self.fused_quantization and x.is_cuda and triton_available():
            q, s = fp8_quantize_rows(x, rows)
        else:
            q, s = fp8_per_token(pad_to(x, rows=rows))
        y = torch._scaled_mm(q, self.qweight.t(), scale_a=s, scale_b=self.scale, out_dtype=torch.bfloat16)
        return self._add_bias(y[:m])


@register_kernel
class CudaFP8ScaledMM(Kernel):
    name = "cuda-fp8-scaled-mm"
    device = "cuda"
    version = "2"  # 2: mpq's fused decode kernel up to DECODE_M (8) bf16 tokens

    def available(self) -> bool:
        return fp8_supported()

    def options(self, layer: LayerInfo) -> list[LayerBits]:
        if not gemm_supported(layer) or layer.k % ALIGN or layer.n % ALIGN:
            return []
        return [FP8]

    def scheme(self, bits: LayerBits) -> QuantScheme:
        return QuantScheme(WeightQuantSpec(8, True, None, "float32", fmt="e4m3"),
                           ActQuantSpec(8, "float8_e4m3fn", "token", dynamic=True), out_dtype="bfloat16")

    def convert(self, module: nn.Module, layer: LayerInfo, bits: LayerBits, qweight: QuantizedWeight) -> nn.Module:
        return FP8Gemm(layer, qweight, getattr(module, "bias", None))

"""PyTorch's own integer kernels on CPU, as quantized modules.

- ``w8a8``: per-output-channel symmetric int8 weights, activations quantized per tensor (asymmetric uint8) from
  each input's own range, int32 accumulation, float out. Linear layers run fbgemm's dynamic INT8 GEMM
  (``quantized::linear_dynamic``, which quantizes inside the op); convolutions run oneDNN's INT8 convolution
  (``onednn::qconv2d_pointwise``, the x86 path of torch's inductor quantization) on activations quantized here with
  the same arithmetic as fake-quant. Both drop one bit of activation range (``reduce_range``) on CPUs without VNNI,
  where int16 accumulation can saturate, exactly as ``torch.ao`` does.
- ``w8a16``: ``_weight_int8pack_mm``: per-channel int8 weights, bf16 activations, bf16 out. Its bf16 path reads
  past the end of rows whose K is not a multiple of 16 (a segfault in torch 2.13), so K is zero-padded to 16.
- ``w4a16g{32,64,128}``: ``_weight_int4pack_mm_for_cpu``: 4-bit asymmetric group-wise weights (tinygemm layout,
  bf16 scales and zeros), bf16 activations, bf16 out. It needs N a multiple of 16 and K a multiple of the group:
  both are zero-padded once at conversion, and the padding is counted in the size.

Weight-only convolutions run through im2col (see :mod:`mpq.kernels.gemm`). Weights are quantized once by
:func:`mpq.numerics.quantize_weight` (the same integers fake-quant uses) and packed once; the packed fbgemm object is
rebuilt lazily after ``load_state_dict`` so that state dicts hold only plain tensors (``weights_only`` loads).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

from mpq.config import LayerBits
from mpq.kernels.gemm import (QuantGemm, WeightStandIn, gemm_supported, gemm_unsupported_reason, pad_to,
                              resolve_padding, round_up)
from mpq.layers import LayerInfo
from mpq.numerics import ActQuantSpec, QuantizedWeight, QuantScheme, WeightQuantSpec, act_qparams, quantize_activation
from mpq.kernel_registry import Kernel, register_kernel


@functools.lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_vnni", "avx_vnni"} & flags)
    except OSError:
        pass
    return False


def _fbgemm_available() -> bool:
    engines = torch.backends.quantized.supported_engines
    return ("fbgemm" in engines or "x86" in engines) and hasattr(torch.ops.quantized, "linear_dynamic")


def _onednn_conv_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise") and \
        hasattr(torch.ops.onednn, "qconv_prepack")


def _drop_packed(module: nn.Module, _incompatible_keys) -> None:
    module._packed = None  # new buffers were loaded: pack again on next use


class PackedOnce:
    """Mixin for modules whose kernel wants an opaque packed weight: packed from the plain buffers on first use,
    dropped when new buffers are loaded, and never copied or pickled (state dicts hold plain tensors only)."""

    _packed = None

    def _init_packing(self) -> None:
        self._packed = None
        self.register_load_state_dict_post_hook(_drop_packed)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_packed"] = None
        return state

    def packed(self):
        if self._packed is None:
            self._packed = self._pack()
        return self._packed


# --------------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------------
class Int8DynamicGemm(PackedOnce, QuantGemm):
    """W8A8 on fbgemm: int8 weight + float scales stored; packed once on first use."""

    def __init__(self, layer: LayerInfo, qweight: Tensor, scale: Tensor, bias: Tensor | None, reduce_range: bool):
        super().__init__(layer, bias)
        self.reduce_range = reduce_range
        self.register_buffer("qweight", qweight.to(torch.int8))
        self.register_buffer("scale", scale.float().reshape(-1))
        self._init_packing()

    def _pack(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized-tensor creation is deprecated upstream; the op itself is not
            qw = torch._make_per_channel_quantized_tensor(
                self.qweight, self.scale.double(), torch.zeros(self.n, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qw, self.bias)

    def gemm(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self.packed(), self.reduce_range)


class Int8DynamicConv(PackedOnce, WeightStandIn, nn.Module):
    """W8A8 convolution on oneDNN: activations quantized per call (per tensor, uint8), int8 weights packed once."""

    def __init__(self, layer: LayerInfo, qweight: Tensor, scale: Tensor, bias: Tensor | None, act: ActQuantSpec):
        super().__init__()
        self.layer_name = layer.name
        self.conv1d = layer.kind == "conv1d"
        self.act = act
        pad = resolve_padding(layer)
        conv = layer.conv
        lift = (lambda t: (1, *t)) if self.conv1d else tuple  # a conv1d runs as a conv2d of height 1
        self.stride, self.dilation = list(lift(conv["stride"])), list(lift(conv["dilation"]))
        self.padding = list((0, *pad) if self.conv1d else pad)
        self.groups = int(conv["groups"])
        shape = qweight.shape if not self.conv1d else (qweight.shape[0], qweight.shape[1], 1, qweight.shape[2])
        self.register_buffer("qweight", qweight.to(torch.int8).reshape(shape).contiguous())
        self.register_buffer("scale", scale.float().reshape(-1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._init_packing()

    def _pack(self):
        return torch.ops.onednn.qconv_prepack(self.qweight, self.scale, 1.0, 0, self.stride, self.padding,
                                              self.dilation, self.groups, None)

    def forward(self, x: Tensor) -> Tensor:
        x4 = x.unsqueeze(2) if self.conv1d else x
        xf = x4.float()
        scale, zp = act_qparams(xf.amin(), xf.amax(), self.act)
        xq = quantize_activation(xf, scale, zp, self.act).to(torch.uint8)
        y = torch.ops.onednn.qconv2d_pointwise(
            xq, float(scale), int(zp), self.packed(), self.scale, torch.zeros_like(self.scale, dtype=torch.long),
            self.bias, self.stride, self.padding, self.dilation, self.groups, 1.0, 0, torch.float32, "none", [], "")
        return y.squeeze(2) if self.conv1d else y


class Int8WeightOnlyGemm(QuantGemm):
    """W8A16: int8 per-channel weights, bf16 activations (``_weight_int8pack_mm``); K padded to 16."""

    K_ALIGN = 16
    input_dtype = torch.bfloat16

    def __init__(self, layer: LayerInfo, qweight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__(layer, bias)
        qweight = pad_to(qweight.to(torch.int8), cols=round_up(self.k, self.K_ALIGN))
        self.k_pad = qweight.shape[1]
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.reshape(-1).to(torch.bfloat16))

    def gemm(self, x: Tensor) -> Tensor:
        xb = pad_to(x.to(torch.bfloat16), cols=self.k_pad)
        y = torch._weight_int8pack_mm(xb.contiguous(), self.qweight, self.scale)
        return self._add_bias(y.float())


class Int4WeightOnlyGemm(QuantGemm):
    """W4A16 group-wise (tinygemm layout): packed uint8 weight, ``[K/g, N, 2]`` bf16 scales and zeros."""

    N_ALIGN = 16
    input_dtype = torch.bfloat16

    def __init__(self, layer: LayerInfo, q: Tensor, scale: Tensor, zero: Tensor, group: int, bias: Tensor | None):
        super().__init__(layer, bias)
        self.group = group
        n_pad = round_up(self.n, self.N_ALIGN)
        q = pad_to(q.to(torch.int32), rows=n_pad)  # padded rows: q=0 with scale/zero 0 -> weight 0
        self.k_pad = q.shape[1]
        sz = torch.stack([pad_to(scale, rows=n_pad), pad_to(zero, rows=n_pad)], dim=-1)  # [N, G, 2]
        self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2))
        self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous().to(torch.bfloat16))

    def gemm(self, x: Tensor) -> Tensor:
        xb = pad_to(x.to(torch.bfloat16), cols=self.k_pad)
        y = torch._weight_int4pack_mm_for_cpu(xb.contiguous(), self.qweight, self.group, self.scales_and_zeros)
        return self._add_bias(y[:, : self.n].float())


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------
@register_kernel
class CpuInt8Dynamic(Kernel):
    name = "cpu-w8a8-fbgemm-onednn"
    device = "cpu"
    version = "1"

    def available(self) -> bool:
        return _fbgemm_available()

    def options(self, layer: LayerInfo) -> list[LayerBits]:
        if layer.kind == "embedding":
            return []
        if layer.kind == "linear":
            return [LayerBits(8, 8)]
        return [LayerBits(8, 8)] if _onednn_conv_available() and resolve_padding(layer) is not None else []

    def scheme(self, bits: LayerBits) -> QuantScheme:
        return QuantScheme(
            WeightQuantSpec(8, symmetric=True, group_size=None, scale_dtype="float32"),
            ActQuantSpec(8, "int", "tensor", dynamic=True, symmetric=False, reduce_range=not cpu_has_vnni()))

    def convert(self, module: nn.Module, layer: LayerInfo, bits: LayerBits, qweight: QuantizedWeight) -> nn.Module:
        scheme = self.scheme(bits)
        if layer.kind == "linear":
            return Int8DynamicGemm(layer, qweight.q, qweight.scale, module.bias, scheme.act.reduce_range)
        return Int8DynamicConv(layer, qweight.q.reshape(layer.weight_shape), qweight.scale, module.bias, scheme.act)


@register_kernel
class CpuInt8WeightOnly(Kernel):
    name = "cpu-w8a16-int8pack"
    device = "cpu"
    version = "1"

    def available(self) -> bool:
        return hasattr(torch, "_weight_int8pack_mm")

    def options(self, layer: LayerInfo) -> list[LayerBits]:
        return [LayerBits(8, 16)] if gemm_supported(layer) else []

    def rejected(self, layer: LayerInfo) -> dict[LayerBits, str]:
        if gemm_supported(layer) or layer.kind == "embedding":
            return {}
        return {LayerBits(8, 16): gemm_unsupported_reason(layer)}

    def scheme(self, bits: LayerBits) -> QuantScheme:
        return QuantScheme(WeightQuantSpec(8, symmetric=True, group_size=None, scale_dtype="bfloat16"),
                           ActQuantSpec(16, "bfloat16"), out_dtype="bfloat16")

    def convert(self, module: nn.Module, layer: LayerInfo, bits: LayerBits, qweight: QuantizedWeight) -> nn.Module:
        return Int8WeightOnlyGemm(layer, qweight.q, qweight.scale, module.bias)

    def weight_bytes(self, layer: LayerInfo, bits: LayerBits) -> int:
        bias = layer.n * 4 if layer.has_bias else 0
        return layer.n * round_up(layer.k, Int8WeightOnlyGemm.K_ALIGN) + layer.n * 2 + bias


@register_kernel
class CpuInt4WeightOnly(Kernel):
    name = "cpu-w4a16-int4pack"
    device = "cpu"
    version = "1"
    GROUPS = (32, 64, 128)

    def available(self) -> bool:
        return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")

    def options(self, layer: LayerInfo) -> list[LayerBits]:
        if not gemm_supported(layer):
            return []
        # Groups wider than K only add padding; the smallest group is always offered.
        return [LayerBits(4, 16, g) for g in self.GROUPS if g <= layer.k or g == self.GROUPS[0]]

    def rejected(self, layer: LayerInfo) -> dict[LayerBits, str]:
        if layer.kind == "embedding":
            return {}
        if not gemm_supported(layer):
            return {LayerBits(4, 16, g): gemm_unsupported_reason(layer) for g in self.GROUPS}
        return {LayerBits(4, 16, g): f"group {g} wider than K={layer.k}" for g in self.GROUPS[1:] if g > layer.k}

    def scheme(self, bits: LayerBits) -> QuantScheme:
        return QuantScheme(WeightQuantSpec(4, symmetric=False, group_size=bits.group_size, scale_dtype="bfloat16"),
                           ActQuantSpec(16, "bfloat16"), out_dtype="bfloat16")

    def convert(self, module: nn.Module, layer: LayerInfo, bits: LayerBits, qweight: QuantizedWeight) -> nn.Module:
        return Int4WeightOnlyGemm(layer, qweight.q, qweight.scale, qweight.zero, bits.group_size, module.bias)

    def weight_bytes(self, layer: LayerInfo, bits: LayerBits) -> int:
        n_pad = round_up(layer.n, Int4WeightOnlyGemm.N_ALIGN)
        k_pad = round_up(layer.k, bits.group_size)
        bias = layer.n * 4 if layer.has_bias else 0
        return n_pad * k_pad // 2 + (k_pad // bits.group_size) * n_pad * 2 * 2 + bias

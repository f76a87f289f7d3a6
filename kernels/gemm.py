"""The quantized-module shell shared by every kernel: a Linear/Conv1d/Conv2d run as one GEMM.

A linear layer is ``[rows, K] x [K, N]`` over all leading dims; a convolution becomes that GEMM through im2col
(``F.unfold``), whose column order ``(C, kh, kw)`` is the order ``weight.reshape(N, -1)`` uses, so group-wise
scales line up. Subclasses only implement :meth:`QuantGemm.gemm` (bias included) from their own packed buffers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpq.layers import LayerInfo


def resolve_padding(layer: LayerInfo) -> tuple[int, ...] | None:
    """Numeric padding of a conv layer, or None when im2col cannot express it (non-zero modes, uneven 'same')."""
    conv = layer.conv or {}
    if conv.get("padding_mode", "zeros") != "zeros":
        return None
    pad = conv.get("padding", 0)
    kernel = layer.weight_shape[2:]
    if pad == "valid":
        return tuple(0 for _ in kernel)
    if pad == "same":
        if any(s != 1 for s in conv["stride"]):
            return None
        total = [d * (k - 1) for d, k in zip(conv["dilation"], kernel)]
        if any(t % 2 for t in total):
            return None
        return tuple(t // 2 for t in total)
    return tuple(pad)


def gemm_supported(layer: LayerInfo) -> bool:
    """Whether a layer maps to one dense GEMM (grouped/depthwise convs do not)."""
    if layer.kind in ("linear", "embedding"):
        return layer.kind == "linear"
    return layer.groups == 1 and resolve_padding(layer) is not None


def gemm_unsupported_reason(layer: LayerInfo) -> str:
    """Why a layer has no GEMM kernel (for the search space's notes and unreachable-budget messages)."""
    return f"{layer.kind} with groups={layer.groups} and padding {(layer.conv or {}).get('padding')!r} is not one " \
           f"dense GEMM"


class WeightStandIn:
    """``module.weight`` of a quantized module: an empty float32 tensor on the module's device. Model code often
    reads ``layer.weight.dtype`` or ``.device`` to cast its inputs (Hugging Face ViT does); the real weight is packed
    in the module's buffers, so this stand-in answers those questions and holds no data."""

    @property
    def weight(self) -> Tensor:
        device = next((b.device for b in self.buffers()), torch.device("cpu"))
        return torch.empty(0, device=device)


class QuantGemm(WeightStandIn, nn.Module):
    """Base of the quantized modules: reshapes the input to a GEMM, calls :meth:`gemm`, reshapes back.

    ``input_dtype`` casts the input before im2col, so the (larger) unfolded matrix is built in the kernel's own
    activation dtype rather than copied again.
    """

    input_dtype: torch.dtype | None = None

    def __init__(self, layer: LayerInfo, bias: Tensor | None):
        super().__init__()
        self.kind = layer.kind
        self.layer_name = layer.name
        self.n = layer.n
        self.k = layer.k
        self.kernel_size = tuple(layer.weight_shape[2:])
        if layer.kind != "linear":
            self.stride = tuple(layer.conv["stride"])
            self.dilation = tuple(layer.conv["dilation"])
            self.padding = resolve_padding(layer)
            if self.padding is None or layer.groups != 1:
                raise ValueError(f"layer {layer.name!r}: grouped or non-zero-padded convs have no GEMM kernel")
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def gemm(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype  # the output has the caller's dtype (float32 or bf16 models), whatever the kernel writes
        if self.input_dtype is not None:
            x = x.to(self.input_dtype)
        if self.kind == "linear":
            y = self.gemm(x.reshape(-1, self.k)).reshape(*x.shape[:-1], self.n)
        elif self.kind == "conv1d":
            y = self._conv2d(x.unsqueeze(2), (1, *self.kernel_size), (1, *self.stride), (0, *self.padding),
                             (1, *self.dilation)).squeeze(2)
        else:
            y = self._conv2d(x, self.kernel_size, self.stride, self.padding, self.dilation)
        return y.to(dtype)

    def _conv2d(self, x: Tensor, kernel, stride, padding, dilation) -> Tensor:
        b, _, h, w = x.shape
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, K, L]
        ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        rows = cols.transpose(1, 2).reshape(-1, self.k)
        y = self.gemm(rows)  # [B*L, N]
        return y.reshape(b, ho * wo, self.n).transpose(1, 2).reshape(b, self.n, ho, wo)

    def _add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.kind}, k={self.k}, n={self.n}"


def pad_to(t: Tensor, rows: int | None = None, cols: int | None = None) -> Tensor:
    """Zero-pad a 2-D tensor to at least ``rows`` x ``cols``."""
    pr = 0 if rows is None else max(rows - t.shape[0], 0)
    pc = 0 if cols is None else max(cols - t.shape[1], 0)
    return F.pad(t, (0, pc, 0, pr)) if (pr or pc) else t


def round_up(x: int, m: int) -> int:
    return math.ceil(x / m) * m


def state_bytes(module: nn.Module) -> int:
    """Bytes of a module's state dict (what a saved checkpoint of it holds)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, Tensor))


def describe(module: nn.Module) -> dict[str, Any]:
    return {"type": type(module).__name__, "bytes": state_bytes(module)}

"""Fake-quantized models: the float reference of what a bit config will compute on its kernels.

A :class:`FakeQuantLayer` holds ``Q(W)`` (dequantized once) and fake-quantizes its input as the kernel's
:class:`~mpq.numerics.QuantScheme` says, so its output matches the real kernel up to accumulation order. It runs in
float on any device and keeps gradients flowing to nothing (weights are buffers): it is for evaluation.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpq.config import BitConfig
from mpq.layers import LayerInfo, LayerInventory, call_model, discover_layers, set_submodule, weight_matrix
from mpq.numerics import ActivationQuantizer, QuantScheme, torch_dtype
from mpq.quantizers import Quantizer, get_quantizer
from mpq.kernel_registry import scheme_for


class FakeQuantLayer(nn.Module):
    """A Linear/Conv1d/Conv2d/Embedding (or Hugging Face Conv1D) whose weight is ``Q(W)``, chosen by ``quantizer``,
    and whose input is fake-quantized (an embedding's input is integer ids: never)."""

    def __init__(self, module: nn.Module, scheme: QuantScheme, name: str = "", quantizer: Quantizer | None = None):
        super().__init__()
        self.scheme = scheme
        self.name = name
        self.kind = type(module).__name__
        w = weight_matrix(module).detach()  # output channels first, also for HF Conv1D's [in, out] storage
        if scheme.weight is not None:
            w = (quantizer or get_quantizer()).fake(name, w, scheme.weight)
        self.register_buffer("weight", w)
        bias = getattr(module, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.act = ActivationQuantizer(scheme.act, name)
        self._conv = {}
        self._embedding = {}
        if isinstance(module, nn.Embedding):
            self._embedding = dict(padding_idx=module.padding_idx, max_norm=module.max_norm,
                                   norm_type=module.norm_type, scale_grad_by_freq=module.scale_grad_by_freq,
                                   sparse=module.sparse)
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            self._conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                              groups=module.groups)
            self._fn = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
            if module.padding_mode != "zeros":
                raise ValueError(f"layer {name!r}: padding mode {module.padding_mode!r} is not fake-quantizable")

    def forward(self, x: Tensor) -> Tensor:
        if self._embedding:
            return F.embedding(x, self.weight, **self._embedding)
        x = self.act(x)
        if self._conv:
            y = self._fn(x, self.weight, None, **self._conv)
            if self.scheme.out_dtype:
                y = y.to(torch_dtype(self.scheme.out_dtype)).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.reshape(1, -1, *([1] * (y.dim() - 2)))
            return y
        y = F.linear(x, self.weight)
        if self.scheme.out_dtype:
            y = y.to(torch_dtype(self.scheme.out_dtype)).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.kind} {self.name!r}: {self.scheme}"


def fake_quantize(model: nn.Module, config: BitConfig, device: str | None = "cpu",
                  inventory: LayerInventory | None = None, inplace: bool = False,
                  quantizer: Quantizer | None = None) -> nn.Module:
    """A copy of ``model`` (or the model itself with ``inplace``) with every non-float layer fake-quantized.

    ``device`` picks whose numerics are emulated (its kernels'); None uses the generic default scheme.
    ``quantizer`` chooses the integers (min-max when None; a GPTQ quantizer must have been prepared).
    """
    inv = inventory or discover_layers(model)
    out = model if inplace else copy.deepcopy(model)
    for name, bits in config.quantized().items():
        layer: LayerInfo = inv[name]
        scheme = scheme_for(layer, bits, device)
        set_submodule(out, name, FakeQuantLayer(out.get_submodule(name), scheme, name, quantizer))
    return out


def calibrate(model: nn.Module, batches: list[Any]) -> nn.Module:
    """Run calibration inputs through ``model`` so its static activation quantizers learn their ranges."""
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    for q in quantizers:
        q.observing = True
    try:
        with torch.no_grad():
            for inputs in batches:
                call_model(model, inputs)
    finally:
        for q in quantizers:
            q.observing = False
    return model

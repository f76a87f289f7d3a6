"""Latency workloads: a layer's shape x option x batch, deduplicated across layers (identical transformer blocks
share one measurement), each buildable as the exact module that ``mpq.apply`` would install.

A workload also carries its context: ``context_bytes``, what the model reads between two calls of the layer (its
weights, rounded up to a power of two so that models of about the same size share rows). The profiler rotates
over copies of the module to leave its weights as cold as that (:func:`mpq.workers.timing.rotation_copies`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpq.config import FLOAT, LayerBits
from mpq.layers import LayerInfo, LayerInventory
from mpq.kernel_registry import kernel_for
from mpq.space import SearchSpace


@dataclass(frozen=True)
class Workload:
    kind: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    input_shape: tuple[int, ...]  # batch dim included
    conv: tuple[tuple[str, Any], ...] | None
    option: str  # LayerBits name
    kernel: str  # "<name>@<version>", or "torch-float" for the float module
    context_bytes: int = 0  # bytes the model reads between two calls of this layer (0: none, one copy timed)
    dtype: str = "float32"  # the model's float dtype: the float layer's weights and every layer's activations

    @property
    def key(self) -> str:
        fields = {"kind": self.kind, "w": list(self.weight_shape), "bias": self.has_bias,
                  "x": list(self.input_shape), "conv": None if self.conv is None else dict(self.conv),
                  "option": self.option, "kernel": self.kernel}
        if self.context_bytes:
            fields["ctx"] = self.context_bytes
        if self.dtype != "float32":  # float32 keys stay as they were before the dtype was recorded
            fields["dtype"] = self.dtype
        return json.dumps(fields, sort_keys=True, default=list)

    @classmethod
    def from_key(cls, key: str) -> Workload:
        """The workload a cache key names (to measure a cached row again)."""
        d = json.loads(key)
        conv = None if d["conv"] is None else tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                           for k, v in d["conv"].items()))
        return cls(d["kind"], tuple(d["w"]), d["bias"], tuple(d["x"]), conv, d["option"], d["kernel"],
                   d.get("ctx", 0), d.get("dtype", "float32"))

    def layer_info(self) -> LayerInfo:
        params = 1
        for d in self.weight_shape:
            params *= d
        return LayerInfo(name=f"workload:{self.kind}", kind=self.kind, weight_shape=self.weight_shape,
                         params=params, has_bias=self.has_bias, weight_bytes_per_elem=4, calls=1,
                         input_shape=self.input_shape, batch_size=self.input_shape[0],
                         conv=None if self.conv is None else dict(self.conv))

    def build(self, device: str = "cpu", seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
        """The module that runs this workload (random weights) and a random input of the right shape."""
        torch.manual_seed(seed)
        info = self.layer_info()
        if self.kind == "linear":
            module = nn.Linear(self.weight_shape[1], self.weight_shape[0], bias=self.has_bias)
        elif self.kind == "embedding":
            module = nn.Embedding(*self.weight_shape)
        else:
            conv = dict(self.conv)
            cls = nn.Conv1d if self.kind == "conv1d" else nn.Conv2d
            module = cls(self.weight_shape[1] * conv["groups"], self.weight_shape[0], self.weight_shape[2:],
                         stride=conv["stride"], padding=conv["padding"], dilation=conv["dilation"],
                         groups=conv["groups"], bias=self.has_bias, padding_mode=conv.get("padding_mode", "zeros"))
        bits = LayerBits.parse(self.option)
        dtype = getattr(torch, self.dtype)
        if bits != FLOAT:
            module = kernel_for(info, bits, device).quantize_module(module, info, bits)
        else:  # in the model's dtype: a bf16 layer timed in fp32 reads twice the bytes (and, at 2048 rows on the
            module = module.to(dtype)  # H200, ran 13x slower alone than inside the bf16 model)
        module.eval()
        if self.kind == "embedding":
            return module.to(device), torch.randint(0, self.weight_shape[0], self.input_shape, device=device)
        return module.to(device), torch.randn(self.input_shape, device=device, dtype=dtype)


def context_bytes_of(inventory: LayerInventory) -> int:
    """What a forward pass reads besides one layer, as a power of two: every float weight of the model (an upper
    bound for a quantized model, which reads fewer bytes but the same number of layers)."""
    total = sum(layer.float_bytes() for layer in inventory) + inventory.float_bytes_other()
    return 1 << max(total - 1, 1).bit_length() if total > 0 else 0


def workload_of(layer: LayerInfo, bits: LayerBits, device: str, batch_size: int | None = None,
                context_bytes: int = 0) -> Workload:
    if layer.input_shape is None:
        raise ValueError(f"layer {layer.name!r} has no input shape: discover layers with an example input")
    shape = layer.input_shape if batch_size is None else (batch_size, *layer.input_shape[1:])
    if bits == FLOAT:
        kernel = f"torch-float@{torch.__version__}"
    else:
        k = kernel_for(layer, bits, device)
        kernel = f"{k.name}@{k.version}"
    conv = None if layer.conv is None else tuple(sorted(layer.conv.items()))
    return Workload(layer.kind, layer.weight_shape, layer.has_bias, tuple(shape), conv, bits.name, kernel,
                    context_bytes, layer.float_dtype)


def workloads_for(inventory: LayerInventory, space: SearchSpace, batch_size: int | None = None,
                  context_bytes: int | None = None) -> tuple[list[Workload], dict[tuple[str, str], Workload]]:
    """Unique workloads of a search space, and which workload each (layer, option) runs. Every layer's float
    workload is included, options or not: it is the reference that relative latency budgets divide.
    ``context_bytes`` defaults to :func:`context_bytes_of` the inventory; 0 times each workload alone."""
    ctx = context_bytes_of(inventory) if context_bytes is None else context_bytes
    by_pair: dict[tuple[str, str], Workload] = {}
    unique: dict[str, Workload] = {}
    for layer in inventory:
        for bits in dict.fromkeys((FLOAT, *space[layer.name])):
            w = workload_of(layer, bits, space.device, batch_size, ctx)
            by_pair[(layer.name, bits.name)] = w
            unique.setdefault(w.key, w)
    return list(unique.values()), by_pair

"""Cost models: size in bytes (scales, zeros and padding included), BOPs, and latency from the profile table.

- size: what the quantized layer's state dict holds (integer weights, scales, zeros, float bias), from the kernel's
  own storage format (:meth:`mpq.kernel_registry.Kernel.weight_bytes`); float layers count their parameters' bytes.
- BOPs: MACs x weight bits x activation bits (float counts as its dtype width, 32 for fp32).
- latency: the profiled median of the layer's workload times the calls per forward; the rest of the model (what is
  not a quantizable layer) is a fixed cost, measured once with every layer replaced by its recorded output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from mpq.config import FLOAT, LayerBits
from mpq.layers import LayerInfo, LayerInventory
from mpq.numerics import GenericNumerics, QuantScheme, torch_dtype
from mpq.kernel_registry import kernel_for, scheme_for
from mpq.space import SearchSpace

RESOURCES = ("size_mb", "bops", "latency_ms")
MB = 1e6


def packed_weight_bytes(layer: LayerInfo, scheme: QuantScheme) -> int:
    """Bytes of a layer stored as ``scheme`` says: integer weights, scales, zeros, float32 bias; K padded to groups."""
    if scheme is None or scheme.weight is None:
        return layer.float_bytes()
    spec = scheme.weight
    g = spec.group_size or layer.k
    k_pad = math.ceil(layer.k / g) * g
    groups = k_pad // g
    scale_bytes = torch_dtype(spec.scale_dtype).itemsize
    per_group = scale_bytes * (1 if spec.symmetric else 2)
    bias = layer.n * 4 if layer.has_bias else 0
    return math.ceil(layer.n * k_pad * spec.bits / 8) + layer.n * groups * per_group + bias


def layer_size_bytes(layer: LayerInfo, bits: LayerBits, device) -> int:
    """Bytes of ``layer`` at ``bits``: as the kernel of ``device`` stores it, or as generic numerics say (``device``
    None or a :class:`~mpq.numerics.GenericNumerics`: no padding beyond whole groups)."""
    if bits == FLOAT:
        return layer.float_bytes()
    if device is None or isinstance(device, GenericNumerics):
        return packed_weight_bytes(layer, scheme_for(layer, bits, device))
    return kernel_for(layer, bits, device).weight_bytes(layer, bits)


def layer_bops(layer: LayerInfo, bits: LayerBits) -> float:
    float_bits = 8 * layer.weight_bytes_per_elem
    return float(layer.macs) * (bits.w_bits or float_bits) * (bits.a_bits or float_bits)


@dataclass(frozen=True)
class Reference:
    """The float model's totals, against which relative budgets are resolved."""

    size_mb: float
    bops: float
    latency_ms: float

    def as_dict(self) -> dict[str, float]:
        return {"size_mb": self.size_mb, "bops": self.bops, "latency_ms": self.latency_ms}


def build_cost_table(inventory: LayerInventory, space: SearchSpace,
                     latency_of: Callable[[LayerInfo, LayerBits], float] | None = None) -> pd.DataFrame:
    """One row per (layer, option): size_mb, bops, latency_ms (NaN where no latency is known)."""
    rows = []
    for layer in inventory:
        for bits in space[layer.name]:
            rows.append({
                "layer": layer.name, "option": bits.name, "w_bits": bits.w_bits, "a_bits": bits.a_bits,
                "group_size": bits.group_size,
                "size_mb": layer_size_bytes(layer, bits, space.device) / MB,
                "bops": layer_bops(layer, bits),
                "latency_ms": float("nan") if latency_of is None else latency_of(layer, bits),
            })
    return pd.DataFrame(rows)


def fixed_costs(inventory: LayerInventory, rest_latency_ms: float = 0.0) -> dict[str, float]:
    """Costs outside the quantizable layers: kept-float parameters, and the measured rest of the forward pass."""
    return {"size_mb": inventory.float_bytes_other() / MB, "bops": 0.0, "latency_ms": rest_latency_ms}




def float_reference(inventory: LayerInventory, float_latency_ms: float) -> Reference:
    """The float model's totals: every parameter in float, every layer's BOPs at float width, measured latency."""
    size = sum(layer.float_bytes() for layer in inventory) + inventory.float_bytes_other()
    bops = sum(layer_bops(layer, FLOAT) for layer in inventory)
    return Reference(size / MB, bops, float_latency_ms)

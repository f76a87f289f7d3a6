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


# --------------------------------------------------------------------------------------------------------------------
# Bits per weight, and why a size cannot be reached
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BitsPerWeight:
    """Average bits per weight over the quantizable layers: ``with_overhead`` counts every stored byte of the weights
    (levels, scales, zeros, padding; not the bias), ``without_overhead`` only the levels' nominal width. Float
    layers count their dtype's width in both."""

    with_overhead: float
    without_overhead: float
    weights: int  # weight elements over which the averages are taken


def bits_per_weight(inventory: LayerInventory, config, device) -> BitsPerWeight:
    """Average bits per weight of ``config`` (a :class:`~mpq.config.BitConfig` or a ``{layer: option}`` mapping) over
    the quantizable layers of ``inventory``, as the kernels of ``device`` store them (or generic numerics: ``device``
    None or a :class:`~mpq.numerics.GenericNumerics`)."""
    choice = config.layers if hasattr(config, "layers") else config
    total = nominal = weights = 0.0
    for layer in inventory:
        bits = choice.get(layer.name, FLOAT)
        bits = LayerBits.parse(bits) if isinstance(bits, str) else bits
        w = layer.n * layer.k
        weights += w
        if bits == FLOAT or bits.w_bits is None:
            total += w * 8 * layer.weight_bytes_per_elem
            nominal += w * 8 * layer.weight_bytes_per_elem
            continue
        bias = layer.n * 4 if layer.has_bias and layer.kind != "embedding" else 0
        total += 8 * (layer_size_bytes(layer, bits, device) - bias)
        nominal += w * bits.w_bits
    weights = max(weights, 1)
    return BitsPerWeight(total / weights, nominal / weights, int(weights))


def size_for_bits(inventory: LayerInventory, bits: float) -> float:
    """The model size in MB whose quantizable layers average ``bits`` per weight (overhead included): kept-float
    parameters and float32 biases at their size, every weight at ``bits``. How a budget in bits becomes ``size_mb``."""
    total = inventory.float_bytes_other()
    for layer in inventory:
        total += layer.n * layer.k * bits / 8 + (layer.n * 4 if layer.has_bias and layer.kind != "embedding" else 0)
    return total / MB


def explain_unreachable(inventory: LayerInventory, space: SearchSpace, size_mb: float, max_layers: int = 4) -> str:
    """Why ``size_mb`` is below the smallest size the space reaches, and which options would reach it: the layers
    whose ruled-out options (``space.excluded``: a kernel's shape rule, ``allowed``, ``pinned``) would save the most
    bytes, with each reason, e.g. ``reaching it needs w2a16g128sym on layer blocks.0.fc1 (...), which no kernel of
    cpu offers there: K=64 not a multiple of 128 (cpu-lowbit-mpq)``. Empty if ``size_mb`` is reachable."""
    fixed = inventory.float_bytes_other()
    cheapest = {layer.name: min(layer_size_bytes(layer, b, space.device) for b in space[layer.name])
                for layer in inventory}
    smallest = fixed + sum(cheapest.values())
    limit = size_mb * MB
    if limit >= smallest:
        return ""
    head = f"size_mb={size_mb:.6g} is below the smallest size this space reaches, {smallest / MB:.6g} MB"
    savings = []  # (bytes saved, layer, option, why)
    for layer in inventory:
        ruled_out = (space.excluded or {}).get(layer.name, {})
        best = min(ruled_out.items(), key=lambda kv: kv[1].size_bytes, default=None)
        if best is not None and best[1].size_bytes < cheapest[layer.name]:
            savings.append((cheapest[layer.name] - best[1].size_bytes, layer, best[0], best[1].reason))
    need = smallest - limit
    if sum(s[0] for s in savings) < need:
        floor = smallest - sum(s[0] for s in savings)
        kept = sorted(inventory.kept_float, key=lambda m: -m.bytes)[:3]
        kept_text = ", ".join(f"{m.name} ({m.bytes / MB:.3g} MB: {m.reason})" for m in kept) or "none"
        return (f"{head}; no option the {_device_name(space)} kernels have, even those ruled out for a layer, gets "
                f"below {floor / MB:.6g} MB: the smallest options of every layer are taken, and the parameters kept "
                f"in float outside the quantizable layers hold {fixed / MB:.6g} MB (largest: {kept_text})")
    savings.sort(key=lambda s: -s[0])
    picked, saved = [], 0
    for s in savings:
        picked.append(s)
        saved += s[0]
        if saved >= need:
            break
    parts = [f"{opt} on layer {layer.name} ({layer.kind} {'x'.join(map(str, layer.weight_shape))}, saving "
             f"{b / MB:.3g} MB), which no kernel of {_device_name(space)} offers there: {why}"
             for b, layer, opt, why in picked[:max_layers]]
    more = f"; and {len(picked) - max_layers} more layers like these" if len(picked) > max_layers else ""
    return f"{head}; reaching it needs " + "; ".join(parts) + more


def _device_name(space: SearchSpace) -> str:
    return space.device if isinstance(space.device, str) else "generic"

"""The search space: for each layer, the bits some kernel of the target device can run, plus float.

The search never picks what cannot run, because the options come from the kernel registry of the device. What a
layer cannot take is recorded with the reason (a kernel rules its shape out, ``allowed`` or ``pinned`` leave it
out), so that an unreachable budget can say what would reach it (:func:`mpq.costs.explain_unreachable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import pandas as pd
from torch import nn

from mpq.config import FLOAT, BitConfig, LayerBits
from mpq.errors import ConfigError
from mpq.layers import LayerInventory, discover_layers
from mpq.numerics import GenericNumerics
from mpq.quantizers import MinMaxQuantizer, Quantizer
from mpq.kernel_registry import allowed_text, kernels_for, layer_options, normalize_device, option_order


@dataclass(frozen=True)
class Excluded:
    """An option a layer does not get, why, and how many bytes it would have stored had it been offered."""

    reason: str
    size_bytes: int


@dataclass(frozen=True)
class SearchSpace:
    """Allowed options per layer (float first), with a note for layers that some kernel could not take, and the
    quantizer that chooses the integers of every option (estimators, fake-quant and ``apply`` all use it)."""

    device: Any  # a device name, or generic numerics (None or a GenericNumerics: no kernels, see generic_space)
    options: Mapping[str, tuple[LayerBits, ...]]
    notes: Mapping[str, str] = field(default_factory=dict)
    quantizer: Quantizer = field(default_factory=MinMaxQuantizer)
    excluded: Mapping[str, Mapping[str, Excluded]] = field(default_factory=dict)  # layer -> option name -> why

    @property
    def layers(self) -> list[str]:
        return list(self.options)

    def __getitem__(self, layer: str) -> tuple[LayerBits, ...]:
        return self.options[layer]

    def size(self) -> int:
        """Number of configs in the space."""
        n = 1
        for opts in self.options.values():
            n *= len(opts)
        return n

    def all_options(self) -> list[LayerBits]:
        seen: dict[LayerBits, None] = {}
        for opts in self.options.values():
            seen.update(dict.fromkeys(opts))
        return list(seen)

    def pairs(self) -> Iterable[tuple[str, LayerBits]]:
        for layer, opts in self.options.items():
            for bits in opts:
                yield layer, bits

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"layer": l, "option": b.name, "w_bits": b.w_bits, "a_bits": b.a_bits,
                              "group_size": b.group_size} for l, b in self.pairs()])


def build_search_space(inventory: LayerInventory, device: str = "cpu", allowed: Iterable[LayerBits | str] | None = None,
                       pinned: Mapping[str, LayerBits | str] | None = None, keep_float: bool = True) -> SearchSpace:
    """Options per layer from the kernels of ``device``.

    ``allowed`` restricts every layer to these bits (where a kernel supports them); ``pinned`` fixes layers to one
    option; ``keep_float=False`` drops float from layers that have a quantized option.
    """
    dev = normalize_device(device)
    allow = None if allowed is None else {LayerBits.parse(b) if isinstance(b, str) else b for b in allowed}
    pins = {k: LayerBits.parse(v) if isinstance(v, str) else v for k, v in (pinned or {}).items()}
    unknown = set(pins) - set(inventory.names)
    if unknown:
        raise ConfigError(f"pinned layers {sorted(unknown)} are not quantizable layers of the model; "
                          f"quantizable: {inventory.names}")
    options: dict[str, tuple[LayerBits, ...]] = {}
    notes: dict[str, str] = {}
    excluded: dict[str, dict[str, Excluded]] = {}
    for layer in inventory:
        offered = layer_options(layer, dev)
        quant = sorted(offered, key=option_order)
        out = excluded.setdefault(layer.name, {})
        for bits, (why, nbytes) in rejected_options(layer, dev).items():
            if bits not in offered:
                out.setdefault(bits.name, Excluded(why, nbytes))
        if not quant:
            notes[layer.name] = f"no {dev} kernel runs {layer.kind} {layer.weight_shape} (groups={layer.groups}); float"
        if allow is not None:
            for b in quant:
                if b not in allow:
                    out[b.name] = Excluded("not in the allowed options", offered[b].weight_bytes(layer, b))
            quant = [b for b in quant if b in allow]
        opts = ([FLOAT] if keep_float or not quant else []) + quant
        if layer.name in pins:
            pin = pins[layer.name]
            if pin not in opts and pin != FLOAT:
                raise ConfigError(f"layer {layer.name!r} pinned to {pin.name!r}, which no {dev} kernel runs; "
                                  f"allowed: {[b.name for b in opts]}")
            for b in quant:
                if b != pin:
                    out[b.name] = Excluded(f"the layer is pinned to {pin.name}", offered[b].weight_bytes(layer, b))
            opts = [pin]
        options[layer.name] = tuple(opts)
    return SearchSpace(dev, options, notes, excluded={k: v for k, v in excluded.items() if v})


def rejected_options(layer, device: str) -> dict[LayerBits, tuple[str, int]]:
    """Options that a kernel of ``device`` has but rules out for ``layer``'s shape: the reason (naming the kernel)
    and the bytes it would store (:meth:`mpq.kernel_registry.Kernel.rejected`)."""
    out: dict[LayerBits, tuple[str, int]] = {}
    for kernel in kernels_for(device):
        for bits, why in kernel.rejected(layer).items():
            out.setdefault(bits, (f"{why} ({kernel.name})", kernel.weight_bytes(layer, bits)))
    return out


def generic_space(inventory: LayerInventory, weight_bits: Iterable[int] = (2, 3, 4, 6, 8),
                  act_bits: Iterable[int | None] = (None, 8), group_sizes: Iterable[int | None] = (None,),
                  quantizer: Quantizer | None = None, numerics: GenericNumerics | None = None) -> SearchSpace:
    """A device-free space for studying sensitivity and rounding (``device=None``: fake-quant with the generic
    numerics of :func:`mpq.numerics.default_scheme`): every weight bit-width at each group size (None: per channel),
    with each activation width. Embeddings get the weight-only options. Groups wider than a layer's K are left out
    (they would only pad). ``numerics`` says how weights are stored (default: symmetric, float32 scales). Not for
    deployment: no kernel is promised to run these."""
    options = {}
    for layer in inventory:
        acts = [None] if layer.kind == "embedding" else list(act_bits)
        groups = [g for g in group_sizes if g is None or g < layer.k] or [None]
        options[layer.name] = (FLOAT,) + tuple(LayerBits(w, a, g) for w in sorted(weight_bits, reverse=True)
                                               for g in groups for a in acts)
    return SearchSpace(numerics, options, quantizer=quantizer or MinMaxQuantizer())


def validate_config(config: BitConfig, model: nn.Module, device: str = "cpu", example_input=None,
                    inventory: LayerInventory | None = None) -> None:
    """Check that every layer the config names exists, is quantizable, and has a kernel for its bits."""
    inv = inventory or discover_layers(model, example_input)
    names = set(inv.names)
    modules = dict(model.named_modules())
    for name, bits in config.layers.items():
        if name not in names:
            if name in modules:
                raise ConfigError(f"BitConfig names layer {name!r}, a {type(modules[name]).__name__}, which mpq "
                                  f"cannot quantize; quantizable layers: {sorted(names)}")
            raise ConfigError(f"BitConfig names layer {name!r}, which the model lacks; quantizable layers: "
                              f"{sorted(names)}")
        if bits == FLOAT:
            continue
        opts = layer_options(inv[name], device)
        if bits not in opts:
            raise ConfigError(f"BitConfig gives layer {name!r} bits {bits.name!r} (w_bits={bits.w_bits}, "
                              f"a_bits={bits.a_bits}, group_size={bits.group_size}), which no "
                              f"{normalize_device(device)} kernel supports; allowed: {allowed_text(opts)}")

"""What an export writes: for every quantizable layer its option, the option's numerics and mpq's integers for it.

An :class:`ExportPlan` is built once from a model and a bit config, with the numerics of the device the config was
searched for (its kernels' :class:`~mpq.numerics.QuantScheme`) and the quantizer the search recorded, so the
integers every format writes are exactly the ones mpq scored, fake-quantized and installed. The writers
(:mod:`mpq.export.compressed_tensors`, :mod:`mpq.export.gguf_file`) only repack them.

Numerics come from ``device``: a device name (``"cpu"``, ``"cuda"``: its registered kernels, also where they cannot
run on this machine, so a CUDA run exports on a laptop), generic numerics (``None`` or a
:class:`~mpq.numerics.GenericNumerics`), or a function ``(LayerInfo, LayerBits) -> QuantScheme`` for options no
kernel defines yet.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Union

import torch
from torch import Tensor, nn

from mpq.config import FLOAT, BitConfig, LayerBits
from mpq.costs import layer_size_bytes, packed_weight_bytes
from mpq.errors import ConfigError
from mpq.kernel_registry import Kernel, registered_kernel, scheme_for
from mpq.layers import LayerInfo, LayerInventory, discover_layers, set_submodule, weight_matrix
from mpq.numerics import GenericNumerics, QuantizedWeight, QuantScheme
from mpq.quantizers import Quantizer

log = logging.getLogger(__name__)

SchemeFn = Callable[[LayerInfo, LayerBits], QuantScheme]
Numerics = Union[str, GenericNumerics, SchemeFn, None]


class UnsupportedOptionError(ConfigError):
    """An option of the config that the chosen serving format cannot express; nothing was written."""


@dataclass(frozen=True)
class LayerExport:
    """One quantizable layer as the export sees it. ``scheme``/``qweight`` are None for a float layer."""

    name: str
    layer: LayerInfo
    bits: LayerBits
    scheme: QuantScheme | None
    qweight: QuantizedWeight | None
    predicted_bytes: int  # what mpq's cost model counts for this layer at this option

    @property
    def quantized(self) -> bool:
        return self.qweight is not None

    def values(self) -> Tensor:
        """mpq's dequantized weight, output channels first and flattened to ``[N, K]`` (float32)."""
        assert self.qweight is not None
        return self.qweight.dequantize().float().reshape(self.layer.n, -1)


@dataclass
class ExportPlan:
    """The model, its config, and a :class:`LayerExport` for every quantizable layer (float ones included)."""

    model: nn.Module
    config: BitConfig
    inventory: LayerInventory
    layers: dict[str, LayerExport]
    device: str
    quantizer: Quantizer
    warnings: list[str] = field(default_factory=list)

    def quantized(self) -> Iterator[LayerExport]:
        return (lx for lx in self.layers.values() if lx.quantized)

    def predicted_total_bytes(self) -> int:
        """mpq's predicted size of the whole model: every layer at its option plus the kept-float modules."""
        return sum(lx.predicted_bytes for lx in self.layers.values()) + self.inventory.float_bytes_other()


def _registered_kernel(layer: LayerInfo, bits: LayerBits, device: str) -> Kernel:
    """The kernel registered for ``bits`` on ``device`` even where this machine cannot run it (its numerics are
    plain data)."""
    try:
        return registered_kernel(layer, bits, device)
    except ConfigError as e:
        raise ConfigError(f"{e}, so its numerics are unknown; pass device=GenericNumerics(...) or a function "
                          f"returning its QuantScheme") from None


def resolve_scheme(layer: LayerInfo, bits: LayerBits, device: Numerics) -> tuple[QuantScheme, int]:
    """The numerics of ``bits`` for ``layer`` and the bytes mpq's cost model predicts for it."""
    if callable(device) and not isinstance(device, (str, GenericNumerics)):
        scheme = device(layer, bits)
        return scheme, packed_weight_bytes(layer, scheme)
    if device is None or isinstance(device, GenericNumerics):
        return scheme_for(layer, bits, device), layer_size_bytes(layer, bits, device)
    try:
        return scheme_for(layer, bits, device), layer_size_bytes(layer, bits, device)
    except ConfigError:
        kernel = _registered_kernel(layer, bits, device)  # e.g. a CUDA run exported on a machine without a GPU
        return kernel.scheme(bits), kernel.weight_bytes(layer, bits)


def _config_quantizer(config: BitConfig) -> Any:
    """The quantizer settings a config records (the typed field where the config has one, else its metadata)."""
    typed = getattr(config, "quantizer", None)
    if typed is not None:
        return typed.to_dict() if hasattr(typed, "to_dict") else typed
    return config.meta.get("quantizer")


def build_plan(model: nn.Module, config: BitConfig, device: Numerics = "cpu",
               quantizer: str | Mapping[str, Any] | Quantizer | None = None, calib_data: Any = None,
               inventory: LayerInventory | None = None) -> ExportPlan:
    """Quantize every layer of ``config`` as mpq does (the config's recorded quantizer unless ``quantizer`` is
    given; GPTQ needs ``calib_data``). Raises :class:`~mpq.errors.ConfigError` for a layer the model lacks."""
    from mpq.api import prepared_quantizer  # the face's helper: one place decides how a recorded quantizer is rebuilt

    inv = inventory or discover_layers(model)
    names = set(inv.names)
    for name in config.layers:
        if name not in names:
            raise ConfigError(f"bit config names layer {name!r}, which is not a quantizable layer of the model; "
                              f"quantizable: {sorted(names)}")
    quant = prepared_quantizer(quantizer if quantizer is not None else _config_quantizer(config), model, calib_data,
                               inv)
    layers: dict[str, LayerExport] = {}
    for layer in inv:
        bits = config[layer.name]
        if bits == FLOAT:
            layers[layer.name] = LayerExport(layer.name, layer, bits, None, None, layer.float_bytes())
            continue
        scheme, predicted = resolve_scheme(layer, bits, device)
        weight = weight_matrix(model.get_submodule(layer.name))
        qweight = quant.quantize(layer.name, weight, scheme.weight)
        layers[layer.name] = LayerExport(layer.name, layer, bits, scheme, qweight, predicted)
    dev = device if isinstance(device, str) else "generic" if not callable(device) else "custom"
    return ExportPlan(model, config, inv, layers, dev, quant)


class _PlannedWeights(Quantizer):
    """Hands :class:`~mpq.fakequant.FakeQuantLayer` the plan's integers (the ones the export wrote)."""

    name = "planned"

    def __init__(self, plan: ExportPlan):
        super().__init__()
        self.plan = plan

    def quantize_new(self, layer: str, weight: Tensor, spec) -> QuantizedWeight:
        return self.plan.layers[layer].qweight


def fake_quant_model(plan: ExportPlan, float_activations: bool = False) -> nn.Module:
    """mpq's fake-quant reference of the plan: a copy of the model whose quantized layers hold the plan's
    dequantized weights and quantize their inputs as the option's kernel does (``float_activations``: inputs
    left as they are, for comparing weights alone against a loader that runs in float32)."""
    from mpq.fakequant import FakeQuantLayer
    from mpq.numerics import ActQuantSpec, QuantScheme as Scheme

    out = copy.deepcopy(plan.model)
    planned = _PlannedWeights(plan)
    for lx in plan.quantized():
        scheme = Scheme(lx.scheme.weight, ActQuantSpec()) if float_activations else lx.scheme
        set_submodule(out, lx.name, FakeQuantLayer(out.get_submodule(lx.name), scheme, lx.name, planned))
    return out.eval()


def float_weight(plan: ExportPlan, name: str) -> Tensor:
    """The float weight of a layer, output channels first, ``[N, K]`` float32."""
    return weight_matrix(plan.model.get_submodule(name)).detach().float().reshape(plan.layers[name].layer.n, -1)


@torch.no_grad()
def relative_rms(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (0 when both are zero)."""
    num = (a.double() - b.double()).norm()
    den = b.double().norm()
    return float(num / den) if float(den) > 0 else float(num)

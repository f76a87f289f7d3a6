"""Kernel registry: which quantized kernels exist on which device, and what each can run.

A kernel is one small class with three methods (Optuna-style plug-in): :meth:`Kernel.options` lists the
:class:`~mpq.config.LayerBits` it can run for a layer, :meth:`Kernel.scheme` gives the exact numerics of one option
(so fake-quant matches the kernel), and :meth:`Kernel.convert` swaps a float module for the quantized one, given the
integers a :mod:`mpq.quantizers` quantizer chose in that format.
Kernels register themselves with :func:`register_kernel`; the packages that define them are found through the
``mpq.kernels`` entry-point group (mpq's own ``kernels/`` and any third-party package, see :mod:`mpq.plugins`) and
imported on first use, so ``import mpq`` loads no kernel code.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import ClassVar

from torch import nn

from mpq.config import FLOAT, LayerBits
from mpq.errors import ConfigError
from mpq.layers import LayerInfo
from mpq.numerics import QuantizedWeight, QuantScheme

log = logging.getLogger(__name__)

_REGISTRY: dict[str, dict[str, Kernel]] = {}
KERNEL_PLUGINS = "mpq.kernels"  # the entry-point group of kernel packages


class Kernel(ABC):
    """A quantized kernel family on one device."""

    name: ClassVar[str]
    device: ClassVar[str]  # "cpu" or "cuda"
    version: ClassVar[str] = "1"  # bump when numerics or speed change: the profile cache keys on it

    def available(self) -> bool:
        """Whether this machine and PyTorch build can run the kernel."""
        return True

    @abstractmethod
    def options(self, layer: LayerInfo) -> list[LayerBits]:
        """The bits this kernel runs for ``layer`` (empty if none)."""

    @abstractmethod
    def scheme(self, bits: LayerBits) -> QuantScheme:
        """Exact numerics of ``bits`` on this kernel."""

    @abstractmethod
    def convert(self, module: nn.Module, layer: LayerInfo, bits: LayerBits, qweight: QuantizedWeight) -> nn.Module:
        """A module that runs ``module`` on this kernel with ``bits``, storing ``qweight`` (the weight already
        quantized in :meth:`scheme`'s format by the search's quantizer, output channels first) as it is."""

    def quantize_module(self, module: nn.Module, layer: LayerInfo, bits: LayerBits, quantizer=None) -> nn.Module:
        """:meth:`convert` with the weight quantized by ``quantizer`` (a :class:`mpq.quantizers.Quantizer`; min-max
        when None) in this kernel's format."""
        from mpq.layers import weight_matrix
        from mpq.quantizers import get_quantizer

        qweight = get_quantizer(quantizer).quantize(layer.name, weight_matrix(module), self.scheme(bits).weight)
        return self.convert(module, layer, bits, qweight)

    def rejected(self, layer: LayerInfo) -> dict[LayerBits, str]:
        """Options this kernel has but rules out for ``layer``'s shape, each with the reason (e.g. ``K=96 not a
        multiple of 64``): what an unreachable budget's error names. None by default."""
        return {}

    # Size of what convert() stores, for the cost model. Kernels that pad override it.
    def weight_bytes(self, layer: LayerInfo, bits: LayerBits) -> int:
        from mpq.costs import packed_weight_bytes

        return packed_weight_bytes(layer, self.scheme(bits))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.device}>"


def register_kernel(cls: type[Kernel]) -> type[Kernel]:
    """Class decorator: instantiate and register a kernel under its device."""
    inst = cls()
    _REGISTRY.setdefault(cls.device, {})[cls.name] = inst
    return cls


def normalize_device(device: str) -> str:
    dev = str(device).split(":")[0].lower()
    if dev not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} not supported: use 'cpu' or 'cuda'")
    return dev


def torch_device(device: str) -> str:
    """The torch device of a target: ``cuda:1`` stays, a labelled kind (``cuda:h100``) is its plain device."""
    dev, _, rest = str(device).partition(":")
    return str(device) if not rest or rest.isdigit() else normalize_device(dev)


def _load_plugins() -> None:
    from mpq.plugins import load_plugins

    load_plugins(KERNEL_PLUGINS)


def kernels_for(device: str, available_only: bool = True) -> list[Kernel]:
    """The registered kernels of ``device`` that this machine can run (with ``available_only=False``, all of them:
    their numerics and sizes are plain data, e.g. to export a CUDA run on a machine without a GPU)."""
    _load_plugins()
    dev = normalize_device(device)
    return [k for k in _REGISTRY.get(dev, {}).values() if not available_only or k.available()]


def registered_kernel(layer: LayerInfo, bits: LayerBits, device: str) -> Kernel:
    """The kernel registered for ``bits`` of ``layer`` on ``device``, whether or not this machine can run it."""
    for kernel in kernels_for(device, available_only=False):
        if bits in kernel.options(layer):
            return kernel
    raise ConfigError(f"layer {layer.name!r}: no {normalize_device(device)} kernel defines option {bits.name!r}")


def layer_options(layer: LayerInfo, device: str) -> dict[LayerBits, Kernel]:
    """Every option that some kernel of ``device`` runs for ``layer`` (first registered kernel wins)."""
    out: dict[LayerBits, Kernel] = {}
    for kernel in kernels_for(device):
        for bits in kernel.options(layer):
            out.setdefault(bits, kernel)
    return out


def option_order(bits: LayerBits) -> tuple:
    """Most bits first (float, then 8-bit, ..., smaller groups last): the order options are listed in."""
    return (-(bits.w_bits or 99), -(bits.a_bits or 99), -(bits.group_size or 10**6), bits.fmt,
            {None: 0, False: 1, True: 2}[bits.symmetric])


def allowed_text(options) -> str:
    """``float, w8a16, w8a8, ...``: what a layer may take, for error messages."""
    return ", ".join(["float"] + [b.name for b in sorted(options, key=option_order)])


def kernel_for(layer: LayerInfo, bits: LayerBits, device: str) -> Kernel:
    """The kernel that runs ``bits`` for ``layer`` on ``device``; a :class:`ConfigError` names the allowed bits."""
    opts = layer_options(layer, device)
    if bits in opts:
        return opts[bits]
    raise ConfigError(
        f"layer {layer.name!r} ({layer.kind} {'x'.join(map(str, layer.weight_shape))}): bits {bits.name!r} have no "
        f"kernel on {normalize_device(device)}; allowed: {allowed_text(opts)}")


def scheme_for(layer: LayerInfo, bits: LayerBits, device) -> QuantScheme | None:
    """Numerics of ``bits`` for ``layer``: the kernel's on ``device``; with ``device`` a
    :class:`~mpq.numerics.GenericNumerics` (or None, its defaults), those generic numerics."""
    from mpq.numerics import GenericNumerics

    if bits == FLOAT:
        return None
    if device is None or isinstance(device, GenericNumerics):
        return (device or GenericNumerics()).scheme(bits.w_bits, bits.a_bits, bits.group_size)
    return kernel_for(layer, bits, device).scheme(bits)


__all__ = ["Kernel", "register_kernel", "kernels_for", "layer_options", "kernel_for", "scheme_for",
           "normalize_device", "option_order", "allowed_text"]

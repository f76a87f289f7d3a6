"""Weight quantizers: how the integers of a layer are chosen, once its storage format (bits, group, scales) is fixed.

The kernel decides the format (:class:`~mpq.numerics.WeightQuantSpec`); a quantizer decides the rounding. Every
quantizer returns a :class:`~mpq.numerics.QuantizedWeight` in that format, so the kernels pack its integers as they
are, and fake-quant, the sensitivity estimators and :func:`mpq.apply` all see the same weights.

- ``minmax``: each group's range is its min and max; round to nearest.
- ``mse``: each group's range is shrunk by the clipping ratio (from a grid in ``[min_ratio, 1]``) that minimises
  the group's squared weight error ("Improving Post Training Neural Quantization"); ratio 1 is in the grid, so it
  never does worse than min-max.
- ``gptq``: GPTQ (Frantar et al.): columns are rounded one at a time and each rounding error is spread over the
  not-yet-rounded columns through the inverse Hessian ``H = 2 X^T X`` of the layer's calibration inputs, with
  damping, lazy blocks of columns, act-order (static groups then), MSE-clipped ranges and group-wise scales; the
  default of the search.

Hessians come from the *float* model's inputs, so each layer's result depends only on the layer and its format and
is cached per (layer, format): the search asks for the same layer at many formats, and for the same format in many
configs. The cache is least-recently-used and bounded in bytes (``MPQ_QUANTIZER_CACHE_MB``, 2048 by default): a
7B-shaped model at a dozen formats would otherwise hold over 100 GB of integer copies. Quantizers are plug-ins: subclass :class:`Quantizer` (one abstract method) and decorate with
:func:`register_quantizer`.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpq.errors import ConfigError
from mpq.layers import LayerInventory, call_model, is_hf_conv1d
from mpq.numerics import (QuantizedWeight, WeightQuantSpec, group_params, grouped, levels_to_values, quantize_grouped,
                       quantize_weight, round_to_levels)

log = logging.getLogger(__name__)

_QUANTIZERS: dict[str, type[Quantizer]] = {}


class Quantizer(ABC):
    """Chooses the integers of a weight in a given format. Stateless quantizers need only :meth:`quantize_new`;
    data-driven ones also override :meth:`prepare`, which sees the model and calibration inputs once. An instance
    belongs to one model: its cache and Hessians are keyed by layer name."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[str, WeightQuantSpec], QuantizedWeight] = OrderedDict()
        self._cache_bytes = 0

    def prepare(self, model: nn.Module, inputs: Iterable[Any], inventory: LayerInventory) -> Quantizer:
        """Look at calibration inputs once (GPTQ collects each layer's input Hessian here). Returns self."""
        return self

    @property
    def prepared(self) -> bool:
        """Whether :meth:`prepare` has seen calibration data (always, for quantizers that need none)."""
        return not self.needs_calibration

    @abstractmethod
    def quantize_new(self, layer: str, weight: Tensor, spec: WeightQuantSpec) -> QuantizedWeight:
        """Quantize ``weight`` (output channels first) of ``layer`` in the format ``spec``."""

    def quantize(self, layer: str, weight: Tensor, spec: WeightQuantSpec) -> QuantizedWeight:
        """:meth:`quantize_new`, cached per (layer, format): weights do not change during a search. The result lies on
        ``weight``'s device (GPTQ keeps its results, and so the cache, in host memory)."""
        key = (layer, spec)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key].to(weight.device)
        qw = self.quantize_new(layer, weight.detach(), spec)
        size = _nbytes(qw)
        limit = cache_limit_bytes()
        while self._cache and self._cache_bytes + size > limit:
            self._cache_bytes -= _nbytes(self._cache.popitem(last=False)[1])
        if size <= limit:
            self._cache[key] = qw
            self._cache_bytes += size
        return qw.to(weight.device)

    def fake(self, layer: str, weight: Tensor, spec: WeightQuantSpec) -> Tensor:
        """``Q(W)`` in float, shaped and typed like ``weight``."""
        return self.quantize(layer, weight, spec).dequantize().to(weight.dtype)

    def settings(self) -> dict[str, Any]:
        """What reproduces this quantizer (recorded in run artifacts and bit-config metadata)."""
        return {"name": self.name}

    def __getstate__(self) -> dict[str, Any]:  # shipped to Ray actors without its cache
        return {**self.__dict__, "_cache": OrderedDict(), "_cache_bytes": 0}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings()})"


def cache_limit_bytes() -> int:
    """The quantizer cache's bound, from ``MPQ_QUANTIZER_CACHE_MB`` (2048 MB by default)."""
    raw = os.environ.get("MPQ_QUANTIZER_CACHE_MB", "2048")
    try:
        mb = float(raw)
    except ValueError:
        raise ConfigError(f"MPQ_QUANTIZER_CACHE_MB={raw!r} is not a number of megabytes") from None
    if mb < 0:
        raise ConfigError(f"MPQ_QUANTIZER_CACHE_MB={raw!r} must be >= 0 (0 turns the cache off)")
    return int(mb * 2**20)


def _nbytes(qw: QuantizedWeight) -> int:
    return sum(t.numel() * t.element_size() for t in (qw.q, qw.scale, qw.zero) if t is not None)


def register_quantizer(cls: type[Quantizer]) -> type[Quantizer]:
    _QUANTIZERS[cls.name] = cls
    return cls


def available_quantizers() -> list[str]:
    return sorted(_QUANTIZERS)


def get_quantizer(spec: str | Quantizer | None = None, **options: Any) -> Quantizer:
    """A quantizer by name (``minmax``, ``mse``, ``gptq``) with its options, or the instance itself."""
    if isinstance(spec, Quantizer):
        return spec
    name = spec or "minmax"
    if name not in _QUANTIZERS:
        raise ConfigError(f"unknown quantizer {name!r}: available are {', '.join(available_quantizers())}")
    try:
        return _QUANTIZERS[name](**options)
    except TypeError as e:
        raise ConfigError(f"quantizer {name!r} does not take options {sorted(options)}: {e}") from None


@register_quantizer
class MinMaxQuantizer(Quantizer):
    name = "minmax"

    def quantize_new(self, layer: str, weight: Tensor, spec: WeightQuantSpec) -> QuantizedWeight:
        return quantize_weight(weight, spec)


@register_quantizer
class MSEQuantizer(Quantizer):
    """Per-group clipping ratio from ``grid`` ratios in ``[min_ratio, 1]``, minimising the group's squared error."""

    name = "mse"

    def __init__(self, grid: int = 20, min_ratio: float = 0.5):
        super().__init__()
        if grid < 1 or not 0 < min_ratio <= 1:
            raise ConfigError(f"mse quantizer: grid {grid} must be >= 1 and min_ratio {min_ratio} in (0, 1]")
        self.grid, self.min_ratio = grid, min_ratio

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "grid": self.grid, "min_ratio": self.min_ratio}

    def quantize_new(self, layer: str, weight: Tensor, spec: WeightQuantSpec) -> QuantizedWeight:
        return mse_quantize(weight, spec, self.grid, self.min_ratio)


def mse_quantize(weight: Tensor, spec: WeightQuantSpec, grid: int = 20, min_ratio: float = 0.5) -> QuantizedWeight:
    """Round ``weight`` to the levels of its MSE-clipped group ranges (K's zero padding left out of the error)."""
    wg, k = grouped(weight, spec)
    real = (torch.arange(wg.shape[1] * wg.shape[2]) < k).reshape(1, *wg.shape[1:])
    return quantize_grouped(wg, *mse_ranges(wg, spec, grid, min_ratio, real), spec, tuple(weight.shape), k)


def mse_ranges(wg: Tensor, spec: WeightQuantSpec, grid: int = 20, min_ratio: float = 0.5,
               real: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-group ``(lo, hi)`` of ``[N, groups, group]`` values: min-max shrunk by the ratio of ``grid`` ratios in
    ``[min_ratio, 1]`` with the least squared error over the ``real`` (not padding) entries. Ratio 1 is min-max
    itself, exactly, so the error never exceeds min-max's."""
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    mask = torch.ones_like(wg, dtype=torch.bool) if real is None else real

    def group_error(c_lo: Tensor, c_hi: Tensor) -> Tensor:
        scale, zero = group_params(c_lo, c_hi, spec)
        s, z = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        diff = levels_to_values(round_to_levels(wg, s, z, spec), s, z, spec).double() - wg.double()
        return (diff.pow(2) * mask).sum(-1)

    best_lo, best_hi, best_err = lo, hi, group_error(lo, hi)
    for ratio in torch.linspace(1.0, min_ratio, grid + 1)[1:].tolist():
        # Asymmetric ranges shrink towards their midpoint; symmetric ones towards zero.
        c_lo, c_hi = (lo * ratio, hi * ratio) if spec.symmetric else \
            ((lo + hi) / 2 - (hi - lo) / 2 * ratio, (lo + hi) / 2 + (hi - lo) / 2 * ratio)
        err = group_error(c_lo, c_hi)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


@register_quantizer
class GPTQQuantizer(Quantizer):
    """GPTQ with calibration Hessians ``2/n sum x x^T`` of each layer's inputs (im2col columns for convolutions).

    ``damp`` is the fraction of the mean Hessian diagonal added to it; ``block`` columns are updated lazily at a
    time; ``act_order`` rounds columns by decreasing Hessian diagonal (group ranges are then taken from the original
    weights, "static groups", so that groups stay contiguous as the kernels store them); ``clip`` chooses each group's
    range by MSE clipping as the ``mse`` quantizer does (GPTQ's reference code offers the same). Layers without a
    Hessian (embeddings are lookups) fall back to min-max, or to MSE clipping with ``clip``. Both are on by
    default: with them GPTQ is the search's default quantizer (it won every bundled model's search-quality rows
    against min-max and MSE clipping, ``bench/search_quality.py``, 2026-12-03).

    Memory: one float32 ``K x K`` Hessian per distinct layer input, kept for the search (layers fed the same tensor,
    like q/k/v or gate/up, share one); collection runs over ``layers_per_pass`` layers per pass over the calibration
    inputs (``max_batches`` of them), and the rounding of one layer needs its weight, its Hessian and the inverse.
    """

    name = "gptq"
    needs_calibration = True

    def __init__(self, damp: float = 0.01, block: int = 128, act_order: bool = True, clip: bool = True,
                 max_batches: int | None = None, layers_per_pass: int | None = None, device: str | None = None):
        super().__init__()
        if not 0 <= damp < 1 or block < 1:
            raise ConfigError(f"gptq quantizer: damp {damp} must be in [0, 1) and block {block} >= 1")
        self.damp, self.block, self.act_order, self.clip = damp, block, act_order, clip
        self.max_batches, self.layers_per_pass, self.device = max_batches, layers_per_pass, device
        self.hessians: dict[str, Tensor] = {}

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "damp": self.damp, "block": self.block, "act_order": self.act_order,
                "clip": self.clip, "max_batches": self.max_batches}

    # --- calibration ------------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, inputs: Iterable[Any], inventory: LayerInventory) -> GPTQQuantizer:
        batches = list(inputs)[: self.max_batches]
        names = [l.name for l in inventory if l.kind != "embedding" and l.name not in self.hessians]
        per_pass = self.layers_per_pass or len(names) or 1
        for start in range(0, len(names), per_pass):
            self.hessians.update(collect_hessians(model, batches, names[start:start + per_pass]))
        return self

    @property
    def prepared(self) -> bool:
        return bool(self.hessians)

    # --- rounding -----------------------------------------------------------------------------------------------------
    def quantize_new(self, layer: str, weight: Tensor, spec: WeightQuantSpec) -> QuantizedWeight:
        if layer not in self.hessians:  # a lookup (embedding), or a layer the calibration inputs never reached
            return mse_quantize(weight, spec) if self.clip else quantize_weight(weight, spec)
        return gptq_quantize(weight, self.hessians[layer], spec, damp=self.damp, block=self.block,
                             act_order=self.act_order, clip=self.clip, device=self.device)


def collect_hessians(model: nn.Module, batches: list[Any], names: list[str]) -> dict[str, Tensor]:
    """``2/n sum x x^T`` over every input row ``x`` (length K) that reaches each named layer, in float32. Layers that
    are always fed the very same tensor as an earlier one (q/k/v, gate/up) get that layer's Hessian object, computed
    and stored once."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    modules = {n: model.get_submodule(n) for n in names}
    # The input of the last hooked call and its first layer: held, so no new tensor can take its identity.
    last: dict[str, Any] = {"input": None, "layer": None, "module": None}
    shares: dict[str, set[str | None]] = {n: set() for n in names}  # per layer: who it shared with, every call

    def hook(name: str):
        def fn(mod: nn.Module, args):
            same = args[0] is last["input"] and _same_gemm(mod, last["module"])
            if not same:
                last.update(input=args[0], layer=name, module=mod)
            shares[name].add(last["layer"] if same else None)
            if same:  # accumulated under that layer; resolved below if it shared on every call
                return
            x = gemm_rows(mod, args[0].detach())
            h = x.t() @ x
            sums[name] = h if name not in sums else sums[name] + h
            counts[name] += x.shape[0]
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for inputs in batches:
                call_model(model, inputs)
                last.update(input=None, layer=None, module=None)
    finally:
        for h in handles:
            h.remove()
    alias = {n: next(iter(s)) for n, s in shares.items() if len(s) == 1 and None not in s}
    if any(len(s) > 1 for s in shares.values()):  # shared on some calls only: cannot alias; measure it alone
        mixed = [n for n, s in shares.items() if len(s) > 1]
        raise ConfigError(f"gptq: layers {mixed} share their input with another layer on some calls only; "
                          f"collect their Hessians separately (layers_per_pass=1)")
    for n in names:
        k = sums[n].shape[0] if n in sums else 0
        if 0 < counts[n] < 2 * k:  # measured: 4096 rows for K = 4096 made GPTQ worse than min-max on new inputs
            log.warning("gptq: layer %r saw %d input rows for K=%d columns: a Hessian from fewer than ~2K rows "
                        "over-fits the calibration set; give more calibration data", n, counts[n], k)
    out = {n: (2.0 / counts[n]) * sums[n].cpu() for n in names if counts[n] and n not in alias}
    out.update({n: out[first] for n, first in alias.items() if first in out})
    return out


def _same_gemm(a: nn.Module, b: nn.Module | None) -> bool:
    """Whether two layers turn the same input into the same GEMM rows (both linear, or convs of one geometry)."""
    if b is None or isinstance(a, (nn.Conv1d, nn.Conv2d)) != isinstance(b, (nn.Conv1d, nn.Conv2d)):
        return False
    conv = ("kernel_size", "stride", "padding", "dilation", "groups")
    return all(getattr(a, f, None) == getattr(b, f, None) for f in conv) and type(a) is type(b)


def gemm_rows(module: nn.Module, x: Tensor) -> Tensor:
    """A layer's input as the ``[rows, K]`` matrix its GEMM multiplies (im2col for convolutions), in float32."""
    if isinstance(module, nn.Conv2d) or isinstance(module, nn.Conv1d):
        x4 = x.unsqueeze(2) if isinstance(module, nn.Conv1d) else x
        lift = (lambda t: (1, *t)) if isinstance(module, nn.Conv1d) else tuple
        if isinstance(module.padding, str) or module.groups != 1:
            raise ConfigError(f"gptq: convolution with padding {module.padding!r} / groups {module.groups} has no "
                              f"im2col Hessian; use the minmax or mse quantizer")
        cols = F.unfold(x4.float(), lift(module.kernel_size), dilation=lift(module.dilation),
                        padding=lift(module.padding), stride=lift(module.stride))
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    k = module.weight.shape[0] if is_hf_conv1d(module) else module.weight.shape[1]
    return x.float().reshape(-1, k)


def gptq_quantize(weight: Tensor, hessian: Tensor, spec: WeightQuantSpec, damp: float = 0.01, block: int = 128,
                  act_order: bool = False, clip: bool = False,
                  device: str | torch.device | None = None) -> QuantizedWeight:
    """GPTQ rounding of ``weight`` (``[N, ...]``, K = the rest) against the input Hessian ``hessian`` (``K x K``).
    ``clip`` takes each group's range by MSE clipping (:func:`mse_ranges`) instead of its min and max."""
    dev = torch.device(device) if device else weight.device
    w = weight.detach().float().reshape(weight.shape[0], -1).to(dev).clone()
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ConfigError(f"gptq: Hessian is {tuple(hessian.shape)} but the weight has K={k} columns")
    g = spec.group_size or k
    kp = math.ceil(k / g) * g
    h = hessian.to(dev, torch.float32).clone()
    dead = torch.diagonal(h) == 0  # inputs that are always zero: their columns cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # Group ranges, per group of the kernel's (contiguous) layout: static (from the weights before any update)
    # under act-order, where columns of a group are not rounded together; otherwise taken when the group starts.
    scale = torch.empty(n, kp // g, device=dev)
    zero = None if spec.symmetric else torch.empty_like(scale)

    def set_group(gi: int, cols: Tensor) -> None:
        if clip:
            real = (torch.arange(g, device=dev) + gi * g < k).reshape(1, 1, g)
            lo, hi = (r.squeeze(1) for r in mse_ranges(cols.unsqueeze(1), spec, real=real))
        else:
            lo, hi = cols.amin(dim=1), cols.amax(dim=1)
        s, z = group_params(lo, hi, spec)
        scale[:, gi] = s
        if zero is not None:
            zero[:, gi] = z

    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k, device=dev)
    if act_order:
        wpad = F.pad(w, (0, kp - k))
        for gi in range(kp // g):
            set_group(gi, wpad[:, gi * g:(gi + 1) * g])
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diagonal(h)) * torch.eye(k, device=dev)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros(n, k, device=dev)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, err = w[:, b0:b1].clone(), torch.zeros(n, b1 - b0, device=dev)
        for j in range(b1 - b0):
            col = int(perm[b0 + j])
            gi = col // g
            if not act_order and col % g == 0:  # a new group starts: its range from the updated weights
                end = min(col + g, k)
                cols = torch.cat([wb[:, j:j + end - col], w[:, b1:end]], dim=1) if end > b1 else wb[:, j:j + end - col]
                set_group(gi, F.pad(cols, (0, g - cols.shape[1])) if cols.shape[1] < g else cols)
            s = scale[:, gi]
            z = None if zero is None else zero[:, gi]
            qc = round_to_levels(wb[:, j], s, z, spec)
            q[:, b0 + j] = qc
            e = (wb[:, j] - levels_to_values(qc, s, z, spec)) / hinv[b0 + j, b0 + j]
            wb[:, j:] -= e.unsqueeze(1) * hinv[b0 + j, b0 + j:b1].unsqueeze(0)
            err[:, j] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    q_orig = torch.empty_like(q)
    q_orig[:, perm] = q
    q_pad = F.pad(q_orig, (0, kp - k))
    if kp != k:  # padding columns hold zeros, as min-max stores them
        pad_levels = round_to_levels(torch.zeros(n, kp - k, device=dev), scale[:, -1:], None if zero is None else
                                     zero[:, -1:], spec)
        q_pad[:, k:] = pad_levels
    return QuantizedWeight(q_pad.to(spec.level_dtype).cpu(), scale.cpu(), None if zero is None else zero.cpu(), spec,
                           tuple(weight.shape), k)


__all__ = ["Quantizer", "register_quantizer", "available_quantizers", "get_quantizer", "MinMaxQuantizer",
           "MSEQuantizer", "GPTQQuantizer", "collect_hessians", "gptq_quantize", "gemm_rows"]

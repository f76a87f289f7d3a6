"""Fake quantizers in pure torch: weights 2-8 bits, activations 8/16 bits or a 16-bit float format.

Weights are quantized per output channel or in groups along the input dimension (the flattened ``in_ch/groups * kh *
kw`` axis for convolutions, the same order ``F.unfold`` produces, so a conv's groups match its im2col GEMM).

- symmetric: ``q in [-(2^(b-1)-1), 2^(b-1)-1]``, ``w ~ q * s`` (the narrow range that int8 GEMM libraries use).
- asymmetric: ``q in [0, 2^b - 1]``, ``w ~ (q - m) * s + z`` with a float zero ``z``, ``m = 2^(b-1)`` (the
  convention of the int4 "tinygemm" kernels) or ``m = 0`` (``zero_at_min``: ``z`` is the value of level 0, as the
  row-wise quantized embedding kernels store it). Either way the min of each group sits exactly on level 0.

How the integers are chosen (plain min-max rounding here; MSE clipping or GPTQ error feedback) is a
:mod:`mpq.quantizers` setting; every quantizer produces a :class:`QuantizedWeight` in these storage formats.

Scales (and zeros) are rounded to the dtype the kernel stores them in *before* the integers are computed, so the
integers are the ones the kernel holds and fake-quant matches the real kernel up to accumulation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from mpq.errors import CalibrationError, ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float8_e4m3fn": torch.float8_e4m3fn}
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448: E4M3 (no infinities) as sm_89/sm_90 tensor cores use it


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype {name!r} not supported: use one of {sorted(_DTYPES)}") from None


def _round_to(t: Tensor, dtype: str) -> Tensor:
    """Round a float32 tensor to ``dtype`` and back, as storing it in that dtype would."""
    return t if dtype == "float32" else t.to(torch_dtype(dtype)).float()


# --------------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightQuantSpec:
    """How a kernel stores a weight: bits, symmetry, group size (None = per output channel), scale dtype, and the
    format of the levels: integers (``int``) or FP8 E4M3 values (``e4m3``: 8 bits, symmetric, ``w ~ q * s`` with q
    an E4M3 number in ``[-448, 448]``)."""

    bits: int
    symmetric: bool = True
    group_size: int | None = None
    scale_dtype: str = "float32"
    zero_at_min: bool = False  # asymmetric only: the stored zero is level 0's value (offset m = 0)
    fmt: str = "int"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"weight bits {self.bits} not allowed: use 2..8")
        if self.fmt not in ("int", "e4m3"):
            raise ConfigError(f"weight format {self.fmt!r} not allowed: use 'int' or 'e4m3'")
        if self.fmt == "e4m3" and (self.bits != 8 or not self.symmetric):
            raise ConfigError(f"FP8 E4M3 weights are 8-bit and symmetric, got bits={self.bits}, "
                              f"symmetric={self.symmetric}")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"group size {self.group_size} not allowed: use a positive size or None")
        torch_dtype(self.scale_dtype)

    @property
    def qmin(self) -> float:
        if self.fmt == "e4m3":
            return -FP8_MAX
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> float:
        if self.fmt == "e4m3":
            return FP8_MAX
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def level_dtype(self) -> torch.dtype:
        """dtype of :attr:`QuantizedWeight.q`: int32 levels, or FP8 values held exactly in float32."""
        return torch.float32 if self.fmt == "e4m3" else torch.int32

    @property
    def mid(self) -> int:
        """Offset ``m`` of the asymmetric levels (0 for symmetric and for ``zero_at_min``)."""
        return 0 if self.symmetric or self.zero_at_min else 2 ** (self.bits - 1)


@dataclass
class QuantizedWeight:
    """Integer weight as ``[out, k_padded]`` plus per-(row, group) scales (and zeros for asymmetric)."""

    q: Tensor  # int32, [N, Kp]
    scale: Tensor  # float32 (values representable in spec.scale_dtype), [N, n_groups]
    zero: Tensor | None  # same shape as scale, asymmetric only
    spec: WeightQuantSpec
    shape: tuple[int, ...]  # original weight shape
    k: int  # original K before padding to whole groups

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize_padded(self) -> Tensor:
        """Dequantized ``[N, Kp]`` matrix (padding columns included)."""
        s = self.scale.repeat_interleave(self.group, dim=1)
        z = None if self.zero is None else self.zero.repeat_interleave(self.group, dim=1)
        return levels_to_values(self.q.float(), s, z, self.spec)

    def error(self, weight: Tensor) -> float:
        """``||Q(W) - W||^2`` (the HAWQ perturbation), summed in float64."""
        diff = self.dequantize().double() - weight.detach().double()
        return float((diff * diff).sum())

    def dequantize(self) -> Tensor:
        return self.dequantize_padded()[:, : self.k].reshape(self.shape)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same integers and scales on ``device`` (self where they are there already)."""
        device = torch.device(device)
        if self.q.device == device:
            return self
        return replace(self, q=self.q.to(device), scale=self.scale.to(device),
                       zero=None if self.zero is None else self.zero.to(device))


def _as_matrix(weight: Tensor) -> Tensor:
    return weight.detach().float().reshape(weight.shape[0], -1)


def grouped(weight: Tensor, spec: WeightQuantSpec) -> tuple[Tensor, int]:
    """The weight as ``[N, groups, group]`` (K zero-padded to whole groups), and the original K."""
    w = _as_matrix(weight)
    n, k = w.shape
    g = spec.group_size or k
    kp = math.ceil(k / g) * g
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
    return w.reshape(n, kp // g, g), k


def group_params(lo: Tensor, hi: Tensor, spec: WeightQuantSpec) -> tuple[Tensor, Tensor | None]:
    """Scale (and zero) of groups whose values span ``[lo, hi]`` (symmetric: ``max(|lo|, |hi|)``), rounded to the
    storage dtype."""
    tiny = torch.finfo(torch.float32).tiny
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = _round_to(torch.where(amax > 0, amax / spec.qmax, torch.ones_like(amax)), spec.scale_dtype)
        return scale.clamp_min(tiny), None
    rng = hi - lo
    scale = _round_to(torch.where(rng > 0, rng / spec.qmax, torch.ones_like(rng)), spec.scale_dtype).clamp_min(tiny)
    return scale, _round_to(lo + spec.mid * scale, spec.scale_dtype)


def round_to_levels(w: Tensor, scale: Tensor, zero: Tensor | None, spec: WeightQuantSpec) -> Tensor:
    """Nearest integer level of ``w`` (scale and zero broadcast against it)."""
    if spec.fmt == "e4m3":  # nearest E4M3 value (round-to-nearest-even in the cast)
        return (w / scale).clamp(spec.qmin, spec.qmax).to(torch.float8_e4m3fn).float()
    if zero is None:
        return torch.round(w / scale).clamp(spec.qmin, spec.qmax)
    return torch.round((w - zero) / scale + spec.mid).clamp(spec.qmin, spec.qmax)


def levels_to_values(q: Tensor, scale: Tensor, zero: Tensor | None, spec: WeightQuantSpec) -> Tensor:
    w = (q - spec.mid) * scale
    return w if zero is None else w + zero


def quantize_grouped(wg: Tensor, lo: Tensor, hi: Tensor, spec: WeightQuantSpec, shape: tuple[int, ...],
                     k: int) -> QuantizedWeight:
    """Round ``[N, groups, group]`` values to the levels of per-group ranges ``[lo, hi]``."""
    scale, zero = group_params(lo, hi, spec)
    q = round_to_levels(wg, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), spec)
    n = wg.shape[0]
    return QuantizedWeight(q.reshape(n, -1).to(spec.level_dtype), scale, zero, spec, tuple(shape), k)


def quantize_weight(weight: Tensor, spec: WeightQuantSpec) -> QuantizedWeight:
    """Min-max quantization of a Linear/Conv/Embedding weight (out channels first); K zero-padded to whole groups."""
    wg, k = grouped(weight, spec)
    return quantize_grouped(wg, wg.amin(dim=-1), wg.amax(dim=-1), spec, tuple(weight.shape), k)


def fake_quantize_weight(weight: Tensor, spec: WeightQuantSpec) -> Tensor:
    """``Q(W)`` in float, same shape and dtype as ``weight``."""
    return quantize_weight(weight, spec).dequantize().to(weight.dtype)


def weight_error(weight: Tensor, spec: WeightQuantSpec) -> float:
    """``||Q(W) - W||^2`` (the HAWQ perturbation), summed in float64."""
    return quantize_weight(weight, spec).error(weight)


# --------------------------------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActQuantSpec:
    """How a kernel sees its input activations.

    ``bits=None`` passes floats through. ``dtype`` is ``"int"`` for integer quantization or a float format
    (``"bfloat16"``, ``"float16"``) that activations are rounded to. Integer activations are scaled per tensor or per
    token (row of the GEMM input: the last dim is the feature dim), from each input (``dynamic``) or from ranges
    calibrated once (static, per tensor only). ``reduce_range`` drops one bit of range, as fbgemm does on CPUs
    without VNNI to avoid int16 saturation.
    """

    bits: int | None = None
    dtype: str = "int"
    granularity: str = "tensor"
    dynamic: bool = True
    symmetric: bool = True
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if self.granularity not in ("tensor", "token"):
            raise ConfigError(f"activation granularity {self.granularity!r} not allowed: use 'tensor' or 'token'")
        if self.dtype == "int":
            if self.bits is not None and self.bits not in (8, 16):
                raise ConfigError(f"integer activation bits {self.bits} not allowed: use 8 or 16")
            if not self.dynamic and self.granularity == "token":
                raise ConfigError("static (calibrated) activation ranges are per tensor; per-token scales are dynamic")
        else:
            torch_dtype(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.bits is None

    def qrange(self) -> tuple[int, int]:
        bits = self.bits - 1 if self.reduce_range else self.bits
        if self.symmetric:
            m = 2 ** (bits - 1) - 1
            return -m, m
        return 0, 2**bits - 1


def fp8_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """FP8 E4M3 values of ``x`` scaled per row of its last dim (``amax / 448``), and the ``[..., 1]`` float32
    scales: what the FP8 kernel feeds ``torch._scaled_mm``; fake-quant calls it too."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def act_qparams(lo: Tensor, hi: Tensor, spec: ActQuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point of integer activations with range ``[lo, hi]`` (the zero point is 0 if symmetric).

    Kernels that quantize activations themselves call this too, so their integers equal fake-quant's.
    """
    qmin, qmax = spec.qrange()
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return torch.where(amax > 0, amax / qmax, torch.ones_like(amax)), torch.zeros_like(amax)
    lo = torch.clamp(lo, max=0.0)  # the range always holds 0, so zero padding and ReLU zeros stay exact
    hi = torch.clamp(hi, min=0.0)
    scale = torch.where(hi > lo, (hi - lo) / (qmax - qmin), torch.full_like(hi, 0.1))
    return scale, torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)


def quantize_activation(x: Tensor, scale: Tensor, zp: Tensor, spec: ActQuantSpec) -> Tensor:
    """Integer levels (as float) of ``x``: ``clamp(round(x / scale) + zp)``."""
    qmin, qmax = spec.qrange()
    return torch.clamp(torch.round(x / scale) + zp, qmin, qmax)


def _int_fake_quant(x: Tensor, lo: Tensor, hi: Tensor, spec: ActQuantSpec) -> Tensor:
    scale, zp = act_qparams(lo, hi, spec)
    return (quantize_activation(x, scale, zp, spec) - zp) * scale


def fake_quantize_activation(x: Tensor, spec: ActQuantSpec, lo: Tensor | None = None,
                             hi: Tensor | None = None) -> Tensor:
    """Quantize-dequantize ``x`` as the kernel would; ``lo``/``hi`` are calibrated ranges for static specs."""
    if spec.is_float:
        return x
    if spec.dtype == "float8_e4m3fn":
        q, scale = fp8_per_token(x)
        return (q.float() * scale).to(x.dtype)
    if spec.dtype != "int":
        return x.to(torch_dtype(spec.dtype)).to(x.dtype)
    xf = x.float()
    if spec.dynamic:
        if spec.granularity == "token":
            lo, hi = xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)
        else:
            lo, hi = xf.amin(), xf.amax()
    elif lo is None or hi is None:
        raise CalibrationError("static activation quantizer used before calibration: run calibrate() first")
    return _int_fake_quant(xf, lo, hi, spec).to(x.dtype)


class ActivationQuantizer(nn.Module):
    """Fake-quantizes a layer's input. Static specs learn their range from calibration batches (min/max)."""

    def __init__(self, spec: ActQuantSpec, name: str = ""):
        super().__init__()
        self.spec = spec
        self.name = name
        self.observing = False
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.lo)) and bool(torch.isfinite(self.hi))

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.lo = torch.minimum(self.lo, x.detach().float().amin())
            self.hi = torch.maximum(self.hi, x.detach().float().amax())
            return x
        if not self.spec.dynamic and not self.spec.is_float and self.spec.dtype == "int" and not self.calibrated:
            raise CalibrationError(f"activation quantizer of layer {self.name!r} is static and was never calibrated")
        return fake_quantize_activation(x, self.spec, self.lo, self.hi)

    def extra_repr(self) -> str:
        return f"{self.spec}"


@dataclass(frozen=True)
class QuantScheme:
    """The exact numerics of one kernel option: weight storage, input activations, and the GEMM's output dtype."""

    weight: WeightQuantSpec | None
    act: ActQuantSpec = ActQuantSpec()
    out_dtype: str | None = None  # the kernel writes its GEMM output in this dtype (bias added after, in float)


@dataclass(frozen=True)
class GenericNumerics:
    """Numerics where no kernel decides (device-free studies): weights symmetric or asymmetric with scales (and
    zeros) stored in ``scale_dtype``; activations dynamic symmetric per-token integers. Pass one where a device is
    expected (``scheme_for``, ``fake_quantize``) to emulate it; ``None`` there means ``GenericNumerics()``."""

    symmetric: bool = True
    scale_dtype: str = "float32"

    def scheme(self, w_bits: int | None, a_bits: int | None, group_size: int | None) -> QuantScheme:
        weight = None if w_bits is None else WeightQuantSpec(w_bits, self.symmetric, group_size, self.scale_dtype)
        act = ActQuantSpec() if a_bits is None else ActQuantSpec(a_bits, "int", "token", dynamic=True, symmetric=True)
        return QuantScheme(weight, act)


def default_scheme(w_bits: int | None, a_bits: int | None, group_size: int | None) -> QuantScheme:
    """Numerics used where no kernel decides: symmetric weights, dynamic symmetric per-token integer activations."""
    return GenericNumerics().scheme(w_bits, a_bits, group_size)

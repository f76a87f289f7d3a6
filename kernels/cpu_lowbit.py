"""mpq's own low-bit weight-only CPU kernels: 2/3/4/5/6/8-bit weights on a fused GEMM and an embedding lookup.

PyTorch's CPU build has no kernel for 2-, 3-, 5- or 6-bit weights, nor for symmetric or per-channel INT4 (its
``_weight_int4pack_mm_for_cpu`` is asymmetric, grouped, bf16); torchao's PyPI wheel ships CUDA objects only. So
mpq builds its own (``kernels/csrc/cpu_lowbit.cpp``, compiled just in time: see :mod:`mpq.kernels.cpu_build`).

Numerics (what fake-quant models, see :meth:`CpuLowBit.scheme`): integer weights, per output channel or in groups
of 32/64/128 along K, symmetric (``w ~ q * s``) or asymmetric (``w ~ (q - 2^(b-1)) * s + z``), scales and zeros in
fp16; activations rounded to bf16; fp32 sums, fp32 out, bias added in fp32. Storage, per layer of N outputs:

    packed levels  N * K_pad * b / 8 bytes   (K_pad = K for groups, which must divide K; K rounded up to 32 per
                                              channel: blocks of 32 weights, the padding weights are zero)
    scales         N * (K_pad / g) * 2 bytes  (one per channel: N * 2)
    zeros          as many again, asymmetric only
    bias           N * 4 bytes (float32), if the layer has one

Each block of 32 levels is stored as bit-planes (b = 3: a 2-bit and a 1-bit plane; 5: 4 + 1; 6: 4 + 1 + 1), so the
kernel unpacks with a few shifts and masks in registers; the layout is described in the C++ source and
:func:`pack_levels` / :func:`unpack_levels` are exact inverses.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn

from mpq.config import LayerBits
from mpq.errors import KernelUnavailableError
from mpq.kernel_registry import Kernel, register_kernel
from mpq.kernels.gemm import QuantGemm, WeightStandIn, gemm_supported, gemm_unsupported_reason, round_up
from mpq.layers import LayerInfo
from mpq.numerics import ActQuantSpec, QuantizedWeight, QuantScheme, WeightQuantSpec, torch_dtype

log = logging.getLogger(__name__)

BLOCK = 32
BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
PLANES = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 1, 1), 8: (8,)}  # bit-plane widths, low bits first
SCALE_DTYPE = "float16"  # see BENCHMARKS.md "Scale dtype": fp16's 11-bit precision beats bf16's 8 at 5-8 bits
EXTENSION = ("mpq_cpu_lowbit", "cpu_lowbit")
# From this many rows on, a GEMM unpacks the weight one tile of output channels (PREFILL_TILE_BYTES of fp32) at a
# time and runs torch's float GEMM on it; below, the fused kernel, which unpacks the weights again for every 6 rows.
# Measured on the idle 2-core AVX-512 VM (2 threads, per-channel 2/4-bit): 512x128 at 128 / 256 / 2048 rows, fused
# 0.41 / 0.73 / 6.5 ms against unpack 0.23 + float GEMM 0.07 / 0.13 / 0.86 ms; 4096x4096 at 128 / 256 rows, fused
# 59-64 / 117-124 ms against unpack 80-85 + GEMM 17 / 29 ms. The unpack (about 5 ns a weight) is what keeps large
# layers from float speed at 256 rows.
PREFILL_M = 256
PREFILL_TILE_BYTES = 1 << 20
# 4-bit asymmetric groups stay on PyTorch's tinygemm kernel (w4a16g32/64/128): same bytes, bf16 instead of fp16 scales
# (the same error at 4 bits, see "Scale dtype"); bench/cpu_kernels.py times both side by side.
TINYGEMM_W4_ASYM = True


@functools.lru_cache(maxsize=1)
def extension_error() -> str | None:
    """Why the extension cannot be used here (None when it is loaded); the one warning is logged here."""
    from mpq.kernels.cpu_build import load_cpu_extension

    try:
        load_cpu_extension(*EXTENSION)
    except KernelUnavailableError as e:
        log.warning("mpq's low-bit CPU kernels are unavailable, so 2/3/5/6-bit and symmetric options are not "
                    "offered: %s", e)
        return str(e)
    return None


def code_path() -> str:
    """The SIMD path the kernels run here (``avx512``, ``avx2`` or ``portable``; ``MPQ_CPU_ISA`` caps it), or
    ``unavailable``."""
    return "unavailable" if extension_error() else torch.ops.mpq_cpu.isa()


def set_code_path(name: str) -> str:
    """Cap the SIMD path (tests and benchmarks); returns the path now in use (a path the CPU lacks falls back)."""
    if extension_error():
        raise KernelUnavailableError(extension_error())
    return torch.ops.mpq_cpu.set_isa(name)


# --------------------------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------------------------
def k_padded(k: int, group: int | None) -> int:
    """K as stored: whole groups (which must divide K), or per channel K rounded up to whole blocks of 32."""
    return k if group else round_up(k, BLOCK)


def storage_levels(q: Tensor, spec: WeightQuantSpec) -> Tensor:
    """Levels ``u`` in ``[0, 2^b)`` whose value is ``u - 2^(b-1)``: symmetric ``q`` shifted up, asymmetric ``q``
    (whose offset ``m`` is already ``2^(b-1)``) as it is."""
    return (q.to(torch.int32) + (1 << (spec.bits - 1))) if spec.symmetric else q.to(torch.int32)


def _encode(p: Tensor, width: int) -> Tensor:
    """One plane of ``[..., 32]`` values below ``2^width`` as ``32 * width / 8`` bytes per block."""
    if width == 8:
        return p
    if width == 4:
        return p[..., :16] | (p[..., 16:] << 4)
    if width == 2:
        return p[..., 0:8] | (p[..., 8:16] << 2) | (p[..., 16:24] << 4) | (p[..., 24:32] << 6)
    weights = 1 << torch.arange(8, dtype=torch.int32)  # 1-bit: byte i holds weights 8i..8i+7, low bit first
    return (p.reshape(*p.shape[:-1], 4, 8) * weights).sum(-1)


def _decode(b: Tensor, width: int) -> Tensor:
    if width == 8:
        return b
    if width == 4:
        return torch.cat([b & 15, b >> 4], dim=-1)
    if width == 2:
        return torch.cat([(b >> s) & 3 for s in (0, 2, 4, 6)], dim=-1)
    bits = (b.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(*b.shape[:-1], 32)


def pack_levels(u: Tensor, bits: int) -> Tensor:
    """``[N, K_pad]`` levels in ``[0, 2^bits)`` (K_pad a multiple of 32) as ``[N, K_pad * bits / 8]`` uint8."""
    n, kp = u.shape
    if kp % BLOCK or bits not in PLANES:
        raise ValueError(f"pack_levels: K_pad={kp} must be a multiple of {BLOCK} and bits={bits} one of {BITS}")
    u = u.to(torch.int32)
    if int(u.min()) < 0 or int(u.max()) >= 1 << bits:
        raise ValueError(f"pack_levels: levels must lie in [0, {1 << bits}), got [{int(u.min())}, {int(u.max())}]")
    blocks, parts, shift = u.reshape(n, kp // BLOCK, BLOCK), [], 0
    for width in PLANES[bits]:
        parts.append(_encode((blocks >> shift) & ((1 << width) - 1), width))
        shift += width
    return torch.cat(parts, dim=-1).to(torch.uint8).reshape(n, kp * bits // 8).contiguous()


def unpack_levels(packed: Tensor, bits: int, k_pad: int) -> Tensor:
    """Exact inverse of :func:`pack_levels`: ``[N, K_pad]`` int32 levels."""
    n = packed.shape[0]
    blocks = packed.reshape(n, k_pad // BLOCK, 4 * bits).to(torch.int32)
    u = torch.zeros(n, k_pad // BLOCK, BLOCK, dtype=torch.int32)
    offset = shift = 0
    for width in PLANES[bits]:
        nbytes = BLOCK * width // 8
        u |= _decode(blocks[..., offset:offset + nbytes], width) << shift
        offset, shift = offset + nbytes, shift + width
    return u.reshape(n, k_pad)


def packed_tensors(qweight: QuantizedWeight, k: int, group: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The packed levels, scales and zeros (fp16) of a quantized weight, K padded with zero-valued levels."""
    spec = qweight.spec
    u = storage_levels(qweight.q[:, :k], spec)
    kp = k_padded(k, group)
    if kp > k:
        u = torch.nn.functional.pad(u, (0, kp - k), value=1 << (spec.bits - 1))
    dtype = torch_dtype(spec.scale_dtype)
    scale = qweight.scale.to(dtype).contiguous()
    zero = None if qweight.zero is None else qweight.zero.to(dtype).contiguous()
    return pack_levels(u, spec.bits), scale, zero


# --------------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------------
class LowBitGemm(QuantGemm):
    """A Linear/Conv run by ``mpq_cpu::wgemm``: packed levels, fp16 scales (and zeros), fp32 bias fused."""

    def __init__(self, layer: LayerInfo, qweight: QuantizedWeight, bias: Tensor | None):
        super().__init__(layer, bias)
        spec = qweight.spec
        if spec.group_size and layer.k % spec.group_size:
            raise ValueError(f"layer {layer.name!r}: K={layer.k} is not a multiple of the group {spec.group_size}; "
                             f"the low-bit CPU kernel runs whole groups only")
        self.bits, self.group = spec.bits, spec.group_size or 0
        self.k_pad = k_padded(layer.k, spec.group_size)
        if layer.kind != "linear":
            self.input_dtype = torch.bfloat16  # im2col's larger matrix built in the kernel's input dtype
        packed, scale, zero = packed_tensors(qweight, layer.k, spec.group_size)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def gemm(self, x: Tensor) -> Tensor:
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        if x.shape[0] >= PREFILL_M:
            return self._prefill(x)
        return torch.ops.mpq_cpu.wgemm(x, self.packed, self.scale, self.zero, self.bias, self.bits, self.group,
                                       self.n, self.k_pad)

    def _prefill(self, x: Tensor) -> Tensor:
        """Prefill-sized inputs: the weight unpacked one tile of output channels at a time (mpq_cpu::wembed, about
        1 MiB of fp32, never the whole matrix) and torch's float GEMM on bf16-rounded inputs, the fused path's
        numerics. The fused kernel unpacks the weights again for every 6 rows, which costs more at this many rows."""
        x = x.to(torch.bfloat16).float()
        out = torch.empty(x.shape[0], self.n)
        tile = max(32, PREFILL_TILE_BYTES // (4 * self.k))
        for n0 in range(0, self.n, tile):
            n1 = min(self.n, n0 + tile)
            w = torch.ops.mpq_cpu.wembed(torch.arange(n0, n1), self.packed, self.scale, self.zero, self.bits,
                                         self.group, self.n, self.k, self.k_pad)
            out[:, n0:n1] = x @ w.t() if self.bias is None else torch.addmm(self.bias[n0:n1], x, w.t())
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group={self.group or 'channel'}, " \
               f"{'sym' if self.zero is None else 'asym'}"


class LowBitEmbedding(WeightStandIn, nn.Module):
    """An ``nn.Embedding`` whose rows are packed levels with a per-row fp16 scale (and zero): ``mpq_cpu::wembed``."""

    def __init__(self, layer: LayerInfo, qweight: QuantizedWeight, module: nn.Embedding):
        super().__init__()
        if module.max_norm is not None:
            raise ValueError(f"layer {layer.name!r}: embeddings with max_norm renormalise their rows on lookup, "
                             f"which a quantized table cannot do")
        self.layer_name = layer.name
        self.bits = qweight.spec.bits
        self.num_embeddings, self.embedding_dim = layer.n, layer.k
        self.padding_idx = module.padding_idx
        self.k_pad = k_padded(layer.k, None)
        packed, scale, zero = packed_tensors(qweight, layer.k, None)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def forward(self, ids: Tensor) -> Tensor:
        out = torch.ops.mpq_cpu.wembed(ids, self.packed, self.scale, self.zero, self.bits, 0, self.num_embeddings,
                                       self.embedding_dim, self.k_pad)
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, " \
               f"{'sym' if self.zero is None else 'asym'}"


# --------------------------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------------------------
def catalogue(kind: str) -> list[LayerBits]:
    """Every option this kernel offers a kind of layer, whatever its shape.

    GEMMs: 2, 3, 4, 5, 6 bits per channel and in groups of 128 (symmetric and asymmetric), and in groups of 64 and
    32 (asymmetric); 8 bits asymmetric per channel. Left out because a PyTorch kernel already runs the same
    storage: 8-bit symmetric per channel (``w8a16``: ``_weight_int8pack_mm``) and 4-bit asymmetric groups
    (``w4a16g{32,64,128}``: tinygemm, bf16 scales). Left out by measurement (``bench/search_quality.py --sections
    frontier``: each option's bytes against its Hessian-weighted output error on every linear/conv layer of the
    zoo; an option is kept if it is on that frontier for at least a quarter of the layers): symmetric groups of 32
    and 64 (on it for 0-19 % of the layers; an asymmetric group of the same size, or a symmetric group twice as
    wide, is better per byte). Left out by judgment, to keep the option count down, although on the frontier for
    27-100 % of the layers (their error is tiny, so a few bytes less always wins a frontier): grouped 8-bit
    weights, 8.5-9 bits a weight, where 8-bit per channel is already close to float.
    Embeddings: per row, symmetric at every width and asymmetric at the widths fbgemm's row-wise tables lack
    (3, 5, 6)."""
    if kind == "embedding":
        return [LayerBits(b, None, None, symmetric=True) for b in BITS] + \
            [LayerBits(b, None, None, symmetric=False) for b in (3, 5, 6)]
    out = []
    for b in BITS:
        for g in (None, *GROUPS):
            for sym in (True, False):
                if b == 8 and (g is not None or sym):
                    continue  # grouped 8-bit: left out (see above); 8-bit symmetric per channel: w8a16 (int8pack)
                if b == 4 and g is not None and not sym and TINYGEMM_W4_ASYM:
                    continue  # the tinygemm w4a16g* options store the same bytes
                if sym and g in (32, 64):
                    continue  # rarely on the frontier (see above)
                out.append(LayerBits(b, 16, g, symmetric=sym))
    return out


@register_kernel
class CpuLowBit(Kernel):
    name = "cpu-lowbit-mpq"
    device = "cpu"

    @property
    def version(self) -> str:  # the profile cache keys on it: the SIMD path changes the speed
        return f"2-{code_path()}"  # 2: prefill-sized inputs unpack tiles and run torch's GEMM

    def available(self) -> bool:
        return extension_error() is None

    def rejected(self, layer: LayerInfo) -> dict[LayerBits, str]:
        """The catalogue's options that ``layer``'s shape rules out, each with the reason."""
        if layer.kind != "embedding" and not gemm_supported(layer):
            return {b: gemm_unsupported_reason(layer) for b in catalogue(layer.kind)}
        return {b: f"K={layer.k} not a multiple of {b.group_size}" for b in catalogue(layer.kind)
                if b.group_size and layer.k % b.group_size}

    def options(self, layer: LayerInfo) -> list[LayerBits]:
        if layer.kind != "embedding" and not gemm_supported(layer):
            return []
        out = self.rejected(layer)
        return [b for b in catalogue(layer.kind) if b not in out]

    def scheme(self, bits: LayerBits) -> QuantScheme:
        spec = WeightQuantSpec(bits.w_bits, symmetric=bool(bits.symmetric), group_size=bits.group_size,
                               scale_dtype=SCALE_DTYPE)
        if bits.a_bits is None:  # an embedding: ids in, rows out
            return QuantScheme(spec, ActQuantSpec())
        return QuantScheme(spec, ActQuantSpec(16, "bfloat16"))

    def convert(self, module: nn.Module, layer: LayerInfo, bits: LayerBits, qweight: QuantizedWeight) -> nn.Module:
        if layer.kind == "embedding":
            return LowBitEmbedding(layer, qweight, module)
        return LowBitGemm(layer, qweight, getattr(module, "bias", None))

    def weight_bytes(self, layer: LayerInfo, bits: LayerBits) -> int:
        kp = round_up(layer.k, bits.group_size or BLOCK)  # = k_padded() where offered; whole groups where rejected
        groups = kp // bits.group_size if bits.group_size else 1
        per_group = torch_dtype(SCALE_DTYPE).itemsize * (1 if bits.symmetric else 2)
        bias = layer.n * 4 if layer.has_bias and layer.kind != "embedding" else 0
        return layer.n * kp * bits.w_bits // 8 + layer.n * groups * per_group + bias

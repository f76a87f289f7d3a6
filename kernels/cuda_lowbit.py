"""2-, 3-, 4-, 5-, 6- and 8-bit weights with bf16 activations on NVIDIA GPUs (sm_80 and newer): mpq's own
weight-streaming decode kernel and, for prefill sizes, a dequantise-to-bf16 kernel feeding cuBLAS
(``kernels/csrc/wq_decode.cuh``, built just in time; no CUTLASS inside).

Weights are symmetric integers ``q`` in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with one bf16 scale per group of 32, 64
or 128 input features or per output channel, ``w ~ s * q`` (the numerics of :class:`mpq.numerics.WeightQuantSpec`
with ``symmetric=True``). They are packed once at conversion by :func:`pack_lowbit` into the kernels' tiled layout
(rows padded to 16, k to 128, bit planes of 4, 2 and 1 bits, every warp load 16 contiguous bytes per lane straight
into registers: the header describes it); :func:`unpack_lowbit` is its exact inverse and :func:`tile_scales` /
:func:`untile_scales` do the same for the scales. A module holds one copy: the decode kernel runs small token counts
(fp32 sums per group, scaled in fp32 after the tensor-core product), and beyond them the weight is dequantised to
bf16 once per call for one cuBLAS GEMM. Options are registered as explicit symmetric names (``w3a16g64sym``,
``w4a16sym`` per channel) and ``w8a16`` (per channel, as on the CPU).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from mpq.config import LayerBits
from mpq.errors import KernelUnavailableError
from mpq.kernel_registry import Kernel, register_kernel
from mpq.kernels.gemm import QuantGemm, gemm_supported
from mpq.layers import LayerInfo
from mpq.numerics import ActQuantSpec, QuantizedWeight, QuantScheme, WeightQuantSpec

BITS = (2, 3, 4, 5, 6, 8)
LOW_BITS = (2, 3, 4, 5, 6)  # offered with groups and per channel; 8 bits per channel only (w8a16)
GROUPS = (32, 64, 128, None)  # None: per output channel
TILE_N, CHUNK_K = 16, 128
K_ALIGN = 8  # activation rows are read 16 bytes at a time
# the bit planes of each width in memory order, as (plane bits, lowest bit of the value they hold)
PLANES = {2: ((2, 0),), 3: ((2, 0), (1, 2)), 4: ((4, 0),), 5: ((4, 0), (1, 4)), 6: ((4, 0), (2, 4)), 8: ((8, 0),)}


def padded_shape(n: int, k: int) -> tuple[int, int]:
    """Rows and k of the tiled layout: ``n`` to a multiple of 16, ``k`` of 128."""
    return math.ceil(n / TILE_N) * TILE_N, math.ceil(k / CHUNK_K) * CHUNK_K


def packed_bytes(bits: int, n: int, k: int) -> int:
    np_, kp = padded_shape(n, k)
    return np_ * kp * bits // 8


def scale_count(group: int | None, n: int, k: int) -> int:
    np_, kp = padded_shape(n, k)
    return np_ * (kp // group if group else 1)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"low-bit weights: bits={bits} not supported; use one of {BITS}")


def _encode(q: Tensor, bits: int) -> Tensor:
    """The stored code of each value: offset binary ``q + 2^(b-1)`` (b <= 6), sign and magnitude for 8 bits."""
    q = q.to(torch.int64)
    if bits == 8:
        if q.numel() and int(q.abs().max()) > 127:
            raise ValueError(f"8-bit weights must lie in [-127, 127], got [{int(q.min())}, {int(q.max())}]")
        return torch.where(q < 0, 128 - q, q)  # bit 7 the sign, bits 0-6 |q|
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"{bits}-bit weights must lie in [{lo}, {hi}], got [{int(q.min())}, {int(q.max())}]")
    return q - lo


def _decode(u: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return torch.where(u >= 128, 128 - u, u)
    return u - 2 ** (bits - 1)


def _to_bytes(words: Tensor) -> Tensor:
    """int64 words holding 32 bits -> their little-endian bytes, flattened over the last dim."""
    return torch.stack([(words >> (8 * b)) & 0xFF for b in range(4)], dim=-1).reshape(*words.shape[:-1], -1)


def _from_bytes(raw: Tensor) -> Tensor:
    b = raw.to(torch.int64).reshape(*raw.shape[:-1], -1, 4)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _ax(size: int, dim: int, ndim: int, like: Tensor) -> Tensor:
    """``arange(size)`` laid along ``dim`` of an ``ndim``-dimensional tensor on ``like``'s device (for shifts)."""
    shape = [1] * ndim
    shape[dim] = size
    return torch.arange(size, device=like.device).view(shape)


# Each plane, from the values' fields f[i, hi, g, c, blk, t, p, s] (row 16 i + 8 hi + g, k 128 c + 32 blk + 8 t +
# 2 p + s) to the tile-chunk bytes [i, c, plane bytes], and back: the word and bit positions of wq_decode.cuh.
def _plane_to_bytes(f: Tensor, plane: int) -> Tensor:
    t_, c_ = f.shape[0], f.shape[3]
    if plane == 4:  # word 2 blk + hi, bits 16 s + 4 p; memory [v = blk / 2][lane][2 (blk % 2) + hi]
        w = (f << (16 * _ax(2, 7, 8, f) + 4 * _ax(4, 6, 8, f))).sum((6, 7))  # [i, hi, g, c, blk, t]
        w = w.reshape(t_, 2, 8, c_, 2, 2, 4).permute(0, 3, 4, 2, 6, 5, 1)
    elif plane == 2:  # word blk, bits 16 s + 2 (4 hi + p); memory [lane][blk]
        w = (f << (16 * _ax(2, 7, 8, f) + 8 * _ax(2, 1, 8, f) + 2 * _ax(4, 6, 8, f))).sum((1, 6, 7))  # [i, g, c, blk, t]
        w = w.permute(0, 2, 1, 4, 3)
    elif plane == 1:  # word blk / 2, bit 16 s + 8 (blk % 2) + 4 hi + p; memory [lane][blk / 2]
        f = f.reshape(t_, 2, 8, c_, 2, 2, 4, 4, 2)  # [i, hi, g, c, bw, b1, t, p, s]
        sh = 16 * _ax(2, 8, 9, f) + 8 * _ax(2, 5, 9, f) + 4 * _ax(2, 1, 9, f) + _ax(4, 7, 9, f)
        w = (f << sh).sum((1, 5, 7, 8)).permute(0, 2, 1, 4, 3)  # [i, c, g, t, bw]
    else:  # 8: word 4 blk + 2 hi + p / 2, byte 2 s + p % 2; memory [v = blk][lane][2 hi + p / 2]
        f = f.reshape(t_, 2, 8, c_, 4, 4, 2, 2, 2)  # [i, hi, g, c, blk, t, pw, pb, s]
        w = (f << (8 * (2 * _ax(2, 8, 9, f) + _ax(2, 7, 9, f)))).sum((7, 8))  # [i, hi, g, c, blk, t, pw]
        w = w.permute(0, 3, 4, 2, 5, 1, 6)
    return _to_bytes(w.reshape(t_, c_, -1))


def _plane_from_bytes(raw: Tensor, plane: int, t_: int, c_: int) -> Tensor:
    w = _from_bytes(raw)  # [i, c, words]
    if plane == 4:
        w = w.reshape(t_, c_, 2, 8, 4, 2, 2).permute(0, 6, 3, 1, 2, 5, 4).reshape(t_, 2, 8, c_, 4, 4)
        f = (w[..., None, None] >> (16 * _ax(2, 7, 8, raw) + 4 * _ax(4, 6, 8, raw))) & 0xF
    elif plane == 2:
        w = w.reshape(t_, c_, 8, 4, 4).permute(0, 2, 1, 4, 3)  # [i, g, c, blk, t]
        f = (w[:, None, :, :, :, :, None, None] >> (16 * _ax(2, 7, 8, raw) + 8 * _ax(2, 1, 8, raw) + 2 * _ax(4, 6, 8, raw))) & 0x3
    elif plane == 1:
        w = w.reshape(t_, c_, 8, 4, 2).permute(0, 2, 1, 4, 3)  # [i, g, c, bw, t]
        sh = 16 * _ax(2, 8, 9, raw) + 8 * _ax(2, 5, 9, raw) + 4 * _ax(2, 1, 9, raw) + _ax(4, 7, 9, raw)
        f = (w[:, None, :, :, :, None, :, None, None] >> sh) & 0x1  # [i, hi, g, c, bw, b1, t, p, s]
    else:
        w = w.reshape(t_, c_, 4, 8, 4, 2, 2).permute(0, 5, 3, 1, 2, 4, 6)  # [i, hi, g, c, blk, t, pw]
        f = (w[..., None, None] >> (8 * (2 * _ax(2, 8, 9, raw) + _ax(2, 7, 9, raw)))) & 0xFF
    return f.reshape(t_, 2, 8, c_, 4, 4, 4, 2)


def pack_lowbit(q: Tensor, bits: int) -> Tensor:
    """Signed ``bits``-bit integers ``[N, K]`` (any integer dtype, on any device) -> the kernels' tiled layout, a
    flat uint8 tensor of :func:`packed_bytes` bytes (rows and k zero-padded)."""
    _check_bits(bits)
    n, k = q.shape
    np_, kp = padded_shape(n, k)
    zero = 0 if bits == 8 else 2 ** (bits - 1)  # the code of 0: padding holds zeros
    u = torch.full((np_, kp), zero, dtype=torch.int64, device=q.device)
    u[:n, :k] = _encode(q, bits)
    t_, c_ = np_ // TILE_N, kp // CHUNK_K
    v = u.reshape(t_, 2, 8, c_, 4, 4, 4, 2)  # [i, hi, g, c, blk, t, p, s]
    planes = [_plane_to_bytes((v >> low) & ((1 << width) - 1), width) for width, low in PLANES[bits]]
    return torch.cat(planes, dim=-1).reshape(-1).to(torch.uint8)


def unpack_lowbit(packed: Tensor, bits: int, n: int, k: int) -> Tensor:
    """The inverse of :func:`pack_lowbit`: the ``[n, k]`` int8 values."""
    _check_bits(bits)
    np_, kp = padded_shape(n, k)
    if packed.numel() != packed_bytes(bits, n, k):
        raise ValueError(f"unpack_lowbit: {packed.numel()} bytes, expected {packed_bytes(bits, n, k)} for "
                         f"{bits}-bit {n}x{k}")
    t_, c_ = np_ // TILE_N, kp // CHUNK_K
    raw = packed.reshape(t_, c_, 256 * bits).to(torch.int64)
    u, offset = torch.zeros(t_, 2, 8, c_, 4, 4, 4, 2, dtype=torch.int64, device=packed.device), 0
    for width, low in PLANES[bits]:
        size = 256 * width  # 32 lanes x 64 values x width bits
        u |= _plane_from_bytes(raw[..., offset:offset + size], width, t_, c_) << low
        offset += size
    return _decode(u.reshape(np_, kp)[:n, :k], bits).to(torch.int8)


def tile_scales(scale: Tensor, group: int | None, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``[N, groups]`` scales (``groups`` = K padded to whole groups / group, or 1 per channel) -> the kernels' tiled
    order, flat, in ``dtype``; padding rows and groups hold 1."""
    np_, kp = padded_shape(n, k)
    cols = kp // group if group else 1
    if scale.shape[0] != n or scale.shape[1] > cols:
        raise ValueError(f"tile_scales: scale {tuple(scale.shape)} does not fit {n} rows of {cols} groups")
    full = torch.ones(np_, cols, dtype=torch.float32, device=scale.device)
    full[:n, :scale.shape[1]] = scale.float()
    t_ = np_ // TILE_N
    if group:  # [i, c, g, q, hi]
        tiled = full.reshape(t_, 2, 8, kp // CHUNK_K, CHUNK_K // group).permute(0, 3, 2, 4, 1)
    else:  # [i, g, hi]
        tiled = full.reshape(t_, 2, 8).permute(0, 2, 1)
    return tiled.reshape(-1).to(dtype).contiguous()


def untile_scales(tiled: Tensor, group: int | None, n: int, k: int) -> Tensor:
    """The inverse of :func:`tile_scales`: float32 ``[n, Kp / group]`` (``[n, 1]`` per channel)."""
    np_, kp = padded_shape(n, k)
    t_ = np_ // TILE_N
    if group:
        full = tiled.float().reshape(t_, kp // CHUNK_K, 8, CHUNK_K // group, 2).permute(0, 4, 2, 1, 3)
    else:
        full = tiled.float().reshape(t_, 8, 2).permute(0, 2, 1)
    return full.reshape(np_, -1)[:n]


def dequantize_lowbit(packed: Tensor, scale: Tensor, bits: int, n: int, k: int, group: int | None) -> Tensor:
    """The float32 ``[n, k]`` weight ``s * q`` of packed values and tiled scales (a CPU reference of the kernels)."""
    q = unpack_lowbit(packed, bits, n, k).float()
    s = untile_scales(scale, group, n, k)
    return q * (s.repeat_interleave(group, dim=1)[:, :k] if group else s)


# --------------------------------------------------------------------------------------------------------------------
# The kernels
# --------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def ops():
    from mpq.kernels.cuda_build import load_extension

    load_extension("mpq_wq_decode", "wq_decode", cutlass=False)
    return torch.ops.mpq_wq_decode


DECODE_CONFIGS = (1, 2, 3, 4, 5)  # (row tiles per block, chunks in flight per warp): (1,2) (1,4) (2,2) (2,1) (4,1)
PASS_CONFIGS = (1, 4)  # those built for 32 tokens a pass (m_tiles=4)
DECODE_M = 16  # up to this many tokens: one pass of 8 or 16 token columns
PASS_M = 64  # at most this many tokens on 16-token passes over the weights (see prefill_path)


def decode_config(bits: int, m: int, n: int, k: int, group: int | None) -> tuple[int, int]:
    """(configuration, token tiles per pass; 0: by m) for ``m`` tokens of an ``[n, k]`` weight, from the H200
    sweep (``bench/gpu_kernels.py --all-configs``): two row tiles per block (each activation load feeds twice the
    rows) where there are rows enough to fill 132 SMs with the fewer blocks, four chunks in flight otherwise; at 9-16
    tokens the widths with cheap planes (2, 4 bits) keep one row tile; beyond 16 tokens, 16-token passes of four
    (to 48 tokens) or eight row tiles, which share each activation load among more rows."""
    wide = n >= 8192
    if m <= 8:
        if bits == 8:
            return (4 if wide and k >= 8192 else 1), 0
        return (4 if wide else (1 if group == 32 else 2)), 0
    if m <= DECODE_M:
        light = bits in (2, 4) and group != 32
        if not wide:
            return (1 if light else 3), 0
        if k >= 8192:
            return 4, 0
        return ((1 if bits == 4 else 2) if light else 4), 0
    return (4 if m <= 48 else 5), 2


def _pdl() -> bool:
    from mpq.kernels.cuda_build import pdl_enabled

    return pdl_enabled()


def lowbit_decode(x: Tensor, packed: Tensor, scale: Tensor, bits: int, n: int, group: int | None,
                  bias: Tensor | None = None, config: int = 0, m_tiles: int = 0, pdl: bool | None = None) -> Tensor:
    """``x @ (s * q).T (+ bias)`` on the decode kernel for bf16 ``x`` ``[m, k]`` (correct at any m: the weights
    are streamed once per pass of 8, 16 or 32 tokens); ``config`` 0 picks one (and the pass width) by
    :func:`decode_config`; ``pdl`` None: :func:`mpq.kernels.cuda_build.pdl_enabled`."""
    if not config:
        config, auto_tiles = decode_config(bits, x.shape[0], n, x.shape[1], group)
        m_tiles = m_tiles or auto_tiles
    return ops().wq_decode(x, packed, scale, bias, bits, n, group or 0, config, m_tiles,
                           _pdl() if pdl is None else pdl)


def lowbit_dequantize(packed: Tensor, scale: Tensor, bits: int, n: int, k: int, group: int | None) -> Tensor:
    """The bf16 weight ``[n, k]`` (``s * q`` rounded once) of the packed layout, on the GPU."""
    return ops().wq_dequant(packed, scale, bits, n, k, group or 0)


def prefill_path(bits: int, m: int, group: int | None) -> str:
    """The kernel a module runs for ``m`` tokens: ``"decode"`` (one pass of the decode kernel to 16 tokens,
    16-token passes beyond) or ``"dequant"`` (the weight dequantised to bf16 for one cuBLAS GEMM), whichever measured
    faster on the H200 (``bench/gpu_kernels.py``): passes win to 48 tokens at every width, to :data:`PASS_M` for 2 and
    4 bits in groups of 128 (the kernels light enough on registers to keep two blocks per SM); beyond, cuBLAS."""
    if m <= 48 or (m <= PASS_M and bits in (2, 4) and group == 128):
        return "decode"
    return "dequant"


def lowbit_matmul(x: Tensor, packed: Tensor, scale: Tensor, bits: int, n: int, group: int | None,
                  bias: Tensor | None = None) -> Tensor:
    """What a converted module runs: :func:`prefill_path`'s choice of the decode kernel or dequantise + cuBLAS."""
    m, k = x.shape
    if x.data_ptr() % 16:  # a view at an odd offset: the kernels read activations 16 bytes at a time
        x = x.clone()
    if prefill_path(bits, m, group) == "decode":
        return lowbit_decode(x, packed, scale, bits, n, group, bias)
    y = x @ lowbit_dequantize(packed, scale, bits, n, k, group).t()
    return y if bias is None else y + bias


class LowBitGemm(QuantGemm):
    """Symmetric ``bits``-bit weights in the tiled layout (``packed``) with tiled bf16 scales, run by
    :func:`lowbit_matmul`; the bias (float32) is added in the kernel's epilogue."""

    input_dtype = torch.bfloat16

    def __init__(self, layer: LayerInfo, qweight: QuantizedWeight, bits: int, group: int | None, bias: Tensor | None):
        super().__init__(layer, bias)
        if layer.k % K_ALIGN:
            raise ValueError(f"layer {layer.name!r}: K={layer.k} must be a multiple of {K_ALIGN} for the low-bit "
                             "GPU kernels")
        self.bits, self.group = bits, group
        q, device = qweight.q[:, : self.k], qweight.q.device
        if torch.cuda.is_available():  # packing is integer shuffling: a GPU does a 7B layer in milliseconds
            q = q.to("cuda")
        self.register_buffer("packed", pack_lowbit(q, bits).to(device))
        self.register_buffer("scale", tile_scales(qweight.scale, group, self.n, self.k))

    def gemm(self, x: Tensor) -> Tensor:
        return lowbit_matmul(x.contiguous(), self.packed, self.scale, self.bits, self.n, self.group, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group={self.group or 'channel'}"


def lowbit_ready() -> bool:
    """A CUDA GPU of compute capability 8.0 or newer and nvcc to build the kernels."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    from mpq.kernels.cuda_build import nvcc_path

    try:
        nvcc_path()
    except KernelUnavailableError:
        return False
    return True


def lowbit_options(layer: LayerInfo) -> list[LayerBits]:
    """Every option the kernels run for ``layer``: groups no wider than K (a wider one only pads), per channel."""
    if not gemm_supported(layer) or layer.k % K_ALIGN:
        return []
    opts = [LayerBits(b, 16, g, symmetric=True) for b in LOW_BITS for g in GROUPS
            if g is None or g <= layer.k or g == GROUPS[0]]
    return opts + [LayerBits(8, 16)]


@register_kernel
class CudaLowBitWeights(Kernel):
    name = "cuda-mpq-lowbit"
    device = "cuda"
    version = "1"

    def available(self) -> bool:
        return lowbit_ready()

    def options(self, layer: LayerInfo) -> list[LayerBits]:
        return lowbit_options(layer)

    def scheme(self, bits: LayerBits) -> QuantScheme:
        return QuantScheme(WeightQuantSpec(bits.w_bits, symmetric=True, group_size=bits.group_size,
                                           scale_dtype="bfloat16"),
                           ActQuantSpec(16, "bfloat16"), out_dtype="bfloat16")

    def convert(self, module: nn.Module, layer: LayerInfo, bits: LayerBits, qweight: QuantizedWeight) -> nn.Module:
        return LowBitGemm(layer, qweight, bits.w_bits, bits.group_size, getattr(module, "bias", None))

    def weight_bytes(self, layer: LayerInfo, bits: LayerBits) -> int:
        """Exactly the module's state: tiled weights and bf16 scales (rows to 16, k to 128), float32 bias."""
        bias = layer.n * 4 if layer.has_bias else 0
        return packed_bytes(bits.w_bits, layer.n, layer.k) + 2 * scale_count(bits.group_size, layer.n, layer.k) + bias

"""W4A16 on Hopper: CUTLASS's mixed-input GEMM (``kernels/csrc/w4a16_sm90.cu``) and, for decode-sized m, mpq's own
weight-streaming tensor-core kernel (``kernels/csrc/w4a16_decode.cu``), both built just in time.

Weights are signed 4-bit, symmetric, with one bf16 scale per group of 32, 64 or 128 input features, packed once at
conversion: ``[N, K / 2]`` bytes, two values per byte with the even feature in the low nibble (CUTLASS's
``int4b_t`` order); :func:`pack_int4` and :func:`unpack_int4` are exact inverses. Both kernels read these plain
weights, so a module holds one copy: the decode kernel up to :data:`DECODE_M` tokens, CUTLASS's 128 x 128 tiles
beyond (CUTLASS's mainloop needs a K tile of at least 64: group 32 runs on the decode kernel up to 128 tokens and
as a dequantized bf16 GEMM beyond). Activations stay bf16; the scales are applied in the mainloop, the bias after, in
float, as fake-quant does.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from mpq.config import LayerBits
from mpq.kernels.cutlass_w8a8 import hopper_ready
from mpq.kernels.gemm import QuantGemm, gemm_supported
from mpq.layers import LayerInfo
from mpq.numerics import ActQuantSpec, QuantizedWeight, QuantScheme, WeightQuantSpec
from mpq.kernel_registry import Kernel, register_kernel

GROUPS = (32, 64, 128)
CUTLASS_GROUPS = (64, 128)  # CUTLASS's mixed-input mainloop: the group must be a multiple of a K tile >= 64
N_ALIGN = 8
DECODE_N_ALIGN, DECODE_K_ALIGN = 16, 128  # the decode kernel's 16-row tiles and 128-wide k chunks


def pack_int4(q: Tensor) -> Tensor:
    """Signed values in [-8, 7], ``[N, K]`` (K even) -> ``[N, K / 2]`` uint8, the even column in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: K={q.shape[-1]} must be even")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    nib = q.to(torch.int16) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of :func:`pack_int4`: ``[N, K / 2]`` uint8 -> ``[N, K]`` int8."""
    p = packed.to(torch.int16)
    both = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    return torch.where(both > 7, both - 16, both).to(torch.int8)


@functools.lru_cache(maxsize=1)
def ops():
    from mpq.kernels.cuda_build import load_extension

    load_extension("mpq_cutlass_w4a16", "w4a16_sm90")
    return torch.ops.mpq_cutlass_w4a16


@functools.lru_cache(maxsize=1)
def decode_ops():
    """The decode kernel's extension (no CUTLASS inside: it builds in seconds and runs on sm_80 and newer)."""
    from mpq.kernels.cuda_build import load_extension

    load_extension("mpq_w4a16_decode", "w4a16_decode")
    return torch.ops.mpq_w4a16_decode


DECODE_M = 16  # up to this many tokens the decode kernel (or CUTLASS's 16-wide tiles) runs; beyond, 128 x 128 tiles
# Tile configurations (kernels/csrc/w4a16_sm90_c<N>.cu): 1 decode with K tile 64, 3 decode with K tile 128 (group 128
# only), 2 prefill; 4, 5, 6 the same three on weights reordered by :func:`reorder_int4` (4 = 3, 5 = 1, 6 = 2).
W4A16_CONFIGS = (1, 2, 3, 4, 5, 6)
SHUFFLED_CONFIGS = (4, 5, 6)
# Reordered weights made CUTLASS faster on the H100 (decode 7-20%, prefill 10-15%), but the decode kernel, faster
# still at decode sizes, reads plain weights: modules keep plain weights and run configs 1 to 3 beyond DECODE_M.
DECODE_CONFIGS = (1, 2, 3, 4)  # (rows per warp, chunks in flight): (16, 4), (32, 2), (64, 1), (16, 2)
GROUP32_DECODE_M = 128  # group 32 up to this many tokens on the decode kernel, beyond it dequantized to bf16


def w4a16_tile_config(m: int, group: int, k: int) -> int:
    """The plain-weight configuration for ``m`` tokens: the prefill tiles beyond :data:`DECODE_M`; at decode sizes
    the K tile of 128 for group 128, except for long rows (k > 8192, e.g. a 7B model's down projection), where the
    K tile of 64 was faster (more k-iterations for stream-K to share among the SMs)."""
    if m > DECODE_M:
        return 2
    return 3 if group == 128 and k <= 8192 else 1


def reorder_int4(packed: Tensor) -> Tensor:
    """:func:`pack_int4` weights ``[N, K / 2]`` (N, K multiples of 16) reordered for the shuffled configurations."""
    return ops().w4a16_reorder(packed)


def w4a16_gemm(x: Tensor, packed: Tensor, scale: Tensor, group: int, config: int = 0,
               decomposition: int = 0, splits: int = 1) -> Tensor:
    """``x @ (s * W).T`` for bf16 ``x`` ``[m, K]``, ``packed`` :func:`pack_int4` of ``W`` ``[N, K]`` and ``scale`` the
    group scales transposed, ``[K / group, N]``; ``config`` 0 picks the plain-weight decode or prefill tile by m
    (configurations in :data:`SHUFFLED_CONFIGS` need ``packed`` through :func:`reorder_int4`). The stream-K decode
    configurations take CUTLASS's ``decomposition`` (0 its heuristic, 1 data-parallel, 2 split-K into ``splits``,
    3 stream-K)."""
    config = config or w4a16_tile_config(x.shape[0], group, x.shape[1])
    return ops().w4a16_sm90(x, packed, scale, group, config, decomposition, splits)


def decode_supported(n: int, k: int) -> bool:
    """Whether the decode kernel runs an ``[n, k]`` weight."""
    return n % DECODE_N_ALIGN == 0 and k % DECODE_K_ALIGN == 0


def decode_config(m: int, n: int) -> int:
    """The decode kernel's configuration for ``m`` tokens and ``n`` output features, from the H100 sweep
    (``bench/gpu_kernels.py --all-configs``): 16 rows per warp with 2 chunks in flight, except 9 to 16 tokens on
    wide layers (n >= 8192), where 64 rows per warp share each activation load."""
    return 3 if m > 8 and n >= 8192 else 4


def w4a16_decode(x: Tensor, packed: Tensor, scale: Tensor, group: int, config: int = 0) -> Tensor:
    """:func:`w4a16_gemm`'s product on the decode kernel (plain :func:`pack_int4` weights, any group of 32, 64,
    128; ``n`` a multiple of 16, ``k`` of 128). Fastest at m <= :data:`DECODE_M`; correct at any m (every 16 tokens
    stream the weights again). ``config`` 0 picks one of :data:`DECODE_CONFIGS` by :func:`decode_config`."""
    return decode_ops().w4a16_decode(x, packed, scale, group, config or decode_config(x.shape[0], packed.shape[0]))


def dequantize_int4(packed: Tensor, scale: Tensor, group: int) -> Tensor:
    """The bf16 weight ``[N, K]`` of :func:`pack_int4` values and ``[K / group, N]`` scales."""
    return unpack_int4(packed).to(torch.bfloat16) * scale.t().repeat_interleave(group, dim=1)


def w4a16_matmul(x: Tensor, packed: Tensor, scale: Tensor, group: int) -> Tensor:
    """What a converted module runs for plain weights: the decode kernel up to :data:`DECODE_M` tokens, CUTLASS's
    tiles beyond. Group 32, which CUTLASS cannot run, stays on the decode kernel up to :data:`GROUP32_DECODE_M`
    tokens (it streams the weights once per 16 tokens) and is dequantized for one bf16 GEMM beyond."""
    m, n, k = x.shape[0], packed.shape[0], x.shape[1]
    if group not in CUTLASS_GROUPS:
        if m <= GROUP32_DECODE_M:
            return w4a16_decode(x, packed, scale, group)
        return x @ dequantize_int4(packed, scale, group).t()
    if m <= DECODE_M and decode_supported(n, k):
        return w4a16_decode(x, packed, scale, group)
    return w4a16_gemm(x, packed, scale, group)


class CutlassW4A16Gemm(QuantGemm):
    """W4A16: :func:`pack_int4` weights ``[N, K / 2]`` and bf16 group scales, run by :func:`w4a16_matmul`."""

    input_dtype = torch.bfloat16

    def __init__(self, layer: LayerInfo, qweight: QuantizedWeight, group: int, bias: Tensor | None):
        super().__init__(layer, bias)
        self.group = group
        self.register_buffer("packed", pack_int4(qweight.q[:, : self.k]).contiguous())
        # [K / group, N]: both kernels read the group scales MN-major
        self.register_buffer("scale", qweight.scale.to(torch.bfloat16).t().contiguous())

    def gemm(self, x: Tensor) -> Tensor:
        return self._add_bias(w4a16_matmul(x.contiguous(), self.packed, self.scale, self.group))


@register_kernel
class CudaCutlassW4A16(Kernel):
    name = "cuda-cutlass-w4a16-sm90"
    device = "cuda"
    version = "2"  # 2: the decode kernel at m <= 16, group 32

    def available(self) -> bool:
        return hopper_ready()

    def options(self, layer: LayerInfo) -> list[LayerBits]:
        if not gemm_supported(layer) or layer.n % N_ALIGN:
            return []
        groups = GROUPS if decode_supported(layer.n, layer.k) else CUTLASS_GROUPS
        return [LayerBits(4, 16, g) for g in groups if layer.k % g == 0]

    def scheme(self, bits: LayerBits) -> QuantScheme:
        return QuantScheme(WeightQuantSpec(4, symmetric=True, group_size=bits.group_size, scale_dtype="bfloat16"),
                           ActQuantSpec(16, "bfloat16"), out_dtype="bfloat16")

    def convert(self, module: nn.Module, layer: LayerInfo, bits: LayerBits, qweight: QuantizedWeight) -> nn.Module:
        return CutlassW4A16Gemm(layer, qweight, bits.group_size, getattr(module, "bias", None))

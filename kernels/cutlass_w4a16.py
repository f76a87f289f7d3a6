"""W4A16 on Hopper with CUTLASS's mixed-input GEMM (``kernels/csrc/w4a16_sm90.cu``, built just in time).

Weights are signed 4-bit, symmetric, with one bf16 scale per group of 64 or 128 input features (CUTLASS's
mixed-input mainloop needs the group to be a multiple of its K tile, at least 64 for bf16), packed once at
conversion: ``[N, K / 2]`` bytes, two values per byte with the even feature in the low nibble (CUTLASS's
``int4b_t`` order); :func:`pack_int4` and :func:`unpack_int4` are exact inverses. Activations stay bf16; the
scales are applied in the mainloop, the bias after, in float, as fake-quant does.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from mpq.config import LayerBits
from mpq.kernels.cutlass_w8a8 import hopper_ready
from mpq.kernels.gemm import QuantGemm, gemm_supported
from mpq.layers import LayerInfo
from mpq.quant import ActQuantSpec, QuantizedWeight, QuantScheme, WeightQuantSpec
from mpq.registry import Kernel, register_kernel

GROUPS = (64, 128)
N_ALIGN = 8


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


DECODE_M = 16  # up to this many tokens the 16-wide stream-K decode tiles run; beyond, the 128 x 128 prefill tiles
# Tile configurations (kernels/csrc/w4a16_sm90_c<N>.cu): 1 decode with K tile 64, 3 decode with K tile 128 (group 128
# only), 2 prefill; 4, 5, 6 the same three on weights reordered by :func:`reorder_int4` (4 = 3, 5 = 1, 6 = 2).
W4A16_CONFIGS = (1, 2, 3, 4, 5, 6)
SHUFFLED_CONFIGS = (4, 5, 6)
# Modules keep reordered weights and run configs 4 to 6: on the H100 the reordered weights were faster at every
# suite shape (bench/results/gpu_kernels.json: decode 7-20%, prefill 10-15%).
SHUFFLED = True


def w4a16_tile_config(m: int, group: int, k: int, shuffled: bool = SHUFFLED) -> int:
    """The configuration for ``m`` tokens: the prefill tiles beyond :data:`DECODE_M`; at decode sizes the K tile of
    128 for group 128, except for long rows (k > 8192, e.g. a 7B model's down projection), where the K tile of 64
    was faster (more k-iterations for stream-K to share among the SMs)."""
    if m > DECODE_M:
        return 6 if shuffled else 2
    if group == 128 and k <= 8192:
        return 4 if shuffled else 3
    return 5 if shuffled else 1


def reorder_int4(packed: Tensor) -> Tensor:
    """:func:`pack_int4` weights ``[N, K / 2]`` (N, K multiples of 16) reordered for the shuffled configurations."""
    return ops().w4a16_reorder(packed)


def w4a16_gemm(x: Tensor, packed: Tensor, scale: Tensor, group: int, config: int = 0,
               shuffled: bool = SHUFFLED, decomposition: int = 0, splits: int = 1) -> Tensor:
    """``x @ (s * W).T`` for bf16 ``x`` ``[m, K]``, ``packed`` :func:`pack_int4` of ``W`` ``[N, K]`` and ``scale`` the
    group scales transposed, ``[K / group, N]``; ``config`` 0 picks the decode or prefill tile by m (``shuffled``:
    ``packed`` went through :func:`reorder_int4`, and a shuffled configuration runs). The stream-K decode
    configurations take CUTLASS's ``decomposition`` (0 its heuristic, 1 data-parallel, 2 split-K into ``splits``,
    3 stream-K)."""
    config = config or w4a16_tile_config(x.shape[0], group, x.shape[1], shuffled)
    return ops().w4a16_sm90(x, packed, scale, group, config, decomposition, splits)


class CutlassW4A16Gemm(QuantGemm):
    input_dtype = torch.bfloat16

    def __init__(self, layer: LayerInfo, qweight: QuantizedWeight, group: int, bias: Tensor | None):
        super().__init__(layer, bias)
        self.group = group
        self.shuffled = SHUFFLED and self.n % 16 == 0 and self.k % 16 == 0
        packed = pack_int4(qweight.q[:, : self.k]).contiguous()
        self.register_buffer("packed", reorder_int4(packed.cuda()) if self.shuffled else packed)
        # [K / group, N]: CUTLASS reads the group scales MN-major
        self.register_buffer("scale", qweight.scale.to(torch.bfloat16).t().contiguous())

    def gemm(self, x: Tensor) -> Tensor:
        return self._add_bias(w4a16_gemm(x.contiguous(), self.packed, self.scale, self.group,
                                         shuffled=self.shuffled))


@register_kernel
class CudaCutlassW4A16(Kernel):
    name = "cuda-cutlass-w4a16-sm90"
    device = "cuda"
    version = "1"

    def available(self) -> bool:
        return hopper_ready()

    def options(self, layer: LayerInfo) -> list[LayerBits]:
        if not gemm_supported(layer) or layer.n % N_ALIGN:
            return []
        return [LayerBits(4, 16, g) for g in GROUPS if layer.k % g == 0]

    def scheme(self, bits: LayerBits) -> QuantScheme:
        return QuantScheme(WeightQuantSpec(4, symmetric=True, group_size=bits.group_size, scale_dtype="bfloat16"),
                           ActQuantSpec(16, "bfloat16"), out_dtype="bfloat16")

    def convert(self, module: nn.Module, layer: LayerInfo, bits: LayerBits, qweight: QuantizedWeight) -> nn.Module:
        return CutlassW4A16Gemm(layer, qweight, bits.group_size, getattr(module, "bias", None))

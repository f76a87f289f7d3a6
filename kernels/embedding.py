"""Row-wise quantized embedding tables on CPU (fbgemm's ``embedding_bag_{byte,4bit,2bit}_rowwise_offsets``).

Each row of the table is stored as its integer levels followed by that row's scale and minimum (the value of level
0): float32 for 8 bits, float16 for 4 and 2 bits, with 4- and 2-bit levels packed low bits first into bytes, the
layout these fbgemm ops read. A lookup is a bag of one index per token (``offsets = 0, 1, 2, ...``), so the op
returns each token's dequantized row. The numerics are min-max per row, asymmetric with the zero at the minimum
(``zero_at_min``), which a :class:`~mpq.numerics.WeightQuantSpec` expresses exactly, so fake-quant and the sensitivity
estimators see the same table.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mpq.config import LayerBits
from mpq.kernels.gemm import WeightStandIn
from mpq.layers import LayerInfo
from mpq.numerics import ActQuantSpec, QuantizedWeight, QuantScheme, WeightQuantSpec
from mpq.kernel_registry import Kernel, register_kernel

_OPS = {8: "embedding_bag_byte_rowwise_offsets", 4: "embedding_bag_4bit_rowwise_offsets",
        2: "embedding_bag_2bit_rowwise_offsets"}


def embedding_spec(bits: int) -> WeightQuantSpec:
    return WeightQuantSpec(bits, symmetric=False, group_size=None,
                           scale_dtype="float32" if bits == 8 else "float16", zero_at_min=True)


def pack_rows(q: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """``[rows, dim]`` levels + per-row scale and minimum as fbgemm's fused row-wise table (uint8)."""
    rows, dim = q.shape
    per_byte = 8 // bits
    levels = q.to(torch.uint8).reshape(rows, dim // per_byte, per_byte)
    packed = torch.zeros(rows, dim // per_byte, dtype=torch.uint8)
    for i in range(per_byte):  # element i of each byte sits at bits [i*bits, (i+1)*bits)
        packed |= levels[..., i] << (i * bits)
    dtype = torch.float32 if bits == 8 else torch.float16
    tail = torch.stack([scale.reshape(-1), zero.reshape(-1)], dim=1).to(dtype).contiguous().view(torch.uint8)
    return torch.cat([packed, tail.reshape(rows, -1)], dim=1).contiguous()


def unpack_rows(packed: Tensor, dim: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact inverse of :func:`pack_rows`: levels ``[rows, dim]`` (int32), scale and minimum ``[rows, 1]`` (float)."""
    rows = packed.shape[0]
    per_byte = 8 // bits
    body, tail = packed[:, : dim // per_byte], packed[:, dim // per_byte:]
    mask = (1 << bits) - 1
    q = torch.stack([(body >> (i * bits)) & mask for i in range(per_byte)], dim=-1).reshape(rows, dim)
    dtype = torch.float32 if bits == 8 else torch.float16
    sz = tail.contiguous().view(dtype).reshape(rows, 2).float()
    return q.to(torch.int32), sz[:, :1], sz[:, 1:]


class RowwiseQuantEmbedding(WeightStandIn, nn.Module):
    """An ``nn.Embedding`` whose table is 8/4/2-bit row-wise quantized; looks up with fbgemm's bag ops."""

    def __init__(self, layer: LayerInfo, qweight: QuantizedWeight, module: nn.Embedding):
        super().__init__()
        self.layer_name = layer.name
        self.bits = qweight.spec.bits
        self.num_embeddings, self.embedding_dim = layer.n, layer.k
        self.padding_idx = module.padding_idx
        if module.max_norm is not None:
            raise ValueError(f"layer {layer.name!r}: embeddings with max_norm renormalise their rows on lookup, "
                             f"which a quantized table cannot do")
        self.register_buffer("packed", pack_rows(qweight.q, qweight.scale, qweight.zero, self.bits))

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        offsets = torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device)
        out = getattr(torch.ops.quantized, _OPS[self.bits])(self.packed, flat, offsets, False, 0, False, None, None,
                                                            False)
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


@register_kernel
class CpuRowwiseEmbedding(Kernel):
    name = "cpu-embedding-rowwise"
    device = "cpu"
    version = "1"

    def available(self) -> bool:
        return all(hasattr(torch.ops.quantized, op) for op in _OPS.values())

    def options(self, layer: LayerInfo) -> list[LayerBits]:
        if layer.kind != "embedding":
            return []
        return [LayerBits(b) for b in (8, 4, 2) if layer.k % (8 // b) == 0]

    def rejected(self, layer: LayerInfo) -> dict[LayerBits, str]:
        if layer.kind != "embedding":
            return {}
        return {LayerBits(b): f"row length {layer.k} not a multiple of {8 // b} (whole bytes per row)"
                for b in (4, 2) if layer.k % (8 // b)}

    def scheme(self, bits: LayerBits) -> QuantScheme:
        return QuantScheme(embedding_spec(bits.w_bits), ActQuantSpec())

    def convert(self, module: nn.Module, layer: LayerInfo, bits: LayerBits, qweight: QuantizedWeight) -> nn.Module:
        return RowwiseQuantEmbedding(layer, qweight, module)

"""The GPU low-bit weight kernels' layout (2-8 bits, mpq.kernels.cuda_lowbit), checked on the CPU: packing round
trips, the cost table's bytes against the module's, and the kernel's reading of the layout transcribed word by word
from ``kernels/csrc/wq_decode.cuh`` against a float64 reference (the GPU runs are in test_gpu_lowbit.py)."""

import math

import pytest
import torch
from torch import nn

from mpq.config import LayerBits
from mpq.kernels.cuda_lowbit import (BITS, CudaLowBitWeights, LowBitGemm, dequantize_lowbit, lowbit_ready,
                                     pack_lowbit, packed_bytes, padded_shape, tile_scales, unpack_lowbit,
                                     untile_scales)
from mpq.kernels.gemm import state_bytes
from mpq.layers import LayerInfo

GROUPS = (32, 64, 128, None)


def _levels(bits: int) -> tuple[int, int]:
    return (-127, 127) if bits == 8 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _case(bits: int, n: int, k: int, group, m: int, device="cpu", seed=0):
    """Random levels of the full range, bf16 scales of the K padded to whole groups, bf16 activations, and the
    float64 product of exactly those values."""
    g = torch.Generator(device=device).manual_seed(seed + bits * 1000 + n + k + m)
    lo, hi = _levels(bits)
    q = torch.randint(lo, hi + 1, (n, k), generator=g, device=device)
    cols = math.ceil(k / group) if group else 1
    s = (torch.rand(n, cols, generator=g, device=device) / 20 + 1e-3).to(torch.bfloat16).float()
    x = torch.randn(m, k, generator=g, device=device).to(torch.bfloat16)
    w = q.double() * (s.double().repeat_interleave(group, dim=1)[:, :k] if group else s.double())
    return q, s, x, x.double() @ w.T


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k", [(16, 128), (37, 200), (48, 384)])
def test_packing_round_trips_exactly(bits, n, k):
    lo, hi = _levels(bits)
    q = torch.randint(lo, hi + 1, (n, k))
    packed = pack_lowbit(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(bits, n, k) == math.prod(
        padded_shape(n, k)) * bits // 8
    assert torch.equal(unpack_lowbit(packed, bits, n, k).long(), q)
    with pytest.raises(ValueError, match=rf"\[{lo}, {hi}\]"):
        pack_lowbit(torch.full((2, 8), hi + 1), bits)


@pytest.mark.parametrize("group", GROUPS)
def test_scale_tiling_round_trips(group):
    n, k = 37, 200
    cols = math.ceil(k / group) if group else 1
    s = torch.rand(n, cols).to(torch.bfloat16).float()
    tiled = tile_scales(s, group, n, k)
    assert tiled.dtype == torch.bfloat16
    assert torch.equal(untile_scales(tiled, group, n, k)[:, :cols], s)


# ---- the kernel's reading of the layout, emulated word by word (a transcription of wq_decode.cuh) ----
def _emulated_decode(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int, n: int, k: int,
                     group) -> torch.Tensor:
    np_, kp = padded_shape(n, k)
    tiles, chunks = np_ // 16, kp // 128
    raw = packed.reshape(tiles, chunks, 256 * bits).long()
    p8, p4, p2, p1 = bits == 8, bits in (4, 5, 6), bits in (2, 3, 6), bits in (3, 5)
    off2 = 1024 if p4 else 0
    off1 = off2 + (512 if p2 else 0)
    w2 = 8 if p4 else 0
    w1 = w2 + (4 if p2 else 0)

    def word(byte):  # [tiles, chunks]
        b = raw[..., byte:byte + 4]
        return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)

    def lane_words(lane):  # load_chunk
        w = [None] * (2 * bits)
        for v in range(4 if p8 else (2 if p4 else 0)):
            for j in range(4):
                w[4 * v + j] = word((v * 32 + lane) * 16 + 4 * j)
        if p2:
            for j in range(4):
                w[w2 + j] = word(off2 + lane * 16 + 4 * j)
        if p1:
            for j in range(2):
                w[w1 + j] = word(off1 + lane * 8 + 4 * j)
        return w

    def move(v, src, dst):
        return (v >> (src - dst)) if src >= dst else ((v << (dst - src)) & 0xFFFFFFFF)

    def pair(w, hi, blk, p):  # pair_bf16: the two levels of the bf16 pair
        if p8:
            wd = w[4 * blk + 2 * hi + (p >> 1)]
            mag = ((wd >> 8) if p & 1 else wd) & 0x007F007F
            sign = (wd if p & 1 else (wd << 8)) & 0x80008000
            lo = torch.where(sign & 0x8000 > 0, -(mag & 0x7F), mag & 0x7F)
            return lo, torch.where(sign & 0x80000000 > 0, -((mag >> 16) & 0x7F), (mag >> 16) & 0x7F)
        u = torch.zeros_like(w[0])
        if p4:
            u |= (w[2 * blk + hi] >> (4 * p)) & 0x000F000F
        if bits in (2, 3):
            u |= (w[w2 + blk] >> (2 * (4 * hi + p))) & 0x00030003
        if bits == 6:
            u |= move(w[w2 + blk], 2 * (4 * hi + p), 4) & 0x00300030
        if p1:
            dst = 2 if bits == 3 else 4
            u |= move(w[w1 + (blk >> 1)], 8 * (blk & 1) + 4 * hi + p, dst) & (0x00010001 << dst)
        off = 2 ** (bits - 1)
        return (u & 0xFFFF) - off, ((u >> 16) & 0xFFFF) - off

    # A tiles [tiles, chunks, blk, h, 16 rows, 16 kappa] from every lane's registers a0..a3
    a = torch.zeros(tiles, chunks, 4, 2, 16, 16, dtype=torch.float64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        w = lane_words(lane)
        for blk in range(4):
            for h in range(2):
                for reg, (hi, p, col) in enumerate([(0, 2 * h, 2 * t), (1, 2 * h, 2 * t), (0, 2 * h + 1, 2 * t + 8),
                                                    (1, 2 * h + 1, 2 * t + 8)]):
                    lo_v, hi_v = pair(w, hi, blk, p)
                    a[:, :, blk, h, g + 8 * hi, col] = lo_v.double()
                    a[:, :, blk, h, g + 8 * hi, col + 1] = hi_v.double()
    # B [chunks, blk, h, 16 kappa, m]: lane t's kappa 2t, 2t+1 <- k 8t + 4h + {0, 1}; 2t+8, 2t+9 <- + {2, 3}
    xp = torch.zeros(x.shape[0], kp, dtype=torch.float64)
    xp[:, :k] = x.double()
    b = torch.zeros(chunks, 4, 2, 16, x.shape[0], dtype=torch.float64)
    for blk in range(4):
        for h in range(2):
            for t in range(4):
                base = torch.arange(chunks) * 128 + 32 * blk + 8 * t + 4 * h
                for d, col in enumerate((2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)):
                    b[:, blk, h, col] = xp[:, base + d].T
    part = torch.einsum("icbhrk,cbhkm->icbrm", a, b)  # the fp32 sums of one 32-k block, [tiles, chunk, blk, 16, m]
    # the per-group scales as lane g reads them: pairs (row g, row g + 8)
    sf = scale.double()
    if group:
        gpc = 128 // group
        idx = ((torch.arange(tiles)[:, None, None, None] * chunks + torch.arange(chunks)[:, None, None]) * 8
               + torch.arange(8)[:, None]) * gpc + torch.arange(gpc)  # [i, c, g, q] word index
        pairs = torch.stack([sf[2 * idx], sf[2 * idx + 1]], dim=-1)  # [i, c, g, q, hi]
        rows = pairs.permute(0, 1, 3, 4, 2).reshape(tiles, chunks, gpc, 16)  # [i, c, q, row]
        per_blk = rows.repeat_interleave(4 // gpc, dim=2)  # [i, c, blk, row]
        y = (part * per_blk[..., None]).sum((1, 2))
    else:
        pairs = torch.stack([sf[0::2], sf[1::2]], dim=-1).reshape(tiles, 8, 2)
        y = part.sum((1, 2)) * pairs.permute(0, 2, 1).reshape(tiles, 16)[..., None]
    return y.reshape(np_, -1)[:n].T  # [m, n]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_emulated_kernel_reads_the_layout_as_packed(bits, group):
    if bits == 8 and group is not None:
        pytest.skip("8-bit weights are per channel")
    n, k, m = 40, 264, 3  # n overhangs a tile, k a chunk; the last group is partial
    q, s, x, ref = _case(bits, n, k, group, m)
    packed, scale = pack_lowbit(q, bits), tile_scales(s, group, n, k)
    y = _emulated_decode(x, packed, scale, bits, n, k, group)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dequantize_lowbit(packed, scale, bits, n, k, group).double(),
                               q.double() * (s.double().repeat_interleave(group, 1)[:, :k] if group else s.double()))


def _layer(n: int, k: int, bias: bool) -> LayerInfo:
    return LayerInfo(name="fc", kind="linear", weight_shape=(n, k), params=n * k + (n if bias else 0),
                     has_bias=bias, weight_bytes_per_elem=4)


@pytest.mark.parametrize("n,k,bias", [(40, 264, True), (4096, 128, False), (48, 64, True)])
def test_cost_table_bytes_are_the_modules_state_dict_bytes(n, k, bias):
    kernel = CudaLowBitWeights()
    layer = _layer(n, k, bias)
    module = nn.Linear(k, n, bias=bias)
    options = kernel.options(layer)
    names = {b.name for b in options}
    assert "w8a16" in names and "w2a16g32sym" in names and "w3a16sym" in names
    assert ("w4a16g128sym" in names) == (k >= 128)  # groups wider than K only pad
    for bits in options:
        converted = kernel.quantize_module(module, layer, bits)  # packing runs on the CPU; nothing is launched
        assert isinstance(converted, LowBitGemm)
        assert state_bytes(converted) == kernel.weight_bytes(layer, bits), bits.name


def test_not_offered_without_a_gpu():
    from mpq.kernel_registry import kernels_for

    if lowbit_ready():
        pytest.skip("this machine runs the kernels")
    assert not any(isinstance(kn, CudaLowBitWeights) for kn in kernels_for("cuda"))


def test_option_names_parse_back():
    for bits in CudaLowBitWeights().options(_layer(64, 256, False)):
        assert LayerBits.parse(bits.name) == bits

"""Low-bit weights on the GPU (2-8 bits, mpq.kernels.cuda_lowbit; marked ``gpu``): the decode and dequantise
kernels against a float64 reference of the same integers at odd m, overhanging n and k, every group and width,
every configuration; operand errors; apply against fake-quant. The layout itself is tested on the CPU in
test_lowbit_layout.py."""

import math

import pytest
import torch
from torch import nn

from mpq.kernels.cuda_lowbit import BITS, lowbit_ready, pack_lowbit, tile_scales

GROUPS = (32, 64, 128, None)
needs_kernels = pytest.mark.skipif(not lowbit_ready(), reason="needs an sm_80+ GPU and nvcc")


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


# ---- on the GPU ----
def _poisoned(shape, dtype=torch.bfloat16):
    """Leave a NaN-filled block of this size in the caching allocator, which hands it to the op's output next."""
    torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("n,k", [(48, 384), (1040, 1160), (4096, 4096)])
def test_decode_kernel_matches_float64_reference(bits, group, n, k):
    from mpq.kernels.cuda_lowbit import DECODE_CONFIGS, PASS_CONFIGS, lowbit_decode

    if bits == 8 and group is not None:
        pytest.skip("8-bit weights are per channel")
    for m in (1, 5, 16, 33, 70):
        q, s, x, ref = _case(bits, n, k, group, m, "cuda")
        packed, scale = pack_lowbit(q, bits), tile_scales(s, group, n, k)
        bias = torch.randn(n, device="cuda")
        for config in DECODE_CONFIGS:
            for m_tiles in (0, 1, 2, 4):
                if m_tiles == 4 and config not in PASS_CONFIGS or (m_tiles == 0 and m > 16 and config not in
                                                                    PASS_CONFIGS):
                    continue
                _poisoned((m, n))
                y = lowbit_decode(x, packed, scale, bits, n, group, bias if config == 2 else None, config, m_tiles,
                                  pdl=bool(config % 2))
                assert y.shape == (m, n) and y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
                expect = ref + bias.double() if config == 2 else ref
                torch.testing.assert_close(y.double(), expect, rtol=1e-2, atol=1e-2 * float(ref.abs().mean()),
                                           msg=lambda e: f"bits={bits} group={group} m={m} config={config} "
                                                         f"m_tiles={m_tiles}: {e}")


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_dequantize_kernel_is_the_rounded_product(bits, group):
    from mpq.kernels.cuda_lowbit import lowbit_dequantize

    if bits == 8 and group is not None:
        pytest.skip("8-bit weights are per channel")
    n, k = 1040, 1160
    q, s, _, _ = _case(bits, n, k, group, 1, "cuda")
    packed, scale = pack_lowbit(q, bits), tile_scales(s, group, n, k)
    _poisoned((n, k))
    w = lowbit_dequantize(packed, scale, bits, n, k, group)
    expected = (q.float() * (s.repeat_interleave(group, 1)[:, :k] if group else s)).to(torch.bfloat16)
    assert torch.equal(w, expected)


@pytest.mark.gpu
@needs_kernels
def test_fp16_scales_and_prefill_path():
    from mpq.kernels.cuda_lowbit import PASS_M, lowbit_decode, lowbit_matmul

    n, k, group = 1040, 1160, 64
    q, s, x, ref = _case(4, n, k, group, 9, "cuda")
    packed = pack_lowbit(q, 4)
    y = lowbit_decode(x, packed, tile_scales(s.half().float(), group, n, k, torch.float16), 4, n, group)
    torch.testing.assert_close(y.double(), x.double() @ (q.double() * s.half().double().repeat_interleave(
        group, 1)[:, :k]).T, rtol=1e-2, atol=1e-2 * float(ref.abs().mean()))
    q, s, x, ref = _case(3, n, k, None, PASS_M + 31, "cuda")
    y = lowbit_matmul(x, pack_lowbit(q, 3), tile_scales(s, None, n, k), 3, n, None)
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().mean()))


@pytest.mark.gpu
@needs_kernels
def test_kernel_operand_errors_name_the_values():
    from mpq.kernels.cuda_lowbit import lowbit_decode, ops

    q, s, x, _ = _case(4, 48, 384, 64, 2, "cuda")
    packed, scale = pack_lowbit(q, 4), tile_scales(s, 64, 48, 384)
    with pytest.raises(RuntimeError, match="bits must be 2, 3, 4, 5, 6 or 8, got 7"):
        lowbit_decode(x, packed, scale, 7, 48, 64)
    with pytest.raises(RuntimeError, match=r"packed must be contiguous uint8 with 9216 bytes"):
        lowbit_decode(x, packed[:-16], scale, 4, 48, 64)
    with pytest.raises(RuntimeError, match="scale must be contiguous bf16 or fp16 with 576 values"):
        lowbit_decode(x, packed, scale, 4, 48, 32)
    with pytest.raises(RuntimeError, match="configuration 1 to 5, got 9"):
        lowbit_decode(x, packed, scale, 4, 48, 64, config=9)
    with pytest.raises(RuntimeError, match="has no 32-token"):
        lowbit_decode(x, packed, scale, 4, 48, 64, config=3, m_tiles=4)
    with pytest.raises(RuntimeError, match="x must be a contiguous bf16"):
        ops().wq_decode(x.float(), packed, scale, None, 4, 48, 64, 1, 0)


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("option", ["w2a16g32sym", "w3a16g64sym", "w4a16g128sym", "w5a16sym", "w6a16g32sym",
                                    "w8a16"])
@pytest.mark.parametrize("tokens", [3, 40, 300])  # one pass, 32-token passes, dequantise + cuBLAS
def test_apply_matches_fakequant(option, tokens):
    import copy

    import mpq
    from mpq.config import BitConfig
    from mpq.fakequant import fake_quantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 264), nn.ReLU(), nn.Linear(264, 96, bias=False)).cuda()
    x = torch.randn(2, tokens, 512, device="cuda")
    config = BitConfig({"0": option, "2": option})
    real = mpq.apply(copy.deepcopy(model), config, device="cuda")
    assert type(real[0]).__name__ == "LowBitGemm"
    y_real, y_fake = real(x), fake_quantize(model, config, device="cuda")(x)
    # bf16 activations in the real model: compare in norm
    assert float((y_real - y_fake).norm() / y_fake.norm()) < 3e-2


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("bits,group", [(4, 128), (3, 64), (8, None)])
def test_chained_calls_in_a_cuda_graph_see_each_others_outputs(bits, group):
    """Each call reads the previous call's output: with programmatic dependent launch the next kernel starts early
    (streaming its weights), so this checks that it still waits for its activations."""
    from mpq.kernels.cuda_lowbit import lowbit_decode

    n = k = 4096
    q, s, x, _ = _case(bits, n, k, group, 1, "cuda")
    packed, scale = pack_lowbit(q, bits), tile_scales(s * 0.05, group, n, k)  # keep the chain's values bounded
    def chain(v, pdl):
        for _ in range(4):
            v = lowbit_decode(v, packed, scale, bits, n, group, pdl=pdl)
        return v

    expected = chain(x, False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(x, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x, True)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)

"""mpq's low-bit CPU kernels: every code path against a float64 reference of the same integers, packing, fake-quant
equivalence, bad shapes, and an unbuildable extension (no compiler) leaving its options out with one warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from mpq.config import LayerBits
from mpq.fakequant import FakeQuantLayer
from mpq.kernel_registry import kernel_for, kernels_for, layer_options
from mpq.kernels import cpu_lowbit as lowbit
from mpq.kernels.gemm import state_bytes
from mpq.layers import discover_layers
from mpq.numerics import WeightQuantSpec, quantize_weight

pytestmark = pytest.mark.skipif(lowbit.extension_error() is not None, reason="the C++ extension did not build")

PATHS = ["portable", "avx2", "avx512"]
# (m, n, k): odd m and N, a K chunk boundary (k > 1024), M past the 6-row tiles, N past the column tiles
SHAPES = [(1, 37, 160), (7, 13, 96), (13, 70, 1088), (3, 9, 64), (20, 33, 128)]


@pytest.fixture(params=PATHS)
def code_path(request):
    before = lowbit.code_path()
    used = lowbit.set_code_path(request.param)
    if used != request.param:
        lowbit.set_code_path(before)
        pytest.skip(f"this CPU has no {request.param} path (best: {used})")
    yield used
    lowbit.set_code_path(before)


def _reference(x: torch.Tensor, qw, bias: torch.Tensor) -> torch.Tensor:
    """float64 x_bf16 @ ((q - m) * s + z)^T + bias, from the very integers and scales the kernel stores."""
    return x.bfloat16().double() @ qw.dequantize().double().t() + bias.double()


@pytest.mark.parametrize("bits", lowbit.BITS)
def test_kernel_matches_float64_reference(code_path, bits):
    gen = torch.Generator().manual_seed(bits)
    for i, (m, n, k) in enumerate(SHAPES):
        for group in (None, 32, 64, 128):
            if group and k % group:
                continue
            kk = k - 3 if group is None else k  # per channel: an odd K, zero-padded to whole blocks
            for symmetric in (True, False):
                for scale_dtype in ("float16", "bfloat16"):
                    w = torch.randn(n, kk, generator=gen) * (0.05 + i)
                    qw = quantize_weight(w, WeightQuantSpec(bits, symmetric, group, scale_dtype))
                    packed, scale, zero = lowbit.packed_tensors(qw, kk, group)
                    x, bias = torch.randn(m, kk, generator=gen), torch.randn(n, generator=gen)
                    out = torch.full((m, n), float("nan"))  # poisoned: every element must be written
                    y = torch.ops.mpq_cpu.wgemm_out(x, packed, scale, zero, bias, bits, group or 0, n,
                                                    lowbit.k_padded(kk, group), out)
                    ref = _reference(x, qw, bias)
                    scale_of_sum = x.bfloat16().double().abs() @ qw.dequantize().double().abs().t() + 1
                    err = ((y.double() - ref).abs() / scale_of_sum).max().item()
                    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all()
                    assert err < 2e-6, (bits, group, symmetric, scale_dtype, (m, n, kk), err)


def test_bf16_input_equals_rounded_fp32_input(code_path):
    w = torch.randn(24, 96)
    qw = quantize_weight(w, WeightQuantSpec(3, False, 32, "float16"))
    packed, scale, zero = lowbit.packed_tensors(qw, 96, 32)
    x = torch.randn(5, 96)
    args = (packed, scale, zero, None, 3, 32, 24, 96)
    assert torch.equal(torch.ops.mpq_cpu.wgemm(x, *args), torch.ops.mpq_cpu.wgemm(x.bfloat16(), *args))


def test_paths_agree_closely():
    """The three paths differ only in summation order."""
    torch.manual_seed(3)
    w, x = torch.randn(40, 512), torch.randn(9, 512)
    qw = quantize_weight(w, WeightQuantSpec(5, True, 64, "float16"))
    packed, scale, zero = lowbit.packed_tensors(qw, 512, 64)
    before, outs = lowbit.code_path(), []
    for path in PATHS:
        lowbit.set_code_path(path)
        outs.append(torch.ops.mpq_cpu.wgemm(x, packed, scale, zero, None, 5, 64, 40, 512))
    lowbit.set_code_path(before)
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", lowbit.BITS)
def test_pack_unpack_exact_inverse(bits):
    u = torch.randint(0, 1 << bits, (11, 224), dtype=torch.int32)
    packed = lowbit.pack_levels(u, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 11 * 224 * bits // 8  # exactly N * K_pad * b / 8
    assert torch.equal(lowbit.unpack_levels(packed, bits, 224), u)
    with pytest.raises(ValueError, match="levels must lie"):
        lowbit.pack_levels(u + (1 << bits), bits)


def test_storage_levels_cover_both_schemes():
    for symmetric in (True, False):
        qw = quantize_weight(torch.randn(8, 64), WeightQuantSpec(3, symmetric, 32, "float16"))
        u = lowbit.storage_levels(qw.q, qw.spec)
        assert int(u.min()) >= (1 if symmetric else 0) and int(u.max()) <= 7
        assert torch.equal(u - 4, qw.q - qw.spec.mid)  # value = u - 2^(b-1) in both schemes


def _one_layer(module, x):
    return discover_layers(nn.Sequential(module), x)["0"]


MODULES = {
    "linear": (lambda: nn.Linear(96, 21), lambda: torch.randn(2, 5, 96)),
    "linear_odd_k": (lambda: nn.Linear(45, 16, bias=False), lambda: torch.randn(3, 45)),
    # prefill-sized: the weight unpacked once and torch's GEMM (lowbit.PREFILL_M rows and more)
    "linear_prefill": (lambda: nn.Linear(96, 21), lambda: torch.randn(lowbit.PREFILL_M + 5, 96)),
    "linear_prefill_odd_k": (lambda: nn.Linear(45, 16, bias=False), lambda: torch.randn(lowbit.PREFILL_M, 45)),
    "conv2d": (lambda: nn.Conv2d(8, 12, 2, stride=2, padding=1), lambda: torch.randn(2, 8, 9, 9)),
    "conv1d": (lambda: nn.Conv1d(32, 10, 3, padding=1), lambda: torch.randn(2, 32, 11)),
    "embedding": (lambda: nn.Embedding(50, 40), lambda: torch.randint(0, 50, (3, 7))),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_applied_module_equals_fake_quant(name):
    torch.manual_seed(4)
    make, make_x = MODULES[name]
    module, x = make(), make_x()
    layer = _one_layer(module, x)
    kernel = next(k for k in kernels_for("cpu") if k.name == lowbit.CpuLowBit.name)
    options = kernel.options(layer)
    assert options and all(b in layer_options(layer, "cpu") for b in options)
    for bits in options:
        qmod = kernel.quantize_module(module, layer, bits)
        with torch.no_grad():
            y, y_fake = qmod(x), FakeQuantLayer(module, kernel.scheme(bits))(x)
        assert y.dtype == torch.float32 and y.shape == y_fake.shape
        if name == "embedding":  # a lookup: the same float operations, so the same bits
            assert torch.equal(y, y_fake), bits.name
        else:
            torch.testing.assert_close(y, y_fake, rtol=1e-5, atol=1e-5, msg=bits.name)
        assert state_bytes(qmod) == kernel.weight_bytes(layer, bits), bits.name


def test_options_name_their_scheme_and_groups_must_divide_k():
    layer = _one_layer(nn.Linear(96, 8), torch.randn(1, 96))
    names = {b.name for b in layer_options(layer, "cpu")}
    assert {"w2a16g32asym", "w3a16g32asym", "w6a16sym", "w5a16asym", "w4a16sym", "w8a16asym"} <= names
    assert "w2a16g64asym" not in names and "w3a16g128sym" not in names  # 96 is not a multiple of 64 or 128
    assert "w8a16sym" not in names and "w4a16g32asym" not in names  # int8pack's w8a16, tinygemm's w4a16g32
    kernel = kernel_for(layer, LayerBits.parse("w2a16g32asym"), "cpu")
    assert kernel.rejected(layer)[LayerBits.parse("w2a16g64asym")] == "K=96 not a multiple of 64"


def test_bad_shapes_name_the_layer():
    module = nn.Linear(96, 8)
    layer = _one_layer(module, torch.randn(1, 96))
    qw = quantize_weight(module.weight, WeightQuantSpec(4, True, 64, "float16"))  # 96 is 1.5 groups of 64
    with pytest.raises(ValueError, match=r"layer '0': K=96 is not a multiple of the group 64"):
        lowbit.LowBitGemm(layer, qw, module.bias)
    good = lowbit.LowBitGemm(
        layer, quantize_weight(module.weight, WeightQuantSpec(4, True, 32, "float16")), module.bias)
    with pytest.raises(RuntimeError, match="expected N\\*K_pad\\*bits/8"):
        torch.ops.mpq_cpu.wgemm(torch.randn(2, 96), good.packed[:, :-1].contiguous(), good.scale, None, None, 4, 32,
                                8, 96)
    with pytest.raises(RuntimeError, match="weight bits 7 not supported"):
        torch.ops.mpq_cpu.wgemm(torch.randn(2, 96), good.packed, good.scale, None, None, 7, 32, 8, 96)


def test_threads_split_columns_and_agree():
    torch.manual_seed(5)
    w, x = torch.randn(300, 256), torch.randn(16, 256)
    qw = quantize_weight(w, WeightQuantSpec(4, False, 128, "float16"))
    packed, scale, zero = lowbit.packed_tensors(qw, 256, 128)
    before = torch.get_num_threads()
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(torch.ops.mpq_cpu.wgemm(x, packed, scale, zero, None, 4, 128, 300, 256))
    torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])  # each column is summed by one thread, in one order


def test_no_compiler_means_no_options_and_one_warning(tmp_path):
    """A machine without a working compiler: one warning, the options are not offered, nothing crashes."""
    code = ("import logging, json; logging.basicConfig(level=logging.WARNING);"
            "from mpq.kernel_registry import kernels_for, layer_options; from mpq.layers import discover_layers;"
            "import torch; from torch import nn; "
            "inv = discover_layers(nn.Sequential(nn.Linear(64, 8)), torch.randn(1, 64));"
            "kernels_for('cpu'); names = sorted(b.name for b in layer_options(inv['0'], 'cpu'));"
            "print(json.dumps({'kernels': [k.name for k in kernels_for('cpu')], 'options': names}))")
    env = {**os.environ, "MPQ_CXX": str(tmp_path / "no-such-compiler"), "MPQ_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert lowbit.CpuLowBit.name not in result["kernels"]
    assert "w8a16" in result["options"] and not any(o.endswith("sym") for o in result["options"])
    warnings = [line for line in proc.stderr.splitlines() if "low-bit CPU kernels are unavailable" in line]
    assert len(warnings) == 1 and "no-such-compiler" in warnings[0]


@pytest.mark.parametrize("bias", [True, False])
def test_prefill_tiles_of_output_channels_equal_fake_quant(monkeypatch, bias):
    """At prefill sizes the weight is unpacked a tile of channels at a time (never whole): several tiles, the last
    one short, give fake-quant's output for every option."""
    monkeypatch.setattr(lowbit, "PREFILL_TILE_BYTES", 4 * 96 * 40)  # 40 channels a tile: 40, 40, 20
    torch.manual_seed(5)
    module, x = nn.Linear(96, 100, bias=bias), torch.randn(lowbit.PREFILL_M + 2, 96)
    layer = _one_layer(module, x)
    kernel = next(k for k in kernels_for("cpu") if k.name == lowbit.CpuLowBit.name)
    for bits in kernel.options(layer):
        with torch.no_grad():
            y, y_fake = kernel.quantize_module(module, layer, bits)(x), FakeQuantLayer(module, kernel.scheme(bits))(x)
        torch.testing.assert_close(y, y_fake, rtol=1e-5, atol=1e-5, msg=bits.name)

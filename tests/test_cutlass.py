"""CUTLASS W8A8 on Hopper (marked ``gpu``): the kernel against a float reference of the same quantized operands,
the per-token quantization against fake-quant's rule, and apply/fake-quant agreement. On CPU: the kernel is never
offered, and building without a GPU is a clear error."""

import copy

import pytest
import torch
from torch import nn

import mpq
from mpq.config import BitConfig
from mpq.errors import KernelUnavailableError
from mpq.fakequant import fake_quantize
from mpq.kernels.cutlass_w8a8 import W8A8, CudaCutlassW8A8, ampere_ready, hopper_ready
from mpq.numerics import ActQuantSpec, fake_quantize_activation
from mpq.kernel_registry import kernels_for

needs_hopper = pytest.mark.skipif(not hopper_ready(), reason="needs an sm_90 GPU, nvcc and nvidia-cutlass")
# both W8A8 builds: sm_90 on Hopper; sm_80 (CUTLASS 2) on Ampere, Ada and Hopper
ARCHS = [pytest.param("sm90", marks=needs_hopper),
         pytest.param("sm80", marks=pytest.mark.skipif(not ampere_ready(hopper_too=True),
                                                       reason="needs an sm_80+ GPU, nvcc and nvidia-cutlass"))]


def test_not_offered_without_hopper_and_build_errors_are_clear():
    if hopper_ready():
        pytest.skip("this machine can build and run the kernel")
    assert not any(isinstance(k, CudaCutlassW8A8) for k in kernels_for("cuda"))
    from mpq.kernels.cuda_build import load_extension

    with pytest.raises(KernelUnavailableError, match="CUDA GPU|nvcc|nvidia-cutlass"):
        load_extension("mpq_cutlass_w8a8", "w8a8_sm90")


def test_failed_build_is_a_clear_error_and_is_not_retried(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    from mpq.kernels import cuda_build

    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda_build, "_arch", lambda: "90a")
    monkeypatch.setattr(cuda_build, "cutlass_include_dirs", lambda: [tmp_path])
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda: tmp_path / "nvcc")
    monkeypatch.setattr(cuda_build, "_FAILED", {})
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs["name"])
        raise RuntimeError("w8a8_sm90_c1.cu(12): error: identifier undefined")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    cuda_build.load_extension.cache_clear()
    try:
        for _ in range(2):
            with pytest.raises(KernelUnavailableError, match=r"mpq_cutlass_w8a8 .* failed: .*identifier undefined"):
                cuda_build.load_extension("mpq_cutlass_w8a8", "w8a8_sm90")
    finally:
        cuda_build.load_extension.cache_clear()
    assert len(calls) == 1  # the second use reports the first failure instead of building again
    assert calls[0].startswith("mpq_cutlass_w8a8_")  # named by the build key


def _reference(q, s, w, ws, bias):
    y = (q.double() @ w.double().T) * s.double()[:, None] * ws.double()[None, :]
    return y if bias is None else y + bias.double()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_w8a8_operand_errors_name_the_values(arch):
    from mpq.kernels.cutlass_w8a8 import w8a8_gemm

    q, w = torch.zeros(2, 64, dtype=torch.int8, device="cuda"), torch.zeros(32, 48, dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match=r"a is m x k, w is n x k; got \[2, 64\] and \[32, 48\]"):
        w8a8_gemm(q, torch.ones(2, device="cuda"), w, torch.ones(32, device="cuda"), arch=arch)
    with pytest.raises(RuntimeError, match="a_scale must be float32 with one value per row of a"):
        w8a8_gemm(q, torch.ones(3, device="cuda"), torch.zeros(32, 64, dtype=torch.int8, device="cuda"),
                  torch.ones(32, device="cuda"), arch=arch)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("m", [1, 7, 16, 33, 129, 300, 2048])
@pytest.mark.parametrize("k,n,bias", [(4096, 4096, False), (4096, 11008, True), (272, 48, True)])
def test_w8a8_kernel_matches_float_reference(m, k, n, bias, arch):
    from mpq.kernels.cutlass_w8a8 import W8A8_CONFIGS, w8a8_gemm

    g = torch.Generator(device="cuda").manual_seed(m * 7 + n)
    q = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g)
    s = torch.rand(m, device="cuda", generator=g) / 100 + 1e-4
    ws = torch.rand(n, device="cuda", generator=g) / 100 + 1e-4
    b = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16) if bias else None
    ref = _reference(q, s, w, ws, b)
    for config in (0, *W8A8_CONFIGS[arch]):  # every tile configuration, not only the one m picks
        y = w8a8_gemm(q, s, w, ws, b, torch.bfloat16, config, arch)
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().mean()))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("m,k", [(1, 64), (5, 4096), (16, 11008), (300, 272)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_row_quantization_is_fakequants_rule(m, k, dtype, arch):
    from mpq.kernels.cutlass_w8a8 import quantize_int8_rows

    x = (torch.randn(m, k, device="cuda") * torch.logspace(-3, 2, m, device="cuda").unsqueeze(1)).to(dtype)
    x[0, :] = 0  # an all-zero row: scale 1
    q, s = quantize_int8_rows(x, arch)
    amax = x.float().abs().amax(dim=1)
    s_ref = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(q.float() * s[:, None],
                               fake_quantize_activation(x.float(), ActQuantSpec(8, "int", "token", True, True)),
                               rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("m", [1, 9, 300])
def test_apply_matches_fakequant(m, arch):
    torch.manual_seed(m)
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128, bias=False)).cuda()
    x = torch.randn(3, m, 512, device="cuda")
    config = BitConfig({"0": W8A8, "2": W8A8})
    real = mpq.apply(copy.deepcopy(model), config, device="cuda")
    assert type(real[0]).__name__ == "CutlassW8A8Gemm"
    for layer in (real[0], real[2]):
        layer.arch = arch  # the same module on the other build (the one this GPU runs by default, or sm_80 on Hopper)
    fake = fake_quantize(model, config, device="cuda")
    # The real layer takes bf16 activations: given bf16 values, both quantize the same operands, and only the bf16
    # rounding of the output differs
    xb = x.to(torch.bfloat16).float()
    y1_real, y1_fake = real[0](xb), fake[0](xb)
    torch.testing.assert_close(y1_real, y1_fake, rtol=2**-7, atol=1e-3 * float(y1_fake.abs().mean()))
    # After it, the real model's hidden activation went through bf16, the fake one's did not: where that rounding
    # moves a value across a quantization boundary of the second layer, outputs differ by a step, so compare norms
    y_real, y_fake = real(xb), fake(xb)
    assert float((y_real - y_fake).norm() / y_fake.norm()) < 3e-2


def test_int4_packing_round_trips_exactly():
    from mpq.kernels.cutlass_w4a16 import dequantize_int4, pack_int4, unpack_int4

    q = torch.randint(-8, 8, (37, 256), dtype=torch.int32)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (37, 128)
    assert torch.equal(unpack_int4(packed).int(), q)
    assert int(pack_int4(torch.tensor([[-1, 2]]))[0, 0]) == 0x2F  # the even column in the low nibble
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0]]))
    # the bf16 weight that group 32 runs at prefill sizes: exact products of the values and their group's scale
    scale = torch.rand(37, 256 // 32).to(torch.bfloat16)
    expected = q.float() * scale.float().repeat_interleave(32, dim=1)
    assert torch.equal(dequantize_int4(packed, scale.t(), 32).float(), expected.to(torch.bfloat16).float())


def _w4a16_case(m: int, n: int, k: int, group: int):
    """Random int4 weights, bf16 group scales and activations, and the float64 product of exactly those values."""
    g = torch.Generator(device="cuda").manual_seed(m + n + group)
    q = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int32, generator=g)
    s = (torch.rand(n, k // group, device="cuda", generator=g) / 50 + 1e-3).to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    w = (q.double() * s.double().repeat_interleave(group, dim=1))
    return q, s.t().contiguous(), x, x.double() @ w.T


def _assert_w4a16_close(y, ref, m: int, n: int):
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().mean()))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("m", [1, 7, 16, 33, 300, 2048])
@pytest.mark.parametrize("n,k,group", [(4096, 4096, 128), (11008, 4096, 64), (256, 512, 64)])
def test_w4a16_kernel_matches_float_reference(m, n, k, group):
    from mpq.kernels.cutlass_w4a16 import (SHUFFLED_CONFIGS, W4A16_CONFIGS, pack_int4, reorder_int4, unpack_int4,
                                           w4a16_gemm)

    q, s, x, ref = _w4a16_case(m, n, k, group)
    packed = pack_int4(q)
    shuffled = reorder_int4(packed)
    # a permutation of the same 4-bit values
    assert not torch.equal(shuffled, packed)
    assert torch.equal(unpack_int4(shuffled).flatten().sort().values, unpack_int4(packed).flatten().sort().values)
    for config in (0, *W4A16_CONFIGS):  # decode and prefill tiles at every m, plain and reordered weights
        if config in (3, 4) and group != 128:
            continue
        weights = shuffled if config in SHUFFLED_CONFIGS else packed
        # the stream-K decode configurations under each work decomposition: heuristic, data-parallel, split-K, stream-K
        decompositions = ((0, 1), (1, 1), (2, 4), (3, 1)) if config in (1, 3, 4, 5) else ((0, 1),)
        for decomposition, splits in decompositions:
            _assert_w4a16_close(w4a16_gemm(x, weights, s, group, config, decomposition=decomposition, splits=splits),
                                ref, m, n)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16, 33, 300])
@pytest.mark.parametrize("n,k,group", [(4096, 4096, 128), (11008, 4096, 64), (4096, 11008, 128), (48, 384, 32),
                                       (1040, 1152, 32)])
def test_w4a16_decode_kernel_matches_float_reference(m, n, k, group):
    from mpq.kernels.cutlass_w4a16 import DECODE_CONFIGS, pack_int4, w4a16_decode

    q, s, x, ref = _w4a16_case(m, n, k, group)
    packed = pack_int4(q)
    for config in (0, *DECODE_CONFIGS):  # every tiling, including rows per warp that overhang n (n=48, 1040)
        _assert_w4a16_close(w4a16_decode(x, packed, s, group, config), ref, m, n)


@pytest.mark.gpu
@needs_hopper
def test_w4a16_kernels_refuse_what_they_cannot_run():
    # (built with the H100 machine's $CXX, a compiler wrapper, every op crashed the process on its first error
    # instead of raising: see cuda_build.host_compilers)
    from mpq.kernels.cutlass_w4a16 import pack_int4, w4a16_decode, w4a16_gemm

    q, s, x, _ = _w4a16_case(1, 64, 256, 32)
    packed = pack_int4(q)
    with pytest.raises(RuntimeError, match="group 64 or 128, got 32"):
        w4a16_gemm(x, packed, s, 32, config=1)
    with pytest.raises(RuntimeError, match="group 32, 64 or 128, got 16"):
        w4a16_decode(x, packed, s, 16)
    with pytest.raises(RuntimeError, match="k=192 of 128"):
        w4a16_decode(x[:, :192].contiguous(), packed[:, :96].contiguous(), s[:6].contiguous(), 32)
    with pytest.raises(RuntimeError, match=r"scale must be bf16 \[k / group, n\]"):
        w4a16_decode(x, packed, s.t().contiguous(), 32)
    with pytest.raises(RuntimeError, match="configuration 1 to 4, got 9"):
        w4a16_decode(x, packed, s, 32, 9)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("option", ["w4a16g32", "w4a16g64", "w4a16g128"])
# the decode kernel; CUTLASS's prefill tiles (group 32: the decode kernel at 40 tokens, dequantized bf16 at 300)
@pytest.mark.parametrize("tokens", [5, 40, 300])
def test_w4a16_apply_matches_fakequant(option, tokens):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128, bias=False)).cuda()
    x = torch.randn(2, tokens, 512, device="cuda")
    config = BitConfig({"0": option, "2": option})
    real = mpq.apply(copy.deepcopy(model), config, device="cuda")
    assert type(real[0]).__name__ == "CutlassW4A16Gemm"
    y_real, y_fake = real(x), fake_quantize(model, config, device="cuda")(x)
    torch.testing.assert_close(y_real, y_fake, rtol=3e-2, atol=3e-2 * float(y_fake.abs().mean()))


@pytest.mark.gpu
@needs_hopper
def test_gpu_search_space_offers_exactly_the_kernels_options():
    from mpq.layers import discover_layers

    from mpq.kernels.cuda_lowbit import lowbit_options, lowbit_ready

    model = nn.Sequential(nn.Linear(4096, 4096), nn.Linear(4096, 100), nn.Linear(100, 48)).cuda()
    inv = discover_layers(model, torch.randn(2, 4096, device="cuda"))
    space = mpq.build_search_space(inv, "cuda")
    names = {layer: {b.name for b in opts} for layer, opts in space.options.items()}
    lowbit = {b.name for b in lowbit_options(inv["0"])} if lowbit_ready() else set()
    assert "w3a16g64sym" in lowbit or not lowbit_ready()
    assert names["0"] == {"float", "w8a8", "w4a16g32", "w4a16g64", "w4a16g128", "fp8"} | lowbit
    assert "w4a16g64" not in names["1"] and "w8a8" not in names["1"]  # N=100: not a multiple of 8 (or 16 for FP8)
    assert "w8a8" not in names["2"]  # K=100 is not a multiple of 16
    # group 32 runs on the decode kernel only: n a multiple of 16 and k of 128
    model = nn.Sequential(nn.Linear(4096, 4104), nn.Linear(4104, 64)).cuda()
    space = mpq.build_search_space(discover_layers(model, torch.randn(2, 4096, device="cuda")), "cuda")
    assert {b.name for b in space.options["0"]} >= {"w4a16g64", "w4a16g128"}
    assert "w4a16g32" not in {b.name for b in space.options["0"]} | {b.name for b in space.options["1"]}


@pytest.mark.gpu
@needs_hopper
def test_every_gpu_option_costs_the_bytes_its_module_holds():
    """The cost table's size of every option the CUDA search space offers equals the state-dict bytes of the
    module apply installs for it (padding, scales and bias included)."""
    from mpq.costs import layer_size_bytes
    from mpq.kernel_registry import kernel_for
    from mpq.kernels.gemm import state_bytes
    from mpq.layers import discover_layers

    model = nn.Sequential(nn.Linear(4096, 1040), nn.Linear(1040, 264, bias=False), nn.Linear(264, 48)).cuda()
    inv = discover_layers(model, torch.randn(2, 4096, device="cuda"))
    space = mpq.build_search_space(inv, "cuda")
    for layer in inv:
        for bits in space[layer.name]:
            if bits.is_float:
                continue
            kernel = kernel_for(layer, bits, "cuda")
            module = kernel.quantize_module(model.get_submodule(layer.name), layer, bits)
            assert state_bytes(module) == layer_size_bytes(layer, bits, "cuda"), (layer.name, bits.name)

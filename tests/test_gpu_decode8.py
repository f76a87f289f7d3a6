"""The fused INT8 / FP8 decode kernel (mpq.kernels.cuda_decode8; marked ``gpu``): per-token quantisation inside the
kernel, then INT8 or E4M3 tensor cores over the plain weight bytes, against a float64 reference of fake-quant's
integers, at odd m, N overhanging a 16-row tile, every configuration and cluster size; operand errors; the W8A8
and FP8 modules, which run it up to 16 tokens, against fake-quant."""

import copy

import pytest
import torch
from torch import nn

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                               reason="needs an sm_80+ GPU")


def _available() -> bool:
    from mpq.kernels.cuda_decode8 import decode_available

    return decode_available()


def _reference(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """fake-quant's per-token rule, then the float64 product of exactly those values."""
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    qmax = 127.0 if fmt == "int8" else 448.0
    s = torch.where(amax > 0, amax * torch.tensor(1 / qmax, dtype=torch.float32), torch.ones_like(amax))
    if fmt == "int8":
        q = torch.round(xf / s).clamp(-127, 127)
    else:
        q = (xf / s).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return (q.double() @ w.double().T) * s.double() * w_scale.double().reshape(1, -1)


def _operands(m, n, k, fmt, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(m, k, device="cuda", generator=g) * torch.logspace(-2, 1, m, device="cuda")[:, None])
    x = x.to(torch.bfloat16)
    if m > 2:
        x[1] = 0  # an all-zero row: scale 1
    if fmt == "int8":
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g)
    else:
        w = (torch.randn(n, k, device="cuda", generator=g) * 30).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws = torch.rand(n, device="cuda", generator=g) / 100 + 1e-4
    return x, w, ws


def _formats():
    fp8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    return ["int8", pytest.param("e4m3", marks=pytest.mark.skipif(not fp8, reason="needs FP8 tensor cores"))]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", _formats())
@pytest.mark.parametrize("n,k", [(48, 272), (1032, 1088), (4096, 4096)])
def test_fused_decode_matches_float64_reference(fmt, n, k):
    from mpq.kernels.cuda_decode8 import CLUSTERS, CONFIGS, w8_decode

    if not _available():
        pytest.skip("the kernel could not be built here")
    clusters = CLUSTERS if torch.cuda.get_device_capability() >= (9, 0) else (1,)
    for m in (1, 3, 8, 9, 16, 21):  # the modules run it to 8 tokens; it is correct at any m
        x, w, ws = _operands(m, n, k, fmt, seed=m * 31 + n)
        bias = torch.randn(n, device="cuda")
        ref = _reference(x, w, ws, fmt)
        for config in CONFIGS:
            for cluster in clusters:
                torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")  # poison the next output
                y = w8_decode(x, w, ws, bias if cluster == 1 else None, fmt, config, cluster, pdl=config % 2 == 1)
                assert y.shape == (m, n) and bool(torch.isfinite(y).all())
                expect = ref + bias.double() if cluster == 1 else ref
                torch.testing.assert_close(y.double(), expect, rtol=1e-2, atol=1e-2 * float(ref.abs().mean()),
                                           msg=lambda e: f"{fmt} m={m} config={config} cluster={cluster}: {e}")


@pytest.mark.gpu
@needs_gpu
def test_fused_decode_operand_errors_name_the_values():
    from mpq.kernels.cuda_decode8 import ops, w8_decode

    if not _available():
        pytest.skip("the kernel could not be built here")
    x, w, ws = _operands(2, 48, 272, "int8", 0)
    with pytest.raises(RuntimeError, match=r"w must be contiguous int8 \[n, k\] with k=272"):
        w8_decode(x, w[:, :256].contiguous(), ws, None, "int8", 1, 1)
    with pytest.raises(RuntimeError, match="w_scale must be float32 with one value per row of w"):
        w8_decode(x, w, ws[:10], None, "int8", 1, 1)
    with pytest.raises(RuntimeError, match="k=264 must be a positive multiple of 16"):
        w8_decode(x[:, :264].contiguous(), w[:, :264].contiguous(), ws, None, "int8", 1, 1)
    with pytest.raises(RuntimeError, match="configuration 1 to 4, got 7"):
        w8_decode(x, w, ws, None, "int8", 7, 1)
    with pytest.raises(RuntimeError, match="cluster 1, 2, 4 or 8, got 3"):
        w8_decode(x, w, ws, None, "int8", 1, 3)
    with pytest.raises(RuntimeError, match="fmt 0 \\(int8\\) or 1 \\(e4m3\\), got 5"):
        ops().w8_decode(x, w, ws, None, 5, 1, 1)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("option", ["w8a8", "fp8"])
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_modules_run_the_fused_kernel_at_decode_and_match_fakequant(option, tokens):
    import mpq
    from mpq.config import BitConfig
    from mpq.fakequant import fake_quantize
    from mpq.kernels.cuda_fp8 import fp8_supported
    from mpq.kernels.cutlass_w8a8 import hopper_ready

    if option == "fp8" and not fp8_supported() or option == "w8a8" and not hopper_ready():
        pytest.skip(f"{option} is not offered on this GPU")
    if not _available():
        pytest.skip("the kernel could not be built here")
    torch.manual_seed(tokens)
    model = nn.Sequential(nn.Linear(512, 272), nn.ReLU(), nn.Linear(272, 96)).cuda().to(torch.bfloat16)
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    config = BitConfig({"0": option, "2": option})
    real = mpq.apply(copy.deepcopy(model), config, device="cuda")
    fake = fake_quantize(model.float(), config, device="cuda")
    y1_real, y1_fake = real[0](x), fake[0](x.float())
    torch.testing.assert_close(y1_real.float(), y1_fake, rtol=2e-2, atol=2e-2 * float(y1_fake.abs().mean()))
    y_real, y_fake = real(x).float(), fake(x.float())
    assert float((y_real - y_fake).norm() / y_fake.norm()) < 5e-2

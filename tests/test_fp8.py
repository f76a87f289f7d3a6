"""FP8 (E4M3): the format's numerics on any machine; the ``_scaled_mm`` kernel and an FP8 search on a GPU (marked
``gpu``: skipped without one, and FP8 is then never offered)."""

import copy

import pytest
import torch
from torch import nn

import mpq
from mpq.config import BitConfig, LayerBits
from mpq.errors import ConfigError
from mpq.fakequant import fake_quantize
from mpq.kernels.cuda_fp8 import FP8, CudaFP8ScaledMM, fp8_supported
from mpq.layers import discover_layers
from mpq.numerics import FP8_MAX, ActQuantSpec, WeightQuantSpec, fake_quantize_activation, quantize_weight
from mpq.kernel_registry import kernels_for


def test_fp8_bits_name_json_and_validation():
    assert FP8.name == "fp8" and LayerBits.parse("fp8") == FP8 and LayerBits.parse("w8a8") != FP8
    cfg = BitConfig({"fc": FP8, "head": "w8a8"})
    again = BitConfig.from_json(cfg.to_json())
    assert again == cfg and again["fc"].fmt == "e4m3" and "format" not in cfg.to_dict()["layers"]["head"]
    with pytest.raises(ConfigError, match="FP8"):
        LayerBits(4, 8, None, "e4m3")
    with pytest.raises(ConfigError, match="format"):
        LayerBits(8, 8, None, "e5m2")


def test_fp8_weight_and_activation_numerics():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * torch.logspace(-2, 1, 32).unsqueeze(1)  # rows of very different ranges
    qw = quantize_weight(w, WeightQuantSpec(8, True, None, "float32", fmt="e4m3"))
    assert torch.equal(qw.q, qw.q.to(torch.float8_e4m3fn).float())  # every level is an E4M3 number
    assert float(qw.q.abs().amax(dim=1).min()) == FP8_MAX  # each row's largest weight maps to 448
    rel = (qw.dequantize() - w).norm(dim=1) / w.norm(dim=1)
    assert float(rel.max()) < 0.04  # 3 mantissa bits: ~2^-4 relative rounding
    x = torch.randn(5, 7, 64) * 3
    xq = fake_quantize_activation(x, ActQuantSpec(8, "float8_e4m3fn", "token"))
    assert float(((xq - x).norm(dim=-1) / x.norm(dim=-1)).max()) < 0.04


def test_fp8_is_not_offered_without_fp8_tensor_cores():
    model = nn.Sequential(nn.Linear(64, 32))
    inv = discover_layers(model, torch.randn(2, 64))
    assert all(FP8 not in opts for opts in mpq.build_search_space(inv, "cpu").options.values())
    if not fp8_supported():
        assert not any(isinstance(k, CudaFP8ScaledMM) for k in kernels_for("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16, 33, 300])
@pytest.mark.parametrize("k,n,bias", [(64, 32, True), (4096, 11008, False), (272, 48, True)])
def test_fp8_kernel_matches_fakequant(m, k, n, bias):
    if not fp8_supported():
        pytest.skip("this GPU has no FP8 tensor cores")
    torch.manual_seed(m + k)
    model = nn.Sequential(nn.Linear(k, n, bias=bias)).cuda()
    x = torch.randn(m, k, device="cuda")
    config = BitConfig({"0": FP8})
    real = mpq.apply(copy.deepcopy(model), config, device="cuda")
    fake = fake_quantize(model, config, device="cuda")
    y_real, y_fake, y_float = real(x), fake(x), model(x)
    # the same FP8 operands; the kernel accumulates in fp32 in its own order and both round the output to bf16
    torch.testing.assert_close(y_real, y_fake, rtol=2e-2, atol=2e-2 * float(y_fake.abs().mean()))
    assert float((y_real - y_float).norm().detach() / y_float.norm().detach()) < 0.06


@pytest.mark.gpu
def test_search_on_gpu_offers_and_profiles_fp8(lm_task, tmp_path):
    if not fp8_supported():
        pytest.skip("this GPU has no FP8 tensor cores")
    model = copy.deepcopy(lm_task.model).cuda()
    calib = [(x.cuda(), y.cuda()) for x, y in lm_task.calib[:2]]
    # only FP8 besides float, so that the budget has to be met with it (the GPU offers more 8-bit options)
    result = mpq.search(model, calib, None, budget="size=0.6", device="cuda", profile="inprocess", repeats=5,
                        warmup=2, frontier_points=3, progress=False, out=tmp_path, allowed=["fp8"],
                        sensitivity="hessian", sensitivity_options={"min_probes": 2, "max_probes": 4})
    options = set(result.table["option"])
    assert "fp8" in options and result.table.loc[result.table.option == "fp8", "latency_ms"].notna().all()
    assert "fp8" in result.config.histogram()


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(1, 64), (5, 4096), (16, 11008), (300, 272)])
def test_fused_fp8_activation_kernel_equals_eager(m, k):
    from mpq.kernels.triton_fp8 import fp8_quantize_rows, triton_available
    from mpq.kernels.gemm import pad_to, round_up
    from mpq.numerics import fp8_per_token

    if not (fp8_supported() and triton_available()):
        pytest.skip("needs FP8 tensor cores and Triton")
    x = torch.randn(m, k, device="cuda") * torch.logspace(-3, 2, m, device="cuda").unsqueeze(1)
    x[0, :] = 0  # an all-zero row: scale 1
    rows = round_up(m, 16)
    q, s = fp8_quantize_rows(x, rows)
    q_ref, s_ref = fp8_per_token(pad_to(x, rows=rows))
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    same = (q.float() == q_ref.float()).float().mean()
    assert float(same) > 0.999  # a division rounded differently may move a value to the neighbouring E4M3 number
    torch.testing.assert_close(q.float() * s, q_ref.float() * s_ref, rtol=0.07, atol=0)

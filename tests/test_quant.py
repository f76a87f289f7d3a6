"""Fake quantizers: error bounds, levels, groups, calibrated activation ranges."""

from __future__ import annotations

import pytest
import torch

from mpq.errors import CalibrationError, ConfigError
from mpq.numerics import (ActivationQuantizer, ActQuantSpec, WeightQuantSpec, fake_quantize_activation,
                       fake_quantize_weight, quantize_weight, weight_error)


@pytest.fixture
def weight():
    torch.manual_seed(0)
    return torch.randn(24, 40) * torch.linspace(0.1, 3, 24)[:, None]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 16, 32])
def test_weight_error_within_half_step(weight, bits, symmetric, group):
    spec = WeightQuantSpec(bits, symmetric, group)
    qw = quantize_weight(weight, spec)
    assert qw.q.min() >= spec.qmin and qw.q.max() <= spec.qmax
    deq = qw.dequantize()
    assert deq.shape == weight.shape
    step = qw.scale.repeat_interleave(qw.group, dim=1)[:, : weight.shape[1]]
    assert torch.all((deq - weight).abs() <= step / 2 + 1e-6)
    # every group uses at most 2^bits levels
    groups = qw.q.reshape(qw.q.shape[0], -1, qw.group)
    assert max(len(torch.unique(g)) for row in groups for g in row) <= 2**bits


def test_error_shrinks_with_bits(weight):
    errs = [weight_error(weight, WeightQuantSpec(b)) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    # one more bit roughly quarters the squared error at high bit-widths
    assert 2.5 < errs[-2] / errs[-1] < 6


def test_groups_beat_per_channel(weight):
    w = weight.clone()
    w[:, 0] = 50.0  # an outlier column hurts every per-channel scale; groups isolate it
    assert weight_error(w, WeightQuantSpec(4, group_size=8)) < weight_error(w, WeightQuantSpec(4))


def test_group_padding_and_conv_layout():
    torch.manual_seed(1)
    w = torch.randn(8, 3, 3, 3)  # K = 27, padded to 32
    qw = quantize_weight(w, WeightQuantSpec(4, False, 32))
    assert qw.q.shape == (8, 32) and qw.k == 27
    assert fake_quantize_weight(w, WeightQuantSpec(4, False, 32)).shape == w.shape


def test_zero_rows_and_asymmetric_min_is_exact():
    w = torch.zeros(4, 16)
    w[1] = torch.linspace(-1, 3, 16)
    sym = fake_quantize_weight(w, WeightQuantSpec(8))
    assert torch.equal(sym[0], torch.zeros(16))
    asym = fake_quantize_weight(w, WeightQuantSpec(3, symmetric=False))
    assert asym[1, 0] == pytest.approx(-1.0, abs=1e-6)  # the minimum sits on level 0
    assert asym[1, -1] == pytest.approx(3.0, abs=1e-6)


def test_scale_dtype_rounds_scales():
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    qw = quantize_weight(w, WeightQuantSpec(4, False, 32, scale_dtype="bfloat16"))
    assert torch.equal(qw.scale, qw.scale.bfloat16().float())
    assert torch.equal(qw.zero, qw.zero.bfloat16().float())


def test_bad_specs():
    with pytest.raises(ConfigError, match="weight bits 9"):
        WeightQuantSpec(9)
    with pytest.raises(ConfigError, match="granularity"):
        ActQuantSpec(8, granularity="channel")
    with pytest.raises(ConfigError, match="per-token scales are dynamic"):
        ActQuantSpec(8, granularity="token", dynamic=False)


def test_per_token_dynamic_int8():
    torch.manual_seed(3)
    x = torch.randn(5, 7, 32) * torch.arange(1, 6)[:, None, None]
    spec = ActQuantSpec(8, "int", "token", dynamic=True, symmetric=True)
    y = fake_quantize_activation(x, spec)
    scale = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((y - x).abs() <= scale / 2 + 1e-6)
    # each token's largest magnitude is representable exactly
    idx = x.abs().argmax(-1, keepdim=True)
    assert torch.allclose(y.gather(-1, idx), x.gather(-1, idx), atol=1e-6)


def test_int16_much_finer_than_int8():
    x = torch.randn(64, 64)
    e8 = (fake_quantize_activation(x, ActQuantSpec(8, granularity="tensor")) - x).pow(2).sum()
    e16 = (fake_quantize_activation(x, ActQuantSpec(16, granularity="tensor")) - x).pow(2).sum()
    assert e16 < e8 / 10_000


def test_bf16_activations():
    x = torch.randn(10, 10)
    assert torch.equal(fake_quantize_activation(x, ActQuantSpec(16, "bfloat16")), x.bfloat16().float())


def test_static_calibrated_range():
    spec = ActQuantSpec(8, "int", "tensor", dynamic=False, symmetric=False)
    q = ActivationQuantizer(spec, name="fc1")
    with pytest.raises(CalibrationError, match="'fc1'.*never calibrated"):
        q(torch.randn(3))
    q.observing = True
    q(torch.tensor([-1.0, 0.5]))
    q(torch.tensor([2.0, 0.0]))
    q.observing = False
    assert q.lo.item() == -1.0 and q.hi.item() == 2.0
    # values outside the calibrated range clip to it; inside, error is at most half a step
    y = q(torch.tensor([5.0, -3.0, 1.234]))
    step = 3.0 / 255
    assert y[0].item() == pytest.approx(2.0, abs=step) and y[1].item() == pytest.approx(-1.0, abs=step)
    assert abs(y[2].item() - 1.234) <= step / 2 + 1e-6


def test_zero_is_exact_for_asymmetric_activations():
    x = torch.relu(torch.randn(100)) + 0.3
    x[::7] = 0.0
    y = fake_quantize_activation(x, ActQuantSpec(8, "int", "tensor", symmetric=False))
    assert torch.all(y[::7] == 0.0)

"""CPU integer kernels against the float reference (within the quantization error bound) and against fake-quant
(equal up to accumulation order); stored sizes against the cost model; save/load of packed weights."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpq
from mpq.config import BitConfig, LayerBits
from mpq.costs import layer_size_bytes
from mpq.fakequant import FakeQuantLayer, fake_quantize
from mpq.kernels.gemm import state_bytes
from mpq.layers import discover_layers
from mpq.numerics import act_qparams, quantize_weight
from mpq.kernel_registry import kernel_for, kernels_for, layer_options

BF16_REL = 2.0**-8  # half an ulp of bfloat16, relative


def _layers():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(72, 40), torch.randn(6, 5, 72)),
        "linear_odd": (nn.Linear(9, 10, bias=False), torch.randn(7, 9)),
        "conv2d": (nn.Conv2d(6, 24, 3, padding=1, stride=2), torch.relu(torch.randn(4, 6, 9, 9))),
        "conv2d_same": (nn.Conv2d(3, 16, (3, 5), padding="same", dilation=(1, 2)), torch.randn(2, 3, 7, 11)),
        "conv1d": (nn.Conv1d(5, 20, 3, padding=1), torch.randn(3, 5, 17)),
        "depthwise": (nn.Conv2d(8, 16, 3, groups=8), torch.randn(2, 8, 6, 6)),
    }


CASES = [(name, bits) for name, (m, x) in _layers().items()
         for bits in layer_options(discover_layers(nn.Sequential(m), x)["0"], "cpu")]


def _op(module):
    if isinstance(module, nn.Linear):
        return lambda x, w: F.linear(x, w)
    fn = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    return lambda x, w: fn(x, w, None, module.stride, module.padding, module.dilation, module.groups)


def error_bound(module, x, scheme):
    """Worst case |y_q - y| from |x_q - x| <= dx and |w_q - w| <= s/2 (plus bf16 output rounding)."""
    op = _op(module)
    qw = quantize_weight(module.weight, scheme.weight)
    w_q = qw.dequantize()
    dw = (qw.scale / 2).repeat_interleave(qw.group, 1)[:, : qw.k].reshape(module.weight.shape)
    if scheme.act.dtype == "int":
        scale, _ = act_qparams(x.amin(), x.amax(), scheme.act)
        dx = torch.full_like(x, float(scale) / 2)
    else:
        dx = x.abs() * BF16_REL
    bound = op(dx, w_q.abs()) + op(x.abs(), dw)
    y_q = op(x, w_q)
    if scheme.out_dtype:
        bound = bound + (y_q.abs() + bound) * BF16_REL
    return bound


@pytest.mark.parametrize("name, bits", CASES, ids=[f"{n}-{b.name}" for n, b in CASES])
def test_kernel_numerics(name, bits):
    module, x = _layers()[name]
    layer = discover_layers(nn.Sequential(module), x)["0"]
    kernel = kernel_for(layer, bits, "cpu")
    scheme = kernel.scheme(bits)
    qmod = kernel.quantize_module(module, layer, bits)
    with torch.no_grad():
        y_ref = module(x)
        y_kernel = qmod(x)
        y_fake = FakeQuantLayer(module, scheme)(x)
        bound = error_bound(module, x, scheme)
    assert y_kernel.shape == y_ref.shape and y_kernel.dtype == torch.float32
    slack = 1e-5 * (1 + y_ref.abs())
    assert torch.all((y_kernel - y_ref).abs() <= bound + slack), (y_kernel - y_ref).abs().max()
    # the error is real quantization error, not zero: the kernel really ran on integers
    assert (y_kernel - y_ref).abs().max() > 0
    # fake-quant emulates the kernel: equal up to accumulation order (and one bf16 ulp of the output)
    tol = 1e-4 * (1 + y_ref.abs()) + (2 * BF16_REL * y_fake.abs() if scheme.out_dtype else 0)
    assert torch.all((y_kernel - y_fake).abs() <= tol), (y_kernel - y_fake).abs().max()
    # stored bytes are what the cost model charges
    assert state_bytes(qmod) == layer_size_bytes(layer, bits, "cpu")
    # a state dict of plain tensors that loads with weights_only=True and gives the same outputs
    buf = io.BytesIO()
    torch.save(qmod.state_dict(), buf)
    buf.seek(0)
    clone = copy.deepcopy(qmod)
    clone.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(clone(x), y_kernel)


def test_int4_pack_exact_inverse():
    """Reading the packed int4 weight back through the kernel (x = identity) returns the dequantized weight."""
    torch.manual_seed(1)
    module = nn.Linear(96, 24, bias=False)
    layer = discover_layers(nn.Sequential(module), torch.randn(1, 96))["0"]
    bits = LayerBits(4, 16, 32)
    qmod = kernel_for(layer, bits, "cpu").quantize_module(module, layer, bits)
    eye = torch.eye(96)
    with torch.no_grad():
        read_back = qmod.gemm(eye).t()  # [N, K]
    qw = quantize_weight(module.weight, kernel_for(layer, bits, "cpu").scheme(bits).weight)
    assert torch.equal(read_back, qw.dequantize().bfloat16().float())


def test_int8_weight_read_back():
    torch.manual_seed(2)
    module = nn.Linear(40, 12, bias=False)
    layer = discover_layers(nn.Sequential(module), torch.randn(1, 40))["0"]
    bits = LayerBits(8, 16)
    qmod = kernel_for(layer, bits, "cpu").quantize_module(module, layer, bits)
    with torch.no_grad():
        read_back = qmod.gemm(torch.eye(40)).t()
    qw = quantize_weight(module.weight, kernel_for(layer, bits, "cpu").scheme(bits).weight)
    assert torch.equal(read_back, qw.dequantize().bfloat16().float())


def test_cpu_registry_lists_real_kernels():
    names = {k.name for k in kernels_for("cpu")}
    assert {"cpu-w8a8-fbgemm-onednn", "cpu-w8a16-int8pack", "cpu-w4a16-int4pack"} <= names
    assert kernels_for("cuda") == [] or all(k.device == "cuda" for k in kernels_for("cuda"))


def test_apply_digits_uniform_int8(digits_task):
    model = copy.deepcopy(digits_task.model)
    inv = discover_layers(model, digits_task.calib[0][0])
    cfg = BitConfig.uniform(inv.names, "w8a8")
    fq_metric = digits_task.eval_fn(fake_quantize(model, cfg, "cpu", inv))
    applied = mpq.apply(model, cfg, device="cpu")
    assert applied is model
    assert type(model.conv2).__name__ == "Int8DynamicConv" and type(model.fc1).__name__ == "Int8DynamicGemm"
    real = digits_task.eval_fn(model)
    assert real == pytest.approx(fq_metric, abs=1 / 360 + 1e-9)  # at most one image differs
    assert real >= digits_task.eval_fn(digits_task.model) - 0.01


def test_load_quantized_round_trip(digits_task, tmp_path):
    from mpq.models.digits import DigitsCNN

    inv = discover_layers(digits_task.model, digits_task.calib[0][0])
    cfg = BitConfig({"conv2": "w8a8", "conv3": "w4a16g64", "fc1": "w4a16g128", "fc2": "w8a16"})
    q = mpq.apply(copy.deepcopy(digits_task.model), cfg)
    torch.save(q.state_dict(), tmp_path / "q.pt")
    fresh = mpq.load_quantized(DigitsCNN(), cfg, tmp_path / "q.pt")
    x = digits_task.calib[0][0]
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    assert len(inv) == 5

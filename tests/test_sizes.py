"""Sizes counted to the byte: for every zoo model, every registered CPU kernel and every option it offers a layer, the
cost table's bytes equal the state dict of the module ``apply`` installs; a whole applied config weighs what the
cost model predicts; bits per weight, budgets in bits, and the explanation of an unreachable size."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mpq
from conftest import NEEDS_LOWBIT
from mpq.config import BitConfig, LayerBits
from mpq.costs import MB, bits_per_weight, build_cost_table, explain_unreachable, layer_size_bytes, size_for_bits
from mpq.kernel_registry import kernels_for
from mpq.kernels.gemm import state_bytes
from mpq.layers import discover_layers
from mpq.models import load_reference, reference_names
from mpq.space import build_search_space


def _model_bytes(model: nn.Module) -> int:
    """Bytes of a state dict, each tensor counted once (a tied weight appears under two names)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@pytest.fixture(scope="module")
def zoo():
    out = {}
    for name in reference_names():
        task = load_reference(name)
        out[name] = (task.model.eval(), discover_layers(task.model, task.calib[0][0]))
    return out


@pytest.mark.parametrize("name", reference_names())
def test_every_option_of_every_kernel_weighs_what_the_cost_table_says(zoo, name):
    model, inv = zoo[name]
    seen, checked = set(), 0
    for layer in inv:
        shape = (layer.kind, layer.weight_shape, layer.has_bias, str(layer.conv))
        if shape in seen:  # identical blocks: the same bytes
            continue
        seen.add(shape)
        module = model.get_submodule(layer.name)
        for kernel in kernels_for("cpu"):
            for bits in kernel.options(layer):
                qmod = kernel.quantize_module(module, layer, bits)
                assert state_bytes(qmod) == layer_size_bytes(layer, bits, "cpu"), (layer.name, kernel.name, bits.name)
                checked += 1
    assert checked > 20 * len(seen) // 2  # the low-bit kernel alone offers dozens of options per layer


@pytest.mark.parametrize("name", reference_names())
def test_applied_config_weighs_its_predicted_size(zoo, name):
    model, inv = zoo[name]
    space = build_search_space(inv, "cpu")
    table = build_cost_table(inv, space)
    # one of each option in turn, so that a config mixes kernels: per-channel, grouped, sym, asym, embeddings
    choice = {}
    for i, layer in enumerate(inv):
        opts = [b for b in space[layer.name] if b.w_bits is not None]
        choice[layer.name] = opts[(7 * i) % len(opts)].name
    idx = table.set_index(["layer", "option"])
    predicted = inv.float_bytes_other() + sum(idx.loc[(l, o), "size_mb"] * MB for l, o in choice.items())
    applied = mpq.apply(copy.deepcopy(model), BitConfig({k: LayerBits.parse(v) for k, v in choice.items()}),
                        inventory=inv)
    assert _model_bytes(applied) == round(predicted)


@NEEDS_LOWBIT
def test_bits_per_weight_and_budgets_in_bits(zoo):
    model, inv = zoo["char-lm"]
    linears = [l.name for l in inv if l.kind == "linear"]
    cfg = {n: LayerBits.parse("w2a16g64asym") for n in linears}
    bpw = bits_per_weight(inv, cfg, "cpu")
    w_lin = sum(inv[n].n * inv[n].k for n in linears)
    w_all = sum(l.n * l.k for l in inv)
    emb = w_all - w_lin  # embeddings stay float32
    assert bpw.weights == w_all
    assert bpw.without_overhead == pytest.approx((2 * w_lin + 32 * emb) / w_all)
    assert bpw.with_overhead == pytest.approx((2.5 * w_lin + 32 * emb) / w_all)  # one fp16 scale and zero per 64
    # a size in bits per weight: the uniform 2.5-bit config fits exactly, with the biases and kept-float parts
    uniform = {l.name: "w2a16g64asym" if l.kind == "linear" else "w2afsym" for l in inv}
    everything = bits_per_weight(inv, uniform, "cpu")
    assert everything.without_overhead == pytest.approx(2.0)
    size = inv.float_bytes_other() + sum(layer_size_bytes(l, LayerBits.parse(o), "cpu") for l, o in
                                         ((inv[n], o) for n, o in uniform.items()))
    assert size_for_bits(inv, everything.with_overhead) * MB == pytest.approx(size)


def test_unreachable_size_names_the_layer_option_and_reason():
    model = nn.Sequential(nn.Linear(96, 512, bias=False))
    inv = discover_layers(model, torch.randn(4, 96))
    space = build_search_space(inv, "cpu", allowed=["w2a16g32asym"])
    g32 = layer_size_bytes(inv["0"], LayerBits.parse("w2a16g32asym"), "cpu") / MB
    assert explain_unreachable(inv, space, g32) == ""  # reachable: nothing to explain
    text = explain_unreachable(inv, space, g32 * 0.999)
    assert text.startswith(f"size_mb={g32 * 0.999:.6g} is below the smallest size this space reaches, {g32:.6g} MB")
    # the fewest bytes any kernel stores for this layer: 2-bit per channel, left out by `allowed`
    assert "reaching it needs w2a16sym on layer 0 (linear 512x96, saving 0.00512 MB), which no kernel of cpu " \
           "offers there: not in the allowed options" in text
    # below anything any kernel has: the floor is named
    text = explain_unreachable(inv, space, 1e-6)
    assert "no option the cpu kernels have, even those ruled out for a layer, gets below 0.013312 MB" in text


def test_unreachable_size_names_a_shape_rule():
    """A depthwise convolution has no GEMM kernel (only oneDNN's W8A8 convolution runs it): the low-bit options are
    ruled out by its shape, and the message says so."""
    model = nn.Sequential(nn.Conv2d(64, 64, 3, groups=64, padding=1), nn.Conv2d(64, 32, 1))
    inv = discover_layers(model, torch.randn(2, 64, 8, 8))
    space = build_search_space(inv, "cpu")
    assert [b.name for b in space["0"]] == ["float", "w8a8"]
    assert "not one dense GEMM" in space.excluded["0"]["w2a16sym"].reason
    smallest = (inv.float_bytes_other() + sum(min(layer_size_bytes(l, b, "cpu") for b in space[l.name])
                                              for l in inv)) / MB
    text = explain_unreachable(inv, space, smallest * 0.9)
    assert "reaching it needs w2a16sym on layer 0 (conv2d 64x1x3x3" in text
    assert "which no kernel of cpu offers there: conv2d with groups=64 and padding (1, 1) is not one dense GEMM " \
           "(cpu-lowbit-mpq)" in text

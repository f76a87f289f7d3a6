"""Quantizers: GPTQ beats min-max on output error and equals it under an identity Hessian; MSE clipping never
increases weight error; every registered quantizer honours the storage format; embeddings run row-wise kernels."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mpq
from conftest import NEEDS_LOWBIT
from mpq.config import BitConfig, LayerBits
from mpq.costs import packed_weight_bytes
from mpq.errors import ConfigError
from mpq.fakequant import fake_quantize
from mpq.kernels.embedding import pack_rows, unpack_rows
from mpq.kernels.gemm import state_bytes
from mpq.layers import discover_layers
from mpq.numerics import QuantScheme, WeightQuantSpec, quantize_weight
from mpq.quantizers import available_quantizers, collect_hessians, get_quantizer, gptq_quantize
from mpq.kernel_registry import kernel_for

SPECS = [WeightQuantSpec(3, True, None), WeightQuantSpec(3, False, 32), WeightQuantSpec(4, False, 64, "bfloat16"),
         WeightQuantSpec(2, True, 32), WeightQuantSpec(4, False, None, "float16", zero_at_min=True)]


def _correlated_inputs(k: int, rows: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.4
    return torch.randn(rows, k, generator=g) @ mix + torch.randn(rows, k, generator=g)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"w{s.bits}{'s' if s.symmetric else 'a'}g{s.group_size}")
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reduces_output_error(spec, act_order):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 40))
    x = _correlated_inputs(96)
    gptq = get_quantizer("gptq", act_order=act_order).prepare(model, [x], discover_layers(model, x))
    w = model[0].weight.detach()

    def out_err(qw):
        return float(((x @ (qw.dequantize() - w).t()) ** 2).mean())

    mm, gq = quantize_weight(w, spec), gptq.quantize("0", w, spec)
    # ternary levels (2-bit symmetric) leave error feedback little room: strictly better is all it promises there
    assert out_err(gq) < (0.8 if spec.bits >= 3 else 1.0) * out_err(mm)
    assert gq.q.min() >= spec.qmin and gq.q.max() <= spec.qmax and gq.q.shape == mm.q.shape


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"w{s.bits}{'s' if s.symmetric else 'a'}g{s.group_size}")
def test_gptq_with_identity_hessian_is_minmax(spec):
    w = torch.randn(24, 70)
    gq = gptq_quantize(w, torch.eye(70), spec)
    mm = quantize_weight(w, spec)
    assert torch.equal(gq.q, mm.q) and torch.equal(gq.scale, mm.scale)
    assert (gq.zero is None and mm.zero is None) or torch.equal(gq.zero, mm.zero)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), group=st.sampled_from([None, 16, 32]),
       n=st.integers(1, 12), k=st.integers(1, 80), seed=st.integers(0, 10_000))
def test_mse_clipping_never_increases_weight_error(bits, symmetric, group, n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) ** 3  # heavy tails: clipping pays
    spec = WeightQuantSpec(bits, symmetric, group)
    mse = get_quantizer("mse").quantize("x", w, spec)
    assert mse.error(w) <= quantize_weight(w, spec).error(w) * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("name", available_quantizers())
def test_every_quantizer_keeps_the_storage_format(name):
    """One shared test for every plug-in: integers in range, scales in the stored dtype, shape and size exact."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 8))
    x = torch.randn(64, 40)
    inv = discover_layers(model, x)
    quant = get_quantizer(name).prepare(model, [x], inv)
    for spec in SPECS:
        qw = quant.quantize("0", model[0].weight, spec)
        assert qw.q.dtype == torch.int32 and qw.q.min() >= spec.qmin and qw.q.max() <= spec.qmax
        assert torch.equal(qw.scale, qw.scale.to(getattr(torch, spec.scale_dtype)).float())
        assert qw.dequantize().shape == model[0].weight.shape
        stored = qw.q.numel() * spec.bits / 8 + qw.scale.numel() * qw.scale.to(
            getattr(torch, spec.scale_dtype)).element_size() * (1 if spec.symmetric else 2) + 30 * 4
        assert packed_weight_bytes(inv["0"], QuantScheme(spec)) == pytest.approx(stored, abs=1)


def test_unknown_quantizer_and_gptq_without_calibration():
    with pytest.raises(ConfigError, match="unknown quantizer 'nope'.*gptq"):
        get_quantizer("nope")
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ConfigError, match="calib_data"):
        mpq.apply(model, BitConfig({"0": "w8a8"}), quantizer="gptq")


def test_hessian_of_linear_and_conv_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 6))
    x = torch.randn(7, 3, 5, 5)
    h = collect_hessians(model, [x], ["0", "2"])
    cols = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    torch.testing.assert_close(h["0"], 2 * cols.t() @ cols / cols.shape[0])
    feats = model[1](model[0](x))
    torch.testing.assert_close(h["2"], 2 * feats.t() @ feats / 7, rtol=1e-4, atol=1e-5)


def test_search_with_gptq_installs_gptq_weights(digits_task, tmp_path):
    result = mpq.search(digits_task.model, digits_task.calib, digits_task.eval_fn, budget="size=0.35",
                        quantizer="gptq", out=tmp_path, profile="inprocess", repeats=3, warmup=1,
                        frontier_points=3, progress=False)
    assert result.config.meta["quantizer"]["name"] == "gptq" and result.info["quantizer"]["name"] == "gptq"
    chosen = result.row("chosen")
    assert chosen["metric_real"] == pytest.approx(chosen["metric_fakequant"], abs=0.02)
    # apply reads the quantizer from the config's metadata; GPTQ needs the calibration batches
    with pytest.raises(ConfigError, match="calib_data"):
        mpq.apply(copy.deepcopy(digits_task.model), result.config)
    applied = mpq.apply(copy.deepcopy(digits_task.model), BitConfig.load(tmp_path / "config.json"),
                        calib_data=digits_task.calib)
    assert digits_task.eval_fn(applied) == pytest.approx(chosen["metric_real"], abs=1e-9)


# --- embeddings ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_rowwise_embedding_pack_is_exact_and_matches_fakequant(bits):
    torch.manual_seed(bits)
    model = nn.Sequential(nn.Embedding(50, 24))
    ids = torch.randint(0, 50, (3, 7))
    inv = discover_layers(model, ids)
    layer, lb = inv["0"], LayerBits(bits)
    kernel = kernel_for(layer, lb, "cpu")
    qw = quantize_weight(model[0].weight, kernel.scheme(lb).weight)
    q, s, z = unpack_rows(pack_rows(qw.q, qw.scale, qw.zero, bits), 24, bits)
    assert torch.equal(q, qw.q) and torch.equal(s, qw.scale) and torch.equal(z, qw.zero)
    config = BitConfig({"0": lb})
    real = mpq.apply(copy.deepcopy(model), config)
    fake = fake_quantize(model, config)
    torch.testing.assert_close(real(ids), fake(ids), rtol=0, atol=1e-6)
    assert state_bytes(real) == kernel.weight_bytes(layer, lb)
    assert kernel.weight_bytes(layer, lb) == 50 * 24 * bits // 8 + 50 * (8 if bits == 8 else 4)


@NEEDS_LOWBIT
def test_embedding_options_are_weight_only_and_tied_head_is_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 16)
            self.body = nn.Linear(16, 16)
            self.head = nn.Linear(16, 32, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.body(self.emb(ids))))

    model = Tied()
    ids = torch.randint(0, 32, (2, 5))
    inv = discover_layers(model, ids)
    assert inv.names == ["body", "head"] and inv["head"].tied_to == "emb"
    assert "tied" in inv.kept_float[0].reason and inv.kept_float[0].name == "emb"
    assert inv["head"].float_bytes() == 0  # its weight is counted once, under the embedding
    q = mpq.apply(copy.deepcopy(model), BitConfig({"head": "w8a8", "body": "w8a8"}))
    torch.testing.assert_close(q(ids), model(ids), rtol=0.05, atol=0.05)
    plain = nn.Sequential(nn.Embedding(32, 16), nn.Linear(16, 4))
    opts = mpq.build_search_space(discover_layers(plain, ids), "cpu")["0"]
    # fbgemm's row-wise 8/4/2-bit tables, and mpq's own row-wise lookup at 2-8 bits (symmetric or not): weight-only
    assert [b.name for b in opts] == ["float", "w8af", "w8afsym", "w6afasym", "w6afsym", "w5afasym", "w5afsym", "w4af",
                                      "w4afsym", "w3afasym", "w3afsym", "w2af", "w2afsym"]
    assert all(b.a_bits is None for b in opts)


def test_layers_fed_one_tensor_share_one_hessian():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 8)

        def forward(self, x):
            return self.o(self.q(x) + torch.cat([self.k(x), self.v(x)], -1))

    model = QKV()
    batches = [torch.randn(5, 8), torch.randn(3, 8)]
    h = collect_hessians(model, batches, ["q", "k", "v", "o"])
    assert h["q"] is h["k"] is h["v"] and h["o"] is not h["q"]
    alone = collect_hessians(model, batches, ["v"])["v"]
    torch.testing.assert_close(h["v"], alone)


def test_quantizer_cache_is_bounded_in_bytes(monkeypatch):
    """The per-(layer, format) cache evicts least-recently-used copies beyond MPQ_QUANTIZER_CACHE_MB, and a cached
    result is the same object as the first (no recomputation while it fits)."""
    spec = WeightQuantSpec(bits=4, symmetric=True, group_size=32)
    w = torch.randn(64, 256)
    one_copy = 64 * 256 * 4 + 64 * 8 * 4  # int32 levels + float32 scales
    monkeypatch.setenv("MPQ_QUANTIZER_CACHE_MB", str(2.5 * one_copy / 2**20))
    q = get_quantizer("minmax")
    first = q.quantize("a", w, spec)
    assert q.quantize("a", w, spec) is first
    q.quantize("b", w, spec)
    q.quantize("a", w, spec)  # a is now the most recent: c evicts b
    q.quantize("c", w, spec)
    assert [k[0] for k in q._cache] == ["a", "c"] and q._cache_bytes == 2 * one_copy
    monkeypatch.setenv("MPQ_QUANTIZER_CACHE_MB", "0")
    assert q.quantize("d", w, spec) is not q.quantize("d", w, spec)
    monkeypatch.setenv("MPQ_QUANTIZER_CACHE_MB", "lots")
    with pytest.raises(ConfigError, match="MPQ_QUANTIZER_CACHE_MB"):
        q.quantize("e", w, spec)

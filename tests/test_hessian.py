"""Hutchinson traces against exact Hessians of a tiny model, and the scores they produce."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mpq.calib import CalibrationSet, default_loss
from mpq.config import FLOAT
from mpq.layers import discover_layers
from mpq.sensitivity import HessianTraceEstimator, get_estimator, hutchinson_traces
from mpq.space import build_search_space


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(16, 6)
    y = torch.randint(0, 4, (16,))
    return model, CalibrationSet([(x, y)])


def exact_weight_trace(model, x, y, name):
    params = dict(model.named_parameters())
    w0 = params[f"{name}.weight"].detach()

    def loss_of(w):
        return F.cross_entropy(functional_call(model, {**params, f"{name}.weight": w}, (x,)), y)

    h = torch.autograd.functional.hessian(loss_of, w0)
    return float(h.reshape(w0.numel(), w0.numel()).diagonal().sum())


def exact_input_trace_fc2(model, x, y):
    h0 = torch.tanh(model.fc1(x)).detach()
    h = torch.autograd.functional.hessian(lambda a: F.cross_entropy(model.fc2(a), y), h0)
    return float(h.reshape(h0.numel(), h0.numel()).diagonal().sum())


def test_hutchinson_matches_exact_trace(tiny):
    model, calib = tiny
    x, y = calib.batches[0]
    est = hutchinson_traces(model, calib, ["fc1", "fc2"], default_loss, activations=True, min_probes=4000,
                            max_probes=4000, tol=0.0, seed=1)
    for name in ("fc1", "fc2"):
        exact = exact_weight_trace(model, x, y, name)
        e = est[("w", name)]
        assert e.probes == 4000
        assert abs(e.mean - exact) <= 4 * e.stderr + 1e-9, (name, e.mean, exact, e.stderr)
        assert e.mean == pytest.approx(exact, rel=0.05)
    exact_a = exact_input_trace_fc2(model, x, y)
    ea = est[("a", "fc2")]
    assert abs(ea.mean - exact_a) <= 4 * ea.stderr
    assert ea.mean == pytest.approx(exact_a, rel=0.05)


def test_stops_when_converged(tiny):
    model, calib = tiny
    est = hutchinson_traces(model, calib, ["fc1", "fc2"], default_loss, min_probes=8, max_probes=5000, tol=0.2)
    probes = est[("w", "fc1")].probes
    assert 8 <= probes < 5000
    for e in est.values():
        largest = max(abs(v.mean) for v in est.values())
        assert e.stderr <= 0.2 * max(abs(e.mean), 0.01 * largest)


def test_model_left_unchanged(tiny):
    model, calib = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    hutchinson_traces(model, calib, ["fc1"], default_loss, max_probes=3)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_scores(digits_task):
    model, calib = digits_task.model, CalibrationSet.from_any(digits_task.calib)
    inv = discover_layers(model, calib.example)
    space = build_search_space(inv, "cpu")
    res = get_estimator("hessian", max_probes=24).run(model, calib, space, inv, progress=False)
    s = res.scores.set_index(["layer", "option"])["score"]
    # normalised: every layer at its most aggressive option sums to 1; raw scores are loss increases
    assert s.groupby(level=0).max().sum() == pytest.approx(1.0)
    raw = res.scores.set_index(["layer", "option"])["raw_score"]
    ratio = (raw / s.replace(0, float("nan"))).dropna()
    assert ratio.max() == pytest.approx(ratio.min(), rel=1e-9)  # one common factor
    assert len(s) == sum(len(space[n]) for n in space.layers)
    assert all(s[(n, FLOAT.name)] == 0 for n in space.layers)
    assert (s >= 0).all()
    for n in space.layers:  # fewer bits never score better on the same layer (same activations)
        assert s[(n, "w4a16g32")] > s[(n, "w8a16")]
    steps = -(-24 // res.cost["batch_probes"])
    assert res.cost["probes"] == 24 and res.cost["backward_passes"] == 2 * steps and res.cost["seconds"] > 0
    assert set(res.layer_stats["layer"]) == set(space.layers)
    assert math.isfinite(res.layer_stats["weight_trace"].sum())


def test_registry():
    assert isinstance(get_estimator("hessian"), HessianTraceEstimator)
    with pytest.raises(ValueError, match="unknown sensitivity estimator 'nope'; available: decoupled, entropy, "
                                         "fisher, hessian, lrp, measured"):
        get_estimator("nope")

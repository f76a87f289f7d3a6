"""The sensitivity suite: every estimator on one interface, LRP conservation, entropy, normalisation, the measured
truth on a tiny model, combinations, rejection of non-finite scores, and the judge."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpq
from mpq.calib import CalibrationSet
from mpq.config import FLOAT
from mpq.fakequant import fake_quantize
from mpq.config import BitConfig
from mpq.layers import discover_layers
from mpq.sensitivity import (SensitivityEstimator, SensitivityResult, available_estimators, entropy_drop,
                             get_estimator, histogram_entropy, layer_relevance, register_estimator)
from mpq.plugins import ESTIMATORS
from mpq.sensitivity.base import ScoreError
from mpq.sensitivity.hessian import top_eigenvalues
from mpq.sensitivity.judge import judge_estimators, random_configs
from mpq.space import build_search_space

FAST = {"hessian": {"max_probes": 16, "min_probes": 8}, "decoupled": {"backend": "inprocess"},
        "measured": {"backend": "inprocess"}}


@pytest.fixture(scope="module")
def digits_setup(digits_task):
    calib = CalibrationSet.from_any(digits_task.calib[:2])
    inv = discover_layers(digits_task.model, calib.example)
    return digits_task.model, calib, inv, build_search_space(inv, "cpu")


@pytest.mark.parametrize("name", ["fisher", "hessian", "lrp", "decoupled", "entropy", "measured"])
def test_every_estimator_one_interface(name, digits_setup):
    model, calib, inv, space = digits_setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = get_estimator(name, **FAST.get(name, {})).run(model, calib, space, inv, progress=False)
    assert isinstance(res, SensitivityResult)
    assert set(zip(res.scores["layer"], res.scores["option"])) == {(l, b.name) for l, b in space.pairs()}
    s = res.scores.set_index(["layer", "option"])
    assert (s["score"] >= 0).all() and s["score"].groupby(level=0).max().sum() == pytest.approx(1.0)
    assert all(s.loc[(l, FLOAT.name), "score"] == 0 for l in space.layers)
    assert res.cost["seconds"] > 0 and res.cost["forward_passes"] >= 1 and "backward_passes" in res.cost
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lrp_conservation_mlp_and_cnn():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 20, bias=False), nn.ReLU(), nn.Linear(20, 20, bias=False), nn.ReLU(),
                        nn.Linear(20, 5, bias=False))
    x = torch.randn(4, 10)
    rel, target = layer_relevance(mlp, x, ["0", "2", "4"])
    for r in rel.values():  # a sequential net: every layer's output is a cut
        assert float(r.sum()) == pytest.approx(float(target.sum()), rel=1e-5)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 3, bias=False))
    x = torch.randn(5, 1, 8, 8)
    rel, target = layer_relevance(cnn, x, ["0", "3", "6"])
    for r in rel.values():
        assert float(r.sum()) == pytest.approx(float(target.sum()), rel=1e-5)


def test_lrp_conservation_transformer():
    """LN-rule, AH-rule and identity rule make a bias-free transformer conserve relevance through residuals."""
    from mpq.models.charlm import CharLM, LMConfig

    torch.manual_seed(0)
    lm = CharLM(LMConfig(vocab=32, ctx=16, d_model=16, n_heads=2, n_layers=2))
    for m in lm.modules():
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    ids = torch.randint(0, 32, (3, 16))
    rel, target = layer_relevance(lm, ids, ["tok", "pos", "blocks.0.attn.proj", "blocks.0.out", "head"])
    total = float(target.sum())
    assert float(rel["tok"].sum() + rel["pos"].sum()) == pytest.approx(total, rel=1e-4)
    assert float(rel["head"].sum()) == pytest.approx(total, rel=1e-5)
    # the rules are undone after the pass: softmax and layer_norm are torch's own again
    assert F.softmax(torch.zeros(2), -1).requires_grad is False and F.layer_norm.__module__.startswith("torch")


def test_histogram_entropy_known_distributions():
    levels = torch.arange(16).float().repeat(1000)  # 16 equally likely values: 4 bits
    assert histogram_entropy(levels, 0, 15, bins=16) == pytest.approx(4.0, abs=1e-6)
    assert histogram_entropy(torch.ones(100), 0, 2, bins=8) == pytest.approx(0.0, abs=1e-9)
    two = torch.tensor([0.0] * 300 + [1.0] * 100)  # p = 3/4, 1/4
    expected = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert histogram_entropy(two, 0, 1, bins=4) == pytest.approx(expected, abs=1e-6)
    # quantizing 4096 distinct uniform values to 16 levels keeps 4 of their 12 bits
    x = torch.linspace(0, 1, 4096)
    xq = torch.round(x * 15) / 15
    assert entropy_drop(x, xq) == pytest.approx(12.0 - 4.0, abs=0.05)


def test_measured_equals_hand_computed_delta():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    calib = CalibrationSet([(x, y)])
    inv = discover_layers(model, x)
    space = build_search_space(inv, "cpu", allowed=["w4a16g32"])
    res = get_estimator("measured", backend="inprocess").run(model, calib, space, inv, progress=False)
    # by hand: dequantize layer 0's weight exactly as the int4 kernel stores it, recompute the loss
    from mpq.numerics import fake_quantize_weight
    from mpq.kernel_registry import scheme_for

    scheme = scheme_for(inv["0"], mpq.LayerBits.parse("w4a16g32"), "cpu")
    w_q = fake_quantize_weight(model[0].weight, scheme.weight)
    with torch.no_grad():
        h = torch.tanh(F.linear(x.bfloat16().float(), w_q).bfloat16().float() + model[0].bias)
        delta = float(F.cross_entropy(model[2](h), y) - F.cross_entropy(model(x), y))
    raw = res.scores.set_index(["layer", "option"])["raw_score"]
    assert raw[("0", "w4a16g32")] == pytest.approx(delta, rel=1e-5, abs=1e-8)
    assert raw[("0", "float")] == 0.0


def test_measured_and_decoupled_on_ray(digits_setup, ray_cluster):
    model, calib, inv, space = digits_setup
    local = get_estimator("decoupled", backend="inprocess").run(model, calib, space, inv, progress=False)
    from mpq.workers.cluster import map_with_shared

    remote = get_estimator("decoupled", map_with_shared, backend="ray").run(model, calib, space, inv, progress=False)
    pd.testing.assert_frame_equal(local.scores, remote.scores, rtol=1e-5, atol=1e-8)
    assert set(remote.tables) == {"loss", "kl", "feature"}


def test_decoupled_groups(digits_setup):
    model, calib, inv, space = digits_setup
    res = get_estimator("decoupled", backend="inprocess").run(model, calib, space, inv, progress=False)
    groups = res.layer_stats.set_index("layer")["metric"]
    assert set(groups) <= {"loss", "kl", "feature"}
    for _, layers in groups.groupby(groups):
        rows = res.scores[res.scores["layer"].isin(layers.index)]
        assert rows["raw_score"].max() == pytest.approx(1.0)  # each group's largest is 1
    # the last layer cannot distort the features it reads
    assert float(res.tables["feature"].query("layer == 'fc2'")["value"].abs().max()) == 0.0


def test_normalisation_and_combination(digits_setup):
    model, calib, inv, space = digits_setup
    lrp = get_estimator("lrp").run(model, calib, space, inv, progress=False)
    ent = get_estimator("entropy").run(model, calib, space, inv, progress=False)
    both = get_estimator("0.25*lrp+0.75*entropy").run(model, calib, space, inv, progress=False)
    merged = lrp.scores[["layer", "option", "score"]].merge(ent.scores[["layer", "option", "score"]],
                                                            on=["layer", "option"])
    expected = 0.25 * merged["score_x"] + 0.75 * merged["score_y"]
    raw = both.scores.merge(merged[["layer", "option"]].assign(expected=expected), on=["layer", "option"])
    assert raw["raw_score"].to_numpy() == pytest.approx(raw["expected"].to_numpy())
    assert both.scores.groupby("layer")["score"].max().sum() == pytest.approx(1.0)
    assert both.estimator == "0.25*lrp+0.75*entropy"
    with pytest.raises(ValueError, match="unknown sensitivity estimator 'nope'"):
        get_estimator("hessian+nope")
    with pytest.raises(ValueError, match="cannot parse"):
        get_estimator("2**hessian")


def test_non_finite_scores_rejected(digits_setup):
    model, calib, inv, space = digits_setup

    @register_estimator
    class Broken(SensitivityEstimator):
        name = "broken_for_test"

        def estimate(self, model, calib, space, inventory, loss_fn=None, progress=True):
            rows = [{"layer": l, "option": b.name, "raw_score": float("nan") if l == "conv2" and b != FLOAT else 0.0}
                    for l, b in space.pairs()]
            return SensitivityResult(self.name, pd.DataFrame(rows))

    try:
        with pytest.raises(ScoreError) as e:
            get_estimator("broken_for_test").run(model, calib, space, inv, progress=False)
        assert "'conv2'" in str(e.value) and "nan" in str(e.value)
    finally:
        ESTIMATORS.remove("broken_for_test")


def test_top_eigenvalue_matches_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    calib = CalibrationSet([(x, y)])
    lam = top_eigenvalues(model, calib, ["0", "2"], iters=200, tol=1e-9)
    for name in ("0", "2"):
        params = dict(model.named_parameters())
        w0 = params[f"{name}.weight"].detach()

        def loss_of(w):
            return F.cross_entropy(torch.func.functional_call(model, {**params, f"{name}.weight": w}, (x,)), y)

        h = torch.autograd.functional.hessian(loss_of, w0).reshape(w0.numel(), w0.numel())
        exact = torch.linalg.eigvalsh(h)
        top = float(exact[exact.abs().argmax()])
        assert lam[name] == pytest.approx(top, rel=1e-3)


def test_batched_probes_and_stop_rules(digits_setup):
    model, calib, inv, space = digits_setup
    single = get_estimator("hessian", batch_probes=1, max_probes=64, min_probes=64).run(model, calib, space, inv,
                                                                                       progress=False)
    batched = get_estimator("hessian", batch_probes=16, max_probes=64, min_probes=64).run(model, calib, space, inv,
                                                                                        progress=False)
    assert single.cost["backward_passes"] == 2 * 64 and batched.cost["backward_passes"] == 2 * 4
    a = single.layer_stats.set_index("layer")
    b = batched.layer_stats.set_index("layer")
    z = (a["weight_trace"] - b["weight_trace"]).abs() / (a["weight_trace_stderr"] ** 2 +
                                                          b["weight_trace_stderr"] ** 2) ** 0.5
    assert (z < 5).all()  # two estimates of the same traces agree within their standard errors
    change = get_estimator("hessian", stop="change", tol=0.5, min_probes=8, max_probes=128).run(
        model, calib, space, inv, progress=False)
    assert change.cost["probes"] < 128 and change.cost["converged"]
    eig = get_estimator("hessian", mode="eigen", eigen_iters=5).run(model, calib, space, inv, progress=False)
    assert eig.cost["mode"] == "eigen" and (eig.scores["score"] >= 0).all()


def test_judge(digits_task, tmp_path):
    report = judge_estimators(digits_task.model, digits_task.calib[:2], digits_task.heldout[:1],
                              estimators=("lrp", "entropy", "measured"), n_configs=12, options=FAST,
                              progress=False, out=tmp_path)
    t = report.table.set_index("estimator")
    assert {"truth (single-layer sum)", "lrp", "entropy", "measured", "entropy:relative_error"} <= set(t.index)
    assert t.loc["truth (single-layer sum)", "tau_option"] == pytest.approx(1.0)
    assert -1 <= t.loc["lrp", "tau_config"] <= 1 and -1 <= t.loc["measured", "rho_config"] <= 1
    assert len(report.configs) == 12 and set(report.configs.columns) >= {"truth", "lrp", "measured", "config"}
    for f in ("estimators.csv", "estimator_options.csv", "estimator_configs.csv", "estimators.html"):
        assert (tmp_path / f).exists()
    # the configs are real draws from the space
    inv = discover_layers(digits_task.model, digits_task.calib[0][0])
    space = build_search_space(inv, "cpu")
    for c in random_configs(space, 5):
        assert all(mpq.LayerBits.parse(o) in space[l] for l, o in c.items())


def test_search_with_other_estimators(digits_task):
    result = mpq.search(digits_task.model, digits_task.calib[:2], digits_task.eval_fn, budget="size=0.3",
                        sensitivity="0.5*lrp+0.5*entropy", profile="inprocess", repeats=3, warmup=1,
                        frontier_points=3, evaluate_frontier=False, progress=False)
    assert result.info["estimator"] == "0.5*lrp+0.5*entropy"
    assert result.row("chosen")["size_mb"] <= result.info["limits"]["size_mb"] + 1e-12


def test_registry_lists_all():
    assert {"fisher", "hessian", "lrp", "decoupled", "entropy", "measured"} <= set(available_estimators())


def test_fake_quantized_config_equals_swapped_runner(digits_setup):
    """config_damage swaps layers in place; the result equals a separately fake-quantized copy."""
    from mpq.sensitivity.measured import config_damage

    model, calib, inv, space = digits_setup
    config = {"conv2": "w4a16g32", "fc1": "w8a8"}
    (damage,) = config_damage(model, calib.with_pseudo_labels(model), [config], inv, "cpu", progress=False)
    fq = fake_quantize(model, BitConfig(config), "cpu", inv)
    labelled = calib.with_pseudo_labels(model)
    with torch.no_grad():
        expected = sum(float(F.cross_entropy(fq(x), y) - F.cross_entropy(model(x), y))
                       for x, y in labelled.batches) / len(labelled)
    assert damage["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["lrp", "entropy"])
def test_search_char_lm_with_estimator(name, lm_task):
    result = mpq.search(lm_task.model, lm_task.calib[:1], lm_task.eval_fn, budget="size=0.4", sensitivity=name,
                        profile="inprocess", repeats=3, warmup=1, frontier_points=3, evaluate_frontier=False,
                        progress=False, metric="perplexity", higher_is_better=False, batch_size=2)
    assert result.info["estimator"] == name
    assert result.row("chosen")["size_mb"] <= result.info["limits"]["size_mb"] + 1e-12


@pytest.mark.ray
def test_frontier_evaluations_fan_out_over_ray_actors(digits_task, ray_cluster, tmp_path):
    import os

    log = tmp_path / "pids"
    inner = digits_task.eval_fn

    def eval_fn(model):  # notes which process evaluated
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return inner(model)

    common = dict(budget="size=0.3", sensitivity="entropy", profile="ray", threads=1, repeats=3,
                  frontier_points=4, progress=False)
    here = mpq.search(digits_task.model, digits_task.calib, eval_fn, **common)
    log.unlink()
    fanned = mpq.search(digits_task.model, digits_task.calib, eval_fn, evaluate_workers=2, **common)
    assert len(set(log.read_text().split()) - {str(os.getpid())}) >= 1  # some evaluations ran in Ray actors
    a = dict(zip(here.frontier["choice"], here.frontier["metric"]))
    b = dict(zip(fanned.frontier["choice"], fanned.frontier["metric"]))
    shared = set(a) & set(b)
    assert len(shared) >= 3 and all(math.isfinite(v) for v in [*a.values(), *b.values()])
    assert {c: a[c] for c in shared} == {c: b[c] for c in shared}  # the same evaluations, elsewhere: same numbers

"""ILP against brute force on random small instances; budget errors; frontier properties."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mpq.errors import BudgetError, ConfigError
from mpq.solvers import exhaustive_allocate, get_solver, ilp_allocate, pareto_filter, smallest_reachable, sweep_frontier


def random_table(rng, layers, options):
    rows = []
    for l in range(layers):
        n_opt = int(rng.integers(2, options + 1))
        base_size, base_macs = rng.uniform(0.1, 2.0), rng.uniform(1e6, 1e9)
        for o in range(n_opt):
            bits = [32, 8, 6, 4, 3, 2][o]
            rows.append({"layer": f"layer{l}", "option": f"opt{o}",
                         "score": 0.0 if o == 0 else float(rng.uniform(0, 1) * (32 - bits) ** 2 / 100),
                         "size_mb": base_size * bits / 32, "bops": base_macs * bits * 8,
                         "latency_ms": float(rng.uniform(0.05, 1.0))})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", range(30))
def test_ilp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    table = random_table(rng, int(rng.integers(2, 6)), 4)
    fixed = {"size_mb": float(rng.uniform(0, 0.2)), "latency_ms": float(rng.uniform(0, 0.5))}
    lo = smallest_reachable(table, fixed)
    hi = {c: float(table.groupby("layer")[c].max().sum()) + fixed.get(c, 0.0) for c in lo}
    resources = [c for c in ("size_mb", "bops", "latency_ms") if rng.random() < 0.6] or ["size_mb"]
    limits = {c: lo[c] + rng.uniform(0.05, 0.9) * (hi[c] - lo[c]) for c in resources}
    try:
        brute = exhaustive_allocate(table, limits, fixed)
    except BudgetError:
        with pytest.raises(BudgetError):
            ilp_allocate(table, limits, fixed)
        return
    ilp = ilp_allocate(table, limits, fixed)
    assert ilp.score == pytest.approx(brute.score, rel=1e-7, abs=1e-9)
    for c, lim in limits.items():
        assert ilp.costs[c] <= lim * (1 + 1e-9)
    assert set(ilp.choice) == set(table["layer"])


def test_budget_below_smallest_reachable():
    table = random_table(np.random.default_rng(0), 3, 3)
    smallest = smallest_reachable(table, {"size_mb": 0.1})
    with pytest.raises(BudgetError) as e:
        ilp_allocate(table, {"size_mb": smallest["size_mb"] / 2}, {"size_mb": 0.1})
    assert e.value.smallest["size_mb"] == pytest.approx(smallest["size_mb"])
    assert f"{smallest['size_mb']:.6g}" in str(e.value) and "smallest reachable" in str(e.value)


def test_jointly_infeasible_limits():
    table = pd.DataFrame([
        {"layer": "a", "option": "small_slow", "score": 0.0, "size_mb": 1.0, "latency_ms": 10.0},
        {"layer": "a", "option": "big_fast", "score": 0.0, "size_mb": 10.0, "latency_ms": 1.0},
    ])
    with pytest.raises(BudgetError) as e:
        ilp_allocate(table, {"size_mb": 2.0, "latency_ms": 2.0})
    assert "together" in str(e.value) and "size_mb >= 1" in str(e.value)


def test_nan_latency_is_an_error():
    table = pd.DataFrame([{"layer": "a", "option": "x", "score": 0.0, "size_mb": 1.0, "latency_ms": float("nan")}])
    with pytest.raises(ConfigError, match="latency_ms of layer 'a' option 'x' is unknown"):
        ilp_allocate(table, {"latency_ms": 1.0})
    assert ilp_allocate(table, {"size_mb": 2.0}).choice == {"a": "x"}  # unconstrained NaN columns are fine


def test_unlimited_picks_lowest_score():
    table = random_table(np.random.default_rng(3), 4, 4)
    alloc = ilp_allocate(table, {"size_mb": math.inf})
    assert alloc.score == pytest.approx(table.groupby("layer")["score"].min().sum())


def test_frontier():
    table = random_table(np.random.default_rng(5), 5, 4)
    front = sweep_frontier(table, "size_mb", points=10)
    assert len(front) >= 3
    assert front["size_mb"].is_monotonic_increasing
    assert front["score"].is_monotonic_decreasing
    for r in front.to_dict("records"):  # every point is the optimum at its own cost
        best = exhaustive_allocate(table, {"size_mb": r["size_mb"] * (1 + 1e-9)})
        assert r["score"] == pytest.approx(best.score, rel=1e-7, abs=1e-12)
        assert set(json.loads(r["choice"])) == set(table["layer"])


def test_pareto_filter():
    pts = pd.DataFrame({"score": [3, 2, 2.5, 1, 1], "cost": [1, 2, 3, 4, 5]})
    out = pareto_filter(pts, "cost")
    assert out["cost"].tolist() == [1, 2, 4]


def test_solver_registry():
    assert get_solver("ilp") is ilp_allocate
    with pytest.raises(ConfigError, match="unknown solver 'x'; available: ilp, exhaustive"):
        get_solver("x")


@pytest.mark.parametrize("seed", range(12))
def test_tie_break_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    table = random_table(rng, int(rng.integers(2, 5)), 4)
    hi = float(table.groupby("layer")["size_mb"].max().sum())
    limits = {"size_mb": hi * float(rng.uniform(0.5, 1.0))}
    slack = float(rng.uniform(0, 0.5))
    try:
        brute = exhaustive_allocate(table, limits, secondary="latency_ms", slack=slack)
    except BudgetError:
        return
    ilp = ilp_allocate(table, limits, secondary="latency_ms", slack=slack)
    optimum = exhaustive_allocate(table, limits).score
    assert ilp.score <= optimum + slack + 1e-9
    assert ilp.costs["latency_ms"] == pytest.approx(brute.costs["latency_ms"], rel=1e-7)
    assert ilp.stats["optimal_score"] == pytest.approx(optimum, rel=1e-7, abs=1e-12)


def test_tie_break_prefers_faster_equal_option():
    table = pd.DataFrame([
        {"layer": "a", "option": "slow", "score": 1.0, "size_mb": 1.0, "latency_ms": 5.0},
        {"layer": "a", "option": "fast", "score": 1.0, "size_mb": 1.0, "latency_ms": 1.0},
        {"layer": "a", "option": "fast_but_worse", "score": 1.5, "size_mb": 1.0, "latency_ms": 0.5},
    ])
    assert ilp_allocate(table, {"size_mb": 2}, secondary="latency_ms").choice == {"a": "fast"}
    assert ilp_allocate(table, {"size_mb": 2}, secondary="latency_ms", slack=0.6).choice == {"a": "fast_but_worse"}

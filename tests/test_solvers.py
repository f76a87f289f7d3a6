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
    table = random_table(np.random.default_rng(4), 3, 3)
    limits = {"size_mb": float(table.groupby("layer")["size_mb"].mean().sum())}
    assert get_solver("ilp")(table, limits).choice == ilp_allocate(table, limits).choice
    with pytest.raises(ConfigError, match="unknown solver 'x'; available: .*ilp"):
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


# --- issue 4: backends, objectives, caps, restrictions, exact frontiers, greedy, predictors, optuna -----------------
from mpq.solvers import (exhaustive_frontier, frontier_3d, greedy_allocate, hull_frontier, optuna_allocate,  # noqa
                         pareto_allocate, pareto_filter_nd, walk_frontier)


def tied_table(rng, layers, options):
    """Scores from a small set of values (ties within and across layers), costs from a small grid."""
    rows = []
    for l in range(layers):
        for o in range(int(rng.integers(2, options + 1))):
            rows.append({"layer": f"layer{l}", "option": f"w{8 - o}a16" if o else "float",
                         "score": float(rng.choice([0.0, 0.5, 1.0, 1.5])) if o else 0.0,
                         "aux": float(rng.choice([0.0, 1.0, 2.0])),
                         "size_mb": float(rng.choice([1.0, 2.0, 3.0])) * (8 - o) / 8, "bops": 1e9 * (8 - o),
                         "latency_ms": float(rng.choice([0.5, 1.0, 1.5]))})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("backend", ["cbc", "highs"])
@pytest.mark.parametrize("seed", range(15))
def test_backends_match_brute_force_with_ties_caps_and_restrictions(backend, seed):
    rng = np.random.default_rng(1000 + seed)
    table = tied_table(rng, int(rng.integers(2, 6)), 4)
    layers = sorted(set(table["layer"]))
    hi = float(table.groupby("layer")["size_mb"].max().sum())
    kwargs = dict(limits={"size_mb": hi * float(rng.uniform(0.3, 1.0))},
                  objective={"score": 1.0, "aux": float(rng.uniform(0, 1))},
                  caps={"aux": float(rng.uniform(0, 2 * len(layers)))}, min_bits={layers[0]: 7},
                  secondary="latency_ms", slack=float(rng.uniform(0, 0.5)))
    try:
        brute = exhaustive_allocate(table, **kwargs)
    except (BudgetError, ConfigError):
        with pytest.raises((BudgetError, ConfigError)):
            ilp_allocate(table, backend=backend, **kwargs)
        return
    ilp = ilp_allocate(table, backend=backend, **kwargs)
    assert ilp.stats["optimal_score"] == pytest.approx(brute.stats["optimal_score"], abs=1e-9)
    assert ilp.costs["latency_ms"] == pytest.approx(brute.costs["latency_ms"], abs=1e-9)
    assert ilp.choice[layers[0]] in ("float", "w8a16", "w7a16")  # min_bits honoured


def test_restriction_that_empties_a_layer_names_it():
    table = tied_table(np.random.default_rng(0), 3, 3)
    with pytest.raises(ConfigError, match="layer 'layer1' has no option left"):
        ilp_allocate(table, {"size_mb": 100}, allowed={"layer1": ["w2a16"]})


def test_infeasible_caps_report_smallest():
    table = tied_table(np.random.default_rng(1), 3, 3)
    with pytest.raises(BudgetError) as e:
        ilp_allocate(table, caps={"aux": -1.0})
    assert "aux" in str(e.value) and "aux" in e.value.smallest


def _staircase_ok(frontier, exact, resource, rel=1e-6):
    """Every exhaustive frontier point is matched (within solver tolerance) by a point no costlier."""
    for r in exact.itertuples():
        cheaper = frontier[frontier[resource] <= getattr(r, resource) * (1 + 1e-9) + 1e-12]
        assert len(cheaper) and cheaper["score"].min() <= r.score + rel * max(abs(r.score), 1.0), r


@pytest.mark.parametrize("seed", range(8))
def test_walk_frontier_is_the_exhaustive_frontier(seed):
    rng = np.random.default_rng(seed)
    table = random_table(rng, int(rng.integers(2, 6)), 4)
    exact = exhaustive_frontier(table, "size_mb")
    walk, complete = walk_frontier(table, "size_mb", max_points=1000)
    assert complete and walk["exact"].all()
    _staircase_ok(walk, exact, "size_mb")
    _staircase_ok(exact, walk, "size_mb")  # and no walk point beats the true optimum


@pytest.mark.parametrize("seed", range(8))
def test_hull_points_lie_on_the_frontier(seed):
    rng = np.random.default_rng(50 + seed)
    table = random_table(rng, int(rng.integers(2, 6)), 4)
    exact = exhaustive_frontier(table, "latency_ms")
    hull = hull_frontier(table, "latency_ms", points=None)
    for r in hull.itertuples():
        best = exact[exact["latency_ms"] <= r.latency_ms * (1 + 1e-12) + 1e-12]["score"].min()
        assert r.score == pytest.approx(best, rel=1e-9, abs=1e-12)
    # the two ends: best score, and cheapest
    assert hull["score"].min() == pytest.approx(exact["score"].min())
    assert hull["latency_ms"].min() == pytest.approx(exact["latency_ms"].min())


def test_pareto_solver_meets_budget_at_ilp_optimum():
    table = random_table(np.random.default_rng(7), 5, 4)
    hi = float(table.groupby("layer")["latency_ms"].max().sum())
    limits = {"latency_ms": 0.6 * hi}
    alloc = pareto_allocate(table, limits)
    assert alloc.costs["latency_ms"] <= limits["latency_ms"] * (1 + 1e-9)
    assert alloc.score == pytest.approx(exhaustive_allocate(table, limits).score, rel=1e-6, abs=1e-12)
    assert alloc.frontier is not None and alloc.stats["complete"]


def test_frontier_3d_is_non_dominated():
    table = random_table(np.random.default_rng(9), 4, 3)
    f3 = frontier_3d(table, points=6)
    vals = f3[["score", "latency_ms", "size_mb"]].to_numpy()
    for v in vals:
        assert not np.any(np.all(vals <= v, 1) & np.any(vals < v, 1))
    pts = pd.DataFrame({"a": [1, 2, 2, 3], "b": [3, 2, 2, 1], "c": [1, 1, 1, 5]})
    assert len(pareto_filter_nd(pts, ["a", "b", "c"])) == 3


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_feasible_and_not_better_than_ilp(seed):
    rng = np.random.default_rng(seed)
    table = random_table(rng, int(rng.integers(3, 7)), 4)
    hi = float(table.groupby("layer")["size_mb"].max().sum())
    lo = float(table.groupby("layer")["size_mb"].min().sum())
    limits = {"size_mb": lo + 0.4 * (hi - lo)}
    g = greedy_allocate(table, limits)
    assert g.costs["size_mb"] <= limits["size_mb"] * (1 + 1e-9)
    assert g.score >= ilp_allocate(table, limits).score - 1e-9


def _latency_data(n, seed=0):
    """Configs whose 'measured' latency is the additive sum times a penalty per format switch."""
    from mpq.solvers.predictors import _format

    rng = np.random.default_rng(seed)
    layers = [f"l{i}" for i in range(6)]
    opts = ["float", "w8a8", "w8a16", "w4a16g32"]
    table = pd.DataFrame([{"layer": l, "option": o, "score": 0.0, "latency_ms": float(rng.uniform(0.1, 1))}
                          for l in layers for o in opts])
    lat = dict(zip(zip(table.layer, table.option), table.latency_ms))
    choices, measured = [], []
    for _ in range(n):
        c = {l: opts[rng.integers(len(opts))] for l in layers}
        switches = sum(_format(c[a]) != _format(c[b]) for a, b in zip(layers, layers[1:]))
        choices.append(c)
        measured.append(sum(lat[(l, c[l])] for l in layers) * (1 + 0.15 * switches) * rng.uniform(0.99, 1.01))
    return layers, opts, table, choices, np.array(measured)


def test_latency_predictor_learns_what_the_table_misses(tmp_path):
    pytest.importorskip("xgboost")
    from mpq.solvers.predictors import LatencyPredictor, mape

    layers, opts, table, choices, measured = _latency_data(400)
    pred = LatencyPredictor(layers, opts).fit(table, choices[:300], measured[:300])
    test_c, test_m = choices[300:], measured[300:]
    additive = pred._additive(table, test_c)
    assert mape(pred.predict(table, test_c), test_m) < 0.5 * mape(additive, test_m)
    pred.save(tmp_path / "p")
    again = LatencyPredictor.load(tmp_path / "p")
    assert np.allclose(again.predict(table, test_c), pred.predict(table, test_c))


def test_accuracy_predictor_round_trip(tmp_path):
    pytest.importorskip("xgboost")
    from mpq.solvers.predictors import AccuracyPredictor

    rng = np.random.default_rng(0)
    layers = [f"blocks.{i}.fc" for i in range(4)]
    opts = ["float", "w8a8", "w4a16g32"]
    table = pd.DataFrame([{"layer": l, "option": o, "score": float(rng.uniform(0, 1)) * (o != "float"),
                           "score_kl": float(rng.uniform(0, 1)) * (o != "float")} for l in layers for o in opts])
    sc = dict(zip(zip(table.layer, table.option), table.score))
    choices = [{l: opts[rng.integers(3)] for l in layers} for _ in range(200)]
    metric = np.array([sum(sc[(l, c[l])] for l in layers) ** 1.5 for c in choices])
    pred = AccuracyPredictor(layers, opts, ["score", "score_kl"]).fit(table, choices[:150], metric[:150])
    err = np.abs(pred.predict(table, choices[150:]) - metric[150:]).mean()
    assert err < 0.3 * np.abs(metric[150:] - metric[150:].mean()).mean()
    pred.save(tmp_path / "a")
    again = AccuracyPredictor.load(tmp_path / "a")
    assert again.score_columns == ["score", "score_kl"]
    assert np.allclose(again.predict(table, choices[150:]), pred.predict(table, choices[150:]))


def test_optuna_resumes_without_repeating_trials(tmp_path):
    optuna = pytest.importorskip("optuna")
    table = random_table(np.random.default_rng(3), 5, 4)
    hi = float(table.groupby("layer")["size_mb"].max().sum())
    limits = {"size_mb": 0.7 * hi}
    storage = tmp_path / "study.sqlite"
    warm = ilp_allocate(table, limits).choice
    first = optuna_allocate(table, limits, n_trials=12, storage=storage, warm_start=[warm])
    assert first.stats["trials"] == 12 and not first.stats["resumed"]
    study = optuna.load_study(study_name=first.stats["study"], storage=f"sqlite:///{storage}")
    before = [(t.number, t.params) for t in study.trials]
    assert before[0][1] == warm  # the ILP solution was tried first
    second = optuna_allocate(table, limits, n_trials=25, storage=storage)
    assert second.stats["resumed"] and second.stats["new_trials"] == 13 and second.stats["trials"] == 25
    after = optuna.load_study(study_name=second.stats["study"], storage=f"sqlite:///{storage}").trials
    assert [(t.number, t.params) for t in after[:12]] == before
    assert second.costs["size_mb"] <= limits["size_mb"] * (1 + 1e-9)
    assert second.score >= ilp_allocate(table, limits).score - 1e-9


# --- solver status at a time limit (issue 21, item 9) ----------------------------------------------------------------
def _limit_instance():
    table = random_table(np.random.default_rng(11), 6, 4)
    lo, hi = smallest_reachable(table)["size_mb"], float(table.groupby("layer")["size_mb"].max().sum())
    return table, {"size_mb": lo + 0.4 * (hi - lo)}


def _feasible(table, alloc, limits):
    picked = table.set_index(["layer", "option"]).loc[list(alloc.choice.items())]
    return all(picked[c].sum() <= lim * (1 + 1e-9) for c, lim in limits.items())


def test_highs_at_its_time_limit_returns_the_incumbent_or_says_why(monkeypatch):
    """HiGHS reports status 1 when it stops at its time limit: the incumbent, if any, comes back marked
    ``time_limit`` (it used to raise "status 1"); without one, a BudgetError says so and what to do."""
    import scipy.optimize

    from mpq.solvers.ilp import TimeLimitWithoutSolution

    table, limits = _limit_instance()
    real = scipy.optimize.milp

    def stopped(c, with_incumbent):
        def milp(*args, **kwargs):
            res = real(*args, **kwargs)
            res.status, res.message = 1, "Time limit reached"
            if not with_incumbent:
                res.x = None
            return res
        return milp

    monkeypatch.setattr(scipy.optimize, "milp", stopped(None, True))
    alloc = ilp_allocate(table, limits, backend="highs", time_limit=1.0)
    assert alloc.status == "time_limit" and _feasible(table, alloc, limits)
    monkeypatch.setattr(scipy.optimize, "milp", stopped(None, False))
    with pytest.raises(TimeLimitWithoutSolution, match="HiGHS stopped at its time limit of 1 s before it found any"):
        ilp_allocate(table, limits, backend="highs", time_limit=1.0)
    monkeypatch.setattr(scipy.optimize, "milp", real)
    assert ilp_allocate(table, limits, backend="highs", time_limit=60.0).status == "optimal"


def test_cbc_at_its_time_limit_is_not_called_optimal(monkeypatch):
    """PuLP says "Optimal" for a CBC run stopped at its time limit with an incumbent (its solution status is
    LpSolutionIntegerFeasible, as a real run on a 3200-binary instance with timeLimit=2 showed): that is now status
    ``time_limit``; a run stopped without one ("Not Solved") is a BudgetError that says so."""
    import pulp

    from mpq.solvers.ilp import TimeLimitWithoutSolution

    table, limits = _limit_instance()
    real = pulp.LpProblem.solve

    def with_incumbent(self, *args, **kwargs):
        status = real(self, *args, **kwargs)
        self.sol_status = pulp.LpSolutionIntegerFeasible
        return status

    def without(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.status, self.sol_status = pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound
        return self.status

    monkeypatch.setattr(pulp.LpProblem, "solve", with_incumbent)
    alloc = ilp_allocate(table, limits, backend="cbc", time_limit=1.0)
    assert alloc.status == "time_limit" and _feasible(table, alloc, limits)
    monkeypatch.setattr(pulp.LpProblem, "solve", without)
    with pytest.raises(TimeLimitWithoutSolution, match="CBC stopped at its time limit of 1 s"):
        ilp_allocate(table, limits, backend="cbc", time_limit=1.0)
    monkeypatch.setattr(pulp.LpProblem, "solve", real)
    assert ilp_allocate(table, limits, backend="cbc", time_limit=60.0).status == "optimal"


@pytest.mark.parametrize("solver", ["greedy", "optuna", "pareto"])
def test_solvers_no_longer_drop_constraints(solver):
    """greedy, optuna and pareto silently dropped caps (and greedy/optuna the tie-break): now each honours a
    constraint (the result meets it) or refuses it."""
    if solver == "optuna":
        pytest.importorskip("optuna")
    table = tied_table(np.random.default_rng(2), 4, 4)
    caps = {"aux": float(table.groupby("layer")["aux"].min().sum() + 0.5)}
    hi = float(table.groupby("layer")["size_mb"].max().sum())
    opts = {"n_trials": 200} if solver == "optuna" else {}
    alloc = get_solver(solver)(table, {"size_mb": hi}, caps=caps, **opts)
    picked = table.set_index(["layer", "option"]).loc[list(alloc.choice.items())]
    assert picked["aux"].sum() <= caps["aux"] + 1e-9
    if solver == "greedy":
        with pytest.raises(ConfigError, match="does not honour secondary"):
            get_solver(solver)(table, {"size_mb": hi}, secondary="latency_ms", slack=0.1)
    with pytest.raises(ConfigError, match=f"solver '{solver}' has no option 'bogus'"):
        get_solver(solver)(table, {"size_mb": hi}, bogus=1)

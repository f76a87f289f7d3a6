"""Whole-model timings, the learned latency correction, verify-before-choosing and the reachable floor."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mpq.solvers.predictors import (AdditiveLatency, CorrectedLatency, fastest_choice, select_latency_predictor)
from mpq.workers import (Candidate, NoisePolicy, ProfileCache, measure_configs, model_key, reachable_floor,
                         verify_candidates)
from mpq.workers.timing import time_model


class _Work(nn.Module):
    """``reps`` matmuls of a ``dim`` x ``dim`` weight: a layer whose cost the test chooses."""

    def __init__(self, dim: int, reps: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5, requires_grad=False)
        self.reps = reps

    def forward(self, x):
        for _ in range(self.reps):
            x = torch.tanh(x @ self.w)
        return x


def _build(choice):
    """A two-layer model whose option "slow" costs ~40x "fast" (the table below claims the opposite)."""
    return nn.Sequential(*[_Work(256, 40) if choice[l] == "slow" else _Work(256, 1) for l in ("a", "b")]).eval()


X = torch.randn(16, 256)


def test_measure_configs_caches_by_fingerprint_model_and_config(tmp_path):
    store = ProfileCache(tmp_path / "c.sqlite")
    measure = functools.partial(measure_configs, _build, inputs=X, target="cpu", model="two-layer", cache=store,
                                threads=1, warmup=1, repeats=6, rounds=2, min_sample_ms=0.5,
                                policy=NoisePolicy.accept_all())
    choices = [{"a": "fast", "b": "fast"}, {"a": "slow", "b": "fast"}, {"a": "fast", "b": "fast"}]
    rows = measure(choices=choices)
    assert [r["choice"] for r in rows] == choices and [r["source"] for r in rows] == ["measured"] * 3
    assert rows[0]["median_ms"] == rows[2]["median_ms"]  # one config, measured once
    assert rows[1]["median_ms"] > rows[0]["median_ms"]  # 40 matmuls against 1, same machine, same rounds
    assert store.count(table="configs") == 2 and all(r["ref_ms"] > 0 for r in rows)
    again = measure(choices=choices[:2])
    assert [r["source"] for r in again] == ["cache", "cache"]
    assert [r["median_ms"] for r in again] == [r["median_ms"] for r in rows[:2]]
    other = measure_configs(_build, choices[:1], X, "cpu", "another-model", cache=store, threads=1, warmup=1,
                            repeats=3, policy=NoisePolicy.accept_all())
    assert other[0]["source"] == "measured"


def test_model_key_depends_on_shapes_and_inputs_not_values():
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    assert model_key(a, torch.randn(2, 8)) == model_key(b, torch.randn(2, 8))
    assert model_key(a, torch.randn(2, 8)) != model_key(a, torch.randn(3, 8))
    assert model_key(a, torch.randn(2, 8)) != model_key(nn.Linear(8, 5), torch.randn(2, 8))


def test_verify_returns_the_measured_winner_where_the_table_ranks_wrongly():
    fast_ms = time_model(_build({"a": "fast", "b": "fast"}), X, threads=1, repeats=9).median_ms
    budget = 6 * fast_ms  # "slow" has 40x the work of "fast" in layer a
    # the additive table says the "slow" config is the faster one and does less damage
    wrong = Candidate("chosen", {"a": "slow", "b": "fast"}, damage=0.1, predicted_ms=0.5 * fast_ms)
    right = Candidate("neighbour", {"a": "fast", "b": "fast"}, damage=0.2, predicted_ms=2 * fast_ms)
    measure = functools.partial(measure_configs, _build, inputs=X, target="cpu", model="two-layer", cache=False,
                                threads=1, warmup=1, repeats=6, rounds=2, min_sample_ms=0.5)
    verdict = verify_candidates([wrong, right], budget, lambda cs: measure(choices=cs))
    assert verdict.chosen == right
    assert not verdict.row("chosen")["fits"] and verdict.row("neighbour")["fits"]
    assert verdict.row("chosen")["measured_ms"] > budget and verdict.fastest[0] == "neighbour"


def _fake_measure(ms: dict[str, float], spread: float = 0.0):
    def measure(choices):
        return [{"median_ms": ms[c["x"]], "q1_ms": ms[c["x"]] - spread, "q3_ms": ms[c["x"]] + spread}
                for c in choices]
    return measure


def test_config_slower_than_a_fitting_uniform_baseline_with_no_more_damage_is_never_returned():
    cands = [Candidate("mixed", {"x": "mixed"}, 0.30, 1.0), Candidate("u8", {"x": "u8"}, 0.30, 1.2, uniform=True),
             Candidate("u4", {"x": "u4"}, 0.90, 0.8, uniform=True)]
    v = verify_candidates(cands, 2.0, _fake_measure({"mixed": 1.9, "u8": 1.5, "u4": 0.9}))
    assert v.chosen.name == "u8" and v.row("mixed")["dominated_by"] == "u8"
    # less damage than every fitting baseline: the mixed config stands
    cands[0] = Candidate("mixed", {"x": "mixed"}, 0.20, 1.0)
    assert verify_candidates(cands, 2.0, _fake_measure({"mixed": 1.9, "u8": 1.5, "u4": 0.9})).chosen.name == "mixed"


def test_budget_is_met_within_the_measurement_spread():
    cands = [Candidate("a", {"x": "a"}, 0.1, 1.0), Candidate("b", {"x": "b"}, 0.5, 1.0)]
    v = verify_candidates(cands, 1.0, _fake_measure({"a": 1.04, "b": 0.7}, spread=0.05))
    assert v.chosen.name == "a"  # 1.04 ms, half its IQR 0.05: within the budget's reach
    v = verify_candidates(cands, 1.0, _fake_measure({"a": 1.2, "b": 1.3}, spread=0.05))
    assert v.chosen is None and v.fastest == ("a", 1.2) and "no candidate" in v.describe()


def test_reachable_floor_is_the_fastest_measured():
    floor = reachable_floor({"fastest": {"x": "a"}, "uniform-w8a8": {"x": "b"}}, _fake_measure({"a": 0.9, "b": 0.8}))
    assert (floor.name, floor.ms, floor.choice) == ("uniform-w8a8", 0.8, {"x": "b"})


# --- the learned correction, on a table whose truth the test knows ----------------------------------------------------
LAYERS, OPTIONS = [f"l{i}" for i in range(8)], ["float", "w8a8", "w4a16g32"]
SCALE, OVERHEAD, SWITCH, REST = {"float": 1.0, "w8a8": 1.4, "w4a16g32": 0.8}, {"float": 0.0, "w8a8": 0.05,
                                                                               "w4a16g32": 0.02}, 0.03, 0.4


def _table() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = [{"layer": l, "option": o, "latency_ms": float(rng.uniform(0.1, 1.0)) * (1.0 if o == "float" else 0.5)}
            for l in LAYERS for o in OPTIONS]
    return pd.DataFrame(rows)


def _truth(table: pd.DataFrame, choices, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    from mpq.solvers.predictors import _format

    lat = dict(zip(zip(table["layer"], table["option"]), table["latency_ms"]))
    rng = np.random.default_rng(seed)
    out = []
    for c in choices:
        ms = REST + sum(SCALE[c[l]] * lat[(l, c[l])] + OVERHEAD[c[l]] for l in LAYERS)
        ms += SWITCH * sum(_format(c[a]) != _format(c[b]) for a, b in zip(LAYERS, LAYERS[1:]))
        out.append(ms * (1 + noise * rng.standard_normal()))
    return np.array(out)


def test_selection_picks_a_learned_correction_and_says_which():
    table = _table()
    rng = np.random.default_rng(1)
    choices = [{l: OPTIONS[rng.integers(3)] for l in LAYERS} for _ in range(40)]
    sel = select_latency_predictor(table, 0.3, choices, _truth(table, choices), candidates=[
        "additive", "additive+affine", "table+correction"])
    assert sel.name == "table+correction" and sel.scores["table+correction"]["median_pct"] < 3
    assert sel.scores["additive"]["median_pct"] > 10
    assert "table+correction" in sel.describe() and "additive" in sel.describe()
    held = [{l: OPTIONS[rng.integers(3)] for l in LAYERS} for _ in range(20)]
    err = np.abs(sel.predictor.predict(table, held) / _truth(table, held, noise=0) - 1)
    assert np.median(err) < 0.03
    corrected, fixed = sel.predictor.corrected_table(table)
    assert fixed == pytest.approx(REST + SWITCH * 0, abs=0.2) and len(corrected) == len(table)
    assert sel.predictor.switch_ms == pytest.approx(SWITCH, abs=0.02)


def test_selection_keeps_the_table_when_it_is_right():
    table = _table()
    rng = np.random.default_rng(2)
    choices = [{l: OPTIONS[rng.integers(3)] for l in LAYERS} for _ in range(30)]
    lat = dict(zip(zip(table["layer"], table["option"]), table["latency_ms"]))
    measured = [0.3 + sum(lat[(l, c[l])] for l in LAYERS) for c in choices]
    sel = select_latency_predictor(table, 0.3, choices, measured, candidates=["additive", "table+correction"])
    assert sel.name == "additive" and sel.scores["additive"]["median_pct"] < 1e-6


def test_selection_needs_measured_configs():
    with pytest.raises(ValueError, match="at least 4 measured configs"):
        select_latency_predictor(_table(), 0.0, [{l: "float" for l in LAYERS}], [1.0])
    with pytest.raises(ValueError, match="unknown latency predictor.*allowed: additive"):
        select_latency_predictor(_table(), 0.0, [{l: "float" for l in LAYERS}] * 4, [1.0] * 4, candidates=["nn"])


def test_fastest_choice_matches_brute_force():
    table = _table()
    small = table[table["layer"].isin(LAYERS[:5])]
    for predictor in (AdditiveLatency(0.1), CorrectedLatency(0.1)):
        if isinstance(predictor, CorrectedLatency):
            rng = np.random.default_rng(4)
            choices = [{l: OPTIONS[rng.integers(3)] for l in LAYERS[:5]} for _ in range(40)]
            lat = dict(zip(zip(small["layer"], small["option"]), small["latency_ms"]))
            # format switches cost more than a layer's difference: the separable optimum is not the true one
            measured = [sum(lat[(l, c[l])] for l in LAYERS[:5]) + 0.5 * sum(
                c[a] != c[b] for a, b in zip(LAYERS[:5], LAYERS[1:5])) for c in choices]
            predictor.fit(small, choices, measured)
        every = [dict(zip(LAYERS[:5], combo)) for combo in itertools.product(OPTIONS, repeat=5)]
        best = float(np.min(predictor.predict(small, every)))
        found = float(predictor.predict(small, [fastest_choice(small, predictor)])[0])
        assert found == pytest.approx(best, rel=1e-6)

"""Verify before choosing: the candidates a search would return are measured end to end, and the measurement, not
the prediction, decides.

:func:`verify_candidates` takes the solver's choice, its nearest frontier neighbours and the uniform baselines
(each with its predicted damage and latency), measures them with the caller's ``measure`` (normally
:func:`mpq.workers.endtoend.measure_configs`) and returns the least-damage one whose measured latency meets the
budget within its measurement spread. A config measured slower than a uniform baseline that also fits the budget
with no more predicted damage is never returned. :func:`reachable_floor` measures the fastest configs there are
(the predictor's fastest and the uniform ones), so that an infeasible budget is reported with the smallest
latency actually reached, not the table's guess.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

Measure = Callable[[list[Mapping[str, str]]], list[Mapping[str, Any]]]


@dataclass(frozen=True)
class Candidate:
    """A config a search could return: ``damage`` is its predicted damage (lower is better, e.g. the summed
    sensitivity score), ``predicted_ms`` its predicted latency, ``uniform`` whether it is a uniform baseline."""

    name: str
    choice: Mapping[str, str]
    damage: float
    predicted_ms: float
    uniform: bool = False


@dataclass
class Verdict:
    """What verification measured and chose. ``chosen`` is None when no candidate meets the budget; ``fastest``
    is the fastest measured candidate either way; ``rows`` has one dict per candidate."""

    chosen: Candidate | None
    budget_ms: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    fastest: tuple[str, float] | None = None

    def row(self, name: str) -> dict[str, Any]:
        return next(r for r in self.rows if r["name"] == name)

    def describe(self) -> str:
        if self.chosen is None:
            return (f"no candidate measured within {self.budget_ms:.4g} ms; fastest measured: {self.fastest[0]} "
                    f"{self.fastest[1]:.4g} ms")
        r = self.row(self.chosen.name)
        return (f"verified: {self.chosen.name} measured {r['measured_ms']:.4g} ms (predicted "
                f"{r['predicted_ms']:.4g} ms) within the budget {self.budget_ms:.4g} ms")


def _margin(row: Mapping[str, Any], budget_ms: float, max_over: float) -> float:
    """How far over the budget a measured median may be and still fit: half its interquartile range, but never
    more than ``max_over`` of the budget (a measurement on a busy machine spreads widely)."""
    q1, q3 = row.get("q1_ms"), row.get("q3_ms")
    half_iqr = 0.0 if q1 is None or q3 is None else max(0.0, (float(q3) - float(q1)) / 2)
    return min(half_iqr, max_over * budget_ms)


def verify_candidates(candidates: Sequence[Candidate], budget_ms: float, measure: Measure,
                      max_over: float = 0.05) -> Verdict:
    """Measure every candidate and return the least-damage one whose *measured* latency meets ``budget_ms``
    within its spread (median at most the budget plus half its IQR, and at most ``max_over`` over); ties in
    damage go to the faster. A candidate measured slower than a fitting uniform baseline of no more damage is
    excluded (``dominated_by`` names the baseline)."""
    return _decide(candidates, _measured_rows(candidates, budget_ms, measure, max_over), budget_ms)


def _measured_rows(candidates: Sequence[Candidate], budget_ms: float, measure: Measure, max_over: float
                   ) -> list[dict[str, Any]]:
    if not candidates:
        raise ValueError("verify_candidates needs at least one candidate")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    measured = measure([dict(c.choice) for c in candidates])
    if len(measured) != len(candidates):
        raise ValueError(f"measure returned {len(measured)} rows for {len(candidates)} candidates")
    rows = []
    for c, m in zip(candidates, measured):
        ms = float(m["median_ms"])
        rows.append({"name": c.name, "damage": c.damage, "predicted_ms": c.predicted_ms, "measured_ms": ms,
                     "q1_ms": m.get("q1_ms"), "q3_ms": m.get("q3_ms"), "uniform": c.uniform,
                     "trusted": m.get("trusted"), "fits": ms - _margin(m, budget_ms, max_over) <= budget_ms,
                     "dominated_by": None,
                     "prediction_error_pct": 100 * (c.predicted_ms - ms) / ms})
    return rows


def verify_columns(candidates: Sequence[Candidate], budgets: Mapping[str, float], measures: Mapping[str, Measure],
                   predicted: Mapping[str, Sequence[float]], max_over: float = 0.05) -> Verdict:
    """:func:`verify_candidates` for several latency limits at once (the calibration batch, decode, prefill: each
    column measured at its own input by ``measures[column]``, its candidates predicted at ``predicted[column]``).
    A candidate fits when it meets every limit by measurement; a uniform baseline that fits them all with no more
    damage and measures faster at every one excludes it. Rows carry the first column's numbers (as
    :func:`verify_candidates`'s) and ``columns``: each column's measured and predicted latency and fit."""
    if not budgets:
        raise ValueError("verify_columns needs at least one latency limit")
    per = {}
    for col, limit in budgets.items():
        at = [replace(c, predicted_ms=float(p)) for c, p in zip(candidates, predicted[col])]
        per[col] = _measured_rows(at, limit, measures[col], max_over)
    first = next(iter(budgets))
    rows = []
    for i, c in enumerate(candidates):
        cols = {col: {k: per[col][i][k] for k in _PER_COLUMN} for col in budgets}
        rows.append({**per[first][i], "fits": all(v["fits"] for v in cols.values()),
                     "trusted": all(bool(v["trusted"]) for v in cols.values()), "columns": cols})
    return _decide(candidates, rows, budgets[first])


_PER_COLUMN = ("measured_ms", "predicted_ms", "q1_ms", "q3_ms", "fits", "trusted", "prediction_error_pct")


def _faster_everywhere(u: Mapping[str, Any], r: Mapping[str, Any]) -> bool:
    cols = u.get("columns")
    if not cols:
        return u["measured_ms"] < r["measured_ms"]
    return all(cols[c]["measured_ms"] < r["columns"][c]["measured_ms"] for c in cols)


def _decide(candidates: Sequence[Candidate], rows: list[dict[str, Any]], budget_ms: float) -> Verdict:
    """The least-damage fitting candidate no fitting uniform baseline of no more damage beats on every measured
    latency (ties in damage to the faster); ``fastest`` by the first column."""
    baselines = [r for r in rows if r["uniform"] and r["fits"]]
    for r in rows:
        if r["uniform"]:
            continue
        beaten = [u for u in baselines if u["damage"] <= r["damage"] and _faster_everywhere(u, r)]
        if beaten:
            r["dominated_by"] = min(beaten, key=lambda u: (u["damage"], u["measured_ms"]))["name"]
    eligible = [r for r in rows if r["fits"] and r["dominated_by"] is None]
    fastest = min(rows, key=lambda r: r["measured_ms"])
    verdict = Verdict(None, budget_ms, rows, (fastest["name"], fastest["measured_ms"]))
    if eligible:
        best = min(eligible, key=lambda r: (r["damage"], r["measured_ms"]))
        verdict.chosen = candidates[[c.name for c in candidates].index(best["name"])]
    for r in rows:
        r["chosen"] = verdict.chosen is not None and r["name"] == verdict.chosen.name
    log.info(verdict.describe())
    return verdict


@dataclass(frozen=True)
class Floor:
    """The smallest latency measured among the fastest configs: ``name`` and ``choice`` of the one that reached it,
    and every measured latency by name."""

    ms: float
    name: str
    choice: Mapping[str, str]
    measured: Mapping[str, float]


def reachable_floor(configs: Mapping[str, Mapping[str, str]], measure: Measure) -> Floor:
    """Measure ``configs`` (name -> choice: the predictor's fastest config, see
    :func:`mpq.solvers.predictors.fastest_choice`, and the uniform configs) and return the fastest: the smallest
    reachable latency a :class:`~mpq.errors.BudgetError` reports."""
    if not configs:
        raise ValueError("reachable_floor needs at least one config")
    names = list(configs)
    rows = measure([dict(configs[n]) for n in names])
    measured = {n: float(r["median_ms"]) for n, r in zip(names, rows)}
    best = min(measured, key=measured.get)
    return Floor(measured[best], best, dict(configs[best]), measured)

"""The result type and what every solver shares: table checks, restrictions, objectives, reachable costs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from mpq.errors import BudgetError, ConfigError

COST_COLUMNS = ("size_mb", "bops", "latency_ms")
_UNITS = {"size_mb": "MB", "bops": "BOPs", "latency_ms": "ms"}


@dataclass(frozen=True)
class Allocation:
    """One choice per layer, its total score and costs (fixed costs included), and how it was found.

    ``frontier`` is set by solvers that find several allocations (Pareto, Optuna): one row per point.
    """

    choice: Mapping[str, str]  # layer -> option name
    score: float
    costs: Mapping[str, float]
    solver: str
    status: str = "optimal"
    stats: Mapping[str, Any] = field(default_factory=dict)
    frontier: pd.DataFrame | None = field(default=None, compare=False, repr=False)

    def to_row(self) -> dict[str, Any]:
        return {"score": self.score, **self.costs, "solver": self.solver, "status": self.status}


def check_table(table: pd.DataFrame, columns: Iterable[str] = ()) -> pd.DataFrame:
    """Validate a score/cost table: layer, option, score, and every column in ``columns`` known (no NaN)."""
    missing = {"layer", "option", "score"} - set(table.columns)
    if missing:
        raise ConfigError(f"solver table lacks columns {sorted(missing)}; it needs layer, option, score and costs")
    for col in columns:
        if col not in table.columns:
            raise ConfigError(f"the solver needs column {col!r} but the table has none; columns: "
                              f"{list(table.columns)}")
        bad = table[table[col].isna()]
        if len(bad):
            r = bad.iloc[0]
            raise ConfigError(f"{col} of layer {r['layer']!r} option {r['option']!r} is unknown (NaN): profile it "
                              f"before constraining {col}")
    if table["score"].isna().any():
        r = table[table["score"].isna()].iloc[0]
        raise ConfigError(f"score of layer {r['layer']!r} option {r['option']!r} is NaN")
    if table.duplicated(["layer", "option"]).any():
        r = table[table.duplicated(["layer", "option"])].iloc[0]
        raise ConfigError(f"layer {r['layer']!r} option {r['option']!r} appears twice in the solver table")
    return table


def _bits_of(option: str) -> int:
    from mpq.config import LayerBits

    return LayerBits.parse(option).w_bits or 32


def restrict(table: pd.DataFrame, allowed: Mapping[str, Iterable[str]] | None = None,
             pinned: Mapping[str, str] | None = None, min_bits: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Rows a layer may take: ``allowed`` options per layer, ``pinned`` to one option, at least ``min_bits`` weight
    bits (float counts as 32). A layer left with no option is an error that names it."""
    keep = pd.Series(True, index=table.index)
    for layer, opts in (allowed or {}).items():
        keep &= (table["layer"] != layer) | table["option"].isin(set(opts))
    for layer, opt in (pinned or {}).items():
        keep &= (table["layer"] != layer) | (table["option"] == opt)
    for layer, bits in (min_bits or {}).items():
        keep &= (table["layer"] != layer) | (table["option"].map(_bits_of) >= bits)
    out = table[keep]
    emptied = sorted(set(table["layer"]) - set(out["layer"]))
    if emptied:
        layer = emptied[0]
        had = sorted(table.loc[table["layer"] == layer, "option"])
        raise ConfigError(f"layer {layer!r} has no option left after the restrictions (it had {had}; "
                          f"allowed={dict(allowed or {}).get(layer)}, pinned={dict(pinned or {}).get(layer)}, "
                          f"min_bits={dict(min_bits or {}).get(layer)})")
    return out.reset_index(drop=True)


def objective_values(table: pd.DataFrame, objective: str | Mapping[str, float] = "score") -> np.ndarray:
    """The objective per row: one column, or a weighted sum of columns (e.g. several estimators' scores)."""
    weights = {objective: 1.0} if isinstance(objective, str) else dict(objective)
    check_table(table, weights)
    return sum(float(w) * table[c].astype(float).to_numpy() for c, w in weights.items())


def smallest_reachable(table: pd.DataFrame, fixed: Mapping[str, float] | None = None,
                       columns: Iterable[str] = COST_COLUMNS) -> dict[str, float]:
    """For each column, the smallest total any allocation reaches (each column on its own)."""
    fixed = fixed or {}
    return {col: float(table.groupby("layer", sort=False)[col].min().sum()) + fixed.get(col, 0.0)
            for col in columns if col in table.columns and not table[col].isna().any()}


def largest_reachable(table: pd.DataFrame, fixed: Mapping[str, float] | None = None,
                      columns: Iterable[str] = COST_COLUMNS) -> dict[str, float]:
    fixed = fixed or {}
    return {col: float(table.groupby("layer", sort=False)[col].max().sum()) + fixed.get(col, 0.0)
            for col in columns if col in table.columns and not table[col].isna().any()}


def check_reachable(table: pd.DataFrame, limits: Mapping[str, float], fixed: Mapping[str, float] | None) -> None:
    """Raise :class:`BudgetError` if a limit is below what any allocation can reach."""
    smallest = smallest_reachable(table, fixed, list(COST_COLUMNS) + [c for c in limits if c not in COST_COLUMNS])
    below = {c: lim for c, lim in limits.items() if not math.isinf(lim) and lim < smallest.get(c, -math.inf) - 1e-12}
    if below:
        parts = [f"{c} <= {lim:.6g} {_UNITS.get(c, '')} is below the smallest reachable {smallest[c]:.6g} "
                 f"{_UNITS.get(c, '')}".replace("  ", " ") for c, lim in below.items()]
        raise BudgetError("budget cannot be met: " + "; ".join(parts), smallest)


def totals_of(table: pd.DataFrame, choice: Mapping[str, str], fixed: Mapping[str, float] | None = None
              ) -> tuple[float, dict[str, float]]:
    idx = table.set_index(["layer", "option"])
    picked = idx.loc[list(choice.items())]
    costs = {c: float(picked[c].sum()) + (fixed or {}).get(c, 0.0) for c in COST_COLUMNS if c in idx.columns}
    return float(picked["score"].sum()), costs


def finite_limits(limits: Mapping[str, float] | None) -> dict[str, float]:
    return {c: float(v) for c, v in (limits or {}).items() if not math.isinf(float(v))}

"""The result type and the checks every solver shares."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import pandas as pd

from mpq.errors import BudgetError, ConfigError

COST_COLUMNS = ("size_mb", "bops", "latency_ms")
_UNITS = {"size_mb": "MB", "bops": "BOPs", "latency_ms": "ms"}


@dataclass(frozen=True)
class Allocation:
    """One choice per layer, its total score and costs (fixed costs included), and how it was found."""

    choice: Mapping[str, str]  # layer -> option name
    score: float
    costs: Mapping[str, float]
    solver: str
    status: str = "optimal"
    stats: Mapping[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {"score": self.score, **self.costs, "solver": self.solver, "status": self.status}


def check_table(table: pd.DataFrame, limits: Mapping[str, float]) -> pd.DataFrame:
    """Validate a score/cost table and return it indexed by (layer, option)."""
    missing = {"layer", "option", "score"} - set(table.columns)
    if missing:
        raise ConfigError(f"solver table lacks columns {sorted(missing)}; it needs layer, option, score and costs")
    for col, lim in limits.items():
        if math.isinf(lim):  # a zero "limit" marks a column that must be known without constraining it
            continue
        if col not in table.columns:
            raise ConfigError(f"budget limits {col!r} but the cost table has no such column; columns: "
                              f"{[c for c in table.columns if c in COST_COLUMNS]}")
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


def smallest_reachable(table: pd.DataFrame, fixed: Mapping[str, float] | None = None) -> dict[str, float]:
    """For each cost column, the smallest total any allocation reaches (each resource on its own)."""
    fixed = fixed or {}
    out = {}
    for col in COST_COLUMNS:
        if col in table.columns and not table[col].isna().any():
            out[col] = float(table.groupby("layer", sort=False)[col].min().sum()) + fixed.get(col, 0.0)
    return out


def largest_reachable(table: pd.DataFrame, fixed: Mapping[str, float] | None = None) -> dict[str, float]:
    fixed = fixed or {}
    return {col: float(table.groupby("layer", sort=False)[col].max().sum()) + fixed.get(col, 0.0)
            for col in COST_COLUMNS if col in table.columns and not table[col].isna().any()}


def check_reachable(table: pd.DataFrame, limits: Mapping[str, float], fixed: Mapping[str, float] | None) -> None:
    """Raise :class:`BudgetError` if a limit is below what any allocation can reach."""
    smallest = smallest_reachable(table, fixed)
    below = {c: lim for c, lim in limits.items() if not math.isinf(lim) and lim < smallest.get(c, -math.inf) - 1e-12}
    if below:
        parts = [f"{c} <= {lim:.6g} {_UNITS.get(c, '')} is below the smallest reachable {smallest[c]:.6g} "
                 f"{_UNITS.get(c, '')}" for c, lim in below.items()]
        raise BudgetError("budget cannot be met: " + "; ".join(parts), smallest)


def totals_of(table: pd.DataFrame, choice: Mapping[str, str], fixed: Mapping[str, float] | None = None
              ) -> tuple[float, dict[str, float]]:
    idx = table.set_index(["layer", "option"])
    picked = idx.loc[list(choice.items())]
    costs = {c: float(picked[c].sum()) + (fixed or {}).get(c, 0.0) for c in COST_COLUMNS if c in idx.columns}
    return float(picked["score"].sum()), costs

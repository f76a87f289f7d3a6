"""The solver plug-in (:class:`Solver`, :func:`register_solver`), the problem it solves (:class:`Problem`), the
result type (:class:`Allocation`) and what every solver shares: table checks, restrictions, objectives, reachable
costs.

A solver declares the constraints it honours (:attr:`Solver.honours`); a problem that uses any other is refused
with an error naming the constraint and the solvers that honour it, so no limit a user set is dropped silently.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np
import pandas as pd

from mpq.config import Choice
from mpq.errors import BudgetError, ConfigError
from mpq.plugins import SOLVERS, check_options

COST_COLUMNS = ("size_mb", "bops", "latency_ms")
_UNITS = {"size_mb": "MB", "bops": "BOPs", "latency_ms": "ms"}


@dataclass(frozen=True)
class Allocation:
    """One choice per layer, its total score and costs (fixed costs included), and how it was found.

    ``frontier`` is set by solvers that find several allocations (Pareto, Optuna): one row per point.
    """

    choice: Choice  # layer -> option name
    score: float
    costs: Mapping[str, float]
    solver: str
    status: str = "optimal"  # "optimal", "feasible" (a heuristic's), "time_limit" (best found when time ran out)
    stats: Mapping[str, Any] = field(default_factory=dict)
    frontier: pd.DataFrame | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.choice, Choice):
            object.__setattr__(self, "choice", Choice(self.choice))

    @property
    def key(self) -> str:
        return self.choice.key

    def to_row(self) -> dict[str, Any]:
        return {"score": self.score, **self.costs, "solver": self.solver, "status": self.status}


# --------------------------------------------------------------------------------------------------------------------
# the problem and the plug-in base
# --------------------------------------------------------------------------------------------------------------------
CONSTRAINTS = ("limits", "caps", "allowed", "pinned", "min_bits", "secondary", "objective")


@dataclass(frozen=True)
class Problem:
    """What to solve, over a plain table (a row per (layer, option) with ``score`` and cost columns).

    ``limits``: column -> limit on ``sum(column) + fixed[column]`` (inf or absent: none); ``caps``: further
    ``sum(column) <= cap`` rows on any column (e.g. one metric's damage); ``allowed``/``pinned``/``min_bits``: per
    layer restrictions; ``objective``: a column or ``{column: weight}``; ``secondary``: among allocations within
    ``slack`` of the best objective, the cheapest in this column.
    """

    table: pd.DataFrame
    limits: Mapping[str, float] = field(default_factory=dict)
    fixed: Mapping[str, float] = field(default_factory=dict)
    objective: str | Mapping[str, float] = "score"
    caps: Mapping[str, float] = field(default_factory=dict)
    allowed: Mapping[str, Iterable[str]] = field(default_factory=dict)
    pinned: Mapping[str, str] = field(default_factory=dict)
    min_bits: Mapping[str, int] = field(default_factory=dict)
    secondary: str | None = None
    slack: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.table, pd.DataFrame):
            raise ConfigError(f"a solver problem needs a pandas table, got {type(self.table).__name__}")
        for name in ("limits", "fixed", "caps", "allowed", "pinned", "min_bits"):
            value = getattr(self, name)
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"solver option {name!r} must be a mapping, got {value!r}")
            object.__setattr__(self, name, MappingProxyType(dict(value)))
        for name in ("limits", "caps"):
            for col, v in getattr(self, name).items():
                if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
                    raise ConfigError(f"{name}[{col!r}] = {v!r} must be a number (inf for none)")
        if not isinstance(self.slack, (int, float)) or self.slack < 0 or math.isnan(self.slack):
            raise ConfigError(f"slack {self.slack!r} must be a non-negative number")
        if not (isinstance(self.objective, str) or isinstance(self.objective, Mapping)):
            raise ConfigError(f"objective must be a column or {{column: weight}}, got {self.objective!r}")

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def constraints_used(self) -> set[str]:
        """Which of :data:`CONSTRAINTS` this problem uses (a constraint set to nothing is not used)."""
        used = set()
        if finite_limits(self.limits):
            used.add("limits")
        for name in ("caps", "allowed", "pinned", "min_bits"):
            if (finite_limits(self.caps) if name == "caps" else getattr(self, name)):
                used.add(name)
        if self.secondary is not None:
            used.add("secondary")
        if self.objective != "score":
            used.add("objective")
        return used


class Solver(ABC):
    """Plug-in base: implement :meth:`solve` over a :class:`Problem`; declare :attr:`honours`.

    Options are the subclass's ``__init__`` keyword arguments (an unknown one is an error naming the known ones);
    :meth:`allocate` refuses a problem that uses a constraint the solver does not honour.
    """

    name: ClassVar[str]
    honours: ClassVar[frozenset[str]] = frozenset({"limits"})
    exact: ClassVar[bool] = False  # whether solve() returns the optimum (tested against brute force)

    @abstractmethod
    def solve(self, problem: Problem) -> Allocation:
        """One option per layer for ``problem``; a :class:`~mpq.errors.BudgetError` when none meets its limits."""

    def allocate(self, problem: Problem) -> Allocation:
        unsupported = sorted(problem.constraints_used() - set(self.honours))
        if unsupported:
            takers = [n for n, cls in SOLVERS.items() if set(unsupported) <= set(cls.honours)]
            raise ConfigError(f"solver {self.name!r} does not honour {', '.join(unsupported)} (it honours "
                              f"{', '.join(sorted(self.honours))}); solvers that do: {', '.join(takers) or 'none'}")
        return self.solve(problem)

    @classmethod
    def create(cls, **options: Any) -> Solver:
        check_options("solver", cls.name, cls, options)
        return cls(**options)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Refuse, before anything runs, ``solver_options`` this solver cannot take: keys that are neither its
        own options nor :class:`Problem` fields, and constraints it does not honour."""
        problem_options, own = split_options(options)
        check_options("solver", cls.name, cls, own)
        wanted = {k for k, v in problem_options.items() if v not in (None, {}, "score")} - {"slack"}
        if problem_options.get("slack") and "secondary" not in cls.honours:
            wanted.add("secondary")
        unsupported = sorted(wanted - set(cls.honours))
        if unsupported:
            takers = [n for n, c in SOLVERS.items() if set(unsupported) <= set(c.honours)]
            raise ConfigError(f"solver {cls.name!r} does not honour {', '.join(unsupported)} (it honours "
                              f"{', '.join(sorted(cls.honours))}); solvers that do: {', '.join(takers) or 'none'}")

    def __repr__(self) -> str:
        return f"<solver {self.name}>"


def register_solver(cls: type[Solver]) -> type[Solver]:
    """Class decorator: make ``cls`` available as ``solver=cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Solver)):
        raise ConfigError(f"register_solver takes a Solver subclass, got {cls!r}")
    unknown = set(cls.honours) - set(CONSTRAINTS)
    if unknown:
        raise ConfigError(f"solver {cls.name!r} declares unknown constraints {sorted(unknown)}; known: "
                          f"{', '.join(CONSTRAINTS)}")
    return SOLVERS.add(cls.name, cls)


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``solver_options`` as a user gives them, split into :class:`Problem` fields and the solver's own options."""
    problem_keys = set(Problem.fields()) - {"table", "limits", "fixed"}
    return ({k: v for k, v in options.items() if k in problem_keys},
            {k: v for k, v in options.items() if k not in problem_keys})


def solve_table(solver: str | Solver, table: pd.DataFrame, limits: Mapping[str, float] | None = None,
                fixed: Mapping[str, float] | None = None, **options: Any) -> Allocation:
    """The plain-table form: ``options`` mixes :class:`Problem` fields and the solver's own options."""
    problem_options, solver_options = split_options(options)
    if isinstance(solver, Solver):
        if solver_options:
            raise ConfigError(f"options {sorted(solver_options)} given with a ready {solver!r}: pass them to it")
        instance = solver
    else:
        instance = SOLVERS.get(solver).create(**solver_options)
    problem = Problem(table, limits or {}, fixed or {}, **problem_options)
    return instance.allocate(problem)


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


def cost_columns(table: pd.DataFrame) -> list[str]:
    """The table's cost columns: size, BOPs, latency, and one latency column per phase (``latency_ms@1``, ...)."""
    return [c for c in table.columns if c in COST_COLUMNS or "_ms@" in c]


def totals_of(table: pd.DataFrame, choice: Mapping[str, str], fixed: Mapping[str, float] | None = None
              ) -> tuple[float, dict[str, float]]:
    idx = table.set_index(["layer", "option"])
    picked = idx.loc[list(choice.items())]
    costs = {c: float(picked[c].sum()) + (fixed or {}).get(c, 0.0) for c in cost_columns(table)}
    return float(picked["score"].sum()), costs


def finite_limits(limits: Mapping[str, float] | None) -> dict[str, float]:
    return {c: float(v) for c, v in (limits or {}).items() if not math.isinf(float(v))}

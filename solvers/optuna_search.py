"""Multi-objective search with Optuna: NSGA-II (default) or TPE over each layer's option.

Two objectives, both minimised: the predicted damage (the summed score, or an :class:`AccuracyPredictor`) and the
main cost (latency from the table or a :class:`LatencyPredictor`, else size). Budgets become Optuna constraints
(``cost - limit <= 0``), so infeasible trials steer the sampler without being picked. The study lives in an RDB
storage (a SQLite file in the run directory), so an interrupted search resumes where it stopped: trials already
finished are not run again. ILP solutions are enqueued first (warm start).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from mpq.config import choice_key
from mpq.errors import BudgetError, ConfigError
from mpq.solvers.base import (COST_COLUMNS, Allocation, Problem, Solver, check_reachable, check_table, finite_limits,
                              objective_values, register_solver, restrict, totals_of)

SAMPLERS = ("nsga2", "tpe")

log = logging.getLogger(__name__)


def _optuna():
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConfigError("the Optuna solver needs optuna: pip install 'mpq[solvers]'") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def study_key(table: pd.DataFrame, limits: Mapping[str, float], caps: Mapping[str, float],
              objective: str | Mapping[str, float], sampler: str, seed: int, main: str) -> str:
    """What a study was made for, as a short hash: the space (layers, options, every column's values), the limits,
    caps and objective. Trials of a study made for something else are not this search's trials."""
    h = hashlib.sha1()
    h.update(pd.util.hash_pandas_object(table.sort_values(["layer", "option"]).reset_index(drop=True),
                                        index=False).to_numpy().tobytes())
    h.update(json.dumps({"columns": sorted(table.columns), "limits": dict(sorted(limits.items())),
                         "caps": dict(sorted(caps.items())), "sampler": sampler, "seed": seed, "main": main,
                         "objective": objective if isinstance(objective, str) else dict(sorted(objective.items()))},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def _open_study(optuna, storage, name: str, sampler):
    """The study ``name`` in ``storage`` (created if new); a file that is not an Optuna database is an error that
    names it instead of a database driver's traceback."""
    url = None if storage is None else (storage if "://" in str(storage) else f"sqlite:///{Path(storage)}")
    try:
        return optuna.create_study(directions=["minimize", "minimize"], sampler=sampler, storage=url,
                                   study_name=name, load_if_exists=True)
    except Exception as e:  # sqlalchemy/sqlite errors of a damaged or foreign file
        if storage is None or type(e).__module__.split(".")[0] not in ("sqlalchemy", "sqlite3", "optuna"):
            raise
        raise ConfigError(f"the Optuna study file {storage} cannot be opened ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}): it is not an Optuna database or is damaged; move it "
                          f"away (the search starts a new study) or give another run directory") from None


def optuna_allocate(table: pd.DataFrame, limits: Mapping[str, float] | None = None,
                    fixed: Mapping[str, float] | None = None, n_trials: int = 300, sampler: str = "nsga2",
                    storage: str | Path | None = None, study_name: str = "mpq", seed: int = 0,
                    objective: str | Mapping[str, float] = "score",
                    damage_fn: Callable[[Sequence[Mapping[str, str]]], np.ndarray] | None = None,
                    cost_fn: Callable[[Sequence[Mapping[str, str]]], np.ndarray] | None = None,
                    warm_start: Iterable[Mapping[str, str]] = (), timeout: float | None = None,
                    allowed=None, pinned=None, min_bits=None, progress: bool = False,
                    caps: Mapping[str, float] | None = None, secondary: str | None = None,
                    slack: float = 0.0) -> Allocation:
    """Search ``n_trials`` configs (counting those a resumed study already has); the chosen config is the
    lowest-damage feasible trial (with ``secondary``: the cheapest in that column among feasible trials within
    ``slack`` of it), and the frontier of feasible trials is attached. Limits and caps are constraints."""
    optuna = _optuna()
    t0 = time.perf_counter()
    limits, caps, fixed = finite_limits(limits), finite_limits(caps), dict(fixed or {})
    bounded = {**limits, **caps}
    table = restrict(table, allowed, pinned, min_bits)
    check_table(table, [*bounded, *([secondary] if secondary else [])])
    check_reachable(table, bounded, fixed)
    obj = dict(zip(zip(table["layer"], table["option"]), objective_values(table, objective)))
    layers = list(dict.fromkeys(table["layer"]))
    options = {l: list(table.loc[table["layer"] == l, "option"]) for l in layers}
    main = "latency_ms" if "latency_ms" in table and not table["latency_ms"].isna().any() else "size_mb"
    wanted = {*COST_COLUMNS, *bounded, *([secondary] if secondary else [])}
    columns = {c: dict(zip(zip(table["layer"], table["option"]), table[c].astype(float)))
               for c in wanted if c in table and not table[c].isna().any()}

    def total(col: str, choice: Mapping[str, str]) -> float:
        return sum(columns[col][(l, choice[l])] for l in layers) + fixed.get(col, 0.0)

    def evaluate(choice: Mapping[str, str]) -> tuple[float, float]:
        damage = float(damage_fn([choice])[0]) if damage_fn else sum(obj[(l, choice[l])] for l in layers)
        cost = float(cost_fn([choice])[0]) + fixed.get(main, 0.0) if cost_fn else total(main, choice)
        return damage, cost

    def violations(choice: Mapping[str, str], cost: float) -> dict[str, float]:
        return {c: (cost if c == main and cost_fn else total(c, choice)) - lim for c, lim in bounded.items()}

    # Optuna 5 takes constraints from the trial (set_constraint); older releases from a sampler callback.
    new_api = hasattr(optuna.trial.Trial, "set_constraint")

    def trial_fn(trial) -> tuple[float, float]:
        choice = {l: trial.suggest_categorical(l, options[l]) for l in layers}
        damage, cost = evaluate(choice)
        named = violations(choice, cost)
        trial.set_user_attr("constraints", list(named.values()) or [0.0])
        if new_api:
            for name, value in (named or {"none": 0.0}).items():
                trial.set_constraint(name, value)
        return damage, cost

    def constraints(frozen) -> list[float]:
        return frozen.user_attrs.get("constraints", [0.0])

    kwargs = {} if new_api else {"constraints_func": constraints}
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown Optuna sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    samp = optuna.samplers.NSGAIISampler(seed=seed, **kwargs) if sampler == "nsga2" else \
        optuna.samplers.TPESampler(seed=seed, multivariate=True, **kwargs)
    key = study_key(table, limits, caps, objective, sampler, seed, main)
    study = _open_study(optuna, storage, f"{study_name}-{key}", samp)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not study.trials:
        for choice in warm_start:
            study.enqueue_trial({l: choice[l] for l in layers})
    remaining = max(n_trials - len(done), 0)
    if remaining:
        study.optimize(trial_fn, n_trials=remaining, timeout=timeout, show_progress_bar=progress)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # feasibility from the table as it is now, not from what a trial recorded when it ran
    feasible = [t for t in trials if set(t.params) == set(layers) and all(
        t.params[l] in options[l] for l in layers) and all(
        v <= 1e-12 * max(abs(bounded[c]), 1.0) for c, v in violations(t.params, t.values[1]).items())]
    if not feasible:
        raise BudgetError(f"none of {len(trials)} Optuna trials met the budget {bounded}; try the ILP solver or "
                          f"more trials")
    best = min(feasible, key=lambda t: (t.values[0], t.values[1]))
    if secondary is not None:
        near = [t for t in feasible if t.values[0] <= best.values[0] + slack + 1e-12]
        best = min(near, key=lambda t: (total(secondary, t.params), t.values[0]))
    chosen = {l: best.params[l] for l in layers}
    frontier = _trial_frontier(table, feasible, layers, fixed, main, sampler)
    score, costs = totals_of(table, chosen, fixed)
    return Allocation(chosen, score, costs, solver=f"optuna-{sampler}", status="feasible",
                      stats={"seconds": time.perf_counter() - t0, "trials": len(trials), "new_trials": remaining,
                             "feasible": len(feasible), "resumed": bool(done), "objectives": ["damage", main],
                             "optimal_score": float("nan"), "predicted_damage": best.values[0],
                             "study": study.study_name},
                      frontier=frontier)


def _trial_frontier(table, feasible, layers, fixed, main: str, sampler: str) -> pd.DataFrame:
    from mpq.solvers.pareto import pareto_filter

    rows = []
    for t in feasible:
        choice = {l: t.params[l] for l in layers}
        score, costs = totals_of(table, choice, fixed)
        rows.append({"swept": main, "budget": np.nan, "score": score, **{c: costs.get(c) for c in COST_COLUMNS},
                     "predicted_damage": t.values[0], "predicted_cost": t.values[1], "exact": False,
                     "method": f"optuna-{sampler}", "choice": choice_key(choice)})
    return pareto_filter(pd.DataFrame(rows), main, "predicted_damage")


@register_solver
class OptunaSolver(Solver):
    """:func:`optuna_allocate` (NSGA-II or TPE): feasible trials, no optimality claim."""

    name = "optuna"
    honours = frozenset({"limits", "caps", "allowed", "pinned", "min_bits", "objective", "secondary"})

    def __init__(self, n_trials: int = 300, sampler: str = "nsga2", storage: str | Path | None = None,
                 study_name: str = "mpq", seed: int = 0, damage_fn=None, cost_fn=None,
                 warm_start: Iterable[Mapping[str, str]] = (), timeout: float | None = None, progress: bool = False):
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown Optuna sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
        if not isinstance(n_trials, int) or n_trials < 1:
            raise ConfigError(f"n_trials {n_trials!r} must be a positive whole number")
        self.options = dict(n_trials=n_trials, sampler=sampler, storage=storage, study_name=study_name, seed=seed,
                            damage_fn=damage_fn, cost_fn=cost_fn, warm_start=list(warm_start), timeout=timeout,
                            progress=progress)

    def solve(self, p: Problem) -> Allocation:
        return optuna_allocate(p.table, p.limits, p.fixed, objective=p.objective, allowed=p.allowed,
                               pinned=p.pinned, min_bits=p.min_bits, caps=p.caps, secondary=p.secondary,
                               slack=p.slack, **self.options)

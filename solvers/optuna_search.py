"""Multi-objective search with Optuna: NSGA-II (default) or TPE over each layer's option.

Two objectives, both minimised: the predicted damage (the summed score, or an :class:`AccuracyPredictor`) and the
main cost (latency from the table or a :class:`LatencyPredictor`, else size). Budgets become Optuna constraints
(``cost - limit <= 0``), so infeasible trials steer the sampler without being picked. The study lives in an RDB
storage (a SQLite file in the run directory), so an interrupted search resumes where it stopped: trials already
finished are not run again. ILP solutions are enqueued first (warm start).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from mpq.errors import BudgetError, ConfigError
from mpq.solvers.base import (COST_COLUMNS, Allocation, check_reachable, check_table, finite_limits,
                              objective_values, restrict, totals_of)

log = logging.getLogger(__name__)


def _optuna():
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConfigError("the Optuna solver needs optuna: pip install 'mpq[solvers]'") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def optuna_allocate(table: pd.DataFrame, limits: Mapping[str, float] | None = None,
                    fixed: Mapping[str, float] | None = None, n_trials: int = 300, sampler: str = "nsga2",
                    storage: str | Path | None = None, study_name: str = "mpq", seed: int = 0,
                    objective: str | Mapping[str, float] = "score",
                    damage_fn: Callable[[Sequence[Mapping[str, str]]], np.ndarray] | None = None,
                    cost_fn: Callable[[Sequence[Mapping[str, str]]], np.ndarray] | None = None,
                    warm_start: Iterable[Mapping[str, str]] = (), timeout: float | None = None,
                    allowed=None, pinned=None, min_bits=None, progress: bool = False, **_) -> Allocation:
    """Search ``n_trials`` configs (counting those a resumed study already has); the chosen config is the
    lowest-damage feasible trial, and the frontier of feasible trials is attached."""
    optuna = _optuna()
    t0 = time.perf_counter()
    limits, fixed = finite_limits(limits), dict(fixed or {})
    table = restrict(table, allowed, pinned, min_bits)
    check_table(table, limits)
    check_reachable(table, limits, fixed)
    obj = dict(zip(zip(table["layer"], table["option"]), objective_values(table, objective)))
    layers = list(dict.fromkeys(table["layer"]))
    options = {l: list(table.loc[table["layer"] == l, "option"]) for l in layers}
    main = "latency_ms" if "latency_ms" in table and not table["latency_ms"].isna().any() else "size_mb"
    columns = {c: dict(zip(zip(table["layer"], table["option"]), table[c].astype(float)))
               for c in COST_COLUMNS if c in table and not table[c].isna().any()}

    def total(col: str, choice: Mapping[str, str]) -> float:
        return sum(columns[col][(l, choice[l])] for l in layers) + fixed.get(col, 0.0)

    def evaluate(choice: Mapping[str, str]) -> tuple[float, float]:
        damage = float(damage_fn([choice])[0]) if damage_fn else sum(obj[(l, choice[l])] for l in layers)
        cost = float(cost_fn([choice])[0]) + fixed.get(main, 0.0) if cost_fn else total(main, choice)
        return damage, cost

    # Optuna 5 takes constraints from the trial (set_constraint); older releases from a sampler callback.
    new_api = hasattr(optuna.trial.Trial, "set_constraint")

    def trial_fn(trial) -> tuple[float, float]:
        choice = {l: trial.suggest_categorical(l, options[l]) for l in layers}
        damage, cost = evaluate(choice)
        named = {c: (cost if c == main and cost_fn else total(c, choice)) - lim for c, lim in limits.items()}
        cons = list(named.values()) or [0.0]
        trial.set_user_attr("constraints", cons)
        if new_api:
            for name, value in (named or {"none": 0.0}).items():
                trial.set_constraint(name, value)
        return damage, cost

    def constraints(frozen) -> list[float]:
        return frozen.user_attrs.get("constraints", [0.0])

    kwargs = {} if new_api else {"constraints_func": constraints}
    if sampler == "nsga2":
        samp = optuna.samplers.NSGAIISampler(seed=seed, **kwargs)
    elif sampler == "tpe":
        samp = optuna.samplers.TPESampler(seed=seed, multivariate=True, **kwargs)
    else:
        raise ConfigError(f"unknown Optuna sampler {sampler!r}: use 'nsga2' or 'tpe'")
    url = None if storage is None else (storage if "://" in str(storage) else f"sqlite:///{Path(storage)}")
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=samp, storage=url,
                                study_name=study_name, load_if_exists=True)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not study.trials:
        for choice in warm_start:
            study.enqueue_trial({l: choice[l] for l in layers})
    remaining = max(n_trials - len(done), 0)
    if remaining:
        study.optimize(trial_fn, n_trials=remaining, timeout=timeout, show_progress_bar=progress)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    feasible = [t for t in trials if all(v <= 1e-12 for v in t.user_attrs.get("constraints", [0.0]))]
    if not feasible:
        raise BudgetError(f"none of {len(trials)} Optuna trials met the budget {limits}; try the ILP solver or "
                          f"more trials")
    best = min(feasible, key=lambda t: (t.values[0], t.values[1]))
    chosen = {l: best.params[l] for l in layers}
    rows = []
    for t in feasible:
        choice = {l: t.params[l] for l in layers}
        score, costs = totals_of(table, choice, fixed)
        rows.append({"swept": main, "budget": np.nan, "score": score, **{c: costs.get(c) for c in COST_COLUMNS},
                     "predicted_damage": t.values[0], "predicted_cost": t.values[1], "exact": False,
                     "method": f"optuna-{sampler}", "choice": json.dumps(dict(sorted(choice.items())))})
    from mpq.solvers.pareto import pareto_filter

    frontier = pareto_filter(pd.DataFrame(rows), main, "predicted_damage")
    score, costs = totals_of(table, chosen, fixed)
    return Allocation(chosen, score, costs, solver=f"optuna-{sampler}", status="feasible",
                      stats={"seconds": time.perf_counter() - t0, "trials": len(trials), "new_trials": remaining,
                             "feasible": len(feasible), "resumed": bool(done), "objectives": ["damage", main],
                             "optimal_score": float("nan"), "predicted_damage": best.values[0]},
                      frontier=frontier)

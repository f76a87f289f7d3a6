"""Interaction-aware refinement (EvoPress-style): the ILP's allocation, improved by a measured local search.

The ILP is exact for the table it is given, but the table adds single-layer scores, and at 2-3.5 bits the damage
of layers quantized together departs from the sum (CLADO, EvoPress). So the ILP's choice is only the start: a
(1 + lambda) evolutionary search mutates it, keeps every candidate within the same limits, measures each
candidate's *true* damage through a callback (the study supplies one: the fake-quant loss increase of the whole
config on the calibration split), and keeps the best measured so far.

Mutations (EvoPress's level switch, generalised to several cost columns): move one layer up its own frontier and
another down, or re-draw one or two layers' options; then, while a limit is exceeded, move the layer whose cheaper
option costs the least predicted score per unit of cost saved. Options are drawn from each layer's frontier of
(predicted score, costs): an option that another of the same layer beats on both is never proposed.

Guarantees (tested): every candidate measured meets every limit and cap, and the result's measured damage is never
above the ILP allocation's (that allocation is measured first and only a strictly better one replaces it). The
search stops at ``max_evals`` evaluations or ``time_limit`` seconds, whichever comes first, and logs its progress.
No torch here: the damage callback takes and returns plain data.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from mpq.errors import ConfigError
from mpq.solvers.base import (Allocation, Problem, Solver, check_table, finite_limits, objective_values,
                              register_solver, restrict, totals_of)
from mpq.solvers.ilp import BACKENDS, ILPSolver

log = logging.getLogger(__name__)

DamageFn = Callable[[list[dict[str, str]]], list[float]]  # configs (layer -> option) -> measured damage each


class _Space:
    """Per layer: its frontier options (cheapest first), their predicted scores and costs in the limited columns;
    and every option's, for totals (plain dicts and arrays: the search looks them up thousands of times)."""

    def __init__(self, table: pd.DataFrame, objective, columns: list[str]):
        frame = table.assign(_obj=objective_values(table, objective))
        self.layers = list(dict.fromkeys(frame["layer"]))
        self.columns = columns
        self.options: dict[str, list[str]] = {}
        self.obj: dict[str, np.ndarray] = {}
        self.cost: dict[str, np.ndarray] = {}
        self.every: dict[tuple[str, str], tuple[float, np.ndarray]] = {}
        for layer, g in frame.groupby("layer", sort=False):
            vals = g[["_obj", *columns]].to_numpy(float)
            for opt, v in zip(g["option"], vals):
                self.every[(layer, opt)] = (float(v[0]), v[1:])
            keep = [i for i in range(len(g)) if not any(
                np.all(vals[j] <= vals[i]) and np.any(vals[j] < vals[i]) for j in range(len(g)))]
            order = sorted(keep, key=lambda i: (tuple(vals[i, 1:]), vals[i, 0]))
            self.options[layer] = [g["option"].iloc[i] for i in order]
            self.obj[layer] = vals[order, 0]
            self.cost[layer] = vals[order, 1:]

    def totals(self, choice: Mapping[str, str]) -> np.ndarray:
        return np.sum([self.every[(l, o)][1] for l, o in choice.items()], axis=0) if self.columns else np.zeros(0)

    def predicted(self, choice: Mapping[str, str]) -> float:
        return float(sum(self.every[(l, o)][0] for l, o in choice.items()))

    def index(self, layer: str, option: str) -> int | None:
        opts = self.options[layer]
        return opts.index(option) if option in opts else None


class Refiner:
    """The search state: limits, the evaluated configs (cached by key), the best measured."""

    def __init__(self, problem: Problem, damage: DamageFn, rng: np.random.Generator):
        limits = {**finite_limits(problem.limits), **finite_limits(problem.caps)}
        self.table = restrict(problem.table, problem.allowed, problem.pinned, problem.min_bits)
        check_table(self.table, limits)
        self.fixed = dict(problem.fixed)
        self.columns = list(limits)
        self.bound = np.array([limits[c] - self.fixed.get(c, 0.0) for c in self.columns])
        # a relative slack for summation order: the ILP's own row tolerance is 1e-9 of a scaled row
        self.tol = 1e-9 * np.maximum(np.abs(self.bound), 1.0)
        self.space = _Space(self.table, problem.objective, self.columns)
        self.damage, self.rng = damage, rng
        self.seen: dict[tuple[str, ...], float] = {}
        self.predicted: dict[tuple[str, ...], float] = {}

    def key(self, choice: Mapping[str, str]) -> tuple[str, ...]:
        return tuple(choice[layer] for layer in self.space.layers)

    def feasible(self, choice: Mapping[str, str]) -> bool:
        return bool(np.all(self.space.totals(choice) <= self.bound + self.tol))

    def measure(self, choices: list[dict[str, str]]) -> list[float]:
        """Measured damage of each (new) config, checked finite; every one must be within the limits."""
        for c in choices:
            if not self.feasible(c):  # a guard on this module's own mutations: never measure outside the budget
                raise AssertionError(f"refinement proposed a config outside the limits: {c}")
        values = [float(v) for v in self.damage([dict(c) for c in choices])]
        if len(values) != len(choices) or not all(math.isfinite(v) for v in values):
            raise ConfigError(f"the damage callback returned {values!r} for {len(choices)} configs: it must return "
                              f"one finite number per config")
        for c, v in zip(choices, values):
            self.seen[self.key(c)] = v
            self.predicted[self.key(c)] = self.space.predicted(c)
        return values

    # --- mutation and repair -------------------------------------------------------------------------------------
    def mutate(self, parent: Mapping[str, str]) -> dict[str, str] | None:
        child = dict(parent)
        movable = [l for l in self.space.layers if len(self.space.options[l]) > 1]
        if not movable:
            return None
        if self.rng.random() < 0.5 and len(movable) > 1:
            up, down = self.rng.choice(len(movable), 2, replace=False)
            for layer, step in ((movable[up], 1), (movable[down], -1)):
                opts = self.space.options[layer]
                i = self.space.index(layer, child[layer])
                i = len(opts) // 2 if i is None else i
                child[layer] = opts[int(np.clip(i + step * int(self.rng.integers(1, 3)), 0, len(opts) - 1))]
        else:
            for j in self.rng.choice(len(movable), min(len(movable), int(self.rng.integers(1, 3))), replace=False):
                layer = movable[j]
                child[layer] = self.space.options[layer][int(self.rng.integers(len(self.space.options[layer])))]
        return self.repair(child)

    def repair(self, choice: dict[str, str]) -> dict[str, str] | None:
        """Cheaper options until every limit holds: each step the move with the least predicted score added per
        unit of (normalised) cost saved on the exceeded columns; None when no move helps."""
        if not self.columns:
            return choice
        scale = np.maximum(np.abs(self.bound), 1e-12)
        for _ in range(4 * len(self.space.layers) * 8):
            over = self.space.totals(choice) - self.bound - self.tol
            if np.all(over <= 0):
                return choice
            mask = over > 0
            best = None
            for layer in self.space.layers:
                i = self.space.index(layer, choice[layer])
                cur_obj, cur_cost = self.space.every[(layer, choice[layer])]
                for k, opt in enumerate(self.space.options[layer]):
                    if k == i:
                        continue
                    saved = float(((cur_cost - self.space.cost[layer][k]) / scale)[mask].sum())
                    if saved <= 0:
                        continue
                    ratio = (self.space.obj[layer][k] - cur_obj) / saved
                    if best is None or ratio < best[0]:
                        best = (ratio, layer, opt)
            if best is None:
                return None
            choice[best[1]] = best[2]
        return None


def refine_allocate(problem: Problem, damage: DamageFn, max_evals: int = 200, time_limit: float = 120.0,
                    offspring: int = 8, seed: int = 0, backend: str = "cbc", start: Allocation | None = None
                    ) -> Allocation:
    """The ILP's allocation for ``problem`` (or ``start``), then a measured (1 + ``offspring``) search: at most
    ``max_evals`` damage evaluations (the start's included) and ``time_limit`` seconds."""
    t0 = time.perf_counter()
    start = start or ILPSolver(backend).allocate(problem)
    ref = Refiner(problem, damage, np.random.default_rng(seed))
    best = {layer: start.choice[layer] for layer in ref.space.layers}
    (best_damage,) = ref.measure([best])
    ilp_damage, history, generations, stale = best_damage, [(1, best_damage)], 0, 0
    log.info("refine: ILP allocation measured %.6g (predicted %.4g); searching up to %d evaluations / %.0f s",
             best_damage, ref.space.predicted(best), max_evals, time_limit)
    last_log = time.perf_counter()
    while len(ref.seen) < max_evals and time.perf_counter() - t0 < time_limit and stale < 50:
        generations += 1
        batch, keys = [], set()
        for _ in range(offspring * 4):  # some mutations repeat a config measured before: draw a few more
            if len(batch) >= min(offspring, max_evals - len(ref.seen)):
                break
            child = ref.mutate(best)
            if child is None or ref.key(child) in ref.seen or ref.key(child) in keys:
                continue
            batch.append(child)
            keys.add(ref.key(child))
        if not batch:
            stale += 1  # every neighbour within reach was measured: the search has converged
            continue
        values = ref.measure(batch)
        i = int(np.argmin(values))
        if values[i] < best_damage:
            best, best_damage, stale = batch[i], values[i], 0
            history.append((len(ref.seen), best_damage))
        if time.perf_counter() - last_log > 10:
            last_log = time.perf_counter()
            log.info("refine: %d evaluations, %.0f s: best %.6g (ILP %.6g)", len(ref.seen),
                     time.perf_counter() - t0, best_damage, ilp_damage)
    score, costs = totals_of(ref.table, best, ref.fixed)
    seconds = time.perf_counter() - t0
    log.info("refine: %d evaluations in %.1f s: measured damage %.6g, ILP's %.6g (%+.1f%%)", len(ref.seen), seconds,
             best_damage, ilp_damage, 100 * (best_damage - ilp_damage) / max(abs(ilp_damage), 1e-30))
    return Allocation(best, score, costs, solver="ilp+refine", status="feasible", stats={
        "seconds": seconds, "evaluations": len(ref.seen), "generations": generations, "damage": best_damage,
        "ilp_damage": ilp_damage, "ilp_choice": dict(start.choice), "ilp_score": start.score,
        "history": history, "tau_config": _tau(ref), "max_evals": max_evals, "time_limit": time_limit})


def _tau(ref: Refiner) -> float:
    """Kendall tau of the table's predicted (summed) score against the measured damage of every config the search
    measured: how well the additive table ranked the configs that mattered (NaN with fewer than 3)."""
    from scipy.stats import kendalltau

    keys = list(ref.seen)
    if len(keys) < 3:
        return float("nan")
    pred, meas = [ref.predicted[k] for k in keys], [ref.seen[k] for k in keys]
    if np.ptp(pred) == 0 or np.ptp(meas) == 0:
        return float("nan")
    return float(kendalltau(pred, meas).statistic)


@register_solver
class RefineSolver(Solver):
    """The ILP, then a measured local search (:func:`refine_allocate`). Needs ``damage``: a study supplies it."""

    name = "ilp+refine"
    honours = frozenset({"limits", "caps", "allowed", "pinned", "min_bits", "objective"})
    needs_damage = True

    def __init__(self, damage: DamageFn | None = None, max_evals: int = 200, time_limit: float = 120.0,
                 offspring: int = 8, seed: int = 0, backend: str = "cbc"):
        if damage is not None and not callable(damage):
            raise ConfigError(f"damage must be a function [config, ...] -> [damage, ...], got {damage!r}")
        if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
            raise ConfigError(f"max_evals={max_evals!r} must be a whole number >= 1")
        if not isinstance(time_limit, (int, float)) or not time_limit > 0:
            raise ConfigError(f"time_limit={time_limit!r} must be a positive number of seconds")
        if isinstance(offspring, bool) or not isinstance(offspring, int) or offspring < 1:
            raise ConfigError(f"offspring={offspring!r} must be a whole number >= 1")
        if backend not in BACKENDS:
            raise ConfigError(f"unknown ILP backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.damage, self.max_evals, self.time_limit = damage, max_evals, float(time_limit)
        self.offspring, self.seed, self.backend = offspring, seed, backend

    def solve(self, p: Problem) -> Allocation:
        if self.damage is None:
            raise ConfigError("solver 'ilp+refine' measures configs: it needs a damage function (a live study "
                              "supplies one: mpq.search, mpq.study(...).solve, or a loaded study after attach())")
        return refine_allocate(p, self.damage, self.max_evals, self.time_limit, self.offspring, self.seed,
                               self.backend)

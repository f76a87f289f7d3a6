"""The estimator plug-in: one small base class, a registry, and the normalisation that makes estimators comparable.

Normalisation: every estimator produces a raw score per (layer, option) in its own units (a loss increase, a
relevance-weighted error, bits of entropy, ...). Its normalised score divides the raw one by the raw total of the
most aggressive allocation (every layer at its highest-scoring option), so that for every estimator the normalised
scores of that allocation sum to 1 and float sums to 0. Weighted sums of normalised scores from several estimators
are then meaningful (:class:`CombinedEstimator`), and a solver's tolerances can be stated as fractions of 1.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import pandas as pd
from torch import nn

from mpq.calib import CalibrationSet, LossFn
from mpq.errors import ConfigError, MpqError
from mpq.layers import LayerInventory
from mpq.options import estimator_options, parse_combination
from mpq.plugins import ESTIMATORS, accepted_options
from mpq.space import SearchSpace

MapFn = Callable[..., list]  # map_with_shared's signature: (fn, shared, items, workers, address, setup, on_result)

SCORE_COLUMNS = ["layer", "option", "score"]


class ScoreError(MpqError, ValueError):
    """An estimator produced a score that is not a finite number."""


@dataclass
class SensitivityResult:
    """Scores per (layer, option), per-layer statistics, and the cost of computing them.

    ``scores`` has at least ``layer, option, raw_score, score`` (``score`` normalised; float options score 0).
    ``tables`` holds extra per-(layer, option) tables an estimator exposes, e.g. one per metric for ``decoupled``.
    """

    estimator: str
    scores: pd.DataFrame
    layer_stats: pd.DataFrame = field(default_factory=pd.DataFrame)
    cost: dict[str, Any] = field(default_factory=dict)  # forward_passes, backward_passes, seconds
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def score_of(self, layer: str, option: str) -> float:
        s = self.scores
        return float(s.loc[(s["layer"] == layer) & (s["option"] == option), "score"].iloc[0])


def check_finite(scores: pd.DataFrame, estimator: str, column: str = "raw_score") -> None:
    """Reject NaN/Inf scores with an error that names the layer and option."""
    bad = scores[~np.isfinite(scores[column].astype(float))]
    if len(bad):
        r = bad.iloc[0]
        raise ScoreError(f"estimator {estimator!r} gave layer {r['layer']!r} option {r['option']!r} the score "
                         f"{r[column]!r} ({len(bad)} non-finite scores in all); scores must be finite numbers")


def normalizer(raw: pd.DataFrame, column: str = "raw_score") -> float:
    """Raw total of the most aggressive allocation: the per-layer maximum, summed."""
    total = float(raw.groupby("layer", sort=False)[column].max().clip(lower=0).sum())
    return total if total > 0 else 1.0


def normalize(raw: pd.DataFrame, column: str = "raw_score") -> pd.DataFrame:
    """``raw`` with a ``score`` column: ``column`` over :func:`normalizer` (negative raw scores clipped to 0)."""
    out = raw.copy()
    out["score"] = out[column].astype(float).clip(lower=0) / normalizer(raw, column)
    return out


class SensitivityEstimator(ABC):
    """Plug-in base: implement :meth:`estimate` (raw scores); :meth:`run` checks and normalises them."""

    name: ClassVar[str]

    @abstractmethod
    def estimate(self, model: nn.Module, calib: CalibrationSet, space: SearchSpace, inventory: LayerInventory,
                 loss_fn: LossFn | None = None, progress: bool = True) -> SensitivityResult:
        """Score every (layer, option) of ``space`` in ``scores["raw_score"]``; must leave ``model`` unchanged."""

    def run(self, model: nn.Module, calib: CalibrationSet, space: SearchSpace, inventory: LayerInventory,
            loss_fn: LossFn | None = None, progress: bool = True) -> SensitivityResult:
        t0 = time.perf_counter()
        result = self.estimate(model, calib, space, inventory, loss_fn=loss_fn, progress=progress)
        expected = {(l, b.name) for l, b in space.pairs()}
        got = set(zip(result.scores["layer"], result.scores["option"]))
        if got != expected:
            missing = sorted(expected - got)[:3]
            raise ScoreError(f"estimator {self.name!r} did not score {missing} (and {len(expected - got) - len(missing)}"
                             f" more)" if missing else f"estimator {self.name!r} scored pairs outside the space")
        check_finite(result.scores, self.name)
        result.scores = normalize(result.scores)
        result.cost.setdefault("seconds", time.perf_counter() - t0)
        result.cost.setdefault("forward_passes", 0)
        result.cost.setdefault("backward_passes", 0)
        return result


def register_estimator(cls: type[SensitivityEstimator]) -> type[SensitivityEstimator]:
    """Class decorator: make ``cls`` available as ``sensitivity=cls.name`` (and in combinations)."""
    if not (isinstance(cls, type) and issubclass(cls, SensitivityEstimator)):
        raise ConfigError(f"register_estimator takes a SensitivityEstimator subclass, got {cls!r}")
    return ESTIMATORS.add(cls.name, cls)


def available_estimators() -> list[str]:
    return sorted(ESTIMATORS.names())


def get_estimator(spec: str | Mapping[str, float] | list[str] | SensitivityEstimator,
                  map_fn: MapFn | None = None, **options: Any) -> SensitivityEstimator:
    """An estimator by name, or a weighted combination. ``options`` are the estimator's keyword arguments, or, keyed
    by estimator name, each member's (``{"hessian": {"max_probes": 64}, "lrp": {...}}``). ``map_fn`` is the
    parallel map (``mpq.workers.cluster.map_with_shared``'s signature) handed to estimators that fan out."""
    if isinstance(spec, SensitivityEstimator):
        return spec
    weights = parse_combination(spec)
    members = {n: _construct(n, opts, map_fn) for n, opts in estimator_options(spec, options).items()}
    if len(weights) == 1:
        return next(iter(members.values()))
    return CombinedEstimator(weights, members=members)


def _construct(name: str, options: Mapping[str, Any], map_fn: MapFn | None) -> SensitivityEstimator:
    cls = ESTIMATORS.get(name)
    takes, _ = accepted_options(cls)
    extra = {"map_fn": map_fn} if map_fn is not None and "map_fn" in takes and "map_fn" not in options else {}
    return cls(**dict(options), **extra)


class CombinedEstimator(SensitivityEstimator):
    """A weighted sum of normalised scores of several estimators (raw score = the weighted sum)."""

    name = "combined"

    def __init__(self, weights: Mapping[str, float], options: Mapping[str, Mapping[str, Any]] | None = None,
                 members: Mapping[str, SensitivityEstimator] | None = None):
        self.weights = dict(weights)
        self.members = dict(members) if members is not None else \
            {n: ESTIMATORS.get(n)(**dict((options or {}).get(n, {}))) for n in self.weights}

    @property
    def label(self) -> str:
        return "+".join(f"{w:g}*{n}" for n, w in self.weights.items())

    def estimate(self, model, calib, space, inventory, loss_fn=None, progress=True) -> SensitivityResult:
        parts = {n: est.run(model, calib, space, inventory, loss_fn, progress) for n, est in self.members.items()}
        base = next(iter(parts.values())).scores[["layer", "option"]].copy()
        base["raw_score"] = 0.0
        for n, res in parts.items():
            merged = base[["layer", "option"]].merge(res.scores[["layer", "option", "score"]], how="left")
            base[f"score_{n}"] = merged["score"].to_numpy()
            base["raw_score"] += self.weights[n] * base[f"score_{n}"]
        cost = {k: sum(p.cost.get(k, 0) for p in parts.values())
                for k in ("forward_passes", "backward_passes", "seconds")}
        cost["members"] = {n: p.cost for n, p in parts.items()}
        tables = {f"{n}:{k}": t for n, p in parts.items() for k, t in p.tables.items()}
        return SensitivityResult(self.label, base, pd.DataFrame(), cost, tables)

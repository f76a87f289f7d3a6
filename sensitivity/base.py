"""The estimator plug-in: one small base class and a registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd
from torch import nn

from mpq.calib import CalibrationSet, LossFn
from mpq.errors import ConfigError
from mpq.layers import LayerInventory
from mpq.space import SearchSpace

SCORE_COLUMNS = ["layer", "option", "score"]


@dataclass
class SensitivityResult:
    """Scores per (layer, option), per-layer statistics, and the cost of computing them."""

    estimator: str
    scores: pd.DataFrame  # at least: layer, option, score (estimated loss increase; float option = 0)
    layer_stats: pd.DataFrame = field(default_factory=pd.DataFrame)
    cost: dict[str, Any] = field(default_factory=dict)  # forward_passes, backward_passes, seconds

    def score_of(self, layer: str, option: str) -> float:
        s = self.scores
        return float(s.loc[(s["layer"] == layer) & (s["option"] == option), "score"].iloc[0])


class SensitivityEstimator(ABC):
    name: ClassVar[str]

    @abstractmethod
    def estimate(self, model: nn.Module, calib: CalibrationSet, space: SearchSpace, inventory: LayerInventory,
                 loss_fn: LossFn | None = None, progress: bool = True) -> SensitivityResult:
        """Score every (layer, option) of ``space``; must leave ``model`` unchanged."""


_REGISTRY: dict[str, type[SensitivityEstimator]] = {}


def register_estimator(cls: type[SensitivityEstimator]) -> type[SensitivityEstimator]:
    _REGISTRY[cls.name] = cls
    return cls


def available_estimators() -> list[str]:
    return sorted(_REGISTRY)


def get_estimator(name: str | SensitivityEstimator, **options: Any) -> SensitivityEstimator:
    if isinstance(name, SensitivityEstimator):
        return name
    if name not in _REGISTRY:
        raise ConfigError(f"unknown sensitivity estimator {name!r}; available: {', '.join(available_estimators())}")
    return _REGISTRY[name](**options)

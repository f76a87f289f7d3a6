"""Boosted-tree predictors (XGBoost) of a config's end-to-end latency and of its metric.

- :class:`LatencyPredictor` (OHQ/APQ-style hardware model): an additive table misses what happens between layers
  (format conversions between neighbours of different precision, launch and allocation overheads). The predictor
  learns the ratio of the measured latency to the table's sum from per-layer features of the config (each layer's
  table latency, weight and activation bits, whether its neighbour runs another format) and config totals.
- :class:`AccuracyPredictor` (Quantune/APQ): predicts a config's measured metric (e.g. held-out loss increase)
  from estimator features: summed scores of each estimator, the histogram of options, and per-block score sums.

Both are trained on measured configs, save to a directory (XGBoost's JSON model plus a JSON header: no pickle) and
load back. ``xgboost`` is an optional dependency (``pip install mpq[solvers]``, the light ``xgboost-cpu`` wheel).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from mpq.config import LayerBits
from mpq.errors import ConfigError

FORMAT = "mpq.predictor"


def _xgboost():
    try:
        import xgboost
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConfigError("the XGBoost predictors need xgboost: pip install 'mpq[solvers]' (xgboost-cpu)") from e
    return xgboost


def _format(option: str) -> str:
    """The activation format a layer hands on: float, bf16 (16-bit) or int8."""
    b = LayerBits.parse(option)
    return "float" if b.a_bits is None else f"a{b.a_bits}"


def _block(layer: str) -> str:
    """A layer's block: the name up to its first index (``blocks.3.fc`` -> ``blocks.3``), else the layer."""
    m = re.match(r"^(.*?\.\d+)(\.|$)", layer)
    return m.group(1) if m else layer


class _Predictor:
    kind = ""
    params = dict(n_estimators=300, max_depth=4, learning_rate=0.05, subsample=0.9, colsample_bytree=0.9)

    def __init__(self, layers: Sequence[str], options: Sequence[str], **params):
        self.layers, self.options = list(layers), sorted(set(options))
        self.params = {**self.params, **params}
        self.model = None

    def features(self, table: pd.DataFrame, choices: Sequence[Mapping[str, str]]) -> np.ndarray:
        raise NotImplementedError

    def _target(self, table, choices, measured):
        return np.asarray(measured, float)

    def _untarget(self, table, choices, predicted):
        return predicted

    def fit(self, table: pd.DataFrame, choices: Sequence[Mapping[str, str]], measured: Iterable[float]):
        xgb = _xgboost()
        self.model = xgb.XGBRegressor(**self.params, random_state=0, n_jobs=1)
        self.model.fit(self.features(table, choices), self._target(table, choices, list(measured)))
        return self

    def _extra(self) -> dict:
        """Constructor arguments beyond layers/options/params, saved in the header."""
        return {}

    def predict(self, table: pd.DataFrame, choices: Sequence[Mapping[str, str]]) -> np.ndarray:
        if self.model is None:
            raise ConfigError(f"{type(self).__name__} is not trained: call fit() or load()")
        return self._untarget(table, choices, self.model.predict(self.features(table, choices)))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_model(directory / f"{self.kind}.xgb.json")
        (directory / f"{self.kind}.json").write_text(json.dumps(
            {"format": FORMAT, "version": 1, "kind": self.kind, "layers": self.layers, "options": self.options,
             "params": self.params, **self._extra()}, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path):
        directory = Path(directory)
        head = json.loads((directory / f"{cls.kind}.json").read_text())
        if head.get("format") != FORMAT or head.get("kind") != cls.kind:
            raise ConfigError(f"{directory} holds no {cls.kind} predictor")
        inst = cls(head["layers"], head["options"], **head.get("extra", {}), **head["params"])
        inst.model = _xgboost().XGBRegressor()
        inst.model.load_model(directory / f"{cls.kind}.xgb.json")
        return inst


class LatencyPredictor(_Predictor):
    """Whole-config latency from per-layer features; learns the measured / additive ratio.

    ``per_layer=False`` keeps only config totals (table sum, format switches and the table latency of the layers
    right after one, option and format counts): far fewer features, for small training sets.
    """

    kind = "latency"

    def __init__(self, layers, options, per_layer: bool = True, **params):
        super().__init__(layers, options, **params)
        self.per_layer = per_layer

    def _extra(self) -> dict:
        return {"extra": {"per_layer": self.per_layer}}

    def _additive(self, table, choices) -> np.ndarray:
        lat = dict(zip(zip(table["layer"], table["option"]), table["latency_ms"].astype(float)))
        return np.array([sum(lat[(l, c[l])] for l in self.layers) for c in choices])

    def features(self, table, choices) -> np.ndarray:
        lat = dict(zip(zip(table["layer"], table["option"]), table["latency_ms"].astype(float)))
        rows = []
        for c in choices:
            per, prev, switches, after_switch = [], "float", 0, 0.0
            for l in self.layers:
                b = LayerBits.parse(c[l])
                fmt = _format(c[l])
                switch = float(fmt != prev)
                switches += int(switch)
                after_switch += switch * lat[(l, c[l])]
                per += [lat[(l, c[l])], b.w_bits or 32, b.a_bits or 32, b.group_size or 0, switch]
                prev = fmt
            counts = [sum(1 for l in self.layers if c[l] == o) for o in self.options]
            totals = [sum(lat[(l, c[l])] for l in self.layers), switches, after_switch, *counts]
            rows.append(totals + (per if self.per_layer else []))
        return np.asarray(rows, float)

    def _target(self, table, choices, measured):
        return np.log(np.asarray(measured, float) / self._additive(table, choices))

    def _untarget(self, table, choices, predicted):
        return self._additive(table, choices) * np.exp(predicted)


class AccuracyPredictor(_Predictor):
    """A config's measured metric from estimator features (score sums per estimator, option histogram, blocks)."""

    kind = "accuracy"

    def __init__(self, layers, options, score_columns: Sequence[str] = ("score",), **params):
        super().__init__(layers, options, **params)
        self.score_columns = list(score_columns)
        self.blocks = list(dict.fromkeys(_block(l) for l in self.layers))

    def features(self, table, choices) -> np.ndarray:
        idx = table.set_index(["layer", "option"])
        rows = []
        for c in choices:
            picked = idx.loc[[(l, c[l]) for l in self.layers]]
            sums = [float(picked[s].sum()) for s in self.score_columns]
            hist = [sum(1 for l in self.layers if c[l] == o) for o in self.options]
            blocks = dict.fromkeys(self.blocks, 0.0)
            for l, v in zip(self.layers, picked[self.score_columns[0]]):
                blocks[_block(l)] += float(v)
            rows.append([*sums, *hist, *blocks.values()])
        return np.asarray(rows, float)

    def _extra(self) -> dict:
        return {"extra": {"score_columns": self.score_columns}}


def mape(predicted: Iterable[float], measured: Iterable[float]) -> float:
    """Median absolute percentage error."""
    p, m = np.asarray(list(predicted), float), np.asarray(list(measured), float)
    return float(np.median(np.abs(p - m) / np.abs(m)) * 100)

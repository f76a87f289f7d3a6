"""Predictors of a config's end-to-end latency (additive table, table + learned correction, boosted tree) and
of its metric, and the choice among them by held-out error on measured configs of the model.

- :func:`select_latency_predictor`: given whole-model measurements of a few dozen configs, fits every latency
  predictor below in k-fold cross-validation and keeps the one with the smallest held-out median error (a more
  complex one must beat a simpler one by ``margin_pct``); says which and how each did.
- :class:`AdditiveLatency`: the table's sum plus the rest of the model (what the ILP optimises).
- :class:`AffineLatency`: ``a + b x`` the additive prediction (a uniform in-model slow-down and a fixed offset).
- :class:`CorrectedLatency`: the table plus a learned correction of what it misses: a scale and a per-call
  overhead per option (isolated timings vs in the model), a cost per format switch between neighbours, and the
  rest of the model, fit by ridge regression on relative errors towards "the table is right". Its separable part
  gives a corrected cost table for the solver (:meth:`CorrectedLatency.corrected_table`).

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
from dataclasses import dataclass
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


def abs_pct_errors(predicted: Iterable[float], measured: Iterable[float]) -> np.ndarray:
    p, m = np.asarray(list(predicted), float), np.asarray(list(measured), float)
    return np.abs(p - m) / np.abs(m) * 100


# --- whole-config latency predictors that include the rest of the model ----------------------------------------------
def _latency_lookup(table: pd.DataFrame) -> dict[tuple[str, str], float]:
    return dict(zip(zip(table["layer"], table["option"]), table["latency_ms"].astype(float)))


def _layers_of(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table["layer"]))


class AdditiveLatency:
    """The table's sum over the config's layers plus ``fixed_ms`` (the rest of the model)."""

    name = "additive"

    def __init__(self, fixed_ms: float = 0.0):
        self.fixed_ms = float(fixed_ms)

    def fit(self, table: pd.DataFrame, choices: Sequence[Mapping[str, str]], measured: Iterable[float]):
        return self

    def additive(self, table: pd.DataFrame, choices: Sequence[Mapping[str, str]]) -> np.ndarray:
        lat, layers = _latency_lookup(table), _layers_of(table)
        return np.array([sum(lat[(l, c[l])] for l in layers) for c in choices], float) + self.fixed_ms

    def predict(self, table: pd.DataFrame, choices: Sequence[Mapping[str, str]]) -> np.ndarray:
        return self.additive(table, choices)

    def corrected_table(self, table: pd.DataFrame) -> tuple[pd.DataFrame, float]:
        """The cost table and fixed latency whose sum is this predictor's separable part (for the solver)."""
        return table.copy(), self.fixed_ms


def _ridge(x: np.ndarray, y: np.ndarray, prior: np.ndarray, lambdas=(1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
           ) -> np.ndarray:
    """Coefficients of ``y ~ x`` fit on relative errors (each row divided by its ``y``), shrunk towards ``prior``
    with the ridge strength that gives the smallest leave-one-out error (closed form)."""
    w = 1.0 / y
    xw, rw = x * w[:, None], (y - x @ prior) * w
    scale = np.sqrt((xw ** 2).mean(axis=0))
    scale[scale == 0] = 1.0
    z = xw / scale
    best, best_err = np.zeros(x.shape[1]), np.inf
    for lam in lambdas:
        a = z.T @ z + lam * len(y) * np.eye(z.shape[1])
        inv = np.linalg.pinv(a)
        delta = inv @ z.T @ rw
        hat = np.einsum("ij,jk,ik->i", z, inv, z)
        loo = (rw - z @ delta) / np.clip(1 - hat, 1e-6, None)
        err = float(np.median(np.abs(loo)))
        if err < best_err:
            best, best_err = delta, err
    return prior + best / scale


class AffineLatency(AdditiveLatency):
    """``a + b x additive``: one in-model slow-down factor and one offset, fit on relative errors."""

    name = "additive+affine"

    def fit(self, table, choices, measured):
        add = AdditiveLatency(self.fixed_ms).additive(table, choices) - self.fixed_ms
        x = np.column_stack([np.ones(len(add)), add])
        self.coef = _ridge(x, np.asarray(list(measured), float), np.array([self.fixed_ms, 1.0]))
        return self

    def predict(self, table, choices):
        add = AdditiveLatency(0.0).additive(table, choices)
        return self.coef[0] + self.coef[1] * add

    def corrected_table(self, table):
        out = table.copy()
        out["latency_ms"] = out["latency_ms"].astype(float) * self.coef[1]
        return out, float(self.coef[0])


class CorrectedLatency(AdditiveLatency):
    """The table plus a learned correction: ``rest + sum_o (scale_o x table time of the layers at option o +
    overhead_o x their count) + switch_ms x format switches`` (see the module docstring)."""

    name = "table+correction"

    def _features(self, table, choices) -> np.ndarray:
        lat, layers = _latency_lookup(table), _layers_of(table)
        rows = []
        for c in choices:
            time_of = dict.fromkeys(self.options, 0.0)
            count = dict.fromkeys(self.options, 0.0)
            for l in layers:
                time_of[c[l]] += lat[(l, c[l])]
                count[c[l]] += 1
            switches = sum(_format(c[a]) != _format(c[b]) for a, b in zip(layers, layers[1:]))
            rows.append([1.0, *time_of.values(), *count.values(), float(switches)])
        return np.asarray(rows, float)

    def fit(self, table, choices, measured):
        self.options = sorted(set(table["option"]))
        k = len(self.options)
        prior = np.concatenate([[self.fixed_ms], np.ones(k), np.zeros(k), [0.0]])
        self.coef = _ridge(self._features(table, choices), np.asarray(list(measured), float), prior)
        return self

    def predict(self, table, choices):
        return self._features(table, choices) @ self.coef

    @property
    def switch_ms(self) -> float:
        """The learned cost of one format switch between neighbouring layers (not in the separable table)."""
        return float(self.coef[-1])

    def corrected_table(self, table):
        k = len(self.options)
        scale = dict(zip(self.options, self.coef[1:1 + k]))
        overhead = dict(zip(self.options, self.coef[1 + k:1 + 2 * k]))
        out = table.copy()
        out["latency_ms"] = [float(t) * scale[o] + overhead[o] for t, o in zip(out["latency_ms"], out["option"])]
        return out, float(self.coef[0])


class BoostedLatency(AdditiveLatency):
    """:class:`LatencyPredictor` (XGBoost on config totals) over the whole model, rest included."""

    name = "boosted-tree"

    def fit(self, table, choices, measured):
        layers = _layers_of(table)
        shifted = table.copy()  # the rest of the model rides on the first layer, so the learned ratio covers it
        first = shifted["layer"] == layers[0]
        shifted.loc[first, "latency_ms"] = shifted.loc[first, "latency_ms"].astype(float) + self.fixed_ms
        self._table = shifted
        self.model = LatencyPredictor(layers, table["option"].unique(), per_layer=False).fit(
            shifted, choices, measured)
        return self

    def predict(self, table, choices):
        return self.model.predict(self._table, choices)


LATENCY_PREDICTORS = {p.name: p for p in (AdditiveLatency, AffineLatency, CorrectedLatency, BoostedLatency)}


@dataclass
class PredictorSelection:
    """The latency predictor that validated best on held-out configs of this model, fit on all of them."""

    name: str
    predictor: AdditiveLatency
    scores: dict[str, dict[str, float]]  # per predictor: held-out median_pct, p90_pct, n
    folds: int

    def describe(self) -> str:
        s = self.scores[self.name]
        rest = ", ".join(f"{n} {v['median_pct']:.1f}%" for n, v in self.scores.items() if n != self.name)
        return (f"latency predictor: {self.name} (held-out median error {s['median_pct']:.1f}%, p90 "
                f"{s['p90_pct']:.1f}% over {s['n']} configs in {self.folds}-fold cross-validation; {rest})")


def select_latency_predictor(table: pd.DataFrame, fixed_ms: float, choices: Sequence[Mapping[str, str]],
                             measured: Iterable[float], candidates: Sequence[str] | None = None, folds: int = 5,
                             margin_pct: float = 0.5, seed: int = 0) -> PredictorSelection:
    """Fit each of ``candidates`` (default: all of :data:`LATENCY_PREDICTORS`; the boosted tree only where
    xgboost is installed) in ``folds``-fold cross-validation over the measured configs and keep the one with the
    smallest held-out median absolute error; a predictor later in the list (more complex) must beat every earlier
    one by ``margin_pct`` percentage points. ``table`` is the cost table (layer, option, latency_ms), ``fixed_ms``
    the rest of the model, ``measured`` each config's whole-model latency."""
    measured = np.asarray(list(measured), float)
    choices = list(choices)
    if len(choices) != len(measured) or len(choices) < 4:
        raise ConfigError(f"select_latency_predictor needs at least 4 measured configs with one latency each "
                          f"(got {len(choices)} configs, {len(measured)} latencies)")
    if candidates is None:
        candidates = [n for n in LATENCY_PREDICTORS if n != BoostedLatency.name or _has_xgboost()]
    unknown = [c for c in candidates if c not in LATENCY_PREDICTORS]
    if unknown:
        raise ConfigError(f"unknown latency predictor(s) {unknown}; allowed: {', '.join(LATENCY_PREDICTORS)}")
    folds = max(2, min(folds, len(choices)))
    order = np.random.default_rng(seed).permutation(len(choices))
    parts = np.array_split(order, folds)
    scores: dict[str, dict[str, float]] = {}
    for name in candidates:
        errors = []
        for k in range(folds):
            test = parts[k]
            train = np.concatenate([parts[j] for j in range(folds) if j != k])
            model = LATENCY_PREDICTORS[name](fixed_ms).fit(table, [choices[i] for i in train], measured[train])
            errors += list(abs_pct_errors(model.predict(table, [choices[i] for i in test]), measured[test]))
        scores[name] = {"median_pct": float(np.median(errors)), "p90_pct": float(np.percentile(errors, 90)),
                        "n": len(errors)}
    best = candidates[0]
    for name in candidates[1:]:
        if scores[name]["median_pct"] < scores[best]["median_pct"] - margin_pct:
            best = name
    predictor = LATENCY_PREDICTORS[best](fixed_ms).fit(table, choices, measured)
    return PredictorSelection(best, predictor, scores, folds)


def _has_xgboost() -> bool:
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return False
    return True


def calibration_configs(table: pd.DataFrame, frontier: Sequence[Mapping[str, str]] = (), random: int = 20,
                        seed: int = 0, at_least: int = 0) -> dict[str, dict[str, str]]:
    """The configs to measure end to end for :func:`select_latency_predictor`, by name: every uniform config
    (``uniform-<option>``, float where a layer lacks the option), the given ``frontier`` points (``frontier-<i>``)
    and ``random`` random ones (``random-<i>``), more random ones until there are ``at_least`` (as far as the
    space has that many configs); each distinct config once, under its first name."""
    layers = _layers_of(table)
    options = table.groupby("layer", sort=False)["option"].apply(list).to_dict()
    named: list[tuple[str, dict[str, str]]] = [
        (f"uniform-{o}", {l: o if o in options[l] else "float" for l in layers})
        for o in sorted(set(table["option"]) - {"float"})]
    named.append(("uniform-float", {l: "float" for l in layers}))
    named += [(f"frontier-{i}", {l: c[l] for l in layers}) for i, c in enumerate(frontier)]
    out: dict[str, dict[str, str]] = {}
    seen: set[str] = set()

    def add(name: str, c: dict[str, str]) -> None:
        key = json.dumps(c, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out[name] = c

    for name, c in named:
        add(name, c)
    rng = np.random.default_rng(seed)
    space = float(np.prod([len(options[l]) for l in layers], dtype=float))
    i = 0
    while i < random or (len(out) < min(at_least, space) and i < 100 * max(at_least, 1)):
        add(f"random-{i}", {l: options[l][rng.integers(len(options[l]))] for l in layers})
        i += 1
    return out


def fastest_choice(table: pd.DataFrame, predictor: AdditiveLatency | None = None, sweeps: int = 3
                   ) -> dict[str, str]:
    """The config with the smallest predicted latency: each layer's fastest option in the predictor's separable
    table, then improved one layer at a time by the whole predictor (format switches are not separable)."""
    predictor = predictor or AdditiveLatency()
    corrected, _ = predictor.corrected_table(table)
    best_rows = corrected.loc[corrected.groupby("layer", sort=False)["latency_ms"].idxmin()]
    choice = dict(zip(best_rows["layer"], best_rows["option"]))
    options = corrected.groupby("layer", sort=False)["option"].apply(list).to_dict()
    current = float(predictor.predict(table, [choice])[0])
    for _ in range(sweeps):
        improved = False
        for layer, opts in options.items():
            trials = [{**choice, layer: o} for o in opts if o != choice[layer]]
            if not trials:
                continue
            values = predictor.predict(table, trials)
            i = int(np.argmin(values))
            if values[i] < current - 1e-12:
                choice, current, improved = trials[i], float(values[i]), True
        if not improved:
            break
    return choice

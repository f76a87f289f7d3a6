"""Measured sensitivity, the ground truth the other estimators are judged by.

Each (layer, option) is applied alone (fake-quant with the target kernel's exact numerics, every other layer in
float) and the damage is measured on the given batches: the task-loss increase, and for ``decoupled`` also the KL
divergence of the output distribution from the float one and the distortion of the final features (the input of
the model's last quantizable layer). With ``backend="ray"`` the work fans out through the map function the caller
hands in (``map_fn``: ``mpq.search``/``mpq.study`` pass Ray actors, each holding one copy of the model, shipped once
through the object store); this stage does not import the workers. ``"inprocess"`` runs here. Either way progress is
shown per finished chunk.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Iterable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mpq.calib import CalibrationSet, LossFn, default_loss, model_output
from mpq.config import FLOAT, LayerBits
from mpq.fakequant import FakeQuantLayer
from mpq.layers import LayerInventory, call_model, set_submodule
from mpq.kernel_registry import scheme_for
from mpq.errors import ConfigError
from mpq.sensitivity.base import MapFn, SensitivityEstimator, SensitivityResult, register_estimator
from mpq.space import SearchSpace

log = logging.getLogger(__name__)

METRICS = ("loss", "kl", "feature")
BACKENDS = ("ray", "inprocess")


def check_backend(backend: str, map_fn: MapFn | None, who: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"{who}: backend {backend!r} not supported: use one of {', '.join(BACKENDS)}")
    if backend == "ray" and map_fn is None:
        raise ConfigError(f"{who}: backend 'ray' fans out through a map function: use it through mpq.search or "
                          f"mpq.study (which pass Ray's), give map_fn=mpq.workers.cluster.map_with_shared, or use "
                          f"backend='inprocess'")


def _kl(out_q: torch.Tensor, out_f: torch.Tensor) -> float:
    """KL(float || quantized) of the softmax over the last dim, averaged over every other position."""
    lq = F.log_softmax(out_q.reshape(-1, out_q.shape[-1]).float(), -1)
    lf = F.log_softmax(out_f.reshape(-1, out_f.shape[-1]).float(), -1)
    return float(F.kl_div(lq, lf, log_target=True, reduction="batchmean"))


def _feature_distortion(h_q: torch.Tensor, h_f: torch.Tensor) -> float:
    """Relative squared error of the final features: ``||h_q - h_f||^2 / ||h_f||^2``."""
    return float((h_q.float() - h_f.float()).pow(2).sum() / h_f.float().pow(2).sum().clamp_min(1e-30))


class DeltaRunner:
    """Holds one model copy and the batches; measures the damage of configs (layer -> option), swapping the layers
    for fake-quant ones in place and back, so no copy is made per config."""

    def __init__(self, model: nn.Module, batches: list[tuple[Any, Any]], inventory: LayerInventory, device: str | None,
                 loss_fn: LossFn | None = None, metrics: Iterable[str] = ("loss",), threads: int | None = None,
                 quantizer=None):
        if threads:
            torch.set_num_threads(threads)
        self.model = copy.deepcopy(model).eval()
        self.batches = batches
        self.inventory = inventory
        self.device = device
        self.quantizer = quantizer  # a mpq.quantizers.Quantizer (min-max when None)
        self.loss_fn = loss_fn or default_loss
        self.metrics = tuple(metrics)
        self.feature_layer = inventory.names[-1]
        self.reference = [self._forward(x) for x, _ in batches]

    @torch.no_grad()
    def _forward(self, inputs) -> tuple[Any, torch.Tensor | None]:
        feats: list[torch.Tensor] = []
        handle = None
        if "feature" in self.metrics:
            handle = self.model.get_submodule(self.feature_layer).register_forward_pre_hook(
                lambda mod, args: feats.append(args[0].detach()))
        try:
            out = call_model(self.model, inputs)
        finally:
            if handle is not None:
                handle.remove()
        return out, (feats[0] if feats else None)

    def measure(self, configs: list[dict[str, str]]) -> list[dict[str, float]]:
        """Mean damage per batch on every metric, one dict per config."""
        rows = []
        for config in configs:
            originals = {}
            try:
                for layer, option in config.items():
                    bits = LayerBits.parse(option)
                    if bits != FLOAT:
                        originals[layer] = self.model.get_submodule(layer)
                        scheme = scheme_for(self.inventory[layer], bits, self.device)
                        set_submodule(self.model, layer, FakeQuantLayer(originals[layer], scheme, layer,
                                                                             self.quantizer))
                sums = dict.fromkeys(self.metrics, 0.0)
                for (x, y), (out_f, h_f) in zip(self.batches, self.reference):
                    out_q, h_q = self._forward(x)
                    if "loss" in sums:
                        sums["loss"] += float(self.loss_fn(out_q, y)) - float(self.loss_fn(out_f, y))
                    if "kl" in sums:
                        sums["kl"] += _kl(model_output(out_q), model_output(out_f))
                    if "feature" in sums:
                        sums["feature"] += _feature_distortion(h_q, h_f)
            finally:
                for layer, module in originals.items():
                    set_submodule(self.model, layer, module)
            rows.append({m: v / len(self.batches) for m, v in sums.items()})
        return rows


def runner_of(shared: tuple) -> DeltaRunner:
    """A Ray actor's runner from the shared tuple ``(model, batches, inventory, device, loss_fn, metrics, threads,
    quantizer)``, shipped once (``setup`` of ``mpq.workers.cluster.map_with_shared`` and its pool)."""
    return DeltaRunner(*shared)


def measure_chunk(runner: DeltaRunner, configs: list[dict[str, str]]) -> list[dict[str, float]]:
    return runner.measure(configs)


def config_damage(model: nn.Module, calib: CalibrationSet, configs: list[dict[str, str]], inventory: LayerInventory,
                  device: str | None, loss_fn: LossFn | None = None, metrics: Iterable[str] = ("loss",),
                  backend: str = "inprocess", address: str | None = None, workers: int | None = None,
                  chunk_size: int = 4, progress: bool = True, desc: str = "damage",
                  quantizer=None, map_fn: MapFn | None = None) -> list[dict[str, float]]:
    """The damage of each config (layer -> option name, other layers float) on every metric, in order; weights
    rounded by ``quantizer`` (a :class:`mpq.quantizers.Quantizer`, min-max when None). ``backend="ray"`` fans the
    chunks out through ``map_fn`` (the signature of ``mpq.workers.cluster.map_with_shared``)."""
    metrics = tuple(metrics)
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ConfigError(f"unknown damage metrics {sorted(unknown)}; available: {', '.join(METRICS)}")
    check_backend(backend, map_fn, "measured damage")
    if loss_fn is None:
        calib = calib.with_pseudo_labels(model)
    chunks = [list(range(i, min(i + chunk_size, len(configs)))) for i in range(0, len(configs), chunk_size)]
    results: dict[int, dict[str, float]] = {}
    bar = tqdm(total=len(configs), desc=desc, disable=not progress, leave=False)
    try:
        if backend == "inprocess":
            runner = DeltaRunner(model, calib.batches, inventory, device, loss_fn, metrics, None, quantizer)
            for chunk in chunks:
                results.update(zip(chunk, runner.measure([configs[i] for i in chunk])))
                bar.update(len(chunk))
        else:  # each worker holds one copy of the model and batches, shipped once
            shared = (model, calib.batches, inventory, device, loss_fn, metrics, 1, quantizer)
            damage = map_fn(measure_chunk, shared, [[configs[j] for j in c] for c in chunks], workers,
                            address, setup=runner_of, on_result=lambda i, _: bar.update(len(chunks[i])))
            for chunk, values in zip(chunks, damage):
                results.update(zip(chunk, values))
    finally:
        bar.close()
    return [results[i] for i in range(len(configs))]


def single_layer_deltas(model: nn.Module, calib: CalibrationSet, space: SearchSpace, inventory: LayerInventory,
                        loss_fn: LossFn | None = None, metrics: Iterable[str] = ("loss",), backend: str = "inprocess",
                        address: str | None = None, workers: int | None = None, chunk_size: int = 4,
                        progress: bool = True, map_fn: MapFn | None = None) -> pd.DataFrame:
    """One row per (layer, option) of ``space``: the mean damage per batch on every metric (float rows are 0)."""
    pairs = [(l, b.name) for l, b in space.pairs() if b != FLOAT]
    damage = config_damage(model, calib, [{l: o} for l, o in pairs], inventory, space.device, loss_fn, metrics,
                           backend, address, workers, chunk_size, progress, desc="single-layer damage",
                           quantizer=space.quantizer, map_fn=map_fn)
    by_pair = dict(zip(pairs, damage))
    zero = dict.fromkeys(tuple(metrics), 0.0)
    return pd.DataFrame([{"layer": l, "option": b.name, **by_pair.get((l, b.name), zero)} for l, b in space.pairs()])


@register_estimator
class MeasuredEstimator(SensitivityEstimator):
    """Ground truth: the task-loss increase of each (layer, option) applied alone, measured on the batches given."""

    name = "measured"

    def __init__(self, backend: str = "ray", address: str | None = None, workers: int | None = None,
                 chunk_size: int = 4, map_fn: MapFn | None = None):
        check_backend(backend, map_fn, "estimator 'measured'")
        self.backend, self.address, self.workers, self.chunk_size = backend, address, workers, chunk_size
        self.map_fn = map_fn

    def estimate(self, model, calib, space, inventory, loss_fn=None, progress=True) -> SensitivityResult:
        t0 = time.perf_counter()
        deltas = single_layer_deltas(model, calib, space, inventory, loss_fn, ("loss",), self.backend, self.address,
                                     self.workers, self.chunk_size, progress, self.map_fn)
        scores = deltas.rename(columns={"loss": "raw_score"})
        n = int((scores["option"] != FLOAT.name).sum())
        cost = {"forward_passes": (n + 1) * len(calib), "backward_passes": 0, "seconds": time.perf_counter() - t0,
                "backend": self.backend}
        return SensitivityResult(self.name, scores, pd.DataFrame(), cost,
                                 {"loss": deltas.rename(columns={"loss": "value"})})


@register_estimator
class DecoupledEstimator(SensitivityEstimator):
    """MixDQ's metric-decoupled sensitivity.

    Every (layer, option) is measured on several damage metrics (task loss; KL of the output distribution from the
    float one; relative distortion of the final features). Each metric is normalised by its own total over the most
    aggressive allocation, each layer is assigned to the metric it affects most (largest normalised damage), and
    within each metric group scores are scaled so the group's largest is 1: layers that mainly hurt a metric which
    rarely dominates are not drowned out by the others. The per-metric tables are exposed (``result.tables``) so a
    solver can weight or cap each metric.
    """

    name = "decoupled"

    def __init__(self, metrics: Iterable[str] = ("loss", "kl", "feature"), backend: str = "ray",
                 address: str | None = None, workers: int | None = None, chunk_size: int = 4,
                 map_fn: MapFn | None = None):
        self.metrics = tuple(metrics)
        if len(self.metrics) < 2 or set(self.metrics) - set(METRICS):
            raise ConfigError(f"metric-decoupled sensitivity needs at least two metrics of {', '.join(METRICS)}, "
                              f"got {list(self.metrics)}")
        check_backend(backend, map_fn, "estimator 'decoupled'")
        self.backend, self.address, self.workers, self.chunk_size = backend, address, workers, chunk_size
        self.map_fn = map_fn

    def estimate(self, model, calib, space, inventory, loss_fn=None, progress=True) -> SensitivityResult:
        t0 = time.perf_counter()
        deltas = single_layer_deltas(model, calib, space, inventory, loss_fn, self.metrics, self.backend,
                                     self.address, self.workers, self.chunk_size, progress, self.map_fn)
        shares = deltas[["layer", "option"]].copy()
        for m in self.metrics:
            pos = deltas[m].clip(lower=0)
            total = float(pos.groupby(deltas["layer"]).max().sum()) or 1.0
            shares[m] = pos / total
        per_layer = shares.groupby("layer", sort=False)[list(self.metrics)].max()
        dominant = per_layer.idxmax(axis=1)
        scores = deltas[["layer", "option"]].copy()
        scores["metric"] = scores["layer"].map(dominant)
        scores["raw_score"] = 0.0
        for m in self.metrics:
            group = scores["metric"] == m
            top = float(deltas.loc[group, m].clip(lower=0).max()) if group.any() else 0.0
            scores.loc[group, "raw_score"] = deltas.loc[group, m].clip(lower=0) / (top if top > 0 else 1.0)
        stats = per_layer.reset_index().rename(columns={m: f"share_{m}" for m in self.metrics})
        stats["metric"] = stats["layer"].map(dominant)
        n = int((deltas["option"] != FLOAT.name).sum())
        cost = {"forward_passes": (n + 1) * len(calib), "backward_passes": 0, "seconds": time.perf_counter() - t0,
                "groups": {m: int((dominant == m).sum()) for m in self.metrics}}
        tables = {m: deltas[["layer", "option", m]].rename(columns={m: "value"}) for m in self.metrics}
        return SensitivityResult(self.name, scores, stats, cost, tables)

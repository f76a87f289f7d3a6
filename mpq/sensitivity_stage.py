"""The sensitivity stage of a study: the estimator's scores per (layer, option), reused from the run directory when
an earlier run scored the same model, data, space and estimator (that is what makes a study resumable).

Part of the face: it hands the estimators their parallel map (the workers' Ray actors) so that the sensitivity
stage itself never imports the workers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
import pandas as pd
import torch
from torch import nn

from mpq.calib import CalibrationSet, LossFn
from mpq.artifacts import read_json, read_table
from mpq.layers import LayerInventory, first_tensor
from mpq.options import SensitivityOptions
from mpq.space import SearchSpace

log = logging.getLogger(__name__)
RECORD = "sensitivity.json"


def hash_model(model: nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else
                 t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def hash_calibration(calib: CalibrationSet) -> str:
    h = hashlib.sha1()
    for x, y in calib.batches:
        for t in (first_tensor(x), y):
            if isinstance(t, torch.Tensor):
                h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def scores_key(model_hash: str, calib_hash: str, options: SensitivityOptions, space: SearchSpace,
               loss_fn: LossFn | None, quantizer_settings: dict) -> str:
    """What the scores depend on; a run directory whose scores have this key can lend them."""
    return hashlib.sha1(json.dumps({
        "model": model_hash, "calib": calib_hash, "estimator": str(options.sensitivity),
        "options": dict(options.sensitivity_options), "space": space.to_frame().to_dict("list"),
        "device": str(space.device), "loss": getattr(loss_fn, "__qualname__", None), "quantizer": quantizer_settings},
        sort_keys=True, default=str).encode()).hexdigest()


def reuse_scores(out: Path | None, key: str):
    """The SensitivityResult an earlier run left in ``out`` under ``key``, or None."""
    from mpq.sensitivity import SensitivityResult

    if out is None or not (out / RECORD).exists() or not (out / "scores.csv").exists():
        return None
    meta = read_json(out / RECORD, "run directory")
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None
    log.info("sensitivity: reusing %s from an earlier run (same model, data, space, estimator)", out / "scores.csv")
    stats = read_table(out / "layer_stats.csv") if (out / "layer_stats.csv").exists() else pd.DataFrame()
    tables = {name: read_table(out / f"scores_{name.replace(':', '_')}.csv") for name in meta.get("tables", [])
              if (out / f"scores_{name.replace(':', '_')}.csv").exists()}
    return SensitivityResult(meta["estimator"], read_table(out / "scores.csv"), stats,
                             {**meta.get("cost", {}), "reused": True}, tables)


def save_scores(out: Path, key: str, result) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.scores.to_csv(out / "scores.csv", index=False)
    result.layer_stats.to_csv(out / "layer_stats.csv", index=False)
    for name, table in result.tables.items():
        table.to_csv(out / f"scores_{name.replace(':', '_')}.csv", index=False)
    (out / RECORD).write_text(json.dumps({"key": key, "estimator": result.estimator, "cost": result.cost,
                                          "tables": sorted(result.tables)}, indent=2, default=str))


def ray_map(address: str | None):
    """The workers' map over Ray actors that each hold one copy of the shared state (estimators fan out with it)."""
    from mpq.workers.cluster import map_with_shared

    return functools.partial(_map_at, map_with_shared, address)


def _map_at(map_fn, address, fn, shared, items, workers=None, _address=None, **kwargs):
    return map_fn(fn, shared, items, workers, _address or address, **kwargs)


def run_sensitivity(model: nn.Module, calib: CalibrationSet, space: SearchSpace, inventory: LayerInventory,
                    options: SensitivityOptions, loss_fn: LossFn | None, key: str, out: Path | None,
                    address: str | None, progress: bool):
    """The estimator's result: reused from ``out`` when its key matches, else computed (and saved to ``out``)."""
    from mpq.sensitivity import get_estimator

    reused = reuse_scores(out, key)
    if reused is not None:
        return reused
    estimator = get_estimator(options.sensitivity, ray_map(address), **dict(options.sensitivity_options))
    result = estimator.run(model, calib, space, inventory, loss_fn=loss_fn, progress=progress)
    if options.sensitivity_check:
        result.cost["check"] = spot_check(model, calib, space, inventory, result.scores, loss_fn,
                                          options.sensitivity_check)
    if out is not None:
        save_scores(out, key, result)
    return result


def spot_check(model: nn.Module, calib: CalibrationSet, space: SearchSpace, inventory: LayerInventory,
               scores: pd.DataFrame, loss_fn: LossFn | None, pairs: int, seed: int = 0) -> dict:
    """Kendall tau of the estimator's scores against the measured damage of ``pairs`` random single-layer options
    (fake-quant, task-loss increase). A run has no held-out split, so this is measured on the calibration data:
    it says whether the estimator ranks this model's options at all, at ``pairs`` forward passes over the data
    (the held-out judgement is ``mpq sensitivity-report``)."""
    import time

    import numpy as np
    from scipy.stats import kendalltau

    from mpq.config import FLOAT
    from mpq.sensitivity.measured import config_damage

    t0 = time.perf_counter()
    candidates = scores[scores["option"] != FLOAT.name].reset_index(drop=True)
    if len(candidates) < 3:
        return {"pairs": len(candidates), "tau": None, "seconds": 0.0}
    picked = candidates.iloc[np.random.default_rng(seed).choice(len(candidates), min(pairs, len(candidates)),
                                                                 replace=False)]
    configs = [{l: o} for l, o in zip(picked["layer"], picked["option"])]
    damage = [d["loss"] for d in config_damage(model, calib, configs, inventory, space.device, loss_fn,
                                               progress=False, quantizer=space.quantizer)]
    predicted = picked["raw_score"].astype(float).to_numpy()
    tau = float(kendalltau(predicted, damage).statistic) if np.ptp(predicted) > 0 and np.ptp(damage) > 0 else None
    out = {"pairs": len(configs), "tau": tau, "seconds": time.perf_counter() - t0, "split": "calibration"}
    log.info("sensitivity check: Kendall tau %s of the scores against the measured damage of %d single-layer "
             "options (calibration split, %.1f s)", "n/a" if tau is None else f"{tau:.3f}", len(configs),
             out["seconds"])
    return out


def score_columns(sens) -> pd.DataFrame:
    """The estimator's ``score`` plus every other normalised table it exposes, as ``score_<name>`` columns (a
    combination's members, the decoupled estimator's per-metric damage) for weighted objectives and caps."""
    from mpq.sensitivity import normalize

    cols = sens.scores[["layer", "option", "score", *[c for c in sens.scores if c.startswith("score_")]]]
    for name, t in sens.tables.items():
        if "value" in t.columns:
            extra = normalize(t.rename(columns={"value": "raw_score"}))[["layer", "option", "score"]]
            cols = cols.merge(extra.rename(columns={"score": f"score_{name.replace(':', '_')}"}),
                              on=["layer", "option"], how="left")
    return cols


__all__ = ["run_sensitivity", "spot_check", "scores_key", "hash_model", "hash_calibration", "score_columns",
           "reuse_scores", "ray_map"]

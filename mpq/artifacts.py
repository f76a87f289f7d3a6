"""The run directory: everything a search found, as plain files that the report and the dashboard read.

    config.json        the chosen BitConfig (load with BitConfig.load, apply with mpq.apply)
    run.json           settings, device fingerprint, budget, reference and summary numbers
    summary.csv        float / chosen / uniform INT8 / uniform INT4: predicted vs measured latency and metric
    layers.csv         per layer: shape, MACs, chosen option, score, costs, Hessian statistics
    frontier.csv       frontier points (swept resource, score, costs, fake-quant metric, allocation as JSON)
    costs.csv          per (layer, option): score, size, BOPs, latency
    scores.csv         the estimator's table; layer_stats.csv its per-layer statistics
    latency.csv        the profile table (per workload: median, quartiles, source)
    kept_float.csv     modules with parameters that stay in float, and why
    report.md          the human-readable report
    dashboard.html     the Plotly dashboard (standalone, works offline)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

RUN_FILE = "run.json"


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_run(result, out: str | Path) -> Path:
    """Write the tables, config, run.json and report of a :class:`~mpq.api.SearchResult` into ``out``."""
    from mpq.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.config.save(out / "config.json")
    result.summary.to_csv(out / "summary.csv", index=False)
    result.layers.to_csv(out / "layers.csv", index=False)
    result.frontier.to_csv(out / "frontier.csv", index=False)
    result.table.to_csv(out / "costs.csv", index=False)
    result.sensitivity.scores.to_csv(out / "scores.csv", index=False)
    result.sensitivity.layer_stats.to_csv(out / "layer_stats.csv", index=False)
    result.latency.save(out / "latency.csv")
    result.inventory.kept_float_frame().to_csv(out / "kept_float.csv", index=False)
    run = {"format": "mpq.run", "version": 1, **result.info, "config": result.config.to_dict(),
           "summary": result.summary.to_dict("records")}
    (out / RUN_FILE).write_text(json.dumps(_clean(run), indent=2) + "\n")
    write_report(out)
    result.run_dir = out
    return out


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The run's JSON plus its tables as DataFrames (``summary``, ``layers``, ``frontier``, ...)."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not an mpq run directory: it has no {RUN_FILE}")
    run = json.loads(path.read_text())
    for name in ("summary", "layers", "frontier", "costs", "kept_float", "latency", "estimators",
                 "estimator_options", "estimator_configs"):
        p = run_dir / f"{name}.csv"
        try:
            run[f"{name}_table"] = pd.read_csv(p) if p.exists() else None if name.startswith("estimator") \
                else pd.DataFrame()
        except pd.errors.EmptyDataError:
            run[f"{name}_table"] = pd.DataFrame()
    run["run_dir"] = str(run_dir)
    return run

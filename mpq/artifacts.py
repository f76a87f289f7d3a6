"""The run directory: everything a search found, as plain files that the report and the dashboard read.

    config.json        the chosen BitConfig (load with BitConfig.load, apply with mpq.apply)
    run.json           settings, device fingerprint, budget, reference and summary numbers
    summary.csv        float / chosen / uniform INT8 / uniform INT4: predicted vs measured latency and metric
    layers.csv         per layer: shape, MACs, chosen option, score, costs, Hessian statistics
    frontier.csv       frontier points (swept resource, score, costs, fake-quant metric, allocation key)
    costs.csv          per (layer, option): score, size, BOPs, latency (one column per latency phase)
    scores.csv         the estimator's table; layer_stats.csv its per-layer statistics
    latency.csv        the profile table (per workload: median, quartiles, source)
    kept_float.csv     modules with parameters that stay in float, and why
    report.md          the human-readable report
    dashboard.html     the Plotly dashboard (standalone, works offline)
    study.json         the study's record (its options, reference, fixed costs, phases): what `mpq solve` and
                       `mpq.load_study` read, with study_costs.csv, study_layers.csv and the scores

:func:`write_run` writes a result once; :func:`read_run` is the one reader (the report, the dashboards and resume all
go through it): allocation keys come back as :class:`~mpq.config.Choice` objects, and a file that is not what mpq
wrote is a :class:`~mpq.errors.RunDirectoryError` naming it, not a decoder's traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from mpq.config import Choice
from mpq.errors import RunDirectoryError

RUN_FILE = "run.json"
STUDY_FILE = "study.json"
# files whose presence makes a directory an mpq run (written by search, study, the CLI or a multi-device search)
MARKERS = (RUN_FILE, STUDY_FILE, "search_args.json", "sensitivity.json", "devices.json")
TABLES = ("summary", "layers", "frontier", "costs", "kept_float", "latency", "estimators", "estimator_options",
          "estimator_configs")


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


def is_run_dir(path: str | Path) -> bool:
    return any((Path(path) / m).exists() for m in MARKERS)


def prepare_run_dir(out: str | Path | None, force: bool = False) -> Path | None:
    """``out`` made ready to write into: refused (a :class:`RunDirectoryError`) when it is a file, or a non-empty
    directory that is not an mpq run, unless ``force`` (then files mpq writes replace the ones of the same name;
    others stay)."""
    if out is None:
        return None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {out} is a file, not a directory: give a new or empty directory")
    if out.is_dir() and not force and not is_run_dir(out):
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise RunDirectoryError(f"{out} holds {len(entries)} entries that are not an mpq run ({shown}): mpq "
                                    f"would overwrite files there. Give a new or empty directory, or force=True "
                                    f"(--force) to write into it anyway")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_run(result, out: str | Path) -> Path:
    """Write the tables, config and run.json of a :class:`~mpq.study_result.SearchResult` into ``out`` (the report and
    the dashboard are rendered from them by the caller)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.config.save(out / "config.json")
    result.summary.to_csv(out / "summary.csv", index=False)
    result.layers.to_csv(out / "layers.csv", index=False)
    result.frontier.to_csv(out / "frontier.csv", index=False)
    result.table.to_csv(out / "costs.csv", index=False)
    result.sensitivity.scores.to_csv(out / "scores.csv", index=False)
    result.sensitivity.layer_stats.to_csv(out / "layer_stats.csv", index=False)
    latency = result.latency
    (latency.frame if hasattr(latency, "frame") else latency).to_csv(out / "latency.csv", index=False)
    result.extra.get("kept_float", pd.DataFrame()).to_csv(out / "kept_float.csv", index=False)
    run = {"format": "mpq.run", "version": 1, **result.info, "config": result.config.to_dict(),
           "summary": result.summary.to_dict("records")}
    write_json(out / RUN_FILE, run)
    result.run_dir = out
    return out


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(_clean(data), indent=2, default=str) + "\n")
    return path


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON file mpq wrote; anything else (binary, truncated, not JSON) is a :class:`RunDirectoryError`."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise RunDirectoryError(f"{path.parent} has no {path.name}: not an mpq {what}") from None
    except UnicodeDecodeError as e:
        raise RunDirectoryError(f"{path} is not text (byte {e.start} is not UTF-8): not the {path.name} mpq "
                                f"writes; move it away or use another directory") from None
    except json.JSONDecodeError as e:
        raise RunDirectoryError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): not the {path.name} mpq "
                                f"writes; move it away or use another directory") from None


def read_table(path: Path) -> pd.DataFrame:
    """A CSV table mpq wrote (empty if the file is empty); a binary or malformed file is an error naming it."""
    try:
        # layer names of an nn.Sequential ("0", "2") must stay names, not become numbers
        return pd.read_csv(path, dtype={"layer": str, "option": str, "name": str})
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except ValueError as e:  # UnicodeDecodeError, ParserError
        raise RunDirectoryError(f"{path} is not a CSV table written by mpq ({type(e).__name__}): move it away "
                                f"or use another run directory") from None


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The run's JSON plus its tables as DataFrames (``summary_table``, ``layers_table``, ``frontier_table``,
    ...): ``choice`` columns hold :class:`Choice` objects, ``histogram`` columns dicts."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).exists():
        raise RunDirectoryError(f"{run_dir} is not an mpq run directory: it has no {RUN_FILE}")
    run = read_json(run_dir / RUN_FILE, "run directory")
    if not isinstance(run, dict):
        raise RunDirectoryError(f"{run_dir / RUN_FILE} holds a {type(run).__name__}, not the object mpq writes")
    for name in TABLES:
        p = run_dir / f"{name}.csv"
        run[f"{name}_table"] = read_table(p) if p.exists() else None if name.startswith("estimator") \
            else pd.DataFrame()
    for name in ("summary", "frontier"):
        table = run[f"{name}_table"]
        if table is not None and "choice" in table.columns:
            table["choice"] = [_choice(v, run_dir / f"{name}.csv") for v in table["choice"]]
        if table is not None and "histogram" in table.columns:
            table["histogram"] = [json.loads(h) if isinstance(h, str) else {} for h in table["histogram"]]
    run["run_dir"] = str(run_dir)
    return run


def _choice(key: Any, where: Path) -> Choice:
    try:
        return Choice.from_key(key)
    except Exception as e:
        raise RunDirectoryError(f"{where}: a 'choice' cell is not an allocation key ({e})") from None


__all__ = ["write_run", "read_run", "read_json", "read_table", "write_json", "prepare_run_dir", "is_run_dir",
           "RUN_FILE", "STUDY_FILE"]

"""The front door: :func:`search` finds per-layer bits under a budget, :func:`apply` installs them.

``search`` is the one-call form of a study (:func:`mpq.study`, then :meth:`~mpq.studies.Study.solve` with
evaluation): it leaves the model alone and returns data (a :class:`~mpq.study_result.SearchResult`). ``apply``
changes the model, swapping each quantized layer for a module that runs the device's real kernel. This module,
:mod:`mpq.cli` and the study modules (``mpq.studies``, ``mpq.study_*``, ``mpq.*_stage``) are the face: the only part
of mpq that reaches into the stage packages (sensitivity, workers, solvers, dashboards), and they do so when
called.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from torch import nn

from mpq.apply_kernels import apply, eval_mode, load_quantized, prepared_quantizer
from mpq.budget import Budget
from mpq.calib import LossFn
from mpq.config import BitConfig
from mpq.errors import ConfigError
from mpq.kernel_registry import normalize_device
from mpq.space import validate_config as _validate_config
from mpq.studies import study
from mpq.study_result import SearchResult

log = logging.getLogger(__name__)


def validate_config(config: BitConfig | str | Path, model: nn.Module, device: str = "cpu",
                    example_input: Any = None) -> None:
    """Raise :class:`~mpq.errors.ConfigError` if a layer the config names is missing or its bits have no kernel on
    ``device`` (naming the layer and the allowed options)."""
    config = config if isinstance(config, BitConfig) else BitConfig.load(config)
    _validate_config(config, model, device=device, example_input=example_input)


def search(model: nn.Module, calib_data: Any, eval_fn: Callable[[nn.Module], float] | None = None, *,
           budget: Budget | Mapping[str, float] | str, out: str | Path | None = None, force: bool = False,
           loss_fn: LossFn | None = None, model_name: str | None = None, progress: bool = True,
           command: str | None = None, **options: Any) -> SearchResult:
    """Find per-layer bits that keep the most accuracy within ``budget`` on ``device``: :func:`mpq.study` (layer
    discovery, search space from the device's kernels, costs and budget reachability, latency of every workload
    measured on the device, sensitivity), then :meth:`Study.solve` with evaluation (the ILP under the budget, the
    exact frontiers, the chosen config and uniform INT8/INT4 baselines applied on the real kernels, timed and
    evaluated with ``eval_fn``). With ``out``, writes the run directory (config, tables, report, dashboard, the
    study's record); re-running into the same ``out`` reuses finished sensitivities.

    ``budget``: absolute (``size_mb``, ``bops``, ``latency_ms``) or relative to the float model (``size``,
    ``latency``, ``bops_ratio``), per latency phase (``latency_ms@1``, ``decode@1``, ``prefill_ms@2048``), as a
    :class:`Budget`, dict or string like ``"size=0.3"``.

    ``options`` are every stage's options (:mod:`mpq.options`, all validated before anything runs), with the same
    names and defaults as before studies existed: ``device="cpu"`` (or ``"cuda"``, or a kind of Ray node such as
    ``"cuda:h100"``); ``allowed``, ``pinned``; ``sensitivity="fisher"`` (an estimator or a weighted combination
    such as ``"0.7*fisher+0.3*lrp"``) and ``sensitivity_options``; ``quantizer="gptq"`` (``"mse"``, ``"minmax"``)
    and ``quantizer_options``; ``profile="ray"`` (or ``"inprocess"``), ``address``, ``workers``, ``threads``,
    ``repeats=15``, ``warmup=3``, ``batch_size``, ``cache=True``; ``solver="ilp"`` (``"pareto"``, ``"greedy"``,
    ``"optuna"``, ``"exhaustive"``, ``"ilp+refine"``: the ILP's choice improved by a measured local search, options
    ``max_evals``, ``time_limit``), ``solver_options`` (e.g. ``{"caps": {"score_kl": 0.2}}``, ``{"min_bits":
    {"fc2": 8}}``; a constraint the solver does not honour is refused), ``tie_tolerance=0.01`` (allocations within
    this much of the lowest normalised score are ties, the fastest wins), ``frontier_points=12``;
    ``evaluate_frontier=True``, ``evaluate_workers``, ``metric``, ``higher_is_better``.
    ``out`` must be new, empty or an mpq run directory (``force=True`` writes into any directory).
    """
    from mpq.study_result import write

    t0 = time.perf_counter()
    s = study(model, calib_data, eval_fn, budgets=[budget], out=out, force=force, loss_fn=loss_fn,
              model_name=model_name, progress=progress, command=command, **options)
    result = s.solve(budget, evaluate=True)
    result.info["stages_seconds"]["total"] = time.perf_counter() - t0
    if out is not None:
        write(result, out, force=True)
    log.info("search done in %.1fs: %r", result.info["stages_seconds"]["total"], result)
    return result


def search_devices(model: nn.Module, calib_data: Any, eval_fn: Callable[[nn.Module], float] | None = None, *,
                   devices: Iterable[str], out: str | Path | None = None, **options: Any) -> dict[str, SearchResult]:
    """:func:`search` for each target device (``["cpu", "cuda:h100"]``): each with that device's options, its
    latencies measured on nodes of that kind, its own frontier and choice. With ``out``, each run goes to
    ``out/<device>/`` and ``out/dashboard.html`` shows the devices' frontiers side by side."""
    from mpq.artifacts import prepare_run_dir, write_json
    from mpq.target import Target

    devices = list(devices)
    targets = [Target.parse(d) for d in devices]
    if not targets or len({t.name for t in targets}) != len(targets):
        raise ConfigError(f"devices {devices!r}: give one or more distinct target devices")
    out = prepare_run_dir(out, options.pop("force", False))
    results = {t.name: search(model, calib_data, eval_fn, device=t.spec,
                              out=None if out is None else out / t.slug, **options) for t in targets}
    if out is not None:
        from mpq.dashboards import write_dashboard

        write_json(out / "devices.json", {t.name: {"run": t.slug, "summary": repr(results[t.name]),
                                                   "fingerprint_id": results[t.name].info["fingerprint_id"]}
                                          for t in targets})
        write_dashboard([out / t.slug for t in targets], out / "dashboard.html", side_by_side=True)
    return results


def sensitivity_report(model: nn.Module, calib_data: Any, heldout_data: Any,
                       estimators: Iterable[str] = ("fisher", "hessian", "lrp", "decoupled", "entropy", "measured"),
                       n_configs: int = 50, device: str | None = "cpu", loss_fn: LossFn | None = None, seed: int = 0,
                       options: Mapping[str, Mapping[str, Any]] | None = None, backend: str = "inprocess",
                       out: str | Path | None = None, progress: bool = True):
    """Judge sensitivity estimators against measured damage (see :mod:`mpq.sensitivity.judge`).

    Each estimator runs on ``calib_data``; the truth is the loss increase on ``heldout_data`` of every single-layer
    option and of ``n_configs`` random mixed configs. The options are those of ``device``'s kernels, or, with
    ``device=None``, a generic 2-8-bit space (:func:`mpq.space.generic_space`) that spans more damage. Returns an
    ``EstimatorReport`` (``.table`` holds Kendall tau and Spearman rho per estimator, per option and per config,
    with each estimator's cost); with ``out``, writes ``estimators.csv``, the per-option and per-config tables and
    ``estimators.html``.
    """
    from mpq.sensitivity.judge import judge_estimators
    from mpq.sensitivity_stage import ray_map

    with eval_mode(model):
        return judge_estimators(model, calib_data, heldout_data, estimators, n_configs,
                                None if device is None else normalize_device(device),
                                loss_fn=loss_fn, seed=seed, options=options, backend=backend, progress=progress,
                                out=out, map_fn=ray_map(None) if backend == "ray" else None)


__all__ = ["search", "search_devices", "apply", "load_quantized", "prepared_quantizer", "sensitivity_report",
           "validate_config", "SearchResult", "study"]

"""The front door: :func:`search` finds per-layer bits under a budget, :func:`apply` installs them.

``search`` leaves the model alone and returns data (a :class:`SearchResult`); ``apply`` changes the model, swapping
each quantized layer for a module that runs the device's real kernel. This module is the only part of the core that
reaches into the stage packages (sensitivity, workers, solvers, dashboards), and it does so when called.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
import torch
from torch import nn

from mpq.budget import Budget
from mpq.calib import CalibrationSet, LossFn
from mpq.config import FLOAT, BitConfig, LayerBits
from mpq.costs import MB, Reference, build_cost_table, fixed_costs, float_reference
from mpq.errors import ConfigError
from mpq.layers import LayerInventory, discover_layers, first_tensor, set_submodule
from mpq.quantizers import Quantizer, get_quantizer
from mpq.kernel_registry import kernel_for, normalize_device, torch_device
from mpq.space import SearchSpace, build_search_space, validate_config

log = logging.getLogger(__name__)

INT8_PREFERENCE = ("w8a8", "w8a16")  # uniform INT8 baseline: the first of these each layer offers
INT4_PREFERENCE = ("w4a16g128", "w4a16g64", "w4a16g32", "w4a16", "w4a8")  # uniform INT4: fewest bytes first


# --------------------------------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------------------------------
def apply(model: nn.Module, bit_config: BitConfig | str | Path, device: str = "cpu",
          inventory: LayerInventory | None = None, quantizer: str | Quantizer | None = None,
          calib_data: Any = None) -> nn.Module:
    """Swap every quantized layer of ``bit_config`` for its kernel's module on ``device``; float layers stay.

    Changes ``model`` in place and returns it. The config is validated first: a missing layer or bits that no kernel
    of ``device`` runs raise a :class:`~mpq.errors.ConfigError` naming the layer and the allowed options.
    ``quantizer`` chooses the integers (``"minmax"``, ``"mse"``, ``"gptq"`` or an instance); by default the one the
    search recorded in the config's metadata. GPTQ needs ``calib_data`` (unless given an already prepared instance),
    whose inputs reach every layer before any layer is swapped.
    """
    config = bit_config if isinstance(bit_config, BitConfig) else BitConfig.load(bit_config)
    dev = normalize_device(device)
    inv = inventory or discover_layers(model)
    validate_config(config, model, dev, inventory=inv)
    quant = prepared_quantizer(quantizer if quantizer is not None else config.meta.get("quantizer"), model,
                               calib_data, inv)
    for name, bits in config.quantized().items():
        layer = inv[name]
        quantized = kernel_for(layer, bits, dev).quantize_module(model.get_submodule(name), layer, bits, quant)
        set_submodule(model, name, quantized.to(torch_device(device)))
    model.eval()
    return model


def prepared_quantizer(spec: str | Mapping[str, Any] | Quantizer | None, model: nn.Module, calib_data: Any,
                       inventory: LayerInventory) -> Quantizer:
    """The quantizer named by ``spec`` (a name, recorded settings ``{"name": ..., **options}``, or an instance),
    prepared on ``calib_data`` when it needs calibration and has none yet."""
    if isinstance(spec, Mapping):
        options = dict(spec)
        quant = get_quantizer(options.pop("name", None), **options)
    else:
        quant = get_quantizer(spec)
    if quant.needs_calibration and not quant.prepared:
        if calib_data is None:
            raise ConfigError(f"quantizer {quant.name!r} rounds with calibration inputs: pass calib_data (the "
                              f"search's calibration batches), or use quantizer='minmax' or 'mse'")
        with _eval_mode(model):
            quant.prepare(model, CalibrationSet.from_any(calib_data).inputs(), inventory)
    return quant


def load_quantized(model: nn.Module, bit_config: BitConfig | str | Path, state_dict: str | Path | Mapping,
                   device: str = "cpu") -> nn.Module:
    """Rebuild a saved quantized model: apply the config to a fresh float model, then load the packed weights
    (a state dict of plain tensors, loaded with ``weights_only=True``)."""
    apply(model, bit_config, device, quantizer="minmax")  # the loaded state replaces the integers
    state = torch.load(state_dict, map_location=device, weights_only=True) if isinstance(state_dict, (str, Path)) \
        else state_dict
    model.load_state_dict(state)
    return model


# --------------------------------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """What a search found: the chosen config, the frontier, per-layer tables, and measured numbers."""

    config: BitConfig
    frontier: pd.DataFrame
    layers: pd.DataFrame
    table: pd.DataFrame
    summary: pd.DataFrame
    info: dict[str, Any]
    latency: Any = None  # mpq.workers.LatencyTable
    sensitivity: Any = None  # mpq.sensitivity.SensitivityResult
    inventory: LayerInventory | None = None
    run_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> dict[str, Any]:
        return self.summary.set_index("name").loc[name].to_dict()

    @property
    def measured(self) -> dict[str, Any]:
        """The applied (real-kernel) model's measured latency and metric for the chosen config."""
        r = self.row("chosen")
        return {"latency_ms": r["latency_measured_ms"], "metric": r["metric_real"],
                "metric_fakequant": r["metric_fakequant"], "latency_predicted_ms": r["latency_predicted_ms"]}

    def __repr__(self) -> str:
        r = self.row("chosen")
        return (f"SearchResult({self.config!r}, size {r['size_mb']:.4g} MB, predicted {r['latency_predicted_ms']:.4g} "
                f"ms, measured {r['latency_measured_ms']:.4g} ms, {self.info.get('metric')} {r['metric_real']})")


def _hash_model(model: nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else
                 t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _hash_calib(calib: CalibrationSet) -> str:
    h = hashlib.sha1()
    for x, y in calib.batches:
        for t in (first_tensor(x), y):
            if isinstance(t, torch.Tensor):
                h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _resize_batch(inputs: Any, n: int) -> Any:
    """The example input with batch size ``n`` (rows repeated or cut)."""
    if isinstance(inputs, torch.Tensor):
        reps = -(-n // inputs.shape[0])
        return inputs.repeat(reps, *([1] * (inputs.dim() - 1)))[:n] if reps > 1 else inputs[:n]
    if isinstance(inputs, dict):
        return {k: _resize_batch(v, n) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_resize_batch(v, n) for v in inputs)
    return inputs


def uniform_choice(space: SearchSpace, preference: Iterable[str], fallback: Mapping[str, str] | None = None
                   ) -> dict[str, str]:
    """Per layer, the first preferred option it offers (else ``fallback``'s, else float)."""
    out = {}
    for layer, opts in space.options.items():
        names = [b.name for b in opts]
        pick = next((p for p in preference if p in names), None)
        out[layer] = pick or (fallback or {}).get(layer, names[0] if FLOAT.name not in names else FLOAT.name)
    return out


def _config_of(choice: Mapping[str, str], **meta: Any) -> BitConfig:
    return BitConfig({k: LayerBits.parse(v) for k, v in choice.items()}, meta=meta)


def _sensitivity_stage(model, calib, space, inventory, sensitivity, sensitivity_options, loss_fn, progress, out,
                       key: str):
    """Run the estimator, or reuse the scores a previous run with the same inputs left in ``out``."""
    from mpq.sensitivity import SensitivityResult, get_estimator

    if out is not None:
        meta_path, scores_path = out / "sensitivity.json", out / "scores.csv"
        if meta_path.exists() and scores_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key:
                log.info("sensitivity: reusing %s from an earlier run (same model, data, space, estimator)",
                         scores_path)
                stats_path = out / "layer_stats.csv"
                stats = pd.read_csv(stats_path) if stats_path.exists() else pd.DataFrame()
                return SensitivityResult(meta["estimator"], pd.read_csv(scores_path), stats,
                                         {**meta["cost"], "reused": True})
    est = get_estimator(sensitivity, **(sensitivity_options or {}))
    result = est.run(model, calib, space, inventory, loss_fn=loss_fn, progress=progress)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result.scores.to_csv(out / "scores.csv", index=False)
        result.layer_stats.to_csv(out / "layer_stats.csv", index=False)
        for name, table in result.tables.items():
            table.to_csv(out / f"scores_{name.replace(':', '_')}.csv", index=False)
        (out / "sensitivity.json").write_text(json.dumps(
            {"key": key, "estimator": result.estimator, "cost": result.cost}, indent=2, default=str))
    return result


def search(model: nn.Module, calib_data: Any, eval_fn: Callable[[nn.Module], float] | None = None, *,
           budget: Budget | Mapping[str, float] | str, device: str = "cpu",
           sensitivity: str | Mapping[str, float] | list[str] = "hessian",
           solver: str = "ilp", solver_options: Mapping[str, Any] | None = None, loss_fn: LossFn | None = None,
           batch_size: int | None = None,
           profile: str = "ray", address: str | None = None, workers: int | None = None,
           out: str | Path | None = None, metric: str = "metric", higher_is_better: bool = True,
           frontier_points: int = 12,
           allowed: Iterable[LayerBits | str] | None = None, pinned: Mapping[str, LayerBits | str] | None = None,
           threads: int | None = None, repeats: int = 15, warmup: int = 3, cache: bool | str | Path = True,
           sensitivity_options: Mapping[str, Any] | None = None, evaluate_frontier: bool = True,
           evaluate_workers: int | None = None,
           tie_tolerance: float = 0.01, quantizer: str | Quantizer = "minmax",
           quantizer_options: Mapping[str, Any] | None = None,
           model_name: str | None = None, progress: bool = True, command: str | None = None) -> SearchResult:
    """Find per-layer bits that keep the most accuracy within ``budget`` on ``device``.

    Stages: layer discovery -> search space from the device's kernels -> sensitivity -> latency of
    every (layer, option) workload measured on the device (``profile``: ``"ray"`` or ``"inprocess"``, cached) ->
    ILP under the budget and a frontier by budget sweeps -> the chosen config and uniform INT8/INT4 baselines
    applied on the real kernels, their latency measured and ``eval_fn`` evaluated. With ``out``, writes the run
    directory (config, tables, report, dashboard); re-running into the same ``out`` reuses finished sensitivities.

    ``device``: the target, ``"cpu"``, ``"cuda"`` or a kind of node on a Ray cluster (``"cuda:h100"``; see
    :mod:`mpq.workers.cluster`). With ``profile="ray"`` the layer latencies are measured on nodes of that kind (at
    most ``workers`` profilers), and for a labelled kind the whole-model timings run there too, as Ray tasks;
    :func:`search_devices` searches several targets at once.

    ``budget``: absolute (``size_mb``, ``bops``, ``latency_ms``) or relative to the float model (``size``,
    ``latency``, ``bops_ratio``), as a :class:`Budget`, dict or string like ``"size=0.3"``.

    ``sensitivity``: an estimator (``"hessian"``, ``"lrp"``, ``"decoupled"``, ``"entropy"``, ``"measured"``) or a
    weighted combination of their normalised scores (``"0.7*hessian+0.3*lrp"``, ``{"hessian": 1, "lrp": 1}``);
    ``sensitivity_options`` are its keyword arguments (keyed by name for a combination).

    ``solver``: ``"ilp"`` (default), ``"pareto"`` (the exact frontier of the budget's main resource, and its best
    point in budget), ``"greedy"``, ``"optuna"`` (NSGA-II, warm-started from the ILP, its study kept in
    ``out/optuna.sqlite`` so an interrupted search resumes) or ``"exhaustive"``; ``solver_options`` go to it (e.g.
    ``{"objective": {"score_kl": 1, "score_loss": 1}}`` to weight the ``decoupled`` estimator's per-metric tables,
    ``{"caps": {"score_kl": 0.2}}`` to cap one, ``{"min_bits": {"fc2": 8}}``).

    ``quantizer``: how the integers of every option are chosen (``"minmax"``, ``"mse"`` clipping, ``"gptq"`` error
    feedback from the calibration inputs; see :mod:`mpq.quantizers`), with ``quantizer_options``. The estimators
    score the weights it produces and ``apply`` installs them, so the search allocates bits for the rounding used.

    ``evaluate_frontier``: ``eval_fn`` on every frontier point, fake-quantized; with ``evaluate_workers`` (and
    ``profile="ray"``) these evaluations fan out over that many Ray actors, each holding one copy of the model and
    ``eval_fn`` (which must then be picklable).

    ``tie_tolerance``: scores are normalised so that every layer at its most aggressive option sums to 1; allocations
    within this much of the lowest total score are ties for practical purposes, and the fastest of them is chosen
    (0 keeps the strict optimum; exact ties still go to the fastest). ``command`` is recorded in the report as the
    way to reproduce the run.
    """
    from mpq.target import Target

    t_start = time.perf_counter()
    target = Target.parse(device)
    dev = target.device
    budget = Budget.parse(budget)
    if budget.is_unlimited:
        raise ConfigError("search needs a budget: e.g. budget='size=0.3' (30% of the float size), "
                          "'latency=0.6', or absolute 'size_mb=0.5', 'latency_ms=2', 'bops=1e9'")
    out = Path(out) if out is not None else None
    model_name = model_name or type(model).__name__
    threads = threads or torch.get_num_threads()
    stages: dict[str, float] = {}
    with _eval_mode(model):
        calib = CalibrationSet.from_any(calib_data)
        calib.check(model)
        inventory = discover_layers(model, calib.example)
        quant = prepared_quantizer(get_quantizer(quantizer, **(quantizer_options or {})), model, calib, inventory)
        space = replace(build_search_space(inventory, dev, allowed, pinned), quantizer=quant)
        example = calib.example if batch_size is None else _resize_batch(calib.example, batch_size)
        stages["discover"] = time.perf_counter() - t_start

        t0 = time.perf_counter()
        key = hashlib.sha1(json.dumps({
            "model": _hash_model(model), "calib": _hash_calib(calib), "estimator": str(sensitivity),
            "options": dict(sensitivity_options or {}), "space": space.to_frame().to_dict("list"), "device": dev,
            "loss": getattr(loss_fn, "__qualname__", None), "quantizer": quant.settings()},
            sort_keys=True, default=str).encode()).hexdigest()
        sens = _sensitivity_stage(model, calib, space, inventory, sensitivity, sensitivity_options, loss_fn,
                                  progress, out, key)
        stages["sensitivity"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        costs = _cost_stage(model, inventory, space, example, target, profile, address, workers, cache, threads,
                            warmup, repeats, batch_size, progress)
        stages["profile"] = time.perf_counter() - t0
        table = costs.table.merge(_score_columns(sens), on=["layer", "option"], how="left")
        limits = budget.resolve(costs.reference.as_dict())

        # Solve (ties, within tie_tolerance of the lowest normalised score, go to the fastest); the frontiers.
        t0 = time.perf_counter()
        allocation = _solve(solver, table, limits, costs.fixed, max(tie_tolerance, 0.0), dict(solver_options or {}),
                            out, progress)
        frontier = _frontiers(table, costs.fixed, frontier_points, allocation, progress)
        stages["solve"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        candidates = {"float": {n: FLOAT.name for n in space.layers}, "chosen": dict(allocation.choice)}
        candidates["uniform_int8"] = uniform_choice(space, INT8_PREFERENCE)
        candidates["uniform_int4"] = uniform_choice(space, INT4_PREFERENCE, fallback=candidates["uniform_int8"])
        summary, in_model = _evaluate(model, inventory, dev, example, eval_fn, candidates, frontier, table,
                                      costs.fixed, evaluate_frontier, threads, warmup, repeats, progress, quant,
                                      target.name, profile, address, evaluate_workers)
        stages["evaluate"] = time.perf_counter() - t0

    chosen_key = json.dumps(dict(sorted(allocation.choice.items())))
    if len(frontier):
        frontier["chosen"] = frontier["choice"] == chosen_key
        frontier.insert(0, "point", range(len(frontier)))
    config = _config_of(allocation.choice, model=model_name, device=dev, budget=str(budget),
                        estimator=sens.estimator, solver=allocation.solver, quantizer=quant.settings())
    stages["total"] = time.perf_counter() - t_start
    latency = costs.latency
    info = {
        "model": model_name, "device": dev, "target": target.name, "fingerprint": latency.fingerprint,
        "fingerprint_id": latency.fingerprint_id, "metric": metric, "higher_is_better": higher_is_better,
        "budget": budget.given(), "budget_text": str(budget), "limits": limits,
        "reference": costs.reference.as_dict(), "fixed": costs.fixed, "float_layers_latency_ms": costs.float_layers_ms,
        "batch_size": batch_size or calib.batch_size, "threads": threads,
        "estimator": sens.estimator, "quantizer": quant.settings(), "sensitivity_cost": sens.cost,
        "solver": allocation.solver,
        "tie_tolerance": tie_tolerance, "sensitivity_tables": sorted(sens.tables),
        "solver_stats": dict(allocation.stats), "chosen_score": allocation.score,
        "profile": {"backend": profile, "workloads": len(latency), "measured": latency.measured,
                    "cache_hits": latency.cache_hits, "repeats": repeats, "warmup": warmup, **latency.stats},
        "layers": len(inventory), "kept_float": len(inventory.kept_float), "space_size": space.size(),
        "space_notes": dict(space.notes), "stages_seconds": stages, "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
    }
    layers = _layer_table(inventory, space, table, allocation.choice, sens)
    layers.insert(layers.columns.get_loc("latency_ms") + 1, "latency_in_model_ms", layers["layer"].map(in_model))
    result = SearchResult(config, frontier, layers, table, summary, info, latency, sens, inventory)
    if out is not None:
        from mpq.artifacts import write_run
        from mpq.dashboards import write_dashboard

        write_run(result, out)
        write_dashboard(out)
    log.info("search done in %.1fs: %r", stages["total"], result)
    return result


def search_devices(model: nn.Module, calib_data: Any, eval_fn: Callable[[nn.Module], float] | None = None, *,
                   devices: Iterable[str], out: str | Path | None = None, **options: Any) -> dict[str, SearchResult]:
    """:func:`search` for each target device (``["cpu", "cuda:h100"]``): each with that device's options, its
    latencies measured on nodes of that kind, its own frontier and choice. With ``out``, each run goes to
    ``out/<device>/`` and ``out/dashboard.html`` shows the devices' frontiers side by side."""
    from mpq.target import Target

    targets = [Target.parse(d) for d in devices]
    if not targets or len({t.name for t in targets}) != len(targets):
        raise ConfigError(f"devices {list(devices)!r}: give one or more distinct target devices")
    out = Path(out) if out is not None else None
    results = {t.name: search(model, calib_data, eval_fn, device=t.name,
                              out=None if out is None else out / t.slug, **options) for t in targets}
    if out is not None:
        from mpq.dashboards import write_dashboard

        (out / "devices.json").write_text(json.dumps(
            {t.name: {"run": t.slug, "summary": repr(results[t.name]), "fingerprint_id":
                      results[t.name].info["fingerprint_id"]} for t in targets}, indent=2))
        write_dashboard([out / t.slug for t in targets], out / "dashboard.html", side_by_side=True)
    return results


def sensitivity_report(model: nn.Module, calib_data: Any, heldout_data: Any,
                       estimators: Iterable[str] = ("hessian", "lrp", "decoupled", "entropy", "measured"),
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

    with _eval_mode(model):
        return judge_estimators(model, calib_data, heldout_data, estimators, n_configs,
                                None if device is None else normalize_device(device),
                                loss_fn=loss_fn, seed=seed, options=options, backend=backend, progress=progress,
                                out=out)


def _score_columns(sens) -> pd.DataFrame:
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


def _solve(solver: str, table, limits, fixed, slack: float, options: dict, out, progress):
    """Run the chosen solver; Optuna is warm-started from the ILP and keeps its study in the run directory."""
    from mpq.solvers import get_solver, ilp_allocate

    kwargs = {"secondary": "latency_ms", "slack": slack, **options}
    if solver == "optuna":
        ilp = ilp_allocate(table, limits, fixed, **{k: v for k, v in kwargs.items() if k in (
            "secondary", "slack", "objective", "caps", "allowed", "pinned", "min_bits")})
        kwargs.setdefault("warm_start", [ilp.choice])
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            kwargs.setdefault("storage", out / "optuna.sqlite")
        kwargs["progress"] = progress
    return get_solver(solver)(table, limits, fixed, **kwargs)


def _frontiers(table, fixed, points, allocation, progress) -> pd.DataFrame:
    """The exact frontiers of size and latency (walk, or hull points past ``points``), and the solver's own."""
    from mpq.solvers import pareto_frontier

    parts = [pareto_frontier(table, r, fixed, points=points, progress=progress)[0] for r in ("size_mb", "latency_ms")]
    if allocation.frontier is not None:
        parts.append(allocation.frontier.assign(swept=f"{allocation.solver}"))
    cols = ["swept", "budget", "score", "size_mb", "bops", "latency_ms", "exact", "method", "choice"]
    return pd.concat([p[[c for c in cols if c in p]] for p in parts], ignore_index=True)


@contextmanager
def _eval_mode(model: nn.Module):
    """Evaluation mode for the duration of a search; the caller's mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class _Costs:
    table: pd.DataFrame  # per (layer, option): size_mb, bops, latency_ms
    fixed: dict[str, float]  # outside the layers
    reference: Reference  # the float model's totals
    float_layers_ms: float
    latency: Any  # LatencyTable


def _cost_stage(model, inventory, space, example, target, profile, address, workers, cache, threads, warmup,
                repeats, batch_size, progress) -> _Costs:
    """Measure every workload (cached) and the rest of the forward pass on the target; build the cost table."""
    from mpq.workers import profile_workloads, time_rest_of_model, workloads_for
    from mpq.workers.cluster import run_on_target

    workloads, by_pair = workloads_for(inventory, space, batch_size)
    latency = profile_workloads(workloads, target.name, backend=profile, address=address, cache=cache,
                                threads=threads, warmup=warmup, repeats=repeats, workers=workers, progress=progress)
    rest = run_on_target(time_rest_of_model, model, inventory.names, example, warmup, repeats, threads=threads,
                         device=target.device, target=target, backend=profile, cpus=threads, address=address)

    def latency_of(layer, bits: LayerBits) -> float:
        return latency.median_ms(by_pair[(layer.name, bits.name)]) * max(layer.calls, 1)

    float_layers_ms = sum(latency_of(layer, FLOAT) for layer in inventory)
    fixed = fixed_costs(inventory, rest.median_ms)
    # Relative latency budgets are fractions of the float model's *predicted* latency, so that the all-float
    # allocation always meets latency=1.0 under the same additive model the solver uses.
    reference = float_reference(inventory, fixed["latency_ms"] + float_layers_ms)
    return _Costs(build_cost_table(inventory, space, latency_of), fixed, reference, float_layers_ms, latency)


def _measure_applied(model, inventory, dev, example, eval_fn, candidates, threads, warmup, repeats,
                     quant: Quantizer) -> tuple[dict, dict, dict]:
    """Each candidate applied on the real kernels, timed end to end and evaluated; the chosen config's layers also
    timed in place. Runs where the device is (a Ray task on a node of the target, or here)."""
    from mpq.workers import time_layers_in_model, time_models

    applied = {name: model if name == "float" else apply(copy.deepcopy(model), _config_of(choice), dev, inventory,
                                                                   quantizer=quant)
               for name, choice in candidates.items()}
    measured = time_models(applied, example, warmup, repeats, threads=threads, device=dev)
    in_model = time_layers_in_model(applied["chosen"], inventory.names, example, repeats, warmup, threads, dev)
    real = {name: float(eval_fn(m)) if eval_fn is not None else float("nan") for name, m in applied.items()}
    return {k: v.as_dict() for k, v in measured.items()}, in_model, real


def _fakequant_eval(shared: tuple, choice: Mapping[str, str]) -> float:
    """``eval_fn`` on the model with ``choice`` fake-quantized; ``shared`` is (model, inventory, device, quantizer,
    eval_fn), as one Ray actor holds it."""
    from mpq.fakequant import fake_quantize

    model, inventory, dev, quant, eval_fn = shared
    return float(eval_fn(fake_quantize(model, _config_of(choice), dev, inventory, quantizer=quant)))


def _evaluate(model, inventory, dev, example, eval_fn, candidates, frontier, table, fixed, evaluate_frontier,
              threads, warmup, repeats, progress, quant: Quantizer, target: str, profile: str,
              address: str | None, evaluate_workers: int | None) -> pd.DataFrame:
    """Fake-quant metric along the frontier (here); the candidates applied, timed and evaluated on the target."""
    from tqdm.auto import tqdm

    from mpq.solvers import totals_of
    from mpq.workers.cluster import run_on_target

    fq_cache: dict[str, float] = {}

    def fakequant_metric(choice: Mapping[str, str]) -> float:
        k = json.dumps(dict(sorted(choice.items())))
        if eval_fn is not None and k not in fq_cache:
            fq_cache[k] = _fakequant_eval((model, inventory, dev, quant, eval_fn), choice)
        return fq_cache.get(k, float("nan"))

    if evaluate_frontier and eval_fn is not None and len(frontier):
        if evaluate_workers and profile == "ray":  # fan out: each actor holds one copy of the model and evaluator
            from mpq.workers.cluster import map_with_shared

            todo = [json.loads(c) for c in sorted(set(frontier["choice"]))]
            metrics = map_with_shared(_fakequant_eval, (model, inventory, dev, quant, eval_fn), todo,
                                      evaluate_workers, address)
            fq_cache.update((json.dumps(dict(sorted(c.items()))), v) for c, v in zip(todo, metrics))
        frontier["metric"] = [fakequant_metric(json.loads(c)) for c in
                              tqdm(frontier["choice"], desc="frontier metrics", disable=not progress, leave=False)]
    measured, in_model, real = run_on_target(
        _measure_applied, model, inventory, dev, example, eval_fn, candidates, threads, warmup, repeats, quant,
        target=target, backend=profile, cpus=threads, address=address)
    rows = []
    for name, choice in candidates.items():
        score, totals = totals_of(table, choice, fixed)
        rows.append({"name": name, "score": score, "size_mb": totals["size_mb"], "bops": totals["bops"],
                     "latency_predicted_ms": totals["latency_ms"], "latency_measured_ms": measured[name]["median_ms"],
                     "latency_measured_q1_ms": measured[name]["q1_ms"],
                     "latency_measured_q3_ms": measured[name]["q3_ms"],
                     "metric_fakequant": real[name] if name == "float" else fakequant_metric(choice),
                     "metric_real": real[name],
                     "histogram": json.dumps(_config_of(choice).histogram()),
                     "choice": json.dumps(dict(sorted(choice.items())))})
    return pd.DataFrame(rows), in_model


def _layer_table(inventory: LayerInventory, space: SearchSpace, table: pd.DataFrame, choice: Mapping[str, str],
                 sens) -> pd.DataFrame:
    idx = table.set_index(["layer", "option"])
    rows = []
    for layer in inventory:
        opt = choice.get(layer.name, FLOAT.name)
        r = idx.loc[(layer.name, opt)]
        flt = idx.loc[(layer.name, FLOAT.name)] if (layer.name, FLOAT.name) in idx.index else None
        rows.append({
            "layer": layer.name, "kind": layer.kind, "weight_shape": "x".join(map(str, layer.weight_shape)),
            "params": layer.params, "macs": layer.macs, "calls": layer.calls,
            "options": " ".join(b.name for b in space[layer.name]), "option": opt,
            "w_bits": r["w_bits"], "a_bits": r["a_bits"], "group_size": r["group_size"],
            "score": r["score"], "size_mb": r["size_mb"], "bops": r["bops"], "latency_ms": r["latency_ms"],
            "float_latency_ms": None if flt is None else flt["latency_ms"],
            "float_size_mb": layer.float_bytes() / MB,
        })
    out = pd.DataFrame(rows)
    if sens is not None and len(sens.layer_stats):
        out = out.merge(sens.layer_stats, on="layer", how="left")
    return out

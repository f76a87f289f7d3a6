"""The cost stage of a study: what each (layer, option) costs, and whether a budget can be met at all.

Costs come in the order they are cheap: size and BOPs from the layer shapes and the kernels' storage formats (no
measurement, milliseconds), so an impossible size or BOPs budget is refused before anything is measured or scored;
then latency, measured on the target for each phase a budget names (the calibration batch, ``latency_ms@B``,
``decode_ms@B``, ``prefill_ms@S``), each its own column of the cost table, cached in the profile cache.

This module is part of the face: it calls the workers (profiling, timing) and the solvers' reachability check.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import pandas as pd
import torch
from torch import nn

from mpq.budget import Budget, Phase
from mpq.config import FLOAT
from mpq.costs import build_cost_table, fixed_costs, float_reference
from mpq.errors import BudgetError, ConfigError
from mpq.layers import LayerInventory, discover_layers, first_tensor
from mpq.options import ProfileOptions
from mpq.space import SearchSpace
from mpq.target import Target

log = logging.getLogger(__name__)
MAIN = "latency_ms"  # the calibration batch's (or batch_size's) latency column


@dataclass
class CostTables:
    """Per (layer, option) costs, the costs outside the layers and the float model's totals, per cost column."""

    table: pd.DataFrame  # layer, option, w_bits, a_bits, group_size, size_mb, bops, latency columns
    fixed: dict[str, float]
    reference: dict[str, float]
    latency: dict[str, Any] = field(default_factory=dict)  # column -> LatencyTable (a live study) or DataFrame
    float_layers_ms: dict[str, float] = field(default_factory=dict)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)  # column -> {"kind", "n", "input"}
    # What the costs were computed from (a live study; not saved): explains an unreachable size in words.
    inventory: LayerInventory | None = field(default=None, repr=False)
    space: SearchSpace | None = field(default=None, repr=False)

    def columns(self) -> list[str]:
        return ["size_mb", "bops", *self.latency_columns()]

    def latency_columns(self) -> list[str]:
        return [c for c in self.table.columns if c == MAIN or "_ms@" in c]


def static_costs(inventory: LayerInventory, space: SearchSpace) -> CostTables:
    """Size and BOPs of every (layer, option): no measurement."""
    table = build_cost_table(inventory, space).drop(columns=[MAIN])
    fixed = fixed_costs(inventory)
    fixed.pop(MAIN, None)
    reference = float_reference(inventory, math.nan).as_dict()
    reference.pop(MAIN, None)
    return CostTables(table, fixed, reference, inventory=inventory, space=space)


# --------------------------------------------------------------------------------------------------------------------
# reachability
# --------------------------------------------------------------------------------------------------------------------
def explain_unreachable(costs: CostTables, limits: Mapping[str, float]) -> str | None:
    """Which option set would reach an unreachable size limit and why no kernel offers it (see
    :func:`mpq.costs.explain_unreachable`), or None (no size limit, or a study loaded without its model)."""
    from mpq.costs import explain_unreachable as explain_size

    if "size_mb" not in limits or costs.inventory is None or costs.space is None:
        return None
    return explain_size(costs.inventory, costs.space, limits["size_mb"]) or None


def check_reachable(costs: CostTables, budget: Budget, restrictions: Mapping[str, Any],
                    column_of=None) -> dict[str, float]:
    """The budget's absolute limits, or a :class:`BudgetError` naming each limit that no allocation reaches (with
    the smallest reachable value) before anything more is run. Only the columns already known are checked: a
    latency limit waits for its profile."""
    from mpq.solvers import restrict
    from mpq.solvers.base import check_reachable as solver_check

    known = {c: v for c, v in costs.reference.items() if not (isinstance(v, float) and math.isnan(v))}
    limits = budget.resolve({**known, **{c: math.nan for c in _missing(budget, known, column_of)}}, column_of)
    checkable = {c: v for c, v in limits.items() if c in costs.table.columns and not math.isinf(v)}
    table = restrict(costs.table, restrictions.get("allowed"), restrictions.get("pinned"),
                     restrictions.get("min_bits"))
    try:
        solver_check(table, checkable, costs.fixed)
    except BudgetError as e:
        why = explain_unreachable(costs, checkable)
        raise BudgetError(f"{e}" + (f"; {why}" if why else ""), e.smallest) from None
    return limits


def _missing(budget: Budget, known: Mapping[str, float], column_of) -> list[str]:
    """Columns a budget refers to whose float reference is not measured yet (resolved to NaN, checked later)."""
    cols = [] if "latency_ms" in known else ["latency_ms"]
    for _, phase, _, _ in budget.phase_limits():
        col = (column_of or Phase.column)(phase)
        if col not in known:
            cols.append(col)
    return cols


# --------------------------------------------------------------------------------------------------------------------
# latency, per phase
# --------------------------------------------------------------------------------------------------------------------
def resize_batch(inputs: Any, n: int) -> Any:
    """The example input with batch size ``n`` (rows repeated or cut)."""
    if isinstance(inputs, torch.Tensor):
        reps = -(-n // inputs.shape[0])
        return inputs.repeat(reps, *([1] * (inputs.dim() - 1)))[:n] if reps > 1 else inputs[:n]
    if isinstance(inputs, dict):
        return {k: resize_batch(v, n) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(resize_batch(v, n) for v in inputs)
    return inputs


def _resize_sequence(inputs: Any, rows: int, length: int) -> Any:
    """Token-id inputs reshaped to ``rows`` sequences of ``length`` tokens (ids repeated or cut)."""
    if isinstance(inputs, torch.Tensor):
        flat = inputs.reshape(-1)
        reps = -(-rows * length // flat.numel())
        return flat.repeat(reps)[: rows * length].reshape(rows, length)
    if isinstance(inputs, dict):
        return {k: _resize_sequence(v, rows, length) for k, v in inputs.items()}
    return inputs


def sequence_length(example: Any) -> int | None:
    """The token count of a language model's input (a 2-D integer tensor, or a dict holding ``input_ids``)."""
    t = example.get("input_ids") if isinstance(example, dict) else example
    if isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point():
        return int(t.shape[1])
    return None


def phase_example(example: Any, phase: Phase) -> Any:
    """The input a phase is timed at: ``n`` rows of the example, or token ids shaped for decode/prefill."""
    if phase.kind == "batch":
        return resize_batch(example, phase.n)
    seq = sequence_length(example)
    if seq is None:
        raise BudgetError(f"a {phase.kind} latency limit is for language models: it needs token-id inputs "
                          f"[batch, sequence] (or a dict with input_ids); this model takes "
                          f"{first_tensor(example).dtype} inputs of shape {tuple(first_tensor(example).shape)}")
    if phase.kind == "decode":
        return _resize_sequence(example, phase.n or 1, 1)
    return _resize_sequence(example, 1, phase.n or seq)


def measure_latency(model: nn.Module, inventory: LayerInventory, space: SearchSpace, example: Any, target: Target,
                    options: ProfileOptions, progress: bool) -> tuple[pd.Series, float, float, Any]:
    """One latency column: every workload of ``space`` at ``example``'s shapes measured on the target (cached),
    and the rest of the forward pass. Returns (per-row latency aligned with the cost table's (layer, option)
    order, the rest's median, the float layers' total, the LatencyTable)."""
    from mpq.workers import profile_workloads, time_rest_of_model, workloads_for
    from mpq.workers.cluster import run_on_target

    threads = options.threads or torch.get_num_threads()
    workloads, by_pair = workloads_for(inventory, space)
    latency = profile_workloads(workloads, target, backend=options.profile, address=options.address,
                                cache=options.cache, threads=threads, warmup=options.warmup,
                                repeats=options.repeats, workers=options.workers, progress=progress)
    latency.require_mode(target)  # layer rows, the rest of the model and whole models: one mode
    rest = run_on_target(time_rest_of_model, model, inventory.names, example, options.warmup, options.repeats,
                         threads=threads, device=target.device, mode=target.mode, target=target,
                         backend=options.profile, cpus=threads, address=options.address)
    per_row = {}
    for layer in inventory:
        for bits in (FLOAT, *space[layer.name]):
            per_row[(layer.name, bits.name)] = latency.median_ms(by_pair[(layer.name, bits.name)]) * max(layer.calls, 1)
    float_ms = sum(per_row[(layer.name, FLOAT.name)] for layer in inventory)
    return pd.Series(per_row), rest.median_ms, float_ms, latency


def add_latency(costs: CostTables, column: str, model: nn.Module, inventory: LayerInventory, space: SearchSpace,
                example: Any, target: Target, options: ProfileOptions, progress: bool,
                phase: Phase | None = None) -> None:
    """Measure one latency column into ``costs`` (its per-row values, fixed part, float reference)."""
    if phase is not None or first_tensor(example).shape[0] != inventory.batch_size:
        inventory = _rediscover(model, example, inventory)  # each layer's input shape at this phase
    per_row, rest_ms, float_ms, table = measure_latency(model, inventory, space, example, target, options, progress)
    keys = list(zip(costs.table["layer"], costs.table["option"]))
    costs.table[column] = [float(per_row[k]) for k in keys]
    costs.fixed[column] = float(rest_ms)
    # Relative latency budgets are fractions of the float model's *predicted* latency, so that the all-float
    # allocation always meets latency=1.0 under the same additive model the solver uses.
    costs.reference[column] = float(rest_ms + float_ms)
    costs.float_layers_ms[column] = float(float_ms)
    costs.latency[column] = table
    shape = tuple(first_tensor(example).shape)
    costs.phases[column] = {"kind": "main" if phase is None else phase.kind,
                            "n": None if phase is None else phase.n, "input": list(shape)}
    log.info("latency column %s: float %.4g ms predicted at input %s", column, costs.reference[column], shape)


def _rediscover(model: nn.Module, example: Any, inventory: LayerInventory) -> LayerInventory:
    """The inventory's layers with their input shapes and calls at ``example`` (a phase's input)."""
    again = discover_layers(model, example)
    if again.names != inventory.names:
        raise ConfigError(f"the model runs other layers at input {tuple(first_tensor(example).shape)} than at the "
                          f"calibration input: {sorted(set(again.names) ^ set(inventory.names))}")
    return again


def options_per_layer(table: pd.DataFrame) -> dict[str, list[str]]:
    """Each layer's option names, in table order."""
    return {layer: list(g["option"]) for layer, g in table.groupby("layer", sort=False)}


__all__ = ["CostTables", "static_costs", "check_reachable", "explain_unreachable", "add_latency", "phase_example",
           "resize_batch", "sequence_length", "MAIN", "options_per_layer"]

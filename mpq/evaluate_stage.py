"""The evaluation stage of a study: the chosen config and the uniform INT8 / INT4 baselines, predicted from the cost
table, and (when asked) applied on the real kernels, timed end to end and evaluated, with the fake-quant metric
along the frontier.

Part of the face (it calls the workers' timing and Ray placement). :class:`EvaluationContext` holds what every
evaluation needs, so a new kind of measurement (another deployment mode, an end-to-end check) is one more function
over it.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
from torch import nn

from mpq.config import FLOAT, Choice
from mpq.layers import LayerInventory
from mpq.options import EvaluateOptions, ProfileOptions
from mpq.quantizers import Quantizer
from mpq.target import Target

log = logging.getLogger(__name__)

INT8_PREFERENCE = ("w8a8", "w8a16")  # uniform INT8 baseline: the first of these each layer offers
# uniform INT4: fewest bytes first; each group size in the kernel's one scheme, else symmetric (mpq's low-bit
# kernels: the GPU's only 4-bit groups)
INT4_PREFERENCE = ("w4a16g128", "w4a16g128sym", "w4a16g64", "w4a16g64sym", "w4a16g32", "w4a16g32sym", "w4a16",
                   "w4a16sym", "w4a8")
MEASURED = ("latency_measured_ms", "latency_measured_q1_ms", "latency_measured_q3_ms", "metric_fakequant",
            "metric_real")


@dataclass
class EvaluationContext:
    """A live study's model and settings, as every evaluation needs them."""

    model: nn.Module
    inventory: LayerInventory
    target: Target
    example: Any
    eval_fn: Callable[[nn.Module], float] | None
    quantizer: Quantizer
    profile: ProfileOptions
    options: EvaluateOptions
    threads: int
    progress: bool = True
    fakequant_cache: dict[str, float] = field(default_factory=dict)  # choice key -> metric, across solves


def uniform_choice(options: Mapping[str, Iterable[str]], preference: Iterable[str],
                   fallback: Mapping[str, str] | None = None) -> Choice:
    """Per layer, the first preferred option it offers (else ``fallback``'s, else float)."""
    out = {}
    for layer, names in options.items():
        names = list(names)
        pick = next((p for p in preference if p in names), None)
        out[layer] = pick or (fallback or {}).get(layer, names[0] if FLOAT.name not in names else FLOAT.name)
    return Choice(out)


def candidates_of(options: Mapping[str, Iterable[str]], chosen: Choice) -> dict[str, Choice]:
    """What a result compares: float, the chosen config, uniform INT8 and uniform INT4."""
    int8 = uniform_choice(options, INT8_PREFERENCE)
    return {"float": Choice({n: FLOAT.name for n in options}), "chosen": chosen, "uniform_int8": int8,
            "uniform_int4": uniform_choice(options, INT4_PREFERENCE, fallback=int8)}


def predicted_summary(table: pd.DataFrame, fixed: Mapping[str, float], candidates: Mapping[str, Choice],
                      latency_columns: Iterable[str]) -> pd.DataFrame:
    """One row per candidate with its predicted score and costs (every latency column); the measured columns are
    NaN until :func:`evaluate` fills them."""
    idx = table.set_index(["layer", "option"])
    extra = [c for c in latency_columns if c != "latency_ms"]
    rows = []
    for name, choice in candidates.items():
        picked = idx.loc[list(choice.items())]

        def total(col: str) -> float:
            return float(picked[col].sum()) + fixed.get(col, 0.0)

        rows.append({"name": name, "score": float(picked["score"].sum()), "size_mb": total("size_mb"),
                     "bops": total("bops"), "latency_predicted_ms": total("latency_ms"),
                     **{f"{c}_predicted": total(c) for c in extra}, **dict.fromkeys(MEASURED, float("nan")),
                     "histogram": _histogram_json(choice), "choice": choice.key})
    return pd.DataFrame(rows)


def _histogram_json(choice: Choice) -> str:
    return json.dumps(choice.to_config().histogram())


def _fakequant_eval(shared: tuple, choice: Mapping[str, str]) -> float:
    """``eval_fn`` on the model with ``choice`` fake-quantized; ``shared`` is (model, inventory, device, quantizer,
    eval_fn), as one Ray actor holds it."""
    from mpq.fakequant import fake_quantize

    model, inventory, dev, quant, eval_fn = shared
    return float(eval_fn(fake_quantize(model, Choice(choice).to_config(), dev, inventory, quantizer=quant)))


def fakequant_metrics(ctx: EvaluationContext, choices: Iterable[Choice]) -> dict[str, float]:
    """The fake-quant metric of each choice (cached across solves; fanned out over Ray actors with
    ``evaluate_workers``)."""
    from tqdm.auto import tqdm

    if ctx.eval_fn is None:
        return {c.key: float("nan") for c in choices}
    todo = list({c.key: c for c in choices if c.key not in ctx.fakequant_cache}.values())
    shared = (ctx.model, ctx.inventory, ctx.target.device, ctx.quantizer, ctx.eval_fn)
    if todo and ctx.options.evaluate_workers and ctx.profile.profile == "ray":
        from mpq.workers.cluster import map_with_shared

        values = map_with_shared(_fakequant_eval, shared, [dict(c) for c in todo], ctx.options.evaluate_workers,
                                 ctx.profile.address)
        ctx.fakequant_cache.update((c.key, v) for c, v in zip(todo, values))
    for c in tqdm(todo, desc="frontier metrics", disable=not ctx.progress or not todo, leave=False):
        if c.key not in ctx.fakequant_cache:
            ctx.fakequant_cache[c.key] = _fakequant_eval(shared, c)
    return {c.key: ctx.fakequant_cache[c.key] for c in choices}


def _measure_applied(model, inventory, dev, example, eval_fn, candidates, threads, warmup, repeats,
                     quant: Quantizer, mode: str = "eager") -> tuple[dict, dict, dict]:
    """Each candidate applied on the real kernels, timed end to end and evaluated; the chosen config's layers also
    timed in place. Runs where the device is (a Ray task on a node of the target, or here)."""
    from mpq.apply_kernels import apply
    from mpq.workers import time_layers_in_model, time_models

    applied = {name: model if name == "float" else apply(copy.deepcopy(model), Choice(choice).to_config(), dev,
                                                         inventory, quantizer=quant)
               for name, choice in candidates.items()}
    measured = time_models(applied, example, warmup, repeats, threads=threads, device=dev, mode=mode)
    in_model = time_layers_in_model(applied["chosen"], inventory.names, example, repeats, warmup, threads, dev, mode)
    real = {name: float(eval_fn(m)) if eval_fn is not None else float("nan") for name, m in applied.items()}
    return {k: v.as_dict() for k, v in measured.items()}, in_model, real


def evaluate(ctx: EvaluationContext, summary: pd.DataFrame, candidates: Mapping[str, Choice],
             frontier: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Fill the summary's measured columns (the candidates applied, timed and evaluated on the target) and the
    frontier's ``metric`` (fake-quant, with ``evaluate_frontier``). Returns (summary, per-layer in-model ms). The
    model is in evaluation mode meanwhile; its own mode comes back after."""
    from mpq.apply_kernels import eval_mode

    with eval_mode(ctx.model):
        return _evaluate(ctx, summary, candidates, frontier)


def _evaluate(ctx: EvaluationContext, summary: pd.DataFrame, candidates: Mapping[str, Choice],
              frontier: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    from mpq.workers.cluster import run_on_target

    if ctx.options.evaluate_frontier and ctx.eval_fn is not None and len(frontier):
        keys = list(frontier["choice"])
        metrics = fakequant_metrics(ctx, [Choice.from_key(k) for k in dict.fromkeys(keys)])
        frontier["metric"] = [metrics[k] for k in keys]
    measured, in_model, real = run_on_target(
        _measure_applied, ctx.model, ctx.inventory, ctx.target.device, ctx.example, ctx.eval_fn,
        {k: dict(v) for k, v in candidates.items()}, ctx.threads, ctx.profile.warmup, ctx.profile.repeats,
        ctx.quantizer, ctx.target.mode, target=ctx.target, backend=ctx.profile.profile, cpus=ctx.threads,
        address=ctx.profile.address)
    fq = fakequant_metrics(ctx, [c for n, c in candidates.items() if n != "float"])
    summary = summary.copy()
    for i, name in enumerate(summary["name"]):
        m = measured[name]
        summary.loc[i, ["latency_measured_ms", "latency_measured_q1_ms", "latency_measured_q3_ms"]] = \
            [m["median_ms"], m["q1_ms"], m["q3_ms"]]
        summary.loc[i, "metric_real"] = real[name]
        summary.loc[i, "metric_fakequant"] = real[name] if name == "float" else fq[candidates[name].key]
    return summary, in_model


__all__ = ["EvaluationContext", "uniform_choice", "candidates_of", "predicted_summary", "evaluate",
           "fakequant_metrics", "INT8_PREFERENCE", "INT4_PREFERENCE"]

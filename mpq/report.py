"""``report.md``: the run's numbers for people, rendered from the run directory alone."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from mpq.artifacts import read_run

LABELS = {"float": "float (reference)", "chosen": "**chosen (mixed)**", "uniform_int8": "uniform INT8",
          "uniform_int4": "uniform INT4"}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


MODES = {"eager": "eager (the forward pass as Python launches it)",
         "graph": "graph (the whole forward captured once as a CUDA graph and replayed)",
         "compile": "compile (the forward compiled by torch.compile)"}


def render_report(run_dir: str | Path) -> str:
    run = read_run(run_dir)
    parts = _header(run) + _result(run) + _latency(run) + _per_layer(run) + _frontier(run) + _how_found(run)
    kept: pd.DataFrame = run["kept_float_table"]
    if len(kept):
        parts += ["", "## Kept in float", ""]
        parts.append(_table([[r["name"], r["type"], r["params"], r["reason"]] for r in kept.to_dict("records")],
                            ["module", "type", "params", "reason"]))
    if run.get("command"):
        parts += ["", "## Reproduce", "", "```", run["command"], "```"]
    parts += ["", "Files: config.json (apply with `mpq apply`), summary.csv, layers.csv, frontier.csv, costs.csv, "
              "scores.csv, latency.csv, dashboard.html.", ""]
    return "\n".join(parts)


def _header(run: dict) -> list[str]:
    arrow = "higher is better" if run.get("higher_is_better", True) else "lower is better"
    fp = run.get("fingerprint", {})
    limits = {k: v for k, v in (run.get("limits") or {}).items() if v is not None}
    ref = run.get("reference", {})
    return [f"# mpq search: {run.get('model')} on {run.get('device')}", "",
            f"- device: {fp.get('name')} ({fp.get('arch')}), {fp.get('threads')} threads, torch {fp.get('torch')}, "
            f"fingerprint `{run.get('fingerprint_id')}`",
            f"- budget: {run.get('budget_text')} -> limits "
            + ", ".join(f"{k} <= {_fmt(v)}" for k, v in limits.items()),
            f"- float model: {_fmt(ref.get('size_mb'))} MB, {_fmt(ref.get('bops'))} BOPs, "
            f"{_fmt(ref.get('latency_ms'))} ms at batch {run.get('batch_size')}",
            f"- metric: {run.get('metric', 'metric')} ({arrow}); latency: median per forward pass",
            f"- deployment mode: {MODES.get(run.get('mode', 'eager'), run.get('mode'))}; target "
            f"`{run.get('target_spec', run.get('target'))}`: layer table, rest of the model and whole-model timings "
            f"all in this mode"]


def _result(run: dict) -> list[str]:
    metric = run.get("metric", "metric")
    rows = []
    for r in run["summary_table"].to_dict("records"):
        pred, meas = r["latency_predicted_ms"], r["latency_measured_ms"]
        ratio = meas / pred if pred else float("nan")
        rows.append([LABELS.get(r["name"], r["name"]), r["size_mb"], r.get("bits_per_weight"), r["bops"] / 1e9,
                     pred, r.get("latency_additive_ms", pred), meas, ratio, r["score"], r["metric_fakequant"],
                     r["metric_real"]])
    predictor = (run.get("latency_model") or {}).get("name", "additive")
    return ["", "## Result", "",
            _table(rows, ["config", "size (MB)", "bits/weight", "GBOPs", "latency predicted (ms)",
                          "table sum (ms)", "latency measured (ms)", "measured / predicted", "score",
                          f"{metric} fake-quant", f"{metric} real kernels"]),
            "", "Score = the estimator's predicted damage, normalised so that every layer at its most aggressive "
            "option sums to 1 (raw values in scores.csv). Bits/weight = stored bits per weight over the quantizable "
            f"layers (scales and zeros included). Predicted latency = the `{predictor}` predictor (see Latency); "
            "table sum = the profile table's per-layer medians summed, plus the rest of the forward pass (the float "
            "model timed with every layer replaced by its recorded output). Measured = the applied model (real "
            "integer kernels) timed end to end in the deployment mode, interleaved. Fake-quant emulates each "
            "kernel's exact numerics in float; real kernels are PyTorch's own integer kernels.", ""]


def _latency(run: dict) -> list[str]:
    model = run.get("latency_model") or {}
    verification = run.get("verification")
    parts = ["## Latency", ""]
    parts.append(f"- {model.get('describe', 'latency predictor: additive (the profile table summed)')}")
    scores = model.get("scores") or {}
    if scores:
        parts.append("- held-out error per predictor: " + ", ".join(
            f"`{n}` median {_fmt(v['median_pct'], 3)}% / p90 {_fmt(v['p90_pct'], 3)}%" for n, v in scores.items()))
    if verification is None:
        parts.append("- verification: none needed (no latency limit: size and BOPs are exact)")
        return parts + [""]
    parts.append(f"- {verification.get('describe')}")
    rows = verification.get("rows") or []
    for step in verification.get("resolved") or []:
        limits = ", ".join(f"{c} {v:.4g} ms" for c, v in step["limits"].items() if "ms" in c)
        parts.append(f"- solved again (round {step['round']}) with the table's limits {limits}: "
                     f"{step.get('stopped') or 'measured as resolved-' + str(step['round'])}")
    budgets = verification.get("budgets") or {"latency_ms": verification.get("budget_ms")}
    for column in budgets if rows else ():
        at = [(r, (r.get("columns") or {column: r})[column]) for r in rows]
        parts += ["", f"{column} (budget {_fmt(budgets[column], 4)} ms):", "",
                  _table([[r["name"], "yes" if r.get("uniform") else "", r["damage"], v["predicted_ms"],
                           v["measured_ms"], v["measured_ms"] / v["predicted_ms"] if v["predicted_ms"] else None,
                           "yes" if v["fits"] else "no", r.get("dominated_by") or "",
                           "yes" if v.get("trusted") else "no (under load)", "**yes**" if r.get("chosen") else ""]
                          for r, v in at],
                         ["candidate", "uniform", "damage", "predicted (ms)", "measured (ms)",
                          "measured / predicted", "meets budget", "slower than", "trusted", "returned"])]
    return parts + [""]


def _per_layer(run: dict) -> list[str]:
    rows = [[r["layer"], r["kind"], r["weight_shape"], r["option"], r["score"], r.get("float_latency_ms"),
             r["latency_ms"], r["float_size_mb"], r["size_mb"]] for r in run["layers_table"].to_dict("records")]
    return ["## Chosen config, per layer", "",
            _table(rows, ["layer", "kind", "weight", "option", "score", "float latency (ms)", "latency (ms)",
                          "float size (MB)", "size (MB)"])]


def _frontier(run: dict) -> list[str]:
    frontier: pd.DataFrame = run["frontier_table"]
    if not len(frontier):
        return []
    rows = [[r["point"], r["swept"], r["size_mb"], r["latency_ms"], r["bops"] / 1e9, r["score"], r.get("metric"),
             "yes" if r.get("chosen") else ""] for r in frontier.to_dict("records")]
    return ["", f"## Frontier ({len(frontier)} points, exact at their cost)", "",
            _table(rows, ["point", "swept", "size (MB)", "latency (ms)", "GBOPs", "score",
                          f"{run.get('metric', 'metric')} fake-quant", "chosen"])]


def _how_found(run: dict) -> list[str]:
    sc = run.get("sensitivity_cost", {})
    probes = f"{sc['probes']} Hutchinson probes, " if sc.get("probes") else ""
    converged = {True: ", converged", False: ", stopped at the probe limit before every score was known to the "
                 "tolerance (standard errors in scores.csv)"}.get(sc.get("converged"), "")
    q = dict(run.get("quantizer") or {"name": "minmax"})
    pr = run.get("profile", {})
    nodes = pr.get("measured_per_node") or {}
    st = run.get("solver_stats", {})
    ties = (f"and among allocations within {_fmt(run.get('tie_tolerance'))} of it the fastest was chosen"
            if run.get("tie_tolerance") is not None else "no tie-break (this solver takes none)")
    status = run.get("solver_status")
    parts = ["", "## How it was found", "",
             f"- sensitivity: `{run.get('estimator')}`: {probes}{sc.get('forward_passes')} forward / "
             f"{sc.get('backward_passes')} backward passes, {_fmt(sc.get('seconds'))} s{converged}"
             + (" (reused from an earlier run)" if sc.get("reused") else "")
             + (f"; Kendall tau {sc['check']['tau']:.2f} against the measured damage of {sc['check']['pairs']} "
                f"single-layer options (calibration split)" if (sc.get("check") or {}).get("tau") is not None
                else ""),
             f"- rounding: quantizer `{q.pop('name')}`" + (f" ({', '.join(f'{k}={v}' for k, v in q.items())})"
                                                          if q else ""),
             f"- latency: {pr.get('workloads')} unique workloads on `{pr.get('target', run.get('device'))}` "
             f"(`{pr.get('backend')}`): {pr.get('measured')} measured in {pr.get('tasks', '?')} tasks, "
             f"{pr.get('cache_hits')} from the profile cache ({pr.get('warmup')} warm-up, {pr.get('repeats')} "
             f"timed repeats each)" + (f"; per node: {', '.join(f'{k} {v}' for k, v in nodes.items())}"
                                       if nodes else ""),
             f"- solver: `{run.get('solver')}`, {st.get('variables')} binaries, {_fmt(st.get('seconds'))} s; "
             f"search space {_fmt(run.get('space_size'))} configs over {run.get('layers')} layers; lowest score "
             f"{_fmt(st.get('optimal_score'))}, {ties}"
             + (f"; status **{status}** (not proven optimal)" if status == "time_limit" else "")]
    if run.get("evaluated") is False:
        parts.append("- not evaluated: predicted numbers only (solve with evaluate=True, or `mpq solve --evaluate`, "
                     "to measure the real kernels)")
    stages = run.get("stages_seconds", {})
    parts.append("- stage times (s): " + ", ".join(f"{k} {_fmt(v, 3)}" for k, v in stages.items()))
    parts += [f"- {layer}: {note}" for layer, note in (run.get("space_notes") or {}).items()]
    return parts


def write_report(run_dir: str | Path) -> Path:
    path = Path(run_dir) / "report.md"
    path.write_text(render_report(run_dir))
    return path


def summary_line(run_dir: str | Path) -> str:
    run = read_run(run_dir)
    s = {r["name"]: r for r in run["summary_table"].to_dict("records")}
    c = s["chosen"]
    if not run.get("evaluated", True):
        return (f"chosen: {c['size_mb']:.4g} MB, latency {c['latency_predicted_ms']:.4g} ms predicted (not measured: "
                f"solve with --evaluate), score {c['score']:.4g}; {c['histogram']}")
    return (f"chosen: {c['size_mb']:.4g} MB, latency {c['latency_predicted_ms']:.4g} ms predicted / "
            f"{c['latency_measured_ms']:.4g} ms measured, {run.get('metric')} {c['metric_real']:.4g} (float "
            f"{s['float']['metric_real']:.4g}); {c['histogram']}")

"""Latency you can trust (issue 18): predicted vs measured whole-model latency, per predictor, next to the retest
noise of the same configs.

For each model: the layer table is profiled twice, with the timing of before issue 18 (each workload alone, warm
weights: ``context_bytes=0``) and with context-faithful timing (weights as cold as the model leaves them); the rest
of the model is timed as the pipeline times it. Then >= 30 configs (the latency frontier of a size-vs-damage proxy,
the uniform configs and random ones) are applied and timed end to end, twice (the second pass is the retest
noise). Errors are |predicted - measured| / measured: the additive tables directly, the learned predictors
(:func:`mpq.solvers.predictors.select_latency_predictor`) on held-out configs (k-fold). Also checked: the
smallest reachable latency (the predictor's fastest config and the uniform ones, measured) against the best
config measured. The whole run is repeated with a competing CPU load that the benchmark starts itself, where the
noise checks should flag the rows.

    flock /tmp/mpq-bench.lock python bench/latency_accuracy.py                   # CPU, bundled models, idle + loaded
    python bench/latency_accuracy.py --device cuda --mode cuda cuda-graph        # 7B-shaped stack, decode + prefill

``--mode`` takes one or more deployment modes (``cuda``/``eager``, ``cuda-graph``/``graph``, ``compile``); the
result file is rewritten after every case, so a run stopped by a time limit keeps what it finished.

The damage proxy for the frontier is the uniform-quantization noise power, params x 4^-bits: the benchmark judges
latency predictions, so it needs configs a search would return, not a real sensitivity estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

log = logging.getLogger("latency_accuracy")


def _spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


@contextlib.contextmanager
def competing_load(processes: int, seconds: float = 7200.0):
    """``processes`` busy loops for the duration of the block (the benchmark's own competing load)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spin, args=(seconds,), daemon=True) for _ in range(processes)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
            p.join(30)


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def damage_proxy(table, inventory) -> list[float]:
    """Uniform-quantization noise power of each (layer, option): params x 4^-w_bits (float: 0)."""
    params = {layer.name: layer.params for layer in inventory}
    return [0.0 if (w := row.w_bits) is None or w != w else params[row.layer] * 4.0 ** -float(w)
            for row in table.itertuples()]


def make_configs(table, fixed: dict, frontier: int, random: int, seed: int = 0, at_least: int = 30
                 ) -> dict[str, dict[str, str]]:
    """Named configs: the uniform ones, the latency frontier (min damage under latency budgets), random ones (at
    least ``at_least`` configs in all)."""
    from mpq.solvers import pareto_frontier
    from mpq.solvers.predictors import calibration_configs

    front, _ = pareto_frontier(table, "latency_ms", fixed, points=frontier)
    idx = sorted(set(np.linspace(0, len(front) - 1, min(frontier, len(front))).round().astype(int)))
    return calibration_configs(table, [json.loads(c) for c in front["choice"].iloc[idx]], random, seed, at_least)


def _errors(predicted, measured) -> dict[str, float]:
    e = np.abs(np.asarray(predicted) - np.asarray(measured)) / np.asarray(measured) * 100
    return {"median_pct": float(np.median(e)), "p90_pct": float(np.percentile(e, 90)), "n": int(len(e))}


def run_case(name: str, model, inventory, x, target, args, cache) -> dict:
    """Profile, time configs end to end (twice), and score every predictor for one model and input."""
    import mpq
    from mpq.config import BitConfig, LayerBits
    from mpq.costs import build_cost_table
    from mpq.solvers.predictors import AdditiveLatency, fastest_choice, select_latency_predictor
    from mpq.space import build_search_space
    from mpq.workers import (measure_configs, model_key, profile_workloads, reachable_floor, time_rest_of_model,
                             workloads_for)

    t0 = time.perf_counter()
    space = build_search_space(inventory, target.device)
    tables, profiles = {}, {}
    for timing, ctx in (("before", 0), ("after", None)):
        workloads, by_pair = workloads_for(inventory, space, context_bytes=ctx)
        lat = profile_workloads(workloads, target, backend="inprocess", cache=cache, threads=args.threads,
                                repeats=args.repeats, progress=False)
        profiles[timing] = {"rows": len(lat), "untrusted_rows": lat.untrusted,
                            "copies_median": float(lat.frame["copies"].median()),
                            "other_cores_median": float(lat.frame["other_cores"].median())}

        def latency_of(layer, bits, lat=lat, by_pair=by_pair):
            return lat.median_ms(by_pair[(layer.name, bits.name)]) * max(layer.calls, 1)

        tables[timing] = build_cost_table(inventory, space, latency_of)
    rest = time_rest_of_model(model, inventory.names, x, repeats=args.repeats, threads=args.threads,
                              device=target.device, mode=target.mode).median_ms
    fixed = {"size_mb": 0.0, "bops": 0.0, "latency_ms": rest}
    table = tables["after"].assign(score=damage_proxy(tables["after"], inventory))
    configs = make_configs(table, fixed, args.frontier, args.random, at_least=args.configs)
    names, choices = list(configs), list(configs.values())

    def build(choice):
        return mpq.apply(copy.deepcopy(model), BitConfig({k: LayerBits.parse(v) for k, v in choice.items()}),
                         target.device, inventory)

    key = model_key(model, x)
    settings = dict(threads=args.threads, repeats=args.repeats, rounds=3)
    first = measure_configs(build, choices, x, target, key, cache=cache, **settings)
    retest = measure_configs(build, choices, x, target, key, cache=False, **settings)
    measured = np.array([r["median_ms"] for r in first])
    again = np.array([r["median_ms"] for r in retest])
    entry = {"model": name, "target": target.spec, "input": list(getattr(x, "shape", [])), "configs": len(choices),
             "rest_ms": rest, "profiles": profiles,
             "untrusted_configs": int(sum(1 for r in first if not r["trusted"])),
             "retest": _errors(again, measured)}
    for timing in ("before", "after"):
        entry[f"additive_{timing}"] = _errors(AdditiveLatency(rest).predict(tables[timing], choices), measured)
    sel = select_latency_predictor(tables["after"], rest, choices, measured, folds=args.folds)
    entry["heldout"] = sel.scores
    entry["selected"] = sel.name
    entry["selected_errors"] = sel.scores[sel.name]
    # the smallest reachable latency (the chosen predictor's fastest config and the uniform ones, measured) against
    # the fastest of all configs measured, in one interleaved group so that both see the same machine
    uniform = {n: c for n, c in configs.items() if n.startswith("uniform-")}
    fast = fastest_choice(tables["after"], sel.predictor)
    best = int(np.argmin(measured))
    group = {"fastest": fast, **uniform}
    rows = measure_configs(build, [*group.values(), choices[best]], x, target, key, cache=False,
                           group=len(group) + 1, **settings)
    floor = reachable_floor(group, lambda cs: rows[:len(group)])
    best_ms = float(rows[-1]["median_ms"])
    entry["floor"] = {"ms": floor.ms, "name": floor.name,
                      "predicted_fastest_ms": float(sel.predictor.predict(tables["after"], [fast])[0]),
                      "best_measured_ms": best_ms, "best_measured_name": names[best],
                      "floor_over_best_pct": 100 * (floor.ms / best_ms - 1)}
    entry["rows"] = [{"name": n, "measured_ms": float(m), "retest_ms": float(a),
                      "additive_before_ms": float(pb), "additive_after_ms": float(pa), "trusted": int(r["trusted"])}
                     for n, m, a, pb, pa, r in zip(names, measured, again,
                                                  AdditiveLatency(rest).predict(tables["before"], choices),
                                                  AdditiveLatency(rest).predict(tables["after"], choices), first)]
    entry["seconds"] = time.perf_counter() - t0
    log.info("%s %s: additive before %.1f%%, after %.1f%%, %s %.1f%% (p90 %.1f%%), retest %.1f%%", name, target.spec,
             entry["additive_before"]["median_pct"], entry["additive_after"]["median_pct"], sel.name,
             sel.scores[sel.name]["median_pct"], sel.scores[sel.name]["p90_pct"], entry["retest"]["median_pct"])
    return entry


def cpu_cases(models: list[str]):
    from mpq.layers import discover_layers
    from mpq.models import load_reference

    for name in models:
        task = load_reference(name)
        x = task.calib[0][0]
        yield name, task.model.eval(), discover_layers(task.model, x), x


def gpu_cases(blocks: int, tokens: list[int], device: str = "cuda"):
    """The 7B-shaped stack at each token count (``device="meta"``: shapes only, to check the plan without a GPU)."""
    import torch

    from mpq.layers import discover_layers
    from mpq.models.shaped import llama7b_shaped

    model = llama7b_shaped(blocks, device=device).eval()
    for m in tokens:
        x = torch.zeros(1, m, dtype=torch.long, device=device) if device == "meta" else \
            torch.randint(0, 32000, (1, m), device=device)
        yield f"llama-7b-shaped-{blocks}blocks-m{m}", model, discover_layers(model, x), x


def main(argv=None) -> None:
    import torch

    from mpq.models import reference_names
    from mpq.target import Target
    from mpq.workers import ProfileCache

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", nargs="+", default=["eager"],
                   help="deployment modes: eager (also spelled cuda or cpu), graph (cuda-graph), compile")
    p.add_argument("--models", nargs="*", default=None, help="CPU: bundled models (default: all)")
    p.add_argument("--blocks", type=int, default=4, help="CUDA: blocks of the 7B-shaped stack")
    p.add_argument("--tokens", nargs="*", type=int, default=[1, 2048], help="CUDA: decode / prefill lengths")
    p.add_argument("--frontier", type=int, default=12)
    p.add_argument("--random", type=int, default=20)
    p.add_argument("--configs", type=int, default=30, help="at least this many configs per model")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's, all cores)")
    p.add_argument("--phases", nargs="*", default=None, choices=["idle", "loaded"],
                   help="default: idle and loaded on CPU, idle on CUDA")
    p.add_argument("--name", default=None, help="result file name (default latency_accuracy_<device>[_<mode>])")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("mpq.workers.profiler", "mpq.workers.endtoend"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("latency_accuracy --device cuda needs a CUDA GPU; nothing was measured")
    targets = [Target.parse(f"{args.device}+{mode_of(m)}") for m in args.mode]
    args.threads = args.threads or torch.get_num_threads()
    phases = args.phases or (["idle", "loaded"] if args.device == "cpu" else ["idle"])
    models = args.models or reference_names()
    load_before, t0 = _loadavg(), time.perf_counter()
    results: list[dict] = []
    modes = [t.mode for t in targets]
    name = args.name or f"latency_accuracy_{args.device}" + ("" if modes == ["eager"] else "_" + "_".join(modes))

    def save() -> Path:
        return write_result(name, {"benchmark": "latency_accuracy", **environment(args.device, args.threads),
                                   "target": ", ".join(t.spec for t in targets), "threads": args.threads,
                                   "loadavg_before": load_before, "loadavg_after": _loadavg(),
                                   "wall_seconds": time.perf_counter() - t0,
                                   "goals": {"median_pct": 5.0, "p90_pct": 15.0, "floor_over_best_pct": 5.0},
                                   "results": results})

    for phase in phases:
        cache = ProfileCache(Path(tempfile.mkdtemp(prefix=f"mpq-latacc-{phase}-")) / "profiles.sqlite")
        load = competing_load(os.cpu_count() or 1) if phase == "loaded" else contextlib.nullcontext()
        with load:
            phase_load = _loadavg()
            cases = cpu_cases(models) if args.device == "cpu" else gpu_cases(args.blocks, args.tokens)
            for case, model, inventory, x in cases:
                for target in targets:  # every mode of a case before the next case (a time limit cuts cases)
                    entry = run_case(case, model, inventory, x, target, args, cache)
                    results.append({"phase": phase, "loadavg_at_start": phase_load, **entry})
                    log.info("%s", json.dumps({k: v for k, v in results[-1].items() if k != "rows"}))
                    save()  # a run stopped by a time limit keeps every finished case
    log.info("wrote %s", save())


def mode_of(spec: str) -> str:
    """A deployment mode from its spellings: cuda, cpu, eager -> eager; cuda-graph, cuda+graph, graph -> graph."""
    text = spec.strip().lower()
    for prefix in ("cuda-", "cuda+", "cpu+", "cpu-"):
        text = text.removeprefix(prefix)
    return "eager" if text in ("cuda", "cpu", "eager", "") else text


if __name__ == "__main__":
    main()

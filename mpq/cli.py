"""The ``mpq`` command line. Option defaults come from the Python functions' own defaults.

    mpq search --model digits-cnn --budget size=0.3 --out runs/demo
    mpq search --model path/to/hf-dir --eval perplexity --data file.txt --budget size=0.3 --quantizer gptq --out r
    mpq profile --model digits-cnn
    mpq apply --model digits-cnn --config runs/demo/config.json --out runs/demo/quantized.pt
    mpq dashboard runs/demo [--open]
    mpq sensitivity-report --model digits-cnn --out runs/estimators
    mpq models
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mpq")


def _default(fn, name: str) -> Any:
    return inspect.signature(fn).parameters[name].default


def load_task(spec: str, eval: str | None = None, data: str | None = None):
    """A bundled reference model by name, a saved Hugging Face model directory (evaluated with ``eval`` on
    ``data``, see :func:`mpq.hf.hf_task`), or ``package.module:function`` returning a ReferenceTask-like object
    (attributes ``model``, ``calib``, ``eval_fn``, ``metric``, ``higher_is_better``, ``name``)."""
    from mpq.hf import hf_task, is_hf_dir
    from mpq.models import load_reference, reference_names

    if is_hf_dir(spec):
        return hf_task(spec, eval or "perplexity", data)
    if eval or data:
        raise SystemExit(f"mpq: --eval/--data apply to a Hugging Face model directory; {spec!r} is not one "
                         f"(no config.json)")
    if ":" in spec:
        mod, _, fn = spec.partition(":")
        sys.path.insert(0, str(Path.cwd()))
        return getattr(importlib.import_module(mod), fn)()
    if spec in reference_names():
        return load_reference(spec)
    raise SystemExit(f"mpq: unknown model {spec!r}: use one of {', '.join(reference_names())}, a Hugging Face model "
                     f"directory, or module:function")


def _parser() -> argparse.ArgumentParser:
    from mpq.api import search, sensitivity_report
    from mpq.evaluators import EVALUATORS
    from mpq.quantizers import available_quantizers
    from mpq.workers import profile_workloads

    p = argparse.ArgumentParser(prog="mpq", description="Mixed-precision bit-allocation search for PyTorch models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, model_required=True):
        sp.add_argument("--model", required=model_required,
                        help="bundled model (mpq models), a saved Hugging Face model directory, or module:fn")
        sp.add_argument("--eval", default=None, choices=EVALUATORS,
                        help="metric of a Hugging Face model directory (default perplexity)")
        sp.add_argument("--data", default=None,
                        help="data of a Hugging Face model: a text file (perplexity) or a .pt of inputs/labels")
        sp.add_argument("--device", default=None, action="append",
                        help=f"target device (default {_default(search, 'device')}): cpu, cuda, or a kind of node "
                             "on a Ray cluster such as cuda:h100 (nodes declare the resource mpq_device_cuda_h100); "
                             "search: repeat for one frontier per device")
        sp.add_argument("--batch-size", type=int, default=_default(search, "batch_size"),
                        help="batch to profile and time at (default: the calibration batch)")
        sp.add_argument("--threads", type=int, default=_default(search, "threads"),
                        help="intra-op threads for latency measurement (default: torch's)")

    s = sub.add_parser("search", help="find per-layer bits under a budget and write a run directory")
    common(s, model_required=False)
    s.add_argument("--budget", action="append",
                   help="e.g. size=0.3 (of float), latency=0.6, size_mb=0.5, latency_ms=2, bops=1e9; repeatable")
    s.add_argument("--out", help="run directory to write")
    s.add_argument("--resume", default=None, metavar="RUN",
                   help="continue an interrupted search in RUN with its own arguments: finished sensitivities and "
                        "measured latencies are reused, not measured again")
    s.add_argument("--sensitivity", default=_default(search, "sensitivity"),
                   help="estimator or weighted combination, e.g. hessian, lrp, '0.7*hessian+0.3*decoupled'")
    s.add_argument("--quantizer", default=_default(search, "quantizer"), choices=available_quantizers(),
                   help="how each option's integers are chosen: minmax, mse clipping, gptq error feedback")
    s.add_argument("--solver", default=_default(search, "solver"), choices=["ilp", "pareto", "greedy", "optuna",
                                                                             "exhaustive"])
    s.add_argument("--solver-options", default=None, type=json.loads,
                   help='JSON, e.g. \'{"n_trials": 500}\' for optuna or \'{"min_bits": {"fc2": 8}}\'')
    s.add_argument("--profile", default=_default(search, "profile"), choices=["ray", "inprocess"])
    s.add_argument("--workers", type=int, default=None, help="at most this many profilers per device (default: one "
                                                               "per device slot of the cluster)")
    s.add_argument("--evaluate-workers", type=int, default=_default(search, "evaluate_workers"),
                   help="with --profile ray: evaluate the frontier points on this many Ray actors")
    s.add_argument("--address", default=_default(search, "address"), help="Ray cluster address (default: local)")
    s.add_argument("--frontier-points", type=int, default=_default(search, "frontier_points"))
    s.add_argument("--repeats", type=int, default=_default(search, "repeats"))
    s.add_argument("--allowed", default=None, help="comma-separated options to allow, e.g. w8a8,w4a16g32")
    s.add_argument("--no-cache", action="store_true", help="measure every workload again")

    pr = sub.add_parser("profile", help="measure every (layer, option) workload of a model and print the table")
    common(pr, model_required=False)
    pr.add_argument("--export", default=None, metavar="FILE.parquet",
                    help="write the profile cache (every device, or --fingerprint's) to Parquet; no --model needed")
    pr.add_argument("--import", dest="import_", default=None, metavar="FILE.parquet",
                    help="merge a Parquet export into the profile cache (newer measurements win)")
    pr.add_argument("--fingerprint", default=None, help="with --export: only this device fingerprint id")
    pr.add_argument("--cache", default=None, help="profile cache file (default: ~/.cache/mpq/profiles.sqlite)")
    pr.add_argument("--profile", default=_default(profile_workloads, "backend"), choices=["ray", "inprocess"])
    pr.add_argument("--address", default=None)
    pr.add_argument("--workers", type=int, default=None, help="at most this many profilers (default: one per device "
                                                                "slot of the cluster)")
    pr.add_argument("--repeats", type=int, default=_default(profile_workloads, "repeats"))
    pr.add_argument("--out", default=None, help="write the table as CSV")
    pr.add_argument("--no-cache", action="store_true")

    a = sub.add_parser("apply", help="apply a bit config on real kernels; report metric, latency and size")
    common(a)
    a.add_argument("--config", required=True, help="config.json of a run")
    a.add_argument("--quantizer", default=None, choices=available_quantizers(),
                   help="default: the one the search recorded in the config")
    a.add_argument("--out", default=None, help="save the quantized state dict (weights_only-loadable)")

    d = sub.add_parser("dashboard", help="write (and optionally open) a run's dashboard.html; several runs compare")
    d.add_argument("run", nargs="+", help="run directory (several: one dashboard comparing them; give --out)")
    d.add_argument("--out", default=None)
    d.add_argument("--open", action="store_true", help="open it in a browser")

    sr = sub.add_parser("sensitivity-report", help="judge sensitivity estimators against measured damage")
    sr.add_argument("--model", required=True, help="bundled model (digits-cnn, char-lm) or module:fn")
    sr.add_argument("--out", required=True, help="directory for estimators.csv/.html and the tables")
    sr.add_argument("--device", default=_default(sensitivity_report, "device"),
                    help="whose kernels define the options; 'generic' for a 2-8-bit fake-quant space")
    sr.add_argument("--estimators", default=",".join(_default(sensitivity_report, "estimators")))
    sr.add_argument("--configs", type=int, default=_default(sensitivity_report, "n_configs"),
                    help="random mixed configs to measure")
    sr.add_argument("--backend", default=_default(sensitivity_report, "backend"), choices=["ray", "inprocess"],
                    help="where the measured damage is computed")
    sr.add_argument("--seed", type=int, default=_default(sensitivity_report, "seed"))

    r = sub.add_parser("report", help="re-render a run's report.md")
    r.add_argument("run")
    sub.add_parser("models", help="list the bundled reference models")
    return p


SEARCH_ARGS = "search_args.json"  # what a run directory needs to be resumed


def _resume_args(args) -> argparse.Namespace:
    """The arguments an interrupted search in ``args.resume`` was started with (its run directory kept them)."""
    path = Path(args.resume) / SEARCH_ARGS
    if not path.exists():
        raise SystemExit(f"mpq: {args.resume} holds no {SEARCH_ARGS}: it is not the run directory of a search "
                         f"started from the command line")
    saved = json.loads(path.read_text())
    given = {k: v for k, v in vars(args).items() if k in ("verbose", "quiet")}
    return argparse.Namespace(**{**saved, **given, "out": str(args.resume), "resume": args.resume})


def cmd_search(args) -> int:
    from mpq.api import search
    from mpq.budget import Budget
    from mpq.report import summary_line

    if args.resume:
        args = _resume_args(args)
        log.info("resuming the search in %s", args.out)
    missing = [f"--{k}" for k in ("model", "budget", "out") if not getattr(args, k)]
    if missing:
        raise SystemExit(f"mpq search: {', '.join(missing)} required (or --resume RUN)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / SEARCH_ARGS).write_text(json.dumps({k: v for k, v in vars(args).items()
                                                          if k not in ("cmd", "resume")}, indent=2))
    task = load_task(args.model, args.eval, args.data)
    budget = Budget.parse(",".join(args.budget))
    command = "mpq " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    devices = _devices(args)
    options = dict(budget=budget, sensitivity=args.sensitivity, solver=args.solver, solver_options=args.solver_options,
                   quantizer=args.quantizer, batch_size=args.batch_size, profile=args.profile, address=args.address,
                   workers=getattr(args, "workers", None),
                   evaluate_workers=getattr(args, "evaluate_workers", None), metric=task.metric,
                   higher_is_better=task.higher_is_better, frontier_points=args.frontier_points,
                   threads=args.threads, repeats=args.repeats,
                   allowed=args.allowed.split(",") if args.allowed else None, cache=not args.no_cache,
                   model_name=task.name, progress=not args.quiet, command=command)
    if len(devices) == 1:
        search(task.model, task.calib, task.eval_fn, device=devices[0], out=args.out, **options)
        print(summary_line(args.out))
    else:
        from mpq.api import search_devices
        from mpq.target import Target

        search_devices(task.model, task.calib, task.eval_fn, devices=devices, out=args.out, **options)
        for d in devices:
            print(f"{Target.parse(d).name}: {summary_line(Path(args.out) / Target.parse(d).slug)}")
    print(f"run directory: {Path(args.out).resolve()} (report.md, dashboard.html, config.json"
          f"{'' if len(devices) == 1 else '; one subdirectory per device'})")
    return 0


def _devices(args) -> list[str]:
    """The ``--device`` values (a run directory saved before ``--device`` could repeat holds one string)."""
    from mpq.api import search

    given = args.device or [_default(search, "device")]
    return [given] if isinstance(given, str) else list(given)


def _one_device(args) -> str:
    devices = _devices(args)
    if len(devices) > 1:
        raise SystemExit(f"mpq {args.cmd}: one --device at a time (got {devices}); only search takes several")
    return devices[0]


def cmd_profile(args) -> int:
    import pandas as pd

    from mpq.layers import discover_layers
    from mpq.space import build_search_space
    from mpq.workers import profile_workloads, workloads_for

    from mpq.workers import ProfileCache

    if args.export or args.import_:
        store = ProfileCache(args.cache)
        if args.import_:
            print(f"imported {store.import_file(args.import_)} profiles from {args.import_} into {store.path}")
        if args.export:
            print(f"exported {store.export(args.export, args.fingerprint)} profiles from {store.path} to "
                  f"{args.export}")
        return 0
    if not args.model:
        raise SystemExit("mpq profile: give --model (to measure), or --export/--import (to move a table)")
    task = load_task(args.model, args.eval, args.data)
    inv = discover_layers(task.model, task.calib[0][0])
    device = _one_device(args)
    space = build_search_space(inv, device)
    workloads, by_pair = workloads_for(inv, space, args.batch_size)
    table = profile_workloads(workloads, device, backend=args.profile, address=args.address,
                              cache=False if args.no_cache else (args.cache or True), threads=args.threads,
                              workers=args.workers,
                              repeats=args.repeats,
                              progress=not args.quiet)
    if args.out:
        table.save(args.out)
    with pd.option_context("display.width", 160, "display.max_rows", 500):
        print(table.frame[["kind", "option", "weight_shape", "input_shape", "median_ms", "q1_ms", "q3_ms",
                           "source"]].to_string(index=False))
    st = table.stats
    print(f"{len(table)} unique workloads (from {len(by_pair)} layer-option pairs of {len(inv)} layers) on "
          f"{st['target']}, {table.fingerprint.get('name')} ({table.fingerprint.get('threads')} threads): "
          f"{table.measured} measured in {st['tasks']} tasks, {table.cache_hits} from cache; per node: "
          f"{st['measured_per_node'] or '-'}")
    return 0


def cmd_apply(args) -> int:
    import copy

    import torch

    from mpq.api import _resize_batch, apply
    from mpq.config import BitConfig
    from mpq.kernels.gemm import state_bytes
    from mpq.workers import time_model

    task = load_task(args.model, args.eval, args.data)
    config = BitConfig.load(args.config)
    example = task.calib[0][0] if args.batch_size is None else _resize_batch(task.calib[0][0], args.batch_size)
    float_ms = time_model(task.model, example, threads=args.threads).median_ms
    float_metric = task.eval_fn(task.model)
    float_bytes = state_bytes(task.model)
    model = apply(copy.deepcopy(task.model), config, _one_device(args), quantizer=args.quantizer,
                  calib_data=task.calib)
    ms = time_model(model, example, threads=args.threads).median_ms
    metric = task.eval_fn(model)
    print(json.dumps({"config": args.config, "quantized_layers": len(config.quantized()),
                      task.metric: metric, f"float_{task.metric}": float_metric, "latency_ms": ms,
                      "float_latency_ms": float_ms, "size_mb": state_bytes(model) / 1e6,
                      "float_size_mb": float_bytes / 1e6}, indent=2))
    if args.out:
        torch.save(model.state_dict(), args.out)
        print(f"saved quantized state dict to {args.out} (load with mpq.load_quantized)")
    return 0


def cmd_sensitivity_report(args) -> int:
    import pandas as pd

    from mpq.api import sensitivity_report

    task = load_task(args.model)
    if not getattr(task, "heldout", None):
        raise SystemExit(f"mpq: model {args.model!r} has no held-out batches (attribute 'heldout') to measure on")
    report = sensitivity_report(task.model, task.calib, task.heldout, args.estimators.split(","), args.configs,
                                None if args.device == "generic" else args.device, seed=args.seed,
                                backend=args.backend, out=args.out,
                                progress=not args.quiet)
    with pd.option_context("display.width", 160):
        print(report.table.round(3).to_string(index=False))
    print(f"wrote {Path(args.out).resolve()} (estimators.csv, estimators.html)")
    return 0


def cmd_dashboard(args) -> int:
    from mpq.dashboards import write_dashboard

    out = args.out or ("dashboard-compare.html" if len(args.run) > 1 else None)
    path = write_dashboard(args.run, out)
    print(path)
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from mpq.errors import MpqError

    try:
        if args.cmd == "search":
            return cmd_search(args)
        if args.cmd == "profile":
            return cmd_profile(args)
        if args.cmd == "apply":
            return cmd_apply(args)
        if args.cmd == "dashboard":
            return cmd_dashboard(args)
        if args.cmd == "sensitivity-report":
            return cmd_sensitivity_report(args)
        if args.cmd == "report":
            from mpq.report import write_report

            print(write_report(args.run))
            return 0
        if args.cmd == "models":
            from mpq.models import _TASKS

            for name, mod in _TASKS.items():
                print(f"{name}: {importlib.import_module(mod).__doc__.strip().splitlines()[0]}")
            return 0
    except MpqError as e:
        print(f"mpq: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``mpq`` subcommands other than search and solve (:mod:`mpq.cli_search`): profile, apply, dashboard,
sensitivity-report, report, models. Each is an ``add_arguments``/``run`` pair registered with
:func:`mpq.cli.register_command`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mpq.cli_search  # noqa: F401  (search and solve come first in the help)
from mpq.cli import load_task, model_arguments, one_device, register_command


def _profile_arguments(sp: argparse.ArgumentParser) -> None:
    from mpq.options import ProfileOptions
    from mpq.options import add_arguments as option_flags

    model_arguments(sp, model_required=False)
    sp.add_argument("--export", default=None, metavar="FILE.parquet",
                    help="write the profile cache (every device, or --fingerprint's) to Parquet; no --model needed")
    sp.add_argument("--import", dest="import_", default=None, metavar="FILE.parquet",
                    help="merge a Parquet export into the profile cache (newer measurements win)")
    sp.add_argument("--fingerprint", default=None, help="with --export: only this device fingerprint id")
    sp.add_argument("--check", action="store_true",
                    help="re-validate the profile cache: drop invalid, untrusted (measured under load), noisy and "
                         "stale rows, measure a sample of the rest again; no --model needed")
    sp.add_argument("--dry-run", action="store_true", help="with --check: report what would go, remove nothing")
    sp.add_argument("--recheck", type=int, default=8,
                    help="with --check: rows per fingerprint of this machine measured again (default 8)")
    sp.add_argument("--cache-file", "--cache", dest="cache_file", default=None,
                    help="profile cache file (default: ~/.cache/mpq/profiles.sqlite)")
    sp.add_argument("--out", default=None, help="write the table as CSV")
    option_flags(sp, ProfileOptions, skip=("warmup", "latency_configs"))


def cmd_profile(args: argparse.Namespace) -> int:
    import pandas as pd

    from mpq.layers import discover_layers
    from mpq.space import build_search_space
    from mpq.workers import ProfileCache, profile_workloads, workloads_for

    if args.check:
        from mpq.workers import check_cache

        report = check_cache(ProfileCache(args.cache_file), recheck=args.recheck, dry_run=args.dry_run)
        print(report.describe())
        for reason, n in sorted(report.dropped.items()):
            print(f"  {reason}: {n}")
        return 0
    if args.export or args.import_:
        store = ProfileCache(args.cache_file)
        if args.import_:
            print(f"imported {store.import_file(args.import_)} profiles from {args.import_} into {store.path}")
        if args.export:
            print(f"exported {store.export(args.export, args.fingerprint)} profiles from {store.path} to "
                  f"{args.export}")
        return 0
    if not args.model:
        raise SystemExit("mpq profile: give --model (to measure), --check (to re-validate the cache), or "
                         "--export/--import (to move a table)")
    task = load_task(args.model, args.eval, args.data)
    inv = discover_layers(task.model, task.calib[0][0])
    from mpq.target import Target

    target = Target.parse(one_device(args))  # the kind of device and its deployment mode (cuda-graph, ...)
    space = build_search_space(inv, target.device)
    workloads, by_pair = workloads_for(inv, space, args.batch_size)
    table = profile_workloads(workloads, target, backend=args.profile, address=args.address,
                              cache=False if not args.cache else (args.cache_file or True), threads=args.threads,
                              workers=args.workers, repeats=args.repeats, progress=not args.quiet)
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


def _apply_arguments(sp: argparse.ArgumentParser) -> None:
    from mpq.options import _quantizer_names

    model_arguments(sp)
    sp.add_argument("--config", required=True, help="config.json of a run")
    sp.add_argument("--quantizer", default=None, choices=_quantizer_names(),
                    help="default: the one the search recorded in the config")
    sp.add_argument("--out", default=None, help="save the quantized state dict (weights_only-loadable)")
    sp.add_argument("--batch-size", type=int, default=None, help="batch to time at (default: the calibration one)")
    sp.add_argument("--threads", type=int, default=None, help="intra-op threads for timing (default: torch's)")


def cmd_apply(args: argparse.Namespace) -> int:
    import copy

    import torch

    from mpq.api import apply
    from mpq.config import BitConfig
    from mpq.cost_stage import resize_batch
    from mpq.kernels.gemm import state_bytes
    from mpq.workers import time_model

    config = BitConfig.load(args.config)  # a missing or broken config fails before the model loads
    task = load_task(args.model, args.eval, args.data)
    example = task.calib[0][0] if args.batch_size is None else resize_batch(task.calib[0][0], args.batch_size)
    float_ms = time_model(task.model, example, threads=args.threads).median_ms
    float_metric = task.eval_fn(task.model)
    float_bytes = state_bytes(task.model)
    model = apply(copy.deepcopy(task.model), config, one_device(args), quantizer=args.quantizer,
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


def _dashboard_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("run", nargs="+", help="run directory (several: one dashboard comparing them; give --out)")
    sp.add_argument("--out", default=None)
    sp.add_argument("--open", action="store_true", help="open it in a browser")


def cmd_dashboard(args: argparse.Namespace) -> int:
    from mpq.dashboards import write_dashboard

    out = args.out or ("dashboard-compare.html" if len(args.run) > 1 else None)
    path = write_dashboard(args.run, out)
    print(path)
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return 0


def _report_arguments(sp: argparse.ArgumentParser) -> None:
    import inspect

    from mpq.api import sensitivity_report

    defaults = {k: v.default for k, v in inspect.signature(sensitivity_report).parameters.items()}
    sp.add_argument("--model", required=True, help="bundled model (digits-cnn, char-lm) or module:fn")
    sp.add_argument("--out", required=True, help="directory for estimators.csv/.html and the tables")
    sp.add_argument("--device", default=defaults["device"],
                    help="whose kernels define the options; 'generic' for a 2-8-bit fake-quant space")
    sp.add_argument("--estimators", default=",".join(defaults["estimators"]))
    sp.add_argument("--configs", type=int, default=defaults["n_configs"], help="random mixed configs to measure")
    sp.add_argument("--backend", default=defaults["backend"], choices=["ray", "inprocess"],
                    help="where the measured damage is computed")
    sp.add_argument("--seed", type=int, default=defaults["seed"])


def cmd_sensitivity_report(args: argparse.Namespace) -> int:
    import pandas as pd

    from mpq.api import sensitivity_report

    task = load_task(args.model)
    if not getattr(task, "heldout", None):
        raise SystemExit(f"mpq: model {args.model!r} has no held-out batches (attribute 'heldout') to measure on")
    report = sensitivity_report(task.model, task.calib, task.heldout, args.estimators.split(","), args.configs,
                                None if args.device == "generic" else args.device, seed=args.seed,
                                backend=args.backend, out=args.out, progress=not args.quiet)
    with pd.option_context("display.width", 160):
        print(report.table.round(3).to_string(index=False))
    print(f"wrote {Path(args.out).resolve()} (estimators.csv, estimators.html)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mpq.report import write_report

    print(write_report(args.run))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from mpq.models import describe_reference, reference_names

    for name in reference_names():
        print(f"{name}: {describe_reference(name)}")
    return 0


register_command("profile", "measure every (layer, option) workload of a model and print the table",
                 _profile_arguments, cmd_profile)
register_command("apply", "apply a bit config on real kernels; report metric, latency and size", _apply_arguments,
                 cmd_apply)
register_command("dashboard", "write (and optionally open) a run's dashboard.html; several runs compare",
                 _dashboard_arguments, cmd_dashboard)
register_command("sensitivity-report", "judge sensitivity estimators against measured damage", _report_arguments,
                 cmd_sensitivity_report)
register_command("report", "re-render a run's report.md", lambda sp: sp.add_argument("run"), cmd_report)
register_command("models", "list the bundled reference models", lambda sp: None, cmd_models)

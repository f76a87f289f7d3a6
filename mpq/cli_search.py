"""``mpq search`` (with ``--resume``) and ``mpq solve``: the commands that run a study and solve it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from mpq.cli import (SEARCH_ARGS, budget_slug, command_line, devices_of, given_flags, load_task, model_arguments,
                     register_command)

log = logging.getLogger("mpq")

# What --resume may change: these act after the study (solving, evaluating) or only say where work runs.
RESUME_APPLIES = ("budget", "solver", "solver_options", "tie_tolerance", "frontier_points", "evaluate_frontier",
                  "evaluate_workers", "profile", "address", "workers", "force", "verify", "latency_configs")
# What it may not: these change the study itself (its scores or measurements); a new run directory is needed.
RESUME_REFUSES = ("model", "eval", "data", "device", "sensitivity", "sensitivity_options", "quantizer",
                  "quantizer_options", "allowed", "pinned", "threads", "repeats", "warmup", "batch_size", "cache")


def search_arguments(sp: argparse.ArgumentParser) -> None:
    from mpq.options import EvaluateOptions, ProfileOptions, SensitivityOptions, SolveOptions, SpaceOptions
    from mpq.options import add_arguments as option_flags

    model_arguments(sp, model_required=False)
    sp.add_argument("--budget", action="append",
                    help="e.g. size=0.3 (of float), latency=0.6, size_mb=0.5, latency_ms=2, bops=1e9, per phase "
                         "latency_ms@1=0.5, decode=0.6, prefill_ms@2048=40; repeatable")
    sp.add_argument("--out", help="run directory to write (new, empty, or an mpq run)")
    sp.add_argument("--force", action="store_true", help="write into --out even if it holds files that are not "
                                                          "an mpq run (files of the same name are replaced)")
    sp.add_argument("--resume", default=None, metavar="RUN",
                    help="continue an interrupted search in RUN with its own arguments: finished sensitivities and "
                         "measured latencies are reused; --budget, --solver and the other solve flags may change")
    for cls in (SpaceOptions, SensitivityOptions, ProfileOptions, SolveOptions, EvaluateOptions):
        option_flags(sp, cls)


def _resume_args(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments the search in ``args.resume`` was started with (its run directory kept them), with the flags
    given now that may change applied and the others refused."""
    from mpq.artifacts import read_json
    from mpq.errors import RunDirectoryError

    path = Path(args.resume) / SEARCH_ARGS
    if not path.exists():
        raise RunDirectoryError(f"{args.resume} holds no {SEARCH_ARGS}: it is not the run directory of a search "
                                f"started from the command line")
    saved = read_json(path, "run directory")
    if not isinstance(saved, dict):
        raise RunDirectoryError(f"{path} holds a {type(saved).__name__}, not the arguments mpq saved")
    if "no_cache" in saved:  # run directories from before the flags came from the option dataclasses
        saved.setdefault("cache", not saved.pop("no_cache"))
    given = {k: v for k, v in given_flags(_SEARCH, args.argv).items() if k not in ("resume", "out")}
    changed = {k: v for k, v in given.items() if saved.get(k, v) != v or k not in saved}
    refused = sorted(k for k in changed if k in RESUME_REFUSES)
    if refused:
        parts = ", ".join(f"--{k.replace('_', '-')} (saved: {saved.get(k)!r}, given: {given[k]!r})" for k in refused)
        raise RunDirectoryError(f"--resume {args.resume} keeps the run's study; these flags would change it: "
                                f"{parts}. Start a new run (--out NEW) to change them")
    for k in sorted(changed):
        if k in RESUME_APPLIES:
            log.info("resuming %s with --%s %r (was %r)", args.resume, k.replace("_", "-"), given[k], saved.get(k))
    merged = {**saved, **{k: given[k] for k in changed}, "verbose": args.verbose, "quiet": args.quiet}
    return argparse.Namespace(**{**merged, "out": str(args.resume), "resume": args.resume, "cmd": "search",
                                 "argv": args.argv, "force": True})


def _study_options(args: argparse.Namespace, task) -> dict[str, Any]:
    from mpq.options import StudyOptions

    options = {k: getattr(args, k) for k in StudyOptions.names() if hasattr(args, k) and k != "device"}
    options.update(metric=task.metric, higher_is_better=task.higher_is_better)
    return options


def cmd_search(args: argparse.Namespace) -> int:
    from mpq.api import search, search_devices
    from mpq.artifacts import prepare_run_dir, write_json
    from mpq.budget import Budget
    from mpq.report import summary_line
    from mpq.target import Target

    if args.resume:
        args = _resume_args(args)
        log.info("resuming the search in %s", args.out)
    missing = [f"--{k}" for k in ("model", "budget", "out") if not getattr(args, k, None)]
    if missing:
        raise SystemExit(f"mpq search: {', '.join(missing)} required (or --resume RUN)")
    budget = Budget.parse(",".join(args.budget))  # a malformed budget fails before anything is written or loaded
    out = prepare_run_dir(args.out, args.force)
    write_json(out / SEARCH_ARGS, {k: v for k, v in vars(args).items() if k not in ("cmd", "resume", "argv",
                                                                                    "force")})
    task = load_task(args.model, args.eval, args.data)
    devices = devices_of(args)
    options = dict(budget=budget, model_name=task.name, progress=not args.quiet, command=command_line(),
                   **_study_options(args, task))
    if len(devices) == 1:
        search(task.model, task.calib, task.eval_fn, device=devices[0], out=out, force=True, **options)
        print(summary_line(out))
    else:
        search_devices(task.model, task.calib, task.eval_fn, devices=devices, out=out, force=True, **options)
        for d in devices:
            print(f"{Target.parse(d).name}: {summary_line(out / Target.parse(d).slug)}")
    print(f"run directory: {out.resolve()} (report.md, dashboard.html, config.json"
          f"{'' if len(devices) == 1 else '; one subdirectory per device'})")
    return 0


def solve_arguments(sp: argparse.ArgumentParser) -> None:
    from mpq.options import SolveOptions
    from mpq.options import add_arguments as option_flags

    sp.add_argument("run", help="run directory of a finished search or study")
    sp.add_argument("--budget", action="append", required=True, help="the budget to solve for (as mpq search)")
    sp.add_argument("--out", default=None, help="run directory for this solve (default RUN/solve-<budget>)")
    sp.add_argument("--force", action="store_true", help="write into --out even if it is not an mpq run")
    sp.add_argument("--evaluate", action="store_true",
                    help="apply the chosen config on the real kernels, time it and run the evaluator (loads the "
                         "model the run was searched with: runs started by mpq search only)")
    option_flags(sp, SolveOptions)


def cmd_solve(args: argparse.Namespace) -> int:
    from mpq.budget import Budget
    from mpq.report import summary_line
    from mpq.studies import load_study

    budget = Budget.parse(",".join(args.budget))
    study = load_study(args.run)
    overrides = {k: v for k, v in given_flags(_SOLVE, args.argv).items()
                 if k in ("solver", "solver_options", "tie_tolerance", "frontier_points")}
    if args.evaluate:
        _attach_model(study, Path(args.run))
    out = Path(args.out) if args.out else Path(args.run) / f"solve-{budget_slug(budget)}"
    result = study.solve(budget, evaluate=args.evaluate, out=out, force=args.force, **overrides)
    print(summary_line(out))
    print(f"solved in {result.info['stages_seconds']['solve']:.2f} s; run directory: {out.resolve()}")
    return 0


def _attach_model(study, run: Path) -> None:
    from mpq.artifacts import read_json
    from mpq.errors import RunDirectoryError

    if not (run / SEARCH_ARGS).exists():
        raise RunDirectoryError(f"--evaluate needs the model {run} was searched with, and {run} holds no "
                                f"{SEARCH_ARGS} (it was not started by mpq search): solve without --evaluate, or "
                                f"use study.attach(model, calib, eval_fn) from Python")
    saved = read_json(run / SEARCH_ARGS, "run directory")
    task = load_task(saved["model"], saved.get("eval"), saved.get("data"))
    study.attach(task.model, task.calib, task.eval_fn)


_SEARCH = register_command("search", "find per-layer bits under a budget and write a run directory",
                           search_arguments, cmd_search)
_SOLVE = register_command("solve", "solve a finished run for another budget (seconds: no re-measuring)",
                          solve_arguments, cmd_solve)

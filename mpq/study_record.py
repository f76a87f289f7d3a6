"""What a study knows once its expensive stages are done, its record in the run directory, and the solve stage.

A :class:`StudyRecord` is plain data (tables and numbers, no model): the options it was made with, the cost table
(size, BOPs, one latency column per phase), the sensitivity scores, the per-layer facts a result reports, and how
they were measured. It is all that solving needs, so a study read back from disk (``study.json`` and the tables
beside it) solves any budget as a live one does. The solve stage (:func:`allocate`, :func:`frontier`) works on it
through the solvers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from mpq.artifacts import STUDY_FILE, read_json, read_table, write_json
from mpq.config import QuantizerSpec
from mpq.cost_stage import MAIN, CostTables, options_per_layer
from mpq.errors import ConfigError, RunDirectoryError
from mpq.options import TIE_BREAK, SolveOptions, StudyOptions

log = logging.getLogger(__name__)
FORMAT, VERSION = "mpq.study", 1
COSTS_FILE, LAYERS_FILE = "study_costs.csv", "study_layers.csv"


def _latency_file(column: str) -> str:
    return "study_latency.csv" if column == MAIN else f"study_latency_{column.replace('@', '_at_')}.csv"


@dataclass
class StudyRecord:
    """The budget-independent results of a study (see the module docstring)."""

    options: StudyOptions
    model_name: str
    target: str  # the target's name (cpu, cuda:h100, ...)
    device: str  # the kernels' device
    costs: CostTables
    sensitivity: Any = None  # mpq.sensitivity.SensitivityResult
    layers: pd.DataFrame = field(default_factory=pd.DataFrame)  # static per-layer facts
    kept_float: pd.DataFrame = field(default_factory=pd.DataFrame)
    quantizer: QuantizerSpec | None = None
    keys: dict[str, str] = field(default_factory=dict)  # model, calib, scores
    space_notes: dict[str, str] = field(default_factory=dict)
    space_size: int = 0
    batch_size: int = 0
    threads: int = 0
    sequence_length: int | None = None
    profile_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # per latency column
    stages_seconds: dict[str, float] = field(default_factory=dict)
    out: Path | None = None
    command: str | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # costs joined with every score column
    latency_info: dict[str, Any] = field(default_factory=dict)  # the latency predictor chosen and its configs

    @property
    def mode(self) -> str:
        """The target's deployment mode (eager, graph, compile)."""
        from mpq.target import Target

        return Target.parse(self.options.space.device).mode

    def check_mode(self) -> None:
        """Refuse latency tables measured in another mode than the target's (a record edited or put together from
        other runs): their sum would predict another deployment."""
        from mpq.workers import ModeMismatchError

        for column, info in self.profile_info.items():
            measured = (info.get("fingerprint") or {}).get("mode", "eager")
            if measured != self.mode:
                raise ModeMismatchError(
                    f"the latency table {column!r} of this study was measured in mode {measured!r} but its target "
                    f"{self.options.space.device!r} runs in mode {self.mode!r}: profile again for the target")

    def merge(self) -> None:
        """The solver's table: every cost column with the estimator's score columns."""
        from mpq.sensitivity_stage import score_columns

        self.table = self.costs.table.merge(score_columns(self.sensitivity), on=["layer", "option"], how="left")

    @property
    def estimator(self) -> str:
        return getattr(self.sensitivity, "estimator", "?")

    def options_per_layer(self) -> dict[str, list[str]]:
        return options_per_layer(self.costs.table)

    def restrictions(self) -> dict[str, Any]:
        """The solver-level restrictions the study's solve options carry (they change what is reachable)."""
        opts = dict(self.options.solve.solver_options)
        return {k: opts.get(k) for k in ("allowed", "pinned", "min_bits")}

    def allocate(self, limits: Mapping[str, float], solve, out: str | Path | None, damage=None):
        where = Path(out) if out is not None else self.out
        return allocate(self.table, limits, self.costs.fixed, solve, where, progress=False, damage=damage)

    # --- the run directory's record ------------------------------------------------------------------------------
    @staticmethod
    def save_started(out: Path, options: StudyOptions, model_name: str, command: str | None) -> None:
        """The record of a study that has begun: its options (what :func:`mpq.resume_study` runs it with). A
        finished study's record stays until this one finishes: a re-run that fails loses nothing."""
        try:
            if read_json(out / STUDY_FILE, "study").get("status") == "done":
                return
        except (RunDirectoryError, AttributeError):
            pass
        write_json(out / STUDY_FILE, {"format": FORMAT, "version": VERSION, "status": "running",
                                      "options": options.to_dict(), "model": model_name, "command": command})

    def save(self, out: Path) -> None:
        """``study.json`` and the tables beside it (the scores are saved by the sensitivity stage)."""
        out.mkdir(parents=True, exist_ok=True)
        self.costs.table.to_csv(out / COSTS_FILE, index=False)
        self.layers.to_csv(out / LAYERS_FILE, index=False)
        for column, latency in self.costs.latency.items():
            frame = latency.frame if hasattr(latency, "frame") else latency
            frame.to_csv(out / _latency_file(column), index=False)
        write_json(out / STUDY_FILE, {
            "format": FORMAT, "version": VERSION, "status": "done", "options": self.options.to_dict(),
            "model": self.model_name,
            "target": self.target, "device": self.device, "keys": self.keys, "estimator": self.estimator,
            "sensitivity_cost": getattr(self.sensitivity, "cost", {}),
            "sensitivity_tables": sorted(getattr(self.sensitivity, "tables", {})),
            "quantizer": None if self.quantizer is None else self.quantizer.to_dict(),
            "fixed": self.costs.fixed, "reference": self.costs.reference,
            "float_layers_ms": self.costs.float_layers_ms, "phases": self.costs.phases,
            "kept_float": self.kept_float.to_dict("records"), "space_notes": self.space_notes,
            "space_size": self.space_size, "batch_size": self.batch_size, "threads": self.threads,
            "sequence_length": self.sequence_length, "profile": self.profile_info,
            "stages_seconds": self.stages_seconds, "command": self.command, "created": self.created,
            "mode": self.mode, "latency_model": self.latency_info})

    @staticmethod
    def read_meta(run_dir: Path) -> dict[str, Any]:
        """``study.json`` of ``run_dir``, checked to be a study record of this version."""
        if not (run_dir / STUDY_FILE).exists():
            hint = " (it was written by an mpq from before studies: run `mpq search --resume` on it once)" \
                if (run_dir / "run.json").exists() else ""
            raise RunDirectoryError(f"{run_dir} holds no {STUDY_FILE}: not the run directory of a study{hint}")
        meta = read_json(run_dir / STUDY_FILE, "study")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise RunDirectoryError(f"{run_dir / STUDY_FILE} is not an mpq study record (format "
                                    f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r})")
        if meta.get("version") != VERSION:
            raise RunDirectoryError(f"{run_dir / STUDY_FILE} has version {meta.get('version')!r}; this mpq reads "
                                    f"{VERSION}")
        return meta

    @classmethod
    def load(cls, run_dir: str | Path) -> StudyRecord:
        """The record a study left in ``run_dir``; a directory without one (or with a damaged one) is a
        :class:`RunDirectoryError` that says what to do."""
        from mpq.sensitivity_stage import reuse_scores

        run_dir = Path(run_dir)
        meta = cls.read_meta(run_dir)
        if meta.get("status", "done") != "done":
            raise RunDirectoryError(f"the study in {run_dir} did not finish: resume it with "
                                    f"mpq.resume_study({str(run_dir)!r}, model, calib_data, eval_fn), or "
                                    f"mpq search --resume {run_dir} for a run started from the command line")
        costs = CostTables(read_table(run_dir / COSTS_FILE), dict(meta["fixed"]), dict(meta["reference"]),
                           _latency_tables(run_dir, meta), dict(meta.get("float_layers_ms", {})),
                           dict(meta.get("phases", {})))
        sensitivity = reuse_scores(run_dir, meta["keys"].get("scores"))
        if sensitivity is None:
            raise RunDirectoryError(f"{run_dir}: the scores of this study (scores.csv, sensitivity.json) are missing "
                                    f"or belong to another study")
        record = cls(StudyOptions.from_dict(meta["options"]), meta["model"], meta["target"], meta["device"], costs,
                     sensitivity, read_table(run_dir / LAYERS_FILE), pd.DataFrame(meta.get("kept_float", [])),
                     QuantizerSpec.of(meta.get("quantizer")), dict(meta["keys"]), dict(meta.get("space_notes", {})),
                     int(meta.get("space_size", 0)), int(meta.get("batch_size", 0)), int(meta.get("threads", 0)),
                     meta.get("sequence_length"), dict(meta.get("profile", {})),
                     dict(meta.get("stages_seconds", {})), run_dir, meta.get("command"),
                     meta.get("created", ""), latency_info=dict(meta.get("latency_model") or {}))
        record.check_mode()
        record.merge()
        return record


def _latency_tables(run_dir: Path, meta: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    out = {}
    for column in meta.get("phases", {}):
        path = run_dir / _latency_file(column)
        out[column] = read_table(path) if path.exists() else pd.DataFrame()
    return out


# --------------------------------------------------------------------------------------------------------------------
# the solve stage: the allocation under a budget, and the exact frontiers (once per study and resource)
# --------------------------------------------------------------------------------------------------------------------
FRONTIER_COLUMNS = ["swept", "budget", "score", "size_mb", "bops", "latency_ms", "exact", "method", "choice"]


def allocate(table: pd.DataFrame, limits: Mapping[str, float], fixed: Mapping[str, float], options: SolveOptions,
             out: Path | None, progress: bool, damage: Callable[[list[dict[str, str]]], list[float]] | None = None):
    """Run the chosen solver over the table. Ties (within ``tie_tolerance`` of the lowest normalised score) go to
    the fastest where the solver can break them; Optuna is warm-started from the ILP and keeps its study in the run
    directory. ``damage`` (configs -> measured damage on the calibration split, from a live study) goes to solvers
    that measure (``ilp+refine``); such a solver without it is an error that says how to get one."""
    from mpq.solvers import SOLVERS, Problem, split_options

    cls = SOLVERS.get(options.solver)
    problem_options, own = split_options(dict(options.solver_options))
    if options.breaks_ties and TIE_BREAK in table.columns and "secondary" not in problem_options:
        problem_options.update(secondary=TIE_BREAK, slack=max(options.tie_tolerance, 0.0))
    problem = Problem(table, limits, fixed, **problem_options)
    if options.solver == "optuna":
        own = _optuna_defaults(problem, own, out, progress)
    if getattr(cls, "needs_damage", False) and own.get("damage") is None:
        if damage is None:
            raise ConfigError(f"solver {options.solver!r} measures the damage of whole configs: it needs the model "
                              f"(mpq.search, mpq.study(...).solve, or study.attach(model, calib) on a loaded study)")
        own["damage"] = damage
    return cls.create(**own).allocate(problem)


def _optuna_defaults(problem, own: dict, out: Path | None, progress: bool) -> dict:
    from mpq.solvers import ILPSolver

    if "warm_start" not in own:
        own["warm_start"] = [dict(ILPSolver().allocate(problem).choice)]
    if out is not None and "storage" not in own:
        out.mkdir(parents=True, exist_ok=True)
        own["storage"] = out / "optuna.sqlite"
    own.setdefault("progress", progress)
    return own


def frontier(table: pd.DataFrame, fixed: Mapping[str, float], resource: str, points: int,
             progress: bool = False) -> pd.DataFrame:
    """The exact frontier of (score, ``resource``): complete (the walk) when it has at most ``points`` points,
    else the walk's points plus ``points`` more spread over the range, every one exact."""
    from mpq.solvers import pareto_frontier

    if resource not in table.columns:
        raise ConfigError(f"no cost column {resource!r} to draw a frontier for; columns: "
                          f"{[c for c in table.columns if c in ('size_mb', 'bops') or c.endswith('ms') or '@' in c]}")
    part, complete = pareto_frontier(table, resource, fixed, points=points, progress=progress)
    return part.assign(swept=resource, complete=complete)


def combined_frontier(parts: list[pd.DataFrame], allocation) -> pd.DataFrame:
    """The study's frontiers and the solver's own points, one table (``swept`` says which is which)."""
    parts = list(parts)
    if allocation.frontier is not None:
        parts.append(allocation.frontier.assign(swept=f"{allocation.solver}"))
    if not parts:
        return pd.DataFrame(columns=FRONTIER_COLUMNS)
    extra = sorted({c for p in parts for c in p.columns if "_ms@" in c})
    cols = FRONTIER_COLUMNS + extra
    return pd.concat([p[[c for c in cols if c in p]] for p in parts], ignore_index=True)


__all__ = ["StudyRecord", "allocate", "frontier", "combined_frontier"]

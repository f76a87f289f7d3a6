"""Running a study's stages on a live model, in order of cost (see :mod:`mpq.studies`).

:class:`LiveStudy` holds what only a live study has (the model, its calibration data, evaluator, layer inventory,
search space and prepared quantizer) and fills a :class:`~mpq.study_record.StudyRecord` stage by stage.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from mpq.apply_kernels import eval_mode, prepared_quantizer
from mpq.budget import Budget, Phase
from mpq.calib import CalibrationSet, LossFn
from mpq.checks import check_allowed, check_weights
from mpq.config import QuantizerSpec
from mpq.cost_stage import MAIN, add_latency, check_reachable, phase_example, resize_batch, sequence_length, \
    static_costs
from mpq.costs import MB
from mpq.errors import BudgetError, ConfigError
from mpq.layers import LayerInventory, discover_layers
from mpq.options import StudyOptions
from mpq.space import SearchSpace, build_search_space
from mpq.study_record import StudyRecord
from mpq.target import Target

log = logging.getLogger(__name__)


class LiveStudy:
    """A study's model-side state; :meth:`run` performs the stages."""

    def __init__(self, model: nn.Module, calib: CalibrationSet, eval_fn: Callable | None, loss_fn: LossFn | None,
                 options: StudyOptions, progress: bool):
        self.model, self.calib, self.eval_fn, self.loss_fn = model, calib, eval_fn, loss_fn
        self.options, self.progress = options, progress
        self.target = Target.parse(options.space.device)
        self.inventory: LayerInventory | None = None
        self.space: SearchSpace | None = None
        self.quantizer = None
        batch = options.profile.batch_size
        self.example = calib.example if batch is None else resize_batch(calib.example, batch)
        self.threads = options.profile.threads or torch.get_num_threads()
        self._context = None
        self._runner = None  # the damage runner (a model copy), made on the first measured solve
        self._pool = None  # Ray actors each holding a damage runner, while fanned_out() is open

    # --- the stages ----------------------------------------------------------------------------------------------
    @classmethod
    def run(cls, model: nn.Module, calib_data: Any, eval_fn: Callable | None, options: StudyOptions,
            budgets: Iterable[Budget], *, out: str | Path | None, force: bool, loss_fn: LossFn | None,
            model_name: str | None, progress: bool, command: str | None) -> tuple[StudyRecord, LiveStudy]:
        from mpq.artifacts import prepare_run_dir

        out = prepare_run_dir(out, force)
        budgets = list(budgets)
        if out is not None:  # the resume record, before anything runs
            StudyRecord.save_started(out, options, model_name or type(model).__name__, command)
        t_start = time.perf_counter()
        with eval_mode(model):
            live = cls._checked(model, calib_data, eval_fn, loss_fn, options, progress)
            record = live._discover(model_name or type(model).__name__, out, command, t_start)
            live._check(record, budgets)  # size and BOPs: nothing measured or scored yet
            live._prepare_quantizer(record)
            live._measure(record, budgets)
            live._check(record, budgets, measured=True)  # latency limits too, before the estimator
            live._score(record)
        record.stages_seconds["study"] = time.perf_counter() - t_start
        if out is not None:
            record.save(out)
        return record, live

    @classmethod
    def _checked(cls, model, calib_data, eval_fn, loss_fn, options, progress) -> LiveStudy:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if eval_fn is not None and not callable(eval_fn):
            raise ConfigError(f"eval_fn must be a function model -> float, got {type(eval_fn).__name__}")
        check_weights(model)
        calib = CalibrationSet.from_any(calib_data)
        calib.check(model)
        return cls(model, calib, eval_fn, loss_fn, options, progress)

    def _discover(self, model_name: str, out: Path | None, command: str | None, t_start: float) -> StudyRecord:
        space_opts = self.options.space
        self.inventory = discover_layers(self.model, self.calib.example)
        check_allowed(self.inventory, self.target.device, space_opts.allowed)
        self.space = build_search_space(self.inventory, self.target.device, space_opts.allowed, space_opts.pinned)
        costs = static_costs(self.inventory, self.space)
        record = StudyRecord(self.options, model_name, self.target.name, self.target.device, costs,
                             layers=_layer_facts(self.inventory), kept_float=self.inventory.kept_float_frame(),
                             space_notes=dict(self.space.notes), space_size=self.space.size(),
                             batch_size=int(self.calib.batch_size if self.options.profile.batch_size is None
                                            else self.options.profile.batch_size),
                             threads=self.threads, sequence_length=sequence_length(self.calib.example), out=out,
                             command=command)
        record.stages_seconds["discover"] = time.perf_counter() - t_start
        return record

    def _check(self, record: StudyRecord, budgets: list[Budget], measured: bool = False) -> None:
        """Every budget's reachability from the cost table; once latency is profiled (``measured``), a main
        latency limit below the table's floor is checked by timing the fastest configs end to end
        (:func:`mpq.study_verify.check_latency_floor`) before the estimator runs."""
        column_of = lambda p: p.column(record.sequence_length)
        for budget in budgets:
            try:
                check_reachable(record.costs, budget, record.restrictions(), column_of)
            except BudgetError as e:
                if not measured or MAIN not in e.smallest:
                    raise
                from types import SimpleNamespace

                from mpq.study_verify import additive_model, check_latency_floor

                before = additive_model(float(record.costs.fixed.get(MAIN, 0.0)), "before the estimator")
                # what the floor reads of a study (its tables and this live half), before a Study exists
                view = SimpleNamespace(record=record, live=self, costs=record.costs, table=record.costs.table)
                check_latency_floor(view, e, budget.resolve(record.costs.reference, column_of), before,
                                    table=record.costs.table)

    def _prepare_quantizer(self, record: StudyRecord) -> None:
        t0 = time.perf_counter()
        opts = self.options.sensitivity
        from mpq.quantizers import Quantizer, get_quantizer

        spec = opts.quantizer if isinstance(opts.quantizer, Quantizer) else \
            get_quantizer(opts.quantizer, **dict(opts.quantizer_options))
        self.quantizer = prepared_quantizer(spec, self.model, self.calib, self.inventory)
        self.space = replace(self.space, quantizer=self.quantizer)
        record.quantizer = QuantizerSpec.of(self.quantizer.settings())
        record.stages_seconds["quantizer"] = time.perf_counter() - t0

    def _measure(self, record: StudyRecord, budgets: list[Budget]) -> None:
        t0 = time.perf_counter()
        self._add_column(record, MAIN, self.example, None)
        for budget in budgets:
            for _, phase, _, _ in budget.phase_limits():
                column = phase.column(record.sequence_length)
                if column not in record.costs.table.columns:
                    self._add_column(record, column, phase_example(self.calib.example, phase), phase)
        record.stages_seconds["profile"] = time.perf_counter() - t0

    def _add_column(self, record: StudyRecord, column: str, example: Any, phase: Phase | None) -> None:
        add_latency(record.costs, column, self.model, self.inventory, self.space, example, self.target,
                    self.options.profile, self.progress, phase)
        table = record.costs.latency[column]
        record.profile_info[column] = {
            "backend": self.options.profile.profile, "fingerprint": table.fingerprint,
            "fingerprint_id": table.fingerprint_id, "workloads": len(table), "measured": table.measured,
            "cache_hits": table.cache_hits, "repeats": self.options.profile.repeats,
            "warmup": self.options.profile.warmup, **table.stats}

    def add_phase(self, record: StudyRecord, phase: Phase, column: str) -> None:
        """Measure a latency phase a later budget names (the profile cache keeps what was measured before)."""
        with eval_mode(self.model):
            self._add_column(record, column, phase_example(self.calib.example, phase), phase)
        record.merge()
        if record.out is not None:
            record.save(record.out)

    def _score(self, record: StudyRecord) -> None:
        from mpq.sensitivity_stage import hash_calibration, hash_model, run_sensitivity, scores_key

        t0 = time.perf_counter()
        opts = self.options.sensitivity
        record.keys = {"model": hash_model(self.model), "calib": hash_calibration(self.calib)}
        record.keys["scores"] = scores_key(record.keys["model"], record.keys["calib"], opts, self.space,
                                           self.loss_fn, self.quantizer.settings())
        record.sensitivity = run_sensitivity(self.model, self.calib, self.space, self.inventory, opts, self.loss_fn,
                                             record.keys["scores"], record.out, self.options.profile.address,
                                             self.progress)
        record.stages_seconds["sensitivity"] = time.perf_counter() - t0
        record.merge()

    # --- evaluation ----------------------------------------------------------------------------------------------
    def damage(self, configs: list[dict[str, str]]) -> list[float]:
        """The measured task-loss increase of each whole config (layer -> option) on the calibration split,
        fake-quantized with the target kernels' numerics and the study's quantizer: what a measuring solver
        (``ilp+refine``) and the uniform check optimise. One model copy is kept for every call (layers swapped in
        place), or one per Ray actor inside :meth:`fanned_out`."""
        from mpq.sensitivity.measured import DeltaRunner

        if self._pool is not None:  # every config there, so that a solve compares numbers rounded alike
            rows = self._pool.map([[c] for c in configs])
            return [row[0]["loss"] for row in rows]
        if self._runner is None:
            with eval_mode(self.model):
                self._runner = DeltaRunner(*self._damage_state(None))
        return [row["loss"] for row in self._runner.measure(configs)]

    def _damage_state(self, threads: int | None) -> tuple:
        calib = self.calib if self.loss_fn is not None else self.calib.with_pseudo_labels(self.model)
        return (self.model, calib.batches, self.inventory, self.target.device, self.loss_fn, ("loss",), threads,
                self.quantizer)

    @contextlib.contextmanager
    def fanned_out(self):
        """For the block: configs measured by :meth:`damage` fan out, one per Ray actor, over ``evaluate_workers``
        actors that each hold one model copy, shipped once (with ``profile='ray'`` and ``evaluate_workers`` set;
        otherwise in process). The actors are released when the block ends."""
        workers = self.options.evaluate.evaluate_workers
        if not workers or self.options.profile.profile != "ray" or self._pool is not None:
            yield
            return
        from mpq.sensitivity.measured import measure_chunk, runner_of
        from mpq.workers.cluster import SharedActorPool

        with eval_mode(self.model):
            state = self._damage_state(1)
        self._pool = SharedActorPool(measure_chunk, state, workers, self.options.profile.address, setup=runner_of)
        try:
            yield
        finally:
            self._pool.close()
            self._pool = None

    def context(self):
        """The evaluation stage's view of this study (its fake-quant cache lives across solves)."""
        from mpq.evaluate_stage import EvaluationContext

        if self._context is None:
            self._context = EvaluationContext(self.model, self.inventory, self.target, self.example, self.eval_fn,
                                              self.quantizer, self.options.profile, self.options.evaluate,
                                              self.threads, self.progress)
        return self._context

    @classmethod
    def attach(cls, record: StudyRecord, model: nn.Module, calib_data: Any, eval_fn: Callable | None,
               loss_fn: LossFn | None) -> LiveStudy:
        """The live side of a study read from disk, for the same model (checked by its weights' hash)."""
        from mpq.sensitivity_stage import hash_model

        live = cls._checked(model, calib_data, eval_fn, loss_fn, record.options, progress=True)
        if hash_model(model) != record.keys.get("model"):
            raise ConfigError(f"the model given to attach() is not the one this study ({record.out}) was made "
                              f"for: its weights differ")
        with eval_mode(model):
            live.inventory = discover_layers(model, live.calib.example)
            opts = record.options.space
            live.space = build_search_space(live.inventory, live.target.device, opts.allowed, opts.pinned)
            live._prepare_quantizer(record)
        return live


def _layer_facts(inventory: LayerInventory):
    import pandas as pd

    return pd.DataFrame([{"layer": layer.name, "kind": layer.kind,
                          "weight_shape": "x".join(map(str, layer.weight_shape)), "params": layer.params,
                          "macs": layer.macs, "calls": layer.calls, "float_size_mb": layer.float_bytes() / MB}
                         for layer in inventory])


__all__ = ["LiveStudy"]

"""Whole-model latency of configs, measured end to end in the target's mode and cached like layer rows.

A layer table sums isolated timings; what it misses (format switches between neighbours, per-call overheads, the
rest of the model running between layers) only shows in the whole model. :func:`measure_configs` applies each
config (through the caller's ``build(choice) -> nn.Module``, so that the workers never import the pipeline), times
the models in interleaved rounds, groups of them bracketed by the reference workload with their load evidence
(:mod:`mpq.workers.noise`), and keeps the rows in the profile cache keyed by device fingerprint, model
(:func:`model_key`) and config. These rows train the latency correction (:mod:`mpq.solvers.predictors`) and
decide which candidate a search returns (:mod:`mpq.workers.verify`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from mpq.target import Target
from mpq.workers.cache import EVIDENCE_COLUMNS, ProfileCache
from mpq.workers.fingerprint import fingerprint_id, host
from mpq.workers.noise import NoisePolicy, measure_with_evidence, reusable
from mpq.workers.profiler import ModeMismatchError, conditions_with_threads, fingerprint_with_threads
from mpq.workers.timing import num_threads, time_models

log = logging.getLogger(__name__)


def config_key(choice: Mapping[str, str]) -> str:
    """A config's cache key: its layer -> option map, sorted."""
    return json.dumps(dict(sorted(choice.items())))


def model_key(model: nn.Module, inputs: Any, extra: str = "") -> str:
    """What a model's latency depends on besides its config and the device: its class, every parameter's and
    buffer's name, shape and dtype, and the inputs' shapes and dtypes (not the weights' values), plus ``extra``."""
    from mpq.layers import describe_input

    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    h.update(describe_input(inputs).encode())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def time_configs(build: Callable[[Mapping[str, str]], nn.Module], choices: Sequence[Mapping[str, str]], inputs: Any,
                 device: str = "cpu", mode: str = "eager", threads: int | None = None, warmup: int = 3,
                 repeats: int = 15, rounds: int = 3, min_sample_ms: float = 1.0, group: int = 4,
                 policy: NoisePolicy | None = None, measured_by: str | None = None) -> dict[str, Any]:
    """Time ``build(choice)`` for every choice here, ``group`` models at a time in interleaved rounds, each group
    bracketed by the reference workload (measured again while it drifts). Returns this process's fingerprint and
    one row per choice (``config_key``, stats and evidence)."""
    rows: list[dict[str, Any]] = []
    with num_threads(threads):
        fp = fingerprint_with_threads(device, threads, mode)
        for start in range(0, len(choices), group):
            part = list(choices[start:start + group])
            models = {str(i): build(c) for i, c in enumerate(part)}

            def timed(models=models) -> dict:
                return time_models(models, inputs, warmup, repeats, rounds, min_sample_ms, None, device, mode)

            stats, evidence = measure_with_evidence(timed, device, torch.get_num_threads(), policy)
            stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            for i, c in enumerate(part):
                rows.append({**stats[str(i)].as_dict(), "config_key": config_key(c), "copies": 1,
                             "trusted": int(evidence["trusted"]), "measured_at": stamp,
                             "measured_by": measured_by or host(),
                             **{k: evidence[k] for k in EVIDENCE_COLUMNS if k not in ("copies", "trusted")}})
            timed = models = None  # the group's models go before the next group is built
    return {"fingerprint": fp, "rows": rows}


def _direct(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def measure_configs(build: Callable[[Mapping[str, str]], nn.Module], choices: Sequence[Mapping[str, str]],
                    inputs: Any, target: Target | str, model: str, cache: ProfileCache | str | Path | bool = True,
                    threads: int | None = None, warmup: int = 3, repeats: int = 15, rounds: int = 3,
                    min_sample_ms: float = 1.0, group: int = 4, policy: NoisePolicy | None = None,
                    fingerprint: dict[str, Any] | None = None,
                    runner: Callable[..., Any] | None = None) -> list[dict[str, Any]]:
    """Whole-model latency of each config on ``target`` (in its mode), from the cache where a row may be reused
    (:func:`mpq.workers.noise.reusable`), else measured by :func:`time_configs` and stored.

    ``model`` is the model's cache key (:func:`model_key`). ``fingerprint`` is the device's, where the driver is
    not on the device (the latency table's ``fingerprint``); ``runner(fn, *args, **kwargs)`` runs the measuring
    there (e.g. ``functools.partial(mpq.workers.cluster.run_on_target, target=..., backend=..., cpus=...)``).
    Returns one row per choice, in order: ``choice``, ``config_key``, ``median_ms``, ``q1_ms``, ``q3_ms``, the
    evidence (``trusted``, ``ref_ms``, ``other_cores``, ...) and ``source`` (``cache`` or ``measured``)."""
    target = Target.parse(target)
    policy = policy or NoisePolicy()
    run = runner or _direct
    store = None if cache is False or cache is None else (cache if isinstance(cache, ProfileCache)
                                                          else ProfileCache(None if cache is True else cache))
    fp = fingerprint or fingerprint_with_threads(target.device, threads, target.mode)
    if fp.get("mode", "eager") != target.mode:
        raise ModeMismatchError(f"whole-model timings for target {target.spec!r} (mode {target.mode!r}) were asked "
                                f"with a fingerprint of mode {fp.get('mode')!r}")
    fid = fingerprint_id(fp)
    unique = {config_key(c): dict(c) for c in choices}
    hits = store.get_configs(fid, model, list(unique)) if store else {}
    now = run(conditions_with_threads, target.device, threads, policy) if hits else None
    again = {k: reusable(r, now, policy) for k, r in hits.items()}
    todo = [c for k, c in unique.items() if k not in hits or again[k] is not None]
    out = {k: {**r, "source": "cache"} for k, r in hits.items() if again[k] is None}
    if todo:
        log.info("timing %d configs end to end on %s (%d cached)", len(todo), target.spec, len(out))
        result = run(time_configs, build, todo, inputs, target.device, target.mode, threads, warmup, repeats,
                     rounds, min_sample_ms, group, policy)
        if fingerprint_id(result["fingerprint"]) != fid:
            raise RuntimeError(f"configs were timed on another device than profiled: {result['fingerprint']} vs {fp}")
        if store:  # an untrusted measurement never replaces a trusted one
            store.put_configs(result["fingerprint"], fid, model, [
                r for r in result["rows"] if r["trusted"] or not (hits.get(r["config_key"]) or {}).get("trusted")])
        out.update({r["config_key"]: {**r, "source": "measured"} for r in result["rows"]})
    return [{"choice": dict(c), "config_key": config_key(c), **out[config_key(c)]} for c in choices]

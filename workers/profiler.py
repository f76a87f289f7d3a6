"""The latency profiler: measure each unique workload on the device of the node it runs on, cache the results.

Workloads are measured in-process or as Ray tasks (a local cluster, or ``address=`` for an existing one). Either way
the device fingerprint is taken where the measurement runs, rows that are already in the profile cache for that
fingerprint are not measured again, and each finished batch of measurements is written to the cache as soon as it
arrives, so a crash loses at most the batches still running.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd
import torch
from tqdm.auto import tqdm

from mpq.errors import ConfigError
from mpq.workers.cache import ProfileCache
from mpq.workers.fingerprint import device_fingerprint, fingerprint_id, host
from mpq.workers.timing import num_threads, time_callable
from mpq.workers.workloads import Workload

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["key", "kind", "option", "kernel", "weight_shape", "input_shape", "median_ms", "q1_ms", "q3_ms",
                 "mean_ms", "std_ms", "repeats", "inner", "measured_at", "measured_by", "source"]


class LatencyTable:
    """Measured per-workload latencies on one device (one fingerprint)."""

    def __init__(self, frame: pd.DataFrame, fingerprint: dict[str, Any], stats: dict[str, Any] | None = None):
        self.frame = frame.reset_index(drop=True)
        self.stats = dict(stats or {})  # how it was measured: target, unique workloads, tasks, rows per node
        self.fingerprint = fingerprint
        self.fingerprint_id = fingerprint_id(fingerprint)
        self._median = dict(zip(self.frame["key"], self.frame["median_ms"]))

    def median_ms(self, workload: Workload) -> float:
        try:
            return float(self._median[workload.key])
        except KeyError:
            raise KeyError(f"workload not profiled: {workload.key}") from None

    def __contains__(self, workload: Workload) -> bool:
        return workload.key in self._median

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def cache_hits(self) -> int:
        return int((self.frame["source"] == "cache").sum())

    @property
    def measured(self) -> int:
        return int((self.frame["source"] == "measured").sum())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        self.frame.assign(fingerprint_id=self.fingerprint_id).to_csv(path, index=False)
        return path


def _row(w: Workload, stats: dict[str, Any], source: str) -> dict[str, Any]:
    return {"key": w.key, "kind": w.kind, "option": w.option, "kernel": w.kernel,
            "weight_shape": "x".join(map(str, w.weight_shape)), "input_shape": "x".join(map(str, w.input_shape)),
            **stats, "source": source}


def measure_workloads(workloads: list[Workload], device: str = "cpu", threads: int | None = None, warmup: int = 3,
                      repeats: int = 15, min_sample_ms: float = 1.0, measured_by: str | None = None
                      ) -> dict[str, Any]:
    """Measure ``workloads`` here; returns this process's fingerprint and one stats dict per workload key."""
    with num_threads(threads):
        fp = device_fingerprint(device)
        rows = []
        for w in workloads:
            try:
                module, x = w.build(device)
                stats = time_callable(lambda: module(x), warmup, repeats, min_sample_ms, device).as_dict()
            except Exception as e:  # name the node, the device and the workload: the traceback alone names none
                raise WorkloadError(
                    f"profiling failed on node {host()} ({device}) for workload {w.kind} weight "
                    f"{'x'.join(map(str, w.weight_shape))}, input {'x'.join(map(str, w.input_shape))}, option "
                    f"{w.option} ({w.kernel}): {type(e).__name__}: {e}") from e
            stats.update(key=w.key, measured_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         measured_by=measured_by or host())
            rows.append(stats)
    return {"fingerprint": fp, "rows": rows}


class WorkloadError(RuntimeError):
    """A workload that could not be built or timed; the message names the node, device and workload."""


def fingerprint_with_threads(device: str, threads: int | None) -> dict[str, Any]:
    """The fingerprint a measurement with ``threads`` threads would record here."""
    with num_threads(threads):
        return device_fingerprint(device)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def profile_workloads(workloads: Iterable[Workload], device: str = "cpu", backend: str = "ray",
                      address: str | None = None, cache: ProfileCache | str | Path | bool | None = True,
                      threads: int | None = None, warmup: int = 3, repeats: int = 15, min_sample_ms: float = 1.0,
                      chunk_size: int = 8, workers: int | None = None, progress: bool = True) -> LatencyTable:
    """Latency of every workload on ``device``, measured where ``backend`` runs (``"ray"`` or ``"inprocess"``).

    ``device`` is a target (``"cpu"``, ``"cuda"``, or a labelled kind like ``"cuda:h100"``, see
    :mod:`mpq.workers.cluster`); on Ray the measurements run on that kind's nodes, one profiler actor per device slot
    (at most ``workers`` of them), in chunks of ``chunk_size`` workloads.
    """
    from mpq.workers.cluster import ProfilerPool, Target

    target = Target.parse(device)
    workloads = list({w.key: w for w in workloads}.values())
    threads = threads or torch.get_num_threads()
    if backend not in ("ray", "inprocess"):
        raise ConfigError(f"profiling backend {backend!r} not supported: use 'ray' or 'inprocess'")
    store = None if cache is False or cache is None else (cache if isinstance(cache, ProfileCache)
                                                          else ProfileCache(None if cache is True else cache))
    settings = dict(warmup=warmup, repeats=repeats, min_sample_ms=min_sample_ms)
    pool = ProfilerPool(target, threads, address, workers) if backend == "ray" else None
    try:
        fp = pool.fingerprint() if pool else fingerprint_with_threads(target.device, threads)
        fid = fingerprint_id(fp)
        hits = store.get(fid, [w.key for w in workloads]) if store else {}
        rows = [_row(w, hits[w.key], "cache") for w in workloads if w.key in hits]
        todo = [w for w in workloads if w.key not in hits]
        by_key = {w.key: w for w in todo}
        chunks = list(_chunks(todo, chunk_size))
        log.info("profiling %d unique workloads on %s (%s, %s): %d cached, %d to measure in %d tasks",
                 len(workloads), target.name, fp.get("name"), backend, len(rows), len(todo), len(chunks))
        bar = tqdm(total=len(todo), desc=f"profiling {target.name} ({backend})", disable=not progress or not todo,
                   leave=False)

        def collect(result: dict[str, Any]) -> None:
            if fingerprint_id(result["fingerprint"]) != fid:
                raise RuntimeError(f"a worker measured on a different device: {result['fingerprint']} vs {fp}")
            if store:
                store.put(result["fingerprint"], fid, result["rows"])
            rows.extend(_row(by_key[r["key"]], {k: v for k, v in r.items() if k != "key"}, "measured")
                        for r in result["rows"])
            bar.update(len(result["rows"]))
            if pool and len(pool.per_node) > 1:
                bar.set_postfix_str(" ".join(f"{n}:{c}" for n, c in sorted(pool.per_node.items())))

        try:
            if pool:
                pool.run(chunks, settings, collect)
            else:
                for chunk in chunks:
                    collect(measure_workloads(chunk, target.device, threads, **settings))
        finally:
            bar.close()
        stats = {"target": target.name, "unique_workloads": len(workloads), "tasks": len(chunks),
                 "measured_per_node": dict(pool.per_node) if pool else ({host(): len(todo)} if todo else {}),
                 "workers": min(pool.max_actors, max(len(chunks), 1)) if pool else 1,
                 "actor_restarts": pool.restarts if pool else 0}
    finally:
        if pool:
            pool.close()
    frame = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    if len(frame) and frame["median_ms"].map(lambda v: not math.isfinite(v) or v <= 0).any():
        raise RuntimeError("a latency measurement is not a positive number: " +
                           str(frame.loc[~(frame["median_ms"] > 0), "key"].tolist()[:3]))
    return LatencyTable(frame, fp, stats)

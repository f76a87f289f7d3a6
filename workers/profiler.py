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

    def __init__(self, frame: pd.DataFrame, fingerprint: dict[str, Any]):
        self.frame = frame.reset_index(drop=True)
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
                      repeats: int = 15, min_sample_ms: float = 1.0) -> dict[str, Any]:
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
                         measured_by=host())
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


def ensure_ray(address: str | None = None):
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start one local cluster for this process."""
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is a core dependency
        raise ConfigError("Ray is not installed: pip install ray, or profile with backend='inprocess'") from e
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    return ray


def _task_options(device: str, threads: int, ray) -> dict[str, Any]:
    if device == "cuda":
        return {"num_gpus": 1, "num_cpus": 1}
    # A CPU measurement asks for as many CPUs as it runs threads, so Ray never packs two measurements onto the same
    # cores of a node.
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if threads > largest:
        raise ConfigError(f"profiling with {threads} threads needs a Ray node with {threads} CPUs; the largest "
                          f"node has {largest:g}")
    return {"num_cpus": threads}


def profile_workloads(workloads: Iterable[Workload], device: str = "cpu", backend: str = "ray",
                      address: str | None = None, cache: ProfileCache | str | Path | bool | None = True,
                      threads: int | None = None, warmup: int = 3, repeats: int = 15, min_sample_ms: float = 1.0,
                      chunk_size: int = 8, progress: bool = True) -> LatencyTable:
    """Latency of every workload on ``device``, measured where ``backend`` runs (``"ray"`` or ``"inprocess"``)."""
    workloads = list({w.key: w for w in workloads}.values())
    threads = threads or torch.get_num_threads()
    if backend not in ("ray", "inprocess"):
        raise ConfigError(f"profiling backend {backend!r} not supported: use 'ray' or 'inprocess'")
    store = None if cache is False or cache is None else (cache if isinstance(cache, ProfileCache)
                                                          else ProfileCache(None if cache is True else cache))
    settings = dict(device=device, threads=threads, warmup=warmup, repeats=repeats, min_sample_ms=min_sample_ms)

    if backend == "ray":
        ray = ensure_ray(address)
        options = _task_options(device, threads, ray)
        fp = ray.get(ray.remote(**options)(fingerprint_with_threads).remote(device, threads))
    else:
        ray, options = None, {}
        fp = fingerprint_with_threads(device, threads)
    fid = fingerprint_id(fp)
    hits = store.get(fid, [w.key for w in workloads]) if store else {}
    rows = [_row(w, hits[w.key], "cache") for w in workloads if w.key in hits]
    todo = [w for w in workloads if w.key not in hits]
    by_key = {w.key: w for w in todo}
    log.info("profiling %d workloads on %s (%s): %d cached, %d to measure", len(workloads), fp.get("name"),
             backend, len(rows), len(todo))

    bar = tqdm(total=len(todo), desc=f"profiling ({backend})", disable=not progress or not todo, leave=False)

    def collect(result: dict[str, Any]) -> None:
        if fingerprint_id(result["fingerprint"]) != fid:
            raise RuntimeError(f"a worker measured on a different device: {result['fingerprint']} vs {fp}")
        if store:
            store.put(result["fingerprint"], fid, result["rows"])
        rows.extend(_row(by_key[r["key"]], {k: v for k, v in r.items() if k != "key"}, "measured")
                    for r in result["rows"])
        bar.update(len(result["rows"]))

    try:
        if backend == "inprocess":
            for chunk in _chunks(todo, chunk_size):
                collect(measure_workloads(chunk, **settings))
        elif todo:
            task = ray.remote(**options)(measure_workloads)
            pending = [task.remote(chunk, **settings) for chunk in _chunks(todo, chunk_size)]
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as e:
                    for ref in pending:  # the others' finished rows are already in the database
                        ray.cancel(ref)
                    cause = getattr(e, "cause", None)
                    raise WorkloadError(str(cause) if isinstance(cause, WorkloadError) else
                                        f"a profiling task failed: {e}") from None
                collect(result)
    finally:
        bar.close()
    frame = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    if len(frame) and frame["median_ms"].map(lambda v: not math.isfinite(v) or v <= 0).any():
        raise RuntimeError("a latency measurement is not a positive number: " +
                           str(frame.loc[~(frame["median_ms"] > 0), "key"].tolist()[:3]))
    return LatencyTable(frame, fp)

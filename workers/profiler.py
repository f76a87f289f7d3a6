"""The latency profiler: measure each unique workload on the device of the node it runs on, cache the results.

Workloads are measured in-process or as Ray tasks (a local cluster, or ``address=`` for an existing one). Either way
the device fingerprint is taken where the measurement runs, in the target's deployment mode, and each finished
chunk of measurements is written to the cache as soon as it arrives, so a crash loses at most the chunks still
running. Every chunk carries its load evidence and a reference workload timed before and after it
(:mod:`mpq.workers.noise`): a chunk whose reference drifted is measured again, and rows measured under load are
stored as untrusted. A cached row is reused unless a better measurement can be made now: it was taken while the
machine ran clearly slower than it runs now (``stale``), or it is untrusted and the machine is quiet now.
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
from mpq.target import Target
from mpq.workers.cache import EVIDENCE_COLUMNS, ProfileCache
from mpq.workers.fingerprint import device_fingerprint, fingerprint_id, host
from mpq.workers.noise import NoisePolicy, conditions_now, measure_with_evidence, reference_workload, reusable
from mpq.workers.timing import num_threads, time_workload
from mpq.workers.workloads import Workload

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["key", "kind", "option", "kernel", "weight_shape", "input_shape", "median_ms", "q1_ms", "q3_ms",
                 "mean_ms", "std_ms", "repeats", "inner", "measured_at", "measured_by", *EVIDENCE_COLUMNS, "source"]


class ModeMismatchError(ConfigError):
    """A latency table measured in another deployment mode than the target's."""


class LatencyTable:
    """Measured per-workload latencies on one device (one fingerprint)."""

    def __init__(self, frame: pd.DataFrame, fingerprint: dict[str, Any], stats: dict[str, Any] | None = None):
        self.frame = frame.reset_index(drop=True)
        self.stats = dict(stats or {})  # how it was measured: target, unique workloads, tasks, rows per node
        self.fingerprint = fingerprint
        self.fingerprint_id = fingerprint_id(fingerprint)
        self._median = dict(zip(self.frame["key"], self.frame["median_ms"]))

    @property
    def mode(self) -> str:
        """The deployment mode the table was measured in (tables of older versions: eager)."""
        return self.fingerprint.get("mode", "eager")

    def require_mode(self, target: Target | str) -> None:
        """Refuse a table measured in another mode than ``target``'s: its sum would predict another deployment."""
        target = Target.parse(target)
        if self.mode != target.mode:
            raise ModeMismatchError(
                f"the latency table was measured in mode {self.mode!r} but the target {target.spec!r} runs in mode "
                f"{target.mode!r}: profile again for the target (layer, rest-of-model and whole-model timings must "
                f"share one mode)")

    @property
    def untrusted(self) -> int:
        """Rows measured under load (see :mod:`mpq.workers.noise`)."""
        if not len(self.frame) or "trusted" not in self.frame:
            return 0
        return int((self.frame["trusted"].fillna(0).astype(int) == 0).sum())

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
                      repeats: int = 15, min_sample_ms: float = 1.0, measured_by: str | None = None,
                      mode: str = "eager", policy: NoisePolicy | None = None) -> dict[str, Any]:
    """Measure ``workloads`` here in ``mode``, as one chunk bracketed by the reference workload (measured again
    while the reference drifts, see :func:`~mpq.workers.noise.measure_with_evidence`); returns this process's
    fingerprint, one stats dict per workload key (with the chunk's evidence) and the evidence."""
    with num_threads(threads):
        fp = device_fingerprint(device, mode)
        threads_now = torch.get_num_threads()

        def measure() -> list[dict[str, Any]]:
            rows = []
            for w in workloads:
                try:
                    module, x = w.build(device)
                    stats, copies = time_workload(module, x, device, mode, w.context_bytes, warmup, repeats,
                                                  min_sample_ms)
                except Exception as e:  # name the node, the device and the workload: the traceback alone names none
                    raise WorkloadError(
                        f"profiling failed on node {host()} ({device}) for workload {w.kind} weight "
                        f"{'x'.join(map(str, w.weight_shape))}, input {'x'.join(map(str, w.input_shape))}, option "
                        f"{w.option} ({w.kernel}): {type(e).__name__}: {e}") from e
                rows.append({**stats.as_dict(), "key": w.key, "copies": copies})
            return rows

        rows, evidence = measure_with_evidence(measure, device, threads_now, policy, reference_workload(device))
    if not evidence["trusted"]:
        log.info("%d workloads measured under load on %s (%s): stored as untrusted", len(rows), host(),
                 "; ".join(evidence["reasons"]))
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for r in rows:
        r.update(measured_at=stamp, measured_by=measured_by or host(), trusted=int(evidence["trusted"]),
                 **{k: evidence[k] for k in EVIDENCE_COLUMNS if k not in ("copies", "trusted")})
    return {"fingerprint": fp, "rows": rows, "evidence": evidence}


class WorkloadError(RuntimeError):
    """A workload that could not be built or timed; the message names the node, device and workload."""


def fingerprint_with_threads(device: str, threads: int | None, mode: str = "eager") -> dict[str, Any]:
    """The fingerprint a measurement with ``threads`` threads in ``mode`` would record here."""
    with num_threads(threads):
        return device_fingerprint(device, mode)


def conditions_with_threads(device: str, threads: int | None, policy: NoisePolicy | None = None) -> dict[str, Any]:
    """The reference's speed and the load here now, with ``threads`` threads (see
    :func:`~mpq.workers.noise.conditions_now`)."""
    with num_threads(threads):
        return conditions_now(device, torch.get_num_threads(), policy)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def profile_workloads(workloads: Iterable[Workload], device: str | Target = "cpu", backend: str = "ray",
                      address: str | None = None, cache: ProfileCache | str | Path | bool | None = True,
                      threads: int | None = None, warmup: int = 3, repeats: int = 15, min_sample_ms: float = 1.0,
                      chunk_size: int = 8, workers: int | None = None, progress: bool = True,
                      policy: NoisePolicy | None = None) -> LatencyTable:
    """Latency of every workload on ``device``, measured where ``backend`` runs (``"ray"`` or ``"inprocess"``).

    ``device`` is a target (``"cpu"``, ``"cuda"``, a labelled kind like ``"cuda:h100"``, with its mode:
    ``"cuda:h100+graph"``; see :mod:`mpq.target`); on Ray the measurements run on that kind's nodes, one profiler
    actor per device slot (at most ``workers`` of them), in chunks of ``chunk_size`` workloads. ``policy`` says
    when a chunk is trusted (:class:`~mpq.workers.noise.NoisePolicy`); the table's ``stats`` say how many rows
    were reused, measured again (``remeasured_stale``/``remeasured_untrusted``) and measured under load.
    """
    from mpq.workers.cluster import ProfilerPool

    target = Target.parse(device)
    policy = policy or NoisePolicy()
    workloads = list({w.key: w for w in workloads}.values())
    threads = threads or torch.get_num_threads()
    if backend not in ("ray", "inprocess"):
        raise ConfigError(f"profiling backend {backend!r} not supported: use 'ray' or 'inprocess'")
    store = None if cache is False or cache is None else (cache if isinstance(cache, ProfileCache)
                                                          else ProfileCache(None if cache is True else cache))
    settings = dict(warmup=warmup, repeats=repeats, min_sample_ms=min_sample_ms)
    pool = ProfilerPool(target, threads, address, workers, policy=policy) if backend == "ray" else None
    try:
        fp = pool.fingerprint() if pool else fingerprint_with_threads(target.device, threads, target.mode)
        fid = fingerprint_id(fp)
        hits = store.get(fid, [w.key for w in workloads]) if store else {}
        now = None
        if hits:  # what the cached rows are compared with
            now = pool.conditions() if pool else conditions_with_threads(target.device, threads, policy)
        again = {k: reusable(r, now, policy) for k, r in hits.items()}
        rows = [_row(w, hits[w.key], "cache") for w in workloads if w.key in hits and again[w.key] is None]
        todo = [w for w in workloads if w.key not in hits or again[w.key] is not None]
        by_key = {w.key: w for w in todo}
        chunks = list(_chunks(todo, chunk_size))
        log.info("profiling %d unique workloads on %s (%s, %s): %d cached, %d to measure in %d tasks",
                 len(workloads), target.spec, fp.get("name"), backend, len(rows), len(todo), len(chunks))
        bar = tqdm(total=len(todo), desc=f"profiling {target.spec} ({backend})", disable=not progress or not todo,
                   leave=False)

        def collect(result: dict[str, Any]) -> None:
            if fingerprint_id(result["fingerprint"]) != fid:
                raise RuntimeError(f"a worker measured on a different device: {result['fingerprint']} vs {fp}")
            if store:  # an untrusted measurement never replaces a trusted one in the cache
                store.put(result["fingerprint"], fid, [r for r in result["rows"] if r["trusted"]
                                                       or not (hits.get(r["key"]) or {}).get("trusted")])
            rows.extend(_row(by_key[r["key"]], {k: v for k, v in r.items() if k != "key"}, "measured")
                        for r in result["rows"])
            bar.update(len(result["rows"]))
            if pool and len(pool.per_node) > 1:
                bar.set_postfix_str(" ".join(f"{n}:{c}" for n, c in sorted(pool.per_node.items())))

        try:
            if pool:
                pool.run(chunks, {**settings, "mode": target.mode, "policy": policy}, collect)
            else:
                for chunk in chunks:
                    collect(measure_workloads(chunk, target.device, threads, **settings, mode=target.mode,
                                              policy=policy))
        finally:
            bar.close()
        reasons = list(again.values())
        stats = {"target": target.name, "mode": target.mode, "unique_workloads": len(workloads),
                 "tasks": len(chunks),
                 "measured_per_node": dict(pool.per_node) if pool else ({host(): len(todo)} if todo else {}),
                 "workers": min(pool.max_actors, max(len(chunks), 1)) if pool else 1,
                 "actor_restarts": pool.restarts if pool else 0,
                 "remeasured_stale": reasons.count("stale"), "remeasured_untrusted": reasons.count("untrusted"),
                 "reference_ms": None if now is None else now["ref_ms"],
                 "quiet_now": None if now is None else bool(now["trusted"]),
                 "noise_policy": policy.as_dict()}
    finally:
        if pool:
            pool.close()
    frame = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    if len(frame) and frame["median_ms"].map(lambda v: not math.isfinite(v) or v <= 0).any():
        raise RuntimeError("a latency measurement is not a positive number: " +
                           str(frame.loc[~(frame["median_ms"] > 0), "key"].tolist()[:3]))
    table = LatencyTable(frame, fp, stats)
    table.stats["untrusted_rows"] = table.untrusted
    if table.untrusted:
        log.warning("%d of %d latency rows on %s were measured under load (not trusted for later searches; see "
                    "the table's trusted/other_cores/ref_drift columns)", table.untrusted, len(table), target.spec)
    return table

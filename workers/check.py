"""Re-validate a profile cache (``mpq profile --check``): drop the rows a later search must not trust.

A row is dropped when it is

- ``invalid``: its median is not a positive number, or lies outside its own quartiles;
- ``untrusted``: measured under load, or by a version that recorded no load evidence;
- ``noisy``: its samples spread more than ``max_spread`` (interquartile range over median);
- ``old-method``: measured by an older timing method (the fingerprint's ``timing`` version);
- ``old-software``: measured on this machine with another torch or other kernel versions than installed now;
- ``slower-machine``: measured on this machine while its reference workload ran clearly slower than it runs now
  (checked only while the machine is quiet);
- ``recheck``: measured again now (up to ``recheck`` trusted rows per fingerprint of this machine, while quiet)
  and found more than ``recheck_tolerance`` (or twice its spread) away, faster or slower (as a ratio); when most
  rechecked rows of a fingerprint disagree, all of that fingerprint's rows go (the machine changed);
- ``old``: older than ``max_age_days``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpq.workers.cache import ProfileCache
from mpq.workers.fingerprint import device_fingerprint, timing_version
from mpq.workers.noise import NoisePolicy
from mpq.workers.profiler import conditions_with_threads, measure_workloads
from mpq.workers.workloads import Workload

log = logging.getLogger(__name__)

_SAME_MACHINE = ("device", "name", "arch", "logical_cores")


@dataclass
class CheckReport:
    """What :func:`check_cache` found: rows kept, rows dropped by reason, and the machine's state when checked."""

    path: str
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    rows: list[dict[str, Any]] = field(default_factory=list)  # the dropped rows: table, keys, reason
    reference_ms: float | None = None
    quiet_now: bool | None = None
    rechecked: int = 0
    applied: bool = True  # False: a dry run, or a read-only cache (nothing removed)

    def describe(self) -> str:
        total = self.kept + sum(self.dropped.values())
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.dropped.items())) or "none"
        state = ("" if self.quiet_now is None else
                 f"; machine {'quiet' if self.quiet_now else 'busy (rows were not compared with it)'} now, "
                 f"reference {self.reference_ms:.4g} ms")
        verb = "dropped" if self.applied else "would drop"
        return (f"profile cache {self.path}: {total} rows, {self.kept} kept, {verb} {sum(self.dropped.values())} "
                f"({why}); {self.rechecked} rows measured again{state}")


def _age_days(stamp: Any, now: _dt.datetime) -> float | None:
    try:
        t = _dt.datetime.fromisoformat(str(stamp))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return (now - t).total_seconds() / 86400


def _static_reason(row: dict[str, Any], fp: dict[str, Any], here: dict[str, Any] | None, max_spread: float,
                   max_age_days: float | None, now: _dt.datetime) -> str | None:
    med, q1, q3 = row.get("median_ms"), row.get("q1_ms"), row.get("q3_ms")
    if med is None or not math.isfinite(med) or med <= 0 or (q1 is not None and q3 is not None
                                                              and not q1 <= med <= q3):
        return "invalid"
    if fp.get("timing") != timing_version(fp.get("mode", "eager")):
        return "old-method"
    if here is not None and (fp.get("torch") != here.get("torch") or fp.get("kernels") != here.get("kernels")):
        return "old-software"
    if row.get("trusted") != 1:
        return "untrusted"
    if q1 is not None and q3 is not None and (q3 - q1) / med > max_spread:
        return "noisy"
    if max_age_days is not None:
        age = _age_days(row.get("measured_at"), now)
        if age is not None and age > max_age_days:
            return "old"
    return None


def check_cache(cache: ProfileCache | str | Path | None = None, policy: NoisePolicy | None = None,
                recheck: int = 8, recheck_tolerance: float = 0.15, max_spread: float = 0.5,
                max_age_days: float | None = None, dry_run: bool = False, seed: int = 0) -> CheckReport:
    """Re-validate ``cache`` (a :class:`ProfileCache`, a path, or the default cache) and drop the rows listed in
    the module docstring (none with ``dry_run``, or when the cache is read-only). Rows of other machines are
    checked only for what their own record shows. Returns a :class:`CheckReport`."""
    store = cache if isinstance(cache, ProfileCache) else ProfileCache(cache)
    policy = policy or NoisePolicy()
    report = CheckReport(str(store.path), applied=not dry_run and not store.read_only)
    fps = store.fingerprints()
    now = _dt.datetime.now(_dt.timezone.utc)
    here_fp = {}
    for fid, fp in fps.items():
        if fp.get("device") in ("cpu", "cuda"):
            try:
                mine = device_fingerprint(fp["device"], fp.get("mode", "eager"))
            except Exception:  # noqa: BLE001 - a CUDA fingerprint on a machine without a GPU
                continue
            if all(mine.get(k) == fp.get(k) for k in _SAME_MACHINE):
                here_fp[fid] = mine
    conditions: dict[tuple[str, int], dict[str, Any]] = {}
    drops: list[tuple[str, tuple, str]] = []
    keep: dict[str, list[dict[str, Any]]] = {}
    for table in ("profiles", "configs"):
        for row in store.rows(table):
            fid = row["fingerprint_id"]
            fp = fps.get(fid, {})
            here = here_fp.get(fid)
            reason = _static_reason(row, fp, here, max_spread, max_age_days, now)
            if reason is None and here is not None and row.get("ref_ms"):
                key = (fp["device"], int(fp.get("threads") or 1))
                if key not in conditions:
                    conditions[key] = conditions_with_threads(key[0], key[1], policy)
                c = conditions[key]
                report.reference_ms, report.quiet_now = c["ref_ms"], bool(c["trusted"])
                if c["trusted"] and row["ref_ms"] > c["ref_ms"] * (1 + policy.stale_tolerance):
                    reason = "slower-machine"
            keys = (fid, row["workload_key"]) if table == "profiles" else (fid, row["model_key"], row["config_key"])
            if reason is not None:
                drops.append((table, keys, reason))
            elif table == "profiles" and here is not None:
                keep.setdefault(fid, []).append(row)
    drops += _recheck(keep, fps, conditions, policy, recheck, recheck_tolerance, seed, report)
    dropped_keys = {(t, k) for t, k, _ in drops}
    for t, k, reason in drops:
        report.dropped[reason] += 1
        report.rows.append({"table": t, "keys": k, "reason": reason})
    report.kept = store.count(table="profiles") + store.count(table="configs") - len(dropped_keys)
    if report.applied:
        for table in ("profiles", "configs"):
            store.delete(table, [k for t, k in dropped_keys if t == table])
    log.info(report.describe())
    return report


def _recheck(keep: dict[str, list[dict[str, Any]]], fps: dict[str, dict[str, Any]],
             conditions: dict[tuple[str, int], dict[str, Any]], policy: NoisePolicy, recheck: int,
             tolerance: float, seed: int, report: CheckReport) -> list[tuple[str, tuple, str]]:
    """Measure up to ``recheck`` kept rows of each fingerprint of this machine again (only while it is quiet)."""
    drops: list[tuple[str, tuple, str]] = []
    rng = np.random.default_rng(seed)
    for fid, rows in keep.items():
        fp = fps[fid]
        c = conditions.get((fp["device"], int(fp.get("threads") or 1)))
        if recheck <= 0 or c is None or not c["trusted"]:
            continue
        sample = [rows[i] for i in rng.choice(len(rows), min(recheck, len(rows)), replace=False)]
        workloads = [Workload.from_key(r["workload_key"]) for r in sample]
        result = measure_workloads(workloads, fp["device"], int(fp.get("threads") or 1),
                                   mode=fp.get("mode", "eager"), policy=policy)
        if not result["evidence"]["trusted"]:
            continue  # the machine got busy while rechecking: nothing learned
        report.rechecked += len(sample)
        new = {r["key"]: r for r in result["rows"]}
        bad = []
        for r in sample:
            n = new[r["workload_key"]]
            spread = (r["q3_ms"] - r["q1_ms"]) / r["median_ms"] if r.get("q3_ms") is not None else 0.0
            ratio = max(n["median_ms"] / r["median_ms"], r["median_ms"] / n["median_ms"])  # either way off
            if ratio - 1 > max(tolerance, 2 * spread):
                bad.append(r)
        if len(bad) > len(sample) / 2:
            log.warning("most rechecked rows of fingerprint %s disagree with new measurements: all %d dropped",
                        fid, len(rows))
            bad = rows
        drops += [("profiles", (fid, r["workload_key"]), "recheck") for r in bad]
    return drops

"""Noise you can see: load evidence around every chunk of measurements, a reference workload timed before and after
it, and the rule that decides whether a measurement may be trusted (cached for later searches) or not.

On a shared machine a measurement is slowed by whatever else runs; the table then predicts 184 ms for a 1.9 ms
model and poisons every later search that reuses it. Three kinds of evidence are taken for each chunk:

- **other processes' CPU use** while the chunk ran, in cores: the machine's busy time from ``/proc/stat`` (steal
  included: a VM's host running someone else) minus this process's own (``/proc/self/stat``);
- **on-CPU fraction** of the measuring thread (its CPU time over the wall time): a measurement that slept or was
  preempted spends wall time off the CPU (CPU targets only: a CUDA measurement waits for the GPU by design);
- a **reference workload** (a fixed GEMM) timed before and after the chunk: if the two differ by more than their
  own spread, the machine changed speed during the chunk and it is measured again.

:class:`NoisePolicy` turns the evidence into a verdict; the profile cache stores the evidence with every row and
reuses an untrusted row only while a better measurement cannot be made (see :func:`reusable`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

EVIDENCE_FIELDS = ("trusted", "ref_ms", "ref_drift", "ref_spread", "load_1m", "other_cores", "oncpu", "attempts")


@dataclass(frozen=True)
class NoisePolicy:
    """When a chunk of measurements is trusted, and how hard to try before giving up.

    - ``max_drift``: the reference may move by at most ``max(max_drift, spread_factor x its relative IQR)`` between
      before and after the chunk; beyond, the chunk is measured again (up to ``retries`` times).
    - ``max_other_cores``: other processes may use at most ``max(max_other_cores, free_share x the cores this
      measurement leaves free)`` cores while it runs.
    - ``min_oncpu``: the measuring thread must be on a CPU for at least this fraction of the wall time (CPU only).
    - ``stale_tolerance``: a cached row whose reference ran more than this much slower than the reference runs now
      was measured on a slower (busier) machine: it is measured again.
    """

    max_drift: float = 0.05
    spread_factor: float = 2.0
    max_other_cores: float = 0.3
    free_share: float = 0.5
    min_oncpu: float = 0.8
    retries: int = 2
    stale_tolerance: float = 0.15

    @classmethod
    def accept_all(cls) -> NoisePolicy:
        """Trust every measurement and never measure a cached row again: for a machine known to be as busy as it
        will ever be, and for tests of what the cache does rather than of what the noise does."""
        inf = float("inf")
        return cls(max_drift=inf, max_other_cores=inf, min_oncpu=0.0, retries=0, stale_tolerance=inf)

    def drift_limit(self, spread: float) -> float:
        return max(self.max_drift, self.spread_factor * spread)

    def verdict(self, evidence: Mapping[str, Any], threads: int, device: str) -> tuple[bool, list[str]]:
        """Whether measurements taken under ``evidence`` are trusted, and the reasons they are not."""
        reasons = []
        if evidence["ref_drift"] > self.drift_limit(evidence["ref_spread"]):
            reasons.append(f"reference drifted {evidence['ref_drift']:.1%} (limit "
                           f"{self.drift_limit(evidence['ref_spread']):.1%})")
        cores = os.cpu_count() or 1
        allowed = max(self.max_other_cores, self.free_share * max(cores - threads, 0))
        if evidence["other_cores"] is not None and evidence["other_cores"] > allowed:
            reasons.append(f"other processes used {evidence['other_cores']:.2f} cores (allowed {allowed:.2f})")
        if device == "cpu" and evidence["oncpu"] is not None and evidence["oncpu"] < self.min_oncpu:
            reasons.append(f"the measuring thread was on a CPU {evidence['oncpu']:.0%} of the time "
                           f"(needs {self.min_oncpu:.0%})")
        return not reasons, reasons

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _proc_stat_busy() -> float | None:
    """Seconds of busy CPU time of the whole machine (all cores, steal included)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    """Seconds of CPU time of this process (all threads), in the same clock-tick units as /proc/stat."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rpartition(")")[2].split()
        return (float(after_name[11]) + float(after_name[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        t = os.times()
        return t.user + t.system


class LoadProbe:
    """Load evidence over an interval: ``with LoadProbe() as p: ...``, then ``p.evidence()``."""

    def __enter__(self) -> LoadProbe:
        self.wall0, self.thread0 = time.perf_counter(), time.thread_time()
        self.busy0, self.own0 = _proc_stat_busy(), _own_cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall1, self.thread1 = time.perf_counter(), time.thread_time()
        self.busy1, self.own1 = _proc_stat_busy(), _own_cpu()

    def evidence(self) -> dict[str, float | None]:
        wall = max(self.wall1 - self.wall0, 1e-9)
        others = None
        if self.busy0 is not None and self.busy1 is not None:
            # each counter is read to a clock tick (10 ms): take the two ticks of doubt off, so that a short
            # interval on an idle machine does not read as load
            tick = 1 / os.sysconf("SC_CLK_TCK")
            others = max(0.0, (self.busy1 - self.busy0) - (self.own1 - self.own0) - 2 * tick) / wall
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = None
        return {"other_cores": others, "oncpu": min(1.0, (self.thread1 - self.thread0) / wall), "load_1m": load,
                "wall_s": wall}


def reference_workload(device: str) -> Callable[[], Any]:
    """A fixed GEMM (float32 256x512 @ 512x512 on a CPU, bf16 4096x4096 @ 4096x64 on a GPU) whose speed tells
    whether the machine changed between two points in time."""
    import torch

    g = torch.Generator().manual_seed(0)
    if device.startswith("cuda"):
        a = torch.randn(4096, 4096, generator=g).to("cuda", torch.bfloat16)
        b = torch.randn(4096, 64, generator=g).to("cuda", torch.bfloat16)
    else:
        a, b = torch.randn(256, 512, generator=g), torch.randn(512, 512, generator=g)
    return lambda: a @ b


def time_reference(ref: Callable[[], Any], device: str) -> tuple[float, float]:
    """Median ms of ``ref`` and its relative spread (IQR / median)."""
    from mpq.workers.timing import time_callable

    s = time_callable(ref, warmup=2, repeats=9, min_sample_ms=0.5, device=device)
    return s.median_ms, (s.q3_ms - s.q1_ms) / s.median_ms


def measure_with_evidence(measure: Callable[[], Any], device: str, threads: int,
                          policy: NoisePolicy | None = None, ref: Callable[[], Any] | None = None
                          ) -> tuple[Any, dict[str, Any]]:
    """``measure()`` bracketed by the reference workload and a :class:`LoadProbe`; measured again (up to
    ``policy.retries`` times) while the reference drifts more than its spread allows. Returns the result of the
    attempt with the least drift and its evidence (``trusted``, ``reasons``, ``ref_ms``, ``attempts``, ...)."""
    policy = policy or NoisePolicy()
    ref = ref or reference_workload(device)
    best: tuple[Any, dict[str, Any]] | None = None
    for attempt in range(1, policy.retries + 2):
        with LoadProbe() as probe:  # the references are inside: a longer window reads the load more exactly
            before, spread_b = time_reference(ref, device)
            with LoadProbe() as inner:  # but the measuring thread's share is the measurement's own
                result = measure()
            after, spread_a = time_reference(ref, device)
        evidence = {**probe.evidence(), "oncpu": inner.evidence()["oncpu"], "ref_ms": (before * after) ** 0.5,
                    "ref_drift": abs(after - before) / min(before, after), "ref_spread": max(spread_a, spread_b),
                    "attempts": attempt}
        evidence["trusted"], evidence["reasons"] = policy.verdict(evidence, threads, device)
        if best is None or evidence["ref_drift"] < best[1]["ref_drift"]:
            best = (result, evidence)
        if evidence["ref_drift"] <= policy.drift_limit(evidence["ref_spread"]):
            break
    result, evidence = best
    evidence["attempts"] = attempt
    return result, evidence


def conditions_now(device: str, threads: int, policy: NoisePolicy | None = None, seconds: float = 0.5
                   ) -> dict[str, Any]:
    """The reference's speed and the machine's load now (the reference timed for about ``seconds``): what cached
    rows are compared with before they are reused."""
    ref = reference_workload(device)
    deadline = time.perf_counter() + seconds

    def spin() -> None:
        while time.perf_counter() < deadline:
            ref()

    _, evidence = measure_with_evidence(spin, device, threads, NoisePolicy(**{**(policy or NoisePolicy())
                                                                               .as_dict(), "retries": 0}), ref)
    return evidence


def reusable(row: Mapping[str, Any], now: Mapping[str, Any], policy: NoisePolicy | None = None) -> str | None:
    """None if a cached ``row`` may be reused under the conditions ``now``, else why it is measured again: a row
    whose reference ran clearly slower than it runs now was taken on a busier machine (``stale``), and an untrusted
    row is measured again as soon as the machine is quiet enough to trust a new measurement (``untrusted``)."""
    policy = policy or NoisePolicy()
    ref = row.get("ref_ms")
    if ref is None or not ref > 0:
        return "untrusted" if now.get("trusted") else None  # an old row without evidence
    if ref > now["ref_ms"] * (1 + policy.stale_tolerance):
        return "stale"
    if not row.get("trusted") and now.get("trusted"):
        return "untrusted"
    return None

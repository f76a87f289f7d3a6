"""Noise you can see and refuse: a slowed measurement (a competing busy loop, an injected sleep) is detected and not
cached as trusted; a drifting reference is measured again; cached rows are reused only while no better measurement
can be made. These tests check what was recorded, never how fast anything ran."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch
from torch import nn

from mpq.workers import NoisePolicy, ProfileCache, measure_workloads, profile_workloads
from mpq.workers import noise
from mpq.workers.workloads import Workload

KERNEL = f"torch-float@{torch.__version__}"
FAST = dict(warmup=1, repeats=5, min_sample_ms=0.5)


def _workloads(n: int = 2) -> list[Workload]:
    return [Workload("linear", (128 + 32 * i, 256), True, (32, 256), None, "float", KERNEL) for i in range(n)]


def _spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


@pytest.fixture
def busy_machine():
    """Two processes spinning on every core of this machine while the test measures."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spin, args=(120.0,), daemon=True) for _ in range(2)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let them reach their loops
    yield
    for p in procs:
        p.terminate()
        p.join(30)


def test_competing_busy_loop_is_detected_and_not_trusted(busy_machine, tmp_path):
    store = ProfileCache(tmp_path / "c.sqlite")
    table = profile_workloads(_workloads(), backend="inprocess", cache=store, threads=1, progress=False, **FAST)
    assert table.untrusted == len(table) == 2 and table.stats["untrusted_rows"] == 2
    assert (table.frame["other_cores"] > 0.5).all()  # the spinners' CPU time was seen
    stored = store.get(table.fingerprint_id, table.frame["key"])
    assert len(stored) == 2 and all(r["trusted"] == 0 for r in stored.values())
    assert all(r["other_cores"] > 0.5 and r["load_1m"] is not None and r["ref_ms"] > 0 for r in stored.values())


class _Sleepy(nn.Module):
    """A layer that sleeps in every call: the measuring thread is off the CPU for most of the sample."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        time.sleep(0.002)
        return self.inner(x)


def test_injected_sleep_is_detected_and_not_trusted(monkeypatch, tmp_path):
    build = Workload.build
    monkeypatch.setattr(Workload, "build", lambda self, device="cpu", seed=0: (
        _Sleepy(build(self, device, seed)[0]), build(self, device, seed)[1]))
    result = measure_workloads(_workloads(1), "cpu", threads=1, **FAST)
    ev = result["evidence"]
    assert ev["oncpu"] < 0.5 and not ev["trusted"]
    assert any("on a CPU" in r for r in ev["reasons"])
    assert result["rows"][0]["trusted"] == 0 and result["rows"][0]["oncpu"] == ev["oncpu"]


def test_drifting_reference_is_measured_again(monkeypatch):
    refs = iter([(1.0, 0.01), (1.5, 0.01), (1.0, 0.01), (1.01, 0.01)])  # attempt 1 drifts 50%, attempt 2 is steady
    monkeypatch.setattr(noise, "time_reference", lambda ref, device: next(refs))
    calls = []
    result, ev = noise.measure_with_evidence(lambda: calls.append(1) or len(calls), "cpu", 1,
                                             NoisePolicy(), ref=lambda: None)
    assert len(calls) == 2 and result == 2 and ev["attempts"] == 2
    assert ev["ref_drift"] == pytest.approx(0.01) and ev["ref_ms"] == pytest.approx((1.0 * 1.01) ** 0.5)


def test_reference_that_keeps_drifting_is_untrusted_after_the_retries(monkeypatch):
    monkeypatch.setattr(noise, "time_reference", lambda ref, device, t=iter(range(1, 100)): (float(next(t)), 0.0))
    calls = []
    _, ev = noise.measure_with_evidence(lambda: calls.append(1), "cpu", 1, NoisePolicy(retries=2), ref=lambda: None)
    assert len(calls) == 3 and ev["attempts"] == 3 and not ev["trusted"]
    assert any("reference drifted" in r for r in ev["reasons"])


def test_verdict_names_each_reason():
    policy = NoisePolicy()
    quiet = {"ref_drift": 0.01, "ref_spread": 0.01, "other_cores": 0.05, "oncpu": 0.97}
    assert policy.verdict(quiet, threads=1, device="cpu") == (True, [])
    ok, reasons = policy.verdict({**quiet, "other_cores": 40.0, "oncpu": 0.3, "ref_drift": 0.2}, 1, "cpu")
    assert not ok and len(reasons) == 3
    # a CUDA measurement waits for the GPU: its thread's CPU share says nothing
    assert policy.verdict({**quiet, "oncpu": 0.1}, 1, "cuda") == (True, [])
    assert NoisePolicy.accept_all().verdict({**quiet, "other_cores": 40.0, "oncpu": 0.0, "ref_drift": 9.0},
                                            1, "cpu")[0]


def test_reuse_rule():
    policy = NoisePolicy(stale_tolerance=0.15)
    quiet, busy = {"ref_ms": 1.0, "trusted": True}, {"ref_ms": 1.6, "trusted": False}
    trusted = {"ref_ms": 1.0, "trusted": 1}
    untrusted = {"ref_ms": 1.7, "trusted": 0}
    assert noise.reusable(trusted, quiet, policy) is None
    assert noise.reusable(trusted, busy, policy) is None  # measured on a quieter machine than now: the better one
    assert noise.reusable({"ref_ms": 1.3, "trusted": 1}, quiet, policy) == "stale"
    assert noise.reusable(untrusted, quiet, policy) == "stale"
    assert noise.reusable({"ref_ms": 1.05, "trusted": 0}, quiet, policy) == "untrusted"
    assert noise.reusable({"ref_ms": 1.6, "trusted": 0}, busy, policy) is None  # as good as a new one would be
    assert noise.reusable({"ref_ms": None, "trusted": None}, quiet, policy) == "untrusted"


def test_untrusted_measurement_never_replaces_a_trusted_row(busy_machine, tmp_path):
    store = ProfileCache(tmp_path / "c.sqlite")
    w = _workloads(1)[0]
    first = profile_workloads([w], backend="inprocess", cache=store, threads=1, progress=False,
                              policy=NoisePolicy.accept_all(), **FAST)
    fid = first.fingerprint_id
    row = store.get(fid, [w.key])[w.key]
    assert row["trusted"] == 1
    # the trusted row claims a very slow reference: stale, so it is measured again, under the spinners' load and a
    # policy no measurement passes (an on-CPU share above 1), so the new row is untrusted whatever the load detector
    # makes of this machine's moment
    store.put(first.fingerprint, fid, [{**row, "key": w.key, "ref_ms": 1e6}])
    never = NoisePolicy(min_oncpu=1.5, retries=0)
    again = profile_workloads([w], backend="inprocess", cache=store, threads=1, progress=False, policy=never,
                              **FAST)
    assert again.stats["remeasured_stale"] == 1 and again.measured == 1 and again.untrusted == 1
    kept = store.get(fid, [w.key])[w.key]
    assert kept["trusted"] == 1 and kept["ref_ms"] == 1e6  # the cache still holds the trusted measurement

"""``check_cache`` (``mpq profile --check``): a cache re-validated drops stale and noisy rows and keeps good ones."""

from __future__ import annotations

import pytest
import torch

from mpq.workers import NoisePolicy, ProfileCache, check_cache, profile_workloads
from mpq.workers import check as check_module
from mpq.workers.fingerprint import fingerprint_id
from mpq.workers.profiler import fingerprint_with_threads
from mpq.workers.workloads import Workload

KERNEL = f"torch-float@{torch.__version__}"


def _row(key: str, **over) -> dict:
    return {"key": key, "median_ms": 1.0, "q1_ms": 0.95, "q3_ms": 1.05, "mean_ms": 1.0, "std_ms": 0.05,
            "repeats": 9, "inner": 1, "measured_at": "2026-06-01T00:00:00+00:00", "measured_by": "host",
            "copies": 1, "trusted": 1, "ref_ms": 1.0, "ref_drift": 0.01, "ref_spread": 0.01, "load_1m": 0.1,
            "other_cores": 0.0, "oncpu": 0.99, "attempts": 1, **over}


@pytest.fixture
def cache_with_every_kind_of_row(tmp_path):
    store = ProfileCache(tmp_path / "c.sqlite")
    here = fingerprint_with_threads("cpu", 1)
    fid = fingerprint_id(here)
    store.put(here, fid, [_row("good"), _row("untrusted", trusted=0), _row("no-evidence", trusted=None),
                          _row("noisy", q1_ms=0.5, q3_ms=1.8), _row("invalid", median_ms=-1.0),
                          _row("slow-ref", ref_ms=2.0), _row("old", measured_at="2020-01-01T00:00:00+00:00")])
    old_method = {**here, "timing": 1}
    store.put(old_method, fingerprint_id(old_method), [_row("from-timing-1")])
    other_machine = {**here, "name": "some other CPU", "torch": "1.0"}
    store.put(other_machine, fingerprint_id(other_machine), [_row("theirs")])
    store.put_configs(here, fid, "model", [{**_row(""), "config_key": '{"fc": "w8a8"}', "trusted": 0}])
    return store, fid


def _quiet(monkeypatch, ref_ms: float = 1.0, trusted: bool = True) -> None:
    monkeypatch.setattr(check_module, "conditions_with_threads",
                        lambda device, threads, policy=None: {"ref_ms": ref_ms, "trusted": trusted})


def test_check_drops_every_bad_kind_and_keeps_good_rows(cache_with_every_kind_of_row, monkeypatch):
    store, fid = cache_with_every_kind_of_row
    _quiet(monkeypatch)
    report = check_cache(store, recheck=0, max_age_days=365 * 3)
    assert dict(report.dropped) == {"untrusted": 3, "noisy": 1, "invalid": 1, "slower-machine": 1, "old": 1,
                                    "old-method": 1}
    assert {r["keys"][-1] for r in report.rows if r["reason"] == "untrusted"} == {
        "untrusted", "no-evidence", '{"fc": "w8a8"}'}
    assert set(store.get(fid, ["good", "untrusted", "slow-ref"])) == {"good"}
    assert store.count() == 2 and store.count(table="configs") == 0  # good here, theirs on the other machine
    assert report.kept == 2 and report.applied and "dropped 8" in report.describe()
    assert report.quiet_now is True and report.reference_ms == 1.0


def test_check_on_a_busy_machine_does_not_judge_by_speed(cache_with_every_kind_of_row, monkeypatch):
    store, fid = cache_with_every_kind_of_row
    _quiet(monkeypatch, ref_ms=5.0, trusted=False)
    report = check_cache(store, recheck=8)
    assert "slower-machine" not in report.dropped and report.rechecked == 0  # nothing measured while busy
    assert "slow-ref" in store.get(fid, ["slow-ref"]) and "busy" in report.describe()


def test_dry_run_removes_nothing(cache_with_every_kind_of_row, monkeypatch):
    store, _ = cache_with_every_kind_of_row
    _quiet(monkeypatch)
    before = store.count() + store.count(table="configs")
    report = check_cache(store, recheck=0, dry_run=True)
    assert sum(report.dropped.values()) >= 7 and not report.applied and "would drop" in report.describe()
    assert store.count() + store.count(table="configs") == before


def test_recheck_drops_rows_that_no_longer_hold(tmp_path, monkeypatch):
    store = ProfileCache(tmp_path / "c.sqlite")
    ws = [Workload("linear", (64 + 32 * i, 128), True, (16, 128), None, "float", KERNEL) for i in range(3)]
    table = profile_workloads(ws, backend="inprocess", cache=store, threads=1, warmup=1, repeats=5,
                              min_sample_ms=0.5, progress=False, policy=NoisePolicy.accept_all())
    fid = table.fingerprint_id
    rows = store.get(fid, [w.key for w in ws])
    # one row claims a latency 50x off what this machine measures; the recheck measures it (and the others) again
    lie = ws[0].key
    store.put(table.fingerprint, fid, [{**rows[lie], "key": lie, "median_ms": rows[lie]["median_ms"] * 50,
                                        "q1_ms": rows[lie]["median_ms"] * 49, "q3_ms": rows[lie]["median_ms"] * 51}])
    _quiet(monkeypatch, ref_ms=1e9)  # quiet now, and no row was measured on a slower machine
    # a loose tolerance: on a busy machine honest rows move by tens of percent between two measurements
    report = check_cache(store, policy=NoisePolicy.accept_all(), recheck=3, recheck_tolerance=3.0,
                         max_spread=float("inf"))
    assert report.rechecked == 3
    assert report.dropped.get("recheck") == 1 and [r["keys"][1] for r in report.rows] == [lie]
    assert set(store.get(fid, [w.key for w in ws])) == {w.key for w in ws[1:]}


def test_workload_key_round_trips():
    conv = Workload("conv2d", (8, 4, 3, 3), True, (2, 4, 6, 6), (("dilation", (1, 1)), ("groups", 1),
                    ("padding", (1, 1)), ("padding_mode", "zeros"), ("stride", (1, 1))), "w8a8", "k@1", 4096)
    assert Workload.from_key(conv.key) == conv and Workload.from_key(conv.key).key == conv.key


def test_profile_check_on_the_command_line_drops_untrusted_rows_and_keeps_trusted_ones(tmp_path):
    """``mpq profile --check``: a cache holding one workload measured on a quiet machine and one measured while a
    busy loop competed (as the noise policy judged them here) keeps the first and drops the second."""
    import subprocess
    import sys

    store = ProfileCache(tmp_path / "c.sqlite")
    w = [Workload("linear", (32, 64), True, (8, 64), None, "float", KERNEL),
         Workload("linear", (64, 64), True, (8, 64), None, "float", KERNEL)]
    profile_workloads(w[:1], "cpu", backend="inprocess", cache=store, threads=1, warmup=1, repeats=5,
                      progress=False, policy=NoisePolicy.accept_all())
    strict = NoisePolicy(max_drift=0.0, spread_factor=0.0, max_other_cores=-1.0, free_share=0.0, min_oncpu=1.01,
                         retries=0)  # nothing passes: the row is stored as measured under load
    table = profile_workloads(w[1:], "cpu", backend="inprocess", cache=store, threads=1, warmup=1, repeats=5,
                              progress=False, policy=strict)
    assert table.untrusted == 1 and store.count() == 2
    # the first row's reference was timed while the test session's other workers may have loaded this machine; the
    # check (quiet now) would then drop it as measured on a slower machine. Record it as timed on a faster one, so
    # that only the noise verdict decides here (test_check_drops_every_bad_kind_* covers that rule).
    row0 = store.get(table.fingerprint_id, [w[0].key])[w[0].key]
    store.put(table.fingerprint, table.fingerprint_id, [{**row0, "key": w[0].key, "ref_ms": row0["ref_ms"] * 1e-3}])
    cmd = [sys.executable, "-m", "mpq.cli", "-q", "profile", "--check", "--cache-file", str(store.path),
           "--recheck", "0"]
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, check=True)
    assert "would drop 1 (1 untrusted)" in dry.stdout and store.count() == 2
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "1 kept, dropped 1 (1 untrusted)" in done.stdout and "untrusted: 1" in done.stdout
    fid = table.fingerprint_id
    assert set(ProfileCache(store.path).get(fid, [x.key for x in w])) == {w[0].key}

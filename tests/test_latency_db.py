"""The shared latency database: concurrent writers lose no rows, tables move between clusters as Parquet, and a
Ray worker killed mid-profile costs nothing that was finished."""

import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from mpq.cli import main
from mpq.workers import ProfileCache, profile_workloads
from mpq.workers.profiler import TABLE_COLUMNS
from mpq.workers.workloads import Workload

FP = {"name": "test-cpu", "threads": 1}


def _rows(prefix: str, n: int, measured_at: str = "2026-01-01T00:00:00+00:00", ms: float = 1.0) -> list[dict]:
    return [{"key": f"{prefix}-{i}", "median_ms": ms + i, "q1_ms": ms, "q3_ms": ms + 2 * i, "mean_ms": ms + i,
             "std_ms": 0.1, "repeats": 7, "inner": 1, "measured_at": measured_at, "measured_by": "host-a"}
            for i in range(n)]


def _writer(path: str, prefix: str, n: int) -> None:
    store = ProfileCache(path)
    for i in range(0, n, 10):  # many small transactions, interleaved with the other writers'
        store.put(FP, "fp1", _rows(prefix, n)[i:i + 10])


def test_concurrent_writers_lose_no_rows(tmp_path):
    path = str(tmp_path / "db.sqlite")
    ProfileCache(path)
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, f"w{j}", 200)) for j in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert ProfileCache(path).count("fp1") == 800


def test_export_import_round_trip_keeps_the_newer_measurement(tmp_path):
    a = ProfileCache(tmp_path / "a.sqlite")
    a.put(FP, "fp1", _rows("x", 5, "2026-02-01T00:00:00+00:00", ms=2.0))
    a.put({**FP, "name": "other"}, "fp2", _rows("y", 3))
    assert a.export(tmp_path / "all.parquet") == 8
    assert a.export(tmp_path / "fp2.parquet", "fp2") == 3
    b = ProfileCache(tmp_path / "b.sqlite")
    b.put(FP, "fp1", _rows("x", 5, "2026-03-01T00:00:00+00:00", ms=9.0))  # newer than the export's
    assert b.import_file(tmp_path / "all.parquet") == 3  # only fp2's rows: b's fp1 rows are newer
    assert b.get("fp1", ["x-0"])["x-0"]["median_ms"] == 9.0
    assert b.get("fp2", ["y-2"])["y-2"] == a.get("fp2", ["y-2"])["y-2"]
    c = ProfileCache(tmp_path / "c.sqlite")
    assert c.import_file(tmp_path / "all.parquet") == 8 and c.count() == 8


def test_import_rejects_files_that_are_not_exports(tmp_path):
    import pandas as pd

    pd.DataFrame({"workload_key": ["k"], "median_ms": [1.0]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="not an mpq profile export.*fingerprint_id"):
        ProfileCache(tmp_path / "db.sqlite").import_file(tmp_path / "bad.parquet")


def test_cli_export_and_import(tmp_path, capsys):
    ProfileCache(tmp_path / "h100.sqlite").put(FP, "fp1", _rows("z", 4))
    assert main(["profile", "--cache", str(tmp_path / "h100.sqlite"), "--export", str(tmp_path / "t.parquet")]) == 0
    assert main(["profile", "--cache", str(tmp_path / "laptop.sqlite"), "--import", str(tmp_path / "t.parquet")]) == 0
    assert "imported 4 profiles" in capsys.readouterr().out
    assert ProfileCache(tmp_path / "laptop.sqlite").count("fp1") == 4


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _raylet_pid() -> int | None:
    """This session's raylet (its workers descend from it), or None where Ray does not say."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    try:
        return node.all_processes["raylet"][0].process.pid
    except (AttributeError, KeyError, IndexError):
        return None


def _measuring_pids() -> list[int]:
    """This session's profiler actors measuring now (Ray names the process after the method it runs); never
    another Ray cluster's on the same machine."""
    raylet, pids = _raylet_pid(), []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"ray::ProfilerWorker.measure" not in (d / "cmdline").read_bytes():
                    continue
            except OSError:
                continue
            pid = ancestor = int(d.name)
            while raylet is not None and ancestor > 1 and ancestor != raylet:
                ancestor = _parent(ancestor)
            if raylet is None or ancestor == raylet:
                pids.append(pid)
    return pids


@pytest.mark.ray
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds Ray's worker processes through /proc")
def test_worker_killed_mid_profile_keeps_finished_rows_and_requeues(ray_cluster, tmp_path):
    kernel = f"torch-float@{torch.__version__}"
    workloads = [Workload("linear", (96 + 16 * i, 256), True, (64, 256), None, "float", kernel) for i in range(8)]
    store = ProfileCache(tmp_path / "db.sqlite")
    result, killed = {}, []

    def run():
        result["table"] = profile_workloads(workloads, backend="ray", cache=store, threads=1, warmup=2, repeats=40,
                                            min_sample_ms=5.0, chunk_size=1, progress=False)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline and not killed:
        done = store.count()
        pids = _measuring_pids()
        if done >= 2 and pids:
            os.kill(pids[0], signal.SIGKILL)  # a profiler dies in the middle of a measurement
            killed.append((pids[0], done))
        time.sleep(0.05)
    thread.join(300)
    assert killed, "no profiling worker was seen running"
    before_kill = killed[0][1]
    table = result["table"]
    assert len(table) == len(workloads) and (table.frame["source"] == "measured").all()
    assert list(table.frame.columns) == TABLE_COLUMNS
    assert store.count() == len(workloads) >= before_kill >= 2  # rows written before the kill stayed
    assert (table.frame["median_ms"] > 0).all()
    assert table.stats["actor_restarts"] >= 1  # its chunk went back to the queue and a new profiler took it


def test_killed_search_resumes_without_measuring_again(tmp_path):
    import json
    import subprocess
    import sys

    env = {**os.environ, "MPQ_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mpq.cli", "-q", "search", "--model", "digits-cnn", "--budget", "size=0.3",
           "--out", str(run), "--profile", "inprocess", "--repeats", "30", "--frontier-points", "3"]
    proc = subprocess.Popen(cmd, env=env)
    db = tmp_path / "cache" / "profiles.sqlite"
    # generous bounds: on a machine shared with other jobs a search may take many minutes to reach profiling
    deadline, done_before = time.time() + 3600, 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if (run / "scores.csv").exists() and db.exists():
                done_before = ProfileCache(db).count()
                if done_before >= 1:
                    proc.send_signal(signal.SIGKILL)  # the driver dies mid-profile
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and not done_before:
            proc.kill()
        proc.wait()
    assert done_before >= 1 and not (run / "run.json").exists(), "the search was not interrupted mid-profile"
    rc = subprocess.run([sys.executable, "-m", "mpq.cli", "-q", "search", "--resume", str(run)], env=env,
                        timeout=7200).returncode
    assert rc == 0
    info = json.loads((run / "run.json").read_text())
    assert info["sensitivity_cost"].get("reused") is True  # no sensitivity recomputed
    prof = info["profile"]
    assert prof["measured"] + prof["cache_hits"] == prof["workloads"]
    # every row finished before the kill is reused, unless a better measurement could be made on resume (it was
    # taken on a busier machine than the resumed run found, or under load that has gone since): never lost
    assert prof["cache_hits"] + prof["remeasured_stale"] + prof["remeasured_untrusted"] >= done_before
    assert prof["measured"] < prof["workloads"] or prof["remeasured_stale"] + prof["remeasured_untrusted"] > 0


@pytest.mark.parametrize("backend", ["inprocess", pytest.param("ray", marks=pytest.mark.ray)])
def test_a_workload_that_fails_names_node_device_and_workload(backend, request, tmp_path):
    from mpq.workers.profiler import WorkloadError

    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    kernel = f"torch-float@{torch.__version__}"
    good = Workload("linear", (32, 64), True, (8, 64), None, "float", kernel)
    bad = Workload("linear", (32, 64), True, (8, 48), None, "float", kernel)  # input K 48 for a K=64 layer
    store = ProfileCache(tmp_path / "db.sqlite")
    with pytest.raises(WorkloadError) as e:
        profile_workloads([good, bad], backend=backend, cache=store, threads=1, warmup=1, repeats=3,
                          chunk_size=1, progress=False)
    msg = str(e.value)
    assert "node" in msg and "(cpu)" in msg and "weight 32x64, input 8x48" in msg and "option float" in msg
    if backend == "inprocess":
        assert store.count() == 1  # the good workload, measured before the bad one, is kept

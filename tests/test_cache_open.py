"""Opening the profile cache (issue 21, item 3): only real corruption moves a file aside (with its -wal/-shm); a
read-only cache is used read-only, says so once, and measurements still run; a lock is waited for, and a lock held
too long is a clear error that leaves the file where it is."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from mpq.workers import CacheLockedError, NoisePolicy, ProfileCache, profile_workloads
from mpq.workers.workloads import Workload

FP = {"name": "test-cpu", "threads": 1}
ROW = {"key": "k0", "median_ms": 1.0, "q1_ms": 0.9, "q3_ms": 1.1, "mean_ms": 1.0, "std_ms": 0.1, "repeats": 5,
       "inner": 1, "measured_at": "2026-01-01T00:00:00+00:00", "measured_by": "a", "trusted": 1, "ref_ms": 1.0}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrupt_file_is_moved_aside_with_its_wal_and_shm(tmp_path, caplog):
    path = tmp_path / "profiles.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    Path(f"{path}-wal").write_bytes(b"wal")
    Path(f"{path}-shm").write_bytes(b"shm")
    with caplog.at_level(logging.WARNING):
        cache = ProfileCache(path)
    assert cache.count() == 0 and not cache.read_only and "corrupt" in caplog.text
    moved = sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name)
    assert len(moved) == 3 and moved[0].endswith(tuple("0123456789"))
    assert {m.rsplit("-", 1)[-1] for m in moved[1:]} == {"shm", "wal"}
    assert Path(tmp_path / moved[1]).read_bytes() in (b"wal", b"shm")  # moved, not deleted
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _legacy_db(path: Path) -> None:
    """A valid cache in rollback-journal mode, as another tool may leave one (a reader there blocks writers)."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE fingerprints (fingerprint_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL)")
        conn.execute("CREATE TABLE profiles (fingerprint_id TEXT NOT NULL, workload_key TEXT NOT NULL, "
                     "median_ms REAL NOT NULL, q1_ms REAL, q3_ms REAL, mean_ms REAL, std_ms REAL, repeats INTEGER, "
                     "inner INTEGER, measured_at TEXT, measured_by TEXT, PRIMARY KEY (fingerprint_id, workload_key))")
        conn.execute("INSERT INTO fingerprints VALUES ('fp1', ?)", (json.dumps(FP),))
        conn.execute("INSERT INTO profiles VALUES ('fp1', 'k0', 2.5, 2, 3, 2.5, 0.1, 5, 1, '2025', 'old')")


def test_a_locked_cache_is_waited_for_not_moved(tmp_path):
    path = tmp_path / "profiles.sqlite"
    _legacy_db(path)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the lock
    try:
        with pytest.raises(CacheLockedError, match=r"profiles.sqlite stayed locked by another process for 0.5 s.*"
                                                   r"not damaged"):
            ProfileCache(path, lock_timeout_s=0.5)
        assert [p.name for p in tmp_path.iterdir()] == ["profiles.sqlite"]  # nothing moved aside
        threading.Timer(1.0, lambda: holder.execute("COMMIT")).start()
        cache = ProfileCache(path, lock_timeout_s=120)  # waits for the lock to go
    finally:
        time.sleep(1.2)
        holder.close()
    row = cache.get("fp1", ["k0"])["k0"]
    assert row["median_ms"] == 2.5 and row["trusted"] is None  # the old row is kept; its evidence columns added
    assert not any(".corrupt-" in p.name for p in tmp_path.iterdir())


def _open_read_only(path: str, report: str, as_nobody: bool) -> None:
    """In a child process: (as an unprivileged user) open the cache, read its row, profile a workload."""
    logging.basicConfig(level=logging.WARNING, filename=report + ".log", force=True)
    if as_nobody:
        os.setgid(65534)
        os.setuid(65534)
    out: dict = {}
    try:
        cache = ProfileCache(path)
        out["read_only"] = cache.read_only
        out["old_row"] = cache.get("fp1", ["k0"]).get("k0", {}).get("median_ms")
        w = Workload("linear", (32, 64), True, (8, 64), None, "float", f"torch-float@{torch.__version__}")
        table = profile_workloads([w], backend="inprocess", cache=cache, threads=1, warmup=1, repeats=3,
                                  progress=False, policy=NoisePolicy.accept_all())
        again = profile_workloads([w], backend="inprocess", cache=cache, threads=1, warmup=1, repeats=3,
                                  progress=False, policy=NoisePolicy.accept_all())
        out.update(measured=table.measured, reused_in_memory=again.cache_hits)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out["error"] = f"{type(e).__name__}: {e}"
    Path(report).write_text(json.dumps(out))


@pytest.fixture
def open_dir():
    """A directory any user can reach (pytest's own are private to their owner)."""
    base = Path(tempfile.mkdtemp(prefix="mpq-ro-"))
    base.chmod(0o755)
    yield base
    for p in base.rglob("*"):
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(base)


def test_read_only_cache_is_used_read_only_and_measurements_still_run(open_dir):
    base = open_dir
    root = base / "shared"
    root.mkdir()
    path = root / "profiles.sqlite"
    cache = ProfileCache(path)
    cache.put(FP, "fp1", [ROW])
    del cache
    before = {p.name: _digest(p) for p in root.iterdir()}
    as_nobody = os.geteuid() == 0  # root ignores file modes: drop to an unprivileged user to make them bind
    for p in root.iterdir():
        p.chmod(0o444)
    root.chmod(0o555)
    report = str(base / "report.json")
    Path(report).touch()
    Path(report + ".log").touch()
    os.chmod(report, 0o666)
    os.chmod(report + ".log", 0o666)
    try:
        proc = mp.get_context("fork").Process(target=_open_read_only, args=(str(path), report, as_nobody))
        proc.start()
        proc.join(600)
        out = json.loads(Path(report).read_text())
    finally:
        root.chmod(0o755)
    assert "error" not in out, out
    assert out["read_only"] is True and out["old_row"] == 1.0
    assert out["measured"] == 1 and out["reused_in_memory"] == 1  # kept in memory for the process
    assert {p.name: _digest(p) for p in root.iterdir()} == before  # nothing written, nothing moved
    log = Path(report + ".log").read_text()
    assert log.count("read-only") == 1, log

"""The on-disk profile cache: one SQLite file, keyed by (device fingerprint, workload).

SQLite gives atomic commits and safe concurrent writers on one host; nothing is pickled. A file that fails its
integrity check is moved aside and rebuilt rather than trusted.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from mpq.paths import default_cache_dir

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS fingerprints (fingerprint_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS profiles (
    fingerprint_id TEXT NOT NULL,
    workload_key TEXT NOT NULL,
    median_ms REAL NOT NULL, q1_ms REAL, q3_ms REAL, mean_ms REAL, std_ms REAL,
    repeats INTEGER, inner INTEGER,
    measured_at TEXT, measured_by TEXT,
    PRIMARY KEY (fingerprint_id, workload_key)
);
"""
ROW_FIELDS = ["median_ms", "q1_ms", "q3_ms", "mean_ms", "std_ms", "repeats", "inner", "measured_at", "measured_by"]


def _plain(v: Any) -> Any:
    """A value SQLite can store: numpy scalars to Python ones, NaN/NA to NULL."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    return v.item() if hasattr(v, "item") else v


class ProfileCache:
    """Measured latencies that later searches reuse."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_cache_dir() / "profiles.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    @contextmanager
    def _connect(self):
        """A connection that commits on success, rolls back on error, and is always closed."""
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            with conn:
                yield conn
        finally:
            conn.close()

    def _open(self) -> None:
        try:
            with self._connect() as conn:
                ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
        except sqlite3.DatabaseError as e:
            bad = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning("profile cache %s is corrupt (%s): moved to %s and rebuilt", self.path, e, bad)
            self.path.replace(bad)
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            with self._connect():
                pass

    def get(self, fingerprint_id: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        keys = list(keys)
        out: dict[str, dict[str, Any]] = {}
        with self._connect() as conn:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                q = (f"SELECT workload_key, {', '.join(ROW_FIELDS)} FROM profiles WHERE fingerprint_id = ? "
                     f"AND workload_key IN ({', '.join('?' * len(chunk))})")
                for row in conn.execute(q, [fingerprint_id, *chunk]):
                    out[row[0]] = dict(zip(ROW_FIELDS, row[1:]))
        return out

    def put(self, fingerprint: dict[str, Any], fingerprint_id: str, rows: Iterable[dict[str, Any]]) -> int:
        rows = list(rows)
        with self._connect() as conn:
            conn.execute("INSERT OR REPLACE INTO fingerprints VALUES (?, ?)",
                         (fingerprint_id, json.dumps(fingerprint, sort_keys=True)))
            conn.executemany(
                f"INSERT OR REPLACE INTO profiles VALUES (?, ?, {', '.join('?' * len(ROW_FIELDS))})",
                [(fingerprint_id, r["key"], *(r.get(f) for f in ROW_FIELDS)) for r in rows])
        return len(rows)

    # --- moving tables between clusters ------------------------------------------------------------------------------
    def export(self, path: str | Path, fingerprint_id: str | None = None) -> int:
        """Write the profiles (of one device fingerprint, or all) with their fingerprints to a Parquet file."""
        import pandas as pd

        query = (f"SELECT p.fingerprint_id, f.fingerprint, p.workload_key, {', '.join('p.' + c for c in ROW_FIELDS)} "
                 f"FROM profiles p JOIN fingerprints f USING (fingerprint_id)")
        args: tuple = ()
        if fingerprint_id is not None:
            query, args = query + " WHERE p.fingerprint_id = ?", (fingerprint_id,)
        with self._connect() as conn:
            frame = pd.read_sql_query(query, conn, params=args)
        frame.to_parquet(path, index=False)
        return len(frame)

    def import_file(self, path: str | Path) -> int:
        """Merge a Parquet file written by :meth:`export`; rows for the same (device, workload) are replaced by the
        more recently measured one."""
        import pandas as pd

        frame = pd.read_parquet(path)
        need = ["fingerprint_id", "fingerprint", "workload_key", *ROW_FIELDS]
        missing = [c for c in need if c not in frame.columns]
        if missing:
            raise ValueError(f"{path} is not an mpq profile export: columns {missing} are missing (need {need})")
        if not frame["median_ms"].map(lambda v: v == v and v > 0).all():
            raise ValueError(f"{path}: a median_ms is not a positive number; refusing to import it")
        existing = {}
        for fid in frame["fingerprint_id"].unique():
            keys = frame.loc[frame["fingerprint_id"] == fid, "workload_key"]
            existing.update({(fid, k): v for k, v in self.get(fid, keys).items()})
        newer = [r for r in frame.to_dict("records")
                 if (r["fingerprint_id"], r["workload_key"]) not in existing
                 or str(r["measured_at"]) >= str(existing[(r["fingerprint_id"], r["workload_key"])]["measured_at"])]
        with self._connect() as conn:
            conn.executemany("INSERT OR REPLACE INTO fingerprints VALUES (?, ?)",
                             sorted({(r["fingerprint_id"], r["fingerprint"]) for r in newer}))
            conn.executemany(
                f"INSERT OR REPLACE INTO profiles VALUES (?, ?, {', '.join('?' * len(ROW_FIELDS))})",
                [(r["fingerprint_id"], r["workload_key"], *(_plain(r[f]) for f in ROW_FIELDS)) for r in newer])
        return len(newer)

    def count(self, fingerprint_id: str | None = None) -> int:
        with self._connect() as conn:
            if fingerprint_id is None:
                return conn.execute("SELECT COUNT(*) FROM profiles").fetchone()[0]
            return conn.execute("SELECT COUNT(*) FROM profiles WHERE fingerprint_id = ?",
                                (fingerprint_id,)).fetchone()[0]

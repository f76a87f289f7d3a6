"""The on-disk profile cache: one SQLite file of layer workloads and whole-model configs, keyed by device
fingerprint, each row stored with the load evidence it was measured under (:mod:`mpq.workers.noise`).

SQLite gives atomic commits and safe concurrent writers on one host; nothing is pickled. How it opens:

- a file that fails its integrity check (or is not a database at all) is corrupt: it is moved aside, with its
  ``-wal`` and ``-shm`` files, as ``<name>.corrupt-<time>`` and a new cache is started;
- a file or directory this process cannot write (a team cache shared read-only) opens read-only, says so once,
  and keeps new measurements in memory for this process;
- a file locked by another process is waited for (``lock_timeout_s``), never mistaken for damage; a lock held
  longer is a :class:`CacheLockedError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from mpq.errors import MpqError
from mpq.paths import default_cache_dir

log = logging.getLogger(__name__)

STATS_FIELDS = ["median_ms", "q1_ms", "q3_ms", "mean_ms", "std_ms", "repeats", "inner", "measured_at",
                "measured_by"]
EVIDENCE_COLUMNS = ["copies", "trusted", "ref_ms", "ref_drift", "ref_spread", "load_1m", "other_cores", "oncpu",
                    "attempts"]
ROW_FIELDS = STATS_FIELDS + EVIDENCE_COLUMNS
_TYPES = {"repeats": "INTEGER", "inner": "INTEGER", "copies": "INTEGER", "trusted": "INTEGER",
          "attempts": "INTEGER", "measured_at": "TEXT", "measured_by": "TEXT"}
_COLUMNS = ", ".join(f"{f} {_TYPES.get(f, 'REAL')}" for f in ROW_FIELDS)
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS fingerprints (fingerprint_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS profiles (fingerprint_id TEXT NOT NULL, workload_key TEXT NOT NULL, {_COLUMNS},
                                     PRIMARY KEY (fingerprint_id, workload_key));
CREATE TABLE IF NOT EXISTS configs (fingerprint_id TEXT NOT NULL, model_key TEXT NOT NULL, config_key TEXT NOT NULL,
                                    {_COLUMNS}, PRIMARY KEY (fingerprint_id, model_key, config_key));
"""
_KEYS = {"profiles": ("fingerprint_id", "workload_key"), "configs": ("fingerprint_id", "model_key", "config_key")}
# SQLite's primary result codes (``sqlite_errorcode & 0xff``)
_CORRUPT, _NOTADB = 11, 26
_BUSY, _LOCKED = 5, 6
_PERM, _READONLY, _CANTOPEN = 3, 8, 14


class CacheLockedError(MpqError, RuntimeError):
    """The profile cache stayed locked by another process for longer than the cache waits."""


def _plain(v: Any) -> Any:
    """A value SQLite can store: numpy scalars to Python ones, NaN/NA to NULL."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    return v.item() if hasattr(v, "item") else v


def _code(e: sqlite3.Error) -> int:
    return (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF


def _is_corrupt(e: sqlite3.Error) -> bool:
    text = str(e).lower()
    return _code(e) in (_CORRUPT, _NOTADB) or "not a database" in text or "malformed" in text


def _is_locked(e: sqlite3.Error) -> bool:
    return _code(e) in (_BUSY, _LOCKED) or "locked" in str(e).lower()


def _is_unwritable(e: sqlite3.Error) -> bool:
    text = str(e).lower()
    return _code(e) in (_PERM, _READONLY, _CANTOPEN) or "readonly" in text or "unable to open" in text


class ProfileCache:
    """Measured latencies (layer workloads and whole configs) that later searches reuse."""

    def __init__(self, path: str | Path | None = None, lock_timeout_s: float = 300.0):
        self.path = Path(path) if path else default_cache_dir() / "profiles.sqlite"
        self.lock_timeout_s = lock_timeout_s
        self.read_only = False
        self._uri: str | None = None  # the read-only URI, once read-only
        self._memory: dict[str, dict[tuple, dict[str, Any]]] = {"profiles": {}, "configs": {}}
        self._memory_fps: dict[str, str] = {}
        self._open()

    # --- opening ------------------------------------------------------------------------------------------------------
    def _writable(self) -> bool:
        if self.path.exists():
            return os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)
        parent = next((p for p in [self.path.parent, *self.path.parent.parents] if p.exists()), None)
        return parent is not None and os.access(parent, os.W_OK)

    def _open(self) -> None:
        if not self._writable():
            return self._go_read_only("this process cannot write it")
        if self._not_sqlite():
            # before any connection: closing one would delete the -wal/-shm files that belong with it
            self._move_aside(sqlite3.DatabaseError("file is not a database"))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
                if ok != "ok":
                    raise sqlite3.DatabaseError(f"integrity check: {ok}")
                self._migrate(conn)
        except PermissionError:
            return self._go_read_only("this process cannot write it")
        except sqlite3.Error as e:
            if _is_locked(e):
                raise self._locked(e) from None
            if _is_unwritable(e) and self.path.exists():
                return self._go_read_only(str(e))
            if not (_is_corrupt(e) or "integrity check" in str(e)):
                raise
            self._move_aside(e)
            with self._connect():
                pass

    def _not_sqlite(self) -> bool:
        """Whether the file exists, is not empty and lacks SQLite's header."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(16)
        except OSError:
            return False
        return bool(head) and head != b"SQLite format 3\x00"

    def _move_aside(self, reason: Exception) -> None:
        """Move a corrupt file and its -wal/-shm files aside (kept for inspection, never deleted)."""
        stamp = int(time.time())
        bad = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        log.warning("profile cache %s is corrupt (%s): moved to %s (with its -wal/-shm files) and rebuilt",
                    self.path, reason, bad)
        self.path.replace(bad)
        for suffix in ("-wal", "-shm"):
            side = Path(str(self.path) + suffix)
            if side.exists():
                side.replace(Path(str(bad) + suffix))

    def _go_read_only(self, why: str) -> None:
        self.read_only = True
        log.warning("profile cache %s is read-only (%s): its rows are used, new measurements are kept in memory "
                    "for this process and not stored", self.path, why)
        if not self.path.exists():
            self._uri = None
            return
        for uri in (f"file:{self.path}?mode=ro", f"file:{self.path}?mode=ro&immutable=1"):
            try:  # a WAL file in a directory we cannot write opens only as immutable
                conn = sqlite3.connect(uri, uri=True, timeout=self.lock_timeout_s)
                try:
                    conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                finally:
                    conn.close()
                self._uri = uri
                return
            except sqlite3.Error as e:
                if _is_corrupt(e):
                    log.warning("read-only profile cache %s is corrupt (%s) and cannot be moved aside: ignored",
                                self.path, e)
                    break
        self._uri = None

    def _locked(self, e: Exception) -> CacheLockedError:
        return CacheLockedError(f"profile cache {self.path} stayed locked by another process for "
                                f"{self.lock_timeout_s:g} s ({e}); it is not damaged: retry when that process is "
                                f"done, or use another cache (--cache / MPQ_CACHE_DIR)")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection that commits on success, rolls back on error, and is always closed."""
        conn = sqlite3.connect(self.path, timeout=self.lock_timeout_s)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            with conn:
                yield conn
        finally:
            conn.close()

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection | None]:
        """A connection to read from (None for a read-only cache without a readable file)."""
        if not self.read_only:
            with self._connect() as conn:
                yield conn
            return
        if self._uri is None:
            yield None
            return
        conn = sqlite3.connect(self._uri, uri=True, timeout=self.lock_timeout_s)
        try:
            yield conn
        finally:
            conn.close()

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Add the columns that caches written by older versions lack (their rows keep NULL evidence)."""
        for table in ("profiles", "configs"):
            have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            for f in ROW_FIELDS:
                if f not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {f} {_TYPES.get(f, 'REAL')}")

    @staticmethod
    def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        return [f for f in ROW_FIELDS if f in have]

    # --- rows -----------------------------------------------------------------------------------------------------
    def _get(self, table: str, prefix: tuple, keys: list[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        key_col = _KEYS[table][-1]
        where = " AND ".join(f"{c} = ?" for c in _KEYS[table][:-1])
        with self._reader() as conn:
            if conn is not None and conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?",
                                                 (table,)).fetchone():
                cols = self._columns(conn, table)
                for i in range(0, len(keys), 500):
                    chunk = keys[i:i + 500]
                    q = (f"SELECT {key_col}, {', '.join(cols)} FROM {table} WHERE {where} "
                         f"AND {key_col} IN ({', '.join('?' * len(chunk))})")
                    for row in conn.execute(q, [*prefix, *chunk]):
                        out[row[0]] = {**dict.fromkeys(ROW_FIELDS), **dict(zip(cols, row[1:]))}
        wanted = set(keys)
        out.update({k[-1]: dict(v) for k, v in self._memory[table].items()
                    if k[:-1] == prefix and k[-1] in wanted})
        return out

    def _put(self, table: str, fingerprint: dict[str, Any], prefix: tuple, key_field: str,
             rows: list[dict[str, Any]]) -> int:
        fid = prefix[0]
        if not self.read_only:
            try:
                with self._connect() as conn:
                    conn.execute("INSERT OR REPLACE INTO fingerprints VALUES (?, ?)",
                                 (fid, json.dumps(fingerprint, sort_keys=True)))
                    marks = ", ".join("?" * (len(prefix) + 1 + len(ROW_FIELDS)))
                    conn.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({marks})",
                                     [(*prefix, r[key_field], *(_plain(r.get(f)) for f in ROW_FIELDS)) for r in rows])
                return len(rows)
            except sqlite3.OperationalError as e:
                if _is_locked(e):
                    raise self._locked(e) from None
                if not _is_unwritable(e):
                    raise
                self._go_read_only(str(e))
        self._memory_fps[fid] = json.dumps(fingerprint, sort_keys=True)
        for r in rows:
            self._memory[table][(*prefix, r[key_field])] = {f: _plain(r.get(f)) for f in ROW_FIELDS}
        return len(rows)

    def get(self, fingerprint_id: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Cached layer-workload rows (stats and evidence) of one device fingerprint, by workload key."""
        return self._get("profiles", (fingerprint_id,), list(keys))

    def put(self, fingerprint: dict[str, Any], fingerprint_id: str, rows: Iterable[dict[str, Any]]) -> int:
        """Store layer-workload rows (each with ``key``, its stats and evidence)."""
        return self._put("profiles", fingerprint, (fingerprint_id,), "key", list(rows))

    def get_configs(self, fingerprint_id: str, model_key: str, config_keys: Iterable[str]
                    ) -> dict[str, dict[str, Any]]:
        """Cached whole-model rows of one model (``model_key``) on one device fingerprint, by config key."""
        return self._get("configs", (fingerprint_id, model_key), list(config_keys))

    def put_configs(self, fingerprint: dict[str, Any], fingerprint_id: str, model_key: str,
                    rows: Iterable[dict[str, Any]]) -> int:
        """Store whole-model rows (each with ``config_key``, its stats and evidence)."""
        return self._put("configs", fingerprint, (fingerprint_id, model_key), "config_key", list(rows))

    def fingerprints(self) -> dict[str, dict[str, Any]]:
        """Every device fingerprint the cache holds rows for."""
        out = {}
        with self._reader() as conn:
            if conn is not None:
                out = {fid: json.loads(fp) for fid, fp in conn.execute("SELECT * FROM fingerprints")}
        out.update({fid: json.loads(fp) for fid, fp in self._memory_fps.items()})
        return out

    def rows(self, table: str = "profiles") -> list[dict[str, Any]]:
        """Every row of ``table`` (``profiles`` or ``configs``) with its keys, stats and evidence."""
        keys = _KEYS[table]
        out = []
        with self._reader() as conn:
            if conn is not None:
                cols = self._columns(conn, table)
                for row in conn.execute(f"SELECT {', '.join(keys)}, {', '.join(cols)} FROM {table}"):
                    out.append({**dict.fromkeys(ROW_FIELDS), **dict(zip([*keys, *cols], row))})
        out += [{**dict(zip(keys, k)), **v} for k, v in self._memory[table].items()]
        return out

    def delete(self, table: str, keys: Iterable[tuple]) -> int:
        """Remove rows of ``table`` by their full keys (as :meth:`rows` gives them, in ``_KEYS`` order)."""
        keys = [tuple(k) for k in keys]
        for k in keys:
            self._memory[table].pop(k, None)
        if self.read_only or not keys:
            return len(keys)
        where = " AND ".join(f"{c} = ?" for c in _KEYS[table])
        with self._connect() as conn:
            conn.executemany(f"DELETE FROM {table} WHERE {where}", keys)
        return len(keys)

    # --- moving tables between clusters ------------------------------------------------------------------------------
    def export(self, path: str | Path, fingerprint_id: str | None = None) -> int:
        """Write the profiles (of one device fingerprint, or all) with their fingerprints to a Parquet file."""
        import pandas as pd

        fps = self.fingerprints()
        rows = [r for r in self.rows("profiles") if fingerprint_id is None or r["fingerprint_id"] == fingerprint_id]
        frame = pd.DataFrame([{"fingerprint_id": r["fingerprint_id"],
                               "fingerprint": json.dumps(fps.get(r["fingerprint_id"], {}), sort_keys=True),
                               "workload_key": r["workload_key"], **{f: r[f] for f in ROW_FIELDS}} for r in rows],
                             columns=["fingerprint_id", "fingerprint", "workload_key", *ROW_FIELDS])
        frame.to_parquet(path, index=False)
        return len(frame)

    def import_file(self, path: str | Path) -> int:
        """Merge a Parquet file written by :meth:`export`; rows for the same (device, workload) are replaced by the
        more recently measured one. Files written before rows carried evidence import with empty evidence."""
        import pandas as pd

        frame = pd.read_parquet(path)
        need = ["fingerprint_id", "fingerprint", "workload_key", *STATS_FIELDS]
        missing = [c for c in need if c not in frame.columns]
        if missing:
            raise ValueError(f"{path} is not an mpq profile export: columns {missing} are missing (need {need})")
        if not frame["median_ms"].map(lambda v: v == v and v > 0).all():
            raise ValueError(f"{path}: a median_ms is not a positive number; refusing to import it")
        for f in EVIDENCE_COLUMNS:
            if f not in frame.columns:
                frame[f] = None
        existing = {}
        for fid in frame["fingerprint_id"].unique():
            keys = frame.loc[frame["fingerprint_id"] == fid, "workload_key"]
            existing.update({(fid, k): v for k, v in self.get(fid, keys).items()})
        newer = [r for r in frame.to_dict("records")
                 if (r["fingerprint_id"], r["workload_key"]) not in existing
                 or str(r["measured_at"]) >= str(existing[(r["fingerprint_id"], r["workload_key"])]["measured_at"])]
        for fid in dict.fromkeys(r["fingerprint_id"] for r in newer):
            group = [{**r, "key": r["workload_key"]} for r in newer if r["fingerprint_id"] == fid]
            self.put(json.loads(group[0]["fingerprint"]), fid, group)
        return len(newer)

    def count(self, fingerprint_id: str | None = None, table: str = "profiles") -> int:
        n = sum(1 for k in self._memory[table] if fingerprint_id is None or k[0] == fingerprint_id)
        with self._reader() as conn:
            if conn is not None:
                q, args = f"SELECT COUNT(*) FROM {table}", ()
                if fingerprint_id is not None:
                    q, args = q + " WHERE fingerprint_id = ?", (fingerprint_id,)
                n += conn.execute(q, args).fetchone()[0]
        return n

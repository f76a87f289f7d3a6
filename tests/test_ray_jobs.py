"""Ray jobs against a `ray start --head` cluster on 127.0.0.1 with token authentication: `ray job submit` of the
demo search, the job API through the example script, and `ray job stop` keeping what was measured."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mpq.workers import ProfileCache

pytestmark = [pytest.mark.ray, pytest.mark.slow]
pytest.importorskip("ray.job_submission")
pytest.importorskip("aiohttp", reason="the job API needs ray[default] (mpq's [cluster] extra)")

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_processes(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head node started as a user would, every port on 127.0.0.1, token auth on; torn down by its own pids
    (``ray stop`` would also stop the test session's other cluster)."""
    if not Path("/proc").exists():
        pytest.skip("tears the cluster down through /proc")
    gcs, dash, *agents = _free_ports(7)
    temp = tempfile.mkdtemp(prefix="mpqrj", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MPQ_CACHE_DIR": str(tmp_path_factory.mktemp("headcache")), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agents[0]}", f"--dashboard-agent-grpc-port={agents[1]}",
           f"--runtime-env-agent-port={agents[2]}", f"--metrics-export-port={agents[3]}",
           f"--ray-client-server-port={agents[4]}", "--num-cpus=2", '--resources={"mpq_device_cpu": 1}',
           "--object-store-memory=100000000", f"--temp-dir={temp}", "--disable-usage-stats"]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        pytest.fail(f"ray start failed:\n{started.stdout}\n{started.stderr}")
    address = f"http://127.0.0.1:{dash}"
    try:
        yield address, env, temp
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _ray_processes(temp):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)


def _job(env, address, *args, timeout=600, check=True):
    proc = subprocess.run([str(BIN / "ray"), "job", *args[:1], "--address", address, *args[1:]], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ray job {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_head_listens_only_on_localhost(head):
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout if _has("ss") else ""
    if "users:" not in out:
        pytest.skip("needs ss showing the processes behind listening sockets")
    pids = {f"pid={p}," for p in _ray_processes(head[2])}
    lines = [ln for ln in out.splitlines() if any(p in ln for p in pids)]
    local = [ln.split()[3] for ln in lines]
    assert len(lines) >= 4 and all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for a in local), \
        "\n".join(lines)


def _has(tool: str) -> bool:
    return any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(os.pathsep))


def test_job_submit_runs_the_demo_search(head, tmp_path):
    address, env, _ = head
    run = tmp_path / "run"
    proc = _job(env, address, "submit", "--working-dir", str(tmp_path), "--", "mpq", "search", "--model",
                "digits-cnn", "--budget", "size=0.3", "--out", str(run), "--repeats", "5", "--frontier-points", "3")
    assert "run directory:" in proc.stdout and "chosen:" in proc.stdout, proc.stdout[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["profile"]["backend"] == "ray" and info["profile"]["workloads"] > 0
    assert (run / "dashboard.html").exists() and (run / "config.json").exists()


def test_job_api_through_the_example_script(head, tmp_path):
    address, env, _ = head
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "ray_job.py"), "--address", address, "--out",
                           str(run), "--", "--model", "digits-cnn", "--budget", "size=0.4", "--repeats", "3",
                           "--frontier-points", "3", "--sensitivity", "entropy"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stderr and str(run) in proc.stderr
    assert (run / "config.json").exists()


def test_job_stop_keeps_finished_measurements(head, tmp_path):
    address, env, _ = head
    db = tmp_path / "profiles.sqlite"
    job_id = f"mpq-stop-{secrets.token_hex(4)}"
    _job(env, address, "submit", "--no-wait", "--submission-id", job_id, "--", "mpq", "-q", "profile", "--model",
         "char-lm", "--cache", str(db), "--repeats", "200")
    deadline, before = time.time() + 300, 0
    while time.time() < deadline and before < 2:
        before = ProfileCache(db).count() if db.exists() else 0
        time.sleep(0.2)
    assert before >= 2, _job(env, address, "logs", job_id, check=False).stdout[-3000:]
    _job(env, address, "stop", job_id, timeout=120)  # SIGTERM, then SIGKILL a few seconds later
    status = _job(env, address, "status", job_id).stdout
    assert "stopped" in status.lower(), status
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert ProfileCache(db).count() >= before  # everything measured before the stop is on disk

"""Ray on a shared machine (issue 21, items 6 and 9): a cluster someone started with ``ray start`` does not break
profiling (mpq starts its own), and fan-outs give up with a clear error instead of restarting or waiting for ever."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mpq.workers import WorkerLostError, WorkerTimeoutError
from mpq.workers.cluster import map_with_shared

pytestmark = pytest.mark.ray


# The functions are defined inside the tests: Ray workers cannot import this test module, so they travel by value.


def test_map_with_shared_stops_restarting_dead_workers(ray_cluster):
    def _die_on(shared, item):
        if item == shared:
            os._exit(1)  # the worker process dies, as a crashed or OOM-killed one does
        return item * 10

    seen = {}
    with pytest.raises(WorkerLostError, match=r"_die_on\): 3 Ray workers died \(at most 2 restarts.*item 1"):
        map_with_shared(_die_on, 1, [0, 1, 2], workers=1, max_restarts=2, on_result=seen.__setitem__)
    assert seen.get(0) == 0  # what finished before was handed on


def test_map_with_shared_restarts_a_worker_that_died_once(ray_cluster, tmp_path):
    flag = tmp_path / "died"

    def die_once(shared, item):
        if item == 1 and not flag.exists():
            flag.touch()
            os._exit(1)
        return item + shared

    assert map_with_shared(die_once, 100, [0, 1, 2], workers=1, max_restarts=1) == [100, 101, 102]


def test_map_with_shared_gives_up_on_an_item_that_hangs(ray_cluster):
    def _hang_on(shared, item):
        if item == shared:
            time.sleep(600)
        return item * 10

    with pytest.raises(WorkerTimeoutError, match=r"_hang_on\): item 1 ran for more than 2 s.*1 of 3 items"):
        map_with_shared(_hang_on, 1, [0, 1, 2], workers=1, item_timeout_s=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_profiling_next_to_a_ray_start_cluster_starts_a_private_one():
    ray_bin = Path(sys.executable).with_name("ray")
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tmp  # this test's `ray start` is found through $RAY_TMPDIR/ray/ray_current_cluster
    port = _free_port()
    log = open(Path(tmp) / "head.log", "w")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", "--node-ip-address=127.0.0.1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        marker = Path(tmp) / "ray" / "ray_current_cluster"
        deadline = time.time() + 600
        while not marker.exists() and head.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert marker.exists(), (Path(tmp) / "head.log").read_text()
        existing = marker.read_text().strip()
        probe = ("import json, ray; from mpq.workers import ensure_ray; ensure_ray(num_cpus=1); "
                 "print(json.dumps({'gcs': ray.get_runtime_context().gcs_address, "
                 "'resources': sorted(ray.cluster_resources())}))")
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        info = json.loads(out.stdout.strip().splitlines()[-1])
        assert info["gcs"] != existing  # not the `ray start` cluster: mpq's own,
        assert "mpq_device_cpu" in info["resources"]  # with mpq's device resources declared
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the `ray start` this test started, and its processes
        try:
            head.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(60)
        log.close()

"""Profiling on a multi-node Ray cluster started on this machine: device kinds stand in as custom resources
(``cpu:a`` on two single-CPU nodes, ``cpu:b`` on one), all bound to 127.0.0.1. Workers and nodes die mid-run."""

import threading
import time

import numpy as np
import pytest
import torch

from mpq.workers import DeviceUnavailableError, ProfileCache, ProfilerPool, Target, profile_workloads
from mpq.workers.profiler import TABLE_COLUMNS
from mpq.workers.workloads import Workload

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ray = pytest.importorskip("ray")

A, B = Target.parse("cpu:a"), Target.parse("cpu:b")
SLOW = dict(threads=1, warmup=1, repeats=25, min_sample_ms=8.0, chunk_size=1, progress=False)


def _workloads(n: int, width: int = 256) -> list[Workload]:
    kernel = f"torch-float@{torch.__version__}"
    return [Workload("linear", (64 + 16 * i, width), True, (32, width), None, "float", kernel) for i in range(n)]


@pytest.fixture(scope="module")
def cluster():
    from mpq.workers.cluster import start_local_cluster

    was_running = ray.is_initialized()
    ray.shutdown()
    c = start_local_cluster([{A.resource: 1}, {A.resource: 1}, {B.resource: 1}])
    c.nodes_a, c.node_b = c.worker_nodes_started[:2], c.worker_nodes_started[2]
    yield c
    ray.shutdown()
    c.shutdown()
    if was_running:  # give the rest of the session its local cluster back
        from mpq.workers import ensure_ray

        ensure_ray(num_cpus=2)


def _node_ids(nodes) -> set[str]:
    return {n.node_id[:8] for n in nodes}


def test_cluster_binds_to_localhost(cluster):
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}


def test_each_kind_runs_only_on_its_nodes_with_the_recorded_threads(cluster, tmp_path):
    store = ProfileCache(tmp_path / "db.sqlite")
    t = profile_workloads(_workloads(4), device="cpu:b", cache=store, **{**SLOW, "repeats": 3})
    assert t.stats["target"] == "cpu:b" and t.stats["workers"] == 1
    assert {k.split("/")[1] for k in t.stats["measured_per_node"]} == _node_ids([cluster.node_b])
    assert set(t.frame["measured_by"].str.split("/").str[1]) == _node_ids([cluster.node_b])
    t = profile_workloads(_workloads(6), device="cpu:a", cache=store, **{**SLOW, "repeats": 3})
    assert t.stats["workers"] == 2
    assert {k.split("/")[1] for k in t.stats["measured_per_node"]} <= _node_ids(cluster.nodes_a)
    with ProfilerPool("cpu:a", threads=1) as pool:
        pool.fingerprint()
        infos = list(pool.ready.values())
    # Ray's OMP_NUM_THREADS, torch's intra-op threads and the fingerprint's thread count agree
    assert infos and all(i["omp_num_threads"] == "1" and i["torch_threads"] == 1 == i["fingerprint"]["threads"]
                         for i in infos)


def test_missing_kind_and_too_many_threads_are_clear_errors(cluster):
    with pytest.raises(DeviceUnavailableError, match=r"'cuda:h100'.*mpq_device_cuda_h100.*cpu_a"):
        profile_workloads(_workloads(1), device="cuda:h100", cache=False, progress=False)
    with pytest.raises(ValueError, match="2 threads needs a node of 'cpu:a' with 2 CPUs"):
        profile_workloads(_workloads(1), device="cpu:a", cache=False, threads=2, progress=False)


def test_search_on_two_kinds_writes_a_frontier_per_device(cluster, tmp_path, digits_task):
    import json

    from mpq import search_devices
    from mpq.dashboards import figures_in

    out = tmp_path / "run"
    results = search_devices(digits_task.model, digits_task.calib, digits_task.eval_fn, devices=["cpu:a", "cpu:b"],
                             out=out, budget="size=0.3", sensitivity="entropy", threads=1, repeats=3,
                             frontier_points=3, progress=False, cache=False)
    assert set(results) == {"cpu:a", "cpu:b"}
    nodes_b = _node_ids([cluster.node_b])
    for name, result in results.items():
        info = json.loads((out / name.replace(":", "-") / "run.json").read_text())
        assert info["target"] == name and info["profile"]["backend"] == "ray"
        measured_on = {k.split("/")[1] for k in info["profile"]["measured_per_node"]}
        assert measured_on and (measured_on == nodes_b) == (name == "cpu:b")
        assert result.summary["latency_measured_ms"].gt(0).all()  # whole models timed on a node of the kind
    frontier = figures_in((out / "dashboard.html").read_text())["frontier"]
    assert "xaxis2" in frontier["layout"]  # one panel per device, side by side
    assert {a["text"].split(" (")[0] for a in frontier["layout"]["annotations"]} == {"cpu:a", "cpu:b"}


def _run_in_thread(**kwargs):
    out: dict = {}

    def run():
        try:
            out["table"] = profile_workloads(**kwargs)
        except Exception as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _wait_for_rows(store: ProfileCache, n: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = store.count()
        if done >= n:
            return done
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} rows were measured in {timeout} s")


def test_actor_killed_mid_profile_is_replaced(cluster, tmp_path):
    store = ProfileCache(tmp_path / "db.sqlite")
    workloads = _workloads(10)
    thread, out = _run_in_thread(workloads=workloads, device="cpu:a", cache=store, **SLOW)
    before = _wait_for_rows(store, 2)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("mpq-profiler-cpu-a-")]
    assert names
    ray.kill(ray.get_actor(names[0], namespace=ray.get_runtime_context().namespace))
    thread.join(300)
    table = out["table"]
    assert len(table) == len(workloads) == store.count() and list(table.frame.columns) == TABLE_COLUMNS
    assert table.stats["actor_restarts"] >= 1 and store.count() >= before
    undisturbed = profile_workloads(workloads, backend="inprocess", cache=False, **SLOW)
    ratio = table.frame.set_index("key")["median_ms"] / undisturbed.frame.set_index("key")["median_ms"]
    assert 0.33 < float(np.exp(np.log(ratio).mean())) < 3.0, ratio.describe()


def test_node_removed_mid_run_moves_its_work_to_the_other_node(cluster, tmp_path):
    store = ProfileCache(tmp_path / "db.sqlite")
    workloads = _workloads(12)
    thread, out = _run_in_thread(workloads=workloads, device="cpu:a", cache=store, **SLOW)
    _wait_for_rows(store, 3)
    gone = cluster.nodes_a.pop()
    cluster.remove_node(gone)
    thread.join(300)
    table = out.get("table")
    assert table is not None, out.get("error")
    assert len(table) == len(workloads) == store.count()
    assert table.stats["actor_restarts"] >= 1
    survivors = {k.split("/")[1] for k in table.stats["measured_per_node"]}
    assert _node_ids(cluster.nodes_a) <= survivors  # the node left standing finished the work


def test_last_node_of_a_kind_removed_stops_with_an_error_naming_it(cluster, tmp_path):
    store = ProfileCache(tmp_path / "db.sqlite")
    workloads = _workloads(12)
    thread, out = _run_in_thread(workloads=workloads, device="cpu:b", cache=store, **SLOW)
    _wait_for_rows(store, 2)
    cluster.remove_node(cluster.node_b)
    thread.join(300)
    assert isinstance(out.get("error"), DeviceUnavailableError), out
    assert "'cpu:b'" in str(out["error"]) and "not measured" in str(out["error"])
    finished = store.count()
    assert 2 <= finished < len(workloads)  # everything finished before the node went is in the database


def test_unreachable_address_is_a_clear_error(monkeypatch):
    from mpq.workers.cluster import _check_reachable

    with pytest.raises(DeviceUnavailableError, match=r"no Ray cluster answers at '127.0.0.1:1'"):
        _check_reachable("127.0.0.1:1")
    with pytest.raises(DeviceUnavailableError, match="job-API"):
        _check_reachable("http://127.0.0.1:8265")


class _FakeRay:
    """``ray.nodes()`` / ``cluster_resources()`` of a cluster that is not there: placement is plain data."""

    def __init__(self, *nodes: dict):
        self._nodes = [{"Alive": True, "Resources": r} for r in nodes]

    def nodes(self):
        return self._nodes

    def cluster_resources(self):
        total: dict = {}
        for n in self._nodes:
            for k, v in n["Resources"].items():
                total[k] = total.get(k, 0) + v
        return total


def test_gpu_placement_is_one_actor_per_gpu_of_the_kind(caplog):
    from mpq.workers.cluster import _placement

    fake = _FakeRay({"CPU": 32, "GPU": 8, "mpq_device_cuda_h100": 8}, {"CPU": 16, "GPU": 2, "mpq_device_cuda_a100": 2},
                    {"CPU": 2, "mpq_device_cpu": 1})
    options, slots = _placement(Target.parse("cuda:h100"), 4, fake)
    assert slots == 8 and options["num_gpus"] == 1 and options["resources"] == {"mpq_device_cuda_h100": 1}
    options, slots = _placement(Target.parse("cuda"), 4, fake)  # no plain "cuda" resource: Ray's GPU count
    assert slots == 10 and options == {"num_gpus": 1, "num_cpus": 1}
    options, slots = _placement(Target.parse("cpu"), 2, fake)
    assert slots == 1 and options["num_cpus"] == 2 and options["resources"] == {"mpq_device_cpu": 1}
    assert options["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    with pytest.raises(DeviceUnavailableError, match="'cuda:l4'.*cuda_a100.*cuda_h100"):
        _placement(Target.parse("cuda:l4"), 1, fake)
    options, slots = _placement(Target.parse("cpu"), 4, _FakeRay({"CPU": 8}, {"CPU": 2}))
    assert slots == 1 and "placed by CPU count alone" in caplog.text  # only one node has 4 CPUs


def test_target_names():
    assert Target.parse("cuda:0") == Target("cuda", "cuda") and Target.parse("CUDA:H100").name == "cuda:h100"
    assert Target.parse("cpu:graviton-3").resource == "mpq_device_cpu_graviton_3"
    assert Target.parse("cuda:h100").slug == "cuda-h100"
    with pytest.raises(ValueError, match="label"):
        Target.parse("cuda:h 100")
    with pytest.raises(ValueError, match="not supported"):
        Target.parse("tpu:v5")

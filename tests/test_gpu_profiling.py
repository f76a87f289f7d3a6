"""Latency profiling on CUDA (marked ``gpu``): CUDA-event timings replayed from CUDA graphs with L2 flushed, a
fallback for what cannot be captured, the profiler's table in eager and graph mode, whole models in the target's
mode and the GPU fingerprint. On CPU: the GPU index mapping and the fingerprint's nvidia-smi fallback."""

import pytest
import torch

from mpq.workers.fingerprint import _physical_index, device_fingerprint


def test_physical_index_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert _physical_index(0) == "3" and _physical_index(1) == "5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _physical_index(1) == "1"


@pytest.mark.gpu
def test_cuda_timing_uses_graphs_and_falls_back():
    from mpq.workers.timing import as_cuda_graph, time_cuda_callable

    a = torch.randn(1024, 1024, device="cuda")
    out = torch.empty_like(a)

    def matmul():
        torch.mm(a, a, out=out)

    replay = as_cuda_graph(matmul)
    assert replay is not None
    out.zero_()
    replay()
    torch.testing.assert_close(out, a @ a)  # the graph computes what the call does
    stats = time_cuda_callable(matmul, repeats=9)
    assert stats.repeats == 9 and stats.inner == 1
    assert 0 < stats.q1_ms <= stats.median_ms <= stats.q3_ms
    # 2 GFLOP cannot take less than 2e9 / 1e15 s on any GPU, nor a second on a working one
    assert 2e-6 < stats.median_ms < 1000

    def syncs():  # .item() synchronizes: not capturable, timed eagerly
        return (a.sum() > 0).item()

    assert as_cuda_graph(syncs) is None
    assert torch.randn(4, device="cuda").shape == (4,)  # the failed capture left the CUDA generator usable
    assert time_cuda_callable(syncs, repeats=5).median_ms > 0


@pytest.mark.gpu
def test_profiler_on_cuda_records_the_gpu():
    from torch import nn

    from mpq.layers import discover_layers
    from mpq.space import build_search_space
    from mpq.workers.profiler import profile_workloads
    from mpq.workers.workloads import workloads_for

    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128)).cuda()
    x = torch.randn(16, 256, device="cuda")
    inventory = discover_layers(model, x)
    space = build_search_space(inventory, "cuda")
    workloads, _ = workloads_for(inventory, space)
    graph = profile_workloads(workloads, "cuda-graph", backend="inprocess", repeats=7, cache=False)
    assert len(graph) == len({w.key for w in workloads}) and (graph.frame["median_ms"] > 0).all()
    # a sample is one replay of many calls over the rotating copies (time_rotating), not one flushed call
    assert (graph.frame["inner"] >= graph.frame["copies"]).all() and graph.mode == "graph"
    assert graph.fingerprint["timing"] == 3
    eager = profile_workloads(workloads, "cuda", backend="inprocess", repeats=7, cache=False)
    assert eager.mode == "eager" and eager.fingerprint_id != graph.fingerprint_id
    assert (eager.frame["median_ms"] > 0).all() and (eager.frame["ref_ms"] > 0).all()
    fp = device_fingerprint("cuda")
    assert graph.fingerprint["name"] == torch.cuda.get_device_name()
    assert fp["sm_count"] == torch.cuda.get_device_properties(0).multi_processor_count
    assert {"driver", "max_sm_mhz", "l2_mib"} <= set(fp)


@pytest.mark.gpu
def test_whole_model_timed_in_the_targets_mode():
    from torch import nn

    from mpq.workers import measure_configs, time_models

    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)]).cuda().eval()
    x = torch.randn(1, 256, device="cuda")
    graph = time_models({"m": model}, x, repeats=9, device="cuda", mode="graph")["m"]
    eager = time_models({"m": model}, x, repeats=9, device="cuda", mode="eager")["m"]
    assert graph.median_ms > 0 and eager.median_ms > 0  # both measured (which is faster is the benchmark's)
    rows = measure_configs(lambda c: model, [{"0": "float"}], x, "cuda-graph", "seq8", cache=False, repeats=5)
    assert rows[0]["median_ms"] > 0 and rows[0]["source"] == "measured"

    def syncs(t):
        return t * (t.sum() > 0).item()

    class Syncing(nn.Module):
        def forward(self, t):
            return syncs(t)

    with pytest.raises(ValueError, match="cannot be captured as a CUDA graph"):
        time_models({"sync": Syncing()}, x, repeats=3, device="cuda", mode="graph")


@pytest.mark.gpu
def test_profiler_on_cuda_through_ray_gpu_actors(ray_cluster):
    """On the GPU machine: the profiler's Ray actors ask for one GPU each and measure there."""
    from torch import nn

    from mpq.layers import discover_layers
    from mpq.space import build_search_space
    from mpq.workers.profiler import profile_workloads
    from mpq.workers.workloads import workloads_for

    assert ray_cluster.cluster_resources().get("GPU", 0) >= 1
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 256)).cuda()
    inventory = discover_layers(model, torch.randn(16, 512, device="cuda"))
    workloads, _ = workloads_for(inventory, build_search_space(inventory, "cuda"))
    table = profile_workloads(workloads, "cuda", backend="ray", repeats=7, chunk_size=2, cache=False)
    assert len(table) == len({w.key for w in workloads}) and (table.frame["median_ms"] > 0).all()
    assert table.stats["tasks"] >= 1 and sum(table.stats["measured_per_node"].values()) == len(table)
    assert table.fingerprint["name"] == torch.cuda.get_device_name()  # read inside the GPU actor

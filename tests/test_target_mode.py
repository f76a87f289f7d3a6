"""The deployment mode in the target: parsed from the device spec, recorded in the fingerprint, and a table or a
whole-model timing of another mode is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpq.errors import ConfigError
from mpq.target import Target
from mpq.workers import ModeMismatchError, measure_configs, profile_workloads
from mpq.workers.profiler import fingerprint_with_threads
from mpq.workers.timing import model_caller, rotation_copies, time_calls, time_workload
from mpq.workers.workloads import Workload

KERNEL = f"torch-float@{torch.__version__}"


@pytest.mark.parametrize("spec, name, mode", [
    ("cpu", "cpu", "eager"), ("cuda", "cuda", "eager"), ("cuda-graph", "cuda", "graph"),
    ("cuda+graph", "cuda", "graph"), ("CUDA:H100+Graph", "cuda:h100", "graph"),
    ("cuda:h100-graph", "cuda:h100", "graph"),
    ("cuda:0+graph", "cuda", "graph"), ("cpu+compile", "cpu", "compile"), ("cuda+eager", "cuda", "eager"),
])
def test_mode_is_parsed_from_the_device_spec(spec, name, mode):
    t = Target.parse(spec)
    assert (t.name, t.mode) == (name, mode)
    assert Target.parse(t.spec) == t  # the spec reads back
    assert t.resource == Target.parse(name).resource  # a node offers a kind in every mode


def test_bad_modes_name_the_value_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"mode 'graph' is not offered on cpu; allowed: eager, compile"):
        Target.parse("cpu+graph")
    with pytest.raises(ConfigError, match=r"mode 'replay'.*allowed: eager, graph, compile"):
        Target.parse("cuda+replay")


def test_spec_and_slug_keep_the_mode():
    assert Target.parse("cuda:h100+graph").spec == "cuda:h100+graph"
    assert Target.parse("cuda:h100+graph").slug == "cuda-h100-graph"
    assert Target.parse("cuda:h100").slug == "cuda-h100" and Target.parse("cuda").spec == "cuda"


def test_fingerprint_records_the_mode_and_timing_method():
    eager = fingerprint_with_threads("cpu", 1, "eager")
    compiled = fingerprint_with_threads("cpu", 1, "compile")
    assert eager["mode"] == "eager" and compiled["mode"] == "compile" and eager["timing"] >= 2
    assert eager["llc_mib"] > 0
    assert {k: v for k, v in eager.items() if k != "mode"} == {k: v for k, v in compiled.items() if k != "mode"}


def test_table_measured_in_another_mode_is_an_error():
    w = Workload("linear", (32, 64), True, (8, 64), None, "float", KERNEL)
    table = profile_workloads([w], "cpu", backend="inprocess", cache=False, threads=1, warmup=1, repeats=3,
                              progress=False)
    assert table.mode == "eager" and table.stats["mode"] == "eager"
    table.require_mode("cpu")
    with pytest.raises(ModeMismatchError, match=r"measured in mode 'eager'.*'cpu\+compile' runs in mode 'compile'"):
        table.require_mode("cpu+compile")
    with pytest.raises(ConfigError):  # a ModeMismatchError is a ConfigError, as callers catch bad settings
        table.require_mode(Target.parse("cuda-graph"))


def test_whole_model_timing_refuses_a_fingerprint_of_another_mode():
    model = nn.Linear(8, 8)
    fp = fingerprint_with_threads("cpu", 1, "eager")
    with pytest.raises(ModeMismatchError, match="mode 'compile'"):
        measure_configs(lambda c: model, [{}], torch.randn(2, 8), "cpu+compile", "m", cache=False, fingerprint=fp)


def test_graph_mode_needs_cuda():
    with pytest.raises(ValueError, match="CUDA-graph timing needs a CUDA device"):
        time_calls([lambda: None], device="cpu", mode="graph")
    with pytest.raises(ValueError, match="timing mode 'replay' not supported"):
        model_caller(nn.Linear(2, 2), torch.randn(1, 2), "replay")


def test_rotation_leaves_weights_as_cold_as_the_model_does():
    mib = 2**20
    assert rotation_copies(4 * mib, 0, 32 * mib) == 1  # no context: one copy
    assert rotation_copies(4 * mib, 16 * mib, 32 * mib) == 4  # the model fits the cache: its footprint
    assert rotation_copies(4 * mib, 1024 * mib, 32 * mib) == 16  # a model beyond the cache: twice the cache
    assert rotation_copies(100 * mib, 1024 * mib, 32 * mib) == 1  # one copy alone overflows it
    assert rotation_copies(1024, 1024 * mib, 32 * mib) == 64  # bounded


def test_time_workload_rotates_over_distinct_copies():
    module = nn.Linear(64, 64)
    seen = set()
    module.register_forward_hook(lambda m, a, o: seen.add(id(m)))
    stats, copies = time_workload(module, torch.randn(4, 64), context_bytes=8 * module.weight.numel() * 4,
                                  warmup=1, repeats=3, min_sample_ms=0.2)
    # deep copies keep the hook: every copy ran
    assert copies == 8 and len(seen) == copies and stats.median_ms > 0  # ceil(8 weights / (weight + bias))

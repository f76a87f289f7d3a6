"""The latency-accuracy benchmark's parts that run without a GPU: its plan for the 7B-shaped CUDA cases (on the
meta device), its configs, its refusal to run CUDA without a GPU, and the BENCHMARKS.md section it feeds."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import latency_accuracy  # noqa: E402
import render  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_run_refuses_cleanly_without_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU; nothing was measured"):
        latency_accuracy.main(["--device", "cuda", "--mode", "cuda-graph"])


def test_gpu_plan_is_decode_and_prefill_of_the_7b_stack():
    cases = list(latency_accuracy.gpu_cases(1, [1, 2048], device="meta"))
    assert [c[0] for c in cases] == ["llama-7b-shaped-1blocks-m1", "llama-7b-shaped-1blocks-m2048"]
    for (_, _, inventory, x), m in zip(cases, (1, 2048)):
        assert x.shape == (1, m)
        shapes = {layer.name: (layer.weight_shape, layer.input_shape) for layer in inventory}
        assert shapes["layers.0.gate_proj"] == ((11008, 4096), (1, m, 4096))
        assert shapes["layers.0.down_proj"] == ((4096, 11008), (1, m, 11008))


def test_configs_cover_frontier_uniform_and_random():
    table = pd.DataFrame([{"layer": l, "option": o, "w_bits": {"float": None, "w8a8": 8, "w4a16g32": 4}[o],
                           "a_bits": None, "group_size": None, "size_mb": s, "bops": 0.0, "latency_ms": t,
                           "score": d}
                          for i, l in enumerate(["a", "b", "c", "d"])
                          for o, s, t, d in (("float", 4.0, 1.0 + i, 0.0), ("w8a8", 1.0, 0.6 + i, 0.01 * (i + 1)),
                                             ("w4a16g32", 0.5, 0.5 + i, 0.1 * (i + 1)))])
    configs = latency_accuracy.make_configs(table, {"size_mb": 0, "bops": 0, "latency_ms": 0.2}, 5, 10)
    names = list(configs)
    assert {"uniform-w8a8", "uniform-w4a16g32", "uniform-float"} <= set(names)
    assert any(n.startswith("frontier-") for n in names) and any(n.startswith("random-") for n in names)
    assert all(set(c) == {"a", "b", "c", "d"} for c in configs.values())
    assert len({tuple(sorted(c.items())) for c in configs.values()}) == len(configs)  # no config twice


def test_render_section_names_every_predictor_and_the_load():
    err = {"median_pct": 3.0, "p90_pct": 9.0, "n": 30}
    result = {"device": {"name": "cpu", "arch": "x86_64", "threads": 1}, "torch": "2", "python": "3.11",
              "date": "today", "command": "python bench/latency_accuracy.py", "target": "cpu", "threads": 1,
              "loadavg_before": [0.1, 0.1, 0.1], "loadavg_after": [0.2, 0.1, 0.1], "wall_seconds": 600,
              "results": [{"phase": "idle", "loadavg_at_start": [0.1], "model": "digits-cnn", "configs": 30,
                           "retest": err, "additive_before": err, "additive_after": err, "selected": "additive",
                           "selected_errors": err, "floor": {"floor_over_best_pct": -1.0},
                           "profiles": {"after": {"untrusted_rows": 0, "rows": 28}}, "untrusted_configs": 0,
                           "heldout": {"additive": err, "table+correction": err}}]}
    text = "\n".join(render.latency_accuracy_section([result]))
    assert "| idle (0.1) | digits-cnn | 30 | 3.0% / 9.0% |" in text and "table+correction 3.0%" in text
    assert "loadavg before [0.1, 0.1, 0.1]" in text

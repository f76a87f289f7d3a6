"""Bad input gets a clear error that names what is wrong and what is allowed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mpq
from mpq.calib import CalibrationSet
from mpq.errors import BudgetError, CalibrationError, ConfigError, NoQuantizableLayersError

QUICK = dict(profile="inprocess", repeats=3, warmup=1, frontier_points=3, progress=False,
             sensitivity_options={"max_probes": 8, "min_probes": 4}, evaluate_frontier=False)


def test_model_without_quantizable_layers():
    model = nn.Sequential(nn.LayerNorm(4), nn.PReLU())
    with pytest.raises(NoQuantizableLayersError) as e:
        mpq.search(model, torch.randn(2, 3, 4), budget="size=0.5", **QUICK)
    assert "Linear, Conv1d, Conv2d, Embedding" in str(e.value) and "LayerNorm" in str(e.value)


def test_budget_below_smallest_reachable(digits_task):
    with pytest.raises(BudgetError) as e:
        mpq.search(digits_task.model, digits_task.calib, budget="size_mb=0.01", **QUICK)
    msg = str(e.value)
    assert "size_mb <= 0.01" in msg and "smallest reachable" in msg
    smallest = e.value.smallest["size_mb"]
    assert 0.05 < smallest < 0.2 and f"{smallest:.6g}" in msg


def test_budget_needed(digits_task):
    with pytest.raises(ConfigError, match="needs a budget"):
        mpq.search(digits_task.model, digits_task.calib, budget={}, **QUICK)


def test_config_naming_missing_layer(digits_task):
    with pytest.raises(ConfigError) as e:
        mpq.apply(copy.deepcopy(digits_task.model), mpq.BitConfig({"conv9": "w8a8"}))
    assert "'conv9'" in str(e.value) and "lacks" in str(e.value) and "conv1" in str(e.value)


def test_config_bits_without_kernel(digits_task):
    with pytest.raises(ConfigError) as e:
        mpq.apply(copy.deepcopy(digits_task.model), mpq.BitConfig({"fc1": "w2a16g32"}))
    msg = str(e.value)
    assert "'fc1'" in msg and "w2a16g32" in msg and "allowed: float, w8a16, w8a8, w4a16g128" in msg


def test_unknown_device(digits_task):
    with pytest.raises(ConfigError, match="device 'tpu' not supported"):
        mpq.apply(copy.deepcopy(digits_task.model), mpq.BitConfig({"fc1": "w8a8"}), device="tpu")


def test_calibration_shape_mismatch(digits_task):
    bad = [(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(CalibrationError) as e:
        mpq.search(digits_task.model, bad, budget="size=0.5", **QUICK)
    msg = str(e.value)
    assert "(8, 3, 8, 8)" in msg and "'conv1'" in msg and "1 channels" in msg


def test_calibration_batches_inconsistent():
    with pytest.raises(CalibrationError) as e:
        CalibrationSet.from_any([torch.randn(4, 8), torch.randn(4, 9)])
    assert "batch 1" in str(e.value) and "(4, 9)" in str(e.value) and "(4, 8)" in str(e.value)


def test_calibration_empty():
    with pytest.raises(CalibrationError, match="empty"):
        CalibrationSet.from_any([])
    with pytest.raises(CalibrationError, match="no calibration data"):
        CalibrationSet.from_any(None)


def test_unknown_estimator_and_solver(digits_task):
    with pytest.raises(ConfigError, match="unknown sensitivity estimator"):
        mpq.search(digits_task.model, digits_task.calib, budget="size=0.5", sensitivity="magic", **QUICK)


def test_pinned_layer_without_kernel(digits_task):
    from mpq.layers import discover_layers
    from mpq.space import build_search_space

    inv = discover_layers(digits_task.model, digits_task.calib[0][0])
    with pytest.raises(ConfigError, match="'fc2' pinned to 'w3a16', which no cpu kernel runs"):
        build_search_space(inv, "cpu", pinned={"fc2": "w3a16"})

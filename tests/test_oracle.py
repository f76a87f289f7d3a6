"""The oracle of bench/search_quality.py: the exact ILP over measured single-layer damage equals brute force over
every config of a 4-layer model (sum of the measured damages, under the same size limit)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mpq.cost_stage import static_costs
from mpq.layers import discover_layers
from mpq.solvers import exhaustive_allocate, ilp_allocate
from mpq.space import build_search_space

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from search_quality import measured_table  # noqa: E402


@pytest.fixture(scope="module")
def four_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 8)).eval()
    x = torch.randn(512, 32)
    labels = (x[:, :8] + 0.5 * x[:, 8:16]).argmax(1)  # a learnable task: the damage of rounding is then a loss
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), labels).backward()
        opt.step()
    model.eval()
    data = [(x[:256], labels[:256]), (x[256:], labels[256:])]
    inv = discover_layers(model, x[:48])
    space = build_search_space(inv, "cpu", allowed=["w2a16sym", "w3a16sym", "w4a16sym", "w8a16"])
    costs = static_costs(inv, space)
    return model, inv, space, costs, measured_table(costs.table, model, data, space, inv)


def test_measured_table_is_real_damage(four_layers):
    _, inv, space, _, table = four_layers
    assert len(inv) == 4 and len(table) == sum(len(space[l]) for l in space.layers)
    t = table.set_index(["layer", "option"])["score"]
    for layer in space.layers:
        assert t[(layer, "float")] == 0
        assert t[(layer, "w2a16sym")] > t[(layer, "w4a16sym")] > 0  # fewer bits, more measured damage


@pytest.mark.parametrize("fraction", [0.12, 0.2, 0.35])
def test_oracle_ilp_matches_brute_force(four_layers, fraction):
    _, _, space, costs, table = four_layers
    limit = costs.fixed["size_mb"] + fraction * table.groupby("layer")["size_mb"].max().sum()
    oracle = ilp_allocate(table, {"size_mb": limit}, costs.fixed)
    rows = {(l, o): (s, c) for l, o, s, c in zip(table["layer"], table["option"], table["score"], table["size_mb"])}
    best = None
    for combo in itertools.product(*[[b.name for b in space[l]] for l in space.layers]):
        pairs = list(zip(space.layers, combo))
        size = sum(rows[p][1] for p in pairs) + costs.fixed["size_mb"]
        if size <= limit + 1e-12:
            damage = sum(rows[p][0] for p in pairs)
            best = damage if best is None else min(best, damage)
    assert best is not None and oracle.score == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert oracle.costs["size_mb"] <= limit + 1e-12
    assert exhaustive_allocate(table, {"size_mb": limit}, costs.fixed).score == pytest.approx(best, abs=1e-12)

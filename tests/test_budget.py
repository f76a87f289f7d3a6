import math

import pytest

from mpq.budget import Budget
from mpq.errors import BudgetError


def test_parse_and_resolve():
    b = Budget.parse("size=0.3, latency_ms=2")
    assert b.size == 0.3 and b.latency_ms == 2 and math.isinf(b.bops)
    lim = b.resolve({"size_mb": 10.0, "bops": 1e9, "latency_ms": 5.0})
    assert lim == {"size_mb": pytest.approx(3.0), "bops": math.inf, "latency_ms": 2.0}


def test_tighter_of_absolute_and_relative_wins():
    lim = Budget(size_mb=1.0, size=0.5, latency=0.6, latency_ms=10).resolve(
        {"size_mb": 4.0, "bops": 1.0, "latency_ms": 10.0})
    assert lim["size_mb"] == 1.0 and lim["latency_ms"] == pytest.approx(6.0)


def test_bops_ratio():
    assert Budget(bops_ratio=0.25).resolve({"size_mb": 1, "bops": 8e9, "latency_ms": 1})["bops"] == 2e9


@pytest.mark.parametrize("text, word", [("size=-1", "positive"), ("speed=2", "unknown budget keys"),
                                        ("size", "not key=value"), ("size=abc", "not a number")])
def test_bad_budgets(text, word):
    with pytest.raises(BudgetError, match=word):
        Budget.parse(text)


def test_str():
    assert str(Budget.parse({"size": 0.3})) == "size=0.3"
    assert Budget().is_unlimited

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


def test_duplicate_keys_are_an_error():
    with pytest.raises(BudgetError, match="'size' given twice"):
        Budget.parse("size=0.3,size=0.5")


def test_phase_budgets():
    b = Budget.parse("latency_ms@1=0.5,latency_ms@64=9,decode=0.6,prefill_ms@2048=40,size=0.3")
    assert str(b) == "size=0.3, latency_ms@1=0.5, latency_ms@64=9, decode=0.6, prefill_ms@2048=40"
    ref = {"size_mb": 10.0, "bops": 1e9, "latency_ms": 5.0, "decode_ms@1": 2.0}
    lim = b.resolve(ref)
    assert lim["latency_ms@1"] == 0.5 and lim["latency_ms@64"] == 9 and lim["prefill_ms@2048"] == 40
    assert lim["decode_ms@1"] == pytest.approx(1.2) and lim["size_mb"] == pytest.approx(3.0)
    assert math.isinf(lim["latency_ms"])
    with pytest.raises(BudgetError, match="sequence length"):
        Budget.parse("prefill=0.5").resolve(ref)
    assert Budget.parse("prefill=0.5").resolve({**ref, "prefill_ms@128": 10.0},
                                               lambda p: p.column(128))["prefill_ms@128"] == 5.0
    with pytest.raises(BudgetError, match="unknown budget keys"):
        Budget.parse("latency_ms@x=1")
    with pytest.raises(BudgetError, match="positive"):
        Budget.parse("latency_ms@1=0")

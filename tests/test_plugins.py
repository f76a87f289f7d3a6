"""Every registered plug-in, tested the moment it registers: solvers honour or refuse every constraint and match
brute force (or at least never beat it) on small tables; kernels' options are real (convert + forward equals
fake-quant on a tiny layer, and the stored bytes are the cost model's); estimators score every (layer, option)
with finite normalised scores and leave the model alone; quantizers give integers in range that reconstruct the
weight. A third-party package's plug-in arrives through its entry point."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import mpq.sensitivity  # noqa: F401  (registers the estimators)
import mpq.solvers  # noqa: F401  (registers the solvers)
from mpq.errors import BudgetError, ConfigError
from mpq.plugins import ESTIMATORS, SOLVERS
from mpq.solvers import CONSTRAINTS, Problem, exhaustive_allocate

# --------------------------------------------------------------------------------------------------------------------
# solvers
# --------------------------------------------------------------------------------------------------------------------
def _bits_damage(configs):
    """A measured damage for ``ilp+refine``: grows with the bits a config gives up (float is 32)."""
    return [sum((32 - (32 if o == "float" else int(o[1:].split("a")[0]))) ** 1.5 for o in c.values()) / 100
            for c in configs]


SOLVER_OPTIONS = {"optuna": {"n_trials": 150, "seed": 1},  # everything else runs with its defaults
                  "ilp+refine": {"damage": _bits_damage, "max_evals": 30}}


def _table(seed: int, layers: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for l in range(layers):
        for o, bits in enumerate((32, 8, 4, 2)):
            rows.append({"layer": f"l{l}", "option": "float" if o == 0 else f"w{bits}a16",
                         "score": 0.0 if o == 0 else float(rng.uniform(0.1, 1) * (32 - bits) ** 1.5 / 100),
                         "aux": float(rng.choice([0.0, 1.0, 2.0])), "size_mb": rng.uniform(0.5, 2) * bits / 32,
                         "bops": 1e9 * bits, "latency_ms": float(rng.uniform(0.1, 1.0))})
    return pd.DataFrame(rows)


def _problem(constraint: str, seed: int) -> Problem:
    """A feasible problem that uses ``constraint`` (and a size limit)."""
    table = _table(seed)
    lo, hi = table.groupby("layer")["size_mb"].min().sum(), table.groupby("layer")["size_mb"].max().sum()
    kw = {"limits": {"size_mb": float(lo + 0.5 * (hi - lo))}}
    if constraint == "caps":
        kw["caps"] = {"aux": float(table.groupby("layer")["aux"].min().sum() + 1.0)}
    elif constraint == "allowed":
        kw["allowed"] = {"l0": ["float", "w8a16"]}
    elif constraint == "pinned":
        kw["pinned"] = {"l1": "w4a16"}
    elif constraint == "min_bits":
        kw["min_bits"] = {"l2": 8}
    elif constraint == "secondary":
        kw.update(secondary="latency_ms", slack=0.05)
    elif constraint == "objective":
        kw["objective"] = {"score": 1.0, "aux": 0.3}
    return Problem(table, **kw)


def _holds(problem: Problem, alloc) -> None:
    """The allocation meets every constraint of the problem."""
    t = problem.table.set_index(["layer", "option"])
    picked = t.loc[list(alloc.choice.items())]
    for col, lim in {**problem.limits, **problem.caps}.items():
        assert picked[col].sum() + problem.fixed.get(col, 0.0) <= lim * (1 + 1e-9) + 1e-12, col
    for layer, opts in problem.allowed.items():
        assert alloc.choice[layer] in opts
    for layer, opt in problem.pinned.items():
        assert alloc.choice[layer] == opt
    for layer, bits in problem.min_bits.items():
        assert alloc.choice[layer] == "float" or int(alloc.choice[layer][1]) >= bits
    assert set(alloc.choice) == set(problem.table["layer"])


def _brute(problem: Problem):
    return exhaustive_allocate(problem.table, problem.limits, problem.fixed, problem.secondary, problem.slack,
                               problem.objective, problem.caps, problem.allowed, problem.pinned, problem.min_bits)


@pytest.mark.parametrize("constraint", CONSTRAINTS)
@pytest.mark.parametrize("name", SOLVERS.names())
def test_solver_honours_or_refuses_every_constraint(name, constraint):
    cls = SOLVERS.get(name)
    solver = cls.create(**SOLVER_OPTIONS.get(name, {}))
    problem = _problem(constraint, seed=len(name) + CONSTRAINTS.index(constraint))
    if constraint not in cls.honours:
        with pytest.raises(ConfigError, match=f"does not honour {constraint}"):
            solver.allocate(problem)
        with pytest.raises(ConfigError, match=f"does not honour {constraint}"):
            cls.check_options({constraint: getattr(problem, constraint)})  # refused before anything runs
        return
    alloc = solver.allocate(problem)
    _holds(problem, alloc)
    brute = _brute(problem)
    objective = problem.objective
    weights = {objective: 1.0} if isinstance(objective, str) else objective
    total = sum(w * problem.table.set_index(["layer", "option"]).loc[list(alloc.choice.items())][c].sum()
                for c, w in weights.items())
    best = brute.stats["optimal_score"] if objective == "score" else _brute(Problem(
        problem.table, problem.limits, objective=objective)).stats["optimal_score"]
    assert total >= best - 1e-9  # nothing beats the exact optimum
    if constraint == "secondary" and cls.exact:  # within slack of the optimum, and the cheapest there
        assert total <= best + problem.slack + 1e-9
        assert alloc.costs["latency_ms"] == pytest.approx(brute.costs["latency_ms"], rel=1e-6)
    elif cls.exact:
        assert total == pytest.approx(best, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", SOLVERS.names())
def test_solver_refuses_unknown_options_and_reports_infeasible(name):
    cls = SOLVERS.get(name)
    with pytest.raises(ConfigError, match="has no option 'no_such_option'"):
        cls.create(no_such_option=1)
    table = _table(0)
    smallest = table.groupby("layer")["size_mb"].min().sum()
    with pytest.raises(BudgetError, match="smallest reachable"):
        cls.create(**SOLVER_OPTIONS.get(name, {})).allocate(Problem(table, {"size_mb": smallest / 2}))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name", [n for n in SOLVERS.names() if SOLVERS.get(n).exact])
def test_exact_solvers_match_brute_force(name, seed):
    problem = _problem("limits", seed=100 + seed)
    alloc = SOLVERS.get(name).create(**SOLVER_OPTIONS.get(name, {})).allocate(problem)
    assert alloc.score == pytest.approx(_brute(problem).score, rel=1e-7, abs=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------------
def _tiny_layers():
    torch.manual_seed(0)
    return {"linear": (nn.Linear(128, 32), torch.randn(3, 128)),
            "conv2d": (nn.Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 6, 6)),
            "conv1d": (nn.Conv1d(8, 16, 3), torch.randn(2, 8, 10)),
            "embedding": (nn.Embedding(50, 64), torch.randint(0, 50, (3, 7)))}


def _kernel_cases():
    from mpq.kernel_registry import kernels_for
    from mpq.layers import discover_layers

    cases = []
    for kernel in kernels_for("cpu"):
        for kind, (module, x) in _tiny_layers().items():
            layer = discover_layers(nn.Sequential(module), x)["0"]
            cases += [(kernel.name, kind, bits.name) for bits in kernel.options(layer)]
    return cases


KERNEL_CASES = _kernel_cases()


@pytest.mark.parametrize("kernel_name, kind, option", KERNEL_CASES,
                         ids=[f"{k}-{kind}-{o}" for k, kind, o in KERNEL_CASES])
def test_kernel_options_are_real(kernel_name, kind, option):
    from mpq.config import LayerBits
    from mpq.costs import layer_size_bytes
    from mpq.fakequant import FakeQuantLayer
    from mpq.kernel_registry import kernels_for
    from mpq.kernels.gemm import state_bytes
    from mpq.layers import discover_layers

    kernel = next(k for k in kernels_for("cpu") if k.name == kernel_name)
    module, x = _tiny_layers()[kind]
    layer = discover_layers(nn.Sequential(module), x)["0"]
    bits = LayerBits.parse(option)
    qmod = kernel.quantize_module(copy.deepcopy(module), layer, bits)
    with torch.no_grad():
        y_kernel, y_fake, y_float = qmod(x), FakeQuantLayer(module, kernel.scheme(bits))(x), module(x)
    assert y_kernel.shape == y_float.shape
    # fake-quant is the kernel's numerics: equal up to accumulation order and a bf16 ulp of the output
    tol = 1e-4 * (1 + y_float.abs()) + 2 * 2.0**-8 * y_fake.abs()
    assert torch.all((y_kernel.float() - y_fake.float()).abs() <= tol), (y_kernel - y_fake).abs().max()
    assert (y_kernel.float() - y_float).abs().max() > 0  # it really ran quantized
    assert state_bytes(qmod) == layer_size_bytes(layer, bits, "cpu")  # the cost table's bytes are apply's


# --------------------------------------------------------------------------------------------------------------------
# estimators
# --------------------------------------------------------------------------------------------------------------------
FAST = {"hessian": {"max_probes": 8, "min_probes": 4}}


@pytest.fixture(scope="module")
def tiny_setup():
    from mpq.calib import CalibrationSet
    from mpq.layers import discover_layers
    from mpq.space import build_search_space

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    calib = CalibrationSet.from_any([(torch.randn(16, 64), torch.randint(0, 10, (16,))) for _ in range(2)])
    inv = discover_layers(model, calib.example)
    return model, calib, inv, build_search_space(inv, "cpu")


@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_estimator_scores_every_option(name, tiny_setup):
    from mpq.plugins import accepted_options
    from mpq.sensitivity import get_estimator

    model, calib, inv, space = tiny_setup
    options = dict(FAST.get(name, {}))
    if "backend" in accepted_options(ESTIMATORS.get(name))[0]:
        options["backend"] = "inprocess"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = get_estimator(name, **options).run(model, calib, space, inv, progress=False)
    s = result.scores
    assert set(zip(s["layer"], s["option"])) == {(l, b.name) for l, b in space.pairs()}
    assert np.isfinite(s["score"]).all() and (s["score"] >= 0).all()
    assert (s.loc[s["option"] == "float", "score"] == 0).all()
    assert s.groupby("layer")["score"].max().sum() == pytest.approx(1.0)  # normalised
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------------------------------
# quantizers
# --------------------------------------------------------------------------------------------------------------------
def _quantizer_names():
    from mpq.quantizers import available_quantizers

    return available_quantizers()


@pytest.mark.parametrize("name", _quantizer_names())
def test_quantizer_gives_integers_in_range(name, tiny_setup):
    from mpq.numerics import WeightQuantSpec
    from mpq.quantizers import get_quantizer

    model, calib, inv, _ = tiny_setup
    quant = get_quantizer(name)
    if quant.needs_calibration:
        quant.prepare(model, calib.inputs(), inv)
    weight = model[0].weight.detach()
    for spec in (WeightQuantSpec(4, True, 32), WeightQuantSpec(4, False, None), WeightQuantSpec(8, True, None)):
        qw = quant.quantize("0", weight, spec)
        assert qw.q.min() >= spec.qmin and qw.q.max() <= spec.qmax
        w = qw.dequantize()
        assert w.shape == weight.shape and torch.isfinite(w).all()
        rel = float((w - weight).norm() / weight.norm())
        assert 0 < rel < (0.05 if spec.bits == 8 else 0.3), (spec, rel)
        assert torch.equal(quant.quantize("0", weight, spec).q, qw.q)  # deterministic (and cached)


# --------------------------------------------------------------------------------------------------------------------
# third-party plug-ins through entry points
# --------------------------------------------------------------------------------------------------------------------
def test_a_third_party_solver_arrives_through_its_entry_point(tmp_path):
    pkg = tmp_path / "thirdparty_mpq_solver"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from mpq.solvers import Solver, register_solver
        from mpq.solvers.greedy import greedy_allocate

        @register_solver
        class CheapestSolver(Solver):
            name = "cheapest"
            def solve(self, p):
                return greedy_allocate(p.table, p.limits, p.fixed)
    '''))
    info = tmp_path / "thirdparty_mpq_solver-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-mpq-solver\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mpq.solvers]\ncheapest = thirdparty_mpq_solver\n")
    code = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import pandas as pd
        from mpq.options import SolveOptions
        from mpq.solvers import get_solver, available_solvers
        table = pd.DataFrame([{{"layer": "a", "option": "x", "score": 1.0, "size_mb": 1.0}},
                              {{"layer": "a", "option": "y", "score": 0.0, "size_mb": 3.0}}])
        print("cheapest" in available_solvers(), dict(get_solver("cheapest")(table, {{"size_mb": 2}}).choice))
        try:
            SolveOptions(solver="cheapest", solver_options={{"caps": {{"score": 1}}}})
        except ValueError as e:
            print(type(e).__name__, "does not honour caps" in str(e))
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "True {'a': 'x'}" and out[1] == "ConfigError True"


def test_the_example_solver_plugin():
    """examples/custom_solver.py: a Solver subclass, registered, usable by name, refusing what it does not honour."""
    import importlib.util
    from pathlib import Path

    from mpq.solvers import get_solver

    path = Path(__file__).resolve().parent.parent / "examples" / "custom_solver.py"
    spec = importlib.util.spec_from_file_location("mpq_example_custom_solver", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        table = _table(5)
        limit = float(table.groupby("layer")["size_mb"].mean().sum())
        alloc = get_solver("smallest_first")(table, {"size_mb": limit})
        assert alloc.costs["size_mb"] <= limit and alloc.score >= _brute(Problem(table, {"size_mb": limit})).score
        with pytest.raises(ConfigError, match="does not honour caps"):
            get_solver("smallest_first")(table, {"size_mb": limit}, caps={"aux": 1.0})
    finally:
        SOLVERS.remove("smallest_first")

"""The walls: ``import mpq``, ``mpq --help`` and ``mpq dashboard`` stay light (no torch, no Ray, no CUDA); the core
imports no stage, a stage imports no other stage (and not the face), and no package's modules import each other in
a loop. Imports are read from the source with ``ast`` (function-level imports included), so a lazy import does not
hide a dependency."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mpq": ROOT / "mpq", "mpq.models": ROOT / "mpq" / "models", "mpq.sensitivity": ROOT / "sensitivity",
            "mpq.solvers": ROOT / "solvers", "mpq.workers": ROOT / "workers", "mpq.kernels": ROOT / "kernels",
            "mpq.dashboards": ROOT / "dashboards"}
STAGES = ("mpq.sensitivity", "mpq.solvers", "mpq.workers", "mpq.kernels", "mpq.dashboards")
# The face: the only modules that reach into the stages.
FACE = {"mpq.api", "mpq.cli", "mpq.cli_search", "mpq.cli_commands", "mpq.studies", "mpq.study_run",
        "mpq.study_record", "mpq.study_result", "mpq.cost_stage", "mpq.sensitivity_stage",
        "mpq.evaluate_stage", "mpq.study_verify"}
# Import loops that exist and are owned elsewhere, each with what removes it. A new loop fails the test.
KNOWN_CYCLES = {
    frozenset({"mpq.costs", "mpq.kernel_registry", "mpq.space"}):
        "bits: Kernel.weight_bytes (kernel_registry) imports mpq.costs.packed_weight_bytes, and costs imports "
        "kernel_registry and space; moving packed_weight_bytes to mpq.numerics breaks the loop",
    frozenset({"mpq.workers.cluster", "mpq.workers.profiler"}):
        "workers: the profiler pool (cluster) and profile_workloads (profiler) import each other",
}


def _run(code: str, cwd=None) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cwd).stdout


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.glob("*.py"):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The mpq modules ``path`` imports anywhere in its body (``from X import y`` counts X, and X.y if a module)."""
    found = set()
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}
# A package's __init__ only re-exports its modules: edges through it are not loops of substance.
LOOP_GRAPH = {m: {d for d in deps if d not in PACKAGES} for m, deps in GRAPH.items() if m not in PACKAGES}


def _stage_of(module: str) -> str | None:
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


def test_core_imports_no_stage():
    bad = sorted((m, dep) for m, deps in GRAPH.items() if _stage_of(m) is None and m not in FACE
                 for dep in deps if _stage_of(dep) is not None)
    assert not bad, f"core modules importing stages (only the face may): {bad}"


def test_stages_import_no_other_stage_and_not_the_face():
    bad = sorted((m, dep) for m, deps in GRAPH.items() if _stage_of(m) is not None
                 for dep in deps if (_stage_of(dep) not in (None, _stage_of(m))) or dep in FACE)
    assert not bad, f"stage modules importing another stage or the face: {bad}"


def _cycles() -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in LOOP_GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(LOOP_GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_loops():
    new = [sorted(c) for c in _cycles() if c not in KNOWN_CYCLES]
    assert not new, f"modules importing each other in a loop: {new}"


def test_the_wall_checks_see_lazy_imports():
    """The graph holds imports made inside functions (the kind that hid the old walls' breaches)."""
    assert "mpq.workers" in GRAPH["mpq.cost_stage"]  # imported inside measure_latency
    assert "mpq.sensitivity" in GRAPH["mpq.sensitivity_stage"]


def test_import_mpq_is_light():
    out = _run("import sys, mpq; print(sorted(m for m in sys.modules if m.split('.')[0] in "
               "('torch', 'ray', 'pulp', 'plotly')) or 'none'); "
               "print(sorted(m for m in sys.modules if m.startswith('mpq.')))")
    first, second = out.splitlines()
    assert first == "none"
    for stage in STAGES:
        assert stage not in second


def test_api_import_does_not_touch_ray_or_cuda():
    out = _run("import sys, mpq; mpq.search; mpq.study; import torch; "
               "print('ray' in sys.modules, torch.cuda.is_initialized())")
    assert out.split() == ["False", "False"]


def test_public_names_are_not_shadowed_by_modules():
    """``mpq.study`` (the function) stays the function whatever was imported first."""
    out = _run("import mpq.api, mpq.studies, mpq.study_result, mpq.study_run, mpq\n"
               "print(type(mpq.study).__name__, type(mpq.search).__name__, type(mpq.load_study).__name__)")
    assert out.split() == ["function", "function", "function"]


def test_mpq_help_imports_no_torch_ray_or_cuda():
    out = _run("import sys\nfrom mpq.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
               "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'pulp', 'triton'}) or "
               "'none')")
    assert out.strip().splitlines()[-1] == "none"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real run directory of a tiny model (entropy scores and in-process profiling: seconds)."""
    import torch
    from torch import nn

    import mpq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    out = tmp_path_factory.mktemp("tiny") / "run"
    mpq.search(model, [torch.randn(8, 32)], budget="size=0.5", out=out, sensitivity="entropy", profile="inprocess",
               repeats=2, warmup=1, frontier_points=3, progress=False)
    return out


def test_mpq_dashboard_imports_no_torch_ray_or_cuda(tiny_run, tmp_path):
    page = tmp_path / "d.html"
    out = _run(f"import sys\nfrom mpq.cli import main\nmain(['dashboard', {str(tiny_run)!r}, '--out', "
               f"{str(page)!r}])\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'ray', "
               f"'triton'}}) or 'none')")
    assert out.strip().splitlines()[-1] == "none"
    assert page.stat().st_size > 1_000_000


def test_namespace_packages(tmp_path):
    """The stage folders install under mpq.*; no generic top-level name of ours lands in site-packages (a top-level
    ``kernels`` may be Hugging Face's distribution, which transformers >= 5.25 requires: never the checkout's)."""
    names = ("kernels", "solvers", "workers", "sensitivity", "dashboards")
    code = ("import mpq.sensitivity, mpq.solvers, mpq.workers, mpq.kernels, mpq.dashboards; "
            "import importlib.util as u; from pathlib import Path; "
            f"root = Path({str(ROOT)!r}); "
            f"ours = lambda s, n: s.origin and Path(s.origin).read_bytes() == (root / n / '__init__.py').read_bytes(); "
            f"print(*[(s := u.find_spec(n)) is None or not ours(s, n) for n in {names!r}])")
    assert _run(code, cwd=tmp_path).split() == ["True"] * 5


def test_a_checkout_root_on_sys_path_does_not_shadow_the_kernels_distribution(tmp_path):
    """From the repository root ``python -c``/``-m`` puts the checkout first on sys.path, where its ``kernels/`` folder
    (mpq.kernels) would shadow Hugging Face's ``kernels`` package that transformers imports at startup (CI broke on
    it): the top-level name must reach the installed distribution, and mpq.kernels stay itself."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("ORIGIN = 'installed'\n")
    (fake / "layers.py").write_text("NAME = 'installed.layers'\n")
    code = ("import kernels, kernels.layers, mpq.kernels; "
            "print(kernels.ORIGIN, kernels.layers.NAME, mpq.kernels.QuantGemm.__name__)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["installed", "installed.layers", "QuantGemm"]


def test_without_a_kernels_distribution_the_top_level_name_is_an_empty_namespace():
    """What the folder would be without ``__init__.py``: importable, empty, and read by transformers as absent."""
    import importlib.machinery

    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    if importlib.machinery.PathFinder.find_spec("kernels", elsewhere) is not None:
        pytest.skip("a kernels distribution is installed here")
    code = ("import importlib.util, kernels\n"
            "print(kernels.__file__, importlib.util.find_spec('kernels') is not None)\n"
            "try:\n    from kernels import QuantGemm\nexcept ImportError:\n    print('no-names')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "True", "no-names"]
    if importlib.util.find_spec("transformers") is not None:
        probe = "from transformers.utils import is_kernels_available; print(is_kernels_available())"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == "False"

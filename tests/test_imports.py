"""``import mpq`` stays light: no torch, no Ray, no stage packages until asked."""

import subprocess
import sys


def _run(code: str, cwd=None) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cwd).stdout


def test_import_mpq_is_light():
    out = _run("import sys, mpq; print(sorted(m for m in sys.modules if m.split('.')[0] in "
               "('torch', 'ray', 'pulp', 'plotly')) or 'none'); "
               "print(sorted(m for m in sys.modules if m.startswith('mpq.')))")
    first, second = out.splitlines()
    assert first == "none"
    for stage in ("mpq.sensitivity", "mpq.solvers", "mpq.workers", "mpq.kernels", "mpq.dashboards"):
        assert stage not in second


def test_api_import_does_not_touch_ray_or_cuda():
    out = _run("import sys, mpq; mpq.search; import torch; "
               "print('ray' in sys.modules, torch.cuda.is_initialized())")
    assert out.split() == ["False", "False"]


def test_namespace_packages(tmp_path):
    """The stage folders install under mpq.*; no generic top-level name lands in site-packages."""
    out = _run("import mpq.sensitivity, mpq.solvers, mpq.workers, mpq.kernels, mpq.dashboards; "
               "import importlib.util as u; print(u.find_spec('kernels') is None, u.find_spec('solvers') is None)",
               cwd=tmp_path)
    assert out.split() == ["True", "True"]

"""Just-in-time builds of mpq's CPU extensions (``kernels/csrc/cpu_*.cpp``) with ``torch.utils.cpp_extension``.

A build is cached in ``$MPQ_CACHE_DIR/kernels/<name>-<key>`` (default ``~/.cache/mpq``); the key hashes the
sources, the flags, the torch version and the compiler's own version line, so a change in any of them builds anew
and nothing stale is loaded. The code is compiled for the baseline x86-64 (or whatever the machine is) with the
AVX2 and AVX-512 functions marked by target attributes, so one build runs on any CPU of the architecture and picks
its path at run time. A machine without a compiler or ninja, or a failed build, makes the extension unavailable:
one warning says why, and the kernels that need it are not offered.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from mpq.errors import KernelUnavailableError

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
CXX_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-DNDEBUG"]  # no contraction: sums as the code writes them


def compiler() -> str:
    """The C++ compiler: ``$MPQ_CXX`` where set, else ``c++`` on PATH (as the CUDA builds use), else ``$CXX``."""
    return os.environ.get("MPQ_CXX") or shutil.which("c++") or os.environ.get("CXX") or "c++"


@functools.lru_cache(maxsize=None)
def compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailableError(f"no working C++ compiler ({cxx!r}: {e}); install g++ (or set MPQ_CXX) to "
                                     f"build mpq's CPU kernels") from None
    return out.splitlines()[0] if out else cxx


def _ninja_on_path() -> None:
    """torch builds with ninja and looks for it on PATH; the ``ninja`` wheel puts it beside the interpreter (not on
    PATH when a virtualenv is used without being activated)."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for d in candidates:
        if (d / "ninja").exists():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return
    raise KernelUnavailableError("building mpq's CPU kernels needs ninja: pip install ninja")


def build_key(sources: list[Path], cxx: str) -> str:
    h = hashlib.sha256()
    for src in sources:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    h.update(" ".join([torch.__version__, *CXX_FLAGS, compiler_version(cxx)]).encode())
    return h.hexdigest()[:16]


_FAILED: dict[str, str] = {}


@functools.lru_cache(maxsize=None)
def load_cpu_extension(name: str, stem: str) -> str:
    """Build (once per key) and load ``kernels/csrc/<stem>*.cpp``, which registers its ops with ``TORCH_LIBRARY``;
    returns the build directory. Raises :class:`KernelUnavailableError` (the same one on every later call) if it
    cannot be built."""
    from torch.utils.cpp_extension import load

    from mpq.paths import default_cache_dir

    if name in _FAILED:
        raise KernelUnavailableError(_FAILED[name])
    sources = sorted(CSRC.glob(f"{stem}*.cpp"))
    cxx = compiler()
    try:
        key = build_key(sources, cxx)
    except KernelUnavailableError as e:
        _FAILED[name] = str(e)
        raise
    build_dir = default_cache_dir() / "kernels" / f"{name}-{key}"
    built = build_dir / f"{name}_{key}.so"
    if built.exists():  # the key covers sources, flags, torch and the compiler: nothing stale can match
        torch.ops.load_library(str(built))
        return str(build_dir)
    saved = os.environ.get("CXX")
    try:
        _ninja_on_path()
        build_dir.mkdir(parents=True, exist_ok=True)
        log.info("building mpq's CPU kernels %s (%s) in %s: once per machine, about a minute", name, key, build_dir)
        os.environ["CXX"] = cxx
        load(name=f"{name}_{key}", sources=[str(s) for s in sources], extra_cflags=CXX_FLAGS,
             build_directory=str(build_dir), is_python_module=False, verbose=log.isEnabledFor(logging.DEBUG))
    except (RuntimeError, OSError, subprocess.SubprocessError, KernelUnavailableError) as e:
        _FAILED[name] = f"building the CPU extension {name} in {build_dir} failed: {str(e).splitlines()[-1]}"
        raise KernelUnavailableError(_FAILED[name]) from e
    finally:
        if saved is None:
            os.environ.pop("CXX", None)
        else:
            os.environ["CXX"] = saved
    return str(build_dir)

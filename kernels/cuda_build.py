"""Just-in-time builds of mpq's CUDA extensions (CUTLASS kernels) with ``torch.utils.cpp_extension``.

CUTLASS comes from the ``nvidia-cutlass`` wheel (``pip install "mpq[gpu]"``), which ships its C++ headers under
``cutlass_library/source/include``; nothing of CUTLASS is copied into mpq. A build is cached in
``$MPQ_CACHE_DIR/kernels/<name>-<key>`` (default ``~/.cache/mpq``), the key hashing the sources, the GPU
architecture, the torch and CUDA versions, the CUTLASS version, the flags and the host compilers, so a change in any
of them rebuilds and nothing stale is loaded. Errors say what is missing (nvcc, the headers, a Hopper GPU) and how to
get it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from mpq.errors import KernelUnavailableError

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
CUTLASS_VERSION = "4.2.0.0"  # the pinned nvidia-cutlass wheel (the [gpu] extra)
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "--expt-extended-lambda", "-DNDEBUG",
              "-DCUTLASS_ENABLE_TENSOR_CORE_MMA=1"]


def cutlass_include_dirs() -> list[Path]:
    """The CUTLASS/CuTe include directories of the installed ``nvidia-cutlass`` wheel."""
    try:
        import cutlass_library
    except ImportError:
        raise KernelUnavailableError("the CUTLASS kernels need the nvidia-cutlass wheel's headers: "
                                     f"pip install 'mpq[gpu]' (nvidia-cutlass=={CUTLASS_VERSION})") from None
    source = Path(cutlass_library.__file__).parent / "source"
    dirs = [source / "include", source / "tools" / "util" / "include"]
    if not (dirs[0] / "cute" / "tensor.hpp").exists():
        raise KernelUnavailableError(f"{dirs[0]} has no cute/tensor.hpp: this nvidia-cutlass wheel ships no C++ "
                                     f"headers; install nvidia-cutlass=={CUTLASS_VERSION}")
    return dirs


def nvcc_path() -> Path:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
    if nvcc.exists():
        return nvcc
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    raise KernelUnavailableError("building the CUTLASS kernels needs nvcc (the CUDA toolkit matching torch's CUDA "
                                 f"{torch.version.cuda}); set CUDA_HOME or put nvcc on PATH")


def host_compilers() -> tuple[str, str]:
    """The C and C++ compilers for nvcc's host code and the link: ``$MPQ_CC`` / ``$MPQ_CXX`` where set, else the
    ``cc`` / ``c++`` on PATH, deliberately not ``$CC`` / ``$CXX`` (what torch would take). On the H100 machine
    ``$CXX`` named a wrapper (``/opt/gcc/bin/g++``) whose builds crashed the process (segmentation fault) whenever an
    op raised an error, the error never reaching Python; ``c++``, the same GCC 13.3 that built torch, works."""
    cc = os.environ.get("MPQ_CC") or shutil.which("cc") or os.environ.get("CC") or "cc"
    cxx = os.environ.get("MPQ_CXX") or shutil.which("c++") or os.environ.get("CXX") or "c++"
    return cc, cxx


def _arch() -> str:
    if not torch.cuda.is_available():
        raise KernelUnavailableError("the CUTLASS kernels need a CUDA GPU; this machine has none")
    major, minor = torch.cuda.get_device_capability()
    # wgmma kernels built for plain sm_90 trap at run time: Hopper builds are sm_90a
    return f"{major}{minor}a" if (major, minor) == (9, 0) else f"{major}{minor}"


def included_headers(sources: list[Path]) -> list[Path]:
    """The ``kernels/csrc`` headers that ``sources`` include (``#include "..."``), directly or through each other:
    what a build depends on besides its sources (a change in another extension's header rebuilds nothing here)."""
    seen: dict[Path, None] = {}
    todo = list(sources)
    while todo:
        for name in re.findall(r'^\s*#include\s+"([^"]+)"', todo.pop().read_text(), flags=re.M):
            header = CSRC / name
            if header.exists() and header not in seen:
                seen[header] = None
                todo.append(header)
    return sorted(seen)


def build_key(sources: list[Path], arch: str) -> str:
    h = hashlib.sha256()
    for src in sources:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    h.update(" ".join([arch, torch.__version__, str(torch.version.cuda), CUTLASS_VERSION, *NVCC_FLAGS,
                       *host_compilers()]).encode())
    return h.hexdigest()[:16]


_FAILED: dict[str, str] = {}  # extension name -> why its build failed in this process


@functools.lru_cache(maxsize=None)
def load_extension(name: str, stem: str, cutlass: bool = True) -> str:
    """Build (once per key) and load the extension made of ``kernels/csrc/<stem>*.cu`` (one translation unit per
    kernel configuration, compiled in parallel; the ``*.cuh`` headers they include count towards the key), which
    registers its ops with ``TORCH_LIBRARY``; returns the build directory. ``cutlass=False``: the sources use no
    CUTLASS, so the build needs only nvcc (not the nvidia-cutlass wheel)."""
    from torch.utils.cpp_extension import load

    from mpq.paths import default_cache_dir

    if name in _FAILED:
        raise KernelUnavailableError(_FAILED[name])
    arch = _arch()
    sources = sorted(CSRC.glob(f"{stem}*.cu"))
    key = build_key([*sources, *included_headers(sources)], arch)
    build_dir = default_cache_dir() / "kernels" / f"{name}-{key}"
    built = build_dir / f"{name}_{key}.so"
    if built.exists():  # the key covers sources, arch, torch, CUDA, CUTLASS and flags: nothing stale can match
        torch.ops.load_library(str(built))
        return str(build_dir)
    include = cutlass_include_dirs() if cutlass else []
    nvcc_path()
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("loading %s (%s, sm_%s) from %s; a first build takes a few minutes", name, key, arch, build_dir)
    flags = [*NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    # TORCH_CUDA_ARCH_LIST keeps torch from adding its own -gencode list; CC/CXX: see host_compilers
    cc, cxx = host_compilers()
    saved = {var: os.environ.get(var) for var in ("TORCH_CUDA_ARCH_LIST", "CC", "CXX")}
    os.environ.update(TORCH_CUDA_ARCH_LIST=f"{arch[0]}.{arch[1:]}", CC=cc, CXX=cxx)
    try:
        load(name=f"{name}_{key}", sources=[str(s) for s in sources], extra_cuda_cflags=flags,
             extra_include_paths=[str(d) for d in include], build_directory=str(build_dir),
             is_python_module=False, verbose=log.isEnabledFor(logging.DEBUG))
    except (RuntimeError, OSError) as e:
        # torch would not rebuild in this process (it records the sources as built), so a retry could only fail
        # later and less clearly: every later use gets this error at once
        _FAILED[name] = f"building the CUDA extension {name} in {build_dir} failed: {e}"
        raise KernelUnavailableError(_FAILED[name]) from e
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    return str(build_dir)


@functools.lru_cache(maxsize=1)
def pdl_enabled() -> bool:
    """Whether mpq's decode kernels launch with programmatic dependent launch: on sm_90 and newer, unless
    ``MPQ_PDL=0``. Such a kernel streams its weights (which no earlier kernel writes) while the previous kernel in
    the stream finishes, and waits for it only before reading its activations."""
    return (os.environ.get("MPQ_PDL", "1") != "0" and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= (9, 0))

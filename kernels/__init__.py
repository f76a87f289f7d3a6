"""Quantized kernels, registered per device. Importing this package registers the kernels this machine can load.

CPU kernels are PyTorch's own integer kernels (fbgemm dynamic INT8 GEMM, ``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``, fbgemm's row-wise embedding tables) and mpq's own low-bit GEMM and embedding
(``cpu_lowbit``: 2-8-bit weights, built just in time). CUDA kernels are added by the GPU work (CUTLASS) and register
only where CUDA is present, so this package imports cleanly on a machine without a GPU.
"""

import sys

if __name__ != "mpq.kernels":
    # This folder is ``mpq.kernels``. It is imported as a top-level ``kernels`` only when a checkout's root is on
    # sys.path (``python -m ...`` or ``python -c`` from the repository root), where it would shadow Hugging Face's
    # ``kernels`` distribution that transformers >= 5.25 imports at startup. Hand that import to the installed package.
    import importlib.machinery
    import importlib.util
    import os

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        # No such distribution: be what this folder would be without __init__.py, an empty namespace package
        # (transformers reads one without a version or file as "not installed"; ``from kernels import X`` fails).
        _spec = importlib.machinery.ModuleSpec(__name__, None, is_package=True)
        _spec.submodule_search_locations = []
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds after this file runs
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
else:
    from mpq.kernels import cpu, cpu_lowbit, cuda_fp8, cutlass_w4a16, cutlass_w8a8, embedding  # noqa: F401  (registers)
    from mpq.kernels import cuda_lowbit  # noqa: F401  (registers the GPU low-bit weight kernels)
    from mpq.kernels.gemm import QuantGemm

    __all__ = ["QuantGemm", "cpu", "cpu_lowbit", "cuda_lowbit", "cuda_fp8", "cutlass_w4a16", "cutlass_w8a8", "embedding"]

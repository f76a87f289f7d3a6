"""Quantized kernels, registered per device. Importing this package registers the kernels this machine can load.

CPU kernels are PyTorch's own integer kernels (fbgemm dynamic INT8 GEMM, ``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``, fbgemm's row-wise embedding tables) and mpq's own low-bit GEMM and embedding
(``cpu_lowbit``: 2-8-bit weights, built just in time). CUDA kernels are added by the GPU work (CUTLASS) and register
only where CUDA is present, so this package imports cleanly on a machine without a GPU.
"""

from mpq.kernels import cpu, cpu_lowbit, cuda_fp8, cutlass_w4a16, cutlass_w8a8, embedding  # noqa: F401  (registers)
from mpq.kernels import cuda_lowbit  # noqa: F401  (registers the GPU low-bit weight kernels)
from mpq.kernels.gemm import QuantGemm

__all__ = ["QuantGemm", "cpu", "cpu_lowbit", "cuda_lowbit", "cuda_fp8", "cutlass_w4a16", "cutlass_w8a8", "embedding"]

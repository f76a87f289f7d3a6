// Shared by mpq's Hopper kernels (w8a8_sm90*, w4a16_sm90*).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace mpq {

// The SM count of a device: CUTLASS's persistent and stream-K schedulers size their grids by it.
inline int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

}  // namespace mpq

// W4A16 tile configuration 5: decode, shuffled weights: 128 x 16 x 64 tiles with stream-K (any group).
#include "w4a16_sm90.cuh"

namespace mpq {
MPQ_W4A16_DEFINE(5, Shape<_128, _16, _64>, cutlass::gemm::StreamKScheduler, true)
}  // namespace mpq

// W4A16 tile configuration 1: decode: 128 x 16 x 64 tiles with stream-K (any group).
#include "w4a16_sm90.cuh"

namespace mpq {
MPQ_W4A16_DEFINE(1, Shape<_128, _16, _64>, cutlass::gemm::StreamKScheduler)
}  // namespace mpq

// W4A16 tile configuration 4: decode, group 128, shuffled weights: 128 x 16 x 128 tiles with stream-K.
#include "w4a16_sm90.cuh"

namespace mpq {
MPQ_W4A16_DEFINE(4, Shape<_128, _16, _128>, cutlass::gemm::StreamKScheduler, true)
}  // namespace mpq

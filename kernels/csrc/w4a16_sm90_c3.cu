// W4A16 tile configuration 3: decode, group 128: 128 x 16 x 128 tiles with stream-K (longer TMA copies per stage).
#include "w4a16_sm90.cuh"

namespace mpq {
MPQ_W4A16_DEFINE(3, Shape<_128, _16, _128>, cutlass::gemm::StreamKScheduler)
}  // namespace mpq

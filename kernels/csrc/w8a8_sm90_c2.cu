// W8A8 tile configuration 2: mid sizes: 64 x 128 tiles, ping-pong, a 2-CTA cluster along N (64 < m <= 128).
#include "w8a8_sm90.cuh"

namespace mpq {
MPQ_W8A8_DEFINE(2, Shape<_64, _128, _128>, Shape<_1, _2, _1>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                cutlass::epilogue::TmaWarpSpecialized)
}  // namespace mpq

// W8A8 tile configuration 4: prefill sizes: 128 x 128 tiles, ping-pong (one warpgroup's epilogue overlaps the
// other's MMAs), 2-CTA cluster.
#include "w8a8_sm90.cuh"

namespace mpq {
MPQ_W8A8_DEFINE(4, Shape<_128, _128, _128>, Shape<_2, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                cutlass::epilogue::TmaWarpSpecialized)
}  // namespace mpq

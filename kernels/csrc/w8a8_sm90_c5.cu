// W8A8 tile configuration 5: decode sizes: 128 x 64 tiles, cooperative with stream-K, so that few output tiles
// still fill every SM.
#include "w8a8_sm90.cuh"

namespace mpq {
MPQ_W8A8_DEFINE(5, Shape<_128, _64, _256>, Shape<_1, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler)
}  // namespace mpq

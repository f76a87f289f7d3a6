// W8A8 tile configuration 3: prefill sizes: 128 x 128 tiles, cooperative, a 2-CTA cluster along M.
#include "w8a8_sm90.cuh"

namespace mpq {
MPQ_W8A8_DEFINE(3, Shape<_128, _128, _128>, Shape<_2, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                cutlass::epilogue::TmaWarpSpecializedCooperative)
}  // namespace mpq

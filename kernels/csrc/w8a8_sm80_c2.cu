// W8A8 sm_80 tile configuration 2: prefill sizes: 128 x 128 x 64 blocks of 4 warps (64 x 64), 5 stages.
#include "w8a8_sm80.cuh"

namespace mpq {
MPQ_W8A8_SM80_DEFINE(2, cutlass::gemm::GemmShape<128, 128, 64>, cutlass::gemm::GemmShape<64, 64, 64>, 5)
}  // namespace mpq

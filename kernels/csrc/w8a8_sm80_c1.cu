// W8A8 sm_80 tile configuration 1: decode and mid sizes (m <= 64): 64 x 128 x 128 blocks of 4 warps (64 x 32).
#include "w8a8_sm80.cuh"

namespace mpq {
MPQ_W8A8_SM80_DEFINE(1, cutlass::gemm::GemmShape<64, 128, 128>, cutlass::gemm::GemmShape<64, 32, 128>, 4)
}  // namespace mpq

// W8A8 tile configuration 1: decode sizes: 64-row tiles, two warpgroups ping-ponging (m <= 64).
#include "w8a8_sm90.cuh"

namespace mpq {
MPQ_W8A8_DEFINE(1, Shape<_64, _64, _256>, Shape<_1, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                cutlass::epilogue::TmaWarpSpecialized)
}  // namespace mpq

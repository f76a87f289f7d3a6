// The 4-bit decode kernels with per-channel scales (one translation unit per bit width and group, built in parallel).
#include "wq_decode.cuh"

namespace mpq {
namespace wq {
template cudaError_t launch_decode<4, 0>(const DecodeArgs&, int);
template cudaError_t launch_dequant<4>(const DecodeArgs&, __nv_bfloat16*);
}  // namespace wq
}  // namespace mpq

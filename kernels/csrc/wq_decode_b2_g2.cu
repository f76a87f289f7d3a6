// The 2-bit decode kernels with groups of 64 (one translation unit per bit width and group, built in parallel).
#include "wq_decode.cuh"

namespace mpq {
namespace wq {
template cudaError_t launch_decode<2, 2>(const DecodeArgs&, int);
}  // namespace wq
}  // namespace mpq

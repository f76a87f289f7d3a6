// The 6-bit decode kernels with groups of 128 (one translation unit per bit width and group, built in parallel).
#include "wq_decode.cuh"

namespace mpq {
namespace wq {
template cudaError_t launch_decode<6, 4>(const DecodeArgs&, int);
}  // namespace wq
}  // namespace mpq

// The FP8 instantiations of the fused-quantisation decode kernel (one translation unit each).
#include "w8_decode.cuh"

namespace mpq {
namespace w8 {
template cudaError_t launch<1>(const Args&, int);
}  // namespace w8
}  // namespace mpq

// W4A16 tile configuration 2: prefill: 128 x 128 x 64 tiles, persistent.
#include "w4a16_sm90.cuh"

namespace mpq {
MPQ_W4A16_DEFINE(2, Shape<_128, _128, _64>)
}  // namespace mpq

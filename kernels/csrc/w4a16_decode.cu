// W4A16 for decode-sized m (a few tokens): a weight-streaming kernel on mma.sync tensor cores (sm_80 and newer, no
// CUTLASS), reading the same plain weights as the CUTLASS configurations 1 to 3 (pack_int4: [n, k / 2],
// two's-complement nibbles, the even k in the low nibble) and the same [k / g, n] bf16 group scales.
//
// Why not CUTLASS here: at m <= 16 the GEMM is a stream over the weights, and CUTLASS's mixed-input mainloop (TMA
// tiles of 128 x 16, a producer warp group, shared-memory staging) reached 0.5-1.2 TB/s of the H100's 3.35. This
// kernel loads weights straight into registers, 16 bytes per lane, several chunks in flight per warp before any is
// used, and needs no shared memory until the final reduction.
//
// Layout of the work: a warp owns N_TILES tiles of 16 weight rows and walks k in chunks of 128, the block's eight
// warps taking every eighth chunk (so they stream neighbouring memory together) and summing their partial results
// in shared memory at the end. In a chunk, lane (g, t) = (lane / 4, lane % 4) loads 32 consecutive k of rows g and
// g + 8 (16 bytes each). The mma's k order is free as long as weights and activations agree, so each 32-bit word
// of 8 nibbles becomes two k-steps without moving a nibble: the magic-number trick turns nibbles j and j + 4 into a
// bf16 pair ((w >> 4j) & 0x000F000F | 0x43004300 is 128 + v), and the activations' matching pairs (k j and j + 4)
// are picked from one 16-byte load with byte permutes. Group scales multiply the bf16 weights before the mma, as
// CUTLASS's scale-only mainloop does, so any group that divides 32 works (32, 64, 128).

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>

namespace mpq {
namespace {

constexpr int kWarps = 8;
constexpr int kChunk = 128;  // k per warp step: 16 rows x 128 k = 1 KiB of weights, 32 bytes per lane

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Nibbles j and j + 4 of w (offset binary, 0..15 for -8..7) as the bf16 pair (s * v_j, s * v_{j+4}).
__device__ __forceinline__ uint32_t dequant_pair(uint32_t w, int j, __nv_bfloat162 s) {
  uint32_t v = ((w >> (4 * j)) & 0x000F000Fu) | 0x43004300u;  // bf16 128 + nibble, exactly
  __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&v);
  h = __hmul2(__hsub2(h, __floats2bfloat162_rn(136.f, 136.f)), s);  // 128 + nibble - 136 = v, exact; one rounding
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Weights are read once: keep them out of L1, which holds the activations every warp reads.
__device__ __forceinline__ uint4 load16_stream(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// y[m, n] = sum_k x[m, k] * s[k / group, n] * w[n, k] for the N_TILES x 16 rows of block x and the 8 * M_TILES
// tokens of block y. UNROLL chunks are loaded before any is computed, to keep loads in flight.
template <int M_TILES, int N_TILES, int UNROLL>
__global__ void __launch_bounds__(kWarps * 32)
    w4a16_decode_kernel(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                        const __nv_bfloat16* __restrict__ scale, __nv_bfloat16* __restrict__ y, int M, int N, int K,
                        int group) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n_base = blockIdx.x * 16 * N_TILES;
  const int m_base = blockIdx.y * 8 * M_TILES;
  const int chunks = K / kChunk;
  const size_t row_bytes = K / 2;

  float acc[N_TILES][M_TILES][4] = {};
  for (int c0 = warp; c0 < chunks; c0 += kWarps * UNROLL) {
    uint4 wq[UNROLL][N_TILES][2];
    uint4 xq[UNROLL][M_TILES][4];
    __nv_bfloat162 sc[UNROLL][N_TILES][2];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = c0 + u * kWarps;
      if (c >= chunks) break;  // warp-uniform
      const int k0 = c * kChunk + 32 * t;  // this lane's 32 k
#pragma unroll
      for (int i = 0; i < N_TILES; ++i) {
        const int n = n_base + 16 * i + g;
        if (n < N) {  // N is a multiple of 16: a tile is wholly in or out
          wq[u][i][0] = load16_stream(w + size_t(n) * row_bytes + k0 / 2);
          wq[u][i][1] = load16_stream(w + size_t(n + 8) * row_bytes + k0 / 2);
          const __nv_bfloat16* s = scale + size_t(k0 / group) * N + n;
          sc[u][i][0] = __bfloat162bfloat162(s[0]);
          sc[u][i][1] = __bfloat162bfloat162(s[8]);
        }
      }
#pragma unroll
      for (int j = 0; j < M_TILES; ++j) {  // the activations: L1/L2 hits, loaded with the weights so that no
        const int m = m_base + 8 * j + g;  // k-step waits on them
#pragma unroll
        for (int q = 0; q < 4; ++q)
          xq[u][j][q] = m < M ? load16(x + size_t(m) * K + k0 + 8 * q) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (c0 + u * kWarps >= chunks) break;
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // word q: k0 + 8q ... k0 + 8q + 7, two k-steps
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t b0[M_TILES], b1[M_TILES];
#pragma unroll
          for (int j = 0; j < M_TILES; ++j) {
            const uint4 r = xq[u][j][q];  // bf16 pairs (x0 x1) (x2 x3) (x4 x5) (x6 x7)
            const uint32_t lo = h ? r.y : r.x, hi = h ? r.w : r.z;
            b0[j] = __byte_perm(lo, hi, 0x5410);  // (x_{2h}, x_{2h+4})
            b1[j] = __byte_perm(lo, hi, 0x7632);  // (x_{2h+1}, x_{2h+5})
          }
#pragma unroll
          for (int i = 0; i < N_TILES; ++i) {
            if (n_base + 16 * i >= N) break;
            const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&wq[u][i][0]);
            const uint32_t* w8 = reinterpret_cast<const uint32_t*>(&wq[u][i][1]);
            const uint32_t lo = w0[q] ^ 0x88888888u, hi = w8[q] ^ 0x88888888u;  // two's complement -> offset
            const uint32_t a[4] = {dequant_pair(lo, 2 * h, sc[u][i][0]), dequant_pair(hi, 2 * h, sc[u][i][1]),
                                   dequant_pair(lo, 2 * h + 1, sc[u][i][0]),
                                   dequant_pair(hi, 2 * h + 1, sc[u][i][1])};
#pragma unroll
            for (int j = 0; j < M_TILES; ++j) mma_bf16_16816(acc[i][j], a, b0[j], b1[j]);
          }
        }
      }
    }
  }

  // The warps' partial sums meet in shared memory; accumulator r of lane (g, t) is row g + 8 (r / 2), token
  // 2t + r % 2 of its tile.
  __shared__ float partial[kWarps][N_TILES][M_TILES][4][32];
#pragma unroll
  for (int i = 0; i < N_TILES; ++i)
#pragma unroll
    for (int j = 0; j < M_TILES; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) partial[warp][i][j][r][lane] = acc[i][j][r];
  __syncthreads();
  for (int idx = threadIdx.x; idx < N_TILES * M_TILES * 128; idx += kWarps * 32) {
    const int l = idx & 31, r = (idx >> 5) & 3, j = (idx >> 7) % M_TILES, i = (idx >> 7) / M_TILES;
    const int n = n_base + 16 * i + (l >> 2) + 8 * (r >> 1);
    const int m = m_base + 8 * j + 2 * (l & 3) + (r & 1);
    if (n >= N || m >= M) continue;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += partial[v][i][j][r][l];
    y[size_t(m) * N + n] = __float2bfloat16_rn(sum);
  }
}

template <int M_TILES, int N_TILES, int UNROLL>
void launch(torch::Tensor& y, torch::Tensor const& x, torch::Tensor const& w, torch::Tensor const& scale,
            int group) {
  const int M = x.size(0), K = x.size(1), N = w.size(0);
  dim3 grid((N + 16 * N_TILES - 1) / (16 * N_TILES), (M + 8 * M_TILES - 1) / (8 * M_TILES));
  w4a16_decode_kernel<M_TILES, N_TILES, UNROLL><<<grid, kWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), w.data_ptr<uint8_t>(),
      reinterpret_cast<const __nv_bfloat16*>(scale.data_ptr()), reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), M,
      N, K, group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int M_TILES>
void launch_config(torch::Tensor& y, torch::Tensor const& x, torch::Tensor const& w, torch::Tensor const& scale,
                   int group, int64_t config) {
  switch (config) {
    case 1: launch<M_TILES, 1, 4>(y, x, w, scale, group); break;
    case 2: launch<M_TILES, 2, 2>(y, x, w, scale, group); break;
    case 3: launch<M_TILES, 4, 1>(y, x, w, scale, group); break;
    case 4: launch<M_TILES, 1, 2>(y, x, w, scale, group); break;
    default: TORCH_CHECK(false, "mpq w4a16_decode: configuration 1 to 4, got ", config);
  }
}

// Configurations 1 to 4 are (rows per warp, chunks in flight) = (16, 4), (32, 2), (64, 1), (16, 2); the Python
// wrapper picks one by shape (mpq.kernels.cutlass_w4a16.decode_config).
torch::Tensor w4a16_decode(torch::Tensor const& x, torch::Tensor const& w_packed, torch::Tensor const& scale,
                           int64_t group, int64_t config) {
  TORCH_CHECK(x.is_cuda() && w_packed.is_cuda() && scale.is_cuda(), "mpq w4a16_decode: CUDA tensors");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "mpq w4a16_decode: x must be a contiguous bf16 m x k matrix");
  const int64_t n = w_packed.size(0), k = x.size(1);
  TORCH_CHECK(w_packed.scalar_type() == at::kByte && w_packed.dim() == 2 && w_packed.is_contiguous() &&
                  w_packed.size(1) * 2 == k,
              "mpq w4a16_decode: w_packed must be uint8 [n, k / 2] (two 4-bit values per byte); got ",
              w_packed.sizes(), " for k=", k);
  TORCH_CHECK(n % 16 == 0 && k % kChunk == 0, "mpq w4a16_decode: n=", n, " must be a multiple of 16 and k=", k,
              " of ", kChunk);
  TORCH_CHECK(group == 32 || group == 64 || group == 128, "mpq w4a16_decode: group 32, 64 or 128, got ", group);
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(1) == n && scale.size(0) == k / group,
              "mpq w4a16_decode: scale must be bf16 [k / group, n] (MN-major), got ", scale.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(w_packed.data_ptr()) % 16 == 0,
              "mpq w4a16_decode: x and w_packed must be 16-byte aligned");
  c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return y;
  if (x.size(0) <= 8)
    launch_config<1>(y, x, w_packed, scale, group, config);
  else
    launch_config<2>(y, x, w_packed, scale, group, config);
  return y;
}

}  // namespace
}  // namespace mpq

TORCH_LIBRARY(mpq_w4a16_decode, m) {
  m.def("w4a16_decode(Tensor x, Tensor w_packed, Tensor scale, int group, int config) -> Tensor");
  m.impl("w4a16_decode", torch::kCUDA, &mpq::w4a16_decode);
}

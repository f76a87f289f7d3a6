// INT8 and FP8 (E4M3) weights at decode sizes with the per-token activation quantisation fused into the same
// launch: W8A8 and FP8 layers for m <= 16, on mma.sync m16n8k32 (s8 or e4m3 operands, sm_80 / sm_89 and newer).
//
// Weights are the plain row-major [N, K] bytes that the prefill kernels also read (CUTLASS's W8A8 GEMM,
// torch._scaled_mm), so a module keeps one copy; per output channel float32 scales. Lane (g, t) of a warp loads 16
// bytes of rows g and g + 8 of its 16-row tile at k = 64 sb + 16 t of superblock sb: k-step h of the superblock
// takes bytes 8h .. 8h + 7 of them (register 0 the first four k, register 2 the next four, as the m16n8k32 operand
// wants), and the activations of the same 16 k, quantised in registers, are its B operand. No weight byte is touched
// between the load and the mma.
//
// Activation scales: each block needs the amax of its tokens over all of K before it can quantise anything. A block
// reads the tokens' rows (issued after its first weight loads, which are in flight meanwhile); on Hopper the blocks of
// a thread-block cluster split that read and exchange their partial maxima through distributed shared memory, so
// that a cluster of 8 reads each row once instead of 8 times. The rule is fake-quant's: scale = amax * (1 / qmax) in
// float32 (1 for an all-zero row), q = round-half-even(x / scale) (INT8) or e4m3(clamp(x / scale)) (FP8), the
// quotient correctly rounded from the scale's reciprocal and one fma refinement (see quotient()).
#pragma once

#include <cooperative_groups.h>
#include <cuda_fp8.h>

#include <type_traits>

#include "wq_common.cuh"

namespace mpq {
namespace w8 {

using wq::kWarps;

enum Format { kInt8 = 0, kE4M3 = 1 };

struct Args {
  const __nv_bfloat16* x;  // [M, K]
  const uint8_t* w;        // [N, K] int8 or e4m3
  const float* w_scale;    // [N]
  const float* bias;       // [N] or null
  __nv_bfloat16* y;        // [M, N]
  int M, N, K;
  int cluster;  // blocks sharing one activation-amax pass (1: none; 2, 4, 8 on sm_90)
  int pdl;      // launch with programmatic stream serialization (sm_90)
  cudaStream_t stream;
};

// RN(x / s) from r = RN(1 / s): the residual x - s q0 is exact in one fma, and one more fma rounds the corrected
// quotient correctly (Markstein's refinement), so the levels are fake-quant's, which divides.
__device__ __forceinline__ float quotient(float x, float s, float r) {
  const float q0 = x * r;
  return __fmaf_rn(__fmaf_rn(-s, q0, x), r, q0);
}

// Four bf16 (two words) as four int8 codes: round-half-even(x / s) in the low byte of x / s + 1.5 * 2^23 (the add
// rounds to an integer), or as four e4m3 codes (saturating to +-448, which is fake-quant's clamp).
template <int FMT>
__device__ __forceinline__ uint32_t quantize4(uint32_t a, uint32_t b, float s, float r) {
  const float x0 = quotient(wq::bf16_lo(a), s, r), x1 = quotient(wq::bf16_hi(a), s, r);
  const float x2 = quotient(wq::bf16_lo(b), s, r), x3 = quotient(wq::bf16_hi(b), s, r);
  if constexpr (FMT == kInt8) {
    const uint32_t t0 = __float_as_uint(x0 + 12582912.f), t1 = __float_as_uint(x1 + 12582912.f);
    const uint32_t t2 = __float_as_uint(x2 + 12582912.f), t3 = __float_as_uint(x3 + 12582912.f);
    return __byte_perm(__byte_perm(t0, t1, 0x0040), __byte_perm(t2, t3, 0x0040), 0x5410);
  } else {
    const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(x0, x1), __NV_SATFINITE, __NV_E4M3);
    const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(x2, x3), __NV_SATFINITE, __NV_E4M3);
    return lo | (hi << 16);
  }
}

__device__ __forceinline__ float absmax8(uint4 v) {
  float m = 0.f;
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) m = fmaxf(m, fmaxf(fabsf(wq::bf16_lo(w[i])), fabsf(wq::bf16_hi(w[i]))));
  return m;
}

// y[m, n] = s_x[m] s_w[n] sum_k q_x[m, k] q_w[n, k] (+ bias[n]) for the NT tiles of block x and 8 MT tokens of
// block y; the warps of a block take every kWarps-th 64-k superblock, U of them in flight per warp.
template <int FMT, int MT, int NT, int U>
__global__ void __launch_bounds__(kWarps * 32)
    w8_decode_kernel(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                     const float* __restrict__ w_scale, const float* __restrict__ bias,
                     __nv_bfloat16* __restrict__ y, int M, int N, int K) {
  using Acc = std::conditional_t<FMT == kInt8, int, float>;
  constexpr int XU = U < 2 ? U : 2;
  constexpr int T = 8 * MT;  // tokens of the block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tiles = (N + 15) / 16;
  const int tile0 = blockIdx.x * NT;
  const int m0 = blockIdx.y * T;
  const int S = (K + 63) / 64;  // superblocks
  const int mine = warp < S ? (S - warp + kWarps - 1) / kWarps : 0;

  bool row_live[NT][2];
  const uint8_t* wp[NT][2];
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = (tile0 + i) * 16 + g + 8 * h;
      row_live[i][h] = n < N;
      wp[i][h] = w + size_t(row_live[i][h] ? n : 0) * K + warp * 64 + 16 * t;
    }
  bool live[MT];
  const __nv_bfloat16* xp[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    const int m = m0 + 8 * j + g;
    live[j] = m < M;
    xp[j] = x + size_t(live[j] ? m : 0) * K + warp * 64 + 16 * t;
  }

  uint4 wr[U][NT][2];
  uint4 xr[XU][MT][2];
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int i = 0; i < NT; ++i) wr[u][i][0] = wr[u][i][1] = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int s = 0; s < XU; ++s)
#pragma unroll
    for (int j = 0; j < MT; ++j) xr[s][j][0] = xr[s][j][1] = make_uint4(0, 0, 0, 0);

  // Superblock jc of the warp: weights of live rows, and activations of live tokens, where k < K (rows beyond N
  // and k beyond K stay zero: e4m3 garbage could be NaN).
#define MPQ_LOAD_W(u, jc)                                                                                       \
  {                                                                                                             \
    const int kt = (warp + kWarps * (jc)) * 64 + 16 * t;                                                        \
    const size_t off = size_t(jc) * kWarps * 64;                                                                \
    _Pragma("unroll") for (int i = 0; i < NT; ++i) _Pragma("unroll") for (int h = 0; h < 2; ++h) {              \
      if (row_live[i][h] && kt < K) wr[u][i][h] = wq::ldg_stream16(wp[i][h] + off);                             \
      else wr[u][i][h] = make_uint4(0, 0, 0, 0);                                                                \
    }                                                                                                           \
  }
#define MPQ_LOAD_X(s, jc)                                                                                       \
  {                                                                                                             \
    const int kt = (warp + kWarps * (jc)) * 64 + 16 * t;                                                        \
    const size_t off = size_t(jc) * kWarps * 64;                                                                \
    _Pragma("unroll") for (int j = 0; j < MT; ++j) {                                                            \
      if (live[j] && kt < K) {                                                                                  \
        xr[s][j][0] = wq::ldg16(xp[j] + off);                                                                   \
        xr[s][j][1] = wq::ldg16(xp[j] + off + 8);                                                               \
      } else if (live[j]) {                                                                                     \
        xr[s][j][0] = xr[s][j][1] = make_uint4(0, 0, 0, 0);                                                     \
      }                                                                                                         \
    }                                                                                                           \
  }

  wq::pdl_launch_dependents();  // the next kernel may start streaming its weights while this one finishes
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (u < mine) MPQ_LOAD_W(u, u)
  wq::pdl_wait_for_inputs();  // the activations may still be being written by the previous kernel

  // The tokens' scales, while those loads are in flight.
  __shared__ float part[T], tok_rcp[T], tok_scale[T];
  unsigned cs = 1, rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  cs = cluster.num_blocks();
  rank = cluster.block_rank();
#endif
  {
    const int pieces = K / 8, per = (pieces + cs - 1) / cs;
    const int p0 = rank * per, p1 = min(pieces, p0 + per);
    for (int tok = warp; tok < T; tok += kWarps) {
      float amax = 0.f;
      if (m0 + tok < M) {
        const __nv_bfloat16* row = x + size_t(m0 + tok) * K;
#pragma unroll 4
        for (int p = p0 + lane; p < p1; p += 32) amax = fmaxf(amax, absmax8(wq::ldg16(row + 8 * p)));
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      if (lane == 0) part[tok] = amax;
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cs > 1) {
    cluster.sync();
    if (threadIdx.x < T) {
      float amax = 0.f;
      for (unsigned r = 0; r < cs; ++r) amax = fmaxf(amax, cluster.map_shared_rank(part, r)[threadIdx.x]);
      tok_scale[threadIdx.x] = amax;
    }
    cluster.sync();  // every block has read the others' partial maxima before any block moves on (or exits)
  } else
#endif
  {
    __syncthreads();
    if (threadIdx.x < T) tok_scale[threadIdx.x] = part[threadIdx.x];
  }
  if (threadIdx.x < T) {
    const float amax = tok_scale[threadIdx.x];
    const float s = amax > 0.f ? __fmul_rn(amax, FMT == kInt8 ? 1.f / 127.f : 1.f / 448.f) : 1.f;
    tok_scale[threadIdx.x] = s;
    tok_rcp[threadIdx.x] = __frcp_rn(s);
  }
  __syncthreads();
  float rcp[MT], scl[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) rcp[j] = tok_rcp[8 * j + g], scl[j] = tok_scale[8 * j + g];

#pragma unroll
  for (int s = 0; s < XU; ++s)
    if (s < mine) MPQ_LOAD_X(s, s)

  Acc acc[NT][MT][4];
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  for (int j0 = 0; j0 < mine; j0 += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int jc = j0 + u;
      if (jc < mine) {
        const int s = u % XU;
        uint32_t qa[MT][4];
#pragma unroll
        for (int j = 0; j < MT; ++j) {
          qa[j][0] = quantize4<FMT>(xr[s][j][0].x, xr[s][j][0].y, scl[j], rcp[j]);
          qa[j][1] = quantize4<FMT>(xr[s][j][0].z, xr[s][j][0].w, scl[j], rcp[j]);
          qa[j][2] = quantize4<FMT>(xr[s][j][1].x, xr[s][j][1].y, scl[j], rcp[j]);
          qa[j][3] = quantize4<FMT>(xr[s][j][1].z, xr[s][j][1].w, scl[j], rcp[j]);
        }
        if (jc + XU < mine) MPQ_LOAD_X(s, jc + XU)
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          if (tile0 + i >= tiles) break;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint4 r0 = wr[u][i][0], r8 = wr[u][i][1];
            const uint32_t a[4] = {h ? r0.z : r0.x, h ? r8.z : r8.x, h ? r0.w : r0.y, h ? r8.w : r8.y};
#pragma unroll
            for (int j = 0; j < MT; ++j) {
              if constexpr (FMT == kInt8)
                wq::mma_s8_16832(acc[i][j], a, qa[j][2 * h], qa[j][2 * h + 1]);
              else
                wq::mma_e4m3_16832(acc[i][j], a, qa[j][2 * h], qa[j][2 * h + 1]);
            }
          }
        }
        if (jc + U < mine) MPQ_LOAD_W(u, jc + U)
      }
    }
  }
#undef MPQ_LOAD_W
#undef MPQ_LOAD_X

  // Partial sums meet in shared memory (int32 exactly for INT8); accumulator r of lane (g, t) is row g + 8 (r / 2),
  // token 2t + r % 2 of its tile.
  __shared__ Acc partial[kWarps][NT][MT][4][32];
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) partial[warp][i][j][r][lane] = acc[i][j][r];
  __syncthreads();
  for (int idx = threadIdx.x; idx < NT * MT * 128; idx += kWarps * 32) {
    const int l = idx & 31, r = (idx >> 5) & 3, j = (idx >> 7) % MT, i = (idx >> 7) / MT;
    const int n = (tile0 + i) * 16 + (l >> 2) + 8 * (r >> 1);
    const int m = m0 + 8 * j + 2 * (l & 3) + (r & 1);
    if (n >= N || m >= M) continue;
    Acc sum = 0;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += partial[v][i][j][r][l];
    float out = float(sum) * tok_scale[8 * j + 2 * (l & 3) + (r & 1)] * w_scale[n];
    if (bias) out += bias[n];
    y[size_t(m) * N + n] = __float2bfloat16_rn(out);
  }
}

// Configurations (row tiles per block NT, superblocks in flight per warp U): 1: (1, 2), 2: (1, 4), 3: (2, 2),
// 4: (2, 4); 8 or 16 tokens a pass by M.
constexpr int kConfigs = 4;

template <int FMT, int MT, int NT, int U>
cudaError_t launch_tiles(const Args& a) {
  const int tiles = (a.N + 15) / 16;
  const int cs = a.cluster > 1 ? a.cluster : 1;
  const int bx = ((tiles + NT - 1) / NT + cs - 1) / cs * cs;  // a whole number of clusters
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(bx, (a.M + 8 * MT - 1) / (8 * MT));
  cfg.blockDim = dim3(kWarps * 32);
  cfg.stream = a.stream;
  wq::LaunchAttrs attrs(a.pdl, cs);
  attrs.apply(cfg);
  return cudaLaunchKernelEx(&cfg, w8_decode_kernel<FMT, MT, NT, U>, a.x, a.w, a.w_scale, a.bias, a.y, a.M, a.N, a.K);
}

template <int FMT, int MT>
cudaError_t launch_mt(const Args& a, int config) {
  switch (config) {
    case 1: return launch_tiles<FMT, MT, 1, 2>(a);
    case 2: return launch_tiles<FMT, MT, 1, 4>(a);
    case 3: return launch_tiles<FMT, MT, 2, 2>(a);
    case 4: return launch_tiles<FMT, MT, 2, 4>(a);
    default: return cudaErrorInvalidValue;
  }
}

template <int FMT>
cudaError_t launch(const Args& a, int config) {
  return a.M <= 8 ? launch_mt<FMT, 1>(a, config) : launch_mt<FMT, 2>(a, config);
}

}  // namespace w8
}  // namespace mpq

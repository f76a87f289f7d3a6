// Low-bit weights (2, 3, 4, 5, 6 or 8 bits, symmetric, one scale per group of 32, 64 or 128 input features or per
// output channel) times bf16 activations: a weight-streaming decode kernel on mma.sync bf16 tensor cores and a
// dequantise-to-bf16 kernel (what the prefill path feeds to cuBLAS). Both read one packed layout, written once at
// conversion by mpq.kernels.cuda_lowbit.pack_lowbit; this header is the other half of that contract.
//
// The tiled layout. Rows are padded to Np (a multiple of 16) and k to Kp (a multiple of 128); a tile is 16 rows, a
// chunk 128 k. Tile-chunk (i, c) is 256 * BITS contiguous bytes at ((i * C) + c) * 256 * BITS, C = Kp / 128, and
// holds exactly what the 32 lanes of one warp need for it: lane L = 4g + t owns rows g and g + 8 of the tile and,
// in each of the chunk's four 32-k blocks, the eight k at 8t .. 8t + 7. Each value is stored offset-binary
// (u = q + 2^(BITS-1); for 8 bits sign and magnitude) and split into bit planes of 4, 2 and 1 bits (3 = 2 + 1,
// 5 = 4 + 1, 6 = 4 + 2; 8 bits is one plane of bytes), each plane a run of 16-byte (8-byte for the 1-bit plane)
// vectors laid out lane after lane, so that every warp load is 512 (256) contiguous bytes and lands in registers in
// the order the mma reads it. In a lane's 32-bit words the two values of an mma register pair (consecutive k of one
// row) sit at the same bit offset of the two 16-bit halves, so that one shift, one mask and one OR with 0x4300
// (bf16 128) make the pair 128 + u exactly, and one bf16 subtraction makes it q. Word and bit positions of value
// (hi = row / 8, blk, e = k % 8, pair p = e / 2, half s = e % 2) in a lane's words:
//   4-bit plane: word 2 * blk + hi, bits 16 s + 4 p        2-bit plane: word blk, bits 16 s + 2 (4 hi + p)
//   1-bit plane: word blk / 2, bit 16 s + 8 (blk % 2) + 4 hi + p
//   8 bits:      word 4 blk + 2 hi + p / 2, byte 2 s + p % 2 (bit 7 the sign, bits 0-6 the magnitude)
// Scales (bf16 or fp16) are tiled too: for groups, lane g's (row g, row g + 8) pairs of the chunk's 128 / group
// groups are contiguous, element ((i * C + c) * 8 + g) * 2 G + 2 q + hi, G = 128 / group; per channel, element
// (i * 8 + g) * 2 + hi.
//
// The mma's k order is free as long as weights and activations agree: k-step h of block blk takes the lane's k
// 8t + 4h + {0, 1} (register pair 2h) and 8t + 4h + {2, 3} (pair 2h + 1), so one 16-byte activation load of k
// 8t .. 8t + 7 gives both k-steps' B registers without any permute. All 16 k of a k-step lie in one 32-k block,
// hence in one group: products of exact integers are summed in fp32 per group and scaled in fp32 after the mma
// (Sum_g s_g * Sum_k x_k q_k), which is both cheaper than scaling every weight and exact up to fp32 rounding.
#pragma once

#include "wq_common.cuh"

namespace mpq {
namespace wq {

template <int BITS>
struct Planes {
  static_assert(BITS == 2 || BITS == 3 || BITS == 4 || BITS == 5 || BITS == 6 || BITS == 8, "2-6 or 8 bits");
  static constexpr bool p8 = BITS == 8;
  static constexpr bool p4 = BITS == 4 || BITS == 5 || BITS == 6;
  static constexpr bool p2 = BITS == 2 || BITS == 3 || BITS == 6;
  static constexpr bool p1 = BITS == 3 || BITS == 5;
  static constexpr int words = 2 * BITS;  // 32-bit words per lane per tile-chunk
  static constexpr int w2 = p4 ? 8 : 0;   // word offsets of the planes in a lane's words
  static constexpr int w1 = w2 + (p2 ? 4 : 0);
  static constexpr int chunk_bytes = 256 * BITS;
  static constexpr int off2 = p4 ? 1024 : 0;  // byte offsets of the planes in a tile-chunk
  static constexpr int off1 = off2 + (p2 ? 512 : 0);
  // bf16 pair (128 + 2^(BITS-1), same): subtracting it from 128 + u leaves q
  static constexpr uint32_t bias_pair = 0x43004300u | ((1u << (BITS - 1)) * 0x00010001u);
};

// A lane's words of one tile-chunk (streamed: weights are read once).
template <int BITS>
__device__ __forceinline__ void load_chunk(uint32_t (&w)[2 * BITS], const uint8_t* tc, int lane) {
  using P = Planes<BITS>;
  if constexpr (P::p8) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const uint4 q = ldg_stream16(tc + (v * 32 + lane) * 16);
      w[4 * v] = q.x, w[4 * v + 1] = q.y, w[4 * v + 2] = q.z, w[4 * v + 3] = q.w;
    }
  }
  if constexpr (P::p4) {
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const uint4 q = ldg_stream16(tc + (v * 32 + lane) * 16);
      w[4 * v] = q.x, w[4 * v + 1] = q.y, w[4 * v + 2] = q.z, w[4 * v + 3] = q.w;
    }
  }
  if constexpr (P::p2) {
    const uint4 q = ldg_stream16(tc + P::off2 + lane * 16);
    w[P::w2] = q.x, w[P::w2 + 1] = q.y, w[P::w2 + 2] = q.z, w[P::w2 + 3] = q.w;
  }
  if constexpr (P::p1) {
    const uint2 q = ldg_stream8(tc + P::off1 + lane * 8);
    w[P::w1] = q.x, w[P::w1 + 1] = q.y;
  }
}

// The bf16 pair (q at k 2p, q at k 2p + 1) of row g + 8 hi in block blk (all compile-time after unrolling).
template <int BITS>
__device__ __forceinline__ uint32_t pair_bf16(const uint32_t (&w)[2 * BITS], int hi, int blk, int p) {
  using P = Planes<BITS>;
  if constexpr (P::p8) {
    const uint32_t word = w[4 * blk + 2 * hi + (p >> 1)];
    const uint32_t mag = and_or((p & 1) ? word >> 8 : word, 0x007F007Fu, 0x43004300u);  // 128 + |q|
    return and_or((p & 1) ? word : word << 8, 0x80008000u, bf16x2_sub(mag, 0x43004300u));  // |q|, then the sign
  } else {
    // (field & mask) | (128 in bf16) in one LOP3 per plane: the bf16 128 + u
    uint32_t u = 0x43004300u;
    if constexpr (P::p4) u = and_or(w[2 * blk + hi] >> (4 * p), 0x000F000Fu, u);
    if constexpr (BITS == 2 || BITS == 3) u = and_or(w[P::w2 + blk] >> (2 * (4 * hi + p)), 0x00030003u, u);
    if constexpr (BITS == 6) u = and_or(move_bits(w[P::w2 + blk], 2 * (4 * hi + p), 4), 0x00300030u, u);
    if constexpr (P::p1) {
      constexpr int dst = BITS == 3 ? 2 : 4;
      u = and_or(move_bits(w[P::w1 + (blk >> 1)], 8 * (blk & 1) + 4 * hi + p, dst), 0x00010001u << dst, u);
    }
    return bf16x2_sub(u, P::bias_pair);
  }
}

// The lane's scale words of one tile-chunk: G = 128 / group pairs (row g, row g + 8), or nothing per channel.
__device__ __forceinline__ void load_scales(uint32_t (&s)[4], const uint32_t* words, int gpc) {
  if (gpc == 4) {
    const uint4 q = *reinterpret_cast<const uint4*>(words);
    s[0] = q.x, s[1] = q.y, s[2] = q.z, s[3] = q.w;
  } else if (gpc == 2) {
    const uint2 q = *reinterpret_cast<const uint2*>(words);
    s[0] = q.x, s[1] = q.y;
  } else if (gpc == 1) {
    s[0] = *words;
  }
}

// The scale word of block blk (blocks per group bpg = 1, 2 or 4), selected without a run-time register index.
__device__ __forceinline__ uint32_t block_scale(const uint32_t (&s)[4], int blk, int bpg) {
  return bpg == 1 ? s[blk] : (bpg == 2 ? s[blk >> 1] : s[0]);
}

struct DecodeArgs {
  const __nv_bfloat16* x;  // [M, K]
  const uint8_t* w;        // tiled, Np * Kp * BITS / 8 bytes
  const uint32_t* scale;   // tiled scale pairs
  const float* bias;       // [N] or null
  __nv_bfloat16* y;        // [M, N]
  int M, N, K, C;          // C = Kp / 128
  int bpg;                 // group / 32 (1, 2, 4); 0 per channel
  int scale_fp16;
  int m_tiles;             // 8-token tiles per block: 1, 2 or 4 (0: by M)
  int pdl;                 // launch with programmatic stream serialization (sm_90)
  cudaStream_t stream;
};

// The activations of one chunk for the MT token tiles (lane k = kt .. kt + 7 of each 32-k block). Slots of tokens
// beyond M are never loaded (they stay zero from the start, and only feed outputs that are not written); in a
// partial last chunk, k >= K is zero (the padded weights there are zero, and 0 * garbage could be NaN).
template <int MT>
__device__ __forceinline__ void load_activations(uint4 (&xr)[MT][4], const __nv_bfloat16* const (&xp)[MT],
                                                 const bool (&live)[MT], size_t offset, int kt, int K) {
  if (kt - 8 * (threadIdx.x & 3) + 128 <= K) {  // warp-uniform: every chunk but a partial last one
#pragma unroll
    for (int j = 0; j < MT; ++j)
      if (live[j]) {
#pragma unroll
        for (int blk = 0; blk < 4; ++blk) xr[j][blk] = ldg16(xp[j] + offset + 32 * blk);
      }
  } else {
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int blk = 0; blk < 4; ++blk)
        xr[j][blk] = live[j] && kt + 32 * blk < K ? ldg16(xp[j] + offset + 32 * blk) : make_uint4(0, 0, 0, 0);
  }
}

// y[m, n] = sum_k x[m, k] s[n, k / group] q[n, k] (+ bias[n]) for the NT tiles of block x and the 8 MT tokens of
// block y; BPG = group / 32 (0 per channel). The warps of a block take every kWarps-th chunk of the block's rows;
// each keeps U chunks of weights (and two of activations) in flight in registers, refilling a slot as soon as its
// chunk is computed. Partial sums meet in shared memory at the end.
template <int BITS, int MT, int NT, int U, int BPG>
__global__ void __launch_bounds__(kWarps * 32)
    wq_decode_kernel(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                     const uint32_t* __restrict__ scale, const float* __restrict__ bias,
                     __nv_bfloat16* __restrict__ y, int M, int N, int K, int C, int scale_fp16) {
  using P = Planes<BITS>;
  constexpr int XU = U < 2 ? U : 2;            // activation slots (L2 / L1 hits need less lead than the weights)
  constexpr int GPC = BPG ? 4 / BPG : 0;       // groups per chunk
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tiles = (N + 15) / 16;
  const int tile0 = blockIdx.x * NT;
  const int m0 = blockIdx.y * 8 * MT;
  const int mine = warp < C ? (C - warp + kWarps - 1) / kWarps : 0;  // chunks warp, warp + 8, ...

  // Where this warp's first chunk starts; chunk jc of the warp is kWarps * jc chunks further.
  const uint8_t* wp[NT];
  const uint32_t* sp[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const size_t tc = size_t(tile0 + i) * C + warp;
    wp[i] = w + tc * P::chunk_bytes;
    sp[i] = scale + (tc * 8 + g) * (GPC ? GPC : 1);
  }
  const __nv_bfloat16* xp[MT];
  bool live[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    const int m = m0 + 8 * j + g;
    live[j] = m < M;
    xp[j] = x + size_t(live[j] ? m : 0) * K + warp * 128 + 8 * t;
  }
  bool tile_live[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) tile_live[i] = tile0 + i < tiles;

  float acc[NT][MT][4], tmp[NT][MT][4];
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f, tmp[i][j][r] = 0.f;

  uint32_t wr[U][NT][2 * BITS];
  uint32_t sr[U][NT][4];
  uint4 xr[XU][MT][4];
#pragma unroll
  for (int s = 0; s < XU; ++s)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int blk = 0; blk < 4; ++blk) xr[s][j][blk] = make_uint4(0, 0, 0, 0);

  // Stage loads: the weights (and group scales) of the warp's jc-th chunk, its activations
#define MPQ_LOAD_WEIGHTS(u, jc)                                                                            \
  {                                                                                                        \
    const size_t step = size_t(jc) * kWarps;                                                               \
    _Pragma("unroll") for (int i = 0; i < NT; ++i) if (tile_live[i]) {                                     \
      load_chunk<BITS>(wr[u][i], wp[i] + step * P::chunk_bytes, lane);                                     \
      if constexpr (GPC) load_scales(sr[u][i], sp[i] + step * 8 * GPC, GPC);                               \
    }                                                                                                      \
  }
#define MPQ_LOAD_ACTIVATIONS(s, jc) \
  load_activations<MT>(xr[s], xp, live, size_t(jc) * kWarps * 128, (warp + kWarps * (jc)) * 128 + 8 * t, K)

  pdl_launch_dependents();  // the next kernel may start streaming its weights while this one finishes
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (u < mine) MPQ_LOAD_WEIGHTS(u, u)
  pdl_wait_for_inputs();  // weights never change; the activations may still be being written by the previous kernel
#pragma unroll
  for (int s = 0; s < XU; ++s)
    if (s < mine) MPQ_LOAD_ACTIVATIONS(s, s);

  for (int j0 = 0; j0 < mine; j0 += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int jc = j0 + u;  // this warp's jc-th chunk (a warp-uniform condition)
      if (jc < mine) {
        const int s = u % XU;
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          if (!tile_live[i]) break;
#pragma unroll
          for (int blk = 0; blk < 4; ++blk) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint32_t a[4] = {pair_bf16<BITS>(wr[u][i], 0, blk, 2 * h), pair_bf16<BITS>(wr[u][i], 1, blk, 2 * h),
                                     pair_bf16<BITS>(wr[u][i], 0, blk, 2 * h + 1),
                                     pair_bf16<BITS>(wr[u][i], 1, blk, 2 * h + 1)};
#pragma unroll
              for (int j = 0; j < MT; ++j) {
                const uint4 xb = xr[s][j][blk];
                mma_bf16_16816(tmp[i][j], a, h ? xb.z : xb.x, h ? xb.w : xb.y);
              }
            }
            if constexpr (BPG != 0) {
              if ((blk + 1) % BPG == 0) {  // the end of a group: scale its sums into acc
                const float2 sc = scale_pair(sr[u][i][blk / BPG], scale_fp16);
#pragma unroll
                for (int j = 0; j < MT; ++j) {
                  acc[i][j][0] = fmaf(sc.x, tmp[i][j][0], acc[i][j][0]);
                  acc[i][j][1] = fmaf(sc.x, tmp[i][j][1], acc[i][j][1]);
                  acc[i][j][2] = fmaf(sc.y, tmp[i][j][2], acc[i][j][2]);
                  acc[i][j][3] = fmaf(sc.y, tmp[i][j][3], acc[i][j][3]);
#pragma unroll
                  for (int r = 0; r < 4; ++r) tmp[i][j][r] = 0.f;
                }
              }
            }
          }
        }
        if (jc + U < mine) MPQ_LOAD_WEIGHTS(u, jc + U)
        if (jc + XU < mine) MPQ_LOAD_ACTIVATIONS(s, jc + XU);
      }
    }
  }
#undef MPQ_LOAD_WEIGHTS
#undef MPQ_LOAD_ACTIVATIONS

  if constexpr (BPG == 0) {  // per channel: one scale per row, applied once
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      if (!tile_live[i]) break;
      const float2 sc = scale_pair(scale[(tile0 + i) * 8 + g], scale_fp16);
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        acc[i][j][0] = sc.x * tmp[i][j][0], acc[i][j][1] = sc.x * tmp[i][j][1];
        acc[i][j][2] = sc.y * tmp[i][j][2], acc[i][j][3] = sc.y * tmp[i][j][3];
      }
    }
  }

  // Accumulator r of lane (g, t) is row g + 8 (r / 2), token 2t + r % 2 of its 16 x 8 tile.
  __shared__ float partial[kWarps][NT][MT][4][32];
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
    float sum = bias ? bias[n] : 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += partial[v][i][j][r][l];
    y[size_t(m) * N + n] = __float2bfloat16_rn(sum);
  }
}

// The bf16 weight [N, K] (s * q, rounded once) of the tiled layout: one thread per lane of a tile-chunk.
template <int BITS>
__global__ void __launch_bounds__(256)
    wq_dequant_kernel(const uint8_t* __restrict__ w, const uint32_t* __restrict__ scale,
                      __nv_bfloat16* __restrict__ out, int N, int K, int C, int bpg, int scale_fp16) {
  using P = Planes<BITS>;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const size_t tc = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int tiles = (N + 15) / 16;
  if (tc >= size_t(tiles) * C) return;
  const int tile = int(tc / C), c = int(tc % C);
  uint32_t wd[2 * BITS];
  load_chunk<BITS>(wd, w + tc * P::chunk_bytes, lane);
  uint32_t s[4] = {0, 0, 0, 0};
  const int gpc = bpg ? 4 / bpg : 0;
  if (gpc)
    load_scales(s, scale + (tc * 8 + g) * gpc, gpc);
  else
    s[0] = scale[tile * 8 + g];
#pragma unroll
  for (int blk = 0; blk < 4; ++blk) {
    const int k = c * 128 + 32 * blk + 8 * t;
    const float2 sc = scale_pair(gpc ? block_scale(s, blk, bpg) : s[0], scale_fp16);
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int n = tile * 16 + g + 8 * hi;
      const float sv = hi ? sc.y : sc.x;
      uint32_t o[4];
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const uint32_t q = pair_bf16<BITS>(wd, hi, blk, p);
        o[p] = pack_bf16x2(bf16_lo(q) * sv, bf16_hi(q) * sv);
      }
      if (n < N && k < K) *reinterpret_cast<uint4*>(out + size_t(n) * K + k) = make_uint4(o[0], o[1], o[2], o[3]);
    }
  }
}

// Configurations: (row tiles per block NT, chunks in flight per warp U) = 1: (1, 2), 2: (1, 4), 3: (2, 2),
// 4: (2, 1), 5: (4, 1); the 8-token tiles per block (MT = 1, 2, 4) come from M unless forced; 32 tokens a pass
// (MT = 4) only with configurations 1 and 4, whose registers fit.
constexpr int kDecodeConfigs = 5;

template <int BITS, int MT, int NT, int U, int BPG>
cudaError_t launch_decode_tiles(const DecodeArgs& a) {
  const int tiles = (a.N + 15) / 16;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((tiles + NT - 1) / NT, (a.M + 8 * MT - 1) / (8 * MT));
  cfg.blockDim = dim3(kWarps * 32);
  cfg.stream = a.stream;
  LaunchAttrs attrs(a.pdl, 1);
  attrs.apply(cfg);
  return cudaLaunchKernelEx(&cfg, wq_decode_kernel<BITS, MT, NT, U, BPG>, a.x, a.w, a.scale, a.bias, a.y, a.M, a.N,
                            a.K, a.C, a.scale_fp16);
}

template <int BITS, int BPG>
cudaError_t launch_decode(const DecodeArgs& a, int config) {  // one group mode: its own kernels
  const int mt = a.m_tiles ? a.m_tiles : (a.M <= 8 ? 1 : (a.M <= 16 ? 2 : 4));
  if (mt == 4) {
    if (config == 1) return launch_decode_tiles<BITS, 4, 1, 2, BPG>(a);
    if (config == 4) return launch_decode_tiles<BITS, 4, 2, 1, BPG>(a);
    return cudaErrorNotSupported;  // not built for 32 tokens a pass
  }
#define MPQ_CASES(MT)                                               \
  switch (config) {                                                 \
    case 1: return launch_decode_tiles<BITS, MT, 1, 2, BPG>(a);     \
    case 2: return launch_decode_tiles<BITS, MT, 1, 4, BPG>(a);     \
    case 3: return launch_decode_tiles<BITS, MT, 2, 2, BPG>(a);     \
    case 4: return launch_decode_tiles<BITS, MT, 2, 1, BPG>(a);     \
    case 5: return launch_decode_tiles<BITS, MT, 4, 1, BPG>(a);     \
    default: return cudaErrorInvalidValue;                          \
  }
  if (mt == 1) MPQ_CASES(1)
  if (mt == 2) MPQ_CASES(2)
#undef MPQ_CASES
  return cudaErrorInvalidValue;
}

template <int BITS>
cudaError_t launch_dequant(const DecodeArgs& a, __nv_bfloat16* out) {
  const size_t threads = size_t((a.N + 15) / 16) * a.C * 32;
  wq_dequant_kernel<BITS><<<unsigned((threads + 255) / 256), 256, 0, a.stream>>>(a.w, a.scale, out, a.N, a.K, a.C,
                                                                                 a.bpg, a.scale_fp16);
  return cudaGetLastError();
}

}  // namespace wq
}  // namespace mpq

// mpq's fused weight-only GEMM and embedding lookup for CPU: 2/3/4/5/6/8-bit weights, per output channel or in
// groups of 32/64/128 along K, symmetric (scale) or asymmetric (scale + zero), fp16 or bf16 scales; activations
// rounded to bf16, fp32 accumulation, fp32 output.
//
// Packing (kernels/cpu_lowbit.py writes it): each row of N holds K_pad levels u in [0, 2^b), K_pad a multiple of
// 32, stored in blocks of 32 weights of 4*b bytes each, so a row is K_pad*b/8 bytes and the whole weight exactly
// N*K_pad*b/8. A block is the bit-planes of its levels, widest first:
//   b=2: [2-bit plane]          b=3: [2-bit][1-bit]    b=4: [4-bit plane]
//   b=5: [4-bit][1-bit]         b=6: [4-bit][1-bit][1-bit]    b=8: [one byte per weight]
// 4-bit plane, 16 bytes: byte j = p[j] | p[j+16] << 4.
// 2-bit plane, 8 bytes:  byte j = p[j] | p[j+8] << 2 | p[j+16] << 4 | p[j+24] << 6.
// 1-bit plane, 4 bytes:  a little-endian 32-bit mask, bit j = p[j].
// The low plane holds the low bits of u. Unpacking is a few shifts and masks into SIMD lanes in natural order (the
// 1-bit plane is a lane mask), so nothing is ever expanded to a full int8 or float weight in memory.
// A level's value is u - 2^(b-1); the weight is scale * value (+ zero): symmetric levels use u in [1, 2^b - 1],
// asymmetric ones the full range, both with the same offset, so one unpacker serves both.
//
// Three code paths, picked at run time by what the CPU supports (or forced lower with MPQ_CPU_ISA / set_isa):
//   avx512: AVX-512BW unpacking, bf16 lookup tables (vpermw) and vdpbf16ps (AVX512-BF16) dot products;
//   avx2:   AVX2 unpacking, levels converted to fp32 and multiplied with fp32 FMAs;
//   portable: plain C++ (any CPU, any architecture).
// Every path computes y[m, n] = sum_g s[n,g] * sum_{k in g} x[m,k] * (u[n,k] - 2^(b-1)) + z[n,g] * sum_{k in g}
// x[m,k] (+ bias[n]) with fp32 sums, which is fake-quant's x_bf16 @ ((u - 2^(b-1)) * s + z) up to summation order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MPQ_X86 1
#else
#define MPQ_X86 0
#endif

namespace {

constexpr int BLOCK = 32;
enum Isa { PORTABLE = 0, AVX2 = 1, AVX512 = 2 };
const char* ISA_NAMES[] = {"portable", "avx2", "avx512"};

int best_isa() {
#if MPQ_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
#endif
  return PORTABLE;
}

int parse_isa(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == ISA_NAMES[i]) return i;
  TORCH_CHECK(false, "unknown CPU code path '", name, "': use portable, avx2 or avx512");
  return PORTABLE;
}

// The path in use: the best the CPU has, capped by MPQ_CPU_ISA (read once, when the library loads).
int initial_isa() {
  int isa = best_isa();
  const char* env = std::getenv("MPQ_CPU_ISA");
  if (env && *env) isa = std::min(isa, parse_isa(env));
  return isa;
}
std::atomic<int> g_isa{initial_isa()};

// Scales and zeros are stored as fp16 or bf16; read one as fp32.
inline float load_half(const void* p, int64_t i, bool is_bf16) {
  return is_bf16 ? static_cast<float>(static_cast<const c10::BFloat16*>(p)[i])
                 : static_cast<float>(static_cast<const c10::Half*>(p)[i]);
}

// ------------------------------------------------------------------------------------------------------------------
// The problem, as every path sees it
// ------------------------------------------------------------------------------------------------------------------
struct Problem {
  int64_t m, n, k, k_pad, group;  // group == k_pad for per-channel
  int bits;
  const uint8_t* w;               // [n, k_pad * bits / 8]
  const void* scale;              // [n, groups]
  const void* zero;               // [n, groups] or null (symmetric)
  bool scale_bf16;
  const float* bias;              // [n] or null
  float* y;                       // [m, n]
  int64_t groups() const { return k_pad / group; }
  int64_t row_bytes() const { return k_pad * bits / 8; }
};

// x[m, k] rounded to bf16 (as bf16 or as fp32 values), zero-padded to k_pad, and (asymmetric) its per-group sums.
struct Activations {
  std::vector<c10::BFloat16> bf16;  // avx512 path
  std::vector<float> f32;           // avx2 / portable paths
  std::vector<float> gsum;          // [m, groups]
  at::Tensor zterm;                 // [m, n]: sum_g z[n, g] * gsum[m, g], asymmetric only
};

void prepare_activations(const at::Tensor& x, const Problem& p, bool want_bf16, Activations& a) {
  const int64_t m = p.m, k = p.k, kp = p.k_pad, g = p.groups();
  if (want_bf16) a.bf16.assign(m * kp, c10::BFloat16(0.f)); else a.f32.assign(m * kp, 0.f);
  if (p.zero) a.gsum.assign(m * g, 0.f);
  const bool in_bf16 = x.scalar_type() == at::kBFloat16;
  const float* xf = in_bf16 ? nullptr : x.data_ptr<float>();
  const c10::BFloat16* xb = in_bf16 ? x.data_ptr<c10::BFloat16>() : nullptr;
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < k; ++c) {
        c10::BFloat16 v = in_bf16 ? xb[r * k + c] : c10::BFloat16(xf[r * k + c]);  // round to nearest even
        if (want_bf16) a.bf16[r * kp + c] = v; else a.f32[r * kp + c] = static_cast<float>(v);
        if (p.zero) a.gsum[r * g + c / p.group] += static_cast<float>(v);
      }
    }
  });
}

// The zeros' part of every output at once: a small fp32 GEMM [m, groups] x [groups, n] (ATen's BLAS).
void zero_terms(const Problem& p, const at::Tensor& zero, Activations& a) {
  if (!p.zero) return;
  at::Tensor gsum = at::from_blob(a.gsum.data(), {p.m, p.groups()}, at::kFloat);
  a.zterm = at::matmul(gsum, zero.to(at::kFloat).t()).contiguous();
}

inline float finish(const Problem& p, const Activations& a, int64_t r, int64_t col, float acc_scaled) {
  float out = acc_scaled;
  if (p.zero) out += a.zterm.data_ptr<float>()[r * p.n + col];
  if (p.bias) out += p.bias[col];
  return out;
}

// ------------------------------------------------------------------------------------------------------------------
// Portable path: unpack one block into 32 int32 levels, multiply in fp32
// ------------------------------------------------------------------------------------------------------------------
inline void plane4(const uint8_t* q, int32_t* u, int shift) {
  for (int j = 0; j < 16; ++j) {
    u[j] |= (q[j] & 15) << shift;
    u[j + 16] |= (q[j] >> 4) << shift;
  }
}
inline void plane2(const uint8_t* q, int32_t* u, int shift) {
  for (int j = 0; j < 8; ++j)
    for (int s = 0; s < 4; ++s) u[j + 8 * s] |= ((q[j] >> (2 * s)) & 3) << shift;
}
inline void plane1(const uint8_t* q, int32_t* u, int shift) {
  uint32_t mask;
  std::memcpy(&mask, q, 4);
  for (int j = 0; j < 32; ++j) u[j] |= ((mask >> j) & 1) << shift;
}

void unpack_block_portable(const uint8_t* q, int bits, int32_t* u) {
  for (int j = 0; j < BLOCK; ++j) u[j] = 0;
  switch (bits) {
    case 2: plane2(q, u, 0); break;
    case 3: plane2(q, u, 0); plane1(q + 8, u, 2); break;
    case 4: plane4(q, u, 0); break;
    case 5: plane4(q, u, 0); plane1(q + 16, u, 4); break;
    case 6: plane4(q, u, 0); plane1(q + 16, u, 4); plane1(q + 20, u, 5); break;
    case 8: for (int j = 0; j < BLOCK; ++j) u[j] = q[j]; break;
  }
}

void gemm_portable(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  const int64_t kp = p.k_pad, g = p.groups(), per_group = p.group / BLOCK;
  const float off = static_cast<float>(1 << (p.bits - 1));
  std::vector<float> wrow(kp);
  int32_t u[BLOCK];
  for (int64_t col = n0; col < n1; ++col) {
    const uint8_t* wq = p.w + col * p.row_bytes();
    for (int64_t b = 0; b < kp / BLOCK; ++b) {  // one row of levels at a time, as values (u - offset)
      unpack_block_portable(wq + b * 4 * p.bits, p.bits, u);
      for (int j = 0; j < BLOCK; ++j) wrow[b * BLOCK + j] = static_cast<float>(u[j]) - off;
    }
    for (int64_t r = 0; r < p.m; ++r) {
      const float* xr = a.f32.data() + r * kp;
      float total = 0.f;
      for (int64_t gi = 0; gi < g; ++gi) {
        float acc = 0.f;
        const int64_t c0 = gi * per_group * BLOCK, c1 = c0 + per_group * BLOCK;
        for (int64_t c = c0; c < c1; ++c) acc += xr[c] * wrow[c];
        total += acc * load_half(p.scale, col * g + gi, p.scale_bf16);
      }
      p.y[r * p.n + col] = finish(p, a, r, col, total);
    }
  }
}

#if MPQ_X86
// ------------------------------------------------------------------------------------------------------------------
// AVX2 path: 32 levels as four vectors of 8 int32 (weights 0-7, 8-15, 16-23, 24-31), fp32 FMAs
// ------------------------------------------------------------------------------------------------------------------
#define MPQ_AVX2 __attribute__((target("avx2,fma")))

MPQ_AVX2 inline void or_plane4_avx2(const uint8_t* q, __m256i* v, int shift) {
  const __m256i lo4 = _mm256_set1_epi32(15);
  __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8)));
  const __m128i sh = _mm_cvtsi32_si128(shift);
  v[0] = _mm256_or_si256(v[0], _mm256_sll_epi32(_mm256_and_si256(b0, lo4), sh));
  v[1] = _mm256_or_si256(v[1], _mm256_sll_epi32(_mm256_and_si256(b1, lo4), sh));
  v[2] = _mm256_or_si256(v[2], _mm256_sll_epi32(_mm256_srli_epi32(b0, 4), sh));
  v[3] = _mm256_or_si256(v[3], _mm256_sll_epi32(_mm256_srli_epi32(b1, 4), sh));
}
MPQ_AVX2 inline void or_plane2_avx2(const uint8_t* q, __m256i* v, int shift) {
  const __m256i lo2 = _mm256_set1_epi32(3);
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  const __m128i sh = _mm_cvtsi32_si128(shift);
  for (int s = 0; s < 4; ++s) {  // sub-block s (weights 8s..8s+7) sits at bits 2s of each byte
    v[s] = _mm256_or_si256(v[s], _mm256_sll_epi32(_mm256_and_si256(b, lo2), sh));
    b = _mm256_srli_epi32(b, 2);
  }
}
MPQ_AVX2 inline void or_plane1_avx2(const uint8_t* q, __m256i* v, int shift) {
  uint32_t mask;
  std::memcpy(&mask, q, 4);
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i bit = _mm256_set1_epi32(1 << shift);
  for (int s = 0; s < 4; ++s) {
    __m256i m = _mm256_set1_epi32(static_cast<int>((mask >> (8 * s)) & 255));
    __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(m, sel), sel);
    v[s] = _mm256_or_si256(v[s], _mm256_and_si256(on, bit));
  }
}

template <int BITS>
MPQ_AVX2 inline void unpack_avx2(const uint8_t* q, __m256* w) {
  __m256i v[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  if constexpr (BITS == 2 || BITS == 3) or_plane2_avx2(q, v, 0);
  if constexpr (BITS == 3) or_plane1_avx2(q + 8, v, 2);
  if constexpr (BITS >= 4 && BITS <= 6) or_plane4_avx2(q, v, 0);
  if constexpr (BITS == 5) or_plane1_avx2(q + 16, v, 4);
  if constexpr (BITS == 6) or_plane1_avx2(q + 16, v, 4), or_plane1_avx2(q + 20, v, 5);
  if constexpr (BITS == 8)
    for (int s = 0; s < 4; ++s)
      v[s] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * s)));
  const __m256i off = _mm256_set1_epi32(1 << (BITS - 1));
  for (int s = 0; s < 4; ++s) w[s] = _mm256_cvtepi32_ps(_mm256_sub_epi32(v[s], off));
}

MPQ_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MT rows of x against one output column: per row four partial sums (one per 8 weights), scaled per group.
template <int BITS, int MT>
MPQ_AVX2 void tile_avx2(const Problem& p, const Activations& a, int64_t r0, int64_t col) {
  const int64_t kp = p.k_pad, g = p.groups(), per_group = p.group / BLOCK;
  const uint8_t* wq = p.w + col * p.row_bytes();
  __m256 total[MT];
  for (int r = 0; r < MT; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < g; ++gi) {
    __m256 acc[MT][4];
    for (int r = 0; r < MT; ++r)
      for (int s = 0; s < 4; ++s) acc[r][s] = _mm256_setzero_ps();
    for (int64_t b = gi * per_group; b < (gi + 1) * per_group; ++b) {
      __m256 w[4];
      unpack_avx2<BITS>(wq + b * 4 * BITS, w);
      for (int r = 0; r < MT; ++r) {
        const float* xr = a.f32.data() + (r0 + r) * kp + b * BLOCK;
        for (int s = 0; s < 4; ++s) acc[r][s] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8 * s), w[s], acc[r][s]);
      }
    }
    const __m256 sc = _mm256_set1_ps(load_half(p.scale, col * g + gi, p.scale_bf16));
    for (int r = 0; r < MT; ++r) {
      __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]));
      total[r] = _mm256_fmadd_ps(sum, sc, total[r]);
    }
  }
  for (int r = 0; r < MT; ++r) p.y[(r0 + r) * p.n + col] = finish(p, a, r0 + r, col, hsum_avx2(total[r]));
}

template <int BITS>
MPQ_AVX2 void gemm_avx2_bits(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  constexpr int64_t NB = 32;  // columns whose weights stay in L1/L2 while the row tiles pass over them
  for (int64_t c0 = n0; c0 < n1; c0 += NB) {
    const int64_t c1 = std::min(c0 + NB, n1);
    int64_t r = 0;
    for (; r + 4 <= p.m; r += 4)
      for (int64_t c = c0; c < c1; ++c) tile_avx2<BITS, 4>(p, a, r, c);
    for (; r < p.m; ++r)
      for (int64_t c = c0; c < c1; ++c) tile_avx2<BITS, 1>(p, a, r, c);
  }
}

void gemm_avx2(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  switch (p.bits) {
    case 2: gemm_avx2_bits<2>(p, a, n0, n1); break;
    case 3: gemm_avx2_bits<3>(p, a, n0, n1); break;
    case 4: gemm_avx2_bits<4>(p, a, n0, n1); break;
    case 5: gemm_avx2_bits<5>(p, a, n0, n1); break;
    case 6: gemm_avx2_bits<6>(p, a, n0, n1); break;
    case 8: gemm_avx2_bits<8>(p, a, n0, n1); break;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// AVX-512 path: 32 levels as 32 16-bit lanes, mapped to bf16 values by a table lookup, vdpbf16ps against bf16 x
// ------------------------------------------------------------------------------------------------------------------
#define MPQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

template <int BITS>
struct Lut512 {
  __m512i lo, hi;  // bf16 bits of the value of index i = 0..31 and 32..63 (see make_lut512)
};

// vpermw reads the low 5 bits of each lane (6 with two tables). Pure 2- and 4-bit planes leave the next plane's
// bits above their field, so their table maps index i to the value of i's low 2 or 4 bits: no mask needed.
template <int BITS>
MPQ_AVX512 Lut512<BITS> make_lut512() {
  alignas(64) uint16_t t[64];
  const int field = BITS == 2 ? 3 : BITS == 4 ? 15 : 63;
  for (int i = 0; i < 64; ++i) t[i] = c10::BFloat16(static_cast<float>((i & field) - (1 << (BITS - 1)))).x;
  return {_mm512_load_si512(t), _mm512_load_si512(t + 32)};
}

template <int BITS>
MPQ_AVX512 inline __m512i unpack_avx512(const uint8_t* q, const Lut512<BITS>& lut) {
  __m512i v;
  if constexpr (BITS == 8) {
    v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    v = _mm512_sub_epi16(v, _mm512_set1_epi16(128));
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(v)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(v, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // exact: |value| <= 128
  } else {
    if constexpr (BITS >= 4) {  // 4-bit plane: 16 bytes loaded twice (a broadcast: no shuffle), lanes 16-31 >> 4
      const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      v = _mm512_srlv_epi16(_mm512_cvtepu8_epi16(b), _mm512_set_epi64(
          0x0004000400040004LL, 0x0004000400040004LL, 0x0004000400040004LL, 0x0004000400040004LL, 0, 0, 0, 0));
      if constexpr (BITS > 4) v = _mm512_and_si512(v, _mm512_set1_epi16(15));
    } else {  // 2-bit plane: 8 bytes loaded four times, lanes shifted by 0, 2, 4, 6
      const __m256i b = _mm256_set1_epi64x(*reinterpret_cast<const int64_t*>(q));
      v = _mm512_srlv_epi16(_mm512_cvtepu8_epi16(b), _mm512_set_epi64(
          0x0006000600060006LL, 0x0006000600060006LL, 0x0004000400040004LL, 0x0004000400040004LL,
          0x0002000200020002LL, 0x0002000200020002LL, 0, 0));
      if constexpr (BITS > 2) v = _mm512_and_si512(v, _mm512_set1_epi16(3));
    }
    // 1-bit planes are lane masks: one masked add each
    constexpr int base = BITS >= 4 ? 4 : 2;
    if constexpr (BITS == 3 || BITS == 5 || BITS == 6) {
      uint32_t m;
      std::memcpy(&m, q + 4 * base, 4);
      v = _mm512_mask_add_epi16(v, static_cast<__mmask32>(m), v, _mm512_set1_epi16(1 << base));
    }
    if constexpr (BITS == 6) {
      uint32_t m;
      std::memcpy(&m, q + 4 * base + 4, 4);
      v = _mm512_mask_add_epi16(v, static_cast<__mmask32>(m), v, _mm512_set1_epi16(1 << (base + 1)));
    }
    if constexpr (BITS == 6) return _mm512_permutex2var_epi16(lut.lo, v, lut.hi);
    else return _mm512_permutexvar_epi16(v, lut.lo);
  }
}

MPQ_AVX512 inline __m512 dot_bf16(__m512 acc, __m512i x, __m512i w) {
  return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
}

// MT rows of x against NR output columns over blocks [b0, b1): MT*NR independent dot-product chains, each
// group's sum scaled as it ends; the chunk's total is added to y (which holds the earlier chunks' totals).
template <int BITS, int MT, int NR>
MPQ_AVX512 void tile_avx512(const Problem& p, const Activations& a, const Lut512<BITS>& lut, int64_t r0,
                            int64_t c0, int64_t b0, int64_t b1) {
  const int64_t kp = p.k_pad, g = p.groups(), per_group = p.group / BLOCK;
  const int64_t rb = p.row_bytes();
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(a.bf16.data());
  __m512 total[MT][NR];
  for (int r = 0; r < MT; ++r)
    for (int c = 0; c < NR; ++c) total[r][c] = _mm512_setzero_ps();
  for (int64_t gi = b0 / per_group; gi * per_group < b1; ++gi) {
    __m512 acc[MT][NR];
    for (int r = 0; r < MT; ++r)
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
    const int64_t e = std::min(b1, (gi + 1) * per_group);
    for (int64_t b = std::max(b0, gi * per_group); b < e; ++b) {
      __m512i w[NR];
      for (int c = 0; c < NR; ++c) w[c] = unpack_avx512<BITS>(p.w + (c0 + c) * rb + b * 4 * BITS, lut);
      for (int r = 0; r < MT; ++r) {
        const __m512i x = _mm512_loadu_si512(xb + (r0 + r) * kp + b * BLOCK);
        for (int c = 0; c < NR; ++c) acc[r][c] = dot_bf16(acc[r][c], x, w[c]);
      }
    }
    for (int c = 0; c < NR; ++c) {
      const __m512 sc = _mm512_set1_ps(load_half(p.scale, (c0 + c) * g + gi, p.scale_bf16));
      for (int r = 0; r < MT; ++r) total[r][c] = _mm512_fmadd_ps(acc[r][c], sc, total[r][c]);
    }
  }
  for (int r = 0; r < MT; ++r)
    for (int c = 0; c < NR; ++c) p.y[(r0 + r) * p.n + c0 + c] += _mm512_reduce_add_ps(total[r][c]);
}

// Columns [c0, c1) for rows [r0, r0 + MT): NR columns at a time, then one at a time.
template <int BITS, int MT, int NR>
MPQ_AVX512 void columns_avx512(const Problem& p, const Activations& a, const Lut512<BITS>& lut, int64_t r0,
                               int64_t c0, int64_t c1, int64_t b0, int64_t b1) {
  int64_t c = c0;
  for (; c + NR <= c1; c += NR) tile_avx512<BITS, MT, NR>(p, a, lut, r0, c, b0, b1);
  for (; c < c1; ++c) tile_avx512<BITS, MT, 1>(p, a, lut, r0, c, b0, b1);
}

template <int BITS>
MPQ_AVX512 void gemm_avx512_bits(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  const Lut512<BITS> lut = make_lut512<BITS>();
  // K in chunks of 1024 and columns in chunks of 32, so that a 6-row tile of x (12 KB) and the chunk's weights
  // (at most 32 KB) stay in L1 while the tiles pass over them.
  constexpr int64_t NB = 32, KB = 1024 / BLOCK;
  for (int64_t r = 0; r < p.m; ++r)
    for (int64_t c = n0; c < n1; ++c) p.y[r * p.n + c] = 0.f;
  const int64_t blocks = p.k_pad / BLOCK;
  for (int64_t b0 = 0; b0 < blocks; b0 += KB) {
    const int64_t b1 = std::min(b0 + KB, blocks);
    for (int64_t c0 = n0; c0 < n1; c0 += NB) {
      const int64_t c1 = std::min(c0 + NB, n1);
      // Row tiles of 6 against 2 columns (12 dot-product chains and their 12 group totals: 24 of the 32
      // registers); the last rows take more columns at once, so that enough chains hide vdpbf16ps's latency.
      int64_t r = 0;
      for (; r + 6 <= p.m; r += 6) columns_avx512<BITS, 6, 2>(p, a, lut, r, c0, c1, b0, b1);
      switch (p.m - r) {
        case 5: columns_avx512<BITS, 5, 2>(p, a, lut, r, c0, c1, b0, b1); break;
        case 4: columns_avx512<BITS, 4, 3>(p, a, lut, r, c0, c1, b0, b1); break;
        case 3: columns_avx512<BITS, 3, 4>(p, a, lut, r, c0, c1, b0, b1); break;
        case 2: columns_avx512<BITS, 2, 6>(p, a, lut, r, c0, c1, b0, b1); break;
        case 1: columns_avx512<BITS, 1, 8>(p, a, lut, r, c0, c1, b0, b1); break;
        default: break;
      }
    }
  }
  for (int64_t r = 0; r < p.m; ++r)
    for (int64_t c = n0; c < n1; ++c) p.y[r * p.n + c] = finish(p, a, r, c, p.y[r * p.n + c]);
}

void gemm_avx512(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  switch (p.bits) {
    case 2: gemm_avx512_bits<2>(p, a, n0, n1); break;
    case 3: gemm_avx512_bits<3>(p, a, n0, n1); break;
    case 4: gemm_avx512_bits<4>(p, a, n0, n1); break;
    case 5: gemm_avx512_bits<5>(p, a, n0, n1); break;
    case 6: gemm_avx512_bits<6>(p, a, n0, n1); break;
    case 8: gemm_avx512_bits<8>(p, a, n0, n1); break;
  }
}
#endif  // MPQ_X86

// ------------------------------------------------------------------------------------------------------------------
// Checks and entry points
// ------------------------------------------------------------------------------------------------------------------
void check_bits(int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8,
              "mpq_cpu: weight bits ", bits, " not supported: use 2, 3, 4, 5, 6 or 8");
}

Problem make_problem(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                     int64_t bits, int64_t group, int64_t n, int64_t k, int64_t k_pad) {
  check_bits(bits);
  TORCH_CHECK(k_pad % BLOCK == 0 && k_pad >= k && k >= 1, "mpq_cpu: K_pad ", k_pad,
              " must be a multiple of 32 and at least K = ", k);
  TORCH_CHECK(group == 0 || (group % BLOCK == 0 && k_pad % group == 0), "mpq_cpu: group ", group,
              " must be 0 (per channel) or a multiple of 32 dividing K_pad = ", k_pad);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.device().is_cpu(),
              "mpq_cpu: packed weights must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(packed.numel() == n * k_pad * bits / 8, "mpq_cpu: packed weights hold ", packed.numel(),
              " bytes, expected N*K_pad*bits/8 = ", n * k_pad * bits / 8);
  const int64_t g = group == 0 ? 1 : k_pad / group;
  auto check_half = [&](const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, "mpq_cpu: ", what,
                " must be float16 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous() && t.numel() == n * g, "mpq_cpu: ", what, " must be contiguous [N, groups] = [",
                n, ", ", g, "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == scale.scalar_type(), "mpq_cpu: scale and zero must have one dtype");
  };
  check_half(scale, "scale");
  if (zero) check_half(*zero, "zero");
  Problem p{};
  p.n = n; p.k = k; p.k_pad = k_pad; p.group = group == 0 ? k_pad : group; p.bits = static_cast<int>(bits);
  p.w = packed.data_ptr<uint8_t>();
  p.scale = scale.data_ptr();
  p.zero = zero ? zero->data_ptr() : nullptr;
  p.scale_bf16 = scale.scalar_type() == at::kBFloat16;
  return p;
}

at::Tensor& wgemm_out(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scale,
                      const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias, int64_t bits,
                      int64_t group, int64_t n, int64_t k_pad, at::Tensor& out) {
  TORCH_CHECK(x_in.dim() == 2, "mpq_cpu.wgemm: x must be [M, K], got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "mpq_cpu.wgemm: x must be on the CPU");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "mpq_cpu.wgemm: x must be float32 or bfloat16, got ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  Problem p = make_problem(packed, scale, zero, bits, group, n, x.size(1), k_pad);
  p.m = x.size(0);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == p.m &&
                  out.size(1) == n,
              "mpq_cpu.wgemm: out must be a contiguous float32 [", p.m, ", ", n, "] tensor");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "mpq_cpu.wgemm: bias must be a contiguous float32 [N] tensor");
    p.bias = bias->data_ptr<float>();
  }
  p.y = out.data_ptr<float>();
  if (p.m == 0 || n == 0) return out;
  const int isa = g_isa.load();
  Activations a;
  prepare_activations(x, p, isa == AVX512, a);
  if (zero) zero_terms(p, *zero, a);
  // Columns split over ATen's threads (torch.get_num_threads()); small problems stay on one thread.
  const int64_t grain = std::max<int64_t>(32, (int64_t{1} << 20) / std::max<int64_t>(p.m * k_pad, 1));
  at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
#if MPQ_X86
    if (isa == AVX512) return gemm_avx512(p, a, n0, n1);
    if (isa == AVX2) return gemm_avx2(p, a, n0, n1);
#endif
    gemm_portable(p, a, n0, n1);
  });
  return out;
}

at::Tensor wgemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                 const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias, int64_t bits,
                 int64_t group, int64_t n, int64_t k_pad) {
  TORCH_CHECK(x.dim() == 2, "mpq_cpu.wgemm: x must be [M, K], got ", x.sizes());
  at::Tensor out = at::empty({x.size(0), n}, x.options().dtype(at::kFloat));
  return wgemm_out(x, packed, scale, zero, bias, bits, group, n, k_pad, out);
}

// Rows `ids` of a packed table [n, k_pad*bits/8], dequantized to fp32 [len(ids), k]: (u - 2^(b-1)) * s + z.
at::Tensor wembed(const at::Tensor& ids_in, const at::Tensor& packed, const at::Tensor& scale,
                  const c10::optional<at::Tensor>& zero, int64_t bits, int64_t group, int64_t n, int64_t k,
                  int64_t k_pad) {
  TORCH_CHECK(ids_in.scalar_type() == at::kLong || ids_in.scalar_type() == at::kInt,
              "mpq_cpu.wembed: ids must be int64 or int32");
  const at::Tensor ids = ids_in.to(at::kLong).contiguous().reshape({-1});
  Problem p = make_problem(packed, scale, zero, bits, group, n, k, k_pad);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t len = ids.numel();
  for (int64_t i = 0; i < len; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < n, "mpq_cpu.wembed: index ", id[i], " out of range for ", n, " rows");
  at::Tensor out = at::empty({len, k}, packed.options().dtype(at::kFloat));
  float* y = out.data_ptr<float>();
  const float off = static_cast<float>(1 << (bits - 1));
  const int64_t g = p.groups();
  at::parallel_for(0, len, 64, [&](int64_t i0, int64_t i1) {
    int32_t u[BLOCK];
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* row = p.w + id[i] * p.row_bytes();
      for (int64_t b = 0; b * BLOCK < k; ++b) {
        unpack_block_portable(row + b * 4 * bits, p.bits, u);
        for (int j = 0; j < BLOCK && b * BLOCK + j < k; ++j) {
          const int64_t c = b * BLOCK + j, gi = c / p.group;
          // two roundings (product, then sum), as fake-quant's (q - m) * s + z computes them
          float v = (static_cast<float>(u[j]) - off) * load_half(p.scale, id[i] * g + gi, p.scale_bf16);
          if (p.zero) v = v + load_half(p.zero, id[i] * g + gi, p.scale_bf16);
          y[i * k + c] = v;
        }
      }
    }
  });
  return out;
}

std::string isa() { return ISA_NAMES[g_isa.load()]; }
std::string best() { return ISA_NAMES[best_isa()]; }
// Cap the code path (for tests and benchmarks); a path the CPU lacks falls back to the best it has.
std::string set_isa(const std::string& name) {
  g_isa.store(std::min(parse_isa(name), best_isa()));
  return isa();
}

}  // namespace

TORCH_LIBRARY(mpq_cpu, m) {
  m.def("wgemm(Tensor x, Tensor packed, Tensor scale, Tensor? zero, Tensor? bias, int bits, int group, int n, "
        "int k_pad) -> Tensor");
  m.def("wgemm_out(Tensor x, Tensor packed, Tensor scale, Tensor? zero, Tensor? bias, int bits, int group, int n, "
        "int k_pad, Tensor(a!) out) -> Tensor(a!)");
  m.def("wembed(Tensor ids, Tensor packed, Tensor scale, Tensor? zero, int bits, int group, int n, int k, "
        "int k_pad) -> Tensor");
  m.def("isa() -> str", &isa);
  m.def("best_isa() -> str", &best);
  m.def("set_isa(str name) -> str", &set_isa);
}

TORCH_LIBRARY_IMPL(mpq_cpu, CPU, m) {
  m.impl("wgemm", &wgemm);
  m.impl("wgemm_out", &wgemm_out);
  m.impl("wembed", &wembed);
}

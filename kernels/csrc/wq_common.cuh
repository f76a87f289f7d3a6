// Device helpers shared by mpq's weight-streaming decode kernels (wq_decode: 2- to 8-bit weights with bf16
// activations; w8_decode: INT8 / FP8 weights with activations quantised in the kernel). No torch and no CUTLASS
// here, so the kernels compile on their own (nvcc -arch=sm_80 / sm_90a) for resource checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mpq {
namespace wq {

constexpr int kWarps = 8;  // warps per block: they split the k chunks of the block's rows

// D += A * B on bf16 tensor cores, fp32 accumulators (m16n8k16; sm_80+).
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D += A * B on INT8 tensor cores, int32 accumulators (m16n8k32; sm_80+).
__device__ __forceinline__ void mma_s8_16832(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D += A * B on FP8 (E4M3) tensor cores, fp32 accumulators (m16n8k32; sm_89+). Older targets never call it.
__device__ __forceinline__ void mma_e4m3_16832(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// Weights are read once: keep them out of L1, which holds the activations that every warp reads.
__device__ __forceinline__ uint4 ldg_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint2 ldg_stream8(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t ldg_stream4(const void* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

// Activations: read-only, shared by all warps of an SM (L1 hits after the first).
__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ uint32_t bf16x2_sub(uint32_t a, uint32_t b) {
  __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
  return *reinterpret_cast<uint32_t*>(&r);
}

// The two floats of a bf16 pair (low half first): bf16 is the top half of a float.
__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }

// The two floats of a stored scale pair (row g, row g + 8), bf16 or fp16.
__device__ __forceinline__ float2 scale_pair(uint32_t w, bool fp16) {
  if (fp16) return __half22float2(*reinterpret_cast<__half2*>(&w));
  return make_float2(bf16_lo(w), bf16_hi(w));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&r);
}

// (a & mask) | c as one LOP3 (c a register, so that the compiler does not split it into two immediates' LOP3s).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(mask), "r"(c));
  return d;
}

// Programmatic dependent launch (sm_90): let the next kernel in the stream start (its blocks are placed only once
// every block of this grid has signalled), and wait for the previous kernel's results before touching them. Both are
// no-ops when the launch carried no programmatic-serialization attribute, and absent before sm_90.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait_for_inputs() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Launch attributes shared by the decode kernels: programmatic serialization (pdl) and a cluster size.
struct LaunchAttrs {
  cudaLaunchAttribute attr[2];
  int count = 0;
  LaunchAttrs(bool pdl, unsigned cluster) {
    if (pdl) {
      attr[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[count].val.programmaticStreamSerializationAllowed = 1;
      ++count;
    }
    if (cluster > 1) {
      attr[count].id = cudaLaunchAttributeClusterDimension;
      attr[count].val.clusterDim.x = cluster;
      attr[count].val.clusterDim.y = 1;
      attr[count].val.clusterDim.z = 1;
      ++count;
    }
  }
  void apply(cudaLaunchConfig_t& cfg) {
    cfg.attrs = count ? attr : nullptr;
    cfg.numAttrs = count;
  }
};

// Bits src and 16 + src of w moved to dst and 16 + dst (the other bits are masked off by the caller).
__device__ __forceinline__ uint32_t move_bits(uint32_t w, int src, int dst) {
  return src >= dst ? w >> (src - dst) : w << (dst - src);
}

}  // namespace wq
}  // namespace mpq

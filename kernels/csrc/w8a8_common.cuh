// Shared by the W8A8 extensions (sm_90 and sm_80): the operand checks of their GEMM ops, and the per-token INT8
// quantisation of activations, which each registers as its own quantize_int8_rows op.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>
#include <tuple>

namespace mpq {
namespace {

// Checks the GEMM op's operands (naming the op) and allocates its m x n output.
inline torch::Tensor w8a8_output(char const* op, torch::Tensor const& a, torch::Tensor const& w,
                                 torch::Tensor const& a_scale, torch::Tensor const& w_scale,
                                 std::optional<torch::Tensor> const& bias, at::ScalarType out_dtype) {
  TORCH_CHECK(a.is_cuda() && w.is_cuda(), "mpq ", op, ": tensors must be on a CUDA device");
  TORCH_CHECK(a.scalar_type() == at::kChar && w.scalar_type() == at::kChar, "mpq ", op, ": a and w must be int8");
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.size(1) == w.size(1), "mpq ", op, ": a is m x k, w is n x k; got ",
              a.sizes(), " and ", w.sizes());
  TORCH_CHECK(a.is_contiguous() && w.is_contiguous(), "mpq ", op, ": a and w must be contiguous");
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && a_scale.numel() == a.size(0) && a_scale.is_contiguous(),
              "mpq ", op, ": a_scale must be float32 with one value per row of a");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == w.size(0) && w_scale.is_contiguous(),
              "mpq ", op, ": w_scale must be float32 with one value per row of w");
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf, "mpq ", op, ": output bf16 or fp16");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == out_dtype && bias->numel() == w.size(0) && bias->is_contiguous(),
                "mpq ", op, ": bias must have the output dtype and one value per output column");
  }
  return torch::empty({a.size(0), w.size(0)}, a.options().dtype(out_dtype));
}

// Per-token symmetric INT8 quantisation, fake-quant's rule exactly: scale = amax * (1 / 127) in float32 (1 for an
// all-zero row), q = clamp(round_half_even(x / scale), -127, 127). One block per row; the row is read twice (amax,
// then quantise), which for k <= 16384 bf16 stays in L2.
// torch's extension build defines __CUDA_NO_BFLOAT16_CONVERSIONS__ / __CUDA_NO_HALF_CONVERSIONS__: convert explicitly
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <class T, int kThreads>
__global__ void quantize_rows_int8(T const* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale,
                                   int k) {
  int row = blockIdx.x;
  T const* xr = x + static_cast<int64_t>(row) * k;
  float amax = 0.f;
  for (int i = threadIdx.x; i < k; i += kThreads) amax = fmaxf(amax, fabsf(to_float(xr[i])));
  for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, offset));
  __shared__ float warp_amax[kThreads / 32];
  if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    amax = threadIdx.x < kThreads / 32 ? warp_amax[threadIdx.x] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, offset));
    if (threadIdx.x == 0) warp_amax[0] = amax;
  }
  __syncthreads();
  amax = warp_amax[0];
  // torch divides by a Python number as a multiplication by its float reciprocal: so does this
  float s = amax > 0.f ? __fmul_rn(amax, 1.f / 127.f) : 1.f;
  if (threadIdx.x == 0) scale[row] = s;
  int8_t* qr = q + static_cast<int64_t>(row) * k;
  for (int i = threadIdx.x; i < k; i += kThreads) {
    float v = rintf(__fdiv_rn(to_float(xr[i]), s));
    qr[i] = static_cast<int8_t>(fminf(fmaxf(v, -127.f), 127.f));
  }
}

std::tuple<torch::Tensor, torch::Tensor> quantize_int8_rows(torch::Tensor const& x) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "mpq quantize_int8_rows: a 2-d CUDA tensor");
  auto xc = x.contiguous();
  int64_t m = xc.size(0), k = xc.size(1);
  c10::cuda::CUDAGuard guard(xc.device());
  auto q = torch::empty({m, k}, xc.options().dtype(torch::kInt8));
  auto s = torch::empty({m}, xc.options().dtype(torch::kFloat));
  if (m == 0) return {q, s};
  constexpr int kThreads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream(xc.get_device());
  switch (xc.scalar_type()) {
    case at::kBFloat16:
      quantize_rows_int8<__nv_bfloat16, kThreads><<<m, kThreads, 0, stream>>>(
          reinterpret_cast<__nv_bfloat16 const*>(xc.data_ptr()), q.data_ptr<int8_t>(), s.data_ptr<float>(), k);
      break;
    case at::kHalf:
      quantize_rows_int8<__half, kThreads><<<m, kThreads, 0, stream>>>(
          reinterpret_cast<__half const*>(xc.data_ptr()), q.data_ptr<int8_t>(), s.data_ptr<float>(), k);
      break;
    case at::kFloat:
      quantize_rows_int8<float, kThreads><<<m, kThreads, 0, stream>>>(xc.data_ptr<float>(), q.data_ptr<int8_t>(),
                                                                      s.data_ptr<float>(), k);
      break;
    default:
      TORCH_CHECK(false, "mpq quantize_int8_rows: bf16, fp16 or fp32 input, got ", xc.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, s};
}

}  // namespace
}  // namespace mpq

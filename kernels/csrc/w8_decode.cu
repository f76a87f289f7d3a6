// Torch op of the fused INT8 / FP8 decode kernel (w8_decode.cuh): operand checks, then the launch. Called by the
// W8A8 and FP8 modules (mpq.kernels.cutlass_w8a8, mpq.kernels.cuda_fp8) at decode sizes.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <optional>

#include "w8_decode.cuh"

namespace mpq {
namespace w8 {
extern template cudaError_t launch<kInt8>(const Args&, int);
extern template cudaError_t launch<kE4M3>(const Args&, int);

namespace {

// y = s_x * s_w * (q(x) @ w.T) (+ bias) for bf16 x [m, k], with x quantised per token inside the kernel: INT8
// (fmt 0, w int8) or E4M3 (fmt 1, w float8_e4m3fn). config 1-4 (see w8_decode.cuh); cluster 1, 2, 4 or 8 blocks
// share the activation-amax pass (more than 1 needs sm_90); pdl: programmatic stream serialization (sm_90).
torch::Tensor w8_decode(torch::Tensor const& x, torch::Tensor const& w, torch::Tensor const& w_scale,
                        std::optional<torch::Tensor> const& bias, int64_t fmt, int64_t config, int64_t cluster,
                        bool pdl) {
  TORCH_CHECK(fmt == kInt8 || fmt == kE4M3, "mpq w8_decode: fmt 0 (int8) or 1 (e4m3), got ", fmt);
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && w_scale.is_cuda(), "mpq w8_decode: CUDA tensors");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "mpq w8_decode: x must be a contiguous bf16 m x k matrix, got ", x.scalar_type(), " ", x.sizes());
  const auto wtype = fmt == kInt8 ? at::kChar : at::kFloat8_e4m3fn;
  TORCH_CHECK(w.scalar_type() == wtype && w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1),
              "mpq w8_decode: w must be contiguous ", fmt == kInt8 ? "int8" : "float8_e4m3fn", " [n, k] with k=",
              x.size(1), ", got ", w.scalar_type(), " ", w.sizes());
  const int64_t n = w.size(0), k = x.size(1);
  TORCH_CHECK(k % 16 == 0 && k > 0, "mpq w8_decode: k=", k, " must be a positive multiple of 16");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == n,
              "mpq w8_decode: w_scale must be float32 with one value per row of w (", n, "), got ",
              w_scale.scalar_type(), " with ", w_scale.numel());
  if (bias) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "mpq w8_decode: bias must be float32 with n=", n, " values");
  }
  TORCH_CHECK(config >= 1 && config <= kConfigs, "mpq w8_decode: configuration 1 to ", kConfigs, ", got ", config);
  TORCH_CHECK(cluster == 1 || cluster == 2 || cluster == 4 || cluster == 8,
              "mpq w8_decode: cluster 1, 2, 4 or 8, got ", cluster);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
              "mpq w8_decode: x and w must be 16-byte aligned");
  c10::cuda::CUDAGuard guard(x.device());
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device());
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, x.get_device());
  TORCH_CHECK(cluster == 1 || major >= 9, "mpq w8_decode: clusters need sm_90, this GPU is sm_", major, minor);
  TORCH_CHECK(fmt == kInt8 || major * 10 + minor >= 89, "mpq w8_decode: FP8 needs sm_89 or newer, this GPU is sm_",
              major, minor);
  auto y = torch::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return y;
  Args a{};
  a.x = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
  a.w = reinterpret_cast<const uint8_t*>(w.data_ptr());
  a.w_scale = w_scale.data_ptr<float>();
  a.bias = bias ? bias->data_ptr<float>() : nullptr;
  a.y = reinterpret_cast<__nv_bfloat16*>(y.data_ptr());
  a.M = int(x.size(0)), a.N = int(n), a.K = int(k);
  a.cluster = int(cluster);
  a.pdl = pdl && major >= 9;
  a.stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = fmt == kInt8 ? launch<kInt8>(a, int(config)) : launch<kE4M3>(a, int(config));
  TORCH_CHECK(err == cudaSuccess, "mpq w8_decode: launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace
}  // namespace w8
}  // namespace mpq

TORCH_LIBRARY(mpq_w8_decode, m) {
  m.def("w8_decode(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, int fmt, int config, int cluster, "
        "bool pdl=False) -> Tensor");
  m.impl("w8_decode", torch::kCUDA, &mpq::w8::w8_decode);
}

// Torch ops of the low-bit weight kernels (wq_decode.cuh): operand checks, then the launch of the bit width's
// instantiation (wq_decode_b<N>.cu). mpq.kernels.cuda_lowbit calls them.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <optional>

#include "wq_decode.cuh"

namespace mpq {
namespace wq {
#define MPQ_WQ_EXTERN(B)                                                        \
  extern template cudaError_t launch_decode<B, 0>(const DecodeArgs&, int);      \
  extern template cudaError_t launch_decode<B, 1>(const DecodeArgs&, int);      \
  extern template cudaError_t launch_decode<B, 2>(const DecodeArgs&, int);      \
  extern template cudaError_t launch_decode<B, 4>(const DecodeArgs&, int);      \
  extern template cudaError_t launch_dequant<B>(const DecodeArgs&, __nv_bfloat16*);
MPQ_WQ_EXTERN(2)
MPQ_WQ_EXTERN(3)
MPQ_WQ_EXTERN(4)
MPQ_WQ_EXTERN(5)
MPQ_WQ_EXTERN(6)
#undef MPQ_WQ_EXTERN
extern template cudaError_t launch_decode<8, 0>(const DecodeArgs&, int);  // 8 bits: per channel only
extern template cudaError_t launch_dequant<8>(const DecodeArgs&, __nv_bfloat16*);

namespace {

// The checks both ops share; returns the launch arguments without x, y and bias.
DecodeArgs packed_args(char const* op, torch::Tensor const& packed, torch::Tensor const& scale, int64_t bits,
                       int64_t n, int64_t k, int64_t group) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8, "mpq ", op,
              ": bits must be 2, 3, 4, 5, 6 or 8, got ", bits);
  TORCH_CHECK(group == 0 || group == 32 || group == 64 || group == 128, "mpq ", op,
              ": group must be 32, 64, 128 or 0 (per channel), got ", group);
  TORCH_CHECK(bits != 8 || group == 0, "mpq ", op, ": 8-bit weights have per-channel scales (group 0), got group ",
              group);
  TORCH_CHECK(n > 0 && k > 0 && k % 8 == 0, "mpq ", op, ": n=", n, " must be positive and k=", k,
              " a positive multiple of 8");
  TORCH_CHECK(packed.is_cuda() && scale.is_cuda(), "mpq ", op, ": packed and scale must be CUDA tensors");
  const int64_t tiles = (n + 15) / 16, chunks = (k + 127) / 128;
  const int64_t bytes = tiles * chunks * 256 * bits;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == bytes, "mpq ", op,
              ": packed must be contiguous uint8 with ", bytes, " bytes for ", bits, "-bit n=", n, " k=", k,
              " (mpq.kernels.cuda_lowbit.pack_lowbit), got ", packed.scalar_type(), " with ", packed.numel());
  const int64_t scales = tiles * 16 * (group ? chunks * (128 / group) : 1);
  TORCH_CHECK((scale.scalar_type() == at::kBFloat16 || scale.scalar_type() == at::kHalf) && scale.is_contiguous() &&
                  scale.numel() == scales,
              "mpq ", op, ": scale must be contiguous bf16 or fp16 with ", scales, " values (tiled, group ", group,
              "), got ", scale.scalar_type(), " with ", scale.numel());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(scale.data_ptr()) % 16 == 0,
              "mpq ", op, ": packed and scale must be 16-byte aligned");
  DecodeArgs a{};
  a.w = packed.data_ptr<uint8_t>();
  a.scale = reinterpret_cast<const uint32_t*>(scale.data_ptr());
  a.N = int(n), a.K = int(k), a.C = int(chunks);
  a.bpg = int(group / 32);
  a.scale_fp16 = scale.scalar_type() == at::kHalf;
  return a;
}

template <int BITS>
cudaError_t decode_group(const DecodeArgs& a, int config) {
  switch (a.bpg) {
    case 0: return launch_decode<BITS, 0>(a, config);
    case 1: return launch_decode<BITS, 1>(a, config);
    case 2: return launch_decode<BITS, 2>(a, config);
    default: return launch_decode<BITS, 4>(a, config);
  }
}

cudaError_t dispatch_decode(int64_t bits, const DecodeArgs& a, int config) {
  switch (bits) {
    case 2: return decode_group<2>(a, config);
    case 3: return decode_group<3>(a, config);
    case 4: return decode_group<4>(a, config);
    case 5: return decode_group<5>(a, config);
    case 6: return decode_group<6>(a, config);
    default: return launch_decode<8, 0>(a, config);
  }
}

cudaError_t dispatch_dequant(int64_t bits, const DecodeArgs& a, __nv_bfloat16* out) {
  switch (bits) {
    case 2: return launch_dequant<2>(a, out);
    case 3: return launch_dequant<3>(a, out);
    case 4: return launch_dequant<4>(a, out);
    case 5: return launch_dequant<5>(a, out);
    case 6: return launch_dequant<6>(a, out);
    default: return launch_dequant<8>(a, out);
  }
}

// y = x @ (s * q).T (+ bias) for bf16 x [m, k]: the decode kernel. config 1-5 (row tiles per block, chunks in
// flight): see wq_decode.cuh; m_tiles 0 picks 8, 16 or 32 tokens a pass by m (1, 2 or 4); pdl launches it with
// programmatic stream serialization (sm_90: it streams weights while the previous kernel finishes).
torch::Tensor wq_decode(torch::Tensor const& x, torch::Tensor const& packed, torch::Tensor const& scale,
                        std::optional<torch::Tensor> const& bias, int64_t bits, int64_t n, int64_t group,
                        int64_t config, int64_t m_tiles, bool pdl) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "mpq wq_decode: x must be a contiguous bf16 m x k CUDA matrix, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "mpq wq_decode: x must be 16-byte aligned");
  DecodeArgs a = packed_args("wq_decode", packed, scale, bits, n, x.size(1), group);
  TORCH_CHECK(config >= 1 && config <= kDecodeConfigs, "mpq wq_decode: configuration 1 to ", kDecodeConfigs,
              ", got ", config);
  TORCH_CHECK(m_tiles == 0 || m_tiles == 1 || m_tiles == 2 || m_tiles == 4,
              "mpq wq_decode: m_tiles 0 (by m), 1, 2 or 4, got ", m_tiles);
  if (bias) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "mpq wq_decode: bias must be float32 with n=", n, " values, got ", bias->scalar_type(), " with ",
                bias->numel());
  }
  c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return y;
  a.x = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
  a.y = reinterpret_cast<__nv_bfloat16*>(y.data_ptr());
  a.bias = bias ? bias->data_ptr<float>() : nullptr;
  a.M = int(x.size(0));
  a.m_tiles = int(m_tiles);
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device());
  a.pdl = pdl && major >= 9;
  a.stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = dispatch_decode(bits, a, int(config));
  TORCH_CHECK(err != cudaErrorNotSupported, "mpq wq_decode: configuration ", config, " has no 32-token (m_tiles=4) ",
              "build: use 1 or 4");
  TORCH_CHECK(err == cudaSuccess, "mpq wq_decode: launch failed: ", cudaGetErrorString(err));
  return y;
}

// The bf16 weight [n, k] of the packed layout (the prefill path's operand for cuBLAS).
torch::Tensor wq_dequant(torch::Tensor const& packed, torch::Tensor const& scale, int64_t bits, int64_t n, int64_t k,
                         int64_t group) {
  DecodeArgs a = packed_args("wq_dequant", packed, scale, bits, n, k, group);
  c10::cuda::CUDAGuard guard(packed.device());
  auto out = torch::empty({n, k}, packed.options().dtype(at::kBFloat16));
  a.stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = dispatch_dequant(bits, a, reinterpret_cast<__nv_bfloat16*>(out.data_ptr()));
  TORCH_CHECK(err == cudaSuccess, "mpq wq_dequant: launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace wq
}  // namespace mpq

TORCH_LIBRARY(mpq_wq_decode, m) {
  m.def("wq_decode(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int bits, int n, int group, int config, "
        "int m_tiles, bool pdl=False) -> Tensor");
  m.def("wq_dequant(Tensor packed, Tensor scale, int bits, int n, int k, int group) -> Tensor");
  m.impl("wq_decode", torch::kCUDA, &mpq::wq::wq_decode);
  m.impl("wq_dequant", torch::kCUDA, &mpq::wq::wq_dequant);
}

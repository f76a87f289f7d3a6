// W4A16 GEMM for Hopper (sm_90a): the op. w4a16_sm90 checks its operands and runs the tile configuration it is
// given (the Python wrapper picks one by m and group; w4a16_sm90.cuh has the kernel, w4a16_sm90_c<N>.cu the
// configurations). Built just in time by mpq.kernels.cuda_build; the op is torch.ops.mpq_cutlass_w4a16.w4a16_sm90.

#include "w4a16_sm90.cuh"

namespace mpq {
namespace {

torch::Tensor w4a16_sm90(torch::Tensor const& x, torch::Tensor const& w_packed, torch::Tensor const& scale,
                         int64_t group, int64_t config, int64_t decomposition, int64_t splits) {
  TORCH_CHECK(x.is_cuda() && w_packed.is_cuda() && scale.is_cuda(), "mpq w4a16_sm90: CUDA tensors");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "mpq w4a16_sm90: x must be a contiguous bf16 m x k matrix");
  TORCH_CHECK(w_packed.scalar_type() == at::kByte && w_packed.dim() == 2 && w_packed.is_contiguous() &&
                  w_packed.size(1) * 2 == x.size(1),
              "mpq w4a16_sm90: w_packed must be uint8 [n, k / 2] (two 4-bit values per byte); got ",
              w_packed.sizes(), " for k=", x.size(1));
  TORCH_CHECK(group == 64 || group == 128, "mpq w4a16_sm90: group 64 or 128, got ", group);
  TORCH_CHECK(x.size(1) % group == 0, "mpq w4a16_sm90: k=", x.size(1), " is not a multiple of the group ", group);
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(1) == w_packed.size(0) && scale.size(0) == x.size(1) / group,
              "mpq w4a16_sm90: scale must be bf16 [k / group, n] (MN-major), got ", scale.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({x.size(0), w_packed.size(0)}, x.options());
  if (x.size(0) == 0) return out;
  TORCH_CHECK(decomposition >= 0 && decomposition <= 3 && splits >= 1, "mpq w4a16_sm90: decomposition 0 to 3 and "
              "splits >= 1, got ", decomposition, " and ", splits);
  switch (config) {
    case 1: w4a16_sm90_config1(out, x, w_packed, scale, group, decomposition, splits); break;
    case 2: w4a16_sm90_config2(out, x, w_packed, scale, group, decomposition, splits); break;
    case 3:
      TORCH_CHECK(group == 128, "mpq w4a16_sm90: tile configuration 3 has a K tile of 128: group 128 only");
      w4a16_sm90_config3(out, x, w_packed, scale, group, decomposition, splits);
      break;
    case 4:
      TORCH_CHECK(group == 128, "mpq w4a16_sm90: tile configuration 4 has a K tile of 128: group 128 only");
      w4a16_sm90_config4(out, x, w_packed, scale, group, decomposition, splits);
      break;
    case 5: w4a16_sm90_config5(out, x, w_packed, scale, group, decomposition, splits); break;
    case 6: w4a16_sm90_config6(out, x, w_packed, scale, group, decomposition, splits); break;
    default: TORCH_CHECK(false, "mpq w4a16_sm90: tile configuration 1 to 6, got ", config);
  }
  return out;
}

// The weights reordered for the shuffled configurations (4 to 6); run once, when a layer is converted.
torch::Tensor w4a16_reorder(torch::Tensor const& w_packed) {
  TORCH_CHECK(w_packed.is_cuda() && w_packed.scalar_type() == at::kByte && w_packed.dim() == 2 &&
                  w_packed.is_contiguous(),
              "mpq w4a16_reorder: w_packed must be a contiguous CUDA uint8 [n, k / 2]");
  int n = w_packed.size(0), k = w_packed.size(1) * 2;
  TORCH_CHECK(n % 16 == 0 && k % 16 == 0, "mpq w4a16_reorder: n=", n, " and k=", k, " must be multiples of 16");
  c10::cuda::CUDAGuard guard(w_packed.device());
  auto out = torch::empty_like(w_packed);
  auto plain = make_layout(make_shape(n, k, 1), cutlass::make_cute_packed_stride(W4A16StrideW{}, make_shape(n, k, 1)));
  cutlass::reorder_tensor(reinterpret_cast<cutlass::int4b_t const*>(w_packed.data_ptr()), plain,
                          reinterpret_cast<cutlass::int4b_t*>(out.data_ptr()), w4a16_shuffled_layout(n, k));
  return out;
}

}  // namespace
}  // namespace mpq

TORCH_LIBRARY(mpq_cutlass_w4a16, m) {
  m.def("w4a16_sm90(Tensor x, Tensor w_packed, Tensor scale, int group, int config, int decomposition=0, "
        "int splits=1) -> Tensor");
  m.def("w4a16_reorder(Tensor w_packed) -> Tensor");
  m.impl("w4a16_sm90", torch::kCUDA, &mpq::w4a16_sm90);
  m.impl("w4a16_reorder", torch::kCUDA, &mpq::w4a16_reorder);
}

// W8A8 GEMM for Hopper (sm_90a): the ops. w8a8_sm90 checks its operands and runs the tile configuration it is
// given (the Python wrapper picks one by m; w8a8_sm90.cuh has the kernel, w8a8_sm90_c<N>.cu the configurations);
// quantize_int8_rows is the per-token activation quantisation that feeds it.
//
// Built just in time by mpq.kernels.cuda_build against the nvidia-cutlass wheel's headers; the ops are
// torch.ops.mpq_cutlass_w8a8.*.

#include "w8a8_common.cuh"
#include "w8a8_sm90.cuh"

namespace mpq {
namespace {

torch::Tensor w8a8_sm90(torch::Tensor const& a, torch::Tensor const& w, torch::Tensor const& a_scale,
                        torch::Tensor const& w_scale, std::optional<torch::Tensor> const& bias,
                        at::ScalarType out_dtype, int64_t config) {
  auto out = w8a8_output("w8a8_sm90", a, w, a_scale, w_scale, bias, out_dtype);
  c10::cuda::CUDAGuard guard(a.device());
  if (a.size(0) == 0) return out;
  switch (config) {
    case 1: w8a8_sm90_config1(out, a, w, a_scale, w_scale, bias); break;
    case 2: w8a8_sm90_config2(out, a, w, a_scale, w_scale, bias); break;
    case 3: w8a8_sm90_config3(out, a, w, a_scale, w_scale, bias); break;
    case 4: w8a8_sm90_config4(out, a, w, a_scale, w_scale, bias); break;
    case 5: w8a8_sm90_config5(out, a, w, a_scale, w_scale, bias); break;
    default: TORCH_CHECK(false, "mpq w8a8_sm90: tile configuration 1 to 5, got ", config);
  }
  return out;
}

}  // namespace
}  // namespace mpq

TORCH_LIBRARY(mpq_cutlass_w8a8, m) {
  m.def("w8a8_sm90(Tensor a, Tensor w, Tensor a_scale, Tensor w_scale, Tensor? bias, ScalarType out_dtype, "
        "int config) -> Tensor");
  m.def("quantize_int8_rows(Tensor x) -> (Tensor, Tensor)");
  m.impl("w8a8_sm90", torch::kCUDA, &mpq::w8a8_sm90);
  m.impl("quantize_int8_rows", torch::kCUDA, &mpq::quantize_int8_rows);
}

// W8A8 GEMM for Ampere (sm_80 and later), the kernel template shared by the per-configuration files:
// D[m, n] = a_scale[m] * w_scale[n] * sum_k A[m, k] * W[n, k] (+ bias[n]), as w8a8_sm90 computes it.
//
// CUTLASS 2's universal GEMM with the visitor epilogue: INT8 x INT8 -> INT32 on mma.sync (16 x 8 x 32, saturating),
// cp.async multistage mainloop; the per-token scale is a column broadcast, the per-channel scale and the bias row
// broadcasts of an epilogue visitor tree, bf16/fp16 stored by the tree's root. Activations row-major m x k, weights
// n x k (column-major k x n). Each tile configuration is compiled in its own file (w8a8_sm80_c<N>.cu).
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "sm90_common.cuh"  // sm_count

// in this order: the visitor headers assume the GEMM's
#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm_universal.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"

namespace mpq {

template <class OutT, class ThreadblockShape, class WarpShape, int Stages>
struct W8A8Sm80 {
  using ElementAB = int8_t;
  using ElementAcc = int32_t;
  using ElementCompute = float;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // W stored n x k
  using LayoutD = cutlass::layout::RowMajor;
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 32>;
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 16 / sizeof(OutT);
  static constexpr int kEpilogueStages = 1;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  using ThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<ThreadblockShape, WarpShape, OutT, kAlignD,
                                                                           kEpilogueStages>;
  using Acc = cutlass::epilogue::threadblock::VisitorAccFetch;
  using RowStride = cute::Stride<cute::_0, cute::_1, int32_t>;  // one value per output column
  using ColStride = cute::Stride<cute::_1, cute::_0, int32_t>;  // one value per output row
  using WScale = cutlass::epilogue::threadblock::VisitorRowBroadcast<ThreadMap, float, RowStride>;
  using AScale = cutlass::epilogue::threadblock::VisitorColBroadcast<ThreadMap, float, ColStride>;
  using Bias = cutlass::epilogue::threadblock::VisitorRowBroadcast<ThreadMap, OutT, RowStride>;
  using ScaleByW = cutlass::epilogue::threadblock::Sm80EVT<
      cutlass::epilogue::threadblock::VisitorCompute<cutlass::multiplies, float, float, kRound>, WScale, Acc>;
  using Dequant = cutlass::epilogue::threadblock::Sm80EVT<
      cutlass::epilogue::threadblock::VisitorCompute<cutlass::homogeneous_multiply_add, OutT, float, kRound>, AScale,
      ScaleByW, Bias>;
  using Store = cutlass::epilogue::threadblock::VisitorAuxStore<ThreadMap, OutT, kRound,
                                                                cute::Stride<int64_t, cute::_1, int64_t>>;
  using Epilogue = cutlass::epilogue::threadblock::Sm80EVT<Store, Dequant>;

  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      ElementAB, LayoutA, cutlass::ComplexTransform::kNone, kAlignAB, ElementAB, LayoutB,
      cutlass::ComplexTransform::kNone, kAlignAB, OutT, LayoutD, kAlignD, ElementAcc, ElementCompute,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, Epilogue,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Stages, cutlass::arch::OpMultiplyAddSaturate,
      kEpilogueStages>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(torch::Tensor& out, torch::Tensor const& a, torch::Tensor const& w, torch::Tensor const& a_scale,
                  torch::Tensor const& w_scale, std::optional<torch::Tensor> const& bias) {
    int m = a.size(0), k = a.size(1), n = w.size(0);
    typename Epilogue::Arguments epilogue_args{
        {// Dequant: its children first, then its own (empty) arguments
         {a_scale.data_ptr<float>(), 0.f, {cute::_1{}, cute::_0{}, m}},
         {{w_scale.data_ptr<float>(), 0.f, {cute::_0{}, cute::_1{}, n}}, {}, {}},
         {bias ? reinterpret_cast<OutT const*>(bias->data_ptr()) : nullptr, OutT(0), {cute::_0{}, cute::_1{}, n}},
         {}},
        {reinterpret_cast<OutT*>(out.data_ptr()), {int64_t(n), cute::_1{}, int64_t(m) * n}}};
    typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {m, n, k}, 1, epilogue_args,
                                  a.data_ptr<int8_t>(), w.data_ptr<int8_t>(), nullptr, nullptr, int64_t(m) * k,
                                  int64_t(n) * k, 0, 0, k, k, 0, 0);

    Gemm gemm;
    TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess, "mpq w8a8_sm80: CUTLASS cannot run m=", m,
                " n=", n, " k=", k, " (k must be a multiple of 16 and n of 8)");
    size_t workspace_bytes = Gemm::get_workspace_size(args);
    auto workspace = torch::empty({static_cast<int64_t>(workspace_bytes)},
                                  torch::TensorOptions().dtype(torch::kUInt8).device(a.device()));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.get_device()).stream();
    cutlass::Status status = gemm(args, workspace.data_ptr(), stream);  // the 2.x adapter: initialize + run
    TORCH_CHECK(status == cutlass::Status::kSuccess, "mpq w8a8_sm80: CUTLASS launch failed: ",
                cutlassGetStatusString(status));
  }
};

#define MPQ_W8A8_SM80_CONFIG(N)                                                                                 \
  void w8a8_sm80_config##N(torch::Tensor& out, torch::Tensor const& a, torch::Tensor const& w,                  \
                           torch::Tensor const& a_scale, torch::Tensor const& w_scale,                         \
                           std::optional<torch::Tensor> const& bias)
MPQ_W8A8_SM80_CONFIG(1);
MPQ_W8A8_SM80_CONFIG(2);

#define MPQ_W8A8_SM80_DEFINE(N, ...)                                                                             \
  MPQ_W8A8_SM80_CONFIG(N) {                                                                                      \
    if (out.scalar_type() == at::kBFloat16) {                                                                    \
      W8A8Sm80<cutlass::bfloat16_t, __VA_ARGS__>::run(out, a, w, a_scale, w_scale, bias);                        \
    } else {                                                                                                     \
      W8A8Sm80<cutlass::half_t, __VA_ARGS__>::run(out, a, w, a_scale, w_scale, bias);                            \
    }                                                                                                            \
  }

}  // namespace mpq

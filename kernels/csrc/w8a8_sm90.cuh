// W8A8 GEMM for Hopper (sm_90a), the kernel template shared by the per-configuration files: D[m, n] = a_scale[m] *
// w_scale[n] * sum_k A[m, k] * W[n, k] (+ bias[n]).
//
// INT8 x INT8 -> INT32 on wgmma, fed by TMA, with the dequantisation fused into the epilogue as an epilogue visitor
// tree: the per-token scale is a column broadcast (one value per output row), the per-channel weight scale and the
// bias are row broadcasts (one value per output column). Both operands are K-major (activations row-major m x k,
// weights stored n x k), as int8 wgmma requires. Each tile configuration is compiled in its own file
// (w8a8_sm90_c<N>.cu), so that the build runs them in parallel.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sm90_common.cuh"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"


#include "cutlass/gemm/kernel/tile_scheduler.hpp"

namespace mpq {

using namespace cute;

template <class OutT, class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule,
          class Scheduler = cutlass::gemm::PersistentScheduler>
struct W8A8Sm90 {
  using ElementAB = int8_t;
  using ElementAcc = int32_t;
  using ElementCompute = float;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // W stored n x k: column-major k x n
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;               // 16 bytes of int8
  static constexpr int kAlignD = 16 / sizeof(OutT);  // 16 bytes of bf16/fp16
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // The epilogue visitor tree: out = a_scale (col broadcast) * (w_scale (row broadcast) * acc) + bias (row).
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using WScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, _0>>;
  using AScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, _0>>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, OutT, OutT, Stride<_0, _1, _0>>;
  using ScaleByW = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, WScale, Acc>;
  using Epilogue = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, OutT, float, kRound>, AScale,
      ScaleByW, Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute, void, LayoutD, kAlignD, OutT,
      LayoutD, kAlignD, EpilogueSchedule, Epilogue>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA, kAlignAB, ElementAB, LayoutB,
      kAlignAB, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(torch::Tensor& out, torch::Tensor const& a, torch::Tensor const& w, torch::Tensor const& a_scale,
                  torch::Tensor const& w_scale, std::optional<torch::Tensor> const& bias) {
    int m = a.size(0), k = a.size(1), n = w.size(0);
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1));
    StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1));
    StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1));

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {a.data_ptr<int8_t>(), stride_a, w.data_ptr<int8_t>(), stride_b},
        {{// Epilogue arguments: children first, then the node's own
          {a_scale.data_ptr<float>(), 0.f, {}},
          {{w_scale.data_ptr<float>(), 0.f, {}}, {}, {}},
          {bias ? reinterpret_cast<OutT const*>(bias->data_ptr()) : nullptr, OutT(0), {}},
          {}},
         nullptr,
         stride_d,
         reinterpret_cast<OutT*>(out.data_ptr()),
         stride_d}};
    args.hw_info.sm_count = sm_count(a.get_device());

    Gemm gemm;
    TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess,
                "mpq w8a8_sm90: CUTLASS cannot run m=", m, " n=", n, " k=", k,
                " (k must be a multiple of 16 and n of 8)");
    size_t workspace_bytes = Gemm::get_workspace_size(args);
    auto workspace = torch::empty({static_cast<int64_t>(workspace_bytes)},
                                  torch::TensorOptions().dtype(torch::kUInt8).device(a.device()));
    auto stream = c10::cuda::getCurrentCUDAStream(a.get_device());
    cutlass::Status status = gemm.run(args, workspace.data_ptr(), stream);
    TORCH_CHECK(status == cutlass::Status::kSuccess, "mpq w8a8_sm90: CUTLASS launch failed: ",
                cutlassGetStatusString(status));
  }
};


// One entry point per tile configuration (defined in w8a8_sm90_c<N>.cu), bf16 or fp16 output by out's dtype.
#define MPQ_W8A8_CONFIG(N)                                                                                      \
  void w8a8_sm90_config##N(torch::Tensor& out, torch::Tensor const& a, torch::Tensor const& w,                  \
                           torch::Tensor const& a_scale, torch::Tensor const& w_scale,                         \
                           std::optional<torch::Tensor> const& bias)
MPQ_W8A8_CONFIG(1);
MPQ_W8A8_CONFIG(2);
MPQ_W8A8_CONFIG(3);
MPQ_W8A8_CONFIG(4);
MPQ_W8A8_CONFIG(5);

// The body of a configuration's entry point: the kernel for out's dtype.
#define MPQ_W8A8_DEFINE(N, ...)                                                                                  \
  MPQ_W8A8_CONFIG(N) {                                                                                           \
    if (out.scalar_type() == at::kBFloat16) {                                                                    \
      W8A8Sm90<cutlass::bfloat16_t, __VA_ARGS__>::run(out, a, w, a_scale, w_scale, bias);                        \
    } else {                                                                                                      \
      W8A8Sm90<cutlass::half_t, __VA_ARGS__>::run(out, a, w, a_scale, w_scale, bias);                            \
    }                                                                                                            \
  }

}  // namespace mpq

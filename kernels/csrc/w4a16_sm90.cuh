// W4A16 GEMM for Hopper (sm_90a): D[m, n] = sum_k X[m, k] * (s[n, k / g] * W[n, k]), W signed 4-bit, X and s bf16.
//
// CUTLASS's mixed-input mainloop: the 4-bit operand must be the register-sourced (left) one, so the kernel computes
// D^T = W * X^T (problem n x m x k) and writes D^T column-major, which is D row-major. The weights are K-major
// [n, k] with two values per byte (low nibble first); the group scales are [k / g, n] bf16 (the mainloop reads them
// MN-major: a group's scales for consecutive weight rows are contiguous) and enter in the
// mainloop (scale-only mode: symmetric weights, no zero point). Tiles (one file each, w4a16_sm90_c<N>.cu, built in
// parallel): 128 x 16 with stream-K for decode-sized m (K tile 64, or 128 for group 128), 128 x 128 for prefill.
// The mainloop needs the group to be a multiple of the K tile and at least 4 wgmma K-blocks (K tile >= 64 for
// bf16), so groups are 64 or 128: group 32 has no CUTLASS kernel here.
//
// Shuffled configurations read weights reordered once by w4a16_reorder (CUTLASS's memory-reordering atom: the 16
// values one thread converts lie contiguously, so one 64-bit load fetches them, as in CUTLASS example 55).

#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "sm90_common.cuh"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "cutlass/gemm/kernel/tile_scheduler.hpp"

#ifndef CUDA_CHECK  // mixed_dtype_utils.hpp's reorder_tensor checks its launch with it
#define CUDA_CHECK(status) C10_CUDA_CHECK(status)
#endif
#include "cutlass/util/mixed_dtype_utils.hpp"

namespace mpq {

using namespace cute;

// The weights' plain layout ([n, k] K-major, as (n, k, l)) and the reordered one of the shuffled configurations.
using W4A16StrideW = cutlass::detail::TagToStrideA_t<cutlass::layout::RowMajor>;
using W4A16ValueShuffle = Layout<Shape<_2, _4>, Stride<_4, _1>>;  // value order [0, 2, 4, 6, 1, 3, 5, 7]
using W4A16LayoutAtom = decltype(cutlass::compute_memory_reordering_atom<cutlass::bfloat16_t, Layout<Shape<_1, _1>>,
                                                                         W4A16ValueShuffle>());
using W4A16LayoutShuffled =
    decltype(cute::tile_to_shape(W4A16LayoutAtom{}, Layout<Shape<int, int, int>, W4A16StrideW>{}));

inline W4A16LayoutShuffled w4a16_shuffled_layout(int n, int k) {
  return cute::tile_to_shape(W4A16LayoutAtom{}, make_shape(n, k, 1));
}

template <class TileShape, class Scheduler = cutlass::gemm::PersistentScheduler, bool Shuffled = false>
struct W4A16Sm90 {
  using ElementW = cutlass::int4b_t;
  using ElementX = cutlass::bfloat16_t;
  using ElementScale = cutlass::bfloat16_t;
  using ElementD = cutlass::bfloat16_t;
  using ElementAcc = float;
  // Problem layouts before the swap: X row-major m x k, W "column-major k x n" (= [n, k] K-major), D row-major.
  using LayoutX = cutlass::layout::RowMajor;
  using LayoutW = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::RowMajor;
  using LayoutXt = typename cutlass::layout::LayoutTranspose<LayoutX>::type;
  using LayoutWt = typename cutlass::layout::LayoutTranspose<LayoutW>::type;
  using LayoutDt = typename cutlass::layout::LayoutTranspose<LayoutD>::type;
  static constexpr int kAlignX = 128 / cutlass::sizeof_bits<ElementX>::value;
  static constexpr int kAlignW = 128 / cutlass::sizeof_bits<ElementW>::value;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  using ClusterShape = Shape<_1, _1, _1>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc, void, LayoutDt, kAlignD, ElementD,
      LayoutDt, kAlignD, cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<ElementW, ElementScale>,
      cute::conditional_t<Shuffled, W4A16LayoutShuffled, LayoutWt>, kAlignW,
      ElementX, LayoutXt, kAlignX, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // decomposition: CUTLASS's DecompositionMode for the stream-K scheduler (0 its heuristic, 1 data-parallel,
  // 2 split-K into `splits`, 3 stream-K); ignored by the persistent scheduler
  static void run(torch::Tensor& out, torch::Tensor const& x, torch::Tensor const& w_packed,
                  torch::Tensor const& scale, int group, int decomposition, int splits) {
    int m = x.size(0), k = x.size(1), n = w_packed.size(0);
    using StrideX = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    using StrideS = typename CollectiveMainloop::StrideScale;
    // swapped: the weights are the kernel's A, given by their stride, or by their layout where reordered
    auto layout_w = [&] {
      if constexpr (Shuffled) {
        return w4a16_shuffled_layout(n, k);
      } else {
        return cutlass::make_cute_packed_stride(W4A16StrideW{}, make_shape(n, k, 1));
      }
    }();
    StrideX stride_x = cutlass::make_cute_packed_stride(StrideX{}, make_shape(m, k, 1));
    StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(n, m, 1));
    StrideS stride_s = cutlass::make_cute_packed_stride(StrideS{}, make_shape(n, k / group, 1));

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {n, m, k, 1},
        {reinterpret_cast<ElementW const*>(w_packed.data_ptr()), layout_w,
         reinterpret_cast<ElementX const*>(x.data_ptr()), stride_x,
         reinterpret_cast<ElementScale const*>(scale.data_ptr()), stride_s, group},
        {{1.f, 0.f}, nullptr, stride_d, reinterpret_cast<ElementD*>(out.data_ptr()), stride_d}};
    args.hw_info.sm_count = sm_count(x.get_device());
    if constexpr (cute::is_same_v<Scheduler, cutlass::gemm::StreamKScheduler>) {
      args.scheduler.decomposition_mode =
          static_cast<cutlass::gemm::kernel::detail::DecompositionMode>(decomposition);
      args.scheduler.splits = splits;
    }

    Gemm gemm;
    TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess, "mpq w4a16_sm90: CUTLASS cannot run m=", m,
                " n=", n, " k=", k, " group=", group,
                " (k a multiple of the group, the group a multiple of the K tile, n of 8)");
    size_t workspace_bytes = Gemm::get_workspace_size(args);
    auto workspace = torch::empty({static_cast<int64_t>(workspace_bytes)},
                                  torch::TensorOptions().dtype(torch::kUInt8).device(x.device()));
    cutlass::Status status = gemm.run(args, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream(x.get_device()));
    TORCH_CHECK(status == cutlass::Status::kSuccess, "mpq w4a16_sm90: CUTLASS launch failed: ",
                cutlassGetStatusString(status));
  }
};


// One entry point per tile configuration (defined in w4a16_sm90_c<N>.cu).
#define MPQ_W4A16_CONFIG(N)                                                                                     \
  void w4a16_sm90_config##N(torch::Tensor& out, torch::Tensor const& x, torch::Tensor const& w_packed,          \
                            torch::Tensor const& scale, int group, int decomposition, int splits)
MPQ_W4A16_CONFIG(1);
MPQ_W4A16_CONFIG(2);
MPQ_W4A16_CONFIG(3);
MPQ_W4A16_CONFIG(4);
MPQ_W4A16_CONFIG(5);
MPQ_W4A16_CONFIG(6);

#define MPQ_W4A16_DEFINE(N, ...) \
  MPQ_W4A16_CONFIG(N) { W4A16Sm90<__VA_ARGS__>::run(out, x, w_packed, scale, group, decomposition, splits); }

}  // namespace mpq

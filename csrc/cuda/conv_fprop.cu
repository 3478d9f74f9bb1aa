// Tensor-core conv2d fprop of the "cuda" backend with a fused epilogue (kernels.h):
//
//     y = relu?( conv(x, w) + bias[k] + residual )
//
// CUTLASS 2.x implicit GEMM (cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast) on SM80
// tensor cores (mma.sync + cp.async multistage; the same code runs on SM90 / H100), with our
// epilogue operator rf::cuda::ConvBiasResidualReluOp (conv_epilogue.cuh): the epilogue's broadcast
// vector is the bias, its source tensor C the residual.
//   x NHWC, w KRSC, y and residual NPQK (all dense), bias float32 [K] or nullptr.
//   float16 / bfloat16 with fp32 accumulation; float32 through TF32 tensor cores (operands rounded
//   to tf32 inside the warp MMA, fp32 accumulation), so float32 results differ from an exact fp32
//   conv by TF32 rounding, like cuDNN with allow_tf32.
//
// Implicit GEMM view: M = N*P*Q (output pixels), N = K (output channels), K = C*R*S.
//
// Build (the flags this file needs; nothing else is required):
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr
//        -I csrc/include -I <CUTLASS include dir>
//        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
//        -c csrc/cuda/conv_fprop.cu
//   CUTLASS include dir: the nvidia-cutlass wheel's headers,
//     $(python -c "import importlib.util as u; print(list(u.find_spec('cutlass_library')
//                  .submodule_search_locations)[0])")/source/include
//   (CUTLASS 4.2). Also compiles with torch's default extension defines (-D__CUDA_NO_HALF_OPERATORS__
//   -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
//   and with -Xcompiler -fPIC. Six kernels (3 dtypes x 2 tiles), each for sm_80 and sm_90.
//
// Compiled configurations (conv2d_fprop_config returns the id):
//   id  name                               threadblock  warps (each)      stages  smem
//   0   cutlass_sm80_f16_128x128x64_s3     128x128x64   2x2 (64x64x64)    3       96 KiB
//   1   cutlass_sm80_f16_64x64x64_s4       64x64x64     2x2 (32x32x64)    4       64 KiB
//   2   cutlass_sm80_bf16_128x128x64_s3    as 0, bfloat16
//   3   cutlass_sm80_bf16_64x64x64_s4      as 1, bfloat16
//   4   cutlass_sm80_tf32_128x128x32_s3    128x128x32   2x2 (64x64x32)    3       96 KiB
//   5   cutlass_sm80_tf32_64x64x32_s4      64x64x32     2x2 (32x32x32)    4       64 KiB
// All: kOptimized iterators, 128-bit accesses (8 elements of 16-bit types, 4 of fp32), identity
// swizzle 4, split_k_slices = 1 (workspace 0), one launch.
//
// Tile heuristic (pure function of the shape, no device query): the 128x128 tile when
//   K >= 128  and  ceil(M / 128) * ceil(K / 128) >= 128 tiles  (about one full wave of CTAs on
//   A100 (108 SMs) / H100 (132 SMs)),
// else the 64x64 tile: small problems (ResNet-50's late stages at small batch) get 4x the CTAs,
// and K = 64 output channels would leave half of a 128-wide tile idle.
//
// Support (conv2d_fprop_config returns -1 otherwise, and the caller falls back to cuDNN + a
// separate epilogue): positive sizes with P, Q as PyTorch computes them; any padding >= 0,
// stride >= 1, dilation >= 1; C and K multiples of 8 (16-bit) or 4 (fp32); R, S <= 32; x, w and y
// each under 2^31 bytes; groups == 1 (Conv2dShape has no groups: the caller must not pass grouped
// convs here). Pointer requirements of conv2d_fprop_bias_act (cudaErrorMisalignedAddress
// otherwise): x, w, y, residual 16-byte aligned; bias 32-byte aligned for 16-bit dtypes, 16-byte
// for fp32 (fresh PyTorch allocations always are). y must not overlap x, w or bias; residual may
// be y itself (each element is read, then written, by the same thread) but not overlap it
// otherwise.
//
// Errors (cudaError_t values): cudaErrorInvalidValue for a config that is not one of this dtype's,
// a shape the config cannot run or a null x / w / y; cudaErrorMisalignedAddress as above; else
// whatever cudaFuncSetAttribute or the launch (cudaGetLastError) reports. Empty problems (N, P or
// Q == 0) get config -1: the caller handles them.
//
// The same kernels optionally write per-channel statistics of y for BN (conv_stats.cuh,
// conv2d_fprop_bias_act_stats): a phase after the epilogue, skipped at run time otherwise.
//
// Compile time: about 21 s for both architectures on one core (nvcc 13.0), so one translation unit.
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "cutlass/layout/tensor.h"
#include "cutlass/tensor_ref.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/conv/convolution.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/device_kernel.h"

#include "resnet_fused/kernels.h"
#include "conv_epilogue.cuh"
#include "conv_stats.cuh"

namespace rf {
namespace cuda {
namespace conv_detail {

/// PyTorch's conv2d is a cross-correlation; split_k_slices = 1, groups = 1.
inline cutlass::conv::Conv2dProblemSize to_problem(const Conv2dShape& s) {
  return cutlass::conv::Conv2dProblemSize(s.N, s.H, s.W, s.C, s.K, s.R, s.S, s.P, s.Q, s.pad_h, s.pad_w,
                                          s.stride_h, s.stride_w, s.dil_h, s.dil_w,
                                          cutlass::conv::Mode::kCrossCorrelation,
                                          /*split_k_slices=*/1, /*groups=*/1);
}

inline bool aligned_to(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

/// The operations of one compiled configuration (a row of kConfigs).
struct ConvConfigOps {
  const char* name;
  DType dtype;
  /// 0 when the kernel runs this shape (CUTLASS's can_implement: C and K alignment, R, S <= 32,
  /// tensors under 2^31 bytes, grid limits), else the cutlass::Status value.
  int (*can_implement)(const Conv2dShape& s);
  /// CUTLASS's get_workspace_size (0: split_k_slices == 1).
  size_t (*workspace_bytes)(const Conv2dShape& s);
  /// Launches the conv on stream (with the statistics phase when stats_anchor, stats_sum and
  /// stats_m2 are not null: all three or none); a cudaError_t value.
  int (*run)(const Conv2dShape& s, const void* x, const void* w, const float* bias, const void* residual,
             void* y, bool relu, void* workspace, float* stats_anchor, float* stats_sum, float* stats_m2,
             cudaStream_t stream);
  /// GEMM rows per threadblock tile (the statistics tile).
  int tile_rows;
};

/// The CUTLASS conv kernel Base (ImplicitGemmConvolutionWithFusedEpilogue), followed by an optional
/// statistics phase (conv_stats.cuh): once Base's epilogue has stored the CTA's output tile, the
/// CTA reads the tile back (from L2: ld.global.cg) and writes, per channel of its column tile, the
/// anchor (the stored value of the tile's first row, 0 if not finite), the sum of (y - anchor) and
/// the centred sum of squares of its valid rows to row tile_m of the [tiles_m, K] partials. Skipped
/// (a uniform branch after the epilogue) when Params::stats_sum is null, which is how
/// conv2d_fprop_bias_act runs it.
template <typename Base>
struct FpropStatsKernel : public Base {
  using Element = typename Base::ElementC;  // y's element type
  using ThreadblockShape = typename Base::ThreadblockShape;
  using ThreadblockSwizzle = typename Base::ThreadblockSwizzle;

  static int const kTileM = ThreadblockShape::kM;
  static int const kTileN = ThreadblockShape::kN;
  static int const kThreadCount = Base::kThreadCount;
  /// 16-byte vectors of y: kVec channels per load (K % kVec == 0 is checked by can_implement).
  static int const kVec = 128 / cutlass::sizeof_bits<Element>::value;
  /// Thread t reads channel group t % kColGroups of rows t / kColGroups + i * kRowLanes.
  static int const kColGroups = kTileN / kVec;
  static int const kRowLanes = kThreadCount / kColGroups;
  static_assert(kTileN % kVec == 0 && kThreadCount % kColGroups == 0, "thread layout of the stats phase");
  static_assert(kTileN <= kThreadCount, "one thread per tile column in the cross-lane reduction");

  struct Params : public Base::Params {
    float* stats_anchor;
    float* stats_sum;
    float* stats_m2;

    CUTLASS_HOST_DEVICE
    Params() : Base::Params(), stats_anchor(nullptr), stats_sum(nullptr), stats_m2(nullptr) {}

    CUTLASS_HOST_DEVICE
    Params(typename Base::Arguments const& args, int* semaphore, float* anchor, float* sum, float* m2)
        : Base::Params(args, semaphore), stats_anchor(anchor), stats_sum(sum), stats_m2(m2) {}
  };

  struct StatsStorage {
    float partial[kRowLanes][kTileN];  // per row lane, per tile column
    float mean[kTileN];                // tile mean of (y - anchor) of each column (pass 2)
  };

  union SharedStorage {
    typename Base::SharedStorage base;
    StatsStorage stats;
  };

  /// kVec consecutive channels of row m of y (dense [M, ld]) as floats, read from L2 (.cg: never a
  /// stale or non-coherent L1 / texture line of what this CTA has just stored).
  CUTLASS_DEVICE
  static void load_row_(Element const* y, int64_t m, int64_t ld, int col, float (&out)[kVec]) {
    static_assert(sizeof(cutlass::AlignedArray<Element, kVec>) == sizeof(uint4), "16-byte vector");
    cutlass::AlignedArray<Element, kVec> v;
    *reinterpret_cast<uint4*>(&v) = __ldcg(reinterpret_cast<uint4 const*>(y + m * ld + col));
    cutlass::NumericArrayConverter<float, Element, kVec> to_float;
    cutlass::Array<float, kVec> f = to_float(v);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kVec; ++i) {
      out[i] = f[i];
    }
  }

  /// v when finite, else 0. A bit test rather than isfinite(): the library is built with
  /// --use_fast_math, and this must hold whatever the floating-point flags.
  CUTLASS_DEVICE
  static float finite_or_zero_(float v) {
    return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u ? 0.f : v;
  }

  CUTLASS_DEVICE
  void operator()(Params const& params, SharedStorage& shared_storage) {
    Base::operator()(params, shared_storage.base);

    // Uniform over the grid / over the CTA: every barrier below is reached by all or no thread.
    if (params.stats_sum == nullptr) {
      return;
    }
    ThreadblockSwizzle swizzle;
    cutlass::gemm::GemmCoord tile = swizzle.get_tile_offset(params.swizzle_log_tile);
    if (params.grid_tiled_shape.m() <= tile.m() || params.grid_tiled_shape.n() <= tile.n()) {
      return;  // the CTAs Base skipped too
    }

    const int64_t gemm_m = params.implicit_gemm_problem_size.m();  // N*P*Q
    const int64_t gemm_n = params.implicit_gemm_problem_size.n();  // K = y's leading dimension
    const int64_t m0 = int64_t(tile.m()) * kTileM;
    const int n0 = tile.n() * kTileN;
    const int rows = int(gemm_m - m0 < kTileM ? gemm_m - m0 : kTileM);  // >= 1
    const int tid = threadIdx.x;
    const int group = tid % kColGroups;
    const int lane = tid / kColGroups;
    const int col = n0 + group * kVec;  // first of this thread's kVec channels
    const bool col_ok = col < gemm_n;   // whole vector in or out, as K % kVec == 0
    Element const* y = params.ptr_D;
    float* out_anchor = params.stats_anchor + int64_t(tile.m()) * gemm_n;
    float* out_sum = params.stats_sum + int64_t(tile.m()) * gemm_n;
    float* out_m2 = params.stats_m2 + int64_t(tile.m()) * gemm_n;
    StatsStorage& st = shared_storage.stats;

    // The epilogue's global stores of this tile (every thread's, the whole tile, row m0
    // included) are visible to the whole CTA after the barrier, and its shared memory (aliased
    // by st) is no longer in use. Nothing writes y after it, so every load below of the same
    // element returns the same value.
    __syncthreads();

    // Anchors: the stored row m0 (the tile's first row, always < gemm_m), read by every thread
    // of a column group (kRowLanes threads, the same 16 bytes from L2: identical values), so the
    // anchor needs no shared memory or extra barrier. Not finite: 0 (NaN / Inf then enter the
    // sums unshifted and propagate).
    float anchor[kVec];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kVec; ++i) {
      anchor[i] = 0.f;
    }
    if (col_ok) {
      load_row_(y, m0, gemm_n, col, anchor);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kVec; ++i) {
        anchor[i] = finite_or_zero_(anchor[i]);
      }
      if (lane == 0) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kVec; ++i) {
          out_anchor[col + i] = anchor[i];
        }
      }
    }

    // Pass 1: column sums of y - anchor.
    float acc[kVec];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kVec; ++i) {
      acc[i] = 0.f;
    }
    if (col_ok) {
      for (int r = lane; r < rows; r += kRowLanes) {
        float v[kVec];
        load_row_(y, m0 + r, gemm_n, col, v);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kVec; ++i) {
          acc[i] += v[i] - anchor[i];
        }
      }
    }
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kVec; ++i) {
      st.partial[lane][group * kVec + i] = acc[i];
    }
    __syncthreads();
    if (tid < kTileN) {
      float sum = 0.f;
      for (int l = 0; l < kRowLanes; ++l) {
        sum += st.partial[l][tid];
      }
      st.mean[tid] = sum / float(rows);
      if (n0 + tid < gemm_n) {
        out_sum[n0 + tid] = sum;
      }
    }
    __syncthreads();

    // Pass 2: centred sums of squares about the tile mean (anchor + mean of y - anchor).
    float mean[kVec];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kVec; ++i) {
      acc[i] = 0.f;
      mean[i] = st.mean[group * kVec + i];
    }
    if (col_ok) {
      for (int r = lane; r < rows; r += kRowLanes) {
        float v[kVec];
        load_row_(y, m0 + r, gemm_n, col, v);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kVec; ++i) {
          float d = (v[i] - anchor[i]) - mean[i];
          acc[i] += d * d;
        }
      }
    }
    // (st.partial may be refilled: its pass-1 reads precede the barrier above.)
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kVec; ++i) {
      st.partial[lane][group * kVec + i] = acc[i];
    }
    __syncthreads();
    if (tid < kTileN && n0 + tid < gemm_n) {
      float m2 = 0.f;
      for (int l = 0; l < kRowLanes; ++l) {
        m2 += st.partial[l][tid];
      }
      out_m2[n0 + tid] = m2;
    }
  }
};

/// One compiled configuration. Element: cutlass::half_t, cutlass::bfloat16_t or float (TF32).
/// Threadblock tile TbM x TbN x TbK, warp tile WarpM x WarpN x TbK (the warps do not split the
/// threadblock's K, so kPartitionsK == 1), Stages of the cp.async pipeline.
template <typename Element, int TbM, int TbN, int TbK, int WarpM, int WarpN, int Stages>
struct FpropKernel {
  /// Elements per 128-bit access: 8 (16-bit types) or 4 (fp32). The access width of A (x), B (w)
  /// and of the epilogue (y, residual), so C and K must be multiples of it.
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;

  using InstructionShape =
      typename cutlass::platform::conditional<cutlass::sizeof_bits<Element>::value == 32,
                                              cutlass::gemm::GemmShape<16, 8, 8>,       // tf32
                                              cutlass::gemm::GemmShape<16, 8, 16>>::type;  // f16/bf16
  using ThreadblockShape = cutlass::gemm::GemmShape<TbM, TbN, TbK>;
  using WarpShape = cutlass::gemm::GemmShape<WarpM, WarpN, TbK>;
  using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>;
  using Layout = cutlass::layout::TensorNHWC;

  using OutputOp = ConvBiasResidualReluOp<Element, kAlignment>;

  using BaseKernel = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
      Element, Layout,  // A: x, NHWC
      Element, Layout,  // B: w, KRSC (a TensorNHWC with N = K, H = R, W = S)
      Element, Layout,  // source C / output Z: residual / y, NPQK
      float,            // accumulator
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape,
      InstructionShape, OutputOp, Swizzle, Stages, cutlass::arch::OpMultiplyAdd,
      cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kUnity,  // fprop runs any stride (the flag restricts dgrad only)
      kAlignment, kAlignment>::Kernel;
  /// What runs: BaseKernel plus the optional statistics phase.
  using Kernel = FpropStatsKernel<BaseKernel>;

  // Only its static can_implement and get_workspace_size are used: we launch the kernel ourselves
  // so that a failure comes back as the genuine cudaError_t.
  using Device = cutlass::conv::device::ImplicitGemmConvolution<BaseKernel>;

  static_assert(BaseKernel::Epilogue::OutputTileIterator::kElementsPerAccess == kAlignment,
                "epilogue vector width must be what can_implement checks K against");
  static_assert(BaseKernel::Epilogue::kPartitionsK == 1, "the warp tile spans the threadblock's K");
  static_assert(!OutputOp::kStoreT, "no second output tensor");

  static typename BaseKernel::Arguments arguments(const Conv2dShape& s, const void* x, const void* w,
                                                  const float* bias, const void* residual, void* y,
                                                  bool relu) {
    using Ref = cutlass::TensorRef<Element, Layout>;
    Layout layout_x = Layout::packed(cutlass::Tensor4DCoord(s.N, s.H, s.W, s.C));
    Layout layout_w = Layout::packed(cutlass::Tensor4DCoord(s.K, s.R, s.S, s.C));
    Layout layout_y = Layout::packed(cutlass::Tensor4DCoord(s.N, s.P, s.Q, s.K));
    Ref ref_x(static_cast<Element*>(const_cast<void*>(x)), layout_x);
    Ref ref_w(static_cast<Element*>(const_cast<void*>(w)), layout_w);
    // The residual has exactly y's layout (dense NPQK): the epilogue walks the source tensor with
    // the same iterator description as y (row = output pixel, leading dimension K).
    Ref ref_residual(static_cast<Element*>(const_cast<void*>(residual)), layout_y);
    Ref ref_y(static_cast<Element*>(y), layout_y);
    return typename BaseKernel::Arguments(
        to_problem(s), ref_x, ref_w, ref_residual, ref_y,
        typename OutputOp::Params(/*has_residual=*/residual != nullptr, relu),
        cutlass::conv::SplitKMode::kSerial,
        /*ptr_Vector = bias (nullptr: the epilogue adds zeros)=*/const_cast<float*>(bias),
        /*ptr_Tensor (T, never stored)=*/nullptr,
        /*ldr = 0: the same bias row for every output pixel=*/0,
        /*ldt=*/0);
  }

  static int can_implement(const Conv2dShape& s) {
    return static_cast<int>(
        Device::can_implement(arguments(s, nullptr, nullptr, nullptr, nullptr, nullptr, false)));
  }

  static size_t workspace_bytes(const Conv2dShape& s) {
    return Device::get_workspace_size(arguments(s, nullptr, nullptr, nullptr, nullptr, nullptr, false));
  }

  static int run(const Conv2dShape& s, const void* x, const void* w, const float* bias,
                 const void* residual, void* y, bool relu, void* workspace, float* stats_anchor,
                 float* stats_sum, float* stats_m2, cudaStream_t stream) {
    typename BaseKernel::Arguments args = arguments(s, x, w, bias, residual, y, relu);
    if (Device::can_implement(args) != cutlass::Status::kSuccess) {
      return static_cast<int>(cudaErrorInvalidValue);
    }
    // The statistics buffers: all three or none (the kernel tests stats_sum alone).
    const bool stats = stats_sum != nullptr;
    if (x == nullptr || w == nullptr || y == nullptr || (stats_anchor != nullptr) != stats ||
        (stats_m2 != nullptr) != stats) {
      return static_cast<int>(cudaErrorInvalidValue);
    }
    // 128-bit accesses of x, w, y and the residual (at element offsets that are multiples of
    // kAlignment, since C and K are); the epilogue loads the bias as vectors of kAlignment floats
    // (an AlignedArray of 32 bytes for 16-bit outputs, 16 for fp32) at multiples of kAlignment.
    constexpr size_t kVecBytes = 16;
    constexpr size_t kBiasBytes = sizeof(float) * kAlignment;
    if (!aligned_to(x, kVecBytes) || !aligned_to(w, kVecBytes) || !aligned_to(y, kVecBytes) ||
        (residual != nullptr && !aligned_to(residual, kVecBytes)) ||
        (bias != nullptr && !aligned_to(bias, kBiasBytes))) {
      return static_cast<int>(cudaErrorMisalignedAddress);
    }
    if (Device::get_workspace_size(args) > 0 && workspace == nullptr) {
      return static_cast<int>(cudaErrorInvalidValue);  // unreachable with split_k_slices == 1
    }

    typename Kernel::Params params(args, static_cast<int*>(workspace), stats_anchor, stats_sum, stats_m2);
    Swizzle swizzle;
    dim3 grid = swizzle.get_grid_shape(params.grid_tiled_shape);
    dim3 block(Kernel::kThreadCount, 1, 1);
    int smem_bytes = static_cast<int>(sizeof(typename Kernel::SharedStorage));
    if (smem_bytes >= (48 << 10)) {
      // Per call, as CUTLASS's device adapter does (cheap; correct whichever device is current).
      cudaError_t e = cudaFuncSetAttribute(cutlass::Kernel<Kernel>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
      if (e != cudaSuccess) {
        return static_cast<int>(e);
      }
    }
    cutlass::Kernel<Kernel><<<grid, block, smem_bytes, stream>>>(params);
    return static_cast<int>(cudaGetLastError());
  }

  static constexpr ConvConfigOps ops(const char* name, DType dtype) {
    return ConvConfigOps{name, dtype, &can_implement, &workspace_bytes, &run, TbM};
  }
};

// ------------------------------------------------------------------ the compiled configurations
// Large: 128x128 threadblock, 2x2 warps of 64x64, 3 stages (96 KiB smem): big GEMMs.
// Small: 64x64 threadblock, 2x2 warps of 32x32, 4 stages (64 KiB smem): few output tiles, K < 128.
// Threadblock K: 64 elements of a 16-bit type or 32 of fp32 (128 bytes per smem row either way).
using F16Large = FpropKernel<cutlass::half_t, 128, 128, 64, 64, 64, 3>;
using F16Small = FpropKernel<cutlass::half_t, 64, 64, 64, 32, 32, 4>;
using BF16Large = FpropKernel<cutlass::bfloat16_t, 128, 128, 64, 64, 64, 3>;
using BF16Small = FpropKernel<cutlass::bfloat16_t, 64, 64, 64, 32, 32, 4>;
using TF32Large = FpropKernel<float, 128, 128, 32, 64, 64, 3>;
using TF32Small = FpropKernel<float, 64, 64, 32, 32, 32, 4>;

/// Indexed by config id: for each dtype, [large, small] at ids 2*d, 2*d + 1.
constexpr int kNumConfigs = 6;
constexpr ConvConfigOps kConfigs[kNumConfigs] = {
    F16Large::ops("cutlass_sm80_f16_128x128x64_s3", DType::kFloat16),
    F16Small::ops("cutlass_sm80_f16_64x64x64_s4", DType::kFloat16),
    BF16Large::ops("cutlass_sm80_bf16_128x128x64_s3", DType::kBFloat16),
    BF16Small::ops("cutlass_sm80_bf16_64x64x64_s4", DType::kBFloat16),
    TF32Large::ops("cutlass_sm80_tf32_128x128x32_s3", DType::kFloat32),
    TF32Small::ops("cutlass_sm80_tf32_64x64x32_s4", DType::kFloat32),
};

/// The first config id of a dtype (its large tile), or -1.
inline int first_config(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return 0;
    case DType::kBFloat16: return 2;
    case DType::kFloat32: return 4;
  }
  return -1;
}

/// The row of config, when it exists and is compiled for dtype; else nullptr.
inline const ConvConfigOps* config_ops(DType dtype, int config) {
  if (config < 0 || config >= kNumConfigs || kConfigs[config].dtype != dtype) {
    return nullptr;
  }
  return &kConfigs[config];
}

/// Output extent as PyTorch computes it: floor((in + 2 pad - dil (k - 1) - 1) / stride) + 1; 0 when
/// the (dilated) filter does not fit.
inline int64_t conv_out_extent(int64_t in, int64_t pad, int64_t k, int64_t stride, int64_t dil) {
  int64_t span = in + 2 * pad - dil * (k - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

/// Positive sizes, pad >= 0, stride >= 1, dilation >= 1, and P, Q consistent with the rest (so a
/// malformed shape never reaches a kernel).
inline bool valid_shape(const Conv2dShape& s) {
  if (s.N <= 0 || s.H <= 0 || s.W <= 0 || s.C <= 0 || s.K <= 0 || s.R <= 0 || s.S <= 0 || s.P <= 0 ||
      s.Q <= 0) {
    return false;
  }
  if (s.pad_h < 0 || s.pad_w < 0 || s.stride_h < 1 || s.stride_w < 1 || s.dil_h < 1 || s.dil_w < 1) {
    return false;
  }
  return conv_out_extent(s.H, s.pad_h, s.R, s.stride_h, s.dil_h) == s.P &&
         conv_out_extent(s.W, s.pad_w, s.S, s.stride_w, s.dil_w) == s.Q;
}

/// 128x128 tiles when there are output channels enough to fill them (K >= 128) and enough of them
/// for about one wave of CTAs (>= 128 tiles: A100 has 108 SMs, H100 132); else 64x64 tiles.
constexpr int64_t kLargeTileMinK = 128;
constexpr int64_t kLargeTileMinTiles = 128;

inline bool prefer_large_tile(const Conv2dShape& s) {
  const int64_t gemm_m = int64_t(s.N) * s.P * s.Q;
  const int64_t gemm_n = s.K;
  if (gemm_n < kLargeTileMinK) {
    return false;
  }
  const int64_t tiles = ((gemm_m + 127) / 128) * ((gemm_n + 127) / 128);
  return tiles >= kLargeTileMinTiles;
}

}  // namespace conv_detail

// ====================================================================== kernels.h entry points

int conv2d_fprop_config(DType dtype, const Conv2dShape& s) {
  using namespace conv_detail;
  const int first = first_config(dtype);
  if (first < 0 || !valid_shape(s)) {
    return -1;
  }
  // The preferred tile first; the other one if CUTLASS cannot run the preferred (both share the
  // alignment constraints, so this only differs at grid limits).
  const bool large = prefer_large_tile(s);
  const int order[2] = {large ? first : first + 1, large ? first + 1 : first};
  for (int config : order) {
    if (kConfigs[config].can_implement(s) == 0) {
      return config;
    }
  }
  return -1;
}

const char* conv2d_fprop_config_name(int config) {
  if (config < 0 || config >= conv_detail::kNumConfigs) {
    return "none";
  }
  return conv_detail::kConfigs[config].name;
}

size_t conv2d_fprop_workspace_bytes(DType dtype, const Conv2dShape& s, int config) {
  using namespace conv_detail;
  const ConvConfigOps* ops = config_ops(dtype, config);
  if (ops == nullptr || !valid_shape(s)) {
    return 0;
  }
  return ops->workspace_bytes(s);
}

int conv2d_fprop_bias_act(DType dtype, int config, const Conv2dShape& s, const void* x, const void* w,
                          const float* bias, const void* residual, void* y, bool relu, void* workspace,
                          cudaStream_t stream) {
  using namespace conv_detail;
  const ConvConfigOps* ops = config_ops(dtype, config);
  if (ops == nullptr || !valid_shape(s)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return ops->run(s, x, w, bias, residual, y, relu, workspace, nullptr, nullptr, nullptr, stream);
}

// ================================================================= conv_stats.cuh entry points

int conv2d_fprop_stats_tile_rows(int config) {
  if (config < 0 || config >= conv_detail::kNumConfigs) {
    return 0;
  }
  return conv_detail::kConfigs[config].tile_rows;
}

int64_t conv2d_fprop_stats_tiles(int config, const Conv2dShape& s) {
  const int rows = conv2d_fprop_stats_tile_rows(config);
  if (rows == 0 || !conv_detail::valid_shape(s)) {
    return 0;
  }
  const int64_t gemm_m = int64_t(s.N) * s.P * s.Q;
  return (gemm_m + rows - 1) / rows;
}

int conv2d_fprop_bias_act_stats(DType dtype, int config, const Conv2dShape& s, const void* x, const void* w,
                                const float* bias, const void* residual, void* y, bool relu, void* workspace,
                                float* tile_anchor, float* tile_sum, float* tile_m2, cudaStream_t stream) {
  using namespace conv_detail;
  const ConvConfigOps* ops = config_ops(dtype, config);
  if (ops == nullptr || !valid_shape(s) || tile_anchor == nullptr || tile_sum == nullptr ||
      tile_m2 == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return ops->run(s, x, w, bias, residual, y, relu, workspace, tile_anchor, tile_sum, tile_m2, stream);
}

}  // namespace cuda
}  // namespace rf

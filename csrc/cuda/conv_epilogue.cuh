// Our epilogue for the CUTLASS implicit-GEMM convolution (csrc/cuda/conv_fprop.cu):
//
//     y = relu?( acc + bias[k] + residual )
//
// acc is the fp32 accumulator of the conv, bias a float32 per-output-channel vector (nullable),
// residual an optional tensor of the output dtype in y's own NPQK layout, relu a runtime flag. One
// instantiation per (output dtype, access width) therefore serves plain conv+bias, bias+ReLU and
// bias+residual+ReLU. ReLU keeps NaN (z < 0 ? 0 : z), as PyTorch's relu does.
//
// How it plugs into CUTLASS: ConvBiasResidualReluOp is a thread-level output operator of the
// concept that cutlass::epilogue::threadblock::EpilogueWithBroadcast expects (the epilogue built by
// cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast), in its single-source form
// (kIsSingleSource = true):
//   * the broadcast vector of that epilogue is the bias. The epilogue loads it itself, one value
//     per output column (= output channel k), converted to ElementCompute, and passes it in as V;
//     a null vector pointer makes the epilogue pass zeros without touching memory, so bias ==
//     nullptr needs nothing from us;
//   * the epilogue's source tensor C is the residual. The epilogue calls is_source_needed() once
//     per tile and only then reads C; with Params::has_residual == false it takes the
//     source-not-needed path and C (a null pointer then) is never read;
//   * Z (the epilogue's main output, stored with y's iterator) is y; the optional second output T
//     is switched off (kStoreT = false), so no second tensor is ever written.
// Split-K: set_k_partition does nothing, because the fprop launcher always runs split_k_slices == 1
// (a serial split-K would need bias, residual and ReLU applied by the last partition only).
//
// Only CUTLASS's array / conversion headers are needed here; no torch, no CUDA runtime headers.
#pragma once

#include "cutlass/cutlass.h"
#include "cutlass/array.h"
#include "cutlass/numeric_types.h"
#include "cutlass/numeric_conversion.h"

namespace rf {
namespace cuda {

/// y = relu?(acc + bias + residual) for kCount consecutive output channels of one output pixel.
/// ElementOutput_: the dtype of y and of the residual (cutlass::half_t, cutlass::bfloat16_t,
/// float). Count: elements per vector access of the epilogue (128 bits: 8 for 16-bit, 4 for fp32).
template <typename ElementOutput_, int Count>
class ConvBiasResidualReluOp {
 public:
  // -- Types the epilogue (and DefaultConv2dFpropWithBroadcast) reads off the operator.
  using ElementOutput = ElementOutput_;       // y
  using ElementC = ElementOutput_;            // source tensor C = the residual, same dtype as y
  using ElementAccumulator = float;           // tensor-core accumulators
  using ElementCompute = float;               // all arithmetic in fp32
  using ElementVector = float;                // broadcast vector = bias, float32 [K]
  using ElementZ = ElementOutput_;            // Z = y
  using ElementT = ElementOutput_;            // T: never stored (kStoreT = false)

  static int const kCount = Count;
  static int const kElementsPerAccess = Count;

  static bool const kIsSingleSource = true;   // one source tensor (the residual)
  static bool const kStoreZ = true;
  static bool const kStoreT = false;
  static bool const kIsHeavy = false;         // cheap: let the epilogue fully unroll

  using FragmentAccumulator = cutlass::Array<ElementAccumulator, kCount>;
  using FragmentCompute = cutlass::Array<ElementCompute, kCount>;
  using FragmentC = cutlass::Array<ElementC, kCount>;
  using FragmentOutput = cutlass::Array<ElementOutput, kCount>;
  using FragmentZ = cutlass::Array<ElementZ, kCount>;
  using FragmentT = cutlass::Array<ElementT, kCount>;

  /// Host-constructed, copied into the kernel's parameters.
  struct Params {
    bool has_residual;  // read the source tensor C (the residual) and add it
    bool relu;          // apply z < 0 ? 0 : z

    CUTLASS_HOST_DEVICE
    Params() : has_residual(false), relu(false) {}

    CUTLASS_HOST_DEVICE
    Params(bool has_residual_, bool relu_) : has_residual(has_residual_), relu(relu_) {}
  };

 private:
  bool has_residual_;
  bool relu_;

  // Round to nearest (even) into the output type; vectorised (half2 / bf16x2 cvt) where CUTLASS
  // has packed conversions.
  using ToOutput = cutlass::NumericArrayConverter<ElementOutput, ElementCompute, kCount,
                                                  cutlass::FloatRoundStyle::round_to_nearest>;
  using FromC = cutlass::NumericArrayConverter<ElementCompute, ElementC, kCount,
                                               cutlass::FloatRoundStyle::round_to_nearest>;

  CUTLASS_HOST_DEVICE
  void finish_(FragmentZ& frag_Z, FragmentCompute& z) const {
    if (relu_) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kCount; ++i) {
        z[i] = z[i] < ElementCompute(0) ? ElementCompute(0) : z[i];  // NaN stays NaN
      }
    }
    frag_Z = ToOutput()(z);
  }

 public:
  CUTLASS_HOST_DEVICE
  explicit ConvBiasResidualReluOp(Params const& params)
      : has_residual_(params.has_residual), relu_(params.relu) {}

  /// The epilogue reads the source tensor (the residual) only when this is true.
  CUTLASS_HOST_DEVICE
  bool is_source_needed() const { return has_residual_; }

  /// Split-K is never used with this operator (see the file comment).
  CUTLASS_HOST_DEVICE
  void set_k_partition(int /*k_partition*/, int /*k_partition_count*/) {}

  /// With the residual: Z = relu?(AB + V + C). frag_T is not stored (kStoreT = false).
  CUTLASS_HOST_DEVICE
  void operator()(FragmentZ& frag_Z, FragmentT& /*frag_T*/, FragmentAccumulator const& AB,
                  FragmentC const& frag_C, FragmentCompute const& V) const {
    FragmentCompute residual = FromC()(frag_C);
    FragmentCompute z;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) {
      z[i] = (ElementCompute(AB[i]) + V[i]) + residual[i];
    }
    finish_(frag_Z, z);
  }

  /// Without the residual (is_source_needed() == false): Z = relu?(AB + V).
  CUTLASS_HOST_DEVICE
  void operator()(FragmentZ& frag_Z, FragmentT& /*frag_T*/, FragmentAccumulator const& AB,
                  FragmentCompute const& V) const {
    FragmentCompute z;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) {
      z[i] = ElementCompute(AB[i]) + V[i];
    }
    finish_(frag_Z, z);
  }
};

}  // namespace cuda
}  // namespace rf

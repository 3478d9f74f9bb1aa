// The kernels of the "cuda" backend, as raw-pointer functions: the contract between the tensor
// layer (csrc/ops.cpp) and the device code (csrc/cuda/*.cu, csrc/cpu/*.cpp).
//
// This header includes neither torch nor CUDA headers, so the CUDA files compile with nvcc next to
// a CPU-only torch, and the C++ layer compiles without a CUDA toolkit. Every CUDA launcher takes a
// cudaStream_t and returns a cudaError_t as int (0 = success); rf::cuda::error_string names it.
// The CPU kernels (namespace rf::cpu) take the same argument structs, run on the calling thread's
// ATen thread pool and return nothing (they cannot fail once the tensor layer has checked shapes).
//
// Conventions
//   Activations are dense [N, C, H, W] tensors, NCHW or channels_last (NHWC in memory), described
//   by Act4d; element i below is the i-th element in *memory* order.
//   Per-channel vectors (mean, scale, shift, sums, statistics) are float32 [C].
//   All arithmetic is float32; inputs/outputs are float32, float16 or bfloat16 (DType).
//   ReLU follows PyTorch: relu(NaN) = NaN, and its gradient is zero exactly where z <= 0 (a NaN z
//   passes its gradient, as threshold_backward does).
#pragma once

#include <cstddef>
#include <cstdint>

typedef struct CUstream_st* cudaStream_t;  // exactly as CUDA's driver_types.h declares it

namespace rf {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

/// Geometry of a dense [N, C, H, W] activation; HW = H * W.
struct Act4d {
  int64_t N = 0, C = 0, HW = 0;
  bool channels_last = false;  // NHWC in memory (channel fastest), else NCHW (pixel fastest)
  int64_t numel() const { return N * C * HW; }
  int64_t pixels() const { return N * HW; }  // values per channel
};

/// One input's BatchNorm-style affine, z = (v - mean[c]) * scale[c] + shift[c].
/// mean == nullptr means 0 (an eval BN folded to scale/shift, or a plain bias).
/// scale == nullptr means "no affine": the input is used as is (identity residual).
struct ChannelAffine {
  const float* mean = nullptr;
  const float* scale = nullptr;
  const float* shift = nullptr;
};

/// Forward of the memory-bound block tail and of BN-apply + ReLU:
///   out = act( (y - y_mean) * y_scale + y_shift  +  R )
///   R   = 0 (r == nullptr) | r (r_bn.scale == nullptr) | (r - r_mean) * r_scale + r_shift
/// y, r, out share Act4d's layout; each has its own dtype. y_bn.scale/shift are never null.
/// mask (optional, nullptr = none): 1 bit per element, bit (i % 8) of byte (i / 8) set where the
/// ReLU passes its gradient, i.e. !(z <= 0); ceil(numel / 8) bytes, trailing bits zero. Only
/// written when relu is true.
struct BnActArgs {
  Act4d shape;
  DType y_dtype = DType::kFloat32;
  const void* y = nullptr;
  ChannelAffine y_bn;
  DType r_dtype = DType::kFloat32;
  const void* r = nullptr;
  ChannelAffine r_bn;
  DType out_dtype = DType::kFloat32;
  void* out = nullptr;  // may equal y (in place) when the dtypes agree
  uint8_t* mask = nullptr;
  bool relu = true;
};

/// Inputs of the two-pass backward of relu(bn(y) + R) given g = dL/dout. The ReLU mask is
/// recomputed from y, r and the affines (y_bn.mean is never null here; r_bn as in BnActArgs).
struct BnBwdArgs {
  Act4d shape;
  DType g_dtype = DType::kFloat32;
  const void* g = nullptr;
  DType y_dtype = DType::kFloat32;
  const void* y = nullptr;
  ChannelAffine y_bn;
  DType r_dtype = DType::kFloat32;
  const void* r = nullptr;
  ChannelAffine r_bn;
};

/// A 2-D convolution, PyTorch's names in comments: x [N, C, H, W] as NHWC, w [K, C, R, S] as KRSC
/// (channels_last), y [N, K, P, Q] as NPQK.
struct Conv2dShape {
  int N = 0, H = 0, W = 0, C = 0;   // input
  int K = 0, R = 0, S = 0;          // out channels, kernel height, width
  int P = 0, Q = 0;                 // output height, width
  int pad_h = 0, pad_w = 0, stride_h = 1, stride_w = 1, dil_h = 1, dil_w = 1;
};

// ============================================================================ CUDA (csrc/cuda/)
namespace cuda {

const char* error_string(int code);

/// out = act(...) as BnActArgs says. 16-byte vector accesses where alignment allows.
int bn_act_forward(const BnActArgs& a, cudaStream_t stream);

/// dx[i] = mask bit i ? g[i] : 0, for numel elements of dtype (g, dx same dtype, may alias).
int relu_mask_backward(DType dtype, const void* g, const uint8_t* mask, void* dx, int64_t numel,
                       cudaStream_t stream);

/// Bytes of scratch bn_act_backward_reduce and channel_stats need for this shape.
size_t reduce_workspace_bytes(const Act4d& shape);

/// Pass 1: per channel sum_g = sum(gz), sum_gy = sum(gz * (y - y_mean)) and, when r has an affine,
/// sum_gr = sum(gz * (r - r_mean)) (else sum_gr is filled with zeros); gz = g where the ReLU
/// passes, else 0. Deterministic (fixed reduction order, no atomics on the results).
int bn_act_backward_reduce(const BnBwdArgs& a, float* sum_g, float* sum_gy, float* sum_gr, void* workspace,
                           cudaStream_t stream);

/// Pass 2: dy = y_scale * gz + k2 * (y - y_mean) + k3, and
///         dr = gz (identity r) | r_scale * gz + r_k2 * (r - r_mean) + r_k3 (r with an affine);
/// dr is not written when r == nullptr. k2, k3, r_k2, r_k3: float32 [C].
int bn_act_backward_apply(const BnBwdArgs& a, const float* k2, const float* k3, const float* r_k2,
                          const float* r_k3, DType dy_dtype, void* dy, DType dr_dtype, void* dr,
                          cudaStream_t stream);

/// Per-channel statistics of x, merged robustly (Welford within a block, Chan across blocks):
/// count [1] = N * HW, and per channel anchor, mean_off, m2 with mean = anchor + mean_off and
/// M2 = sum((x - mean)^2). anchor is the channel's first value (0 if that is not finite; the
/// statistics of such a channel are not finite anyway). N * HW == 0 gives count 0 and zeros.
int channel_stats(DType dtype, const void* x, const Act4d& shape, float* count, float* anchor, float* mean_off,
                  float* m2, void* workspace, cudaStream_t stream);

/// The BatchNorm affine of batch statistics, one kernel: mean = anchor + mean_off,
/// var = m2 / count (biased; NaN for count 0), invstd = 1 / sqrt(var + eps),
/// scale = weight * invstd (invstd if weight == nullptr), shift = bias (0 if bias == nullptr).
int bn_finalize(int64_t C, const float* count, const float* anchor, const float* mean_off, const float* m2,
                const float* weight, const float* bias, float eps, float* mean, float* var, float* scale,
                float* shift, float* invstd, cudaStream_t stream);

/// The CUTLASS implicit-GEMM configuration that runs this conv (>= 0), or -1 when none fits (then
/// the caller runs cuDNN and bn_act_forward as the epilogue). dtype kFloat32 runs TF32.
int conv2d_fprop_config(DType dtype, const Conv2dShape& s);
const char* conv2d_fprop_config_name(int config);
size_t conv2d_fprop_workspace_bytes(DType dtype, const Conv2dShape& s, int config);

/// y = act(conv(x, w) + bias[k] + residual), in one CUTLASS kernel (the epilogue is ours).
/// x, w, residual, y: dtype, NHWC / KRSC / NPQK; bias float32 [K] or nullptr; residual or nullptr.
int conv2d_fprop_bias_act(DType dtype, int config, const Conv2dShape& s, const void* x, const void* w,
                          const float* bias, const void* residual, void* y, bool relu, void* workspace,
                          cudaStream_t stream);

}  // namespace cuda

// ========================================================================= CPU (csrc/cpu/*.cpp)
// The same operations for CPU tensors, parallel over at::parallel_for and vectorised
// (at::vec::Vectorized). Same semantics as the CUDA functions of the same name.
namespace cpu {

void bn_act_forward(const BnActArgs& a);
void relu_mask_backward(DType dtype, const void* g, const uint8_t* mask, void* dx, int64_t numel);
/// Deterministic, and independent of the number of threads (fixed chunking).
void bn_act_backward_reduce(const BnBwdArgs& a, float* sum_g, float* sum_gy, float* sum_gr);
void bn_act_backward_apply(const BnBwdArgs& a, const float* k2, const float* k3, const float* r_k2,
                           const float* r_k3, DType dy_dtype, void* dy, DType dr_dtype, void* dr);
/// Deterministic, and independent of the number of threads (fixed chunking).
void channel_stats(DType dtype, const void* x, const Act4d& shape, float* count, float* anchor,
                   float* mean_off, float* m2);
void bn_finalize(int64_t C, const float* count, const float* anchor, const float* mean_off, const float* m2,
                 const float* weight, const float* bias, float eps, float* mean, float* var, float* scale,
                 float* shift, float* invstd);

}  // namespace cpu
}  // namespace rf

// The tensor layer of the "cuda" backend: one function per op of the torch library
// `resnet_fused_C` (schemas in bind.cpp). Each checks its tensors (naming the tensor, what was
// expected and what came), makes them dense in one layout, allocates outputs and calls the kernel
// for the tensors' device: rf::cuda::* (CUDA tensors; only in a CUDA build) or rf::cpu::*.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace rf {

using OptTensor = c10::optional<at::Tensor>;

/// (out, mask): out = act((y - mean) * scale + shift + R) in y's layout and out_dtype; mask the
/// packed ReLU bits (uint8 [ceil(numel / 8)], memory order) when relu && want_mask, else empty.
std::tuple<at::Tensor, at::Tensor> bn_act(const at::Tensor& y, const OptTensor& mean, const at::Tensor& scale,
                                          const at::Tensor& shift, const OptTensor& r, const OptTensor& r_mean,
                                          const OptTensor& r_scale, const OptTensor& r_shift, bool relu,
                                          at::ScalarType out_dtype, bool want_mask);

/// g where the packed mask passes, else 0; g [N, C, H, W] taken in the mask's layout.
at::Tensor relu_mask_backward(const at::Tensor& g, const at::Tensor& mask, bool channels_last);

/// (sum(gz), sum(gz (y - mean)), sum(gz (r - r_mean))) float32 [C].
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_reduce(
    const at::Tensor& g, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, const OptTensor& r, const OptTensor& r_mean, const OptTensor& r_scale,
    const OptTensor& r_shift);

/// (dy in y's dtype, dr in r_dtype or an empty tensor without r), both in y's layout.
std::tuple<at::Tensor, at::Tensor> bn_act_bwd_apply(
    const at::Tensor& g, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& k2, const at::Tensor& k3, const OptTensor& r,
    const OptTensor& r_mean, const OptTensor& r_scale, const OptTensor& r_shift, const OptTensor& r_k2,
    const OptTensor& r_k3, at::ScalarType r_dtype);

/// (count [1], anchor [C], mean offset [C], m2 [C]) float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_stats(const at::Tensor& x);

/// (mean, biased var, scale, shift, invstd) float32 [C].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize(
    const at::Tensor& count, const at::Tensor& anchor, const at::Tensor& mean_off, const at::Tensor& m2,
    const OptTensor& weight, const OptTensor& bias, double eps);

/// relu?(conv2d(x, w) + bias + r), output in x's layout. CUDA: one CUTLASS kernel where a
/// configuration fits (channels_last x, 16-bit, or fp32 with allow_tf32), else cuDNN + the bn_act
/// kernel as epilogue; CPU: oneDNN + the C++ epilogue kernel.
at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& w, const OptTensor& bias, const OptTensor& r,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                         bool allow_tf32);

/// conv_bias_act plus the per-channel statistics of its stored output, as channel_stats returns
/// them: (y, count [1], anchor [K], mean offset [K], m2 [K]). On CUDA with a CUTLASS configuration
/// the conv kernel itself writes per-tile partials (no extra pass over y); else a channel_stats pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bias_act_stats(
    const at::Tensor& x, const at::Tensor& w, const OptTensor& bias, const OptTensor& r, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, bool allow_tf32);

/// The kernel conv_bias_act would run for these arguments: a CUTLASS configuration's name, or
/// "fallback: ..." with the reason.
std::string conv_kernel_name(const at::Tensor& x, const at::Tensor& w, const OptTensor& r, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool allow_tf32);

/// JSON: the torch version and CUDA flag this library was built with, its CUDA archs.
std::string build_info();

}  // namespace rf

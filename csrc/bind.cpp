// The torch library `resnet_fused_C`: op schemas and their CPU / CUDA kernels (csrc/ops.cpp).
//
// The library is loaded with torch.ops.load_library (no Python module, so no pybind11 or Python
// headers here); the Python side registers fake implementations for torch.compile
// (resnet_fused/ops/_ext_ops.py). The ops have no autograd formulas of their own: resnet_fused's
// autograd Functions call them, as they call the Triton kernels.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(resnet_fused_C, m) {
  m.def(
      "bn_act(Tensor y, Tensor? mean, Tensor scale, Tensor shift, Tensor? r, Tensor? r_mean, Tensor? r_scale, "
      "Tensor? r_shift, bool relu, ScalarType out_dtype, bool want_mask) -> (Tensor, Tensor)");
  m.def("relu_mask_backward(Tensor g, Tensor mask, bool channels_last) -> Tensor");
  m.def(
      "bn_act_bwd_reduce(Tensor g, Tensor y, Tensor mean, Tensor scale, Tensor shift, Tensor? r, Tensor? r_mean, "
      "Tensor? r_scale, Tensor? r_shift) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_act_bwd_apply(Tensor g, Tensor y, Tensor mean, Tensor scale, Tensor shift, Tensor k2, Tensor k3, "
      "Tensor? r, Tensor? r_mean, Tensor? r_scale, Tensor? r_shift, Tensor? r_k2, Tensor? r_k3, "
      "ScalarType r_dtype) -> (Tensor, Tensor)");
  m.def("channel_stats(Tensor x) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_finalize(Tensor count, Tensor anchor, Tensor mean_off, Tensor m2, Tensor? weight, Tensor? bias, "
      "float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "conv_bias_act(Tensor x, Tensor w, Tensor? bias, Tensor? r, int[2] stride, int[2] padding, "
      "int[2] dilation, bool relu, bool allow_tf32) -> Tensor");
  m.def(
      "conv_bias_act_stats(Tensor x, Tensor w, Tensor? bias, Tensor? r, int[2] stride, int[2] padding, "
      "int[2] dilation, bool relu, bool allow_tf32) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Introspection, for tests and benchmarks: which kernel a conv gets, and what was built.
  m.def(
      "conv_kernel_name(Tensor x, Tensor w, Tensor? r, int[2] stride, int[2] padding, int[2] dilation, "
      "bool allow_tf32) -> str");
  m.def("build_info() -> str", &rf::build_info);
}

// One implementation per op serves both devices (it dispatches on the tensors' device inside).
#define RF_REGISTER_KERNELS(m)                           \
  m.impl("bn_act", &rf::bn_act);                         \
  m.impl("relu_mask_backward", &rf::relu_mask_backward); \
  m.impl("bn_act_bwd_reduce", &rf::bn_act_bwd_reduce);   \
  m.impl("bn_act_bwd_apply", &rf::bn_act_bwd_apply);     \
  m.impl("channel_stats", &rf::channel_stats);           \
  m.impl("bn_finalize", &rf::bn_finalize);               \
  m.impl("conv_bias_act", &rf::conv_bias_act);           \
  m.impl("conv_bias_act_stats", &rf::conv_bias_act_stats); \
  m.impl("conv_kernel_name", &rf::conv_kernel_name)

TORCH_LIBRARY_IMPL(resnet_fused_C, CPU, m) { RF_REGISTER_KERNELS(m); }

#ifdef RESNET_FUSED_WITH_CUDA
TORCH_LIBRARY_IMPL(resnet_fused_C, CUDA, m) { RF_REGISTER_KERNELS(m); }
#endif

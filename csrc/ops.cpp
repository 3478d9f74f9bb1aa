// Tensor layer of the "cuda" backend (see ops.h): checks, layout, allocation, dispatch by device.
//
// Compiled against torch's CPU headers only. The CUDA side is reached through raw-pointer
// launchers (resnet_fused/kernels.h) and is compiled in only when RESNET_FUSED_WITH_CUDA is
// defined; the current CUDA stream comes through c10's device-generic stream API, so no CUDA or
// c10/cuda header is needed here either.
#include "ops.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <sstream>

#include "resnet_fused/kernels.h"
#ifdef RESNET_FUSED_WITH_CUDA
#include "cuda/conv_stats.cuh"  // plain declarations, like kernels.h
#endif

// Build facts arrive as bare tokens (-DRESNET_FUSED_TORCH_VERSION=2.13.0+cpu,
// -DRESNET_FUSED_CUDA_ARCHS=80_90) and are stringified here: quoted macro values do not survive
// the shell that ninja runs compiles through.
#define RF_STRINGIFY_(x) #x
#define RF_STRINGIFY(x) RF_STRINGIFY_(x)
#ifdef RESNET_FUSED_TORCH_VERSION
#define RF_TORCH_VERSION RF_STRINGIFY(RESNET_FUSED_TORCH_VERSION)
#else
#define RF_TORCH_VERSION "unknown"
#endif
#ifdef RESNET_FUSED_CUDA_ARCHS
#define RF_CUDA_ARCHS RF_STRINGIFY(RESNET_FUSED_CUDA_ARCHS)
#else
#define RF_CUDA_ARCHS ""
#endif

namespace rf {
namespace {

constexpr bool kWithCuda =
#ifdef RESNET_FUSED_WITH_CUDA
    true;
#else
    false;
#endif

DType dtype_of(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, ": expected dtype float32, float16 or bfloat16, got ", t);
  }
}

DType dtype_of(const at::Tensor& t, const char* name) { return dtype_of(t.scalar_type(), name); }

void check_act(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, ": expected a 4-D [N, C, H, W] tensor, got ", t.dim(), " dimensions");
  dtype_of(t, name);
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_act(t, name);
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (", ref_name,
                    "'s), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " (",
                    ref_name, "'s device), got one on ", t.device());
}

// PyTorch's own reading of a dense 4-D tensor's layout: channels_last only when it is not also
// NCHW-contiguous (C == 1 or H == W == 1 make both true; NCHW is then the canonical choice).
at::MemoryFormat layout_of(const at::Tensor& t) {
  return (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ? at::MemoryFormat::ChannelsLast
                                                                                  : at::MemoryFormat::Contiguous;
}

Act4d geometry(const at::Tensor& t, at::MemoryFormat fmt) {
  Act4d g;
  g.N = t.size(0);
  g.C = t.size(1);
  g.HW = t.size(2) * t.size(3);
  g.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  return g;
}

// A per-channel vector as float32 [C] on ref's device (BN parameters may be any float dtype).
at::Tensor channel_vec(const at::Tensor& v, const char* name, int64_t C, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == C, name, ": expected shape [", C, "], got ", v.sizes());
  TORCH_CHECK_VALUE(v.device() == ref.device(), name, ": expected a tensor on ", ref.device(), ", got one on ",
                    v.device());
  TORCH_CHECK_TYPE(at::isFloatingType(v.scalar_type()), name, ": expected a floating-point tensor, got ",
                   v.scalar_type());
  return v.to(at::kFloat).contiguous();
}

at::Tensor opt_vec(const OptTensor& v, const char* name, int64_t C, const at::Tensor& ref) {
  return v.has_value() ? channel_vec(*v, name, C, ref) : at::Tensor();
}

const float* fptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
const void* cptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

bool on_cuda(const at::Tensor& t) {
  if (!t.is_cuda()) {
    TORCH_CHECK(t.is_cpu(), "resnet_fused: the cuda backend runs CPU and CUDA tensors, got one on ", t.device());
    return false;
  }
  TORCH_CHECK(kWithCuda, "resnet_fused: this build of the extension has no CUDA kernels (it was built for ",
              RF_TORCH_VERSION, " without CUDA); rebuild it with a CUDA build of torch");
  return true;
}

#ifdef RESNET_FUSED_WITH_CUDA
cudaStream_t stream_of(const at::Tensor& t) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(t.device()).native_handle());
}

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "resnet_fused: CUDA kernel ", what, " failed: ", cuda::error_string(code));
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}
#endif

// bn_act_forward on y's device: the CUDA kernel (named `what` in a launch error) or the CPU one.
void run_bn_act_forward(const BnActArgs& a, const at::Tensor& y, const char* what) {
  if (on_cuda(y)) {
#ifdef RESNET_FUSED_WITH_CUDA
    check_launch(cuda::bn_act_forward(a, stream_of(y)), what);
#endif
  } else {
    cpu::bn_act_forward(a);
  }
}

// The residual branch of the block-tail ops: r (like y) and its optional BatchNorm affine.
struct Residual {
  at::Tensor r, mean, scale, shift;
};

Residual residual_args(const OptTensor& r, const OptTensor& r_mean, const OptTensor& r_scale,
                       const OptTensor& r_shift, const at::Tensor& y, at::MemoryFormat fmt) {
  Residual out;
  if (!r.has_value()) return out;
  check_like(*r, "r", y, "y");
  out.r = r->contiguous(fmt);
  TORCH_CHECK_VALUE(r_scale.has_value() == r_shift.has_value(),
                    "r_scale, r_shift: expected both or neither, got only ", r_scale.has_value() ? "r_scale" : "r_shift");
  if (r_scale.has_value()) {
    const int64_t C = y.size(1);
    out.scale = channel_vec(*r_scale, "r_scale", C, y);
    out.shift = channel_vec(*r_shift, "r_shift", C, y);
    out.mean = opt_vec(r_mean, "r_mean", C, y);
  }
  return out;
}

ChannelAffine affine(const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift) {
  ChannelAffine a;
  a.mean = fptr(mean);
  a.scale = fptr(scale);
  a.shift = fptr(shift);
  return a;
}

}  // namespace

// ------------------------------------------------------------------------------------ forward
std::tuple<at::Tensor, at::Tensor> bn_act(const at::Tensor& y_in, const OptTensor& mean, const at::Tensor& scale,
                                          const at::Tensor& shift, const OptTensor& r, const OptTensor& r_mean,
                                          const OptTensor& r_scale, const OptTensor& r_shift, bool relu,
                                          at::ScalarType out_dtype, bool want_mask) {
  check_act(y_in, "y");
  const int64_t C = y_in.size(1);
  const at::Tensor s = channel_vec(scale, "scale", C, y_in), h = channel_vec(shift, "shift", C, y_in);
  const at::Tensor mu = opt_vec(mean, "mean", C, y_in);
  const at::MemoryFormat fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt);
  const Residual res = residual_args(r, r_mean, r_scale, r_shift, y, fmt);
  BnActArgs a;
  a.shape = geometry(y, fmt);
  a.y_dtype = dtype_of(y, "y");
  a.out_dtype = dtype_of(out_dtype, "out_dtype");
  at::Tensor out = at::empty(y.sizes(), y.options().dtype(out_dtype).memory_format(fmt));
  const bool masked = relu && want_mask;
  at::Tensor mask = at::empty({masked ? (a.shape.numel() + 7) / 8 : 0}, y.options().dtype(at::kByte));
  if (a.shape.numel() == 0) return {out, mask};
  a.y = y.data_ptr();
  a.y_bn = affine(mu, s, h);
  if (res.r.defined()) {
    a.r_dtype = dtype_of(res.r, "r");
    a.r = res.r.data_ptr();
    a.r_bn = affine(res.mean, res.scale, res.shift);
  }
  a.out = out.data_ptr();
  a.mask = masked ? mask.data_ptr<uint8_t>() : nullptr;
  a.relu = relu;
  c10::OptionalDeviceGuard guard(y.device());
  run_bn_act_forward(a, y, "bn_act_forward");
  return {out, mask};
}

at::Tensor relu_mask_backward(const at::Tensor& g_in, const at::Tensor& mask, bool channels_last) {
  check_act(g_in, "g");
  const at::Tensor g = g_in.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kByte, "mask: expected dtype uint8, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 1 && mask.size(0) == (g.numel() + 7) / 8, "mask: expected shape [",
                    (g.numel() + 7) / 8, "] (1 bit per element of g), got ", mask.sizes());
  TORCH_CHECK_VALUE(mask.device() == g.device(), "mask: expected a tensor on ", g.device(), ", got one on ",
                    mask.device());
  at::Tensor dx = at::empty_like(g);
  if (g.numel() == 0) return dx;
  const at::Tensor m = mask.contiguous();
  c10::OptionalDeviceGuard guard(g.device());
  if (on_cuda(g)) {
#ifdef RESNET_FUSED_WITH_CUDA
    check_launch(cuda::relu_mask_backward(dtype_of(g, "g"), g.data_ptr(), m.data_ptr<uint8_t>(), dx.data_ptr(),
                                          g.numel(), stream_of(g)),
                 "relu_mask_backward");
#endif
  } else {
    cpu::relu_mask_backward(dtype_of(g, "g"), g.data_ptr(), m.data_ptr<uint8_t>(), dx.data_ptr(), g.numel());
  }
  return dx;
}

// ----------------------------------------------------------------------------------- backward
namespace {

// The dense tensors and affines both backward passes read, kept alive while the kernel runs.
struct BwdInputs {
  at::Tensor g, y, mean, scale, shift;
  Residual res;
  BnBwdArgs args;
};

BwdInputs bwd_inputs(const at::Tensor& g_in, const at::Tensor& y_in, const at::Tensor& mean,
                     const at::Tensor& scale, const at::Tensor& shift, const OptTensor& r,
                     const OptTensor& r_mean, const OptTensor& r_scale, const OptTensor& r_shift) {
  check_act(y_in, "y");
  check_like(g_in, "g", y_in, "y");
  BwdInputs in;
  const int64_t C = y_in.size(1);
  const at::MemoryFormat fmt = layout_of(y_in);
  in.y = y_in.contiguous(fmt);
  in.g = g_in.contiguous(fmt);
  in.mean = channel_vec(mean, "mean", C, y_in);
  in.scale = channel_vec(scale, "scale", C, y_in);
  in.shift = channel_vec(shift, "shift", C, y_in);
  in.res = residual_args(r, r_mean, r_scale, r_shift, in.y, fmt);
  BnBwdArgs& a = in.args;
  a.shape = geometry(in.y, fmt);
  a.g_dtype = dtype_of(in.g, "g");
  a.y_dtype = dtype_of(in.y, "y");
  if (a.shape.numel() == 0) return in;
  a.g = in.g.data_ptr();
  a.y = in.y.data_ptr();
  a.y_bn = affine(in.mean, in.scale, in.shift);
  if (in.res.r.defined()) {
    a.r_dtype = dtype_of(in.res.r, "r");
    a.r = in.res.r.data_ptr();
    a.r_bn = affine(in.res.mean, in.res.scale, in.res.shift);
  }
  return in;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_reduce(
    const at::Tensor& g, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, const OptTensor& r, const OptTensor& r_mean, const OptTensor& r_scale,
    const OptTensor& r_shift) {
  BwdInputs in = bwd_inputs(g, y, mean, scale, shift, r, r_mean, r_scale, r_shift);
  const int64_t C = y.size(1);
  const auto opts = y.options().dtype(at::kFloat);
  at::Tensor s_g = at::zeros({C}, opts), s_gy = at::zeros({C}, opts), s_gr = at::zeros({C}, opts);
  if (in.args.shape.numel() == 0) return {s_g, s_gy, s_gr};
  c10::OptionalDeviceGuard guard(y.device());
  if (on_cuda(in.y)) {
#ifdef RESNET_FUSED_WITH_CUDA
    at::Tensor ws = workspace(cuda::reduce_workspace_bytes(in.args.shape), in.y);
    check_launch(cuda::bn_act_backward_reduce(in.args, s_g.data_ptr<float>(), s_gy.data_ptr<float>(),
                                              s_gr.data_ptr<float>(), ws.data_ptr(), stream_of(in.y)),
                 "bn_act_backward_reduce");
#endif
  } else {
    cpu::bn_act_backward_reduce(in.args, s_g.data_ptr<float>(), s_gy.data_ptr<float>(), s_gr.data_ptr<float>());
  }
  return {s_g, s_gy, s_gr};
}

std::tuple<at::Tensor, at::Tensor> bn_act_bwd_apply(
    const at::Tensor& g, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& k2, const at::Tensor& k3, const OptTensor& r,
    const OptTensor& r_mean, const OptTensor& r_scale, const OptTensor& r_shift, const OptTensor& r_k2,
    const OptTensor& r_k3, at::ScalarType r_dtype) {
  BwdInputs in = bwd_inputs(g, y, mean, scale, shift, r, r_mean, r_scale, r_shift);
  const int64_t C = y.size(1);
  const at::Tensor k2v = channel_vec(k2, "k2", C, y), k3v = channel_vec(k3, "k3", C, y);
  const bool r_affine = in.res.scale.defined();
  TORCH_CHECK_VALUE(!r_affine || (r_k2.has_value() && r_k3.has_value()),
                    "r_k2, r_k3: expected both when r has a BatchNorm (r_scale given)");
  const at::Tensor rk2 = r_affine ? channel_vec(*r_k2, "r_k2", C, y) : at::Tensor();
  const at::Tensor rk3 = r_affine ? channel_vec(*r_k3, "r_k3", C, y) : at::Tensor();
  const at::MemoryFormat fmt = layout_of(in.y);
  at::Tensor dy = at::empty(in.y.sizes(), in.y.options().memory_format(fmt));
  at::Tensor dr = in.res.r.defined() ? at::empty(in.y.sizes(), in.y.options().dtype(r_dtype).memory_format(fmt))
                                     : at::empty({0}, in.y.options());
  if (in.args.shape.numel() == 0) return {dy, dr};
  const DType dy_t = dtype_of(dy, "dy");
  const DType dr_t = in.res.r.defined() ? dtype_of(r_dtype, "r_dtype") : dy_t;
  void* dr_p = in.res.r.defined() ? dr.data_ptr() : nullptr;
  c10::OptionalDeviceGuard guard(y.device());
  if (on_cuda(in.y)) {
#ifdef RESNET_FUSED_WITH_CUDA
    check_launch(cuda::bn_act_backward_apply(in.args, fptr(k2v), fptr(k3v), fptr(rk2), fptr(rk3), dy_t,
                                             dy.data_ptr(), dr_t, dr_p, stream_of(in.y)),
                 "bn_act_backward_apply");
#endif
  } else {
    cpu::bn_act_backward_apply(in.args, fptr(k2v), fptr(k3v), fptr(rk2), fptr(rk3), dy_t, dy.data_ptr(), dr_t,
                               dr_p);
  }
  return {dy, dr};
}

// --------------------------------------------------------------------------------- statistics
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_stats(const at::Tensor& x_in) {
  check_act(x_in, "x");
  const at::MemoryFormat fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const Act4d shape = geometry(x, fmt);
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor count = at::zeros({1}, opts);
  at::Tensor anchor = at::zeros({shape.C}, opts), mean_off = at::zeros({shape.C}, opts),
             m2 = at::zeros({shape.C}, opts);
  if (shape.C == 0) return {count, anchor, mean_off, m2};
  c10::OptionalDeviceGuard guard(x.device());
  const void* xp = shape.numel() ? x.data_ptr() : nullptr;
  if (on_cuda(x)) {
#ifdef RESNET_FUSED_WITH_CUDA
    at::Tensor ws = workspace(cuda::reduce_workspace_bytes(shape), x);
    check_launch(cuda::channel_stats(dtype_of(x, "x"), xp, shape, count.data_ptr<float>(),
                                     anchor.data_ptr<float>(), mean_off.data_ptr<float>(), m2.data_ptr<float>(),
                                     ws.data_ptr(), stream_of(x)),
                 "channel_stats");
#endif
  } else {
    cpu::channel_stats(dtype_of(x, "x"), xp, shape, count.data_ptr<float>(), anchor.data_ptr<float>(),
                       mean_off.data_ptr<float>(), m2.data_ptr<float>());
  }
  return {count, anchor, mean_off, m2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize(
    const at::Tensor& count, const at::Tensor& anchor, const at::Tensor& mean_off, const at::Tensor& m2,
    const OptTensor& weight, const OptTensor& bias, double eps) {
  TORCH_CHECK_VALUE(anchor.dim() == 1, "anchor: expected shape [C], got ", anchor.sizes());
  const int64_t C = anchor.size(0);
  TORCH_CHECK_VALUE(count.numel() == 1, "count: expected 1 element, got shape ", count.sizes());
  const at::Tensor cnt = count.to(at::kFloat).reshape({1}).contiguous();
  TORCH_CHECK_VALUE(cnt.device() == anchor.device(), "count: expected a tensor on ", anchor.device(),
                    ", got one on ", cnt.device());
  const at::Tensor a = channel_vec(anchor, "anchor", C, anchor), mo = channel_vec(mean_off, "mean_off", C, anchor),
                   q = channel_vec(m2, "m2", C, anchor);
  const at::Tensor w = opt_vec(weight, "weight", C, anchor), b = opt_vec(bias, "bias", C, anchor);
  const auto opts = a.options();
  at::Tensor mean = at::empty({C}, opts), var = at::empty({C}, opts), scale = at::empty({C}, opts),
             shift = at::empty({C}, opts), invstd = at::empty({C}, opts);
  if (C == 0) return {mean, var, scale, shift, invstd};
  c10::OptionalDeviceGuard guard(a.device());
  const float e = static_cast<float>(eps);
  if (on_cuda(a)) {
#ifdef RESNET_FUSED_WITH_CUDA
    check_launch(cuda::bn_finalize(C, fptr(cnt), fptr(a), fptr(mo), fptr(q), fptr(w), fptr(b), e,
                                   mean.data_ptr<float>(), var.data_ptr<float>(), scale.data_ptr<float>(),
                                   shift.data_ptr<float>(), invstd.data_ptr<float>(), stream_of(a)),
                 "bn_finalize");
#endif
  } else {
    cpu::bn_finalize(C, fptr(cnt), fptr(a), fptr(mo), fptr(q), fptr(w), fptr(b), e, mean.data_ptr<float>(),
                     var.data_ptr<float>(), scale.data_ptr<float>(), shift.data_ptr<float>(),
                     invstd.data_ptr<float>());
  }
  return {mean, var, scale, shift, invstd};
}

// ---------------------------------------------------------------------------------------- conv
namespace {

struct ConvPlan {
  Conv2dShape shape;
  int config = -1;
  std::string why;  // why the CUTLASS path is not taken (config == -1)
};

int64_t pair_at(at::IntArrayRef v, const char* name, size_t i) {
  TORCH_CHECK_VALUE(v.size() == 2, name, ": expected 2 values, got ", v.size());
  return v[i];
}

// CUTLASS reads 16-byte vectors: true if t, once made dense in fmt (a copy is freshly allocated,
// hence aligned), starts on a 16-byte boundary.
bool keeps_alignment(const at::Tensor& t, at::MemoryFormat fmt) {
  return !t.is_contiguous(fmt) || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

ConvPlan plan_conv(const at::Tensor& x, const at::Tensor& w, const OptTensor& r, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, bool allow_tf32) {
  check_act(x, "x");
  check_act(w, "weight");
  TORCH_CHECK_VALUE(w.size(1) == x.size(1), "weight: expected ", x.size(1), " input channels (x's), got shape ",
                    w.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "weight: expected dtype ", x.scalar_type(),
                   " (x's), got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.device() == x.device(), "weight: expected a tensor on ", x.device(), " (x's device), got one on ",
                    w.device());
  if (r.has_value()) {
    TORCH_CHECK_VALUE(r->device() == x.device(), "r: expected a tensor on ", x.device(), " (x's device), got one on ",
                      r->device());
  }
  ConvPlan p;
  Conv2dShape& s = p.shape;
  s.N = x.size(0); s.C = x.size(1); s.H = x.size(2); s.W = x.size(3);
  s.K = w.size(0); s.R = w.size(2); s.S = w.size(3);
  s.stride_h = pair_at(stride, "stride", 0); s.stride_w = pair_at(stride, "stride", 1);
  s.pad_h = pair_at(padding, "padding", 0); s.pad_w = pair_at(padding, "padding", 1);
  s.dil_h = pair_at(dilation, "dilation", 0); s.dil_w = pair_at(dilation, "dilation", 1);
  s.P = (s.H + 2 * s.pad_h - s.dil_h * (s.R - 1) - 1) / s.stride_h + 1;
  s.Q = (s.W + 2 * s.pad_w - s.dil_w * (s.S - 1) - 1) / s.stride_w + 1;
  TORCH_CHECK_VALUE(s.P > 0 && s.Q > 0, "x: spatial size ", s.H, "x", s.W, " is too small for a ", s.R, "x", s.S,
                    " kernel with padding ", padding, ", dilation ", dilation);
  if (!x.is_cuda()) {
    p.why = "fallback: CPU tensors (oneDNN conv + C++ epilogue)";
  } else if (layout_of(x) != at::MemoryFormat::ChannelsLast) {
    p.why = "fallback: x is not channels_last (cuDNN conv + epilogue kernel)";
  } else if (x.scalar_type() == at::kFloat && !allow_tf32) {
    p.why = "fallback: float32 without TF32 (cuDNN conv + epilogue kernel)";
  } else if (!keeps_alignment(x, at::MemoryFormat::ChannelsLast) ||
             !keeps_alignment(w, at::MemoryFormat::ChannelsLast) ||
             (r.has_value() && !keeps_alignment(*r, at::MemoryFormat::ChannelsLast))) {
    p.why = "fallback: a tensor at a storage offset that is not 16-byte aligned (cuDNN conv + epilogue kernel)";
  } else if (r.has_value() && r->scalar_type() != x.scalar_type()) {
    p.why = "fallback: residual dtype differs from x's (cuDNN conv + epilogue kernel)";
  } else if (static_cast<int64_t>(s.N) * s.P * s.Q * s.K >= (int64_t(1) << 31) ||
             static_cast<int64_t>(s.N) * s.H * s.W * s.C >= (int64_t(1) << 31)) {
    p.why = "fallback: tensor too large for 32-bit CUTLASS indexing (cuDNN conv + epilogue kernel)";
  } else {
#ifdef RESNET_FUSED_WITH_CUDA
    p.config = cuda::conv2d_fprop_config(dtype_of(x, "x"), s);
    if (p.config < 0) p.why = "fallback: no CUTLASS configuration fits the shape (cuDNN conv + epilogue kernel)";
#else
    p.why = "fallback: built without CUDA";
#endif
  }
  return p;
}

bool aligned(const at::Tensor& t, size_t bytes) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

using ConvResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The conv with its epilogue and, with `stats`, the per-channel statistics of the stored output
// as channel_stats returns them. CUTLASS where plan_conv found a configuration (the statistics
// then come from the kernel's own per-tile partials), else the library conv + bn_act in place
// (+ channel_stats).
ConvResult conv_impl(const at::Tensor& x_in, const at::Tensor& w_in, const OptTensor& bias, const OptTensor& r,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                     bool allow_tf32, bool stats) {
  ConvPlan p = plan_conv(x_in, w_in, r, stride, padding, dilation, allow_tf32);
  const Conv2dShape& s = p.shape;
  const at::MemoryFormat fmt = layout_of(x_in);
  at::Tensor b = opt_vec(bias, "bias", s.K, x_in);
  at::Tensor res;
  if (r.has_value()) {
    check_act(*r, "r");
    TORCH_CHECK_VALUE(r->size(0) == s.N && r->size(1) == s.K && r->size(2) == s.P && r->size(3) == s.Q,
                      "r: expected shape [", s.N, ", ", s.K, ", ", s.P, ", ", s.Q, "] (the conv output), got ",
                      r->sizes());
    res = r->contiguous(fmt);
  }
  const auto fopts = x_in.options().dtype(at::kFloat);
  c10::OptionalDeviceGuard guard(x_in.device());
#ifdef RESNET_FUSED_WITH_CUDA
  // plan_conv sent views at unaligned storage offsets to the fallback; the bias, read 8 floats at
  // a time, is tiny: an aligned copy instead
  const at::Tensor x = p.config >= 0 ? x_in.contiguous(at::MemoryFormat::ChannelsLast) : x_in;
  const at::Tensor w = p.config >= 0 ? w_in.contiguous(at::MemoryFormat::ChannelsLast) : w_in;
  if (p.config >= 0) {
    TORCH_CHECK(aligned(x, 16) && aligned(w, 16) && aligned(res, 16), "resnet_fused: internal error: unaligned "
                "tensor reached the CUTLASS conv");
    if (!aligned(b, 32)) b = b.clone();
    at::Tensor y = at::empty({s.N, s.K, s.P, s.Q}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    const DType dt = dtype_of(x, "x");
    at::Tensor ws = workspace(cuda::conv2d_fprop_workspace_bytes(dt, s, p.config), x);
    void* wsp = ws.numel() ? ws.data_ptr() : nullptr;
    if (!stats) {
      check_launch(cuda::conv2d_fprop_bias_act(dt, p.config, s, x.data_ptr(), w.data_ptr(), fptr(b), cptr(res),
                                               y.data_ptr(), relu, wsp, stream_of(x)),
                   "conv2d_fprop_bias_act");
      return {y, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const int64_t tiles = cuda::conv2d_fprop_stats_tiles(p.config, s);
    const int64_t rows = cuda::conv2d_fprop_stats_tile_rows(p.config);
    at::Tensor tile_anchor = at::empty({tiles, s.K}, fopts), tile_sum = at::empty({tiles, s.K}, fopts),
               tile_m2 = at::empty({tiles, s.K}, fopts);
    check_launch(cuda::conv2d_fprop_bias_act_stats(dt, p.config, s, x.data_ptr(), w.data_ptr(), fptr(b),
                                                   cptr(res), y.data_ptr(), relu, wsp,
                                                   tile_anchor.data_ptr<float>(), tile_sum.data_ptr<float>(),
                                                   tile_m2.data_ptr<float>(), stream_of(x)),
                 "conv2d_fprop_bias_act_stats");
    // All tiles merged at once in float64 (exact multi-way form of Chan's formula: a few numbers
    // per tile and channel, next to the conv's cost): mean_t = anchor_t + sum_t / n_t,
    // M2 = sum M2_t + sum n_t (mean_t - mean)^2. The result is anchored on the first tile's
    // anchor, as the Triton kernels' statistics are, so |mean| >> std keeps its digits.
    const int64_t M = static_cast<int64_t>(s.N) * s.P * s.Q;
    const auto dopts = fopts.dtype(at::kDouble);
    const at::Tensor n_t = at::clamp_max(M - at::arange(tiles, dopts) * rows, static_cast<double>(rows))
                               .unsqueeze(1);
    const at::Tensor anchor = tile_anchor.select(0, 0).to(at::kDouble);
    const at::Tensor off_t = (tile_anchor.to(at::kDouble) - anchor) + tile_sum.to(at::kDouble) / n_t;
    const at::Tensor off = off_t.mul(n_t).sum(0) / static_cast<double>(M);
    const at::Tensor m2 = tile_m2.to(at::kDouble).sum(0) + (off_t - off).square_().mul_(n_t).sum(0);
    return {y, at::full({1}, static_cast<double>(M), fopts), anchor.to(at::kFloat), off.to(at::kFloat),
            m2.to(at::kFloat)};
  }
#endif
  // The library's convolution (cuDNN / oneDNN), then our epilogue kernel in place: one read and
  // one write of y whatever the epilogue holds (bias, residual, ReLU). On the CPU the bias goes
  // into oneDNN's conv, where it costs nothing and rounds exactly as PyTorch's conv + bias does
  // (a 16-bit conv result is rounded before any epilogue: adding the bias after that rounding
  // would round twice); on CUDA the epilogue adds it in float32.
  const bool bias_in_conv = b.defined() && !x_in.is_cuda();
  at::Tensor y = at::convolution(x_in, w_in,
                                 bias_in_conv ? c10::optional<at::Tensor>(b.to(x_in.scalar_type())) : c10::nullopt,
                                 stride, padding, dilation, false, {0, 0}, 1)
                     .contiguous(fmt);
  const bool epilogue_bias = b.defined() && !bias_in_conv;
  if ((epilogue_bias || res.defined() || relu) && y.numel() > 0) {
    const at::Tensor ones = at::ones({s.K}, fopts);
    const at::Tensor shift = epilogue_bias ? b : at::zeros({s.K}, fopts);
    BnActArgs a;
    a.shape = geometry(y, fmt);
    a.y_dtype = a.out_dtype = dtype_of(y, "x");
    a.y = y.data_ptr();
    a.out = y.data_ptr();
    a.y_bn = affine(at::Tensor(), ones, shift);
    if (res.defined()) {
      a.r_dtype = dtype_of(res, "r");
      a.r = res.data_ptr();
    }
    a.relu = relu;
    run_bn_act_forward(a, y, "bn_act_forward (conv epilogue)");
  }
  if (!stats) return {y, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  auto st = channel_stats(y);
  return {y, std::get<0>(st), std::get<1>(st), std::get<2>(st), std::get<3>(st)};
}

}  // namespace

at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& w, const OptTensor& bias, const OptTensor& r,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                         bool allow_tf32) {
  return std::get<0>(conv_impl(x, w, bias, r, stride, padding, dilation, relu, allow_tf32, false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bias_act_stats(
    const at::Tensor& x, const at::Tensor& w, const OptTensor& bias, const OptTensor& r, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, bool allow_tf32) {
  return conv_impl(x, w, bias, r, stride, padding, dilation, relu, allow_tf32, true);
}

std::string conv_kernel_name(const at::Tensor& x, const at::Tensor& w, const OptTensor& r, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool allow_tf32) {
  const ConvPlan p = plan_conv(x, w, r, stride, padding, dilation, allow_tf32);
#ifdef RESNET_FUSED_WITH_CUDA
  if (p.config >= 0) return cuda::conv2d_fprop_config_name(p.config);
#endif
  return p.why;
}

std::string build_info() {
  std::ostringstream os;
  // archs as built, "80_90" -> "80;90"
  std::string archs = RF_CUDA_ARCHS;
  for (char& c : archs) c = c == '_' ? ';' : c;
  os << "{\"torch\": \"" << RF_TORCH_VERSION << "\", \"cuda\": " << (kWithCuda ? "true" : "false")
     << ", \"archs\": \"" << archs << "\"}";
  return os.str();
}

}  // namespace rf

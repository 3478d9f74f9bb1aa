// CPU forward of BN-apply (+ residual) (+ ReLU) with the optional 1-bit ReLU mask, and the
// mask-driven ReLU backward (rf::cpu::bn_act_forward, rf::cpu::relu_mask_backward; kernels.h).
//
// The forward is one pass over memory: each window of kWin elements is loaded (converted to float
// if needed), split into runs of one NCHW plane / one NHWC block, transformed by a plain float
// loop the compiler vectorises, stored (rounded to the output dtype), and its mask bytes packed.
// Windows start at multiples of 8 elements, so every mask byte is written by exactly one thread.
// out == y (in place) is computed into a window buffer and copied (see OutWindow).
#include "common.h"

namespace rf {
namespace cpu {
namespace {

using namespace detail;

// Parameters 0..5: y mean, y scale, y shift, r mean, r scale, r shift (see bn_z).
constexpr int kNP = 6;

// One run: S = 1 reads the parameters per element (expanded NHWC), S = 0 once (an NCHW plane).
template <RMode RM, bool RELU, int S>
inline void forward_run(const float* __restrict y, const float* __restrict r, float* __restrict o, int64_t len,
                        const float* __restrict ym, const float* __restrict ys, const float* __restrict yb,
                        const float* __restrict rm, const float* __restrict rs, const float* __restrict rb) {
  for (int64_t i = 0; i < len; ++i) {
    const float yc = y[i] - ym[i * S];
    float rv = 0.f;
    if constexpr (RM == RMode::kIdentity) rv = r[i];
    if constexpr (RM == RMode::kAffine) rv = r[i] - rm[i * S];
    float z = bn_z<RM>(yc, ys[i * S], yb[i * S], rv, rs[i * S], rb[i * S]);
    if constexpr (RELU) z = relu(z);
    o[i] = z;
  }
}

template <RMode RM, bool RELU>
void forward_impl(const BnActArgs& a, const Plan& pl) {
  // Absent pointers read as mean 0, shift 0 (scale 1 is only a safety net: the contract says
  // y's scale/shift are never null).
  const Params<kNP> prm({a.y_bn.mean, a.y_bn.scale, a.y_bn.shift, a.r_bn.mean, a.r_bn.scale, a.r_bn.shift},
                        {0.f, 1.f, 0.f, 0.f, 1.f, 0.f}, pl);

  for_windows(pl.numel, 3, [&](int64_t e0, int64_t n, float* scratch) {
    const float* y = load_f32(a.y_dtype, a.y, e0, n, scratch);
    const float* r = RM == RMode::kNone ? nullptr : load_f32(a.r_dtype, a.r, e0, n, scratch + kWin);
    const OutWindow out(a.out_dtype, a.out, e0, n, scratch + 2 * kWin, {{a.y, y}, {a.r, r}});
    float* o = out.ptr;

    walk_runs(pl, e0, n, [&](int64_t k, int64_t len, int64_t where) {
      const float* p[kNP];
      prm.at(pl.cl, where, p);
      const float* rk = r ? r + k : nullptr;
      if (pl.cl)
        forward_run<RM, RELU, 1>(y + k, rk, o + k, len, p[0], p[1], p[2], p[3], p[4], p[5]);
      else
        forward_run<RM, RELU, 0>(y + k, rk, o + k, len, p[0], p[1], p[2], p[3], p[4], p[5]);
    });

    // The mask is packed from the float results (before rounding to fp16/bf16, which could turn
    // a tiny positive z into 0 and so disagree with the backward's recomputed z).
    if (RELU && a.mask) pack_mask(o, n, a.mask + e0 / 8);
    out.store();
  });
}

template <RMode RM>
void forward_relu(const BnActArgs& a, const Plan& pl) {
  if (a.relu)
    forward_impl<RM, true>(a, pl);
  else
    forward_impl<RM, false>(a, pl);
}

// dx = bit ? g : +0 on the raw bits (no float compare: a NaN g behind a clear bit becomes 0, as
// threshold_backward does), for 2- or 4-byte elements.
template <class U>
void mask_select(const U* g, const uint8_t* mask, U* dx, int64_t numel) {
  const int64_t nbytes = divup(numel, 8);
  at::parallel_for(0, nbytes, 4096, [&](int64_t b0, int64_t b1) {
    const int64_t full_end = std::min(b1, numel / 8);
    for (int64_t j = b0; j < full_end; ++j) {
      const unsigned m = mask[j];
      for (int k = 0; k < 8; ++k) {
        const U keep = static_cast<U>(0u - ((m >> k) & 1u));
        dx[8 * j + k] = g[8 * j + k] & keep;
      }
    }
    for (int64_t j = std::max(b0, full_end); j < b1; ++j) {  // the last, partial byte
      const unsigned m = mask[j];
      for (int64_t i = 8 * j; i < numel; ++i) {
        const U keep = static_cast<U>(0u - ((m >> (i - 8 * j)) & 1u));
        dx[i] = g[i] & keep;
      }
    }
  });
}

}  // namespace

void bn_act_forward(const BnActArgs& a) {
  const detail::Plan pl = detail::make_plan(a.shape);
  if (pl.numel <= 0) return;
  switch (detail::rmode_of(a.r, a.r_bn)) {
    case detail::RMode::kNone: forward_relu<detail::RMode::kNone>(a, pl); break;
    case detail::RMode::kIdentity: forward_relu<detail::RMode::kIdentity>(a, pl); break;
    case detail::RMode::kAffine: forward_relu<detail::RMode::kAffine>(a, pl); break;
  }
}

void relu_mask_backward(DType dtype, const void* g, const uint8_t* mask, void* dx, int64_t numel) {
  if (numel <= 0) return;
  // The select works on bit patterns, so only the element size matters.
  if (dtype == DType::kFloat32)
    mask_select(static_cast<const uint32_t*>(g), mask, static_cast<uint32_t*>(dx), numel);
  else
    mask_select(static_cast<const uint16_t*>(g), mask, static_cast<uint16_t*>(dx), numel);
}

}  // namespace cpu
}  // namespace rf

// CPU two-pass backward of relu(bn(y) + R) (rf::cpu::bn_act_backward_reduce / _apply; kernels.h).
//
// Both passes recompute z with detail::bn_z, the function the forward uses, so the ReLU gradient
// mask agrees with the forward's bit for bit (no mask tensor is read here).
//
// Pass 1 (reduce) is deterministic and independent of the thread count: the tensor is cut into
// the fixed chunks of detail::make_chunking (a function of the shape only), each chunk sums
// sequentially (float accumulators flushed into double every kFlush additions) into its own
// partial, and the partials are added per channel in chunk order, in double. Pass 2 (apply) is
// element-wise over windows like the forward; dy/dr may alias g/y/r (see OutWindow).
#include "common.h"

namespace rf {
namespace cpu {
namespace {

using namespace detail;

// Parameters 0..5 as in the forward (y mean, y scale, y shift, r mean, r scale, r shift), then
// 6..9: k2, k3, r_k2, r_k3 (apply only).
constexpr int kNA = 10;

// The ReLU-gated gradient of one element, from its values and parameters; returns yc = y - y_mean
// and rv (r, or r - r_mean) as well, both passes need them.
template <RMode RM>
inline float gated(float g, float y, float r, float ym, float ys, float yb, float rm, float rs, float rb,
                   float& yc, float& rv) {
  yc = y - ym;
  rv = RM == RMode::kAffine ? r - rm : r;
  return relu_grad(bn_z<RM>(yc, ys, yb, rv, rs, rb), g);
}

// A run's parameter pointers (y mean, scale, shift; r mean, scale, shift), read at [i * S]: S = 1
// per element (expanded NHWC), S = 0 one channel. The loops copy them into __restrict locals
// first; read through the array they were reloaded every iteration and the loops stayed scalar.
#define RF_Z_PARAMS(p)                                                                          \
  const float *__restrict ym = (p)[0], *__restrict ys = (p)[1], *__restrict yb = (p)[2];        \
  const float *__restrict rm = (p)[3], *__restrict rs = (p)[4], *__restrict rb = (p)[5]
// Element i (parameter index pi) of a run, inside a loop after RF_Z_PARAMS.
#define RF_GATED(i, pi)                                                                                   \
  float yc, rv;                                                                                           \
  const float gz = gated<RM>(g[i], y[i], RM == RMode::kNone ? 0.f : r[i], ym[pi], ys[pi], yb[pi], rm[pi], \
                             rs[pi], rb[pi], yc, rv)

// ------------------------------------------------------------------------------------- reduce
// NHWC: one block run (len <= B elements, entry i of channel i % C) into per-entry float sums.
template <RMode RM>
inline void reduce_block(const float* __restrict g, const float* __restrict y, const float* __restrict r,
                         int64_t len, const float* const* p, float* __restrict sg, float* __restrict sgy,
                         float* __restrict sgr) {
  RF_Z_PARAMS(p);
  for (int64_t i = 0; i < len; ++i) {
    RF_GATED(i, i);
    sg[i] += gz;
    sgy[i] += gz * yc;
    if constexpr (RM == RMode::kAffine) sgr[i] += gz * rv;
  }
}

// NCHW: a piece of one channel's run into kL lanes (element i into lane i % kL); lane_pieces
// keeps the additions per lane between flushes at most kFlush.
template <RMode RM>
inline void reduce_lanes(const float* __restrict g, const float* __restrict y, const float* __restrict r,
                         int64_t len, const float* const* p, float* __restrict sg, float* __restrict sgy,
                         float* __restrict sgr) {
  RF_Z_PARAMS(p);
  int64_t k = 0;
  for (; k + kL <= len; k += kL) {
    for (int l = 0; l < kL; ++l) {
      RF_GATED(k + l, 0);
      sg[l] += gz;
      sgy[l] += gz * yc;
      if constexpr (RM == RMode::kAffine) sgr[l] += gz * rv;
    }
  }
  for (int l = 0; k + l < len; ++l) {
    RF_GATED(k + l, 0);
    sg[l] += gz;
    sgy[l] += gz * yc;
    if constexpr (RM == RMode::kAffine) sgr[l] += gz * rv;
  }
}

template <RMode RM>
void reduce_impl(const BnBwdArgs& a, const Plan& pl, float* out[3]) {
  const Chunking ch = make_chunking(pl);
  const Params<6> prm({a.y_bn.mean, a.y_bn.scale, a.y_bn.shift, a.r_bn.mean, a.r_bn.scale, a.r_bn.shift},
                      {0.f, 1.f, 0.f, 0.f, 1.f, 0.f}, pl);
  const int64_t C = pl.C;
  // Partials, double: NHWC [T][3][C], NCHW [T][3] (one channel per chunk).
  const int64_t per = pl.cl ? C : 1;
  std::vector<double> part(static_cast<size_t>(ch.T * 3 * per));
  // Conversion window: whole blocks for NHWC; kFlush * kL elements (one flush period) for NCHW.
  const int64_t sub = pl.cl ? std::max<int64_t>(1, kWin / pl.B) * pl.B : kFlush * kL;

  at::parallel_for(0, ch.T, 1, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<float[]> buf(new float[static_cast<size_t>(3 * sub)]);
    Acc acc[3];
    // The three inputs of [off, off + n) as float (pointers straight into fp32 tensors).
    auto load = [&](int64_t off, int64_t n, const float* in[3]) {
      in[0] = load_f32(a.g_dtype, a.g, off, n, buf.get());
      in[1] = load_f32(a.y_dtype, a.y, off, n, buf.get() + sub);
      in[2] = RM == RMode::kNone ? nullptr : load_f32(a.r_dtype, a.r, off, n, buf.get() + 2 * sub);
    };
    for (int64_t t = t0; t < t1; ++t) {
      double* pt = part.data() + t * 3 * per;
      const float* in[3];
      if (pl.cl) {
        for (auto& x : acc) x.reset(pl.B);
        const float* p[6];
        prm.at(true, 0, p);
        const int64_t e0 = t * ch.R * C, e1 = e0 + chunk_count(pl, ch, t) * C;
        int64_t blocks = 0;
        for (int64_t w = e0; w < e1; w += sub) {
          const int64_t wn = std::min(sub, e1 - w);
          load(w, wn, in);
          for (int64_t k = 0; k < wn; k += pl.B) {
            reduce_block<RM>(in[0] + k, in[1] + k, in[2] ? in[2] + k : nullptr, std::min(pl.B, wn - k), p,
                             acc[0].f.data(), acc[1].f.data(), acc[2].f.data());
            if (++blocks % kFlush == 0)
              for (auto& x : acc) x.flush();
          }
        }
        for (int i = 0; i < 3; ++i) acc[i].fold(C, pt + i * C);
      } else {
        for (auto& x : acc) x.reset(kL);
        const int64_t c = t / ch.J, j = t % ch.J;
        const float* p[6];
        prm.at(false, c, p);
        int64_t adds = 0;
        walk_channel(pl, c, j * ch.R, j * ch.R + chunk_count(pl, ch, j), [&](int64_t off, int64_t len) {
          lane_pieces(
              adds, len,
              [&](int64_t w, int64_t wn) {  // wn <= kFlush * kL = sub
                load(off + w, wn, in);
                reduce_lanes<RM>(in[0], in[1], in[2], wn, p, acc[0].f.data(), acc[1].f.data(), acc[2].f.data());
              },
              [&] {
                for (auto& x : acc) x.flush();
              });
        });
        for (int i = 0; i < 3; ++i) acc[i].fold(1, pt + i);
      }
    }
  });

  // Merge per channel, chunks in order.
  at::parallel_for(0, C, std::max<int64_t>(1, 4096 / ch.J), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s[3] = {0.0, 0.0, 0.0};
      for (int64_t j = 0; j < ch.J; ++j) {
        const double* pt = pl.cl ? part.data() + j * 3 * C + c : part.data() + (c * ch.J + j) * 3;
        for (int i = 0; i < 3; ++i) s[i] += pt[i * per];
      }
      for (int i = 0; i < 3; ++i)
        if (out[i]) out[i][c] = static_cast<float>(s[i]);
    }
  });
}

// -------------------------------------------------------------------------------------- apply
template <RMode RM, int S>
inline void apply_run(const float* __restrict g, const float* __restrict y, const float* __restrict r,
                      float* __restrict dy, float* __restrict dr, int64_t len, const float* const* p) {
  RF_Z_PARAMS(p);
  const float *__restrict k2 = p[6], *__restrict k3 = p[7], *__restrict rk2 = p[8], *__restrict rk3 = p[9];
  for (int64_t i = 0; i < len; ++i) {
    RF_GATED(i, i * S);
    dy[i] = ys[i * S] * gz + k2[i * S] * yc + k3[i * S];
    if constexpr (RM == RMode::kIdentity) dr[i] = gz;
    if constexpr (RM == RMode::kAffine) dr[i] = rs[i * S] * gz + rk2[i * S] * rv + rk3[i * S];
  }
}

#undef RF_GATED
#undef RF_Z_PARAMS

template <RMode RM, bool DR>
void apply_impl(const BnBwdArgs& a, const Plan& pl, const Params<kNA>& prm, DType dy_dtype, void* dy,
                DType dr_dtype, void* dr) {
  for_windows(pl.numel, 5, [&](int64_t e0, int64_t n, float* scratch) {
    const float* g = load_f32(a.g_dtype, a.g, e0, n, scratch);
    const float* y = load_f32(a.y_dtype, a.y, e0, n, scratch + kWin);
    const float* r = RM == RMode::kNone ? nullptr : load_f32(a.r_dtype, a.r, e0, n, scratch + 2 * kWin);
    const OutWindow ody(dy_dtype, dy, e0, n, scratch + 3 * kWin, {{a.g, g}, {a.y, y}, {a.r, r}});
    // Without dr (r enters z, its gradient is not wanted) the dr results go to a scratch buffer.
    const OutWindow odr(dr_dtype, DR ? dr : nullptr, e0, DR ? n : 0, scratch + 4 * kWin, {{a.g, g}, {a.y, y}, {a.r, r}});
    walk_runs(pl, e0, n, [&](int64_t k, int64_t len, int64_t where) {
      const float* p[kNA];
      prm.at(pl.cl, where, p);
      const float* rk = r ? r + k : nullptr;
      if (pl.cl)
        apply_run<RM, 1>(g + k, y + k, rk, ody.ptr + k, odr.ptr + k, len, p);
      else
        apply_run<RM, 0>(g + k, y + k, rk, ody.ptr + k, odr.ptr + k, len, p);
    });
    ody.store();
    if (DR) odr.store();
  });
}

template <RMode RM>
void apply_dr(const BnBwdArgs& a, const Plan& pl, const Params<kNA>& prm, DType dy_dtype, void* dy,
              DType dr_dtype, void* dr) {
  if (RM != RMode::kNone && dr)
    apply_impl<RM, true>(a, pl, prm, dy_dtype, dy, dr_dtype, dr);
  else
    apply_impl<RM, false>(a, pl, prm, dy_dtype, dy, dr_dtype, dr);
}

}  // namespace

void bn_act_backward_reduce(const BnBwdArgs& a, float* sum_g, float* sum_gy, float* sum_gr) {
  using namespace detail;
  const Plan pl = make_plan(a.shape);
  if (pl.C <= 0) return;
  const RMode rm = rmode_of(a.r, a.r_bn);
  float* out[3] = {sum_g, sum_gy, sum_gr};
  // Sums over no values are 0; sum_gr is 0 without an r affine.
  for (int i = (pl.P <= 0 ? 0 : 2); i < 3; ++i)
    if (out[i] && (pl.P <= 0 || rm != RMode::kAffine)) std::fill(out[i], out[i] + pl.C, 0.f);
  if (pl.P <= 0) return;
  if (rm != RMode::kAffine) out[2] = nullptr;
  switch (rm) {
    case RMode::kNone: reduce_impl<RMode::kNone>(a, pl, out); break;
    case RMode::kIdentity: reduce_impl<RMode::kIdentity>(a, pl, out); break;
    case RMode::kAffine: reduce_impl<RMode::kAffine>(a, pl, out); break;
  }
}

void bn_act_backward_apply(const BnBwdArgs& a, const float* k2, const float* k3, const float* r_k2,
                           const float* r_k3, DType dy_dtype, void* dy, DType dr_dtype, void* dr) {
  using namespace detail;
  const Plan pl = make_plan(a.shape);
  if (pl.numel <= 0) return;
  const Params<kNA> prm({a.y_bn.mean, a.y_bn.scale, a.y_bn.shift, a.r_bn.mean, a.r_bn.scale, a.r_bn.shift, k2,
                         k3, r_k2, r_k3},
                        {0.f, 1.f, 0.f, 0.f, 1.f, 0.f, 0.f, 0.f, 0.f, 0.f}, pl);
  switch (rmode_of(a.r, a.r_bn)) {
    case RMode::kNone: apply_dr<RMode::kNone>(a, pl, prm, dy_dtype, dy, dr_dtype, dr); break;
    case RMode::kIdentity: apply_dr<RMode::kIdentity>(a, pl, prm, dy_dtype, dy, dr_dtype, dr); break;
    case RMode::kAffine: apply_dr<RMode::kAffine>(a, pl, prm, dy_dtype, dy, dr_dtype, dr); break;
  }
}

}  // namespace cpu
}  // namespace rf

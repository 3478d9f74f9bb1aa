// CPU per-channel batch statistics and the BN affine from them (rf::cpu::channel_stats,
// rf::cpu::bn_finalize; kernels.h).
//
// Robust when |mean| >> std (the float32 sum(x^2) - sum(x)^2/n trap): each fixed chunk (see
// detail::make_chunking; the shape alone decides them, so results do not depend on the thread
// count) is anchored on one of its own values a (the first finite one), and takes two passes
// over its data while it is in cache: the mean of d = x - a, then M2 from deviations from that
// mean (with the exact correction for the rounded mean). Chunks are merged per channel in chunk
// order with Chan et al.'s formula, in double, with means carried as offsets from the channel's
// anchor (the first chunk's), so no step subtracts two large nearly-equal numbers.
#include <cmath>
#include <limits>

#include "common.h"

namespace rf {
namespace cpu {
namespace {

using namespace detail;

// One chunk's partial for one channel. anchor is NaN when the chunk has no finite value of the
// channel (its offsets are then taken from 0, and the merged statistics are non-finite anyway).
struct Partial {
  float anchor, off, m2;
};

inline bool finite(float v) { return std::isfinite(v); }

// Chunk statistics from (float) pass sums: S1 = sum(x - a) gave the float mean m; S2 = sum(d^2),
// S3 = sum(d) with d = (x - a) - m. M2 = S2 - S3^2 / n removes what the rounding of m added.
inline Partial finish(float anchor, double n, float m, double S2, double S3) {
  const double m2 = S2 - S3 * S3 / n;
  // An infinite m (an inf in the data) makes S3 NaN; the mean is then m itself, as torch's is.
  const double off = std::isfinite(m) ? m + S3 / n : double(m);
  return {anchor, static_cast<float>(off), static_cast<float>(m2 < 0 ? 0.0 : m2)};
}

// Pass 1 over a run: sum of x - a. S = 1: a and s per element (an NHWC block); S = 0: one a,
// and kL lanes s (element i into lane i % kL).
template <int S>
inline void sum_dev(const float* __restrict x, int64_t len, const float* __restrict a, float* __restrict s) {
  if constexpr (S == 1) {
    for (int64_t i = 0; i < len; ++i) s[i] += x[i] - a[i];
  } else {
    const float a0 = a[0];
    int64_t k = 0;
    for (; k + kL <= len; k += kL)
      for (int l = 0; l < kL; ++l) s[l] += x[k + l] - a0;
    for (int l = 0; k + l < len; ++l) s[l] += x[k + l] - a0;
  }
}

// Pass 2: d = (x - a) - m; s2 += d * d, s3 += d (same layouts as sum_dev).
inline void sq_step(float x, float a, float m, float& s2, float& s3) {
  const float d = (x - a) - m;
  s2 += d * d;
  s3 += d;
}
template <int S>
inline void sum_sq(const float* __restrict x, int64_t len, const float* __restrict a, const float* __restrict m,
                   float* __restrict s2, float* __restrict s3) {
  if constexpr (S == 1) {
    for (int64_t i = 0; i < len; ++i) sq_step(x[i], a[i], m[i], s2[i], s3[i]);
  } else {
    const float a0 = a[0], m0 = m[0];
    int64_t k = 0;
    for (; k + kL <= len; k += kL)
      for (int l = 0; l < kL; ++l) sq_step(x[k + l], a0, m0, s2[l], s3[l]);
    for (int l = 0; k + l < len; ++l) sq_step(x[k + l], a0, m0, s2[l], s3[l]);
  }
}

// NHWC chunk: rows x C values at x (float), all channels.
void chunk_nhwc(const float* x, int64_t rows, const Plan& pl, Partial* out, std::vector<float>& ea,
                std::vector<float>& em, Acc acc[3]) {
  const int64_t C = pl.C, B = pl.B, len = rows * C;
  for (int64_t c = 0; c < C; ++c) {  // anchor: the channel's first finite value in the chunk
    out[c].anchor = std::numeric_limits<float>::quiet_NaN();
    for (int64_t r = 0; r < rows; ++r)
      if (finite(x[r * C + c])) {
        out[c].anchor = x[r * C + c];
        break;
      }
  }
  for (int64_t k = 0; k < B; ++k) ea[k] = finite(out[k % C].anchor) ? out[k % C].anchor : 0.f;

  acc[0].reset(B);  // pass 1: sum(x - a) per block entry
  int64_t blocks = 0;
  for (int64_t e = 0; e < len; e += B) {
    sum_dev<1>(x + e, std::min(B, len - e), ea.data(), acc[0].f.data());
    if (++blocks % kFlush == 0) acc[0].flush();
  }
  std::vector<double> S(static_cast<size_t>(3 * C));
  acc[0].fold(C, S.data());
  for (int64_t k = 0; k < B; ++k) em[k] = static_cast<float>(S[k % C] / rows);

  acc[1].reset(B);  // pass 2: sum(d^2) and sum(d), d = (x - a) - m
  acc[2].reset(B);
  blocks = 0;
  for (int64_t e = 0; e < len; e += B) {
    sum_sq<1>(x + e, std::min(B, len - e), ea.data(), em.data(), acc[1].f.data(),
                                   acc[2].f.data());
    if (++blocks % kFlush == 0) {
      acc[1].flush();
      acc[2].flush();
    }
  }
  acc[1].fold(C, S.data() + C);
  acc[2].fold(C, S.data() + 2 * C);
  for (int64_t c = 0; c < C; ++c) out[c] = finish(out[c].anchor, double(rows), em[c], S[C + c], S[2 * C + c]);
}

// NCHW chunk: n values of one channel; runs(f) calls f(float pointer, length) for each contiguous
// piece of them, in order (it is called once per pass). Sums in kL lanes (see lane_pieces).
template <class Runs>
Partial chunk_nchw(int64_t n, Runs&& runs, Acc acc[3]) {
  float anchor = std::numeric_limits<float>::quiet_NaN();
  runs([&](const float* x, int64_t len) {
    for (int64_t i = 0; i < len && !finite(anchor); ++i)
      if (finite(x[i])) anchor = x[i];
  });
  const float a = finite(anchor) ? anchor : 0.f;

  acc[0].reset(kL);
  int64_t adds = 0;
  runs([&](const float* x, int64_t len) {
    lane_pieces(
        adds, len, [&](int64_t p0, int64_t n) { sum_dev<0>(x + p0, n, &a, acc[0].f.data()); },
        [&] { acc[0].flush(); });
  });
  double S1;
  acc[0].fold(1, &S1);
  const float m = static_cast<float>(S1 / n);

  acc[1].reset(kL);
  acc[2].reset(kL);
  adds = 0;
  runs([&](const float* x, int64_t len) {
    lane_pieces(
        adds, len,
        [&](int64_t p0, int64_t n) { sum_sq<0>(x + p0, n, &a, &m, acc[1].f.data(), acc[2].f.data()); },
        [&] {
          acc[1].flush();
          acc[2].flush();
        });
  });
  double S2, S3;
  acc[1].fold(1, &S2);
  acc[2].fold(1, &S3);
  return finish(anchor, double(n), m, S2, S3);
}

}  // namespace

void channel_stats(DType dtype, const void* x, const Act4d& shape, float* count, float* anchor, float* mean_off,
                   float* m2) {
  using namespace detail;
  const Plan pl = make_plan(shape);
  if (pl.P <= 0 || pl.C <= 0) {
    if (count) count[0] = 0.f;
    for (float* o : {anchor, mean_off, m2})
      if (o && pl.C > 0) std::fill(o, o + pl.C, 0.f);
    return;
  }
  const Chunking ch = make_chunking(pl);
  const int64_t per = pl.cl ? pl.C : 1;  // partials per chunk
  std::vector<Partial> part(static_cast<size_t>(ch.T * per));
  const int64_t chunk_elems = pl.cl ? ch.R * pl.C : ch.R;

  at::parallel_for(0, ch.T, 1, [&](int64_t t0, int64_t t1) {
    // A chunk is converted to float once (fp16/bf16) and then read twice from cache.
    std::unique_ptr<float[]> buf(dtype == DType::kFloat32 ? nullptr : new float[static_cast<size_t>(chunk_elems)]);
    std::vector<float> ea(static_cast<size_t>(pl.B)), em(static_cast<size_t>(pl.B));
    Acc acc[3];
    for (int64_t t = t0; t < t1; ++t) {
      if (pl.cl) {
        const int64_t rows = chunk_count(pl, ch, t);
        const float* xf = load_f32(dtype, x, t * ch.R * pl.C, rows * pl.C, buf.get());
        chunk_nhwc(xf, rows, pl, part.data() + t * pl.C, ea, em, acc);
      } else {
        const int64_t c = t / ch.J, j = t % ch.J;
        const int64_t q0 = j * ch.R, q1 = q0 + chunk_count(pl, ch, j);
        if (dtype == DType::kFloat32) {
          const float* xf = static_cast<const float*>(x);
          part[t] = chunk_nchw(q1 - q0, [&](auto&& f) {
            walk_channel(pl, c, q0, q1, [&](int64_t off, int64_t len) { f(xf + off, len); });
          }, acc);
        } else {
          int64_t pos = 0;  // gather the pieces into one contiguous float run
          walk_channel(pl, c, q0, q1, [&](int64_t off, int64_t len) {
            load_f32(dtype, x, off, len, buf.get() + pos);
            pos += len;
          });
          part[t] = chunk_nchw(q1 - q0, [&](auto&& f) { f(buf.get(), q1 - q0); }, acc);
        }
      }
    }
  });

  // Chan's merge per channel, chunks in order, in double; offsets relative to anchor A.
  at::parallel_for(0, pl.C, std::max<int64_t>(1, 4096 / ch.J), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto at = [&](int64_t j) -> const Partial& { return part[pl.cl ? j * pl.C + c : c * ch.J + j]; };
      double A = 0.0;
      for (int64_t j = 0; j < ch.J; ++j)
        if (finite(at(j).anchor)) {
          A = at(j).anchor;
          break;
        }
      double n = 0.0, mean = 0.0, M2 = 0.0, wsum = 0.0;
      for (int64_t j = 0; j < ch.J; ++j) {
        const Partial& p = at(j);
        const double nb = static_cast<double>(chunk_count(pl, ch, j));
        const double mb = ((finite(p.anchor) ? double(p.anchor) : 0.0) - A) + double(p.off);
        wsum += nb * mb;  // only used when Chan's update meets an infinite mean (inf - inf)
        if (j == 0) {
          n = nb;
          mean = mb;
          M2 = p.m2;
          continue;
        }
        const double nt = n + nb, d = mb - mean;
        mean += d * (nb / nt);
        M2 += double(p.m2) + d * d * (n * nb / nt);
        n = nt;
      }
      if (!std::isfinite(mean)) mean = wsum / n;  // inf stays inf; NaN or +inf and -inf give NaN
      if (anchor) anchor[c] = static_cast<float>(A);
      if (mean_off) mean_off[c] = static_cast<float>(mean);
      if (m2) m2[c] = static_cast<float>(M2);
    }
  });
  if (count) count[0] = static_cast<float>(pl.P);
}

void bn_finalize(int64_t C, const float* count, const float* anchor, const float* mean_off, const float* m2,
                 const float* weight, const float* bias, float eps, float* mean, float* var, float* scale,
                 float* shift, float* invstd) {
  if (C <= 0) return;
  const float n = count[0];
  for (int64_t c = 0; c < C; ++c) {
    // float32 throughout, as the header specifies (and as the Triton/torch paths compute it).
    const float mu = anchor[c] + mean_off[c];
    const float v = n > 0.f ? m2[c] / n : std::numeric_limits<float>::quiet_NaN();
    const float is = 1.f / std::sqrt(v + eps);
    if (mean) mean[c] = mu;
    if (var) var[c] = v;
    if (invstd) invstd[c] = is;
    if (scale) scale[c] = weight ? weight[c] * is : is;
    if (shift) shift[c] = bias ? bias[c] : 0.f;
  }
}

}  // namespace cpu
}  // namespace rf

// Per-channel batch statistics (rf::cuda::channel_stats) and the BatchNorm affine built from them
// (rf::cuda::bn_finalize).
//
// channel_stats is common.cuh's two-level ReduceTiling. Each block anchors a channel on its first
// value (0 if that is not finite) and accumulates x - anchor: Welford per thread (one count for
// all of a thread's channels in NHWC; 8-value pieces merged by Chan in NCHW), then Chan's merge
// over threads in a fixed tree. Its partial row is (anchor, mean offset, M2); the count of a row
// follows from the shape. The second kernel re-anchors every row on row 0's anchor (a value of
// the channel, so the offsets stay small when |mean| >> std) and merges the rows by Chan in a
// fixed order. Nothing is filtered: NaN/Inf in x make NaN/Inf statistics.
// Limit: the anchor is the channel's first value, or 0 when that one is NaN/Inf (the statistics
// are then non-finite anyway).
#include "common.cuh"

namespace rf {
namespace cuda {
namespace {

using namespace detail;

struct StatsKArgs {
  const void* x;
  DType dt;
  ReduceTiling t;
  bool vec;   // as in bn_backward.cu's ReduceKArgs
  float* ws;  // [3][gp][C]: anchor, mean offset, M2
};

__device__ __forceinline__ float finite_or_zero(float v) { return isfinite(v) ? v : 0.f; }

// ------------------------------------------------------------------------------------- NHWC
template <int S, bool V>
__device__ __forceinline__ void load_row(const StatsKArgs& a, int64_t base, int64_t cfirst,
                                         int64_t cstep, float (&v)[kCpt]) {
  if (V) {
    loadv<S, kCpt>(a.x, base, true, kCpt, a.dt, v);
  } else {
#pragma unroll
    for (int j = 0; j < kCpt; ++j)
      v[j] = cfirst + j * cstep < a.t.C ? load1<S>(a.x, base + j * cstep, a.dt) : 0.f;
  }
}

// Rows ty, ty + tp, ... of [r0, r1) in order, U at a time; Welford with the thread's one count.
template <int S, bool V, int U>
__device__ __forceinline__ void walk_rows(const StatsKArgs& a, int64_t r0, int64_t r1, int ty,
                                          int64_t cfirst, int64_t cstep, const float (&anc)[kCpt],
                                          float& n, float (&mean)[kCpt], float (&m2)[kCpt]) {
  const int64_t tp = a.t.tp;
  for (int64_t row = r0 + ty; row < r1; row += U * tp) {
    float v[U][kCpt] = {};
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (row + u * tp < r1) load_row<S, V>(a, (row + u * tp) * a.t.C + cfirst, cfirst, cstep, v[u]);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (row + u * tp < r1) {
        n += 1.f;
        const float inv = __frcp_rn(n);
#pragma unroll
        for (int j = 0; j < kCpt; ++j) {
          const float d = v[u][j] - anc[j];
          const float delta = d - mean[j];
          mean[j] = __fmaf_rn(delta, inv, mean[j]);
          m2[j] = __fmaf_rn(delta, d - mean[j], m2[j]);
        }
      }
    }
  }
}

// Block (bx, by) = rows [by * rp, ...) x channels [bx * tc * kCpt, ...), threads as in
// bn_backward.cu's reduce_nhwc_kernel.
template <int S>
__global__ void __launch_bounds__(kThreads, 4) stats_nhwc_kernel(StatsKArgs a) {
  __shared__ float sh_mean[kCpt][kThreads], sh_m2[kCpt][kThreads], sh_n[kThreads];
  const ReduceTiling& t = a.t;
  const int tid = threadIdx.x, tx = tid & (t.tc - 1), ty = tid / t.tc;
  const int64_t cfirst = int64_t(blockIdx.x) * t.tc * kCpt + (a.vec ? tx * kCpt : tx);
  const int64_t cstep = a.vec ? 1 : t.tc;
  const int64_t r0 = int64_t(blockIdx.y) * t.rp, r1 = min(t.P, r0 + t.rp);
  float anc[kCpt] = {}, mean[kCpt] = {}, m2[kCpt] = {}, n = 0.f;
  if (cfirst < t.C) {
    if (a.vec)  // cfirst % kCpt == 0 and C % kCpt == 0: all kCpt channels exist
      load_row<S, true>(a, r0 * t.C + cfirst, cfirst, cstep, anc);
    else
      load_row<S, false>(a, r0 * t.C + cfirst, cfirst, cstep, anc);
#pragma unroll
    for (int j = 0; j < kCpt; ++j) anc[j] = finite_or_zero(anc[j]);
    if (a.vec)
      walk_rows<S, true, 4>(a, r0, r1, ty, cfirst, cstep, anc, n, mean, m2);
    else
      walk_rows<S, false, 1>(a, r0, r1, ty, cfirst, cstep, anc, n, mean, m2);
  }
#pragma unroll
  for (int j = 0; j < kCpt; ++j) {
    sh_mean[j][tid] = mean[j];
    sh_m2[j][tid] = m2[j];
  }
  sh_n[tid] = n;
  __syncthreads();
  for (int s = t.tp / 2; s > 0; s >>= 1) {
    if (ty < s) {
      const int p = tid + s * t.tc;
      const float nb = sh_n[p];
#pragma unroll
      for (int j = 0; j < kCpt; ++j) {
        chan_merge(n, mean[j], m2[j], nb, sh_mean[j][p], sh_m2[j][p]);
        sh_mean[j][tid] = mean[j];
        sh_m2[j][tid] = m2[j];
      }
      n += nb;
      sh_n[tid] = n;
    }
    __syncthreads();
  }
  if (ty == 0) {
    const int64_t slice = t.gp * t.C;
#pragma unroll
    for (int j = 0; j < kCpt; ++j) {
      const int64_t c = cfirst + j * cstep;
      if (c < t.C) {
        const int64_t off = int64_t(blockIdx.y) * t.C + c;
        a.ws[off] = anc[j];
        a.ws[slice + off] = mean[j];
        a.ws[2 * slice + off] = m2[j];
      }
    }
  }
}

// ------------------------------------------------------------------------------------- NCHW
// Channel c's values [q0, q1) as in bn_backward.cu's walk_channel, U steps' loads in flight at a
// time; each step's (up to) 8 values form one piece (mean, then M2 from deviations) merged into
// the thread's state by Chan, in order.
template <int S, bool V, int U>
__device__ __forceinline__ void walk_channel(const StatsKArgs& a, int64_t c, int64_t q0, int64_t q1,
                                             float anc, float& n, float& mean, float& m2) {
  const ReduceTiling& t = a.t;
  const int64_t plane = t.C * t.HW, coff = c * t.HW;
  int64_t q = q0 + (V ? threadIdx.x * kChunk : threadIdx.x);
  int64_t pn = q / t.HW, hw = q - pn * t.HW;
  for (; q < q1; q += U * kThreads * kChunk) {
    float d[U][kChunk];
    bool ok[U][kChunk];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t qu = q + u * kThreads * kChunk;
      if (V) {  // qu and q1 are multiples of 8: a chunk is whole or absent
        const bool in = qu < q1;
        if (in) {
          load8<S>(a.x, pn * plane + coff + hw, true, kChunk, a.dt, d[u]);
        } else {
#pragma unroll
          for (int j = 0; j < kChunk; ++j) d[u][j] = 0.f;
        }
#pragma unroll
        for (int j = 0; j < kChunk; ++j) ok[u][j] = in;
        advance(pn, hw, t.d2048, t.m2048, t.HW);
      } else {
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          ok[u][j] = qu + j * kThreads < q1;
          d[u][j] = ok[u][j] ? load1<S>(a.x, pn * plane + coff + hw, a.dt) : 0.f;
          advance(pn, hw, t.d256, t.m256, t.HW);  // 8 x 256 = one step
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float cnt = 0.f, sum = 0.f;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        d[u][j] = ok[u][j] ? d[u][j] - anc : 0.f;
        cnt += ok[u][j] ? 1.f : 0.f;
        sum += d[u][j];
      }
      if (cnt > 0.f) {
        const float mb = __fdiv_rn(sum, cnt);
        float m2b = 0.f;
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          const float e = d[u][j] - mb;
          if (ok[u][j]) m2b = __fmaf_rn(e, e, m2b);
        }
        chan_merge(n, mean, m2, cnt, mb, m2b);
        n += cnt;
      }
    }
  }
}

template <int S>
__global__ void __launch_bounds__(kThreads) stats_nchw_kernel(StatsKArgs a) {
  __shared__ float sh_n[kThreads], sh_mean[kThreads], sh_m2[kThreads];
  const ReduceTiling& t = a.t;
  const int tid = threadIdx.x;
  const int64_t c = blockIdx.x;
  const int64_t q0 = int64_t(blockIdx.y) * t.rp, q1 = min(t.P, q0 + t.rp);
  const int64_t n0 = q0 / t.HW;
  const float anc = finite_or_zero(load1<S>(a.x, (n0 * t.C + c) * t.HW + (q0 - n0 * t.HW), a.dt));
  float n = 0.f, mean = 0.f, m2 = 0.f;
  if (a.vec)
    walk_channel<S, true, 2>(a, c, q0, q1, anc, n, mean, m2);
  else
    walk_channel<S, false, 1>(a, c, q0, q1, anc, n, mean, m2);
  sh_n[tid] = n;
  sh_mean[tid] = mean;
  sh_m2[tid] = m2;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      const float nb = sh_n[tid + s];
      chan_merge(n, mean, m2, nb, sh_mean[tid + s], sh_m2[tid + s]);
      n += nb;
      sh_n[tid] = n;
      sh_mean[tid] = mean;
      sh_m2[tid] = m2;
    }
    __syncthreads();
  }
  if (tid == 0) {
    const int64_t slice = t.gp * t.C, off = int64_t(blockIdx.y) * t.C + c;
    a.ws[off] = anc;
    a.ws[slice + off] = mean;
    a.ws[2 * slice + off] = m2;
  }
}

// ------------------------------------------------------------------------------ level 2, misc
// Channel c's gp rows: row groups ry take rows ry, ry + rg, ... in order, then a fixed tree.
__global__ void __launch_bounds__(1024)
    stats_merge_kernel(const float* ws, int64_t gp, int64_t C, int64_t P, int64_t rp, int rg, int cw,
                       float* count, float* anchor, float* mean_off, float* m2) {
  __shared__ float sh_n[1024], sh_mean[1024], sh_m2[1024];
  const int tid = threadIdx.x, cx = tid % cw, ry = tid / cw;
  const int64_t c = int64_t(blockIdx.x) * cw + cx, slice = gp * C;
  float n = 0.f, mean = 0.f, q = 0.f, k = 0.f;
  if (c < C) {
    k = ws[c];  // row 0's anchor: finite, a value of the channel (or 0)
#pragma unroll 4
    for (int64_t row = ry; row < gp; row += rg) {
      const int64_t off = row * C + c;
      const float nb = float(min(rp, P - row * rp));  // every row holds >= 1 value
      chan_merge(n, mean, q, nb, (ws[off] - k) + ws[slice + off], ws[2 * slice + off]);
      n += nb;
    }
  }
  sh_n[tid] = n;
  sh_mean[tid] = mean;
  sh_m2[tid] = q;
  __syncthreads();
  for (int s = rg / 2; s > 0; s >>= 1) {
    if (ry < s) {
      const int p = tid + s * cw;
      const float nb = sh_n[p];
      chan_merge(n, mean, q, nb, sh_mean[p], sh_m2[p]);
      n += nb;
      sh_n[tid] = n;
      sh_mean[tid] = mean;
      sh_m2[tid] = q;
    }
    __syncthreads();
  }
  if (ry == 0 && c < C) {
    anchor[c] = k;
    mean_off[c] = mean;
    m2[c] = q;
  }
  if (blockIdx.x == 0 && tid == 0) count[0] = float(P);
}

// No values (or no channels): count = N * HW, zero statistics; x is not read.
__global__ void stats_empty_kernel(float* count, float* anchor, float* mean_off, float* m2, int64_t C,
                                   int64_t P) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i == 0) count[0] = float(P);
  if (i < C) {
    anchor[i] = 0.f;
    mean_off[i] = 0.f;
    m2[i] = 0.f;
  }
}

__global__ void finalize_kernel(int64_t C, const float* count, const float* anchor, const float* mean_off,
                                const float* m2, const float* weight, const float* bias, float eps,
                                float* mean, float* var, float* scale, float* shift, float* invstd) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  // Correctly rounded steps, spelled as intrinsics because the library builds with
  // --use_fast_math (which would turn 1 / sqrtf into rsqrt.approx and / into div.approx).
  const float v = __fdiv_rn(m2[c], count[0]);  // count 0: 0 / 0 = NaN, as torch.var of nothing
  const float is = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(v, eps)));
  mean[c] = __fadd_rn(anchor[c], mean_off[c]);
  var[c] = v;
  invstd[c] = is;
  scale[c] = weight ? __fmul_rn(weight[c], is) : is;
  shift[c] = bias ? bias[c] : 0.f;
}

}  // namespace

int channel_stats(DType dtype, const void* x, const Act4d& shape, float* count, float* anchor,
                  float* mean_off, float* m2, void* workspace, cudaStream_t stream) {
  if (!count || (shape.C > 0 && (!anchor || !mean_off || !m2)) || !fits_grid(shape.C))
    return static_cast<int>(cudaErrorInvalidValue);
  const ReduceTiling t = make_tiling(shape);
  if (t.gp == 0) {
    const int64_t C = t.C > 0 ? t.C : 0;
    return launch(stats_empty_kernel, grid_exact(C, kThreads), kThreads, stream, count, anchor, mean_off, m2,
                  C, t.P > 0 ? t.P : int64_t(0));
  }
  if (!valid(dtype) || !x || !workspace) return static_cast<int>(cudaErrorInvalidValue);
  StatsKArgs k;
  k.x = x;
  k.dt = dtype;
  k.t = t;
  k.vec = aligned16(x) && (t.cl ? t.C % kCpt == 0 : t.HW % kChunk == 0);
  k.ws = static_cast<float*>(workspace);
  const dim3 grid(unsigned(t.cl ? t.gc : t.C), unsigned(t.gp));
  const int err = dispatch_size(dtype, [&](auto s) {
    return t.cl ? launch(stats_nhwc_kernel<s()>, grid, kThreads, stream, k)
                : launch(stats_nchw_kernel<s()>, grid, kThreads, stream, k);
  });
  if (err) return err;
  const MergeShape m = merge_shape(t);
  return launch(stats_merge_kernel, grid_exact(t.C, m.cw), 1024, stream, static_cast<const float*>(k.ws),
                t.gp, t.C, t.P, t.rp, m.rg, m.cw, count, anchor, mean_off, m2);
}

int bn_finalize(int64_t C, const float* count, const float* anchor, const float* mean_off, const float* m2,
                const float* weight, const float* bias, float eps, float* mean, float* var, float* scale,
                float* shift, float* invstd, cudaStream_t stream) {
  if (C <= 0) return 0;
  if (!fits_grid((C + kThreads - 1) / kThreads) || !count || !anchor || !mean_off || !m2 || !mean || !var ||
      !scale || !shift || !invstd)
    return static_cast<int>(cudaErrorInvalidValue);
  return launch(finalize_kernel, grid_exact(C, kThreads), kThreads, stream, C, count, anchor, mean_off, m2,
                weight, bias, eps, mean, var, scale, shift, invstd);
}

}  // namespace cuda
}  // namespace rf

// Two-pass backward of relu(bn(y) + R): rf::cuda::bn_act_backward_reduce (per-channel sums of the
// ReLU-gated gradient, deterministic) and rf::cuda::bn_act_backward_apply (elementwise dy, dr),
// plus rf::cuda::reduce_workspace_bytes.
//
// Both passes recompute z with common.cuh's centred/pre_act, the very float operations the forward
// uses, so the gate matches the forward's mask bit for bit. The reduce is common.cuh's two-level
// ReduceTiling: blocks write fp32 partial sums to the workspace, a second kernel folds them per
// channel in a fixed order (no atomics), so results depend on the shape only. Sums are plain fp32
// (no compensation): a thread adds up to a few thousand values in sequence, then fixed trees.
// Limits: dy, dr are written as whole chunks per thread and may alias g, y or r (each thread
// reads its chunk before writing it) but must not partially overlap them.
#include "common.cuh"

namespace rf {
namespace cuda {
namespace {

using namespace detail;

// ============================================================================ pass 1: reduce
struct ReduceKArgs {
  const void* g;
  const void* y;
  const void* r;
  DType g_dt, y_dt, r_dt;
  Affine ya, ra;
  ReduceTiling t;
  bool vec;  // vector accesses: pointers 16-byte aligned, C % kCpt == 0 (NHWC) or HW % 8 == 0 (NCHW)
  float* ws;  // [3][gp][C]
};

template <int R>
__device__ __forceinline__ void accumulate(float g, float y, float r, float ym, float ys, float yb,
                                           float rm, float rs, float rb, float& sg, float& sgy,
                                           float& sgr) {
  const float dy = centred(y, ym);
  const float dr = centred(r, rm);
  const float gz = relu_passes(pre_act(dy, ys, yb, R, r, dr, rs, rb)) ? g : 0.f;
  sg += gz;
  sgy = __fmaf_rn(gz, dy, sgy);
  if (R == kResAffine) sgr = __fmaf_rn(gz, dr, sgr);
}

// NHWC: one row's kCpt channels of g, y, r for this thread. vec: contiguous channels, one
// vector per tensor; else channels strided by cstep, absent ones (>= C) read as 0.
template <int Sg, int Sy, int Sr, int R, bool V>
__device__ __forceinline__ void load_row(const ReduceKArgs& a, int64_t base, int64_t cfirst,
                                         int64_t cstep, float (&gv)[kCpt], float (&yv)[kCpt],
                                         float (&rv)[kCpt]) {
  if (V) {
    loadv<Sg, kCpt>(a.g, base, true, kCpt, a.g_dt, gv);
    loadv<Sy, kCpt>(a.y, base, true, kCpt, a.y_dt, yv);
    if (R != kResNone) loadv<Sr, kCpt>(a.r, base, true, kCpt, a.r_dt, rv);
  } else {
#pragma unroll
    for (int j = 0; j < kCpt; ++j) {
      const bool ok = cfirst + j * cstep < a.t.C;
      gv[j] = ok ? load1<Sg>(a.g, base + j * cstep, a.g_dt) : 0.f;
      yv[j] = ok ? load1<Sy>(a.y, base + j * cstep, a.y_dt) : 0.f;
      if (R != kResNone) rv[j] = ok ? load1<Sr>(a.r, base + j * cstep, a.r_dt) : 0.f;
    }
  }
}

// Rows ty, ty + tp, ... of [r0, r1), in order, U at a time (all U rows' loads in flight).
template <int Sg, int Sy, int Sr, int R, bool V, int U>
__device__ __forceinline__ void walk_rows(const ReduceKArgs& a, int64_t r0, int64_t r1, int ty,
                                          int64_t cfirst, int64_t cstep, const float (&ym)[kCpt],
                                          const float (&ys)[kCpt], const float (&yb)[kCpt],
                                          const float (&rm)[kCpt], const float (&rs)[kCpt],
                                          const float (&rb)[kCpt], float (&sg)[kCpt],
                                          float (&sgy)[kCpt], float (&sgr)[kCpt]) {
  const int64_t tp = a.t.tp;
  for (int64_t row = r0 + ty; row < r1; row += U * tp) {
    float gv[U][kCpt] = {}, yv[U][kCpt] = {}, rv[U][kCpt] = {};
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (row + u * tp < r1)
        load_row<Sg, Sy, Sr, R, V>(a, (row + u * tp) * a.t.C + cfirst, cfirst, cstep, gv[u], yv[u], rv[u]);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (row + u * tp < r1) {
#pragma unroll
        for (int j = 0; j < kCpt; ++j)
          accumulate<R>(gv[u][j], yv[u][j], rv[u][j], ym[j], ys[j], yb[j], rm[j], rs[j], rb[j], sg[j],
                        sgy[j], sgr[j]);
      }
    }
  }
}

// NHWC: block (bx, by) = rows [by * rp, ...) x channels [bx * tc * kCpt, ...). A thread owns
// kCpt channels: contiguous (one vector) when vec, else strided by tc so that a warp's scalar
// loads stay coalesced. It walks rows ty, ty + tp, ... two at a time (both loads in flight), in
// order; then a fixed tree over ty. Absent channels accumulate exact zeros and are not written.
template <int Sg, int Sy, int Sr, int R>
__global__ void __launch_bounds__(kThreads) reduce_nhwc_kernel(ReduceKArgs a) {
  __shared__ float sh[3][kCpt][kThreads];
  const ReduceTiling& t = a.t;
  const int tid = threadIdx.x, tx = tid & (t.tc - 1), ty = tid / t.tc;
  const int64_t cfirst = int64_t(blockIdx.x) * t.tc * kCpt + (a.vec ? tx * kCpt : tx);
  const int64_t cstep = a.vec ? 1 : t.tc;
  float ym[kCpt], ys[kCpt], yb[kCpt], rm[kCpt], rs[kCpt], rb[kCpt];
#pragma unroll
  for (int j = 0; j < kCpt; ++j) {
    const int64_t c = cfirst + j * cstep;
    const bool ok = c < t.C;
    ym[j] = ok ? ldp(a.ya.m, c) : 0.f;
    ys[j] = ok ? ldp(a.ya.s, c) : 0.f;
    yb[j] = ok ? ldp(a.ya.b, c) : 0.f;
    rm[j] = ok && R == kResAffine ? ldp(a.ra.m, c) : 0.f;
    rs[j] = ok && R == kResAffine ? ldp(a.ra.s, c) : 0.f;
    rb[j] = ok && R == kResAffine ? ldp(a.ra.b, c) : 0.f;
  }
  float sg[kCpt] = {}, sgy[kCpt] = {}, sgr[kCpt] = {};
  const int64_t r0 = int64_t(blockIdx.y) * t.rp, r1 = min(t.P, r0 + t.rp);
  if (cfirst < t.C) {
    if (a.vec)  // cfirst % kCpt == 0 and C % kCpt == 0: all kCpt channels exist
      walk_rows<Sg, Sy, Sr, R, true, 2>(a, r0, r1, ty, cfirst, cstep, ym, ys, yb, rm, rs, rb, sg, sgy, sgr);
    else
      walk_rows<Sg, Sy, Sr, R, false, 1>(a, r0, r1, ty, cfirst, cstep, ym, ys, yb, rm, rs, rb, sg, sgy, sgr);
  }
#pragma unroll
  for (int j = 0; j < kCpt; ++j) {
    sh[0][j][tid] = sg[j];
    sh[1][j][tid] = sgy[j];
    sh[2][j][tid] = sgr[j];
  }
  __syncthreads();
  for (int s = t.tp / 2; s > 0; s >>= 1) {
    if (ty < s) {
#pragma unroll
      for (int j = 0; j < kCpt; ++j)
#pragma unroll
        for (int k = 0; k < 3; ++k) sh[k][j][tid] += sh[k][j][tid + s * t.tc];
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
        a.ws[off] = sh[0][j][tid];
        a.ws[slice + off] = sh[1][j][tid];
        if (R == kResAffine) a.ws[2 * slice + off] = sh[2][j][tid];
      }
    }
  }
}

// NCHW: block (c, by) = values [by * rp, ...) of channel c, seen as one sequence over its N
// planes (value q at plane q / HW, offset q % HW). A step covers 2048 values: V, 8 contiguous
// per thread (a chunk never crosses a plane since HW % 8 == 0); else 8 strided by 256 (coalesced).
template <int Sg, int Sy, int Sr, int R, bool V>
__device__ __forceinline__ void walk_channel(const ReduceKArgs& a, int64_t c, int64_t q0, int64_t q1,
                                             float ym, float ys, float yb, float rm, float rs,
                                             float rb, float& sg, float& sgy, float& sgr) {
  const ReduceTiling& t = a.t;
  const int64_t plane = t.C * t.HW, coff = c * t.HW;
  int64_t q = q0 + (V ? threadIdx.x * kChunk : threadIdx.x);
  int64_t n = q / t.HW, hw = q - n * t.HW;
  for (; q < q1; q += kThreads * kChunk) {
    float gv[kChunk], yv[kChunk], rv[kChunk] = {};
    bool ok[kChunk];
    if (V) {  // q and q1 are multiples of 8: the chunk is whole
      const int64_t base = n * plane + coff + hw;
      load8<Sg>(a.g, base, true, kChunk, a.g_dt, gv);
      load8<Sy>(a.y, base, true, kChunk, a.y_dt, yv);
      if (R != kResNone) load8<Sr>(a.r, base, true, kChunk, a.r_dt, rv);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) ok[j] = true;
      advance(n, hw, t.d2048, t.m2048, t.HW);
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        ok[j] = q + j * kThreads < q1;
        const int64_t e = n * plane + coff + hw;
        gv[j] = ok[j] ? load1<Sg>(a.g, e, a.g_dt) : 0.f;
        yv[j] = ok[j] ? load1<Sy>(a.y, e, a.y_dt) : 0.f;
        if (R != kResNone) rv[j] = ok[j] ? load1<Sr>(a.r, e, a.r_dt) : 0.f;
        advance(n, hw, t.d256, t.m256, t.HW);  // 8 x 256 = one step
      }
    }
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      if (ok[j]) accumulate<R>(gv[j], yv[j], rv[j], ym, ys, yb, rm, rs, rb, sg, sgy, sgr);
  }
}

template <int Sg, int Sy, int Sr, int R>
__global__ void __launch_bounds__(kThreads, 3) reduce_nchw_kernel(ReduceKArgs a) {
  __shared__ float sh[3][kThreads];
  const ReduceTiling& t = a.t;
  const int tid = threadIdx.x;
  const int64_t c = blockIdx.x;
  const float ym = ldp(a.ya.m, c), ys = ldp(a.ya.s, c), yb = ldp(a.ya.b, c);
  const float rm = R == kResAffine ? ldp(a.ra.m, c) : 0.f;
  const float rs = R == kResAffine ? ldp(a.ra.s, c) : 0.f;
  const float rb = R == kResAffine ? ldp(a.ra.b, c) : 0.f;
  const int64_t q0 = int64_t(blockIdx.y) * t.rp, q1 = min(t.P, q0 + t.rp);
  float sg = 0.f, sgy = 0.f, sgr = 0.f;
  if (a.vec)
    walk_channel<Sg, Sy, Sr, R, true>(a, c, q0, q1, ym, ys, yb, rm, rs, rb, sg, sgy, sgr);
  else
    walk_channel<Sg, Sy, Sr, R, false>(a, c, q0, q1, ym, ys, yb, rm, rs, rb, sg, sgy, sgr);
  sh[0][tid] = sg;
  sh[1][tid] = sgy;
  sh[2][tid] = sgr;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
#pragma unroll
      for (int k = 0; k < 3; ++k) sh[k][tid] += sh[k][tid + s];
    }
    __syncthreads();
  }
  if (tid == 0) {
    const int64_t slice = t.gp * t.C, off = int64_t(blockIdx.y) * t.C + c;
    a.ws[off] = sh[0][0];
    a.ws[slice + off] = sh[1][0];
    if (R == kResAffine) a.ws[2 * slice + off] = sh[2][0];
  }
}

// Level 2: channel c's gp partial rows, row groups ry = 0..rg-1 each taking rows ry, ry + rg, ...
// in order, then a fixed tree over ry.
__global__ void __launch_bounds__(1024)
    reduce_merge_kernel(const float* ws, int64_t gp, int64_t C, int rg, int cw, bool has_r,
                        float* sum_g, float* sum_gy, float* sum_gr) {
  __shared__ float sh[3][1024];
  const int tid = threadIdx.x, cx = tid % cw, ry = tid / cw;
  const int64_t c = int64_t(blockIdx.x) * cw + cx, slice = gp * C;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f;
  if (c < C) {
#pragma unroll 4
    for (int64_t row = ry; row < gp; row += rg) {
      const int64_t off = row * C + c;
      s0 += ws[off];
      s1 += ws[slice + off];
      if (has_r) s2 += ws[2 * slice + off];
    }
  }
  sh[0][tid] = s0;
  sh[1][tid] = s1;
  sh[2][tid] = s2;
  __syncthreads();
  for (int s = rg / 2; s > 0; s >>= 1) {
    if (ry < s) {
#pragma unroll
      for (int k = 0; k < 3; ++k) sh[k][tid] += sh[k][tid + s * cw];
    }
    __syncthreads();
  }
  if (ry == 0 && c < C) {
    sum_g[c] = sh[0][tid];
    sum_gy[c] = sh[1][tid];
    if (sum_gr) sum_gr[c] = has_r ? sh[2][tid] : 0.f;
  }
}

__global__ void zero3_kernel(float* a, float* b, float* c, int64_t C) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < C) {
    a[i] = 0.f;
    b[i] = 0.f;
    if (c) c[i] = 0.f;
  }
}

template <int Sg, int Sy, int Sr, int R>
int launch_reduce(const ReduceKArgs& k, cudaStream_t stream) {
  const dim3 grid(unsigned(k.t.cl ? k.t.gc : k.t.C), unsigned(k.t.gp));
  if (k.t.cl) return launch(reduce_nhwc_kernel<Sg, Sy, Sr, R>, grid, kThreads, stream, k);
  return launch(reduce_nchw_kernel<Sg, Sy, Sr, R>, grid, kThreads, stream, k);
}

// ============================================================================= pass 2: apply
struct ApplyKArgs {
  const void* g;
  const void* y;
  const void* r;
  void* dy;
  void* dr;
  DType g_dt, y_dt, r_dt, dy_dt, dr_dt;
  Affine ya, ra;
  const float *k2, *k3, *rk2, *rk3;
  Geometry geo;
  bool vec, pvec;
};

// Chunks of 8 as in bn_act.cu's forward (same modes, same z).
template <int Sg, int Sy, int Sr, Mode M, int R>
__global__ void __launch_bounds__(kThreads) apply_kernel(ApplyKArgs a) {
  constexpr bool raff = R == kResAffine;
  const int64_t chunks = (a.geo.numel + kChunk - 1) / kChunk;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < chunks; k += stride) {
    const int64_t i = k * kChunk;
    const int n = int(min(int64_t(kChunk), a.geo.numel - i));
    float gv[kChunk], yv[kChunk], rv[kChunk] = {};
    load8<Sg>(a.g, i, a.vec, n, a.g_dt, gv);
    load8<Sy>(a.y, i, a.vec, n, a.y_dt, yv);
    if (R != kResNone) load8<Sr>(a.r, i, a.vec, n, a.r_dt, rv);
    ChunkChans ch;
    chunk_chans<M>(i, a.geo, ch);
    ChunkAffines pa;
    chunk_affines<M>(a.ya, a.ra, raff, ch, a.pvec, pa);
    float gz[kChunk], dyc[kChunk], drc[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      dyc[j] = centred(yv[j], pa.ym[j]);
      drc[j] = centred(rv[j], pa.rm[j]);
      gz[j] = relu_passes(pre_act(dyc[j], pa.ys[j], pa.yb[j], R, rv[j], drc[j], pa.rs[j], pa.rb[j])) ? gv[j]
                                                                                             : 0.f;
    }
    float k2[kChunk], k3[kChunk], o[kChunk];
    chunk_param<M>(a.k2, ch, a.pvec, k2);
    chunk_param<M>(a.k3, ch, a.pvec, k3);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) o[j] = __fmaf_rn(pa.ys[j], gz[j], __fmaf_rn(k2[j], dyc[j], k3[j]));
    if (a.dy) store8_dt(a.dy_dt, a.dy, i, a.vec, n, o);
    if (R != kResNone && a.dr) {
      if (raff) {
        chunk_param<M>(a.rk2, ch, a.pvec, k2);
        chunk_param<M>(a.rk3, ch, a.pvec, k3);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) o[j] = __fmaf_rn(pa.rs[j], gz[j], __fmaf_rn(k2[j], drc[j], k3[j]));
      } else {
#pragma unroll
        for (int j = 0; j < kChunk; ++j) o[j] = gz[j];
      }
      store8_dt(a.dr_dt, a.dr, i, a.vec, n, o);
    }
  }
}

template <int Sg, int Sy, int Sr, int R>
int launch_apply(Mode mode, const ApplyKArgs& k, cudaStream_t stream) {
  const unsigned grid = grid_for((k.geo.numel + kChunk - 1) / kChunk, kThreads);
  switch (mode) {
    case Mode::kRun: return launch(apply_kernel<Sg, Sy, Sr, Mode::kRun, R>, grid, kThreads, stream, k);
    case Mode::kPlane: return launch(apply_kernel<Sg, Sy, Sr, Mode::kPlane, R>, grid, kThreads, stream, k);
    default: return launch(apply_kernel<Sg, Sy, Sr, Mode::kGeneral, R>, grid, kThreads, stream, k);
  }
}

int res_mode(const BnBwdArgs& a) { return !a.r ? kResNone : (a.r_bn.scale ? kResAffine : kResIdentity); }

// Instantiates F<Sg, Sy, Sr, R> for the element sizes of g, y, r and the residual mode.
template <template <int, int, int, int> class F, class... Args>
int dispatch_bwd(const BnBwdArgs& a, Args&&... args) {
  const int rmode = res_mode(a);
  return dispatch_size(a.g_dtype, [&](auto sg) {
    return dispatch_size(a.y_dtype, [&](auto sy) {
      if (rmode == kResNone) return F<sg(), sy(), sy(), kResNone>::run(args...);  // Sr unused
      return dispatch_size(a.r_dtype, [&](auto sr) {
        return rmode == kResAffine ? F<sg(), sy(), sr(), kResAffine>::run(args...)
                                   : F<sg(), sy(), sr(), kResIdentity>::run(args...);
      });
    });
  });
}

template <int Sg, int Sy, int Sr, int R>
struct ReduceLauncher {
  static int run(const ReduceKArgs& k, cudaStream_t s) { return launch_reduce<Sg, Sy, Sr, R>(k, s); }
};
template <int Sg, int Sy, int Sr, int R>
struct ApplyLauncher {
  static int run(Mode m, const ApplyKArgs& k, cudaStream_t s) { return launch_apply<Sg, Sy, Sr, R>(m, k, s); }
};

bool args_ok(const BnBwdArgs& a) {
  return valid(a.g_dtype) && valid(a.y_dtype) && (!a.r || valid(a.r_dtype)) && a.g && a.y &&
         a.y_bn.scale && a.y_bn.shift;
}

}  // namespace

size_t reduce_workspace_bytes(const Act4d& shape) {
  return workspace_floats(make_tiling(shape)) * sizeof(float);
}

int bn_act_backward_reduce(const BnBwdArgs& a, float* sum_g, float* sum_gy, float* sum_gr,
                           void* workspace, cudaStream_t stream) {
  const ReduceTiling t = make_tiling(a.shape);
  if (t.C <= 0) return 0;
  if (!sum_g || !sum_gy || !fits_grid(t.C)) return static_cast<int>(cudaErrorInvalidValue);
  if (t.gp == 0)  // no values: every sum is 0
    return launch(zero3_kernel, grid_exact(t.C, kThreads), kThreads, stream, sum_g, sum_gy, sum_gr, t.C);
  if (!args_ok(a) || !workspace) return static_cast<int>(cudaErrorInvalidValue);
  ReduceKArgs k;
  k.g = a.g;
  k.y = a.y;
  k.r = a.r;
  k.g_dt = a.g_dtype;
  k.y_dt = a.y_dtype;
  k.r_dt = a.r ? a.r_dtype : a.y_dtype;
  k.ya = Affine{a.y_bn.mean, a.y_bn.scale, a.y_bn.shift};
  k.ra = Affine{a.r_bn.mean, a.r_bn.scale, a.r_bn.shift};
  k.t = t;
  k.vec = aligned16(a.g) && aligned16(a.y) && (!a.r || aligned16(a.r)) &&
          (t.cl ? t.C % kCpt == 0 : t.HW % kChunk == 0);
  k.ws = static_cast<float*>(workspace);
  int err = dispatch_bwd<ReduceLauncher>(a, k, stream);
  if (err) return err;
  const MergeShape m = merge_shape(t);
  return launch(reduce_merge_kernel, grid_exact(t.C, m.cw), 1024, stream, static_cast<const float*>(k.ws),
                t.gp, t.C, m.rg, m.cw, res_mode(a) == kResAffine, sum_g, sum_gy, sum_gr);
}

int bn_act_backward_apply(const BnBwdArgs& a, const float* k2, const float* k3, const float* r_k2,
                          const float* r_k3, DType dy_dtype, void* dy, DType dr_dtype, void* dr,
                          cudaStream_t stream) {
  if (a.shape.numel() <= 0) return 0;
  const int rmode = res_mode(a);
  if (!args_ok(a) || !k2 || !k3 || (dy && !valid(dy_dtype)) || (a.r && dr && !valid(dr_dtype)) ||
      (rmode == kResAffine && dr && (!r_k2 || !r_k3)))
    return static_cast<int>(cudaErrorInvalidValue);
  ApplyKArgs k;
  k.g = a.g;
  k.y = a.y;
  k.r = a.r;
  k.dy = dy;
  k.dr = a.r ? dr : nullptr;
  k.g_dt = a.g_dtype;
  k.y_dt = a.y_dtype;
  k.r_dt = a.r ? a.r_dtype : a.y_dtype;
  k.dy_dt = dy_dtype;
  k.dr_dt = dr_dtype;
  k.ya = Affine{a.y_bn.mean, a.y_bn.scale, a.y_bn.shift};
  k.ra = Affine{a.r_bn.mean, a.r_bn.scale, a.r_bn.shift};
  k.k2 = k2;
  k.k3 = k3;
  k.rk2 = r_k2;
  k.rk3 = r_k3;
  k.geo = geometry(a.shape);
  k.vec = aligned16(a.g) && aligned16(a.y) && (!a.r || aligned16(a.r)) && (!dy || aligned16(dy)) &&
          (!k.dr || aligned16(k.dr));
  k.pvec = params_aligned(k.ya) && aligned16(k2) && aligned16(k3) &&
           (rmode != kResAffine || (params_aligned(k.ra) && (!r_k2 || aligned16(r_k2)) &&
                                    (!r_k3 || aligned16(r_k3))));
  return dispatch_bwd<ApplyLauncher>(a, chunk_mode(a.shape), k, stream);
}

}  // namespace cuda
}  // namespace rf

// Elementwise forward of BN-apply + residual + ReLU (rf::cuda::bn_act_forward, with the packed
// ReLU mask) and the mask-driven ReLU backward (rf::cuda::relu_mask_backward).
//
// Each thread takes chunks of 8 consecutive elements (grid-stride): one mask byte per chunk, so no
// two threads ever write the same byte, and a 16-byte vector per 2-byte tensor (two for float32)
// when every data pointer is 16-byte aligned; the last, partial chunk and misaligned tensors go
// element by element. Per-channel params follow common.cuh's chunk modes (kRun / kPlane /
// kGeneral). Loads are templated on the input element sizes; the output dtype is a run-time switch.
#include "common.cuh"

namespace rf {
namespace cuda {
namespace {

using namespace detail;

struct FwdKArgs {
  const void* y;
  const void* r;
  void* out;
  uint8_t* mask;  // nullptr: none (also when relu is off)
  Affine ya, ra;
  Geometry geo;
  int rmode;
  bool relu, vec, pvec;
  DType y_dt, r_dt, out_dt;
};

// R (ResMode) is a template argument so that the residual's registers vanish where it is absent.
template <int Sy, int Sr, Mode M, int R>
__global__ void __launch_bounds__(kThreads) bn_act_fwd_kernel(FwdKArgs a) {
  const int64_t chunks = (a.geo.numel + kChunk - 1) / kChunk;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < chunks; k += stride) {
    const int64_t i = k * kChunk;
    const int n = int(min(int64_t(kChunk), a.geo.numel - i));
    float yv[kChunk], rv[kChunk];
    load8<Sy>(a.y, i, a.vec, n, a.y_dt, yv);
    if (R != kResNone) {
      load8<Sr>(a.r, i, a.vec, n, a.r_dt, rv);
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) rv[j] = 0.f;
    }
    ChunkChans ch;
    chunk_chans<M>(i, a.geo, ch);
    constexpr bool raff = R == kResAffine;
    ChunkAffines pa;
    chunk_affines<M>(a.ya, a.ra, raff, ch, a.pvec, pa);
    float o[kChunk];
    unsigned bits = 0;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      float z = pre_act(centred(yv[j], pa.ym[j]), pa.ys[j], pa.yb[j], R, rv[j], centred(rv[j], pa.rm[j]),
                        pa.rs[j], pa.rb[j]);
      if (a.relu) {
        if (j < n && relu_passes(z)) bits |= 1u << j;  // bits past numel stay zero
        z = relu(z);
      }
      o[j] = z;
    }
    store8_dt(a.out_dt, a.out, i, a.vec, n, o);
    if (a.mask) a.mask[k] = static_cast<uint8_t>(bits);
  }
}

template <int Sy, int Sr, int R>
int launch_fwd(Mode mode, const FwdKArgs& k, cudaStream_t stream) {
  const unsigned grid = grid_for((k.geo.numel + kChunk - 1) / kChunk, kThreads);
  switch (mode) {
    case Mode::kRun: return launch(bn_act_fwd_kernel<Sy, Sr, Mode::kRun, R>, grid, kThreads, stream, k);
    case Mode::kPlane: return launch(bn_act_fwd_kernel<Sy, Sr, Mode::kPlane, R>, grid, kThreads, stream, k);
    default: return launch(bn_act_fwd_kernel<Sy, Sr, Mode::kGeneral, R>, grid, kThreads, stream, k);
  }
}

// The dtype's bits are copied untouched (U = uint16_t or uint32_t): no conversion round trip.
template <class U>
__global__ void __launch_bounds__(kThreads)
    relu_mask_bwd_kernel(const U* g, const uint8_t* mask, U* dx, int64_t numel, bool vec) {
  constexpr int kVecs = int(sizeof(U)) * kChunk / 16;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < chunks; k += stride) {
    const int64_t i = k * kChunk;
    const int n = int(min(int64_t(kChunk), numel - i));
    const unsigned bits = mask[k];
    if (vec && n == kChunk) {
      uint4 raw[kVecs];
#pragma unroll
      for (int v = 0; v < kVecs; ++v) raw[v] = reinterpret_cast<const uint4*>(g + i)[v];
      U t[kChunk];
      memcpy(t, raw, sizeof(t));
#pragma unroll
      for (int j = 0; j < kChunk; ++j)
        if (!((bits >> j) & 1u)) t[j] = U(0);  // +0.0 in all three dtypes
      memcpy(raw, t, sizeof(t));
#pragma unroll
      for (int v = 0; v < kVecs; ++v) reinterpret_cast<uint4*>(dx + i)[v] = raw[v];
    } else {
      for (int j = 0; j < n; ++j) dx[i + j] = ((bits >> j) & 1u) ? g[i + j] : U(0);
    }
  }
}

}  // namespace

int bn_act_forward(const BnActArgs& a, cudaStream_t stream) {
  if (a.shape.numel() <= 0) return 0;
  if (!valid(a.y_dtype) || !valid(a.out_dtype) || (a.r && !valid(a.r_dtype)) || !a.y || !a.out ||
      !a.y_bn.scale || !a.y_bn.shift)
    return static_cast<int>(cudaErrorInvalidValue);
  FwdKArgs k;
  k.y = a.y;
  k.r = a.r;
  k.out = a.out;
  k.mask = a.relu ? a.mask : nullptr;
  k.ya = Affine{a.y_bn.mean, a.y_bn.scale, a.y_bn.shift};
  k.ra = Affine{a.r_bn.mean, a.r_bn.scale, a.r_bn.shift};
  k.geo = geometry(a.shape);
  k.rmode = !a.r ? kResNone : (a.r_bn.scale ? kResAffine : kResIdentity);
  k.relu = a.relu;
  k.vec = aligned16(a.y) && aligned16(a.out) && (!a.r || aligned16(a.r));
  k.pvec = params_aligned(k.ya) && (k.rmode != kResAffine || params_aligned(k.ra));
  k.y_dt = a.y_dtype;
  k.r_dt = a.r ? a.r_dtype : a.y_dtype;
  k.out_dt = a.out_dtype;
  const Mode mode = chunk_mode(a.shape);
  return dispatch_size(k.y_dt, [&](auto sy) {
    if (k.rmode == kResNone) return launch_fwd<sy(), sy(), kResNone>(mode, k, stream);  // Sr unused
    return dispatch_size(k.r_dt, [&](auto sr) {
      return k.rmode == kResAffine ? launch_fwd<sy(), sr(), kResAffine>(mode, k, stream)
                                   : launch_fwd<sy(), sr(), kResIdentity>(mode, k, stream);
    });
  });
}

int relu_mask_backward(DType dtype, const void* g, const uint8_t* mask, void* dx, int64_t numel,
                       cudaStream_t stream) {
  if (numel <= 0) return 0;
  if (!valid(dtype) || !g || !mask || !dx) return static_cast<int>(cudaErrorInvalidValue);
  const bool vec = aligned16(g) && aligned16(dx);
  const unsigned grid = grid_for((numel + kChunk - 1) / kChunk, kThreads);
  if (dtype == DType::kFloat32)
    return launch(relu_mask_bwd_kernel<uint32_t>, grid, kThreads, stream, static_cast<const uint32_t*>(g),
                  mask, static_cast<uint32_t*>(dx), numel, vec);
  return launch(relu_mask_bwd_kernel<uint16_t>, grid, kThreads, stream, static_cast<const uint16_t*>(g),
                mask, static_cast<uint16_t*>(dx), numel, vec);
}

}  // namespace cuda
}  // namespace rf

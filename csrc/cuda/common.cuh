// Shared device/host helpers of the memory-bound CUDA kernels (bn_act.cu, bn_backward.cu,
// bn_stats.cu): float32 / float16 / bfloat16 <-> float conversion, DType -> template dispatch (on
// the element size), 8-element chunk loads/stores (16-byte vector accesses when aligned), the
// per-channel params of a chunk, the pre-activation z shared by forward and backward, Chan's
// merge, the checked launch, and the fixed (shape-only) tiling of the two-level reductions.
//
// Limits: tensors are dense; C, HW and N * HW fit in int64; a grid-stride loop covers any numel.
// The vector paths need 16-byte aligned base pointers; the callers test that and fall back to
// scalar accesses otherwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "resnet_fused/kernels.h"

namespace rf {
namespace cuda {
namespace detail {

// A thread's unit of elementwise work: 8 consecutive elements, so that one thread owns one whole
// mask byte (no read-modify-write races) and a 2-byte dtype moves exactly one 16-byte vector.
constexpr int kChunk = 8;
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // beyond this the grid-stride loop takes over

// ------------------------------------------------------------------------------------ dtypes
// Loads are templated on the element *size* only (S = 2: float16/bfloat16, S = 4: float32) and
// decode 2-byte values with a uniform run-time switch after the load is issued: the latency is the
// same as a fully typed load, and a kernel with three inputs needs 2^3 instantiations, not 3^3.
template <int S>
struct Bits;
template <>
struct Bits<2> {
  using type = uint16_t;
};
template <>
struct Bits<4> {
  using type = uint32_t;
};

/// Calls f(std::integral_constant<int, S>{}) with S the element size of dt; an unknown dtype is
/// cudaErrorInvalidValue.
template <class F>
int dispatch_size(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(std::integral_constant<int, 4>{});
    case DType::kFloat16:
    case DType::kBFloat16: return f(std::integral_constant<int, 2>{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

inline bool valid(DType dt) {
  return dt == DType::kFloat32 || dt == DType::kFloat16 || dt == DType::kBFloat16;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ float decode(uint32_t b, DType) { return __uint_as_float(b); }
__device__ __forceinline__ float decode(uint16_t b, DType dt) {
  // bfloat16 is the top half of a float32; exact, NaN payloads included
  return dt == DType::kBFloat16 ? __uint_as_float(uint32_t(b) << 16) : __half2float(__ushort_as_half(b));
}

// One uniform branch per vector rather than one per element.
template <int N>
__device__ __forceinline__ void decode(const uint32_t (&t)[N], DType, float (&v)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = __uint_as_float(t[j]);
}
template <int N>
__device__ __forceinline__ void decode(const uint16_t (&t)[N], DType dt, float (&v)[N]) {
  if (dt == DType::kBFloat16) {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = __uint_as_float(uint32_t(t[j]) << 16);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = __half2float(__ushort_as_half(t[j]));
  }
}

template <int Bytes>
struct Word {
  using type = uint4;
};
template <>
struct Word<8> {
  using type = uint2;
};

// ------------------------------------------------------------------------- chunk load / store
// Elements i .. i + N - 1 of base; only the first n are read, the rest are 0. vec: base is
// 16-byte aligned and i a multiple of N, so N * S bytes (8, 16 or 32) load as 8- or 16-byte words.
template <int S, int N>
__device__ __forceinline__ void loadv(const void* base, int64_t i, bool vec, int n, DType dt,
                                      float (&v)[N]) {
  using U = typename Bits<S>::type;
  const U* p = static_cast<const U*>(base) + i;
  U t[N];
  if (vec && n == N) {
    constexpr int kWord = S * N >= 16 ? 16 : S * N;
    using W = typename Word<kWord>::type;
    W raw[S * N / kWord];
#pragma unroll
    for (int k = 0; k < S * N / kWord; ++k) raw[k] = reinterpret_cast<const W*>(p)[k];
    memcpy(t, raw, sizeof(t));
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) t[j] = j < n ? p[j] : U(0);
  }
  decode(t, dt, v);
}

template <int S>
__device__ __forceinline__ void load8(const void* base, int64_t i, bool vec, int n, DType dt,
                                      float (&v)[kChunk]) {
  loadv<S, kChunk>(base, i, vec, n, dt, v);
}

/// One element, for the strided (unvectorised) paths of the reductions.
template <int S>
__device__ __forceinline__ float load1(const void* base, int64_t i, DType dt) {
  return decode(static_cast<const typename Bits<S>::type*>(base)[i], dt);
}

template <class T>
__device__ __forceinline__ T encode(float v);
template <>
__device__ __forceinline__ float encode<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half encode<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 encode<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <class T>
__device__ __forceinline__ void store8(T* p, bool vec, int n, const float (&v)[kChunk]) {
  if (vec && n == kChunk) {
    constexpr int kVecs = int(sizeof(T)) * kChunk / 16;
    T t[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) t[j] = encode<T>(v[j]);
    uint4 raw[kVecs];
    memcpy(raw, t, sizeof(t));
#pragma unroll
    for (int k = 0; k < kVecs; ++k) reinterpret_cast<uint4*>(p)[k] = raw[k];
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      if (j < n) p[j] = encode<T>(v[j]);
  }
}

// Stores are fire-and-forget, so a uniform run-time switch on the output dtype costs no latency
// and saves a template dimension (compile time).
__device__ __forceinline__ void store8_dt(DType dt, void* base, int64_t i, bool vec, int n,
                                          const float (&v)[kChunk]) {
  switch (dt) {
    case DType::kFloat32: store8(static_cast<float*>(base) + i, vec, n, v); break;
    case DType::kFloat16: store8(static_cast<__half*>(base) + i, vec, n, v); break;
    default: store8(static_cast<__nv_bfloat16*>(base) + i, vec, n, v); break;
  }
}

__device__ __forceinline__ float ldp(const float* p, int64_t c) { return p ? __ldg(p + c) : 0.f; }

// --------------------------------------------------------------------------------- the math
/// One input's affine as kernels see it (see ChannelAffine); null pointers read as 0.
struct Affine {
  const float* m;
  const float* s;
  const float* b;
};

inline bool params_aligned(const Affine& f) {
  return (!f.m || aligned16(f.m)) && (!f.s || aligned16(f.s)) && (!f.b || aligned16(f.b));
}


enum ResMode : int { kResNone = 0, kResIdentity = 1, kResAffine = 2 };

// z = (y - y_mean) * y_scale + y_shift [+ r | + (r - r_mean) * r_scale + r_shift], with explicit
// rounding intrinsics so that nvcc cannot contract differently in different kernels: forward,
// backward-reduce and backward-apply must agree bit for bit on the sign of z (the ReLU mask).
// dy = y - y_mean and dr = r - r_mean are taken as inputs because the backward reuses them.
__device__ __forceinline__ float centred(float v, float mean) { return __fsub_rn(v, mean); }

__device__ __forceinline__ float pre_act(float dy, float ys, float yb, int rmode, float r, float dr,
                                         float rs, float rb) {
  float z = __fmaf_rn(dy, ys, yb);
  if (rmode == kResIdentity)
    z = __fadd_rn(z, r);
  else if (rmode == kResAffine)
    z = __fadd_rn(z, __fmaf_rn(dr, rs, rb));
  return z;
}

// PyTorch's relu keeps NaN; its gradient is zero exactly where z <= 0 (NaN passes).
__device__ __forceinline__ float relu(float z) { return z < 0.f ? 0.f : z; }
__device__ __forceinline__ bool relu_passes(float z) { return !(z <= 0.f); }

// Chan et al.'s merge of a piece (nb, mb, m2b) into (na, mean, m2); the caller adds nb to its
// count (several channels share one count). Empty sides are taken exactly, not through 0 * x.
__device__ __forceinline__ void chan_merge(float na, float& mean, float& m2, float nb, float mb,
                                           float m2b) {
  if (nb == 0.f) return;
  if (na == 0.f) {
    mean = mb;
    m2 = m2b;
    return;
  }
  const float w = __fdiv_rn(nb, na + nb);  // IEEE even under --use_fast_math (the build's flag)
  const float d = mb - mean;
  mean = __fmaf_rn(d, w, mean);
  m2 = m2 + m2b + d * d * (na * w);
}

// ------------------------------------------------------------- channels of an elementwise chunk
// How a chunk of 8 consecutive elements (first element i, a multiple of 8) maps to channels:
//   kRun     NHWC with C % 8 == 0: channels c0 .. c0 + 7 (params load as two float4)
//   kPlane   NCHW with HW >= 8: channel c0 for j < split, then c1 (one plane boundary at most)
//   kGeneral anything else (NHWC with C % 8 != 0, NCHW with HW < 8): one channel per element
enum class Mode { kRun, kPlane, kGeneral };

struct ChunkChans {
  int64_t c0 = 0, c1 = 0;
  int split = kChunk;
  int64_t c[kChunk];
};

struct Geometry {
  int64_t numel, C, HW;
  bool cl;     // channels_last
  bool small;  // numel <= 2^32 - 1: 32-bit division is exact (and much cheaper than 64-bit)
};

template <Mode M>
__device__ __forceinline__ void chunk_chans(int64_t i, const Geometry& g, ChunkChans& ch) {
  if constexpr (M == Mode::kRun) {
    ch.c0 = g.small ? int64_t(uint32_t(i) % uint32_t(g.C)) : i % g.C;
  } else if constexpr (M == Mode::kPlane) {
    int64_t hw;
    if (g.small) {
      const uint32_t plane = uint32_t(i) / uint32_t(g.HW);
      hw = int64_t(uint32_t(i) - plane * uint32_t(g.HW));
      ch.c0 = int64_t(plane % uint32_t(g.C));
    } else {
      const int64_t plane = i / g.HW;
      hw = i - plane * g.HW;
      ch.c0 = plane % g.C;
    }
    const int64_t left = g.HW - hw;  // >= 1; the next boundary is HW >= 8 further on
    ch.split = left < kChunk ? int(left) : kChunk;
    ch.c1 = ch.c0 + 1 == g.C ? 0 : ch.c0 + 1;
  } else {
    if (g.cl) {
      int64_t c = i % g.C;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        ch.c[j] = c;
        if (++c == g.C) c = 0;
      }
    } else {
      const int64_t plane = i / g.HW;
      int64_t hw = i - plane * g.HW, c = plane % g.C;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        ch.c[j] = c;
        if (++hw == g.HW) {
          hw = 0;
          if (++c == g.C) c = 0;
        }
      }
    }
  }
}

// Per-element values of the float32 [C] vector p for the chunk (zeros for p == nullptr).
// pvec: p is 16-byte aligned, so kRun's c0 (a multiple of 8) allows float4 loads.
template <Mode M>
__device__ __forceinline__ void chunk_param(const float* p, const ChunkChans& ch, bool pvec,
                                            float (&v)[kChunk]) {
  if (p == nullptr) {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) v[j] = 0.f;
    return;
  }
  if constexpr (M == Mode::kRun) {
    if (pvec) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p + ch.c0));
      const float4 b = __ldg(reinterpret_cast<const float4*>(p + ch.c0) + 1);
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
      v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) v[j] = __ldg(p + ch.c0 + j);
    }
  } else if constexpr (M == Mode::kPlane) {
    const float a = __ldg(p + ch.c0);
    const float b = ch.split < kChunk ? __ldg(p + ch.c1) : a;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) v[j] = j < ch.split ? a : b;
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) v[j] = __ldg(p + ch.c[j]);
  }
}

// The chunk's per-element values of both inputs' affines, (m, s, b) of y then of r; r's are zeros
// unless r has an affine (raff). One loader for the forward and the backward apply, which must see
// the same parameters element for element.
struct ChunkAffines {
  float ym[kChunk], ys[kChunk], yb[kChunk], rm[kChunk], rs[kChunk], rb[kChunk];
};

template <Mode M>
__device__ __forceinline__ void chunk_affines(const Affine& ya, const Affine& ra, bool raff, const ChunkChans& ch,
                                              bool pvec, ChunkAffines& p) {
  chunk_param<M>(ya.m, ch, pvec, p.ym);
  chunk_param<M>(ya.s, ch, pvec, p.ys);
  chunk_param<M>(ya.b, ch, pvec, p.yb);
  chunk_param<M>(raff ? ra.m : nullptr, ch, pvec, p.rm);
  chunk_param<M>(raff ? ra.s : nullptr, ch, pvec, p.rs);
  chunk_param<M>(raff ? ra.b : nullptr, ch, pvec, p.rb);
}

inline Mode chunk_mode(const Act4d& s) {
  if (s.channels_last) return s.C % kChunk == 0 ? Mode::kRun : Mode::kGeneral;
  return s.HW >= kChunk ? Mode::kPlane : Mode::kGeneral;
}

inline Geometry geometry(const Act4d& s) {
  return Geometry{s.numel(), s.C, s.HW, s.channels_last, s.numel() <= int64_t(0xFFFFFFFFll)};
}

// ------------------------------------------------------------------------------ launching
/// Blocks for a grid-stride kernel: one item per thread up to kMaxBlocks blocks.
inline unsigned grid_for(int64_t items, int threads) {
  int64_t b = (items + threads - 1) / threads;
  if (b > kMaxBlocks) b = kMaxBlocks;
  if (b < 1) b = 1;
  return static_cast<unsigned>(b);
}

/// Blocks for a kernel with one item per thread and no loop (per-channel kernels): never capped;
/// callers check fits_grid first.
inline unsigned grid_exact(int64_t items, int threads) {
  const int64_t b = (items + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

/// gridDim.x limit (gridDim.y of the reductions is gp <= kTargetBlocks by construction).
inline bool fits_grid(int64_t blocks) { return blocks <= int64_t(0x7FFFFFFF); }

/// Launches and reports the launch error (not a later asynchronous fault) as int.
template <class... KArgs, class... Args>
int launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, 0, stream>>>(static_cast<KArgs>(args)...);
  return static_cast<int>(cudaGetLastError());
}

// ------------------------------------------------------------------ two-level reduction tiling
// Level 1: block (bx, by) reduces values [by * rp, min(P, (by + 1) * rp)) of a set of channels
// into one partial row `by` of the workspace (three float arrays [gp][C]). Level 2 folds the gp
// rows of each channel in a fixed order. The tiling depends on the shape only, never on the GPU,
// so a given input always reduces in the same order (bitwise reproducible).
//   NHWC: a block is tp pixel rows x tc channel threads, each thread kCpt channels (coalesced
//         along C) and 2-4 rows at a time; bx = channel block (gc of them). kCpt is 4, not 8: a
//         thread keeps up to 6 params and 3 sums per channel in registers for the whole block,
//         and 4 channels x 2 rows keeps as many bytes in flight as 8 x 1 at far fewer registers
//         (so more resident threads); 2-byte dtypes then move 8-byte words, float32 16-byte.
//   NCHW: a block is 256 threads on one channel (bx = c) walking its N planes as one sequence of
//         P = N * HW values, 2048 values (8 per thread) per step.
struct ReduceTiling {
  int64_t P = 0, C = 0, HW = 0;
  bool cl = false;
  int tc = 1, tp = kThreads;  // NHWC block shape (tc * tp == kThreads)
  int64_t gc = 0;             // blocks along channels (NHWC) or C (NCHW)
  int64_t rp = 0, gp = 0;     // values per channel per block (multiple of 8), blocks along values
  // NCHW walks: 2048 (a block step) and 256 (a thread's stride) values further along a channel
  // are so many planes plus a remainder (< HW)
  int64_t d2048 = 0, m2048 = 0, d256 = 0, m256 = 0;
};

constexpr int kCpt = 4;  // NHWC reductions: channels per thread
// Level-1 blocks: enough for several waves on a 132-SM GPU, but at least 16K values each so that
// small tensors do not drown in partial rows (which the narrow level 2 reads).
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMinBlockValues = 16384;

inline ReduceTiling make_tiling(const Act4d& s) {
  ReduceTiling t;
  t.P = s.pixels();
  t.C = s.C;
  t.HW = s.HW;
  t.cl = s.channels_last;
  if (s.numel() <= 0) return t;  // gp = 0: nothing to reduce
  if (t.cl) {
    const int64_t groups = (t.C + kCpt - 1) / kCpt;
    while (t.tc < 32 && t.tc < groups) t.tc *= 2;
    t.tp = kThreads / t.tc;
    t.gc = (groups + t.tc - 1) / t.tc;
  } else {
    t.gc = t.C;
  }
  int64_t blocks = (s.numel() + kMinBlockValues - 1) / kMinBlockValues;
  if (blocks > kTargetBlocks) blocks = kTargetBlocks;
  const int64_t want = (blocks + t.gc - 1) / t.gc;  // >= 1, <= kTargetBlocks
  t.d2048 = int64_t(kThreads * kChunk) / t.HW;
  t.m2048 = int64_t(kThreads * kChunk) % t.HW;
  t.d256 = int64_t(kThreads) / t.HW;
  t.m256 = int64_t(kThreads) % t.HW;
  t.rp = (t.P + want - 1) / want;
  t.rp = (t.rp + kChunk - 1) / kChunk * kChunk;
  t.gp = (t.P + t.rp - 1) / t.rp;  // <= want <= kTargetBlocks: fits gridDim.y, every row non-empty
  return t;
}

// Moves an NCHW channel walk's (plane n, offset hw) on by d planes + m values (m < HW).
__device__ __forceinline__ void advance(int64_t& n, int64_t& hw, int64_t d, int64_t m, int64_t HW) {
  hw += m;
  n += d;
  if (hw >= HW) {
    hw -= HW;
    ++n;
  }
}

inline size_t workspace_floats(const ReduceTiling& t) { return size_t(3) * size_t(t.gp) * size_t(t.C); }

// Level-2 block shape: rg row groups x cw channels, 1024 threads; rg grows with gp (shape only).
struct MergeShape {
  int rg = 1, cw = 1024;
};
inline MergeShape merge_shape(const ReduceTiling& t) {
  MergeShape m;
  while (m.rg < 128 && m.rg < t.gp) m.rg *= 2;
  m.cw = 1024 / m.rg;
  return m;
}

}  // namespace detail
}  // namespace cuda
}  // namespace rf

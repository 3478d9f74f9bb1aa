// Shared pieces of the CPU kernels (csrc/cpu/*.cpp): dtype dispatch, load/store as float, the one
// definition of the BN pre-activation z and of PyTorch's ReLU rules, the element walk of the
// element-wise kernels and the fixed chunking of the reductions.
//
// Why it is shaped this way:
//  * Every tensor has its own dtype, so the hot loops are written once, in float: a window of a
//    half/bfloat16 input is converted into a small float buffer first (fp32 inputs are read in
//    place). The math is instantiated per layout / residual mode, never per dtype combination,
//    which keeps the compile time small.
//  * The hot loops are plain loops over __restrict float arrays that g++/clang -O3 vectorise for
//    the baseline ISA (SSE2, NEON). at::vec::Vectorized<float> is not used: an extension is not
//    compiled with ATen's CPU_CAPABILITY macros, so it gets the generic Vectorized, which g++ 12
//    turned into scalar code with branches here (5-8x slower than these loops, measured).
//  * z is computed by one scalar function, bn_z; the vectorised body and the scalar remainder of
//    a loop perform the same IEEE operations on each element (no reassociation without
//    -ffast-math; a compiler that contracts a*b+c into an FMA does so in every copy of bn_z), so
//    the forward's mask and the backward's recomputed one agree bit for bit.
//  * Reductions split the tensor into chunks that depend on the shape only, so results do not
//    depend on the thread count; partials are merged in a fixed order.
//  * at::parallel_for is header code: it runs in parallel only where this file is compiled with
//    OpenMP (-fopenmp, as torch's own CPU kernels are); without it, it runs the whole range on the
//    calling thread (same results, by the point above).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__SSE2__) || (defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)))
#include <immintrin.h>
#endif

#include "../include/resnet_fused/kernels.h"

namespace rf {
namespace cpu {
namespace detail {

// Element-wise kernels walk memory in windows of kWin elements: a multiple of 8 (so each mask
// byte belongs to one window, hence one thread) and small enough that the float buffers of a
// window stay in L1/L2.
constexpr int64_t kWin = 4096;
static_assert(kWin % 8 == 0, "a window must hold whole mask bytes");
// Reductions: about kChunk elements per chunk (a float chunk stays in L2 for the second pass of
// the statistics), at least kMinRows pixels per NHWC chunk (bounds the partials for wide layers),
// kL float lanes for one-channel runs, and float accumulators flushed into double every kFlush
// additions (float speed, an error that does not grow with the chunk).
constexpr int64_t kChunk = 16384;
constexpr int64_t kMinRows = 32;
constexpr int kL = 16;
constexpr int64_t kFlush = 64;

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ----------------------------------------------------------------------------------- dtypes
template <class F>
inline void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat16: f(c10::Half{}); break;
    case DType::kBFloat16: f(c10::BFloat16{}); break;
    default: f(float{}); break;
  }
}

// fp16 <-> fp32. c10::Half's portable conversion (used when the compiler may not assume F16C,
// as in an extension) has branches g++ does not vectorise: ~10 ns per element, 7x bf16's cost.
// On x86 with F16C (every AVX2 CPU) the hardware converts 8 values per instruction, with the
// same IEEE round-to-nearest-even; elsewhere c10's conversion is used (native on aarch64).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RF_CPU_F16C 1
__attribute__((target("avx,f16c"))) inline void half_to_float_f16c(const c10::Half* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) d[i] = _cvtsh_ss(s[i].x);
}
__attribute__((target("avx,f16c"))) inline void float_to_half_f16c(const float* s, c10::Half* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) d[i].x = _cvtss_sh(s[i], _MM_FROUND_TO_NEAREST_INT);
}
inline bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

// n values of type T as float, and back (rounded to nearest even, as c10's conversions do).
template <class T>
inline void to_float(const T* s, float* d, int64_t n) {
#ifdef RF_CPU_F16C
  if constexpr (std::is_same_v<T, c10::Half>)
    if (has_f16c()) return half_to_float_f16c(s, d, n);
#endif
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
}
template <class T>
inline void from_float(const float* s, T* d, int64_t n) {
#ifdef RF_CPU_F16C
  if constexpr (std::is_same_v<T, c10::Half>)
    if (has_f16c()) return float_to_half_f16c(s, d, n);
#endif
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<T>(s[i]);
}

// Elements [off, off + n) of `base` (dtype d) as float: a pointer into the tensor for fp32, else
// the values converted into `buf`.
inline const float* load_f32(DType d, const void* base, int64_t off, int64_t n, float* buf) {
  if (d == DType::kFloat32) return static_cast<const float*>(base) + off;
  dispatch_dtype(d, [&](auto tag) {
    using T = decltype(tag);
    to_float(static_cast<const T*>(base) + off, buf, n);
  });
  return buf;
}

// One output of an element-wise window. The kernel writes float results to ptr: straight into an
// fp32 output, or into `buf` when the output is fp16/bf16 (rounded to nearest even by store()) or
// when it overlaps an input that is read in place (in-place calls), since the loops take
// __restrict pointers; store() then copies.
struct OutWindow {
  DType d;
  void* base;
  int64_t off, n;
  float* ptr;
  OutWindow(DType d_, void* base_, int64_t off_, int64_t n_, float* buf,
            std::initializer_list<std::pair<const void*, const float*>> inputs)
      : d(d_), base(base_), off(off_), n(n_), ptr(buf) {
    if (d != DType::kFloat32 || n <= 0) return;
    float* direct = static_cast<float*>(base) + off;
    for (const auto& in : inputs) {  // (tensor base or null, float pointer the kernel reads)
      if (!in.first) continue;
      const float* f = in.second;
      if (f < direct + n && direct < f + n) return;  // overlaps: compute into buf
    }
    ptr = direct;
  }
  void store() const {
    if (d == DType::kFloat32) {
      float* direct = static_cast<float*>(base) + off;
      if (ptr != direct) std::memcpy(direct, ptr, static_cast<size_t>(n) * sizeof(float));
      return;
    }
    dispatch_dtype(d, [&](auto tag) {
      using T = decltype(tag);
      from_float(ptr, static_cast<T*>(base) + off, n);
    });
  }
};

// ------------------------------------------------------------------------ BN, residual, ReLU
enum class RMode { kNone, kIdentity, kAffine };  // R = 0 | r | (r - r_mean) * r_scale + r_shift

inline RMode rmode_of(const void* r, const ChannelAffine& r_bn) {
  return r == nullptr ? RMode::kNone : (r_bn.scale == nullptr ? RMode::kIdentity : RMode::kAffine);
}

// THE pre-activation. yc = y - y_mean (y_mean 0 when absent: y - 0 is y exactly, -0 and NaN
// included); rv = r (identity) or r - r_mean (affine). Forward, backward reduce and backward apply
// all call this, so the ReLU decisions agree bit for bit.
template <RMode RM>
inline float bn_z(float yc, float ys, float yb, float rv, float rs, float rb) {
  float z = yc * ys + yb;
  if constexpr (RM == RMode::kIdentity) z = z + rv;
  if constexpr (RM == RMode::kAffine) z = z + (rv * rs + rb);
  return z;
}

// PyTorch's relu: z < 0 ? 0 : z, so NaN stays NaN.
inline float relu(float z) { return z < 0.f ? 0.f : z; }
// threshold_backward's rule: the gradient is zero exactly where z <= 0 (a NaN z passes it).
inline float relu_grad(float z, float g) { return z <= 0.f ? 0.f : g; }

// Mask bytes of n ReLU outputs v (>= 0 or NaN): bit set where !(v <= 0), which for v = relu(z)
// is exactly !(z <= 0). Bits past n stay zero. On x86 (SSE2 is baseline there) a "not less or
// equal" compare (true for NaN, as required) and movemask give 4 bits per instruction; the
// portable loop costs more than the whole forward pass.
inline void pack_mask(const float* __restrict v, int64_t n, uint8_t* __restrict mask) {
  int64_t j = 0;
#if defined(__SSE2__)
  const __m128 zero = _mm_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const int lo = _mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(v + j), zero));
    const int hi = _mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(v + j + 4), zero));
    mask[j / 8] = static_cast<uint8_t>(lo | (hi << 4));
  }
#endif
  for (; j < n; j += 8) {
    unsigned b = 0;
    for (int64_t k = 0; k < 8 && j + k < n; ++k) b |= static_cast<unsigned>(!(v[j + k] <= 0.f)) << k;
    mask[j / 8] = static_cast<uint8_t>(b);
  }
}

// ------------------------------------------------------------------------------ layout plan
// NHWC is walked as blocks of G pixel rows (B = G * C elements), and per-channel parameters are
// "expanded" to B entries (entry k belongs to channel k % C): then a run inside a block is one
// plain loop over arrays of the same length, and for a small C (3, 7, 13...) the runs are long
// enough (G rows) to vectorise. NCHW is walked plane by plane (HW elements of one channel).
// HW == 1 or C == 1 makes the two layouts the same memory order; the NHWC walk is used there.
struct Plan {
  int64_t N = 0, C = 0, HW = 0, P = 0, numel = 0;
  bool cl = false;
  int64_t G = 1, B = 0;
};

inline Plan make_plan(const Act4d& s) {
  Plan p;
  p.N = s.N;
  p.C = s.C;
  p.HW = s.HW;
  p.P = s.N * s.HW;
  p.numel = s.numel();
  p.cl = s.channels_last || s.HW == 1 || s.C == 1;
  if (p.cl && p.C > 0) {
    p.G = p.C >= 512 ? 1 : divup(512, p.C);  // >= 512 elements per block: loop overhead is noise
    p.B = p.G * p.C;
  }
  return p;
}

// p[k % C] for k < B (NHWC expansion), or `dflt` everywhere when p is null (absent mean, shift).
inline std::vector<float> expand(const float* p, const Plan& pl, float dflt) {
  std::vector<float> e(static_cast<size_t>(pl.B), dflt);
  if (p)
    for (int64_t k = 0; k < pl.B; ++k) e[k] = p[k % pl.C];
  return e;
}

// Per-run parameters of the element-wise kernels: NP pointers, read at [i * S]: S = 1 for the
// expanded NHWC arrays (at the run's offset in its block), S = 0 for one NCHW channel (pointers
// to that channel's values or to a default; the loop hoists the loads).
template <int NP>
struct Params {
  const float* src[NP];
  float dflt[NP];
  std::vector<float> expanded[NP];

  Params(std::initializer_list<const float*> s, std::initializer_list<float> d, const Plan& pl) {
    std::copy(s.begin(), s.end(), src);
    std::copy(d.begin(), d.end(), dflt);
    if (pl.cl)
      for (int i = 0; i < NP; ++i) expanded[i] = expand(src[i], pl, dflt[i]);
  }
  // Pointers for a run: NHWC block offset `where`, or NCHW channel `where`.
  void at(bool cl, int64_t where, const float* out[NP]) const {
    for (int i = 0; i < NP; ++i)
      out[i] = cl ? expanded[i].data() + where : (src[i] ? src[i] + where : &dflt[i]);
  }
};

// Splits memory elements [e0, e0 + n) into runs that stay inside one NHWC block or one NCHW
// plane and calls run(k, len, where): k the run's offset from e0, `where` its offset inside the
// NHWC block (NHWC) or its channel (NCHW).
template <class F>
inline void walk_runs(const Plan& pl, int64_t e0, int64_t n, F&& run) {
  const int64_t seg = pl.cl ? pl.B : pl.HW;
  int64_t s = e0 / seg, off = e0 - s * seg;
  int64_t c = pl.cl ? 0 : s % pl.C;
  for (int64_t k = 0; k < n;) {
    const int64_t len = std::min(seg - off, n - k);
    run(k, len, pl.cl ? off : c);
    k += len;
    off = 0;
    if (!pl.cl && ++c == pl.C) c = 0;
  }
}

// Runs fn(e0, n, scratch) over windows of kWin elements, in parallel; windows start at multiples
// of kWin. scratch: nbuf * kWin floats per task for the conversion buffers (uninitialised).
template <class F>
inline void for_windows(int64_t numel, int nbuf, F&& fn) {
  const int64_t nwin = divup(numel, kWin);
  at::parallel_for(0, nwin, std::max<int64_t>(1, 32768 / kWin), [&](int64_t w0, int64_t w1) {
    std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(nbuf * kWin)]);
    for (int64_t w = w0; w < w1; ++w) fn(w * kWin, std::min(kWin, numel - w * kWin), scratch.get());
  });
}

// ---------------------------------------------------------------------- reduction chunking
// Fixed chunks, functions of the shape only. NHWC: chunk t = pixel rows [t*R, (t+1)*R), all
// channels, contiguous in memory (R a multiple of G). NCHW: chunk t = (channel t / J, piece
// t % J), the piece being that channel's values number [j*R, (j+1)*R) in (n, hw) order, which
// lie in whole or partial planes.
struct Chunking {
  int64_t R = 0, J = 0, T = 0;
};

inline Chunking make_chunking(const Plan& pl) {
  Chunking ch;
  if (pl.P <= 0 || pl.C <= 0) return ch;
  if (pl.cl) {
    const int64_t rows = std::max(kChunk / pl.C, kMinRows);
    ch.R = divup(rows, pl.G) * pl.G;
    ch.T = ch.J = divup(pl.P, ch.R);
  } else {
    ch.R = kChunk;
    ch.J = divup(pl.P, ch.R);
    ch.T = ch.J * pl.C;
  }
  return ch;
}

// Count of values in chunk j (of a channel): the same formula for both layouts.
inline int64_t chunk_count(const Plan& pl, const Chunking& ch, int64_t j) {
  return std::min(ch.R, pl.P - j * ch.R);
}

// NCHW: calls run(mem_offset, len) for the contiguous pieces of channel c's values [q0, q1).
template <class F>
inline void walk_channel(const Plan& pl, int64_t c, int64_t q0, int64_t q1, F&& run) {
  int64_t n = q0 / pl.HW, h = q0 - n * pl.HW;
  for (int64_t q = q0; q < q1;) {
    const int64_t len = std::min(pl.HW - h, q1 - q);
    run((n * pl.C + c) * pl.HW + h, len);
    q += len;
    h = 0;
    ++n;
  }
}

// NCHW lane sums: splits a run of len values into pieces add(offset, n) so that no lane (value i
// of a piece goes to lane i % kL) gets more than kFlush additions between two flush() calls.
// `adds` carries the count across the runs of a chunk, so short planes do not flush every time.
template <class Add, class Flush>
inline void lane_pieces(int64_t& adds, int64_t len, Add&& add, Flush&& flush) {
  for (int64_t p0 = 0; p0 < len;) {
    const int64_t n = std::min(len - p0, (kFlush - adds) * kL);
    add(p0, n);
    adds += divup(n, kL);
    p0 += n;
    if (adds >= kFlush) {
      flush();
      adds = 0;
    }
  }
}

// Float accumulators (per NHWC block entry, or kL lanes of one NCHW channel) flushed into double
// ones every kFlush additions.
struct Acc {
  std::vector<float> f;
  std::vector<double> d;
  void reset(int64_t n) {
    f.assign(static_cast<size_t>(n), 0.f);
    d.assign(static_cast<size_t>(n), 0.0);
  }
  void flush() {
    for (size_t k = 0; k < f.size(); ++k) {
      d[k] += f[k];
      f[k] = 0.f;
    }
  }
  // Totals per channel: entry k belongs to channel k % C (C = 1 sums the lanes), fixed order.
  void fold(int64_t C, double* out) {
    flush();
    for (int64_t c = 0; c < C; ++c) out[c] = 0.0;
    for (size_t k = 0; k < d.size(); ++k) out[static_cast<int64_t>(k) % C] += d[k];
  }
};

}  // namespace detail
}  // namespace cpu
}  // namespace rf

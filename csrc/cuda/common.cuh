// Device building blocks shared by the DATTA CUDA kernels: the launch configuration, element
// traits, 16-byte packs, the reduction "ops" (shifted-sum moments, backward sums, plain sums),
// warp / CTA reductions and the host-side plan that cuts reductions into CTA-sized pieces.
// Torch-free: compiled by `nvcc -c` in CI without a GPU.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "datta_cuda.h"

namespace datta::cuda {

// ------------------------------------------------------------------ launch configuration
// Every tuning number of the CUDA kernels lives here, with its reason.
namespace cfg {
// Threads per CTA of every streaming kernel: 8 warps.  Small enough that 8 CTAs fit on an SM
// (2048 threads on sm_80/sm_90), large enough that one CTA streams a 56x56 plane in one round.
constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// 16-byte vector loads/stores (LDG.128 / STG.128): fewest memory instructions per byte.
constexpr int kVecBytes = 16;
// Vectors each thread loads before using any (memory-level parallelism: 4 x 16 B in flight
// per thread and input is far beyond the ~20 KB per SM that H100 bandwidth x latency needs).
constexpr int kUnroll = 4;
// Grids are sized for at least this many CTAs per SM: every SM stays busy and the last wave
// is a small fraction of the work.
constexpr int64_t kCtasPerSm = 8;
// A reduction is split into partials only down to this many bytes per piece: smaller pieces
// cost more in the partial write + merge than they gain in parallelism.
constexpr int64_t kMinSplitBytes = 16 * 1024;
// NCHW planes of at most this many bytes are reduced by one warp (8 planes per CTA) instead of
// one CTA: a 256-thread CTA on a 7x7 or 14x14 plane would leave most lanes idle.
constexpr int64_t kWarpPlaneMaxBytes = 4096;
// Per-channel / per-(n, c) kernels (blend, coefficients, merges, angle finalize): tiny,
// latency bound; 128 threads gives several CTAs even for C = 256.
constexpr int kTinyThreads = 128;
// channels_last diversity angles: vector loads per CTA per pixel block (~8 per thread).
constexpr int64_t kAngleVecsPerCta = 2048;
// SPEC §2: norms of a and b are clamped at this floor before dividing.
constexpr double kNormFloor = 1e-10;
// Workspace sub-arrays start on this boundary (vector loads, coalescing).
constexpr size_t kWorkspaceAlign = 256;
}  // namespace cfg

// ------------------------------------------------------------------ element traits
template <typename T> struct Elem;
template <> struct Elem<float> {
  using acc = float;
  __device__ __forceinline__ static float load(float v) { return v; }
  __device__ __forceinline__ static float store(float v) { return v; }
};
template <> struct Elem<double> {
  using acc = double;
  __device__ __forceinline__ static double load(double v) { return v; }
  __device__ __forceinline__ static double store(double v) { return v; }
};
template <> struct Elem<__half> {
  using acc = float;
  __device__ __forceinline__ static float load(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half store(float v) { return __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  using acc = float;
  __device__ __forceinline__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <typename T> using acc_t = typename Elem<T>::acc;

/// Elements per 16-byte vector.
template <typename T> constexpr int kVec = cfg::kVecBytes / int(sizeof(T));

// Overloads so the math reads the same for float and double accumulation.
__device__ __forceinline__ float sqrt_(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_(double v) { return sqrt(v); }
__device__ __forceinline__ float rsqrt_(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_(double v) { return rsqrt(v); }
__device__ __forceinline__ float abs_(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_(double v) { return fabs(v); }
__device__ __forceinline__ float max_(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float min_(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double min_(double a, double b) { return fmin(a, b); }
__device__ __forceinline__ float acos_(float v) { return acosf(v); }
__device__ __forceinline__ double acos_(double v) { return acos(v); }
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------ 16-byte packs
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// The raw word moved by one load of a pack (16 B -> uint4 -> LDG.128).
template <int Bytes> struct RawWord;
template <> struct RawWord<16> { using type = uint4; };
template <> struct RawWord<8> { using type = uint2; };
template <> struct RawWord<4> { using type = unsigned int; };
template <> struct RawWord<2> { using type = unsigned short; };

/// Read-only (non-coherent path) load of V consecutive elements; p is sizeof(Pack)-aligned.
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  using W = typename RawWord<int(sizeof(T)) * V>::type;
  const W w = __ldg(reinterpret_cast<const W*>(p));
  Pack<T, V> r;
  memcpy(&r, &w, sizeof(W));
  return r;
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& r) {
  using W = typename RawWord<int(sizeof(T)) * V>::type;
  W w;
  memcpy(&w, &r, sizeof(W));
  *reinterpret_cast<W*>(p) = w;
}

/// A plane range [lo, hi) cut into a scalar head [lo, body), whole aligned V-vectors
/// [body, tail) and a scalar tail [tail, hi).
struct Span {
  int64_t body, tail;
};

template <typename T, int V>
__device__ __forceinline__ Span vector_span(const T* plane, int64_t lo, int64_t hi) {
  if constexpr (V == 1) {
    return {lo, hi};
  } else {
    const auto addr = reinterpret_cast<uintptr_t>(plane + lo);
    const int64_t head = imin(int64_t((cfg::kVecBytes - addr % cfg::kVecBytes) % cfg::kVecBytes) /
                                  int64_t(sizeof(T)),
                              hi - lo);
    const int64_t body = lo + head;
    return {body, body + (hi - body) / V * V};
  }
}

// ------------------------------------------------------------------ reduction ops
// An op folds chunks of K values of one (n, c) into a State, merges States (associative, used
// in a fixed order so results are bitwise reproducible) and finalizes into two (N, C) outputs.

/// Shifted sums of one (n, c): s1 = sum (x - k), s2 = sum (x - k)^2 with k the plane's first
/// value (every piece and lane of a plane uses the same k, so States merge by addition).
template <typename A> struct ShiftedSums {
  double s1, s2, k;
};

/// Instance moments (SPEC D4's instance side): out0 = mean, out1 = unbiased variance (0 when
/// M <= 1).  Shifted sums: each chunk of K values forms d = x - k, sum d and sum d^2 (see
/// add) and adds them to double totals (three double ops per chunk, no division); the plane's
/// count is M (finalize's m), never carried.  With k a value of the plane, mean - k is within
/// a few standard deviations for any ordinary plane, so s2 - s1^2 / M loses only a digit or
/// two of double's 16: stable for 1e4 + noise like the Chan merges this replaced, which spent
/// a double division per 16 bytes and held the kernel to ~25 % of an H200's bandwidth (188 us
/// -> 69 us at 64x256x56x56 fp32: bench/results/h200_profile_aa395c1.md -> h200_profile.md).
/// An inf/NaN value makes s1 (and s2) non-finite: mean and variance of that plane are
/// inf/NaN, as SPEC's non-finite rule allows.
template <typename A> struct MomentsOp {
  using State = ShiftedSums<A>;
  static constexpr bool kHasDy = false;
  /// The shift is the plane's first value (loaded by the pass), not a given (N, C) center.
  static constexpr bool kShiftByFirst = true;
  __device__ static State identity() { return {0.0, 0.0, 0.0}; }
  __device__ static State start(A k) { return {0.0, 0.0, double(k)}; }
  // A chunk: d = x - k; its sum and, about its own mean dm = sum / cnt, M2 = sum (d - dm)^2
  // in A; then s2 += M2 + dm * sum (= sum d^2) in double.  Forming the chunk's own M2 keeps
  // a far-off shift (a plane whose first value is an outlier) from costing precision: in
  // float, sum d^2 directly was 1e-5 off on such planes, this is ~5e-8.
  template <int K>
  __device__ static void add(State& s, const A (&x)[K], const A (&)[K], int cnt, A k) {
    A d[K], sum = A(0);
#pragma unroll
    for (int i = 0; i < K; ++i) {
      d[i] = i < cnt ? x[i] - k : A(0);
      sum += d[i];
    }
    const A dm = cnt == K ? sum * (A(1) / A(K)) : sum / A(cnt);
    A m2 = A(0);
#pragma unroll
    for (int i = 0; i < K; ++i)
      if (i < cnt) {
        const A e = d[i] - dm;
        m2 += e * e;
      }
    s.s1 += double(sum);
    s.s2 += double(m2) + double(dm) * double(sum);
  }
  /// b into a; both belong to one plane (same k), a keeps its k.
  __device__ static void merge(State& a, const State& b) {
    a.s1 += b.s1;
    a.s2 += b.s2;
  }
  __device__ static State shfl(const State& s, int delta, int width) {
    return {__shfl_down_sync(cfg::kFullMask, s.s1, delta, width),
            __shfl_down_sync(cfg::kFullMask, s.s2, delta, width), s.k};
  }
  __device__ static void finalize(const State& s, A* out0, A* out1, int64_t i, int64_t m) {
    const double dm = s.s1 / double(m);
    out0[i] = A(s.k + dm);
    // (x < 0 ? 0 : x) keeps a NaN (fmax would drop it); rounding can leave s2 - s1 dm < 0
    const double ss = s.s2 - s.s1 * dm;
    out1[i] = m > 1 ? A((ss < 0.0 ? 0.0 : ss) / double(m - 1)) : A(0);
  }
};

/// Backward pass 1 sums of one (n, c): sdy = sum dy, sdyxc = sum dy (x - mu_i); `center` is
/// mu_i, so the products never see the raw offset of x (stable for 1e4 + noise).  A chunk of
/// K values is summed in A and added to double totals; States merge in double.  A float
/// running total per thread (M / 256 values) drifts with M (~1e-4 relative at M = 2^28) and
/// stops growing once it is 2^24 times its addends; the double totals cost two DADDs per
/// chunk, not per element.
template <typename A> struct DySums {
  double sdy, sdyxc;
};
template <typename A> struct DySumsOp {
  using State = DySums<A>;
  static constexpr bool kHasDy = true;
  static constexpr bool kShiftByFirst = false;  // the center is the given mu_i
  __device__ static State identity() { return {0.0, 0.0}; }
  __device__ static State start(A) { return identity(); }
  template <int K>
  __device__ static void add(State& s, const A (&x)[K], const A (&dy)[K], int cnt, A center) {
    A cdy = A(0), cdyxc = A(0);
#pragma unroll
    for (int i = 0; i < K; ++i)
      if (i < cnt) {
        cdy += dy[i];
        cdyxc += dy[i] * (x[i] - center);
      }
    s.sdy += double(cdy);
    s.sdyxc += double(cdyxc);
  }
  __device__ static void merge(State& a, const State& b) {
    a.sdy += b.sdy;
    a.sdyxc += b.sdyxc;
  }
  __device__ static State shfl(const State& s, int delta, int width) {
    return {__shfl_down_sync(cfg::kFullMask, s.sdy, delta, width),
            __shfl_down_sync(cfg::kFullMask, s.sdyxc, delta, width)};
  }
  __device__ static void finalize(const State& s, A* out0, A* out1, int64_t i, int64_t) {
    out0[i] = A(s.sdy);
    out1[i] = A(s.sdyxc);
  }
};

/// A plain sum (diversity angles: sum of cos over pixels).
template <typename A> struct SumOp {
  using State = A;
  __device__ static State identity() { return A(0); }
  __device__ static void merge(State& a, const State& b) { a += b; }
  __device__ static State shfl(const State& s, int delta, int width) {
    return __shfl_down_sync(cfg::kFullMask, s, delta, width);
  }
};

// ------------------------------------------------------------------ warp / CTA reductions
/// Tree reduction over aligned groups of `Width` lanes (power of two <= 32); the result is
/// valid in the first lane of each group.  Every lane of the warp must call it.
template <typename Op, int Width>
__device__ __forceinline__ typename Op::State warp_reduce(typename Op::State s) {
#pragma unroll
  for (int off = Width / 2; off > 0; off >>= 1) Op::merge(s, Op::shfl(s, off, Width));
  return s;
}

/// Reduction over a CTA of cfg::kThreads threads (1-D index threadIdx.x + blockDim.x *
/// threadIdx.y); the result is valid in thread 0.  Fixed order: lanes by tree, then warps by
/// tree.  Every thread must call it, once per kernel.
template <typename Op>
__device__ __forceinline__ typename Op::State block_reduce(typename Op::State s) {
  constexpr int kWarps = cfg::kThreads / cfg::kWarp;
  __shared__ typename Op::State warp_results[kWarps];
  const int tid = threadIdx.x + blockDim.x * threadIdx.y;
  const int lane = tid % cfg::kWarp, warp = tid / cfg::kWarp;
  s = warp_reduce<Op, cfg::kWarp>(s);
  if (lane == 0) warp_results[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? warp_results[lane] : Op::identity();
    s = warp_reduce<Op, cfg::kWarp>(s);
  }
  return s;
}

// ------------------------------------------------------------------ host-side plan
/// How an (n, c) reduction over M values is cut into pieces.  Depends only on the shape,
/// dtype and SM count, so workspace_bytes() and the launchers agree without seeing pointers.
struct Plan {
  int64_t splits = 1;          // pieces per (n, c); > 1 means partials + an ordered merge
  int64_t split_len = 0;       // NCHW: elements per piece; channels_last: rows per piece
  bool warp_per_plane = false;  // NCHW: one warp (not one CTA) per small plane
};

/// channels_last CTA tile: tx threads along channel vectors (coalesced), ty along rows.
struct ColumnTile {
  int tx, ty;
  int64_t col_tiles;
};

inline ColumnTile column_tile(int64_t c, int v) {
  const int64_t vecs = ceil_div(c, v);
  int tx = 1;
  while (tx < cfg::kWarp && tx < vecs) tx *= 2;
  return {tx, cfg::kThreads / tx, ceil_div(vecs, tx)};
}

inline int elem_bytes(ElemType t) {
  switch (t) {
    case ElemType::kFloat64: return 8;
    case ElemType::kFloat32: return 4;
    default: return 2;
  }
}

inline Plan make_plan(const Params& p) {
  const int64_t bytes = elem_bytes(p.dtype), vec = cfg::kVecBytes / bytes;
  const int64_t target_ctas = cfg::kCtasPerSm * p.num_sms;
  Plan plan;
  if (!p.channels_last) {
    if (p.m * bytes <= cfg::kWarpPlaneMaxBytes) {
      plan.warp_per_plane = true;
      plan.split_len = p.m;
      return plan;
    }
    const int64_t max_splits = imax(1, p.m * bytes / cfg::kMinSplitBytes);
    const int64_t splits = imin(imax(1, ceil_div(target_ctas, p.n * p.c)), max_splits);
    // Whole vectors per piece: every piece of an aligned plane starts aligned.
    plan.split_len = ceil_div(ceil_div(p.m, splits), vec) * vec;
  } else {
    // Nominal vector width: the grid may launch with 1 when pointers are misaligned, which
    // changes the column tiling but not the splits (so never the workspace size).
    const ColumnTile t = column_tile(p.c, p.c % vec == 0 ? int(vec) : 1);
    const int64_t row_bytes = int64_t(t.tx) * (p.c % vec == 0 ? vec : 1) * bytes;
    const int64_t max_splits = imax(1, p.m / ceil_div(cfg::kMinSplitBytes, row_bytes));
    const int64_t splits = imin(imax(1, ceil_div(target_ctas, p.n * t.col_tiles)), max_splits);
    plan.split_len = ceil_div(p.m, splits);
  }
  plan.splits = ceil_div(p.m, plan.split_len);
  return plan;
}

/// Carves typed sub-arrays out of the workspace; with base == nullptr it only measures, so
/// workspace_bytes() and the launchers share one layout.
struct Carver {
  char* base;
  size_t used = 0;
  template <typename X> X* take(int64_t count) {
    used = (used + cfg::kWorkspaceAlign - 1) / cfg::kWorkspaceAlign * cfg::kWorkspaceAlign;
    X* r = base ? reinterpret_cast<X*>(base + used) : nullptr;
    used += size_t(count) * sizeof(X);
    return r;
  }
};

template <typename T> struct TypeTag {
  using type = T;
};

/// Calls f(TypeTag<T>{}) with the element type named by t; `invalid` for an unknown t.
template <typename R, typename F>
R dispatch_elem(ElemType t, R invalid, F&& f) {
  switch (t) {
    case ElemType::kFloat32: return f(TypeTag<float>{});
    case ElemType::kFloat64: return f(TypeTag<double>{});
    case ElemType::kFloat16: return f(TypeTag<__half>{});
    case ElemType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
  }
  return invalid;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % cfg::kVecBytes == 0; }
inline unsigned residue16(const void* p) { return unsigned(reinterpret_cast<uintptr_t>(p) % cfg::kVecBytes); }

/// Workspace of diversity_angles (defined in diversity.cu, used by workspace_bytes()).
size_t angles_workspace_bytes(const Params& p);

}  // namespace datta::cuda

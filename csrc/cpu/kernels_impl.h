// The fused DABN kernels, written once for every dtype and every instruction set.
//
// Compiled by kernels_default.cpp, kernels_avx2.cpp and kernels_avx512.cpp, each after it has
// chosen CPU_CAPABILITY (which names at::vec's inline namespace and picks the Vectorized<>
// specialisations).  Everything below has internal linkage, so the copies never collide.
//
// Types: T is the element type of x / dy / y / dx; A = acc type (double for double, float for
// float, Half and BFloat16: 16-bit values are widened on load and rounded once on store).
// V = Vectorized<A>, kW = its lane count.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace datta::cpu {
namespace {

using at::vec::Vectorized;

template <typename T>
struct AccOf { using type = float; };
template <>
struct AccOf<double> { using type = double; };

/// Load / store kW elements of T as one Vectorized<A>; the counted forms touch only n lanes
/// (loads zero the others).
template <typename T>
struct Io {
  using A = typename AccOf<T>::type;
  using V = Vectorized<A>;
  static constexpr int64_t kW = V::size();
  static constexpr bool kNative = std::is_same_v<T, A>;

  static V load(const T* p) {
    if constexpr (kNative) {
      return V::loadu(p);
    } else {
      V out;
      at::vec::load_to_float(p, out);
      return out;
    }
  }
  static V load(const T* p, int64_t n) {
    if constexpr (kNative) {
      return V::loadu(p, n);
    } else {
      alignas(64) A buf[kW] = {};
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(p[i]);
      return V::loadu(buf);
    }
  }
  static void store(T* p, const V& v) {
    if constexpr (kNative) {
      v.store(p);
    } else {
      at::vec::convert_from_float<T>(v, v).store(p, kW);
    }
  }
  static void store(T* p, const V& v, int64_t n) {
    if constexpr (kNative) {
      v.store(p, n);
    } else {
      at::vec::convert_from_float<T>(v, v).store(p, n);
    }
  }
};

/// Sum of the lanes in a fixed pairwise order (deterministic, independent of the library):
/// lanes[i] += lanes[i + w] for w = kW/2, ..., 1.  On AVX2 / AVX-512 the same tree is a few
/// register shuffles (halve, halve, ...), bitwise equal to the portable loop but without the
/// store and scalar reloads (this reduction runs twice per plane: it dominates small planes).
template <typename A>
A hsum(const Vectorized<A>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 z = v;
    const __m256 y = _mm256_add_ps(_mm512_castps512_ps256(z), _mm512_extractf32x8_ps(z, 1));
#else
    const __m256 y = v;
#endif
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512d z = v;
    const __m256d y = _mm256_add_pd(_mm512_castpd512_pd256(z), _mm512_extractf64x4_pd(z, 1));
#else
    const __m256d y = v;
#endif
    const __m128d q = _mm_add_pd(_mm256_castpd256_pd128(y), _mm256_extractf128_pd(y, 1));
    return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
  }
#else
  constexpr int64_t kW = Vectorized<A>::size();
  alignas(64) A lanes[kW];
  v.store(lanes);
  for (int64_t w = kW / 2; w >= 1; w /= 2) {
    for (int64_t i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  }
  return lanes[0];
#endif
}

/// Chan et al. merge of two (count, mean, M2) partials, in double (every caller merges float
/// chunk results into double totals):  delta = mean_b - mean_a,
/// mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
inline void chan_merge(int64_t& count, double& mean, double& m2, int64_t nb, double mean_b, double m2_b) {
  if (count == 0) {
    count = nb;
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const int64_t total = count + nb;
  const double wb = static_cast<double>(nb) / static_cast<double>(total);
  const double wab = static_cast<double>(count) * wb;
  const double delta = mean_b - mean;
  mean += delta * wb;
  m2 += m2_b + delta * delta * wab;
  count = total;
}

// ------------------------------------------------------------------ contiguous runs (NCHW)
/// sum_{i<n} (p[i] - shift); four accumulators hide the add latency.
template <typename T>
typename Io<T>::A shifted_sum_run(const T* p, int64_t n, typename Io<T>::A shift) {
  using IO = Io<T>;
  using V = typename IO::V;
  constexpr int64_t kW = IO::kW;
  const V sv(shift);
  V s0(0), s1(0), s2(0), s3(0);
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    s0 += IO::load(p + i) - sv;
    s1 += IO::load(p + i + kW) - sv;
    s2 += IO::load(p + i + 2 * kW) - sv;
    s3 += IO::load(p + i + 3 * kW) - sv;
  }
  for (; i + kW <= n; i += kW) s0 += IO::load(p + i) - sv;
  if (i < n) s1 += V::set(V(0), IO::load(p + i, n - i) - sv, n - i);
  return hsum((s0 + s1) + (s2 + s3));
}

/// A shift for the chunk sums: the first value when finite (so the sums see only deviations,
/// e.g. noise instead of 1e4 + noise, and the chunk mean is exact to float rounding), else 0.
template <typename A>
A sum_shift(A first) {
  return std::isfinite(first) ? first : A(0);
}

/// sum_{i<n} ((p[i] - shift) - mean_dev)^2, the centred second moment of a chunk already in
/// L1 (mean_dev: the chunk mean minus shift).
template <typename T>
typename Io<T>::A centred_ss_run(const T* p, int64_t n, typename Io<T>::A shift,
                                 typename Io<T>::A mean_dev) {
  using IO = Io<T>;
  using V = typename IO::V;
  constexpr int64_t kW = IO::kW;
  const V sv(shift), mv(mean_dev);
  V s0(0), s1(0), s2(0), s3(0);
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    const V d0 = (IO::load(p + i) - sv) - mv, d1 = (IO::load(p + i + kW) - sv) - mv;
    const V d2 = (IO::load(p + i + 2 * kW) - sv) - mv, d3 = (IO::load(p + i + 3 * kW) - sv) - mv;
    s0 = at::vec::fmadd(d0, d0, s0);
    s1 = at::vec::fmadd(d1, d1, s1);
    s2 = at::vec::fmadd(d2, d2, s2);
    s3 = at::vec::fmadd(d3, d3, s3);
  }
  for (; i + kW <= n; i += kW) {
    const V d = (IO::load(p + i) - sv) - mv;
    s0 = at::vec::fmadd(d, d, s0);
  }
  if (i < n) {  // lanes past n would contribute a square: mask them out
    const V d = V::set(V(0), (IO::load(p + i, n - i) - sv) - mv, n - i);
    s1 = at::vec::fmadd(d, d, s1);
  }
  return hsum((s0 + s1) + (s2 + s3));
}

/// Mean and M2 of one plane: per L1 chunk (shifted) sum -> chunk mean -> centred SS from L1
/// (in A), Chan-merged across chunks in double: merged in float, M2 is a running total of
/// chunk M2s and drifts with M like any float running sum (5e-5 relative at M = 2^26).
template <typename T>
void plane_moments(const T* p, int64_t m, typename Io<T>::A& mean, typename Io<T>::A& m2) {
  using A = typename Io<T>::A;
  const int64_t chunk = std::max<int64_t>(config::kL1ChunkBytes / sizeof(T), Io<T>::kW);
  // Everything is accumulated as deviations from `shift`: chunk means and their merges stay
  // small numbers, and the absolute mean is rounded once at the end.
  const A shift = sum_shift(static_cast<A>(p[0]));
  int64_t count = 0;
  double mean_dev = 0, m2_total = 0;
  for (int64_t s = 0; s < m; s += chunk) {
    const int64_t len = std::min(chunk, m - s);
    const A cm = shifted_sum_run(p + s, len, shift) / static_cast<A>(len);
    const A css = centred_ss_run(p + s, len, shift, cm);
    chan_merge(count, mean_dev, m2_total, len, static_cast<double>(cm), static_cast<double>(css));
  }
  mean = static_cast<A>(static_cast<double>(shift) + mean_dev);
  m2 = static_cast<A>(m2_total);
}

/// sdy = sum dy, sdyxc = sum dy * (x - mu) over one run of n elements (a chunk), in A.
template <typename T>
void dy_sums_run(const T* dy, const T* x, int64_t m, typename Io<T>::A mu, typename Io<T>::A& sdy,
                 typename Io<T>::A& sdyxc) {
  using IO = Io<T>;
  using V = typename IO::V;
  constexpr int64_t kW = IO::kW;
  const V mv(mu);
  V s0(0), s1(0), t0(0), t1(0);
  int64_t i = 0;
  for (; i + 2 * kW <= m; i += 2 * kW) {
    const V d0 = IO::load(dy + i), d1 = IO::load(dy + i + kW);
    s0 += d0;
    s1 += d1;
    t0 = at::vec::fmadd(d0, IO::load(x + i) - mv, t0);
    t1 = at::vec::fmadd(d1, IO::load(x + i + kW) - mv, t1);
  }
  for (; i < m; i += kW) {  // counted loads zero the lanes past m, and dy = 0 there
    const int64_t n = std::min(kW, m - i);
    const V d = IO::load(dy + i, n);
    s0 += d;
    t0 = at::vec::fmadd(d, V::set(V(0), IO::load(x + i, n) - mv, n), t0);
  }
  sdy = hsum(s0 + s1);
  sdyxc = hsum(t0 + t1);
}

/// sdy, sdyxc of one plane in a single pass, accumulated like the forward's moments: per L1
/// chunk in A (a few hundred values per lane), chunk totals added in double.  A float
/// running sum over the whole plane drifts with M (~1e-4 relative at M = 2^28) and stops
/// growing outright once a lane reaches 2^24 ulps of its addends (2^30 ones: Sigma dy 33-50%
/// low); chunked, the error stays at the chunk's, whatever M.
template <typename T>
void plane_dy_sums(const T* dy, const T* x, int64_t m, typename Io<T>::A mu, double& sdy,
                   double& sdyxc) {
  using A = typename Io<T>::A;
  const int64_t chunk = std::max<int64_t>(config::kL1ChunkBytes / sizeof(T), Io<T>::kW);
  sdy = 0.0;
  sdyxc = 0.0;
  for (int64_t s = 0; s < m; s += chunk) {
    A cdy, cdyxc;
    dy_sums_run(dy + s, x + s, std::min(chunk, m - s), mu, cdy, cdyxc);
    sdy += static_cast<double>(cdy);
    sdyxc += static_cast<double>(cdyxc);
  }
}

// ------------------------------------------------------------------ channels_last blocks
/// How channels_last reductions are split: per sample, `segs` runs of `seg_rows` pixels x
/// `nblocks` blocks of up to kBlockVecs*kW channels.  Depends only on the shape (and ISA).
struct ClPlan {
  int64_t block_ch, nblocks, segs, seg_rows;
};

template <typename T>
ClPlan cl_plan(const Geometry& g) {
  ClPlan p{};
  p.block_ch = config::kBlockVecs * Io<T>::kW;
  p.nblocks = (g.c + p.block_ch - 1) / p.block_ch;
  const int64_t want = (config::kTargetTasks + g.n * p.nblocks - 1) / (g.n * p.nblocks);
  const int64_t most = std::max<int64_t>(1, g.m * g.c / config::kMinSegmentElems);
  const int64_t segs = std::clamp<int64_t>(std::min(want, most), 1, g.m);
  p.seg_rows = (g.m + segs - 1) / segs;
  p.segs = (g.m + p.seg_rows - 1) / p.seg_rows;
  return p;
}

/// Load vector j of a channel block; only the last one (j == NV-1) may be partial.
template <typename T, int NV>
inline typename Io<T>::V block_load(const T* p, int j, int64_t tail) {
  if (j == NV - 1 && tail < Io<T>::kW) return Io<T>::load(p, tail);
  return Io<T>::load(p);
}

/// Mean and M2 of channels [c0, c0 + (NV-1)*kW + tail) over rows [r0, r1) of sample xn
/// (rows of length C), chunked by L1 and shifted like plane_moments, vectorised along channels;
/// the chunks are Chan-merged per channel in double (`mean` holds deviations from `shift`
/// until the final store).
template <typename T, int NV>
void cl_block_moments(const T* xn, int64_t C, int64_t r0, int64_t r1, int64_t c0, int64_t tail,
                      typename Io<T>::A* mean_out, typename Io<T>::A* m2_out) {
  using IO = Io<T>;
  using A = typename IO::A;
  using V = typename IO::V;
  constexpr int64_t kW = IO::kW;
  const int64_t chunk_rows = std::max<int64_t>(1, config::kL1ChunkBytes / (sizeof(T) * NV * kW));
  V shift[NV];
  for (int j = 0; j < NV; ++j) {  // per-channel shift: the segment's first row (if finite)
    const V first = block_load<T, NV>(xn + r0 * C + c0 + j * kW, j, tail);
    alignas(64) A lanes[kW];
    first.store(lanes);
    for (int64_t l = 0; l < kW; ++l) lanes[l] = sum_shift(lanes[l]);
    shift[j] = V::loadu(lanes);
  }
  int64_t count = 0;
  double mean[NV * kW] = {}, m2[NV * kW] = {};
  for (int64_t rs = r0; rs < r1; rs += chunk_rows) {
    const int64_t len = std::min(chunk_rows, r1 - rs);
    V sum[NV], css[NV];
    for (int j = 0; j < NV; ++j) sum[j] = css[j] = V(0);
    for (int64_t r = rs; r < rs + len; ++r) {
      const T* row = xn + r * C + c0;
      for (int j = 0; j < NV; ++j) sum[j] += block_load<T, NV>(row + j * kW, j, tail) - shift[j];
    }
    const V len_v(static_cast<A>(len));
    for (int j = 0; j < NV; ++j) sum[j] = sum[j] / len_v;  // chunk mean - shift (0 in padding)
    for (int64_t r = rs; r < rs + len; ++r) {
      const T* row = xn + r * C + c0;
      for (int j = 0; j < NV; ++j) {
        const V d = (block_load<T, NV>(row + j * kW, j, tail) - shift[j]) - sum[j];
        css[j] = at::vec::fmadd(d, d, css[j]);
      }
    }
    alignas(64) A lanes[2][kW];
    for (int j = 0; j < NV; ++j) {
      sum[j].store(lanes[0]);
      css[j].store(lanes[1]);
      for (int64_t l = 0; l < kW; ++l) {
        int64_t cnt = count;
        chan_merge(cnt, mean[j * kW + l], m2[j * kW + l], len, static_cast<double>(lanes[0][l]),
                           static_cast<double>(lanes[1][l]));
      }
    }
    count += len;
  }
  for (int j = 0; j < NV; ++j) {
    const int64_t n = j == NV - 1 ? tail : kW;
    alignas(64) A lanes[kW];
    shift[j].store(lanes);
    for (int64_t l = 0; l < n; ++l) {
      mean_out[j * kW + l] = static_cast<A>(static_cast<double>(lanes[l]) + mean[j * kW + l]);
      m2_out[j * kW + l] = static_cast<A>(m2[j * kW + l]);
    }
  }
}

/// channels_last backward sums over rows [r0, r1) for one channel block: vector
/// accumulators in A per L1 chunk of rows, chunk totals added per channel in double (as
/// plane_dy_sums).
template <typename T, int NV>
void cl_block_dy_sums(const T* dyn, const T* xn, const typename Io<T>::A* mu, int64_t C,
                      int64_t r0, int64_t r1, int64_t c0, int64_t tail, double* sdy_out,
                      double* sdyxc_out) {
  using IO = Io<T>;
  using A = typename IO::A;
  using V = typename IO::V;
  constexpr int64_t kW = IO::kW;
  const int64_t chunk_rows = std::max<int64_t>(1, config::kL1ChunkBytes / (sizeof(T) * NV * kW));
  V mv[NV];
  for (int j = 0; j < NV; ++j) mv[j] = V::loadu(mu + c0 + j * kW, j == NV - 1 ? tail : kW);
  double tdy[NV * kW] = {}, tdyxc[NV * kW] = {};
  for (int64_t rs = r0; rs < r1; rs += chunk_rows) {
    V sdy[NV], sdyxc[NV];
    for (int j = 0; j < NV; ++j) sdy[j] = sdyxc[j] = V(0);
    for (int64_t r = rs; r < std::min(r1, rs + chunk_rows); ++r) {
      const int64_t off = r * C + c0;
      for (int j = 0; j < NV; ++j) {
        const V d = block_load<T, NV>(dyn + off + j * kW, j, tail);
        sdy[j] += d;  // padding lanes: dy = 0, x - mu = 0 - 0
        sdyxc[j] = at::vec::fmadd(d, block_load<T, NV>(xn + off + j * kW, j, tail) - mv[j], sdyxc[j]);
      }
    }
    alignas(64) A lanes[2][kW];
    for (int j = 0; j < NV; ++j) {
      sdy[j].store(lanes[0]);
      sdyxc[j].store(lanes[1]);
      for (int64_t l = 0; l < kW; ++l) {
        tdy[j * kW + l] += static_cast<double>(lanes[0][l]);
        tdyxc[j * kW + l] += static_cast<double>(lanes[1][l]);
      }
    }
  }
  const int64_t nch = (NV - 1) * kW + tail;
  std::copy(tdy, tdy + nch, sdy_out);
  std::copy(tdyxc, tdyxc + nch, sdyxc_out);
}

/// Calls f(std::integral_constant<int, NV>) for the block's vector count (1..kBlockVecs), so
/// the per-vector accumulator arrays have a compile-time size and live in registers.
template <typename F>
void with_block_vecs(int64_t nv, F&& f) {
  static_assert(config::kBlockVecs == 4, "update the switch below");
  switch (nv) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

/// Runs body(n, seg, block, r0, r1, c0, nv, tail) over every channels_last task in parallel.
template <typename T, typename Body>
void cl_for_each_task(const Geometry& g, const ClPlan& p, Body&& body) {
  const int64_t tasks = g.n * p.segs * p.nblocks;
  const int64_t per_task = p.seg_rows * std::min(p.block_ch, g.c);
  const int64_t grain = std::max<int64_t>(1, config::kMinTaskElems / per_task);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t % p.nblocks, s = (t / p.nblocks) % p.segs, n = t / (p.nblocks * p.segs);
      const int64_t r0 = s * p.seg_rows, r1 = std::min(g.m, r0 + p.seg_rows);
      const int64_t c0 = b * p.block_ch, cb = std::min(p.block_ch, g.c - c0);
      const int64_t nv = (cb + Io<T>::kW - 1) / Io<T>::kW;
      body(n, s, r0, r1, c0, nv, cb - (nv - 1) * Io<T>::kW);
    }
  });
}

// ------------------------------------------------------------------ pass 1: moments
template <typename T>
void moments_impl(const Geometry& g, const T* x, typename Io<T>::A* mean, typename Io<T>::A* m2) {
  using A = typename Io<T>::A;
  if (!g.channels_last) {
    const int64_t grain = std::max<int64_t>(1, config::kMinTaskElems / g.m);
    at::parallel_for(0, g.n * g.c, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) plane_moments(x + i * g.m, g.m, mean[i], m2[i]);
    });
    return;
  }
  const ClPlan p = cl_plan<T>(g);
  std::vector<A> pmean(g.n * p.segs * g.c), pm2(pmean.size());
  cl_for_each_task<T>(g, p, [&](int64_t n, int64_t s, int64_t r0, int64_t r1, int64_t c0,
                                int64_t nv, int64_t tail) {
    const int64_t out = (n * p.segs + s) * g.c + c0;
    with_block_vecs(nv, [&](auto nv_c) {
      constexpr int NV = decltype(nv_c)::value;
      cl_block_moments<T, NV>(x + n * g.m * g.c, g.c, r0, r1, c0, tail, &pmean[out], &pm2[out]);
    });
  });
  // Merge the segments of each (n, c) in segment order (deterministic), as deviations from
  // the first segment's mean (differences of nearby values are exact; one rounding at the end).
  at::parallel_for(0, g.n * g.c, config::kMinTaskElems, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / g.c, c = i % g.c;
      const A base = sum_shift(pmean[n * p.segs * g.c + c]);
      int64_t count = 0;
      double mu = 0, ss = 0;
      for (int64_t s = 0; s < p.segs; ++s) {
        const int64_t rows = std::min(p.seg_rows, g.m - s * p.seg_rows);
        const int64_t k = (n * p.segs + s) * g.c + c;
        chan_merge(count, mu, ss, rows, static_cast<double>(pmean[k] - base),
                           static_cast<double>(pm2[k]));
      }
      mean[i] = static_cast<A>(static_cast<double>(base) + mu);
      m2[i] = static_cast<A>(ss);
    }
  });
}

// ------------------------------------------------------------------ pass 2: y = (x - m)*scale + shift
// (SPEC D3 applied per element; center, scale, shift come from dabn_cpu.cpp's Coefficients)
// Note: vector code lives in named functions, never directly in the at::parallel_for lambdas:
// GCC does not give lambdas the target of a `#pragma GCC target` region, so Vectorized code in
// a lambda body would compile at the baseline ISA (with out-of-line AVX calls).

/// NCHW planes [begin, end): per plane one (center, scale, shift) broadcast.
template <typename T>
void affine_planes(int64_t begin, int64_t end, int64_t m, const T* x, const typename Io<T>::A* center,
                   const typename Io<T>::A* scale, const typename Io<T>::A* shift, T* y) {
  using IO = Io<T>;
  using V = typename IO::V;
  constexpr int64_t kW = IO::kW;
  for (int64_t i = begin; i < end; ++i) {
    const T* xp = x + i * m;
    T* yp = y + i * m;
    const V mv(center[i]), a(scale[i]), b(shift[i]);
    int64_t j = 0;
    for (; j + 2 * kW <= m; j += 2 * kW) {
      IO::store(yp + j, at::vec::fmadd(IO::load(xp + j) - mv, a, b));
      IO::store(yp + j + kW, at::vec::fmadd(IO::load(xp + j + kW) - mv, a, b));
    }
    for (; j < m; j += kW) {
      const int64_t n = std::min(kW, m - j);
      IO::store(yp + j, at::vec::fmadd(IO::load(xp + j, n) - mv, a, b), n);
    }
  }
}

/// channels_last pixel rows [begin, end) of all samples: coefficients vary along the row.
template <typename T>
void affine_rows(int64_t begin, int64_t end, const Geometry& g, const T* x,
                 const typename Io<T>::A* center, const typename Io<T>::A* scale,
                 const typename Io<T>::A* shift, T* y) {
  using IO = Io<T>;
  using V = typename IO::V;
  constexpr int64_t kW = IO::kW;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t nc = (r / g.m) * g.c;
    const T* xp = x + r * g.c;
    T* yp = y + r * g.c;
    int64_t c = 0;
    for (; c + kW <= g.c; c += kW) {
      const V mv = V::loadu(center + nc + c), a = V::loadu(scale + nc + c), b = V::loadu(shift + nc + c);
      IO::store(yp + c, at::vec::fmadd(IO::load(xp + c) - mv, a, b));
    }
    if (c < g.c) {
      const int64_t k = g.c - c, o = nc + c;
      const V mv = V::loadu(center + o, k), a = V::loadu(scale + o, k), b = V::loadu(shift + o, k);
      IO::store(yp + c, at::vec::fmadd(IO::load(xp + c, k) - mv, a, b), k);
    }
  }
}

template <typename T>
void affine_impl(const Geometry& g, const T* x, const typename Io<T>::A* center,
                 const typename Io<T>::A* scale, const typename Io<T>::A* shift, T* y) {
  if (!g.channels_last) {
    const int64_t grain = std::max<int64_t>(1, config::kMinTaskElems / g.m);
    at::parallel_for(0, g.n * g.c, grain, [&](int64_t begin, int64_t end) {
      affine_planes<T>(begin, end, g.m, x, center, scale, shift, y);
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, config::kMinTaskElems / g.c);
  at::parallel_for(0, g.n * g.m, grain, [&](int64_t begin, int64_t end) {
    affine_rows<T>(begin, end, g, x, center, scale, shift, y);
  });
}

// ------------------------------------------------------------------ backward
template <typename T>
void backward_reduce_impl(const Geometry& g, const T* dy, const T* x, const typename Io<T>::A* mu,
                          typename Io<T>::A* sdy, typename Io<T>::A* sdyxc) {
  using A = typename Io<T>::A;
  if (!g.channels_last) {
    const int64_t grain = std::max<int64_t>(1, config::kMinTaskElems / g.m);
    at::parallel_for(0, g.n * g.c, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double a, b;
        plane_dy_sums(dy + i * g.m, x + i * g.m, g.m, mu[i], a, b);
        sdy[i] = static_cast<A>(a);
        sdyxc[i] = static_cast<A>(b);
      }
    });
    return;
  }
  const ClPlan p = cl_plan<T>(g);
  std::vector<double> psdy(g.n * p.segs * g.c), psdyxc(psdy.size());
  cl_for_each_task<T>(g, p, [&](int64_t n, int64_t s, int64_t r0, int64_t r1, int64_t c0,
                                int64_t nv, int64_t tail) {
    const int64_t out = (n * p.segs + s) * g.c + c0;
    const int64_t off = n * g.m * g.c;
    with_block_vecs(nv, [&](auto nv_c) {
      constexpr int NV = decltype(nv_c)::value;
      cl_block_dy_sums<T, NV>(dy + off, x + off, mu + n * g.c, g.c, r0, r1, c0, tail,
                              &psdy[out], &psdyxc[out]);
    });
  });
  for (int64_t i = 0; i < g.n * g.c; ++i) {  // fixed segment order: deterministic
    const int64_t n = i / g.c, c = i % g.c;
    double a = 0, b = 0;
    for (int64_t s = 0; s < p.segs; ++s) {
      a += psdy[(n * p.segs + s) * g.c + c];
      b += psdyxc[(n * p.segs + s) * g.c + c];
    }
    sdy[i] = static_cast<A>(a);
    sdyxc[i] = static_cast<A>(b);
  }
}

/// SPEC D5 pass 2: dx = a*dy + b*(x - mu) + c0 over one NCHW plane.  x is centred first:
/// b*x - b*mu would cancel for large x.  kWithX = false (b == 0) drops the b term and never
/// reads x: a plane with an inf/NaN pixel (so mu = inf/NaN) must not turn dx into 0 * inf = NaN.
template <typename T, bool kWithX>
void apply_plane(int64_t m, const T* dy, const T* x, typename Io<T>::A mu, typename Io<T>::A ca,
                 typename Io<T>::A cb, typename Io<T>::A cc, T* dx) {
  using IO = Io<T>;
  using V = typename IO::V;
  constexpr int64_t kW = IO::kW;
  const V a(ca), b(cb), c(cc), mv(mu);
  int64_t j = 0;
  for (; j + kW <= m; j += kW) {
    const V rest = kWithX ? at::vec::fmadd(b, IO::load(x + j) - mv, c) : c;
    IO::store(dx + j, at::vec::fmadd(a, IO::load(dy + j), rest));
  }
  if (j < m) {
    const int64_t n = m - j;
    const V rest = kWithX ? at::vec::fmadd(b, IO::load(x + j, n) - mv, c) : c;
    IO::store(dx + j, at::vec::fmadd(a, IO::load(dy + j, n), rest), n);
  }
}

/// NCHW planes [begin, end).
template <typename T>
void apply_planes(int64_t begin, int64_t end, int64_t m, const T* dy, const T* x,
                  const typename Io<T>::A* mu, const typename Io<T>::A* ca,
                  const typename Io<T>::A* cb, const typename Io<T>::A* cc, T* dx) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t o = i * m;
    if (cb[i] != 0) {
      apply_plane<T, true>(m, dy + o, x + o, mu[i], ca[i], cb[i], cc[i], dx + o);
    } else {
      apply_plane<T, false>(m, dy + o, x + o, mu[i], ca[i], cb[i], cc[i], dx + o);
    }
  }
}

/// The same over channels_last pixel rows [begin, end).
template <typename T>
void apply_rows(int64_t begin, int64_t end, const Geometry& g, const T* dy, const T* x,
                const typename Io<T>::A* mu, const typename Io<T>::A* ca,
                const typename Io<T>::A* cb, const typename Io<T>::A* cc, T* dx) {
  using IO = Io<T>;
  using V = typename IO::V;
  constexpr int64_t kW = IO::kW;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t nc = (r / g.m) * g.c, o = r * g.c;
    for (int64_t c = 0; c < g.c; c += kW) {
      const int64_t k = std::min(kW, g.c - c);
      const V a = V::loadu(ca + nc + c, k), b = V::loadu(cb + nc + c, k);
      const V cv = V::loadu(cc + nc + c, k), mv = V::loadu(mu + nc + c, k);
      // x - mu only where b != 0 (as apply_planes: no 0 * inf from an unused inf/NaN)
      const V xc = V::blendv(IO::load(x + o + c, k) - mv, V(0), b == V(0));
      IO::store(dx + o + c, at::vec::fmadd(a, IO::load(dy + o + c, k), at::vec::fmadd(b, xc, cv)), k);
    }
  }
}

template <typename T>
void backward_apply_impl(const Geometry& g, const T* dy, const T* x, const typename Io<T>::A* mu,
                         const typename Io<T>::A* ca, const typename Io<T>::A* cb,
                         const typename Io<T>::A* cc, T* dx) {
  if (!g.channels_last) {
    const int64_t grain = std::max<int64_t>(1, config::kMinTaskElems / g.m);
    at::parallel_for(0, g.n * g.c, grain, [&](int64_t begin, int64_t end) {
      apply_planes<T>(begin, end, g.m, dy, x, mu, ca, cb, cc, dx);
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, config::kMinTaskElems / g.c);
  at::parallel_for(0, g.n * g.m, grain, [&](int64_t begin, int64_t end) {
    apply_rows<T>(begin, end, g, dy, x, mu, ca, cb, cc, dx);
  });
}

// ------------------------------------------------------------------ diversity angles
/// cos = <a, b> / (max(|a|, floor) max(|b|, floor)) lane-wise.
template <typename V>
inline V cosine(const V& dot, const V& na2, const V& nb2) {
  const V lo(static_cast<typename V::value_type>(config::kNormFloor));
  return dot / (at::vec::maximum(na2.sqrt(), lo) * at::vec::maximum(nb2.sqrt(), lo));
}

/// sum of cos[n, p] over pixel block `blk` (kAngleBlockVecs * kW pixels) of sample n.
template <typename T>
typename Io<T>::A angle_block_sum(const Geometry& g, const T* x, const typename Io<T>::A* sm,
                                  const typename Io<T>::A* bm, int64_t n, int64_t blk) {
  using IO = Io<T>;
  using A = typename IO::A;
  using V = typename IO::V;
  constexpr int64_t kW = IO::kW;
  constexpr int kNV = config::kAngleBlockVecs;
  constexpr int64_t kPB = kNV * kW;
  const int64_t p0 = blk * kPB, np = std::min(kPB, g.m - p0);
  const T* xn = x + n * g.c * g.m;
  if (!g.channels_last) {  // vectorise along pixels, walk the channel planes
    V dot[kNV], na[kNV], nb[kNV];
    for (int j = 0; j < kNV; ++j) dot[j] = na[j] = nb[j] = V(0);
    for (int64_t c = 0; c < g.c; ++c) {
      const V s(sm[c]), b(bm[c]);
      const T* row = xn + c * g.m + p0;
      for (int j = 0; j < kNV; ++j) {
        const int64_t k = std::clamp<int64_t>(np - j * kW, 0, kW);
        const V xv = k == kW ? IO::load(row + j * kW) : IO::load(row + j * kW, k);
        const V av = s - xv, bv = b - xv;
        dot[j] = at::vec::fmadd(av, bv, dot[j]);
        na[j] = at::vec::fmadd(av, av, na[j]);
        nb[j] = at::vec::fmadd(bv, bv, nb[j]);
      }
    }
    V total(0);
    for (int j = 0; j < kNV; ++j) {
      const int64_t k = std::clamp<int64_t>(np - j * kW, 0, kW);
      total += V::set(V(0), cosine(dot[j], na[j], nb[j]), k);  // drop padding pixels
    }
    return hsum(total);
  }
  A sum = 0;  // channels_last: vectorise along channels, one pixel at a time
  const A lo = static_cast<A>(config::kNormFloor);
  for (int64_t p = p0; p < p0 + np; ++p) {
    const T* row = xn + p * g.c;
    V dot(0), na(0), nb(0);
    for (int64_t c = 0; c < g.c; c += kW) {
      const int64_t k = std::min(kW, g.c - c);
      const V xv = IO::load(row + c, k);
      const V av = V::set(V(0), V::loadu(sm + c, k) - xv, k);
      const V bv = V::set(V(0), V::loadu(bm + c, k) - xv, k);
      dot = at::vec::fmadd(av, bv, dot);
      na = at::vec::fmadd(av, av, na);
      nb = at::vec::fmadd(bv, bv, nb);
    }
    sum += hsum(dot) / (std::max(std::sqrt(hsum(na)), lo) * std::max(std::sqrt(hsum(nb)), lo));
  }
  return sum;
}

/// theta[n] = arccos(clamp(mean_p cos[n, p], -1, 1)), a = mu_s - x[n,:,p], b = mu_B - x[n,:,p]
/// (direct differences).  Per-block partial sums of cos (kAngleBlockVecs vectors of pixels,
/// in A) are added in block order in double, and the mean and arccos are taken in double: a
/// float total of 2^31 cosines of 1 stops at 2^30 (mean 0.5, theta = pi/3 instead of 0), and
/// near theta = 0 arccos turns a rounding of the mean into sqrt(2 * rounding).
template <typename T>
void angles_impl(const Geometry& g, const T* x, const typename Io<T>::A* sm,
                 const typename Io<T>::A* bm, typename Io<T>::A* theta) {
  using A = typename Io<T>::A;
  constexpr int64_t kPB = config::kAngleBlockVecs * Io<T>::kW;
  const int64_t blocks = (g.m + kPB - 1) / kPB;
  std::vector<A> part(g.n * blocks);
  const int64_t grain = std::max<int64_t>(1, config::kMinTaskElems / (kPB * g.c));
  at::parallel_for(0, g.n * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) part[t] = angle_block_sum<T>(g, x, sm, bm, t / blocks, t % blocks);
  });
  for (int64_t n = 0; n < g.n; ++n) {
    double s = 0;
    for (int64_t b = 0; b < blocks; ++b) s += static_cast<double>(part[n * blocks + b]);
    const double mean_cos = s / static_cast<double>(g.m);
    // clamp written out so a NaN mean stays NaN (std::clamp would also keep it; be explicit)
    theta[n] = static_cast<A>(std::acos(mean_cos < -1.0 ? -1.0 : (mean_cos > 1.0 ? 1.0 : mean_cos)));
  }
}

// ------------------------------------------------------------------ type-erased entry points
#define DATTA_DTYPE_SWITCH(dtype, ...)                       \
  switch (dtype) {                                           \
    case DType::kFloat64: { using T = double; __VA_ARGS__; break; }    \
    case DType::kFloat32: { using T = float; __VA_ARGS__; break; }     \
    case DType::kFloat16: { using T = c10::Half; __VA_ARGS__; break; } \
    case DType::kBFloat16: { using T = c10::BFloat16; __VA_ARGS__; break; } \
  }

template <typename T>
using AccPtr = typename Io<T>::A*;
template <typename T>
using CAccPtr = const typename Io<T>::A*;

void moments_entry(DType d, Geometry g, const void* x, void* mean, void* m2) {
  DATTA_DTYPE_SWITCH(d, moments_impl<T>(g, static_cast<const T*>(x), static_cast<AccPtr<T>>(mean),
                                        static_cast<AccPtr<T>>(m2)))
}

void affine_entry(DType d, Geometry g, const void* x, const void* center, const void* scale,
                  const void* shift, void* y) {
  DATTA_DTYPE_SWITCH(d, affine_impl<T>(g, static_cast<const T*>(x), static_cast<CAccPtr<T>>(center),
                                       static_cast<CAccPtr<T>>(scale), static_cast<CAccPtr<T>>(shift),
                                       static_cast<T*>(y)))
}

void backward_reduce_entry(DType d, Geometry g, const void* dy, const void* x, const void* mu,
                           void* sdy, void* sdyxc) {
  DATTA_DTYPE_SWITCH(d, backward_reduce_impl<T>(g, static_cast<const T*>(dy), static_cast<const T*>(x),
                                                static_cast<CAccPtr<T>>(mu), static_cast<AccPtr<T>>(sdy),
                                                static_cast<AccPtr<T>>(sdyxc)))
}

void backward_apply_entry(DType d, Geometry g, const void* dy, const void* x, const void* mu,
                          const void* a, const void* b, const void* c0, void* dx) {
  DATTA_DTYPE_SWITCH(d, backward_apply_impl<T>(g, static_cast<const T*>(dy), static_cast<const T*>(x),
                                               static_cast<CAccPtr<T>>(mu), static_cast<CAccPtr<T>>(a),
                                               static_cast<CAccPtr<T>>(b), static_cast<CAccPtr<T>>(c0),
                                               static_cast<T*>(dx)))
}

void angles_entry(DType d, Geometry g, const void* x, const void* sm, const void* bm, void* theta) {
  DATTA_DTYPE_SWITCH(d, angles_impl<T>(g, static_cast<const T*>(x), static_cast<CAccPtr<T>>(sm),
                                       static_cast<CAccPtr<T>>(bm), static_cast<AccPtr<T>>(theta)))
}

#undef DATTA_DTYPE_SWITCH

/// The table of this translation unit's instruction set (name given by the including file).
KernelTable make_kernel_table(const char* isa) {
  return KernelTable{isa,
                     static_cast<int>(Vectorized<float>::size()),
                     static_cast<int>(Vectorized<double>::size()),
                     &moments_entry,
                     &affine_entry,
                     &backward_reduce_entry,
                     &backward_apply_entry,
                     &angles_entry};
}

}  // namespace
}  // namespace datta::cpu

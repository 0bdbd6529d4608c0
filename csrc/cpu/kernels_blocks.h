// Building blocks of the fused DABN kernels (kernels_impl.h): vector loads and stores per
// dtype, the fixed-order lane sum, Chan's merge, and the per-plane (NCHW) and per-channel-block
// (channels_last) sums that the passes are made of.
//
// Included by kernels_impl.h only, inside one instruction-set build (see there): everything
// has internal linkage.
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


}  // namespace
}  // namespace datta::cpu

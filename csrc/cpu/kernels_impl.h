// The fused DABN kernels, written once for every dtype and every instruction set: the passes
// over x and dy (moments, normalisation, the backward's sums and apply, diversity angles) and
// the type-erased entry points of kernels.h, built from kernels_blocks.h.
//
// Compiled by kernels_default.cpp, kernels_avx2.cpp and kernels_avx512.cpp, each after it has
// chosen CPU_CAPABILITY (which names at::vec's inline namespace and picks the Vectorized<>
// specialisations).  Everything below has internal linkage, so the copies never collide.
#pragma once

#include "kernels_blocks.h"

namespace datta::cpu {
namespace {

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

// CPU glue of the datta:: kernel ops: input checks, output allocation, the tiny per-(n, c)
// prologue / coefficient math (SPEC §1 and §3, in double: the labels D1-D5 of docs/SPEC.md are
// cited where each is implemented), and the registration.
//
// The heavy passes over x and dy are the vectorised kernels of kernels_impl.h, reached through
// the run-time-dispatched table of kernels.h.  Data movement of one call:
//   _instance_stats   1 read of x
//   _dabn_forward     2 reads of x (moments, normalize) + 1 write of y; without batch
//                     statistics (w_b = 0, NCHW) 1 read from memory, the 2nd from cache
//   _dabn_normalize   1 read of x + 1 write of y (instance statistics given)
//   _dabn_backward    2 reads of x and dy (sums, apply) + 1 write of dx
//   _dabn_backward_sums / _dabn_backward_apply   its two passes alone (coefficients given)
//   _diversity_angles 1 read of x
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/dabn_math.h"
#include "cpu/kernels.h"
#include "cpu/launch_config.h"
#include "cpu/score_rule.h"
#include "ops.h"

namespace datta::cpu {
namespace {

using at::Tensor;

DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kDouble: return DType::kFloat64;
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    default: return DType::kBFloat16;  // the input checks (ops.h) admit only these four
  }
}

/// float64 stays float64 (gradcheck), everything else accumulates in float32.
at::ScalarType acc_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Geometry geometry_of(const Tensor& x) {
  return Geometry{x.size(0), x.size(1), x.size(2) * x.size(3), is_channels_last(x)};
}

/// An uninitialised tensor shaped like x, in x's memory layout.  Large outputs are faulted in
/// in 4 KiB pages unless PyTorch's CPU allocator is asked for transparent huge pages
/// (THP_MEM_ALLOC_ENABLE=1, docs/DESIGN.md).
Tensor empty_like_layout(const Tensor& x) {
  const at::MemoryFormat fmt =
      is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return at::empty(x.sizes(), x.options().memory_format(fmt));
}

/// A small CPU tensor as host doubles (read in place: no conversion tensor is allocated); an
/// absent optional gives `fill` repeated `len` times.
std::vector<double> host_doubles(const Tensor* t, int64_t len, double fill) {
  if (t == nullptr || !t->defined()) return std::vector<double>(len, fill);
  const Tensor c = t->contiguous();
  std::vector<double> out(c.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "host_doubles", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(p[i]);
  });
  return out;
}

/// A host vector of doubles as an acc-typed tensor the kernels can read.
Tensor to_acc(const std::vector<double>& v, at::IntArrayRef shape, at::ScalarType acc) {
  return at::tensor(v, at::TensorOptions().dtype(at::kDouble)).reshape(shape).to(acc);
}

// SPEC D3's weighted term, shared with CUDA (common/dabn_math.h).
using math::weighted;

/// SPEC §3 per-(n, c) math: batch statistics from instance statistics (exact, §1), the edge
/// rules, the optional NOTE shrink and the blended moments m, v.  Shared by forward and
/// backward so the two can never disagree.
struct Blend {
  int64_t n, c, m;
  double ws, wb, wi, eps;
  std::optional<double> k;
  std::vector<double> smean, svar, lam_mu, lam_var;  // lam: softshrink thresholds per channel
  std::vector<double> mu_i, var_i, mu_b, var_b;      // filled by set_stats

  struct At {
    double m, v;              // blended mean, variance
    double keep_mu, keep_var;  // d(shrunk)/d(raw): 1 outside the softshrink dead zone, else 0
  };

  /// Weights (after the edge rules) and source terms; the batch terms are 0 until set_stats.
  Blend(const Geometry& g, const Tensor& blend, const Tensor& source_mean,
        const Tensor& source_var, std::optional<double> shrink_k, double eps_)
      : n(g.n), c(g.c), m(g.m), eps(eps_), k(shrink_k) {
    const std::vector<double> w = host_doubles(&blend, 3, 0.0);
    ws = w[0], wb = w[1], wi = w[2];
    math::edge_rules(ws, wb, wi, n, m);  // SPEC D1 (common/dabn_math.h)
    smean = host_doubles(&source_mean, c, 0.0);
    svar = host_doubles(&source_var, c, 0.0);
    mu_b.assign(c, 0.0);
    var_b.assign(c, 0.0);
    if (k.has_value() && m > 1) {
      lam_mu.resize(c);
      lam_var.resize(c);
      for (int64_t ci = 0; ci < c; ++ci) {
        // SPEC D2: s_mu = sqrt((var_s + eps) / M),  s_sig = (var_s + eps) sqrt(2 / (M - 1))
        const double sv = svar[ci] + eps;
        lam_mu[ci] = *k * std::sqrt(sv / static_cast<double>(m));
        lam_var[ci] = *k * sv * std::sqrt(2.0 / static_cast<double>(m - 1));
      }
    }
  }

  Blend(const Geometry& g, const Tensor& blend, const Tensor& source_mean,
        const Tensor& source_var, std::optional<double> shrink_k, double eps_,
        const Tensor& mean_i, const Tensor& var_i_t)
      : Blend(g, blend, source_mean, source_var, shrink_k, eps_) {
    set_stats(mean_i, var_i_t);
  }

  /// The instance statistics, and the batch statistics that follow from them.
  void set_stats(const Tensor& mean_i, const Tensor& var_i_t) {
    mu_i = host_doubles(&mean_i, n * c, 0.0);
    var_i = host_doubles(&var_i_t, n * c, 0.0);
    // SPEC D4: mu_B = mean_n mu_i;  (N M - 1) var_B = sum_n [(M - 1) var_i + M (mu_i - mu_B)^2]
    for (int64_t ci = 0; ci < c; ++ci) {
      double s = 0.0;
      for (int64_t ni = 0; ni < n; ++ni) s += mu_i[ni * c + ci];
      mu_b[ci] = s / static_cast<double>(n);
      if (n * m <= 1) continue;
      double ss = 0.0;
      for (int64_t ni = 0; ni < n; ++ni) {
        ss += math::batch_ss_term(mu_i[ni * c + ci], var_i[ni * c + ci], mu_b[ci], m);
      }
      var_b[ci] = math::batch_var(ss, n, m);
    }
  }

  /// SPEC D3: m, v of channel ci with the instance terms mt, vt (raw or shrunk) added to the
  /// n-independent source + batch part; terms of weight 0 are not read (weighted()).
  At combine(int64_t ci, double mt, double vt, double keep_mu, double keep_var) const {
    return At{math::blend3(ws, smean[ci], wb, mu_b[ci], wi, mt),
              math::blend3(ws, svar[ci], wb, var_b[ci], wi, vt), keep_mu, keep_var};
  }

  /// m, v of channel ci for the raw instance statistics mt, vt (shrunk here if k is set: SPEC
  /// D2, and its pass-through masks for D5).
  At at_stats(int64_t ci, double mt, double vt) const {
    double keep_mu = 1.0, keep_var = 1.0;
    if (!lam_mu.empty()) {
      const double zm = mt - smean[ci], zv = vt - svar[ci];
      keep_mu = std::abs(zm) > lam_mu[ci] ? 1.0 : 0.0;
      keep_var = std::abs(zv) > lam_var[ci] ? 1.0 : 0.0;
      mt = smean[ci] + math::softshrink(zm, lam_mu[ci]);
      vt = svar[ci] + math::softshrink(zv, lam_var[ci]);
    }
    return combine(ci, mt, vt, keep_mu, keep_var);
  }

  At at(int64_t ni, int64_t ci) const {
    return at_stats(ci, mu_i[ni * c + ci], var_i[ni * c + ci]);
  }
};

/// SPEC D3: r = rsqrt(max(v, 0) + eps); std::max keeps a NaN v as NaN (it returns its first
/// argument).
double rstd(double v, double eps) { return 1.0 / std::sqrt(std::max(v, 0.0) + eps); }

/// M2 -> unbiased variance in place; 0 when M == 1 (SPEC D4; D1 then moves the instance
/// weight to the source).
template <typename A>
void m2_to_var(A* var, int64_t len, int64_t m) {
  const A d = static_cast<A>(m - 1);
  for (int64_t i = 0; i < len; ++i) var[i] = m > 1 ? var[i] / d : A(0);
}

/// Pass 1 for one x: instance mean and unbiased variance (N, C) in the acc dtype.
std::tuple<Tensor, Tensor> moments(const Tensor& x) {
  const Geometry g = geometry_of(x);
  const auto opts = x.options().dtype(acc_type(x));
  Tensor mean = at::empty({g.n, g.c}, opts), var = at::empty({g.n, g.c}, opts);
  kernels().moments(dtype_of(x), g, x.const_data_ptr(), mean.mutable_data_ptr(),
                    var.mutable_data_ptr());
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "m2_to_var", [&] {
    m2_to_var(var.mutable_data_ptr<scalar_t>(), g.n * g.c, g.m);
  });
  return {mean, var};
}

std::tuple<Tensor, Tensor> instance_stats_cpu(const Tensor& x) {
  check_instance_stats(x);
  return moments(x);
}

Tensor diversity_angles_cpu(const Tensor& x, const Tensor& source_mean, const Tensor& batch_mean) {
  check_diversity_angles(x, source_mean, batch_mean);
  const Geometry g = geometry_of(x);
  const at::ScalarType acc = acc_type(x);
  // SPEC §2: a and b are direct differences in the acc dtype, so the means are rounded to it.
  const Tensor sm = source_mean.detach().to(acc).contiguous();
  const Tensor bm = batch_mean.detach().to(acc).contiguous();
  Tensor theta = at::empty({g.n}, x.options().dtype(acc));
  kernels().angles(dtype_of(x), g, x.const_data_ptr(), sm.const_data_ptr(), bm.const_data_ptr(),
                   theta.mutable_data_ptr());
  return theta;
}

/// SPEC D3, pass-2 coefficients, y = (x - center) * scale + shift per (n, c): center = m,
/// scale = gamma rsqrt(max(v, 0) + eps), shift = beta.  x is centred before scaling (not
/// x*scale + (beta - m*scale)): for x ~ 1e4 + noise the product form cancels two ~1e4*scale
/// terms and loses ~1e-3 absolute in float32.
struct Coefficients {
  const Blend& b;
  const std::vector<double>& gamma;
  const std::vector<double>& beta;
  // Without an instance term (w_i = 0) m and v depend on c only: C rsqrts, not N*C.
  std::vector<double> per_c_m, per_c_scale;
  // With one: the source + batch part of m and v per channel (D3's first two terms), so a
  // plane adds only w_i times its (shrunk) statistics: the same sums in the same order as
  // at_stats(), bit for bit, in a loop without per-element calls.
  std::vector<double> base_m, base_v;

  Coefficients(const Blend& b_, const std::vector<double>& gamma_, const std::vector<double>& beta_)
      : b(b_), gamma(gamma_), beta(beta_) {
    if (b.wi != 0.0) {
      base_m.resize(b.c);
      base_v.resize(b.c);
      for (int64_t ci = 0; ci < b.c; ++ci) {
        base_m[ci] = weighted(b.ws, b.smean[ci]) + weighted(b.wb, b.mu_b[ci]);
        base_v[ci] = weighted(b.ws, b.svar[ci]) + weighted(b.wb, b.var_b[ci]);
      }
      return;
    }
    per_c_m.resize(b.c);
    per_c_scale.resize(b.c);
    for (int64_t ci = 0; ci < b.c; ++ci) {
      const Blend::At a = b.combine(ci, 0.0, 0.0, 1.0, 1.0);
      per_c_m[ci] = a.m;
      per_c_scale[ci] = gamma[ci] * rstd(a.v, b.eps);
    }
  }

  /// Planes i = n*C + c in [i0, i1) -> center, scale, shift [0, i1 - i0).  With w_i = 0 the
  /// instance statistics are not read (an inf/NaN one must not reach m and v).
  template <typename A>
  void fill(int64_t i0, int64_t i1, const A* mean_i, const A* var_i, A* center, A* scale,
            A* shift) const {
    if (!base_m.empty()) {
      fill_instance(i0, i1, mean_i, var_i, center, scale, shift);
      return;
    }
    for (int64_t i = i0, ci = i0 % b.c; i < i1; ++i, ci = ci + 1 == b.c ? 0 : ci + 1) {
      const int64_t j = i - i0;
      const double mt = static_cast<double>(mean_i[i]), vt = static_cast<double>(var_i[i]);
      if (!per_c_m.empty()) {
        center[j] = static_cast<A>(per_c_m[ci]);
        scale[j] = static_cast<A>(per_c_scale[ci]);
      } else {
        const Blend::At a = b.at_stats(ci, mt, vt);
        center[j] = static_cast<A>(a.m);
        scale[j] = static_cast<A>(gamma[ci] * rstd(a.v, b.eps));
      }
      shift[j] = static_cast<A>(beta[ci]);
    }
  }

  /// fill() with an instance term: runs of planes within one sample, each a contiguous
  /// stretch of channels (SPEC D2's shrink of the instance statistics when k is set).
  template <typename A>
  void fill_instance(int64_t i0, int64_t i1, const A* mean_i, const A* var_i, A* center,
                     A* scale, A* shift) const {
    if (b.lam_mu.empty()) {
      fill_instance_runs<A, false>(i0, i1, mean_i, var_i, center, scale, shift);
    } else {
      fill_instance_runs<A, true>(i0, i1, mean_i, var_i, center, scale, shift);
    }
  }

  template <typename A, bool kShrink>
  void fill_instance_runs(int64_t i0, int64_t i1, const A* mean_i, const A* var_i, A* center,
                          A* scale, A* shift) const {
    const double wi = b.wi, eps = b.eps;
    for (int64_t i = i0; i < i1;) {
      const int64_t c0 = i % b.c, len = std::min(b.c - c0, i1 - i);
      const A* mt = mean_i + i;
      const A* vt = var_i + i;
      A* ce = center + (i - i0);
      A* sc = scale + (i - i0);
      A* sh = shift + (i - i0);
      const double* bm = base_m.data() + c0;
      const double* bv = base_v.data() + c0;
      const double* ga = gamma.data() + c0;
      const double* be = beta.data() + c0;
      for (int64_t j = 0; j < len; ++j) {
        double mi = static_cast<double>(mt[j]), vi = static_cast<double>(vt[j]);
        if constexpr (kShrink) {  // as at_stats(): s + softshrink(stat - s, k s_stat)
          const int64_t ci = c0 + j;
          mi = b.smean[ci] + math::softshrink(mi - b.smean[ci], b.lam_mu[ci]);
          vi = b.svar[ci] + math::softshrink(vi - b.svar[ci], b.lam_var[ci]);
        }
        const double v = bv[j] + wi * vi;
        ce[j] = static_cast<A>(bm[j] + wi * mi);
        // rstd(): max(v, 0) keeping a NaN v (the comparison is false for NaN)
        sc[j] = static_cast<A>(ga[j] * (1.0 / std::sqrt((v < 0.0 ? 0.0 : v) + eps)));
        sh[j] = static_cast<A>(be[j]);
      }
      i += len;
    }
  }
};

/// y for all of x from the instance statistics (pass 2 of the two-pass forward).
void normalize(const Tensor& x, const Geometry& g, const Coefficients& coef, const Tensor& mean_i,
               const Tensor& var_i, Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES(mean_i.scalar_type(), "dabn_normalize", [&] {
    const int64_t nc = g.n * g.c;
    std::vector<scalar_t> k(3 * nc);  // center, scale, shift
    coef.fill<scalar_t>(0, nc, mean_i.const_data_ptr<scalar_t>(), var_i.const_data_ptr<scalar_t>(),
                        k.data(), k.data() + nc, k.data() + 2 * nc);
    kernels().affine(dtype_of(x), g, x.const_data_ptr(), k.data(), k.data() + nc,
                     k.data() + 2 * nc, y.mutable_data_ptr());
  });
}

/// y of x normalised with `blend`, given x's instance statistics (acc dtype, contiguous (N, C)):
/// the second pass of _dabn_normalize and of the fused score layer.
Tensor normalized(const Tensor& x, const Geometry& g, const c10::optional<Tensor>& weight,
                  const c10::optional<Tensor>& bias, const Tensor& source_mean,
                  const Tensor& source_var, const Tensor& blend, c10::optional<double> shrink_k,
                  double eps, const Tensor& mean_i, const Tensor& var_i) {
  const Blend b(g, blend, source_mean, source_var, shrink_k, eps, mean_i, var_i);
  const std::vector<double> gamma = host_doubles(opt(weight), g.c, 1.0);
  const std::vector<double> beta = host_doubles(opt(bias), g.c, 0.0);
  Tensor y = empty_like_layout(x);
  normalize(x, g, Coefficients(b, gamma, beta), mean_i, var_i, y);
  return y;
}

/// The forward without batch statistics (w_b = 0) on NCHW: a plane's m and v need only its
/// own statistics, so each block of planes is normalised right after its moments, while it is
/// still in cache: x is read from memory once instead of twice.
void forward_in_cache(const Tensor& x, const Geometry& g, const Coefficients& coef,
                      Tensor& mean_i, Tensor& var_i, Tensor& y) {
  const int64_t plane_bytes = g.m * x.element_size(), planes = g.n * g.c;
  // Blocks of at most kCacheBlockBytes, as many as a multiple of the threads and of equal
  // size: each thread gets the same share, the same contiguous stretch of y that the next
  // element-wise op (ReLU, the residual add) hands the same thread, so y is still in that
  // core's cache.  (Blocks of a fixed size split 13 / 7 / 4 blocks 7:6, 4:3, 2:2 between two
  // threads: up to 65:35 of the work on one.)
  const int64_t cap = std::max<int64_t>(1, config::kCacheBlockBytes / plane_bytes);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_cache = (planes + cap - 1) / cap;
  const int64_t blocks0 = std::min(planes, (by_cache + threads - 1) / threads * threads);
  const int64_t block = (planes + blocks0 - 1) / blocks0;
  const int64_t blocks = (planes + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, config::kMinTaskElems / (block * g.m));
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* yp = static_cast<char*>(y.mutable_data_ptr());
  AT_DISPATCH_FLOATING_TYPES(mean_i.scalar_type(), "dabn_forward_in_cache", [&] {
    scalar_t* mean = mean_i.mutable_data_ptr<scalar_t>();
    scalar_t* var = var_i.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> k(3 * block);  // center, scale, shift of one block
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t i0 = blk * block, i1 = std::min(planes, i0 + block);
        const Geometry gb{1, i1 - i0, g.m, false};  // planes i0..i1 as one sample
        kernels().moments(dtype_of(x), gb, xp + i0 * plane_bytes, mean + i0, var + i0);
        m2_to_var(var + i0, i1 - i0, g.m);
        coef.fill<scalar_t>(i0, i1, mean, var, k.data(), k.data() + block, k.data() + 2 * block);
        kernels().affine(dtype_of(x), gb, xp + i0 * plane_bytes, k.data(), k.data() + block,
                         k.data() + 2 * block, yp + i0 * plane_bytes);
      }
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> dabn_forward_cpu(
    const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const Tensor& source_mean, const Tensor& source_var, const Tensor& blend,
    c10::optional<double> shrink_k, double eps) {
  check_dabn_forward(x, weight, bias, source_mean, source_var, blend);
  const Geometry g = geometry_of(x);
  Blend b(g, blend, source_mean, source_var, shrink_k, eps);
  const std::vector<double> gamma = host_doubles(opt(weight), g.c, 1.0);
  const std::vector<double> beta = host_doubles(opt(bias), g.c, 0.0);
  Tensor y = empty_like_layout(x);
  if (b.wb == 0.0 && !g.channels_last) {
    const auto opts = x.options().dtype(acc_type(x));
    Tensor mean_i = at::empty({g.n, g.c}, opts), var_i = at::empty({g.n, g.c}, opts);
    forward_in_cache(x, g, Coefficients(b, gamma, beta), mean_i, var_i, y);
    return {y, mean_i, var_i};
  }
  auto [mean_i, var_i] = moments(x);
  b.set_stats(mean_i, var_i);
  normalize(x, g, Coefficients(b, gamma, beta), mean_i, var_i, y);
  return {y, mean_i, var_i};
}

/// The forward given the instance statistics of x (from _instance_stats): one read of x and
/// one write of y.  The score layer computes its statistics once, scores from them, and then
/// normalises with them here (SPEC §2 "one pass of statistics").
Tensor dabn_normalize_cpu(const Tensor& x, const c10::optional<Tensor>& weight,
                          const c10::optional<Tensor>& bias, const Tensor& source_mean,
                          const Tensor& source_var, const Tensor& blend,
                          c10::optional<double> shrink_k, double eps, const Tensor& mean,
                          const Tensor& var) {
  check_dabn_normalize(x, weight, bias, source_mean, source_var, blend, mean, var);
  const Geometry g = geometry_of(x);
  const at::ScalarType acc = acc_type(x);
  const Tensor mean_i = mean.detach().to(acc).contiguous(), var_i = var.detach().to(acc).contiguous();
  return normalized(x, g, weight, bias, source_mean, source_var, blend, shrink_k, eps, mean_i, var_i);
}

/// SPEC §3c: fold the batch's statistics (D4, from the instance statistics; acc-typed (N, C))
/// into the stream statistics in place, s <- s + momentum (b - s), in double.  With a reset cut
/// (SPEC §3c "reset"): when the batch's divergence from the stream statistics (stream_divergence)
/// exceeds it, the momentum is 1 (the stream restarts at the batch).
void fold_stream(const Tensor& mean_i, const Tensor& var_i, int64_t m, const Tensor& stream_mean,
                 const Tensor& stream_var, double momentum, c10::optional<double> reset, double eps) {
  const int64_t n = mean_i.size(0), c = mean_i.size(1);
  const std::vector<double> mu = host_doubles(&mean_i, n * c, 0.0), var = host_doubles(&var_i, n * c, 0.0);
  std::vector<double> sm = host_doubles(&stream_mean, c, 0.0), sv = host_doubles(&stream_var, c, 0.0);
  std::vector<double> bm(c), bv(c);
  double div = 0.0;
  for (int64_t ci = 0; ci < c; ++ci) {
    double s = 0.0;
    for (int64_t ni = 0; ni < n; ++ni) s += mu[ni * c + ci];
    bm[ci] = s / static_cast<double>(n);
    double ss = 0.0;
    for (int64_t ni = 0; ni < n; ++ni) ss += math::batch_ss_term(mu[ni * c + ci], var[ni * c + ci], bm[ci], m);
    bv[ci] = math::batch_var(ss, n, m);
    if (reset.has_value()) {
      // the symmetric KL divergence of the per-channel Gaussians (source_shift's formula)
      div += math::gaussian_sym_kl(bv[ci] + eps, sv[ci] + eps, bm[ci] - sm[ci]);
    }
  }
  // NaN divergence (non-finite statistics) compares false: no reset
  const double rate = reset.has_value() && div / static_cast<double>(c) > *reset ? 1.0 : momentum;
  for (int64_t ci = 0; ci < c; ++ci) {
    sm[ci] += rate * (bm[ci] - sm[ci]);
    sv[ci] += rate * (bv[ci] - sv[ci]);
  }
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  stream_mean.copy_(at::tensor(sm, f64));
  stream_var.copy_(at::tensor(sv, f64));
}

void check_stream(const char* op, const Tensor& stream_mean, const Tensor& stream_var, int64_t c,
                  double momentum, c10::optional<double> reset) {
  for (const Tensor* t : {&stream_mean, &stream_var}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 1 && t->size(0) == c && t->is_floating_point(),
                op, ": stream statistics must be floating-point (", c, ",) CPU tensors, got ",
                t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  TORCH_CHECK(momentum > 0.0 && momentum <= 1.0, op, ": stream momentum must be in (0, 1], got ",
              momentum);
  TORCH_CHECK(!reset.has_value() || *reset > 0.0, op, ": stream reset cut must be > 0 or None, got ",
              reset.value_or(0.0));
}

bool flag_of(const char* op, const Tensor& t) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kBool && t.device().is_cpu(), op,
              ": decision buffers must be one-element bool CPU tensors, got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
  return *t.const_data_ptr<bool>();
}

/// The source term of a decided batch's blend (SPEC §3c): the batch is folded into the stream
/// statistics unless it is "multiple"; a "skewed" batch takes the updated stream statistics,
/// the others the source statistics.  mean_i, var_i: acc-typed, contiguous (N, C).
std::pair<const Tensor*, const Tensor*> stream_source(bool single, bool is_skewed, const Tensor& mean_i,
                                                      const Tensor& var_i, int64_t m,
                                                      const Tensor& stream_mean, const Tensor& stream_var,
                                                      const Tensor& source_mean, const Tensor& source_var,
                                                      double momentum, c10::optional<double> reset,
                                                      double eps) {
  if (single || is_skewed) fold_stream(mean_i, var_i, m, stream_mean, stream_var, momentum, reset, eps);
  if (is_skewed && !single) return {&stream_mean, &stream_var};
  return {&source_mean, &source_var};
}

/// datta::_stream_anchor (SPEC §3c): a layer's stream statistics and the source term of its
/// blend for the decision in (decision, skewed).  Not "multiple": the batch's statistics (from
/// its instance statistics mean, var, m = H W) are folded into stream_mean / stream_var in
/// place; the returned (C,) pair is the updated stream statistics on a "skewed" batch, the
/// source statistics otherwise (copies).
std::tuple<Tensor, Tensor> stream_anchor_cpu(const Tensor& mean, const Tensor& var, int64_t m,
                                             const Tensor& stream_mean, const Tensor& stream_var,
                                             const Tensor& source_mean, const Tensor& source_var,
                                             const Tensor& decision, const Tensor& skewed,
                                             double momentum, c10::optional<double> reset, double eps) {
  constexpr const char* op = "datta::_stream_anchor";
  TORCH_CHECK(mean.dim() == 2 && var.sizes() == mean.sizes() && mean.device().is_cpu() &&
                  var.device().is_cpu() && mean.size(0) > 0 && m >= 1,
              op, ": mean and var must be equal non-empty (N, C) CPU tensors and m >= 1, got ",
              mean.sizes(), ", ", var.sizes(), ", m = ", m);
  const int64_t c = mean.size(1);
  check_stream(op, stream_mean, stream_var, c, momentum, reset);
  for (const Tensor* t : {&source_mean, &source_var}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == c, op, ": source statistics must be (", c, ",), got ",
                t->sizes());
  }
  const bool single = flag_of(op, decision), is_skewed = !single && flag_of(op, skewed);
  const at::ScalarType acc = at::promote_types(mean.scalar_type(), at::kFloat);
  const auto [am, av] = stream_source(single, is_skewed, mean.detach().to(acc).contiguous(),
                                      var.detach().to(acc).contiguous(), m, stream_mean, stream_var,
                                      source_mean, source_var, momentum, reset, eps);
  return {am->clone(), av->clone()};
}

/// datta::_dabn_stream_forward (SPEC §3c): a layer with stream statistics on a batch that
/// records no graph, in one call: the blend its decision buffers select, the instance
/// statistics (1 read of x), the fold into the stream statistics (not "multiple"), and y
/// normalised with the stream statistics as the source term on a "skewed" batch (1 read of x,
/// 1 write of y): _instance_stats + _stream_anchor + _dabn_normalize without the Python
/// between them.
Tensor dabn_stream_forward_cpu(const Tensor& x, const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias, const Tensor& source_mean,
                               const Tensor& source_var, const Tensor& blend_single,
                               const Tensor& blend_multiple, const Tensor& blend_skewed,
                               c10::optional<double> shrink_k, double eps, const Tensor& stream_mean,
                               const Tensor& stream_var, const Tensor& decision,
                               const Tensor& skewed, double momentum, c10::optional<double> reset) {
  constexpr const char* op = "datta::_dabn_stream_forward";
  check_dabn_decide_forward(x, weight, bias, source_mean, source_var, blend_single, blend_multiple,
                            blend_skewed);
  const Geometry g = geometry_of(x);
  check_stream(op, stream_mean, stream_var, g.c, momentum, reset);
  const bool single = flag_of(op, decision), is_skewed = !single && flag_of(op, skewed);
  auto [mean_i, var_i] = moments(x);
  const auto [sm, sv] = stream_source(single, is_skewed, mean_i, var_i, g.m, stream_mean, stream_var,
                                      source_mean, source_var, momentum, reset, eps);
  const Tensor& blend = single ? blend_single : is_skewed ? blend_skewed : blend_multiple;
  return normalized(x, g, weight, bias, *sm, *sv, blend, shrink_k, eps, mean_i, var_i);
}

/// DATTA's score layer on a batch that records no graph, in one call (SPEC §4 with the
/// dispersion score and a threshold rule): the instance statistics (1 read of x), the
/// dispersion score, _threshold_decide's spread / shift / rule, the decision written into
/// every tensor of `decision` (True = single) and `skewed` (0-dim bool: the decision buffers
/// of the layers from this one on), and y normalised with the blend the decision selects (1
/// read of x, 1 write of y): datta::_dabn_normalize's result for that blend.  The same math as
/// _instance_stats + _dispersion_score + _threshold_decide + _dabn_normalize, without the
/// Python between them (on a small CPU model they cost ~0.2 ms of a ~3.5 ms batch).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dabn_decide_forward_cpu(
    const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const Tensor& source_mean, const Tensor& source_var, const Tensor& blend_single,
    const Tensor& blend_multiple, const Tensor& blend_skewed, c10::optional<double> shrink_k,
    double eps, c10::string_view parts,
    c10::string_view stat, const c10::optional<Tensor>& center, const c10::optional<Tensor>& scale,
    const c10::optional<Tensor>& probe_weight, const c10::optional<Tensor>& probe_bias,
    double threshold, double low, c10::optional<double> skew_cut, c10::optional<double> shift_lo,
    c10::optional<double> shift_hi, at::TensorList decision, at::TensorList skewed,
    const c10::optional<Tensor>& stream_mean, const c10::optional<Tensor>& stream_var,
    c10::optional<double> stream_momentum, c10::optional<double> stream_reset) {
  check_dabn_decide_forward(x, weight, bias, source_mean, source_var, blend_single, blend_multiple,
                            blend_skewed);
  for (const at::TensorList& list : {decision, skewed}) {
    for (const Tensor& t : list) flag_of("datta::_dabn_decide_forward", t);
  }
  const Geometry g = geometry_of(x);
  const bool stream = stream_momentum.has_value();
  TORCH_CHECK(stream == (stream_mean.has_value() && stream_var.has_value()),
              "datta::_dabn_decide_forward: stream_mean, stream_var and stream_momentum go together");
  if (stream) {
    check_stream("datta::_dabn_decide_forward", *stream_mean, *stream_var, g.c, *stream_momentum,
                 stream_reset);
  }
  auto [mean_i, var_i] = moments(x);
  auto [score, per_sample] = dispersion_score_cpu(mean_i, var_i, source_mean, source_var, g.m, eps,
                                                  parts, stat);
  auto [spread, shift, flags] = threshold_decide_cpu(score, mean_i, var_i, source_mean, source_var,
                                                     eps, center, scale, probe_weight, probe_bias,
                                                     threshold, low, skew_cut, shift_lo, shift_hi);
  const bool single = flags.const_data_ptr<bool>()[0], is_skewed = flags.const_data_ptr<bool>()[1];
  for (const Tensor& t : decision) *t.mutable_data_ptr<bool>() = single;
  for (const Tensor& t : skewed) *t.mutable_data_ptr<bool>() = is_skewed;
  const Tensor& blend = single ? blend_single : is_skewed ? blend_skewed : blend_multiple;
  // SPEC §3c: the stream statistics take the source's place on a skewed batch
  const auto [sm, sv] = stream ? stream_source(single, is_skewed, mean_i, var_i, g.m, *stream_mean,
                                               *stream_var, source_mean, source_var, *stream_momentum,
                                               stream_reset, eps)
                               : std::pair<const Tensor*, const Tensor*>{&source_mean, &source_var};
  Tensor y = normalized(x, g, weight, bias, *sm, *sv, blend, shrink_k, eps, mean_i, var_i);
  return {y, mean_i, var_i, score, per_sample, spread, shift, flags};
}

/// SPEC D5 pass 1 (kernel): sdy = sum_p dy, sdyxc = sum_p dy (x - mu) -> two (N, C) acc
/// tensors; mu_acc: (N, C) acc, contiguous.
std::pair<Tensor, Tensor> backward_sums(const Tensor& dy, const Tensor& x, const Tensor& mu_acc) {
  const Geometry g = geometry_of(x);
  Tensor sdy = at::empty({g.n, g.c}, mu_acc.options());
  Tensor sdyxc = at::empty({g.n, g.c}, mu_acc.options());
  kernels().backward_reduce(dtype_of(x), g, dy.const_data_ptr(), x.const_data_ptr(),
                            mu_acc.const_data_ptr(), sdy.mutable_data_ptr(),
                            sdyxc.mutable_data_ptr());
  return {sdy, sdyxc};
}

/// SPEC D5 pass 2 (kernel): dx = a dy + b (x - mu) + c0, in x's dtype and layout; mu_acc, a,
/// b, c0: (N, C) acc, contiguous.
Tensor backward_apply(const Tensor& dy, const Tensor& x, const Tensor& mu_acc, const Tensor& a,
                      const Tensor& b, const Tensor& c0) {
  Tensor dx = empty_like_layout(x);
  kernels().backward_apply(dtype_of(x), geometry_of(x), dy.const_data_ptr(), x.const_data_ptr(),
                           mu_acc.const_data_ptr(), a.const_data_ptr(), b.const_data_ptr(),
                           c0.const_data_ptr(), dx.mutable_data_ptr());
  return dx;
}

// SPEC D5, the backward coefficients (reference.dabn_backward, in this file's names;
// r = rsqrt(max(v, 0) + eps), g = gamma, xc = x - mu_i):
//   pass 1 (kernel):  sdy = sum_p dy,  sdyxc = sum_p dy xc
//   sdyxh = r (sdyxc + (mu_i - m) sdy)                    (= sum_p dy xhat)
//   dbias = sum_n sdy,  dweight = sum_n sdyxh             (fixed n order: deterministic)
//   dm = -g r sdy,  dv = -g r^2 sdyxh / 2  (0 where v < 0: the clamp)
//   dmu_i = w_i dm keep_mu,  dvar_i = w_i dv keep_var,  dmu_B = w_b sum_n dm,  dvar_B = w_b sum_n dv
//   A = g r,  B = 2 dvar_i / (M - 1) + 2 dvar_B / (N M - 1)
//   C0 = dmu_i / M + dmu_B / (N M) + 2 dvar_B (mu_i - mu_B) / (N M - 1)
//   pass 2 (kernel):  dx = A dy + B xc + C0
// Every "w * term" above is weighted(w, term), and B xc is dropped where B = 0: a statistic
// of weight 0 (an inf/NaN one included) never reaches dx.
std::tuple<Tensor, Tensor, Tensor> dabn_backward_cpu(
    const Tensor& dy, const Tensor& x, const c10::optional<Tensor>& weight,
    const Tensor& source_mean, const Tensor& source_var, const Tensor& blend,
    c10::optional<double> shrink_k, double eps, const Tensor& mean, const Tensor& var) {
  check_dabn_backward(dy, x, weight, source_mean, source_var, blend, mean, var);
  const Geometry g = geometry_of(x);
  const at::ScalarType acc = acc_type(x);
  const Tensor mu_acc = mean.detach().to(acc).contiguous();
  const auto [sdy_t, sdyxc_t] = backward_sums(dy, x, mu_acc);

  const Blend b(g, blend, source_mean, source_var, shrink_k, eps, mean, var);
  const std::vector<double> gamma = host_doubles(opt(weight), g.c, 1.0);
  const std::vector<double> sdy = host_doubles(&sdy_t, g.n * g.c, 0.0);
  const std::vector<double> sdyxc = host_doubles(&sdyxc_t, g.n * g.c, 0.0);
  const int64_t nc = g.n * g.c;
  std::vector<double> r(nc), dm(nc), dv(nc), keep_mu(nc), keep_var(nc);
  std::vector<double> dweight(g.c, 0.0), dbias(g.c, 0.0), dmu_b(g.c, 0.0), dvar_b(g.c, 0.0);
  for (int64_t ni = 0; ni < g.n; ++ni) {
    for (int64_t ci = 0; ci < g.c; ++ci) {
      const int64_t i = ni * g.c + ci;
      const Blend::At a = b.at(ni, ci);
      r[i] = rstd(a.v, eps);
      const math::BackwardTerms<double> t =
          math::backward_terms(gamma[ci], r[i], a.v, a.m, b.mu_i[i], sdy[i], sdyxc[i]);
      dbias[ci] += sdy[i];
      dweight[ci] += t.sdyxh;
      dm[i] = t.dm;
      dv[i] = t.dv;
      keep_mu[i] = a.keep_mu;
      keep_var[i] = a.keep_var;
      dmu_b[ci] += dm[i];
      dvar_b[ci] += dv[i];
    }
  }
  // SPEC D5: A, B, C0 per (n, c)
  std::vector<double> ca(nc), cb(nc), cc(nc);
  for (int64_t ni = 0; ni < g.n; ++ni) {
    for (int64_t ci = 0; ci < g.c; ++ci) {
      const int64_t i = ni * g.c + ci;
      // terms of weight 0 are not read: an unused inf/NaN statistic gives no NaN gradient
      const double dmu_i = weighted(b.wi, dm[i] * keep_mu[i]), dvar_i = weighted(b.wi, dv[i] * keep_var[i]);
      const double dmb = weighted(b.wb, dmu_b[ci]), dvb = weighted(b.wb, dvar_b[ci]);
      ca[i] = gamma[ci] * r[i];
      math::instance_coefs(dmu_i, dvar_i, g.m, cb[i], cc[i]);
      math::add_batch_coefs(dmb, dvb, b.mu_i[i], b.mu_b[ci], g.n, g.m, cb[i], cc[i]);
    }
  }
  const Tensor ca_t = to_acc(ca, {g.n, g.c}, acc), cb_t = to_acc(cb, {g.n, g.c}, acc);
  const Tensor cc_t = to_acc(cc, {g.n, g.c}, acc);
  return {backward_apply(dy, x, mu_acc, ca_t, cb_t, cc_t), to_acc(dweight, {g.c}, acc),
          to_acc(dbias, {g.c}, acc)};
}

// SPEC D5's two passes on their own, for a caller that computes the coefficients itself
// (datta_kernels.distributed: its batch terms are summed over a process group in between).
std::tuple<Tensor, Tensor> dabn_backward_sums_cpu(const Tensor& dy, const Tensor& x,
                                                  const Tensor& mean) {
  check_dabn_backward_sums(dy, x, mean);
  auto [sdy, sdyxc] = backward_sums(dy, x, mean.detach().to(acc_type(x)).contiguous());
  return {sdy, sdyxc};
}

Tensor dabn_backward_apply_cpu(const Tensor& dy, const Tensor& x, const Tensor& mean,
                               const Tensor& a, const Tensor& b, const Tensor& c0) {
  check_dabn_backward_apply(dy, x, mean, a, b, c0);
  const at::ScalarType acc = acc_type(x);
  auto as_acc = [&](const Tensor& t) { return t.detach().to(acc).contiguous(); };
  return backward_apply(dy, x, as_acc(mean), as_acc(a), as_acc(b), as_acc(c0));
}

}  // namespace
}  // namespace datta::cpu

TORCH_LIBRARY_IMPL(datta, CPU, m) {
  m.impl("_dabn_backward_sums", &datta::cpu::dabn_backward_sums_cpu);
  m.impl("_dabn_backward_apply", &datta::cpu::dabn_backward_apply_cpu);
  m.impl("_instance_stats", &datta::cpu::instance_stats_cpu);
  m.impl("_diversity_angles", &datta::cpu::diversity_angles_cpu);
  m.impl("_dabn_forward", &datta::cpu::dabn_forward_cpu);
  m.impl("_dabn_normalize", &datta::cpu::dabn_normalize_cpu);
  m.impl("_dabn_decide_forward", &datta::cpu::dabn_decide_forward_cpu);
  m.impl("_stream_anchor", &datta::cpu::stream_anchor_cpu);
  m.impl("_dabn_stream_forward", &datta::cpu::dabn_stream_forward_cpu);
  m.impl("_dabn_backward", &datta::cpu::dabn_backward_cpu);
}

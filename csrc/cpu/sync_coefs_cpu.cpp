// The per-(n, c) math of the synced layer (datta_kernels.distributed) as three CPU kernel ops,
// with the batch statistics of another batch (a process group's global one) given:
//
//   _batch_moments_local / _merge SPEC D4 across ranks: this slice's [N M, mean, M2, N] pack,
//                                and the rank-ordered merge of the gathered packs
//   _blend_moments               SPEC D1-D3: blended m, v (N, C)
//   _dabn_backward_batch_terms   SPEC D5: [w_b sum_n dm, w_b sum_n dv] (2C,), dweight, dbias
//   _dabn_backward_coefficients  SPEC D5: A, B, C0 (N, C) given the batch terms summed over
//                                the ranks (the collective runs between the two)
//
// Each replaces ~100 small torch ops of datta_kernels.reference.blend_moments /
// dabn_backward_coefficients (the oracle they are tested against) by one loop in double over
// the (N, C) statistics.  Reads no x.  The batch count is a 0-dim tensor (elements of the
// global batch); it is read here on the host, which on CPU is no sync.
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common/dabn_math.h"

namespace datta::cpu {
namespace {

using at::Tensor;

/// Values of a floating tensor as host doubles (row-major), or `fill` x len when absent.
std::vector<double> doubles(const Tensor* t, int64_t len, double fill) {
  if (t == nullptr || !t->defined()) return std::vector<double>(len, fill);
  const Tensor c = t->is_contiguous() ? *t : t->contiguous();
  std::vector<double> out(c.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "sync_coefs", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(p[i]);
  });
  return out;
}

/// A fresh tensor of `like`'s dtype and device holding v with `shape`.
Tensor from_doubles(const std::vector<double>& v, at::IntArrayRef shape, const Tensor& like) {
  Tensor out = at::empty(shape, like.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sync_coefs_out", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  return out;
}

/// Everything per channel and per (n, c) that SPEC D1-D3 need, in double.
struct Blend {
  int64_t n, c, m;
  double ws, wb, wi, count, eps, k;
  bool shrink;
  std::vector<double> mu_i, var_i, smean, svar, mu_b, var_b;

  Blend(const char* op, const Tensor& mean_i, const Tensor& var_i, const Tensor& source_mean,
        const Tensor& source_var, const Tensor& blend, const Tensor& batch_mean,
        const Tensor& batch_var, const Tensor& batch_count, int64_t m_, std::optional<double> shrink_k,
        double eps_)
      : n(mean_i.size(0)), c(mean_i.size(1)), m(m_), eps(eps_), k(shrink_k.value_or(0.0)),
        shrink(shrink_k.has_value() && m_ > 1) {
    TORCH_CHECK(mean_i.dim() == 2 && var_i.sizes() == mean_i.sizes(), op,
                ": mean_i and var_i must be (N, C) alike, got ", mean_i.sizes(), " and ", var_i.sizes());
    TORCH_CHECK(at::isFloatingType(mean_i.scalar_type()) &&
                    (mean_i.scalar_type() == at::kFloat || mean_i.scalar_type() == at::kDouble),
                op, ": statistics must be float32 or float64, got ", mean_i.scalar_type());
    for (const Tensor* t : {&source_mean, &source_var, &batch_mean, &batch_var}) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == c, op, ": per-channel arguments must be (", c, ",), got ",
                  t->sizes());
    }
    TORCH_CHECK(blend.numel() == 3, op, ": blend must be (3,), got ", blend.sizes());
    TORCH_CHECK(batch_count.numel() == 1, op, ": batch_count must hold one value, got ", batch_count.sizes());
    TORCH_CHECK(m >= 1, op, ": m = H*W must be >= 1, got ", m);
    const std::vector<double> w = doubles(&blend, 3, 0.0);
    ws = w[0];
    wb = w[1];
    wi = w[2];
    count = doubles(&batch_count, 1, 0.0)[0];
    math::edge_rules_count(ws, wb, wi, count, m);  // SPEC D1, the batch rule on the global count
    mu_i = doubles(&mean_i, n * c, 0.0);
    this->var_i = doubles(&var_i, n * c, 0.0);
    smean = doubles(&source_mean, c, 0.0);
    svar = doubles(&source_var, c, 0.0);
    mu_b = doubles(&batch_mean, c, 0.0);
    var_b = doubles(&batch_var, c, 0.0);
  }

  /// SPEC D2 + D3 at i = (n, c): blended m, v, and the softshrink pass-through masks of D5.
  void at(int64_t i, double& mean, double& var, double& keep_mu, double& keep_var) const {
    const int64_t ci = i % c;
    double mi = mu_i[i], vi = var_i[i];
    keep_mu = keep_var = 1.0;
    if (shrink) {  // s_mu = sqrt((var_s + eps) / M), s_sigma = (var_s + eps) sqrt(2 / (M - 1))
      const double sv = svar[ci] + eps;
      const double lam_mu = k * std::sqrt(sv / double(m)), lam_var = k * sv * std::sqrt(2.0 / double(m - 1));
      const double zmu = mi - smean[ci], zvar = vi - svar[ci];
      keep_mu = std::abs(zmu) > lam_mu ? 1.0 : 0.0;
      keep_var = std::abs(zvar) > lam_var ? 1.0 : 0.0;
      mi = smean[ci] + math::softshrink(zmu, lam_mu);
      vi = svar[ci] + math::softshrink(zvar, lam_var);
    }
    mean = math::blend3(ws, smean[ci], wb, mu_b[ci], wi, mi);
    var = math::blend3(ws, svar[ci], wb, var_b[ci], wi, vi);
  }
};

std::tuple<Tensor, Tensor> blend_moments_cpu(const Tensor& mean_i, const Tensor& var_i, const Tensor& source_mean,
                                             const Tensor& source_var, const Tensor& blend,
                                             const Tensor& batch_mean, const Tensor& batch_var,
                                             const Tensor& batch_count, int64_t m,
                                             std::optional<double> shrink_k, double eps) {
  const Blend b("datta::_blend_moments", mean_i, var_i, source_mean, source_var, blend, batch_mean, batch_var,
                batch_count, m, shrink_k, eps);
  std::vector<double> mean(b.n * b.c), var(b.n * b.c);
  double keep_mu, keep_var;
  for (int64_t i = 0; i < b.n * b.c; ++i) b.at(i, mean[i], var[i], keep_mu, keep_var);
  return {from_doubles(mean, mean_i.sizes(), mean_i), from_doubles(var, mean_i.sizes(), mean_i)};
}

/// SPEC D5's per-(n, c) terms (math::backward_terms) for every (n, c), with the masks.
struct Terms {
  std::vector<double> r, g, dm, dv, sdyxh, keep_mu, keep_var;
};

Terms backward_terms(const Blend& b, const std::vector<double>& sdy, const std::vector<double>& sdyxc,
                     const std::vector<double>& gamma) {
  const int64_t nc = b.n * b.c;
  Terms t{std::vector<double>(nc), std::vector<double>(nc), std::vector<double>(nc), std::vector<double>(nc),
          std::vector<double>(nc), std::vector<double>(nc), std::vector<double>(nc)};
  for (int64_t i = 0; i < nc; ++i) {
    double mean, var;
    b.at(i, mean, var, t.keep_mu[i], t.keep_var[i]);
    t.g[i] = gamma[i % b.c];
    t.r[i] = 1.0 / std::sqrt(std::max(var, 0.0) + b.eps);
    const math::BackwardTerms<double> bt = math::backward_terms(t.g[i], t.r[i], var, mean, b.mu_i[i], sdy[i], sdyxc[i]);
    t.dm[i] = bt.dm;
    t.dv[i] = bt.dv;
    t.sdyxh[i] = bt.sdyxh;
  }
  return t;
}

void check_sums(const char* op, const Tensor& sdy, const Tensor& sdyxc, const Tensor& mean_i) {
  TORCH_CHECK(sdy.sizes() == mean_i.sizes() && sdyxc.sizes() == mean_i.sizes(), op,
              ": sdy and sdyxc must be (N, C) like mean_i ", mean_i.sizes(), ", got ", sdy.sizes(), " and ",
              sdyxc.sizes());
}

std::tuple<Tensor, Tensor, Tensor> backward_batch_terms_cpu(
    const Tensor& sdy, const Tensor& sdyxc, const std::optional<Tensor>& weight, const Tensor& source_mean,
    const Tensor& source_var, const Tensor& blend, const Tensor& batch_mean, const Tensor& batch_var,
    const Tensor& batch_count, const Tensor& mean_i, const Tensor& var_i, int64_t m,
    std::optional<double> shrink_k, double eps) {
  const char* op = "datta::_dabn_backward_batch_terms";
  check_sums(op, sdy, sdyxc, mean_i);
  const Blend b(op, mean_i, var_i, source_mean, source_var, blend, batch_mean, batch_var, batch_count, m,
                shrink_k, eps);
  const std::vector<double> sdy_h = doubles(&sdy, b.n * b.c, 0.0), sdyxc_h = doubles(&sdyxc, b.n * b.c, 0.0);
  const Terms t = backward_terms(b, sdy_h, sdyxc_h, doubles(weight ? &*weight : nullptr, b.c, 1.0));
  std::vector<double> terms(2 * b.c, 0.0), dweight(b.c, 0.0), dbias(b.c, 0.0);
  for (int64_t ni = 0; ni < b.n; ++ni) {  // fixed order in n: deterministic
    for (int64_t ci = 0; ci < b.c; ++ci) {
      const int64_t i = ni * b.c + ci;
      dbias[ci] += sdy_h[i];
      dweight[ci] += t.sdyxh[i];
      terms[ci] += t.dm[i];
      terms[b.c + ci] += t.dv[i];
    }
  }
  for (int64_t ci = 0; ci < b.c; ++ci) {  // dmu_B = w_b sum_n dm, dvar_B = w_b sum_n dv
    terms[ci] = math::weighted(b.wb, terms[ci]);
    terms[b.c + ci] = math::weighted(b.wb, terms[b.c + ci]);
  }
  const Tensor like64 = mean_i.new_empty({0}, mean_i.options().dtype(at::kDouble));
  return {from_doubles(terms, {2 * b.c}, like64), from_doubles(dweight, {b.c}, mean_i),
          from_doubles(dbias, {b.c}, mean_i)};
}

std::tuple<Tensor, Tensor, Tensor> backward_coefficients_cpu(
    const Tensor& sdy, const Tensor& sdyxc, const std::optional<Tensor>& weight, const Tensor& source_mean,
    const Tensor& source_var, const Tensor& blend, const Tensor& batch_mean, const Tensor& batch_var,
    const Tensor& batch_count, const Tensor& mean_i, const Tensor& var_i, int64_t m,
    std::optional<double> shrink_k, double eps, const Tensor& batch_terms) {
  const char* op = "datta::_dabn_backward_coefficients";
  check_sums(op, sdy, sdyxc, mean_i);
  const Blend b(op, mean_i, var_i, source_mean, source_var, blend, batch_mean, batch_var, batch_count, m,
                shrink_k, eps);
  TORCH_CHECK(batch_terms.numel() == 2 * b.c, op, ": batch_terms must be (2C,) = (", 2 * b.c, ",), got ",
              batch_terms.sizes());
  const std::vector<double> sdy_h = doubles(&sdy, b.n * b.c, 0.0), sdyxc_h = doubles(&sdyxc, b.n * b.c, 0.0);
  const Terms t = backward_terms(b, sdy_h, sdyxc_h, doubles(weight ? &*weight : nullptr, b.c, 1.0));
  const std::vector<double> terms = doubles(&batch_terms, 2 * b.c, 0.0);
  const int64_t nc = b.n * b.c;
  std::vector<double> ca(nc), cb(nc), cc(nc);
  for (int64_t i = 0; i < nc; ++i) {
    const int64_t ci = i % b.c;
    // SPEC D5: terms of weight 0 are not read (weighted)
    const double dmu_i = math::weighted(b.wi, t.dm[i] * t.keep_mu[i]);
    const double dvar_i = math::weighted(b.wi, t.dv[i] * t.keep_var[i]);
    ca[i] = t.g[i] * t.r[i];
    math::instance_coefs(dmu_i, dvar_i, m, cb[i], cc[i]);
    math::add_batch_coefs_count(terms[ci], terms[b.c + ci], b.mu_i[i], b.mu_b[ci], b.count, cb[i], cc[i]);
  }
  return {from_doubles(ca, mean_i.sizes(), mean_i), from_doubles(cb, mean_i.sizes(), mean_i),
          from_doubles(cc, mean_i.sizes(), mean_i)};
}

/// SPEC D4 for this rank's slice: [N M, mean_n mu_i (C), sum_n ((M - 1) var_i + M (mu_i -
/// mean)^2) (C), N], float64 (an empty slice packs zeros).
Tensor batch_moments_local_cpu(const Tensor& mean_i, const Tensor& var_i, int64_t m) {
  TORCH_CHECK(mean_i.dim() == 2 && var_i.sizes() == mean_i.sizes(),
              "datta::_batch_moments_local: mean_i and var_i must be (N, C) alike");
  const int64_t n = mean_i.size(0), c = mean_i.size(1);
  const std::vector<double> mu = doubles(&mean_i, n * c, 0.0), vr = doubles(&var_i, n * c, 0.0);
  std::vector<double> packed(2 * c + 2, 0.0);
  packed[0] = double(n * m);
  packed[2 * c + 1] = double(n);
  for (int64_t ci = 0; ci < c; ++ci) {
    double sum = 0.0, ss = 0.0;
    for (int64_t k = 0; k < n; ++k) sum += mu[k * c + ci];
    const double mean = sum / double(n > 0 ? n : 1);
    for (int64_t k = 0; k < n; ++k) ss += math::batch_ss_term(mu[k * c + ci], vr[k * c + ci], mean, m);
    packed[1 + ci] = mean;
    packed[1 + c + ci] = ss;
  }
  return from_doubles(packed, {2 * c + 2}, mean_i.new_empty({0}, mean_i.options().dtype(at::kDouble)));
}

/// Chan's merge of the gathered packs in rank order (rows (W, 2C + 2) float64): a fixed
/// sequence of double operations, so every rank gets the same bits.  var_B = M2 / (count - 1)
/// where count > 1, else 0 (SPEC D4).
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_moments_merge_cpu(const Tensor& rows, at::ScalarType dtype) {
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) >= 2 && (rows.size(1) - 2) % 2 == 0,
              "datta::_batch_moments_merge: rows must be (W, 2C + 2), got ", rows.sizes());
  const int64_t w = rows.size(0), c = (rows.size(1) - 2) / 2, k = rows.size(1);
  const std::vector<double> r = doubles(&rows, w * k, 0.0);
  std::vector<double> mean(c), var(c);
  double count = 0.0, samples = 0.0;
  for (int64_t q = 0; q < w; ++q) samples += r[q * k + k - 1];
  for (int64_t ci = 0; ci < c; ++ci) {
    double cnt = r[0], mu = r[1 + ci], m2 = r[1 + c + ci];
    for (int64_t q = 1; q < w; ++q) {
      const double n_b = r[q * k], n_ab = cnt + n_b, safe = n_ab > 1.0 ? n_ab : 1.0;
      const double delta = r[q * k + 1 + ci] - mu;
      mu = mu + delta * (n_b / safe);
      m2 = m2 + r[q * k + 1 + c + ci] + delta * delta * (cnt * n_b / safe);
      cnt = n_ab;
    }
    mean[ci] = mu;
    var[ci] = cnt > 1.0 ? m2 / (cnt - 1.0) : 0.0;
    count = cnt;
  }
  if (c == 0)
    for (int64_t q = 0; q < w; ++q) count += r[q * k];
  const Tensor like = rows.new_empty({0}, rows.options().dtype(dtype));
  const Tensor like64 = rows.new_empty({0}, rows.options().dtype(at::kDouble));
  return {from_doubles(mean, {c}, like), from_doubles(var, {c}, like), from_doubles({count}, {}, like64),
          from_doubles({samples}, {}, like64)};
}

}  // namespace
}  // namespace datta::cpu

TORCH_LIBRARY_IMPL(datta, CPU, m) {
  m.impl("_batch_moments_local", &datta::cpu::batch_moments_local_cpu);
  m.impl("_batch_moments_merge", &datta::cpu::batch_moments_merge_cpu);
  m.impl("_blend_moments", &datta::cpu::blend_moments_cpu);
  m.impl("_dabn_backward_batch_terms", &datta::cpu::backward_batch_terms_cpu);
  m.impl("_dabn_backward_coefficients", &datta::cpu::backward_coefficients_cpu);
}

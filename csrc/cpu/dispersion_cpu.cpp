// CPU kernel ops on a score layer's instance statistics: datta::_dispersion_score (SPEC §2,
// here), datta::_probe_spread, datta::_source_shift and datta::_threshold_decide (SPEC §6, at
// the end).  The (N, C)
// arrays are tiny, but on small layers the ~18 PyTorch ops of the dispersion score's shared implementation
// (reference.dispersion_score) cost a third of a DABN forward in
// dispatch alone; here it is one loop in double.  Names follow the SPEC:
//   z_mu[n, c]    = (mu_i - mu_s) / sqrt(var_s + eps)
//   z_sigma[n, c] = log((var_i + eps) / (var_s + eps)) / 2            (only when M > 1)
//   score         = mean_f sqrt(mean_n (z[n, f] - zbar[f])^2)         (stat "var": mean_f of the variance)
//   per[n]        = sqrt(mean_f (z[n, f] - zbar[f])^2)
// NaN / inf statistics propagate (the selectors answer "multiple" on a non-finite score).
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common/dabn_math.h"
#include "cpu/score_rule.h"

namespace datta::cpu {
namespace {

/// Sum of squared deviations from its mean of column `col` of the row-major (n, f) matrix `a`
/// (in row order); each row's squared deviation is also added to per[row] when per is given, and
/// the column's mean is stored in *mean_out when mean_out is given.
double column_ss(const std::vector<double>& a, int64_t n, int64_t f, int64_t col, double* per,
                 double* mean_out = nullptr) {
  double s = 0.0;
  for (int64_t ni = 0; ni < n; ++ni) s += a[ni * f + col];
  const double mean = s / double(n);
  if (mean_out != nullptr) *mean_out = mean;
  double ss = 0.0;
  for (int64_t ni = 0; ni < n; ++ni) {
    const double d = a[ni * f + col] - mean;
    ss += d * d;
    if (per != nullptr) per[ni] += d * d;
  }
  return ss;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dispersion_score_cpu(const at::Tensor& mean, const at::Tensor& var,
                                                        const at::Tensor& source_mean,
                                                        const at::Tensor& source_var, int64_t m, double eps,
                                                        c10::string_view parts, c10::string_view stat) {
  TORCH_CHECK(mean.dim() == 2 && var.sizes() == mean.sizes(), "datta::_dispersion_score: mean and var ",
              "must be (N, C) of the same shape, got ", mean.sizes(), " and ", var.sizes());
  const int64_t n = mean.size(0), c = mean.size(1);
  TORCH_CHECK(n > 0 && c > 0, "datta::_dispersion_score: empty statistics ", mean.sizes());
  TORCH_CHECK(source_mean.dim() == 1 && source_mean.size(0) == c && source_var.sizes() == source_mean.sizes(),
              "datta::_dispersion_score: source statistics must be (", c, ",)");
  TORCH_CHECK(parts == "mean" || parts == "logstd" || parts == "both",
              "datta::_dispersion_score: parts must be 'mean', 'logstd' or 'both'");
  TORCH_CHECK(stat == "std" || stat == "var", "datta::_dispersion_score: stat must be 'std' or 'var'");
  const bool use_mu = parts != "logstd" || m <= 1, use_sig = parts != "mean" && m > 1;
  // read every input in place when it already is a dense float32/float64 tensor (the usual
  // case: no conversion tensors, which cost more than the loop on small layers)
  std::vector<double> z(n * (c * (int64_t(use_mu) + int64_t(use_sig))));
  const int64_t f = c * (int64_t(use_mu) + int64_t(use_sig));
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "dispersion_score", [&] {
    const at::Tensor mu = mean.contiguous(), vi = var.to(mean.scalar_type()).contiguous();
    const at::Tensor sm = source_mean.to(mean.scalar_type()).contiguous();
    const at::Tensor sv = source_var.to(mean.scalar_type()).contiguous();
    const scalar_t* pmu = mu.const_data_ptr<scalar_t>();
    const scalar_t* pvi = vi.const_data_ptr<scalar_t>();
    const scalar_t* psm = sm.const_data_ptr<scalar_t>();
    const scalar_t* psv = sv.const_data_ptr<scalar_t>();
    for (int64_t ni = 0; ni < n; ++ni) {
      double* row = z.data() + ni * f;
      int64_t j = 0;
      for (int64_t ci = 0; ci < c && use_mu; ++ci)
        row[j++] = (double(pmu[ni * c + ci]) - double(psm[ci])) / std::sqrt(double(psv[ci]) + eps);
      for (int64_t ci = 0; ci < c && use_sig; ++ci)
        row[j++] = 0.5 * std::log((double(pvi[ni * c + ci]) + eps) / (double(psv[ci]) + eps));
    }
  });
  std::vector<double> per(n, 0.0);
  double total = 0.0;
  for (int64_t fi = 0; fi < f; ++fi) {
    const double ss = column_ss(z, n, f, fi, per.data());
    total += stat == "std" ? std::sqrt(ss / double(n)) : ss / double(n);
  }
  at::Tensor score = at::empty({}, mean.options().dtype(at::kFloat));
  at::Tensor per_t = at::empty({n}, mean.options().dtype(at::kFloat));
  *score.mutable_data_ptr<float>() = static_cast<float>(total / double(f));
  float* pp = per_t.mutable_data_ptr<float>();
  for (int64_t ni = 0; ni < n; ++ni) pp[ni] = static_cast<float>(std::sqrt(per[ni] / double(f)));
  return {score, per_t};
}

namespace {

/// The values of a small float tensor (any float dtype, any strides) as doubles.
void read_as_double(const at::Tensor& t, std::vector<double>& out) {
  const at::Tensor d = t.contiguous();  // no copy when it already is
  out.resize(d.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "probe_spread", [&] {
    const scalar_t* p = d.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < d.numel(); ++i) out[i] = double(p[i]);
  });
}

/// SPEC §6, the class probe's prediction spread from the score layer's instance statistics, in
/// one loop (the probe's ~20 PyTorch ops on (N, 2C) features cost ~0.2 ms a batch on the
/// demo's model on a 2-core CPU, 6 % of a test-batch-statistics step):
///   f[n]      = [(mu_i - mu_s) / sqrt(var_s + eps),  (log(max(var_i, 0) + eps) - log(var_s + eps)) / 2]
///   g[n]      = f[n] - mean_n f[n]                                   (batch-centred)
///   logits[n] = ((g[n] - center) / scale) @ weight + bias            (weight (2C, K))
///   p[n]      = softmax(logits[n]);   spread = sum_k std_n p[n, k] / sqrt(K - 1)   (population std)
/// in double; NaN / inf statistics propagate.  datta_kernels.diversity.ClassProbe is the
/// reference (its PyTorch ops).
struct Probe {
  std::vector<double> center, scale, weight, bias;
  int64_t k = 0;
};

/// The (N, C) instance statistics and the source's (C,) as doubles, checked (`op` names the
/// caller in the messages).
struct Stats {
  std::vector<double> mu, vi, sm, sv;
  int64_t n = 0, c = 0;
};

Stats read_stats(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& source_mean,
                 const at::Tensor& source_var, const char* op) {
  TORCH_CHECK(mean.dim() == 2 && var.sizes() == mean.sizes(), op, ": mean and var must be (N, C) of the ",
              "same shape, got ", mean.sizes(), " and ", var.sizes());
  Stats st;
  st.n = mean.size(0), st.c = mean.size(1);
  TORCH_CHECK(st.n > 0 && st.c > 0, op, ": empty statistics ", mean.sizes());
  TORCH_CHECK(mean.is_floating_point() && var.is_floating_point(), op, ": inputs must be floating point");
  for (const at::Tensor* t : {&source_mean, &source_var})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == st.c && t->is_floating_point(), op, ": source statistics ",
                "must be float (", st.c, ",) tensors, got ", t->sizes());
  read_as_double(mean, st.mu);
  read_as_double(var, st.vi);
  read_as_double(source_mean, st.sm);
  read_as_double(source_var, st.sv);
  return st;
}

Probe read_probe(const at::Tensor& center, const at::Tensor& scale, const at::Tensor& weight,
                 const at::Tensor& bias, int64_t c, const char* op) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == 2 * c && weight.size(1) >= 2 && weight.is_floating_point(),
              op, ": weight must be a float (2C, K) tensor with K >= 2, got ", weight.sizes());
  Probe p;
  p.k = weight.size(1);
  auto check_vec = [op](const at::Tensor& t, int64_t len, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == len && t.is_floating_point(), op, ": ", name,
                " must be a float (", len, ",) tensor, got ", t.sizes());
  };
  check_vec(center, 2 * c, "center");
  check_vec(scale, 2 * c, "scale");
  check_vec(bias, p.k, "bias");
  read_as_double(center, p.center);
  read_as_double(scale, p.scale);
  read_as_double(weight, p.weight);
  read_as_double(bias, p.bias);
  return p;
}

double probe_spread(const Stats& st, const Probe& pr, double eps) {
  const int64_t n = st.n, c = st.c, k = pr.k;
  std::vector<double> inv_sd(c), half_log_sv(c);
  for (int64_t ci = 0; ci < c; ++ci) {
    inv_sd[ci] = 1.0 / std::sqrt(st.sv[ci] + eps);
    half_log_sv[ci] = 0.5 * std::log(st.sv[ci] + eps);
  }
  // the features of every sample, then each column minus its batch mean (batch-centred)
  std::vector<double> f(n * 2 * c), col_mean(2 * c), p(n * k);
  for (int64_t ni = 0; ni < n; ++ni) {
    double* fr = f.data() + ni * 2 * c;
    for (int64_t ci = 0; ci < c; ++ci) {
      const double v = st.vi[ni * c + ci];
      fr[ci] = (st.mu[ni * c + ci] - st.sm[ci]) * inv_sd[ci];
      // max(v, 0) with a NaN kept (as clamp_min does)
      fr[c + ci] = 0.5 * std::log((v < 0.0 ? 0.0 : v) + eps) - half_log_sv[ci];
    }
  }
  for (int64_t j = 0; j < 2 * c; ++j) {
    double s = 0.0;
    for (int64_t ni = 0; ni < n; ++ni) s += f[ni * 2 * c + j];
    col_mean[j] = s / double(n);
  }
  for (int64_t ni = 0; ni < n; ++ni) {
    const double* fr = f.data() + ni * 2 * c;
    double* row = p.data() + ni * k;
    for (int64_t ki = 0; ki < k; ++ki) row[ki] = pr.bias[ki];
    for (int64_t j = 0; j < 2 * c; ++j) {
      const double fj = (fr[j] - col_mean[j] - pr.center[j]) / pr.scale[j];
      const double* wj = pr.weight.data() + j * k;
      for (int64_t ki = 0; ki < k; ++ki) row[ki] += fj * wj[ki];
    }
    double top = row[0];
    for (int64_t ki = 1; ki < k; ++ki) top = row[ki] > top ? row[ki] : top;
    double z = 0.0;
    for (int64_t ki = 0; ki < k; ++ki) z += (row[ki] = std::exp(row[ki] - top));
    for (int64_t ki = 0; ki < k; ++ki) row[ki] /= z;
  }
  double total = 0.0;
  for (int64_t ki = 0; ki < k; ++ki) total += std::sqrt(column_ss(p, n, k, ki, nullptr) / double(n));
  return total / std::sqrt(double(k - 1));
}

/// SPEC §6 step 5, the batch's source shift at a layer from its instance statistics (N, C): the
/// symmetric KL divergence between the per-channel Gaussians of the batch (pooled moments
/// m_b = mean_n mu_i, v_b = mean_n var_i + var_n mu_i, population) and of the source, averaged
/// over channels; with a = v_b + eps, b = var_s + eps, per channel
///   (a / b + b / a) / 2 - 1 + (m_b - mu_s)^2 (1 / a + 1 / b) / 2
/// in double (its ~10 PyTorch ops cost ~50 us a batch on a 2-core CPU); NaN / inf propagate.
/// With signed_shift the result carries the sign of mean_c log(a / b) (+ at 0): negative when
/// the batch's variances are below the source's on average (blur-like), positive above (noise).
/// datta_kernels.diversity.source_shift_reference is the reference (PyTorch ops).
double source_shift(const Stats& st, double eps, bool signed_shift) {
  const int64_t n = st.n, c = st.c;
  double total = 0.0, log_ratio = 0.0;
  for (int64_t ci = 0; ci < c; ++ci) {
    double mean_mu = 0.0, mean_var = 0.0;
    const double ss_mu = column_ss(st.mu, n, c, ci, nullptr, &mean_mu);
    for (int64_t ni = 0; ni < n; ++ni) mean_var += st.vi[ni * c + ci];
    const double a = mean_var / double(n) + ss_mu / double(n) + eps;
    const double b = st.sv[ci] + eps;
    const double d = mean_mu - st.sm[ci];
    total += math::gaussian_sym_kl(a, b, d);
    log_ratio += std::log(a / b);
  }
  const double shift = total / double(c);
  return signed_shift && log_ratio < 0.0 ? -shift : shift;
}

at::Tensor float_scalar(const at::Tensor& like, double v) {
  at::Tensor out = at::empty({}, like.options().dtype(at::kFloat));
  *out.mutable_data_ptr<float>() = static_cast<float>(v);
  return out;
}

at::Tensor probe_spread_cpu(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& source_mean,
                            const at::Tensor& source_var, double eps, const at::Tensor& center,
                            const at::Tensor& scale, const at::Tensor& weight, const at::Tensor& bias) {
  const char* op = "datta::_probe_spread";
  const Stats st = read_stats(mean, var, source_mean, source_var, op);
  return float_scalar(mean, probe_spread(st, read_probe(center, scale, weight, bias, st.c, op), eps));
}

at::Tensor source_shift_cpu(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& source_mean,
                            const at::Tensor& source_var, double eps, bool signed_shift) {
  const Stats st = read_stats(mean, var, source_mean, source_var, "datta::_source_shift");
  return float_scalar(mean, source_shift(st, eps, signed_shift));
}

}  // namespace

/// DATTA's threshold rule at the score layer in one call (datta_kernels.ThresholdSelector, SPEC
/// §6): the batch's prediction spread from the class probe (when one is given), its signed
/// source shift (when a shift range is given) and the decision from the score, in the order
/// and with the NaN rules of ThresholdSelector.update.  Each value is rounded to float32 before
/// it is compared, as the selector compares the float32 tensors the separate ops return.
/// Returns (spread, shift, flags): spread / shift 0-dim float32 (NaN when not computed),
/// flags (2,) bool = (single, skewed); neither set = multiple.  One op instead of three plus
/// the selector's Python: on a small CPU model these were ~0.1 ms of a ~3.5 ms batch.
std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_decide_cpu(
    const at::Tensor& score, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& source_mean,
    const at::Tensor& source_var, double eps, const c10::optional<at::Tensor>& center,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double threshold, double low, c10::optional<double> skew_cut,
    c10::optional<double> shift_lo, c10::optional<double> shift_hi) {
  const char* op = "datta::_threshold_decide";
  TORCH_CHECK(score.numel() == 1 && score.is_floating_point(), op, ": score must hold one float, got ",
              score.sizes());
  const bool has_probe = center.has_value() || scale.has_value() || weight.has_value() || bias.has_value();
  TORCH_CHECK(!has_probe || (center.has_value() && scale.has_value() && weight.has_value() && bias.has_value()),
              op, ": pass all four probe tensors (center, scale, weight, bias) or none");
  TORCH_CHECK(shift_lo.has_value() == shift_hi.has_value(), op, ": pass both ends of the shift range or neither");
  const Stats st = read_stats(mean, var, source_mean, source_var, op);
  std::vector<double> s_value;
  read_as_double(score, s_value);
  const auto as_f32 = [](double v) { return double(static_cast<float>(v)); };
  const double s = as_f32(s_value[0]);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double sp = has_probe ? as_f32(probe_spread(st, read_probe(*center, *scale, *weight, *bias, st.c, op), eps))
                              : nan;
  const double sh = shift_lo.has_value() ? as_f32(source_shift(st, eps, true)) : nan;
  // ThresholdSelector.update: a spread is read only with its cut, a shift only with its range
  // and by a call that can answer skewed (a low cut, or a spread cut and a spread)
  const bool use_sp = skew_cut.has_value() && has_probe;
  const bool can_skew = low != -std::numeric_limits<double>::infinity() || use_sp;
  const bool use_sh = shift_lo.has_value() && can_skew;
  bool single = false, skewed = false;
  if (s >= threshold || std::isnan(s) || (use_sp && std::isnan(sp)) || (use_sh && std::isnan(sh))) {
    // multiple
  } else if ((s < low || (use_sp && sp < *skew_cut)) && (!use_sh || (*shift_lo <= sh && sh <= *shift_hi))) {
    skewed = true;
  } else {
    single = true;
  }
  at::Tensor flags = at::empty({2}, mean.options().dtype(at::kBool));
  flags.mutable_data_ptr<bool>()[0] = single;
  flags.mutable_data_ptr<bool>()[1] = skewed;
  return {float_scalar(mean, sp), float_scalar(mean, sh), flags};
}

}  // namespace datta::cpu

TORCH_LIBRARY_IMPL(datta, CPU, m) {
  m.impl("_dispersion_score", &datta::cpu::dispersion_score_cpu);
  m.impl("_probe_spread", &datta::cpu::probe_spread_cpu);
  m.impl("_source_shift", &datta::cpu::source_shift_cpu);
  m.impl("_threshold_decide", &datta::cpu::threshold_decide_cpu);
}

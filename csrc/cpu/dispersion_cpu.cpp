// CPU kernel op datta::_dispersion_score: the SPEC §2 dispersion score from instance
// statistics.  The (N, C) arrays are tiny, but on small layers the ~18 PyTorch ops of the
// shared implementation (reference.dispersion_score) cost a third of a DABN forward in
// dispatch alone; here it is one loop in double.  Names follow the SPEC:
//   z_mu[n, c]    = (mu_i - mu_s) / sqrt(var_s + eps)
//   z_sigma[n, c] = log((var_i + eps) / (var_s + eps)) / 2            (only when M > 1)
//   score         = mean_f sqrt(mean_n (z[n, f] - zbar[f])^2)         (stat "var": mean_f of the variance)
//   per[n]        = sqrt(mean_f (z[n, f] - zbar[f])^2)
// NaN / inf statistics propagate (the selectors answer "multiple" on a non-finite score).
#include <cmath>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace datta::cpu {
namespace {

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
    double s = 0.0;
    for (int64_t ni = 0; ni < n; ++ni) s += z[ni * f + fi];
    const double zbar = s / double(n);
    double ss = 0.0;
    for (int64_t ni = 0; ni < n; ++ni) {
      const double d = z[ni * f + fi] - zbar;
      ss += d * d;
      per[ni] += d * d;
    }
    total += stat == "std" ? std::sqrt(ss / double(n)) : ss / double(n);
  }
  at::Tensor score = at::empty({}, mean.options().dtype(at::kFloat));
  at::Tensor per_t = at::empty({n}, mean.options().dtype(at::kFloat));
  *score.mutable_data_ptr<float>() = static_cast<float>(total / double(f));
  float* pp = per_t.mutable_data_ptr<float>();
  for (int64_t ni = 0; ni < n; ++ni) pp[ni] = static_cast<float>(std::sqrt(per[ni] / double(f)));
  return {score, per_t};
}

}  // namespace
}  // namespace datta::cpu

TORCH_LIBRARY_IMPL(datta, CPU, m) {
  m.impl("_dispersion_score", &datta::cpu::dispersion_score_cpu);
}

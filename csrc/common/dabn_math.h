// The per-(n, c) formulas of docs/SPEC.md (labels D1-D5) that the CPU glue
// (csrc/cpu/dabn_cpu.cpp, in double) and the CUDA coefficient kernels (csrc/cuda/dabn.cu, in
// the acc type A) share: one source of truth for both compiled backends.  Header-only, inline,
// torch-free; `__host__ __device__` under nvcc, plain `inline` for the host compiler.
//
// Left out: rsqrt(max(v, 0) + eps) (each backend clamps with its own max/fmax) and the loops
// themselves (CPU: host vectors; CUDA: one thread per channel).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DATTA_HD __host__ __device__ __forceinline__
#else
#define DATTA_HD inline
#endif

namespace datta::math {

/// SPEC D1, the edge rules: a weight whose statistic is undefined moves to the source
/// (M <= 1: the instance weight; N*M <= 1: the batch weight).  Shape facts only.
template <typename A>
DATTA_HD void edge_rules(A& ws, A& wb, A& wi, int64_t n, int64_t m) {
  if (m <= 1) {
    ws += wi;
    wi = A(0);
  }
  if (n * m <= 1) {
    ws += wb;
    wb = A(0);
  }
}

/// SPEC D1 with the batch of another tensor (a process group's global batch, counted in
/// elements; datta_kernels.distributed): its weight moves to the source unless count > 1.
template <typename A>
DATTA_HD void edge_rules_count(A& ws, A& wb, A& wi, A count, int64_t m) {
  if (m <= 1) {
    ws += wi;
    wi = A(0);
  }
  if (!(count > A(1))) {
    ws += wb;
    wb = A(0);
  }
}

/// SPEC D2: softshrink(z, lam) = sign(z) max(|z| - lam, 0), written with comparisons so a NaN
/// statistic stays NaN (z * 0) instead of being shrunk to 0, as in the reference.
template <typename A>
DATTA_HD A softshrink(A z, A lam) {
  if (z > lam) return z - lam;
  if (z < -lam) return z + lam;
  return z * A(0);
}

/// SPEC D3's weighted term: w * s where w != 0, else 0 (a statistic of weight 0 is never read,
/// so an inf/NaN in it cannot leak through 0 * inf = NaN; SPEC §3 "Non-finite input").
template <typename A>
DATTA_HD A weighted(A w, A s) {
  return w != A(0) ? w * s : A(0);
}

/// SPEC D3: the blended moment w_s s + w_b b + w_i i, terms of weight 0 not read.
template <typename A>
DATTA_HD A blend3(A ws, A s, A wb, A b, A wi, A i) {
  return weighted(ws, s) + weighted(wb, b) + weighted(wi, i);
}

/// SPEC D4: one sample's term of (N M - 1) var_B, (M - 1) var_i + M (mu_i - mu_B)^2.
template <typename A>
DATTA_HD A batch_ss_term(A mu_i, A var_i, A mu_b, int64_t m) {
  const A d = mu_i - mu_b;
  return A(m - 1) * var_i + A(m) * d * d;
}

/// SPEC §6 step 5 / §3c "Reset": one channel's symmetric KL divergence between two Gaussians
/// with variances a and b (eps included) whose means differ by d.
template <typename A>
DATTA_HD A gaussian_sym_kl(A a, A b, A d) {
  return A(0.5) * (a / b + b / a) - A(1) + A(0.5) * d * d * (A(1) / a + A(1) / b);
}

/// SPEC D4: var_B from the summed terms; 0 when N*M <= 1 (undefined; D1 drops w_b then).
template <typename A>
DATTA_HD A batch_var(A ss, int64_t n, int64_t m) {
  return n * m > 1 ? ss / A(n * m - 1) : A(0);
}

/// SPEC D5, the per-(n, c) terms of the backward (r = rsqrt(max(v, 0) + eps), g = gamma):
/// sdyxh = r (sdyxc + (mu_i - m) sdy), dm = -g r sdy, dv = -g r^2 sdyxh / 2 (0 where v < 0).
template <typename A>
struct BackwardTerms {
  A sdyxh, dm, dv;
};

template <typename A>
DATTA_HD BackwardTerms<A> backward_terms(A g, A r, A v, A m, A mu_i, A sdy, A sdyxc) {
  BackwardTerms<A> t;
  t.sdyxh = r * (sdyxc + (mu_i - m) * sdy);
  t.dm = -g * r * sdy;
  t.dv = v >= A(0) ? A(-0.5) * g * r * r * t.sdyxh : A(0);
  return t;
}

/// SPEC D5, the instance part of B and C0: B = 2 dvar_i / (M - 1) [M > 1], C0 = dmu_i / M
/// (dmu_i = w_i dm keep_mu, dvar_i = w_i dv keep_var, both weighted()).
template <typename A>
DATTA_HD void instance_coefs(A dmu_i, A dvar_i, int64_t m, A& coef_b, A& coef_c0) {
  coef_b = m > 1 ? A(2) * dvar_i / A(m - 1) : A(0);
  coef_c0 = dmu_i / A(m);
}

/// SPEC D5, the batch part added to B and C0 (dmu_B = w_b sum_n dm, dvar_B = w_b sum_n dv):
/// C0 += dmu_B / (N M);  [N M > 1]: B += 2 dvar_B / (N M - 1),
/// C0 += 2 dvar_B (mu_i - mu_B) / (N M - 1) (weighted: left out where dvar_B = 0).
template <typename A>
DATTA_HD void add_batch_coefs(A dmu_b, A dvar_b, A mu_i, A mu_b, int64_t n, int64_t m, A& coef_b,
                              A& coef_c0) {
  const int64_t nm = n * m;
  coef_c0 = coef_c0 + dmu_b / A(nm);
  if (nm > 1) {
    coef_b += A(2) * dvar_b / A(nm - 1);
    coef_c0 += weighted(A(2) * dvar_b / A(nm - 1), mu_i - mu_b);
  }
}

/// add_batch_coefs with the batch counted in elements (count = N M of the batch whose terms
/// these are, e.g. a process group's): C0 += dmu_B / max(count, 1); [count > 1]:
/// B += 2 dvar_B / (count - 1), C0 += 2 dvar_B (mu_i - mu_B) / (count - 1) (weighted).
template <typename A>
DATTA_HD void add_batch_coefs_count(A dmu_b, A dvar_b, A mu_i, A mu_b, A count, A& coef_b,
                                    A& coef_c0) {
  coef_c0 = coef_c0 + dmu_b / (count > A(1) ? count : A(1));
  if (count > A(1)) {
    coef_b += A(2) * dvar_b / (count - A(1));
    coef_c0 += weighted(A(2) * dvar_b / (count - A(1)), mu_i - mu_b);
  }
}

}  // namespace datta::math

#undef DATTA_HD

// The synced layer's per-(n, c) math on CUDA (SPEC D1-D3, D5 with the statistics of another
// batch given; the CPU twin is csrc/cpu/sync_coefs_cpu.cpp, the oracle
// datta_kernels.reference.blend_moments / dabn_backward_coefficients).  One thread per
// channel walks the batch in order n = 0..N-1 (fixed-order sums: deterministic, no atomics);
// the blend weights and the batch count are read on the device, never on the host.
#include "../common/dabn_math.h"
#include "common.cuh"

namespace datta::cuda {
namespace {

template <typename A>
struct SyncChannel {
  A ws, wb, wi, count, ms, vs, mu_b, var_b, g, lam_mu, lam_var;
};

template <typename A>
__device__ SyncChannel<A> sync_channel(const SyncCoefParams& p, int64_t ci) {
  const A* blend = static_cast<const A*>(p.blend);
  SyncChannel<A> ch;
  ch.ws = blend[0];
  ch.wb = blend[1];
  ch.wi = blend[2];
  ch.count = A(*p.batch_count);
  math::edge_rules_count(ch.ws, ch.wb, ch.wi, ch.count, p.m);  // SPEC D1 on the given batch
  ch.ms = static_cast<const A*>(p.source_mean)[ci];
  ch.vs = static_cast<const A*>(p.source_var)[ci];
  ch.mu_b = static_cast<const A*>(p.batch_mean)[ci];
  ch.var_b = static_cast<const A*>(p.batch_var)[ci];
  ch.g = p.weight ? static_cast<const A*>(p.weight)[ci] : A(1);
  const A sv = ch.vs + A(p.eps);  // SPEC D2: k s_mu, k s_sigma
  ch.lam_mu = A(p.shrink_k) * sqrt_(sv / A(p.m));
  ch.lam_var = A(p.shrink_k) * sv * A(sqrt(2.0 / double(p.m > 1 ? p.m - 1 : 1)));
  return ch;
}

/// SPEC D2 + D3 at i = (n, c): blended m, v and D5's softshrink pass-through masks.
template <typename A>
__device__ void sync_blend(const SyncCoefParams& p, const SyncChannel<A>& ch, int64_t i, A& m, A& v,
                           A& keep_mu, A& keep_var) {
  A mi = static_cast<const A*>(p.mean_i)[i], vi = static_cast<const A*>(p.var_i)[i];
  keep_mu = keep_var = A(1);
  if (p.shrink && p.m > 1) {
    const A zmu = mi - ch.ms, zvar = vi - ch.vs;
    keep_mu = abs_(zmu) > ch.lam_mu ? A(1) : A(0);
    keep_var = abs_(zvar) > ch.lam_var ? A(1) : A(0);
    mi = ch.ms + math::softshrink(zmu, ch.lam_mu);
    vi = ch.vs + math::softshrink(zvar, ch.lam_var);
  }
  m = math::blend3(ch.ws, ch.ms, ch.wb, ch.mu_b, ch.wi, mi);
  v = math::blend3(ch.ws, ch.vs, ch.wb, ch.var_b, ch.wi, vi);
}

/// SPEC D5's terms at i (math::backward_terms) with r and the masks.
template <typename A>
__device__ math::BackwardTerms<A> sync_terms(const SyncCoefParams& p, const SyncChannel<A>& ch, int64_t i, A& r,
                                             A& keep_mu, A& keep_var) {
  A m, v;
  sync_blend(p, ch, i, m, v, keep_mu, keep_var);
  r = rsqrt_(max_(v, A(0)) + A(p.eps));
  return math::backward_terms(ch.g, r, v, m, static_cast<const A*>(p.mean_i)[i],
                              static_cast<const A*>(p.sdy)[i], static_cast<const A*>(p.sdyxc)[i]);
}

template <typename A>
__global__ void __launch_bounds__(cfg::kTinyThreads) blend_moments_kernel(SyncCoefParams p) {
  const int64_t ci = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ci >= p.c) return;
  const SyncChannel<A> ch = sync_channel<A>(p, ci);
  A keep_mu, keep_var;
  for (int64_t k = 0; k < p.n; ++k) {
    const int64_t i = k * p.c + ci;
    sync_blend(p, ch, i, static_cast<A*>(p.mean)[i], static_cast<A*>(p.var)[i], keep_mu, keep_var);
  }
}

template <typename A>
__global__ void __launch_bounds__(cfg::kTinyThreads) batch_terms_kernel(SyncCoefParams p) {
  const int64_t ci = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ci >= p.c) return;
  const SyncChannel<A> ch = sync_channel<A>(p, ci);
  A sum_sdy = A(0), sum_sdyxh = A(0), sum_dm = A(0), sum_dv = A(0), r, keep_mu, keep_var;
  for (int64_t k = 0; k < p.n; ++k) {
    const int64_t i = k * p.c + ci;
    const math::BackwardTerms<A> t = sync_terms(p, ch, i, r, keep_mu, keep_var);
    sum_sdy += static_cast<const A*>(p.sdy)[i];
    sum_sdyxh += t.sdyxh;
    sum_dm += t.dm;
    sum_dv += t.dv;
  }
  static_cast<A*>(p.dbias)[ci] = sum_sdy;
  static_cast<A*>(p.dweight)[ci] = sum_sdyxh;
  p.batch_terms[ci] = double(math::weighted(ch.wb, sum_dm));  // dmu_B = w_b sum_n dm
  p.batch_terms[p.c + ci] = double(math::weighted(ch.wb, sum_dv));
}

template <typename A>
__global__ void __launch_bounds__(cfg::kTinyThreads) coefficients_kernel(SyncCoefParams p) {
  const int64_t ci = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ci >= p.c) return;
  const SyncChannel<A> ch = sync_channel<A>(p, ci);
  const A dmu_b = A(p.batch_terms_in[ci]), dvar_b = A(p.batch_terms_in[p.c + ci]);
  A r, keep_mu, keep_var;
  for (int64_t k = 0; k < p.n; ++k) {
    const int64_t i = k * p.c + ci;
    const math::BackwardTerms<A> t = sync_terms(p, ch, i, r, keep_mu, keep_var);
    // terms of weight 0 are not read (weighted)
    const A dmu_i = math::weighted(ch.wi, t.dm * keep_mu), dvar_i = math::weighted(ch.wi, t.dv * keep_var);
    A cb, cc;
    math::instance_coefs(dmu_i, dvar_i, p.m, cb, cc);
    math::add_batch_coefs_count(dmu_b, dvar_b, static_cast<const A*>(p.mean_i)[i], ch.mu_b, ch.count, cb, cc);
    static_cast<A*>(p.coef_a)[i] = ch.g * r;
    static_cast<A*>(p.coef_b)[i] = cb;
    static_cast<A*>(p.coef_c0)[i] = cc;
  }
}


/// SPEC D4 for this slice: one thread per channel (N = 0 packs zeros).
template <typename A>
__global__ void __launch_bounds__(cfg::kTinyThreads) batch_local_kernel(SyncCoefParams p) {
  const int64_t ci = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ci == 0) {
    p.packed[0] = double(p.n * p.m);
    p.packed[2 * p.c + 1] = double(p.n);
  }
  if (ci >= p.c) return;
  const A* mu = static_cast<const A*>(p.mean_i);
  const A* vr = static_cast<const A*>(p.var_i);
  double sum = 0.0, ss = 0.0;
  for (int64_t k = 0; k < p.n; ++k) sum += double(mu[k * p.c + ci]);
  const double mean = sum / double(p.n > 0 ? p.n : 1);
  for (int64_t k = 0; k < p.n; ++k) ss += math::batch_ss_term(double(mu[k * p.c + ci]), double(vr[k * p.c + ci]), mean, p.m);
  p.packed[1 + ci] = mean;
  p.packed[1 + p.c + ci] = ss;
}

/// Chan's merge of the packs in rank order, one thread per channel (the same double
/// operations as the CPU's and the reference's: every rank gets the same bits).
template <typename A>
__global__ void __launch_bounds__(cfg::kTinyThreads) batch_merge_kernel(SyncCoefParams p) {
  const int64_t ci = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t k = 2 * p.c + 2;
  if (ci == 0) {
    double samples = 0.0, count = 0.0;
    for (int64_t q = 0; q < p.world; ++q) {
      samples += p.rows[q * k + k - 1];
      count += p.rows[q * k];
    }
    *p.samples_out = samples;
    *p.count_out = count;
  }
  if (ci >= p.c) return;
  double cnt = p.rows[0], mu = p.rows[1 + ci], m2 = p.rows[1 + p.c + ci];
  for (int64_t q = 1; q < p.world; ++q) {
    const double n_b = p.rows[q * k], n_ab = cnt + n_b, safe = n_ab > 1.0 ? n_ab : 1.0;
    const double delta = p.rows[q * k + 1 + ci] - mu;
    mu = mu + delta * (n_b / safe);
    m2 = m2 + p.rows[q * k + 1 + p.c + ci] + delta * delta * (cnt * n_b / safe);
    cnt = n_ab;
  }
  static_cast<A*>(p.mean)[ci] = A(mu);
  static_cast<A*>(p.var)[ci] = A(cnt > 1.0 ? m2 / (cnt - 1.0) : 0.0);
}

unsigned channel_grid(int64_t c) { return unsigned(ceil_div(c, cfg::kTinyThreads)); }

}  // namespace

cudaError_t batch_moments_local(const SyncCoefParams& p, cudaStream_t stream) {
  const unsigned grid = channel_grid(p.c > 0 ? p.c : 1);
  if (p.f64) {
    batch_local_kernel<double><<<grid, cfg::kTinyThreads, 0, stream>>>(p);
  } else {
    batch_local_kernel<float><<<grid, cfg::kTinyThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t batch_moments_merge(const SyncCoefParams& p, cudaStream_t stream) {
  const unsigned grid = channel_grid(p.c > 0 ? p.c : 1);
  if (p.f64) {
    batch_merge_kernel<double><<<grid, cfg::kTinyThreads, 0, stream>>>(p);
  } else {
    batch_merge_kernel<float><<<grid, cfg::kTinyThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t blend_moments(const SyncCoefParams& p, cudaStream_t stream) {
  if (p.n * p.c == 0) return cudaSuccess;
  if (p.f64) {
    blend_moments_kernel<double><<<channel_grid(p.c), cfg::kTinyThreads, 0, stream>>>(p);
  } else {
    blend_moments_kernel<float><<<channel_grid(p.c), cfg::kTinyThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t backward_batch_terms(const SyncCoefParams& p, cudaStream_t stream) {
  if (p.c == 0) return cudaSuccess;
  if (p.f64) {
    batch_terms_kernel<double><<<channel_grid(p.c), cfg::kTinyThreads, 0, stream>>>(p);
  } else {
    batch_terms_kernel<float><<<channel_grid(p.c), cfg::kTinyThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t backward_coefficients(const SyncCoefParams& p, cudaStream_t stream) {
  if (p.n * p.c == 0) return cudaSuccess;
  if (p.f64) {
    coefficients_kernel<double><<<channel_grid(p.c), cfg::kTinyThreads, 0, stream>>>(p);
  } else {
    coefficients_kernel<float><<<channel_grid(p.c), cfg::kTinyThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace datta::cuda

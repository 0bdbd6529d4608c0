// DABN on CUDA (SPEC §1, §3): instance statistics, the blended forward and its backward.
//
//   instance_stats: reduce(MomentsOp)                       -> mean, var          (reads x once)
//   dabn_forward:   reduce(MomentsOp) -> forward_coefs -> apply  -> y            (reads x twice)
//   dabn_normalize: forward_coefs -> apply -> y  (instance statistics given; reads x once)
//   dabn_backward:  reduce(DySumsOp)  -> backward_coefs -> apply(dy) -> dx      (reads x, dy twice)
//   dabn_backward_sums / dabn_backward_apply: the backward's two passes alone (the caller,
//                   datta_kernels.distributed, computes the coefficients in between)
//
// The reduce / apply passes stream the tensors (passes.cuh); the coefficient kernels are
// tiny: a CTA covers 32 channels (coalesced lanes) by 8 slices of the batch (a thread walks
// n = slice, slice + 8, ...), and batch statistics, dweight and dbias are those slices' sums
// merged by a fixed tree over the slices (deterministic, no atomics).  One thread per channel
// walking all N in turn (as before) took 10 us forward and 62 us backward at N = 64, C = 256
// on an H200, a few CTAs of serial latency; now 5 us forward and 12 us backward
// (bench/results/h200_profile_aa395c1.md -> h200_profile.md).  The blend weights are
// read from device memory here, never copied to the host.  The labels D1-D5 of docs/SPEC.md
// are cited where each per-(n, c) formula is implemented.
#include "../common/dabn_math.h"
#include "passes.cuh"

namespace datta::cuda {
namespace {

/// Everything the per-channel kernels read; (C,) arrays may be nullptr where SPEC allows.
template <typename A>
struct ChannelArgs {
  const A* blend;   // (3,) w_s, w_b, w_i
  const A* smean;   // (C,)
  const A* svar;    // (C,)
  const A* weight;  // (C,) or nullptr (gamma = 1)
  const A* bias;    // (C,) or nullptr (beta = 0)
  const A* mean;    // (N, C) instance mean mu_i
  const A* var;     // (N, C) instance variance sigma^2_i
  int64_t n, c, m;
  A eps, k;
  bool shrink;
};

/// Per-channel constants: effective weights (SPEC D1), batch (D4) and source moments, shrink
/// thresholds (D2).
template <typename A>
struct Channel {
  A ws, wb, wi;
  A mu_b, var_b;  // batch moments from the instance moments (SPEC §1)
  A ms, vs, g, beta;
  A lam_mu, lam_var;  // shrink thresholds k s_mu, k s_sigma
};

/// The coefficient kernels' CTA: kCoefLanes channels by kCoefSlices slices of the batch.
constexpr int kCoefLanes = 32, kCoefSlices = 8;

/// Sum over the CTA's slices of each lane's v (fixed tree; every thread calls it, the result
/// is returned to every thread).  buf: kCoefSlices * kCoefLanes doubles of shared memory.
__device__ __forceinline__ double slice_sum(double v, double* buf) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  buf[ty * kCoefLanes + tx] = v;
  __syncthreads();
#pragma unroll
  for (int step = kCoefSlices / 2; step > 0; step /= 2) {
    if (ty < step) buf[ty * kCoefLanes + tx] += buf[(ty + step) * kCoefLanes + tx];
    __syncthreads();
  }
  const double r = buf[tx];
  __syncthreads();  // buf is reused by the next call
  return r;
}

/// Channel ci's constants (every thread of the CTA calls it; ci >= C gives zeros): the batch
/// moments are summed over the CTA's slices of n.
template <typename A>
__device__ Channel<A> load_channel(const ChannelArgs<A>& a, int64_t ci, double* buf) {
  const bool on = ci < a.c;
  Channel<A> ch{};
  if (on) {
    ch.ws = a.blend[0];
    ch.wb = a.blend[1];
    ch.wi = a.blend[2];
  }
  // SPEC D1: shape facts, no data dependence: undefined statistics hand their weight to the
  // source (common/dabn_math.h, shared with the CPU).
  math::edge_rules(ch.ws, ch.wb, ch.wi, a.n, a.m);
  // SPEC D4: mu_B = mean_n mu_i;  (N M - 1) var_B = sum_n [(M - 1) var_i + M (mu_i - mu_B)^2],
  // summed in double as on the CPU and in sync_coefs.cu: the instance means share the input's
  // offset, and a float running sum of N of them (1e4 + noise, N = 256) put mu_B off by
  // ~5e-3, enough to fail dweight against float64 on the H200 (scripts/gpu_sweep.py).
  double sum = 0.0;
  if (on)
    for (int64_t k = threadIdx.y; k < a.n; k += kCoefSlices) sum += double(a.mean[k * a.c + ci]);
  const double mu_b = slice_sum(sum, buf) / double(a.n);
  double ss = 0.0;
  if (on)
    for (int64_t k = threadIdx.y; k < a.n; k += kCoefSlices)
      ss += math::batch_ss_term(double(a.mean[k * a.c + ci]), double(a.var[k * a.c + ci]), mu_b, a.m);
  ss = slice_sum(ss, buf);
  if (!on) return ch;
  ch.mu_b = A(mu_b);
  ch.var_b = A(math::batch_var(ss, a.n, a.m));
  ch.ms = a.smean[ci];
  ch.vs = a.svar[ci];
  ch.g = a.weight ? a.weight[ci] : A(1);
  ch.beta = a.bias ? a.bias[ci] : A(0);
  // SPEC D2: s_mu = sqrt((var_s + eps) / M),  s_sigma = (var_s + eps) sqrt(2 / (M - 1)).
  const A sv = ch.vs + a.eps;
  ch.lam_mu = a.k * sqrt_(sv / A(a.m));
  ch.lam_var = a.k * (sv * A(sqrt(2.0 / double(a.m > 1 ? a.m - 1 : 1))));
  return ch;
}

// SPEC D3's weighted term, shared with the CPU (common/dabn_math.h).
using math::weighted;

/// Blended moments of one (n, c) and the softshrink pass-through masks.
template <typename A>
struct Blended {
  A m, v;
  A keep_mu, keep_var;  // d(shrunk)/d(raw): 1 outside the dead zone, 0 inside
};

/// SPEC D3 (and D2 when shrinking):
/// m = w_s mu_s + w_b mu_B + w_i mu~_i,  v = w_s var_s + w_b var_B + w_i var~_i, with
/// mu~_i = mu_s + softshrink(mu_i - mu_s, k s_mu) (likewise var~_i) when shrinking (M > 1);
/// terms of weight 0 are not read (weighted()).
template <typename A>
__device__ __forceinline__ Blended<A> blend(const ChannelArgs<A>& a, const Channel<A>& ch, A mi, A vi) {
  Blended<A> r{A(0), A(0), A(1), A(1)};
  if (a.shrink && a.m > 1) {
    const A zmu = mi - ch.ms, zvar = vi - ch.vs;
    r.keep_mu = abs_(zmu) > ch.lam_mu ? A(1) : A(0);
    r.keep_var = abs_(zvar) > ch.lam_var ? A(1) : A(0);
    mi = ch.ms + math::softshrink(zmu, ch.lam_mu);
    vi = ch.vs + math::softshrink(zvar, ch.lam_var);
  }
  r.m = math::blend3(ch.ws, ch.ms, ch.wb, ch.mu_b, ch.wi, mi);
  r.v = math::blend3(ch.ws, ch.vs, ch.wb, ch.var_b, ch.wi, vi);
  return r;
}

/// SPEC D3, forward coefficients: y = b (x - mu) + c0 with mu = m,
/// b = rsqrt(max(v, 0) + eps) gamma, c0 = beta.  (x - m) is formed before scaling, as in the
/// reference, so a large common offset of x and m cancels exactly instead of through
/// x * scale - m * scale.
template <typename A>
__global__ void __launch_bounds__(kCoefLanes * kCoefSlices)
forward_coefs_kernel(ChannelArgs<A> a, A* coef_mu, A* coef_b, A* coef_c0) {
  __shared__ double buf[kCoefSlices * kCoefLanes];
  const int64_t ci = int64_t(blockIdx.x) * kCoefLanes + threadIdx.x;
  const Channel<A> ch = load_channel(a, ci, buf);
  if (ci >= a.c) return;
  for (int64_t k = threadIdx.y; k < a.n; k += kCoefSlices) {
    const int64_t i = k * a.c + ci;
    const Blended<A> bl = blend(a, ch, a.mean[i], a.var[i]);
    coef_mu[i] = bl.m;
    coef_b[i] = rsqrt_(max_(bl.v, A(0)) + a.eps) * ch.g;
    coef_c0[i] = ch.beta;
  }
}

// SPEC D5, backward coefficients, per channel c (a lane; its slices of n in parallel), in this
// kernel's names (the reference is datta_kernels.reference.dabn_backward).  Per n, with i = (n, c):
//   m, v       blended moments;  r = rsqrt(max(v, 0) + eps);  g = gamma[c]
//   sdy        = sum_p dy,   sdyxc = sum_p dy (x - mu_i)                  (pass 1)
//   sdyxh      = r (sdyxc + (mu_i - m) sdy)                               (= sum_p dy xhat)
//   dbias     += sdy,        dweight += sdyxh               (double, slices merged by a fixed tree)
//   dm         = -g r sdy,   dv = -g r^2 sdyxh / 2   (dv = 0 where v < 0: the clamp)
//   dmu_i      = w_i dm keep_mu,   dvar_i = w_i dv keep_var                (softshrink masks)
//   dmu_B      = w_b sum_n dm,     dvar_B = w_b sum_n dv
//   coef_a     = g r
//   coef_b     = 2 dvar_i / (M - 1) [M > 1]  +  2 dvar_B / (N M - 1) [N M > 1]
//   coef_c0    = dmu_i / M + dmu_B / (N M) + 2 dvar_B (mu_i - mu_B) / (N M - 1) [N M > 1]
// and pass 2 writes dx = coef_a dy + coef_b (x - mu_i) + coef_c0 (the coef_b term only where
// coef_b != 0).  Every "w * term" is weighted(w, term): a statistic of weight 0, an inf/NaN
// one included, never reaches dx.  The first loop writes the per-n terms; the second adds
// the batch terms, which need the sums over all n (each thread rewrites only its own n).
template <typename A>
__global__ void __launch_bounds__(kCoefLanes * kCoefSlices)
backward_coefs_kernel(ChannelArgs<A> a, const A* sdy_in, const A* sdyxc_in, A* coef_a, A* coef_b,
                      A* coef_c0, A* dweight, A* dbias) {
  __shared__ double buf[kCoefSlices * kCoefLanes];
  const int64_t ci = int64_t(blockIdx.x) * kCoefLanes + threadIdx.x;
  const bool on = ci < a.c;
  const Channel<A> ch = load_channel(a, ci, buf);
  // this slice's sums, in double (merged over the slices by slice_sum)
  double sum_sdy = 0.0, sum_sdyxh = 0.0, sum_dm = 0.0, sum_dv = 0.0;
  for (int64_t k = threadIdx.y; on && k < a.n; k += kCoefSlices) {
    const int64_t i = k * a.c + ci;
    const A mi = a.mean[i];
    const Blended<A> bl = blend(a, ch, mi, a.var[i]);
    const A r = rsqrt_(max_(bl.v, A(0)) + a.eps);
    const A sdy = sdy_in[i];
    const math::BackwardTerms<A> t = math::backward_terms(ch.g, r, bl.v, bl.m, mi, sdy, sdyxc_in[i]);
    sum_sdy += double(sdy);
    sum_sdyxh += double(t.sdyxh);
    sum_dm += double(t.dm);
    sum_dv += double(t.dv);
    const A dmu_i = weighted(ch.wi, t.dm * bl.keep_mu), dvar_i = weighted(ch.wi, t.dv * bl.keep_var);
    coef_a[i] = ch.g * r;
    A cb, cc;
    math::instance_coefs(dmu_i, dvar_i, a.m, cb, cc);
    coef_b[i] = cb;
    coef_c0[i] = cc;
  }
  sum_sdy = slice_sum(sum_sdy, buf);
  sum_sdyxh = slice_sum(sum_sdyxh, buf);
  sum_dm = slice_sum(sum_dm, buf);
  sum_dv = slice_sum(sum_dv, buf);
  if (!on) return;
  if (threadIdx.y == 0) {
    dbias[ci] = A(sum_sdy);
    dweight[ci] = A(sum_sdyxh);
  }
  const A dmu_b = weighted(ch.wb, A(sum_dm)), dvar_b = weighted(ch.wb, A(sum_dv));
  for (int64_t k = threadIdx.y; k < a.n; k += kCoefSlices) {  // this thread's own n: no sync needed
    const int64_t i = k * a.c + ci;
    A cb = coef_b[i], cc = coef_c0[i];
    math::add_batch_coefs(dmu_b, dvar_b, a.mean[i], ch.mu_b, a.n, a.m, cb, cc);
    coef_b[i] = cb;
    coef_c0[i] = cc;
  }
}

/// The workspace layout of the DABN launchers, in one place (sizing and launching share it).
template <typename A>
struct Scratch {
  ShiftedSums<A>* moment_partials = nullptr;  // MomentsOp<A>::State
  DySums<A>* dy_partials = nullptr;
  A* sdy = nullptr;
  A* sdyxc = nullptr;
  A* coef_mu = nullptr;
  A* coef_a = nullptr;
  A* coef_b = nullptr;
  A* coef_c0 = nullptr;
  size_t bytes = 0;
};

template <typename A>
Scratch<A> carve(Op op, const Params& p, const Plan& plan, void* base) {
  const int64_t nc = p.n * p.c, parts = plan.splits > 1 ? nc * plan.splits : 0;
  Carver cv{static_cast<char*>(base)};
  Scratch<A> s;
  if (op == Op::kInstanceStats || op == Op::kDabnForward) s.moment_partials = cv.take<ShiftedSums<A>>(parts);
  if (op == Op::kDabnForward || op == Op::kDabnNormalize) {
    s.coef_mu = cv.take<A>(nc);
    s.coef_b = cv.take<A>(nc);
    s.coef_c0 = cv.take<A>(nc);
  }
  if (op == Op::kDabnBackward || op == Op::kDabnBackwardSums) s.dy_partials = cv.take<DySums<A>>(parts);
  if (op == Op::kDabnBackward) {
    s.sdy = cv.take<A>(nc);
    s.sdyxc = cv.take<A>(nc);
    s.coef_a = cv.take<A>(nc);
    s.coef_b = cv.take<A>(nc);
    s.coef_c0 = cv.take<A>(nc);
  }
  s.bytes = cv.used;
  return s;
}

template <typename A>
ChannelArgs<A> channel_args(const Params& p) {
  return {static_cast<const A*>(p.blend), static_cast<const A*>(p.source_mean),
          static_cast<const A*>(p.source_var), static_cast<const A*>(p.weight),
          static_cast<const A*>(p.bias), static_cast<const A*>(p.mean),
          static_cast<const A*>(p.var), p.n, p.c, p.m, A(p.eps), A(p.shrink_k), p.shrink};
}

bool empty_problem(const Params& p) { return p.n * p.c == 0 || p.m == 0; }

unsigned coef_grid(int64_t channels) { return unsigned(ceil_div(channels, kCoefLanes)); }
dim3 coef_block() { return dim3(kCoefLanes, kCoefSlices); }

template <typename T>
void launch_moments(const Params& p, const Plan& plan, ShiftedSums<acc_t<T>>* partials, cudaStream_t stream) {
  using A = acc_t<T>;
  ReduceArgs<T, MomentsOp<A>> r{static_cast<const T*>(p.x), nullptr, nullptr, p.n, p.c, p.m, plan,
                                partials, static_cast<A*>(p.mean), static_cast<A*>(p.var)};
  launch_reduce(p, r, stream);
}

/// Pass 2 of the forward: per-(n, c) coefficients from the instance statistics in p.mean /
/// p.var (written by launch_moments, or given), then y = coef_b (x - coef_mu) + coef_c0.
template <typename T>
void launch_normalize(const Params& p, const Plan& plan, const Scratch<acc_t<T>>& s, cudaStream_t stream) {
  using A = acc_t<T>;
  forward_coefs_kernel<A>
      <<<coef_grid(p.c), coef_block(), 0, stream>>>(channel_args<A>(p), s.coef_mu, s.coef_b, s.coef_c0);
  ApplyArgs<T> ap{static_cast<const T*>(p.x), nullptr, static_cast<T*>(p.y), s.coef_mu, nullptr,
                  s.coef_b, s.coef_c0, p.n, p.c, p.m, plan};
  launch_apply<T, false>(p, ap, stream);
}

/// Backward pass 1: sdy, sdyxc <- sum_p dy, sum_p dy (x - p.mean) per (n, c).
template <typename T>
void launch_dy_sums(const Params& p, const Plan& plan, DySums<acc_t<T>>* partials, acc_t<T>* sdy,
                    acc_t<T>* sdyxc, cudaStream_t stream) {
  using A = acc_t<T>;
  ReduceArgs<T, DySumsOp<A>> r{static_cast<const T*>(p.x), static_cast<const T*>(p.dy),
                              static_cast<const A*>(p.mean), p.n, p.c, p.m, plan, partials, sdy, sdyxc};
  launch_reduce(p, r, stream);
}

}  // namespace

size_t workspace_bytes(Op op, const Params& p) {
  if (empty_problem(p)) return 0;
  if (op == Op::kDiversityAngles) return angles_workspace_bytes(p);
  const Plan plan = make_plan(p);
  return p.dtype == ElemType::kFloat64 ? carve<double>(op, p, plan, nullptr).bytes
                                       : carve<float>(op, p, plan, nullptr).bytes;
}

cudaError_t instance_stats(const Params& p, cudaStream_t stream) {
  if (empty_problem(p)) return cudaSuccess;
  return dispatch_elem(p.dtype, cudaErrorInvalidValue, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Plan plan = make_plan(p);
    const auto s = carve<acc_t<T>>(Op::kInstanceStats, p, plan, p.workspace);
    launch_moments<T>(p, plan, s.moment_partials, stream);
    return cudaGetLastError();
  });
}

cudaError_t dabn_forward(const Params& p, cudaStream_t stream) {
  if (empty_problem(p)) return cudaSuccess;
  return dispatch_elem(p.dtype, cudaErrorInvalidValue, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const Plan plan = make_plan(p);
    const auto s = carve<A>(Op::kDabnForward, p, plan, p.workspace);
    launch_moments<T>(p, plan, s.moment_partials, stream);
    launch_normalize<T>(p, plan, s, stream);
    return cudaGetLastError();
  });
}

cudaError_t dabn_normalize(const Params& p, cudaStream_t stream) {
  if (empty_problem(p)) return cudaSuccess;
  return dispatch_elem(p.dtype, cudaErrorInvalidValue, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Plan plan = make_plan(p);
    launch_normalize<T>(p, plan, carve<acc_t<T>>(Op::kDabnNormalize, p, plan, p.workspace), stream);
    return cudaGetLastError();
  });
}

cudaError_t dabn_backward(const Params& p, cudaStream_t stream) {
  if (empty_problem(p)) return cudaSuccess;
  return dispatch_elem(p.dtype, cudaErrorInvalidValue, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const Plan plan = make_plan(p);
    const auto s = carve<A>(Op::kDabnBackward, p, plan, p.workspace);
    const A* mean = static_cast<const A*>(p.mean);
    launch_dy_sums<T>(p, plan, s.dy_partials, s.sdy, s.sdyxc, stream);
    backward_coefs_kernel<A><<<coef_grid(p.c), coef_block(), 0, stream>>>(
        channel_args<A>(p), s.sdy, s.sdyxc, s.coef_a, s.coef_b, s.coef_c0, static_cast<A*>(p.dweight),
        static_cast<A*>(p.dbias));
    ApplyArgs<T> ap{static_cast<const T*>(p.x), static_cast<const T*>(p.dy), static_cast<T*>(p.dx), mean,
                    s.coef_a, s.coef_b, s.coef_c0, p.n, p.c, p.m, plan};
    launch_apply<T, true>(p, ap, stream);
    return cudaGetLastError();
  });
}

cudaError_t dabn_backward_sums(const Params& p, cudaStream_t stream) {
  if (empty_problem(p)) return cudaSuccess;
  return dispatch_elem(p.dtype, cudaErrorInvalidValue, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const Plan plan = make_plan(p);
    const auto s = carve<A>(Op::kDabnBackwardSums, p, plan, p.workspace);
    launch_dy_sums<T>(p, plan, s.dy_partials, static_cast<A*>(p.sdy), static_cast<A*>(p.sdyxc), stream);
    return cudaGetLastError();
  });
}

cudaError_t dabn_backward_apply(const Params& p, cudaStream_t stream) {
  if (empty_problem(p)) return cudaSuccess;
  return dispatch_elem(p.dtype, cudaErrorInvalidValue, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const Plan plan = make_plan(p);
    ApplyArgs<T> ap{static_cast<const T*>(p.x), static_cast<const T*>(p.dy), static_cast<T*>(p.dx),
                    static_cast<const A*>(p.mean), static_cast<const A*>(p.coef_a),
                    static_cast<const A*>(p.coef_b), static_cast<const A*>(p.coef_c0), p.n, p.c, p.m, plan};
    launch_apply<T, true>(p, ap, stream);
    return cudaGetLastError();
  });
}

}  // namespace datta::cuda

// CUDA implementations of the kernel ops declared in csrc/ops.cpp (TORCH_LIBRARY(datta, m)).
//
// Thin glue only: the shared input checks (ops.h), device guard, current stream, dtype
// dispatch, output / workspace allocation, one call into the torch-free launchers of
// datta_cuda.h, error check.  The math lives in the .cu files.  Nothing here reads device
// memory from the host: the blend weights are converted (on the device) to the accumulation
// dtype and handed over as a pointer.  Compiled only in CUDA builds (DATTA_WITH_CUDA).
#ifdef DATTA_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "datta_cuda.h"
#include "ops.h"

namespace datta::cuda {
namespace {

template <typename scalar_t> struct ElemOf;
template <> struct ElemOf<float> { static constexpr ElemType value = ElemType::kFloat32; };
template <> struct ElemOf<double> { static constexpr ElemType value = ElemType::kFloat64; };
template <> struct ElemOf<c10::Half> { static constexpr ElemType value = ElemType::kFloat16; };
template <> struct ElemOf<c10::BFloat16> { static constexpr ElemType value = ElemType::kBFloat16; };

/// Statistics dtype (SPEC §1): float64 stays float64, everything else accumulates in float32.
at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::MemoryFormat layout_of(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

/// The problem part of Params (dtype, shape, layout, SM count, x); x passed its op's check.
Params problem(const at::Tensor& x) {
  Params p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "datta_cuda",
                                  [&] { p.dtype = ElemOf<scalar_t>::value; });
  p.n = x.size(0);
  p.c = x.size(1);
  p.m = x.size(2) * x.size(3);
  p.channels_last = is_channels_last(x);  // a tensor dense in both orders takes NCHW
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  p.x = x.data_ptr();
  return p;
}

/// A dense acc-dtype version of a checked per-channel / per-(n, c) / blend argument (no copy
/// when it already is one).
at::Tensor as_acc(const at::Tensor& t, const at::Tensor& x) { return t.to(acc_type(x)).contiguous(); }

std::optional<at::Tensor> as_acc(const std::optional<at::Tensor>& t, const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return as_acc(*t, x);
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

at::Tensor acc_empty(const at::Tensor& x, at::IntArrayRef shape) {
  return at::empty(shape, x.options().dtype(acc_type(x)));
}

/// Allocates the workspace `op` needs, then runs `launcher` on the current stream of x's device.
void launch(Op op, Params& p, const at::Tensor& x, cudaError_t (*launcher)(const Params&, cudaStream_t)) {
  const size_t bytes = workspace_bytes(op, p);
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
  }
  // The workspace is released when this returns; the caching allocator reuses it only in
  // stream order, after the kernels enqueued here.
  C10_CUDA_CHECK(launcher(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()));
}

std::tuple<at::Tensor, at::Tensor> instance_stats_cuda(const at::Tensor& x) {
  check_instance_stats(x);
  const c10::cuda::CUDAGuard guard(x.device());
  Params p = problem(x);
  at::Tensor mean = acc_empty(x, {p.n, p.c}), var = acc_empty(x, {p.n, p.c});
  p.mean = mean.data_ptr();
  p.var = var.data_ptr();
  launch(Op::kInstanceStats, p, x, &instance_stats);
  return {mean, var};
}

at::Tensor diversity_angles_cuda(const at::Tensor& x, const at::Tensor& source_mean, const at::Tensor& batch_mean) {
  check_diversity_angles(x, source_mean, batch_mean);
  const c10::cuda::CUDAGuard guard(x.device());
  Params p = problem(x);
  const at::Tensor smean = as_acc(source_mean, x), bmean = as_acc(batch_mean, x);
  at::Tensor angles = acc_empty(x, {p.n});
  p.source_mean = smean.data_ptr();
  p.batch_mean = bmean.data_ptr();
  p.angles = angles.data_ptr();
  launch(Op::kDiversityAngles, p, x, &diversity_angles);
  return angles;
}

/// The forward (statistics computed: `given` null) or the normalize pass alone (instance
/// statistics `given`): y and the statistics it used.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& source_mean, const at::Tensor& source_var,
    const at::Tensor& blend, std::optional<double> shrink_k, double eps,
    const std::pair<const at::Tensor*, const at::Tensor*>& given) {
  if (given.first) {
    check_dabn_normalize(x, weight, bias, source_mean, source_var, blend, *given.first, *given.second);
  } else {
    check_dabn_forward(x, weight, bias, source_mean, source_var, blend);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  Params p = problem(x);
  const at::Tensor smean = as_acc(source_mean, x), svar = as_acc(source_var, x), w = as_acc(blend, x);
  const std::optional<at::Tensor> gamma = as_acc(weight, x), beta = as_acc(bias, x);
  at::Tensor y = at::empty_like(x, x.options(), layout_of(x));
  at::Tensor mean = given.first ? as_acc(*given.first, x) : acc_empty(x, {p.n, p.c});
  at::Tensor var = given.second ? as_acc(*given.second, x) : acc_empty(x, {p.n, p.c});
  p.eps = eps;
  p.shrink = shrink_k.has_value();
  p.shrink_k = shrink_k.value_or(0.0);
  p.source_mean = smean.data_ptr();
  p.source_var = svar.data_ptr();
  p.blend = w.data_ptr();
  p.weight = ptr_or_null(gamma);
  p.bias = ptr_or_null(beta);
  p.y = y.data_ptr();
  p.mean = mean.data_ptr();  // written by dabn_forward, read by dabn_normalize
  p.var = var.data_ptr();
  if (given.first) {
    launch(Op::kDabnNormalize, p, x, &dabn_normalize);
  } else {
    launch(Op::kDabnForward, p, x, &dabn_forward);
  }
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dabn_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& source_mean, const at::Tensor& source_var, const at::Tensor& blend,
    std::optional<double> shrink_k, double eps) {
  return forward_impl(x, weight, bias, source_mean, source_var, blend, shrink_k, eps, {nullptr, nullptr});
}

at::Tensor dabn_normalize_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& source_mean,
                              const at::Tensor& source_var, const at::Tensor& blend,
                              std::optional<double> shrink_k, double eps, const at::Tensor& mean,
                              const at::Tensor& var) {
  return std::get<0>(forward_impl(x, weight, bias, source_mean, source_var, blend, shrink_k, eps, {&mean, &var}));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dabn_backward_cuda(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& source_mean, const at::Tensor& source_var, const at::Tensor& blend,
    std::optional<double> shrink_k, double eps, const at::Tensor& mean, const at::Tensor& var) {
  check_dabn_backward(dy, x, weight, source_mean, source_var, blend, mean, var);
  const c10::cuda::CUDAGuard guard(x.device());
  Params p = problem(x);
  const at::Tensor smean = as_acc(source_mean, x), svar = as_acc(source_var, x), w = as_acc(blend, x);
  const at::Tensor mu = as_acc(mean, x), sigma2 = as_acc(var, x);
  const std::optional<at::Tensor> gamma = as_acc(weight, x);
  at::Tensor dx = at::empty_like(x, x.options(), layout_of(x));
  at::Tensor dweight = acc_empty(x, {p.c}), dbias = acc_empty(x, {p.c});
  p.eps = eps;
  p.shrink = shrink_k.has_value();
  p.shrink_k = shrink_k.value_or(0.0);
  p.dy = dy.data_ptr();
  p.source_mean = smean.data_ptr();
  p.source_var = svar.data_ptr();
  p.blend = w.data_ptr();
  p.weight = ptr_or_null(gamma);
  p.mean = mu.data_ptr();
  p.var = sigma2.data_ptr();
  p.dx = dx.data_ptr();
  p.dweight = dweight.data_ptr();
  p.dbias = dbias.data_ptr();
  launch(Op::kDabnBackward, p, x, &dabn_backward);
  return {dx, dweight, dbias};
}

// SPEC D5's two passes on their own (datta_kernels.distributed computes the coefficients in
// between, with its batch terms summed over a process group).
std::tuple<at::Tensor, at::Tensor> dabn_backward_sums_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                           const at::Tensor& mean) {
  check_dabn_backward_sums(dy, x, mean);
  const c10::cuda::CUDAGuard guard(x.device());
  Params p = problem(x);
  const at::Tensor mu = as_acc(mean, x);
  at::Tensor sdy = acc_empty(x, {p.n, p.c}), sdyxc = acc_empty(x, {p.n, p.c});
  p.dy = dy.data_ptr();
  p.mean = mu.data_ptr();
  p.sdy = sdy.data_ptr();
  p.sdyxc = sdyxc.data_ptr();
  launch(Op::kDabnBackwardSums, p, x, &dabn_backward_sums);
  return {sdy, sdyxc};
}

at::Tensor dabn_backward_apply_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                    const at::Tensor& a, const at::Tensor& b, const at::Tensor& c0) {
  check_dabn_backward_apply(dy, x, mean, a, b, c0);
  const c10::cuda::CUDAGuard guard(x.device());
  Params p = problem(x);
  const at::Tensor mu = as_acc(mean, x), ca = as_acc(a, x), cb = as_acc(b, x), cc = as_acc(c0, x);
  at::Tensor dx = at::empty_like(x, x.options(), layout_of(x));
  p.dy = dy.data_ptr();
  p.mean = mu.data_ptr();
  p.coef_a = ca.data_ptr();
  p.coef_b = cb.data_ptr();
  p.coef_c0 = cc.data_ptr();
  p.dx = dx.data_ptr();
  launch(Op::kDabnBackwardApply, p, x, &dabn_backward_apply);
  return dx;
}

// ---- the synced layer's per-(n, c) math (csrc/cuda/sync_coefs.cu); no x: the (N, C)
// statistics set the device, the shape and the acc dtype.
SyncCoefParams sync_params(const char* op, const at::Tensor& mean_i, const at::Tensor& var_i,
                           const at::Tensor& source_mean, const at::Tensor& source_var, const at::Tensor& blend,
                           const at::Tensor& batch_mean, const at::Tensor& batch_var,
                           const at::Tensor& batch_count, int64_t m, std::optional<double> shrink_k, double eps,
                           std::vector<at::Tensor>& keep) {
  TORCH_CHECK(mean_i.dim() == 2 && var_i.sizes() == mean_i.sizes(), op, ": mean_i and var_i must be (N, C) alike");
  TORCH_CHECK(mean_i.scalar_type() == at::kFloat || mean_i.scalar_type() == at::kDouble, op,
              ": statistics must be float32 or float64, got ", mean_i.scalar_type());
  const int64_t c = mean_i.size(1);
  for (const at::Tensor* t : {&var_i, &source_mean, &source_var, &blend, &batch_mean, &batch_var, &batch_count}) {
    TORCH_CHECK(t->device() == mean_i.device(), op, ": every argument must be on ", mean_i.device());
  }
  for (const at::Tensor* t : {&source_mean, &source_var, &batch_mean, &batch_var}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == c, op, ": per-channel arguments must be (", c, ",)");
  }
  TORCH_CHECK(blend.numel() == 3 && batch_count.numel() == 1 && m >= 1, op,
              ": blend must be (3,), batch_count one value, m >= 1");
  const at::ScalarType acc = mean_i.scalar_type();
  auto acc_of = [&](const at::Tensor& t) { return keep.emplace_back(t.to(acc).contiguous()).data_ptr(); };
  SyncCoefParams p;
  p.f64 = acc == at::kDouble;
  p.n = mean_i.size(0);
  p.c = c;
  p.m = m;
  p.eps = eps;
  p.shrink = shrink_k.has_value() && m > 1;
  p.shrink_k = shrink_k.value_or(0.0);
  p.mean_i = acc_of(mean_i);
  p.var_i = acc_of(var_i);
  p.source_mean = acc_of(source_mean);
  p.source_var = acc_of(source_var);
  p.blend = acc_of(blend);
  p.batch_mean = acc_of(batch_mean);
  p.batch_var = acc_of(batch_var);
  p.batch_count = static_cast<const double*>(keep.emplace_back(batch_count.to(at::kDouble).reshape({1}).contiguous()).data_ptr());
  return p;
}

at::Tensor batch_moments_local_cuda(const at::Tensor& mean_i, const at::Tensor& var_i, int64_t m) {
  TORCH_CHECK(mean_i.dim() == 2 && var_i.sizes() == mean_i.sizes() && var_i.device() == mean_i.device(),
              "datta::_batch_moments_local: mean_i and var_i must be (N, C) alike, on one device");
  TORCH_CHECK(mean_i.scalar_type() == at::kFloat || mean_i.scalar_type() == at::kDouble,
              "datta::_batch_moments_local: statistics must be float32 or float64");
  const c10::cuda::CUDAGuard guard(mean_i.device());
  const at::Tensor mu = mean_i.contiguous(), vr = var_i.to(mean_i.scalar_type()).contiguous();
  SyncCoefParams p;
  p.f64 = mean_i.scalar_type() == at::kDouble;
  p.n = mean_i.size(0);
  p.c = mean_i.size(1);
  p.m = m;
  p.mean_i = mu.data_ptr();
  p.var_i = vr.data_ptr();
  at::Tensor packed = at::empty({2 * p.c + 2}, mean_i.options().dtype(at::kDouble));
  p.packed = packed.data_ptr<double>();
  C10_CUDA_CHECK(batch_moments_local(p, c10::cuda::getCurrentCUDAStream(mean_i.get_device()).stream()));
  return packed;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_moments_merge_cuda(const at::Tensor& rows,
                                                                                     at::ScalarType dtype) {
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) >= 2 && rows.size(1) % 2 == 0,
              "datta::_batch_moments_merge: rows must be (W, 2C + 2), got ", rows.sizes());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "datta::_batch_moments_merge: dtype must be float32 or "
              "float64");
  const c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor r = rows.to(at::kDouble).contiguous();
  SyncCoefParams p;
  p.f64 = dtype == at::kDouble;
  p.c = (rows.size(1) - 2) / 2;
  p.world = rows.size(0);
  p.rows = r.data_ptr<double>();
  at::Tensor mean = at::empty({p.c}, rows.options().dtype(dtype)), var = at::empty_like(mean);
  at::Tensor count = at::empty({}, rows.options().dtype(at::kDouble)), samples = at::empty_like(count);
  p.mean = mean.data_ptr();
  p.var = var.data_ptr();
  p.count_out = count.data_ptr<double>();
  p.samples_out = samples.data_ptr<double>();
  C10_CUDA_CHECK(batch_moments_merge(p, c10::cuda::getCurrentCUDAStream(rows.get_device()).stream()));
  return {mean, var, count, samples};
}

std::tuple<at::Tensor, at::Tensor> blend_moments_cuda(const at::Tensor& mean_i, const at::Tensor& var_i,
                                                      const at::Tensor& source_mean, const at::Tensor& source_var,
                                                      const at::Tensor& blend, const at::Tensor& batch_mean,
                                                      const at::Tensor& batch_var, const at::Tensor& batch_count,
                                                      int64_t m, std::optional<double> shrink_k, double eps) {
  const c10::cuda::CUDAGuard guard(mean_i.device());
  std::vector<at::Tensor> keep;
  SyncCoefParams p = sync_params("datta::_blend_moments", mean_i, var_i, source_mean, source_var, blend, batch_mean,
                                 batch_var, batch_count, m, shrink_k, eps, keep);
  at::Tensor mean = at::empty_like(mean_i, at::MemoryFormat::Contiguous), var = at::empty_like(mean);
  p.mean = mean.data_ptr();
  p.var = var.data_ptr();
  C10_CUDA_CHECK(blend_moments(p, c10::cuda::getCurrentCUDAStream(mean_i.get_device()).stream()));
  return {mean, var};
}

/// The backward ops' common arguments: SyncCoefParams plus the pass-1 sums and gamma.
SyncCoefParams sync_backward_params(const char* op, const at::Tensor& sdy, const at::Tensor& sdyxc,
                                    const std::optional<at::Tensor>& weight, const at::Tensor& source_mean,
                                    const at::Tensor& source_var, const at::Tensor& blend,
                                    const at::Tensor& batch_mean, const at::Tensor& batch_var,
                                    const at::Tensor& batch_count, const at::Tensor& mean_i, const at::Tensor& var_i,
                                    int64_t m, std::optional<double> shrink_k, double eps,
                                    std::vector<at::Tensor>& keep) {
  SyncCoefParams p = sync_params(op, mean_i, var_i, source_mean, source_var, blend, batch_mean, batch_var,
                                 batch_count, m, shrink_k, eps, keep);
  TORCH_CHECK(sdy.sizes() == mean_i.sizes() && sdyxc.sizes() == mean_i.sizes(), op,
              ": sdy and sdyxc must be (N, C) like mean_i");
  const at::ScalarType acc = mean_i.scalar_type();
  p.sdy = keep.emplace_back(sdy.to(acc).contiguous()).data_ptr();
  p.sdyxc = keep.emplace_back(sdyxc.to(acc).contiguous()).data_ptr();
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == p.c, op, ": weight must be (", p.c, ",)");
    p.weight = keep.emplace_back(weight->to(acc).contiguous()).data_ptr();
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_batch_terms_cuda(
    const at::Tensor& sdy, const at::Tensor& sdyxc, const std::optional<at::Tensor>& weight,
    const at::Tensor& source_mean, const at::Tensor& source_var, const at::Tensor& blend,
    const at::Tensor& batch_mean, const at::Tensor& batch_var, const at::Tensor& batch_count,
    const at::Tensor& mean_i, const at::Tensor& var_i, int64_t m, std::optional<double> shrink_k, double eps) {
  const c10::cuda::CUDAGuard guard(mean_i.device());
  std::vector<at::Tensor> keep;
  SyncCoefParams p = sync_backward_params("datta::_dabn_backward_batch_terms", sdy, sdyxc, weight, source_mean,
                                          source_var, blend, batch_mean, batch_var, batch_count, mean_i, var_i, m,
                                          shrink_k, eps, keep);
  at::Tensor terms = at::empty({2 * p.c}, mean_i.options().dtype(at::kDouble));
  at::Tensor dweight = at::empty({p.c}, mean_i.options()), dbias = at::empty({p.c}, mean_i.options());
  p.batch_terms = terms.data_ptr<double>();
  p.dweight = dweight.data_ptr();
  p.dbias = dbias.data_ptr();
  C10_CUDA_CHECK(backward_batch_terms(p, c10::cuda::getCurrentCUDAStream(mean_i.get_device()).stream()));
  return {terms, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_coefficients_cuda(
    const at::Tensor& sdy, const at::Tensor& sdyxc, const std::optional<at::Tensor>& weight,
    const at::Tensor& source_mean, const at::Tensor& source_var, const at::Tensor& blend,
    const at::Tensor& batch_mean, const at::Tensor& batch_var, const at::Tensor& batch_count,
    const at::Tensor& mean_i, const at::Tensor& var_i, int64_t m, std::optional<double> shrink_k, double eps,
    const at::Tensor& batch_terms) {
  const c10::cuda::CUDAGuard guard(mean_i.device());
  std::vector<at::Tensor> keep;
  SyncCoefParams p = sync_backward_params("datta::_dabn_backward_coefficients", sdy, sdyxc, weight, source_mean,
                                          source_var, blend, batch_mean, batch_var, batch_count, mean_i, var_i, m,
                                          shrink_k, eps, keep);
  TORCH_CHECK(batch_terms.numel() == 2 * p.c && batch_terms.device() == mean_i.device(),
              "datta::_dabn_backward_coefficients: batch_terms must be (2C,) on ", mean_i.device());
  p.batch_terms_in = static_cast<const double*>(keep.emplace_back(batch_terms.to(at::kDouble).contiguous()).data_ptr());
  at::Tensor a = at::empty_like(mean_i, at::MemoryFormat::Contiguous), b = at::empty_like(a), c0 = at::empty_like(a);
  p.coef_a = a.data_ptr();
  p.coef_b = b.data_ptr();
  p.coef_c0 = c0.data_ptr();
  C10_CUDA_CHECK(backward_coefficients(p, c10::cuda::getCurrentCUDAStream(mean_i.get_device()).stream()));
  return {a, b, c0};
}

}  // namespace
}  // namespace datta::cuda

TORCH_LIBRARY_IMPL(datta, CUDA, m) {
  m.impl("_instance_stats", TORCH_FN(datta::cuda::instance_stats_cuda));
  m.impl("_diversity_angles", TORCH_FN(datta::cuda::diversity_angles_cuda));
  m.impl("_dabn_forward", TORCH_FN(datta::cuda::dabn_forward_cuda));
  m.impl("_dabn_normalize", TORCH_FN(datta::cuda::dabn_normalize_cuda));
  m.impl("_dabn_backward", TORCH_FN(datta::cuda::dabn_backward_cuda));
  m.impl("_dabn_backward_sums", TORCH_FN(datta::cuda::dabn_backward_sums_cuda));
  m.impl("_dabn_backward_apply", TORCH_FN(datta::cuda::dabn_backward_apply_cuda));
  m.impl("_batch_moments_local", TORCH_FN(datta::cuda::batch_moments_local_cuda));
  m.impl("_batch_moments_merge", TORCH_FN(datta::cuda::batch_moments_merge_cuda));
  m.impl("_blend_moments", TORCH_FN(datta::cuda::blend_moments_cuda));
  m.impl("_dabn_backward_batch_terms", TORCH_FN(datta::cuda::backward_batch_terms_cuda));
  m.impl("_dabn_backward_coefficients", TORCH_FN(datta::cuda::backward_coefficients_cuda));
}

#endif  // DATTA_WITH_CUDA

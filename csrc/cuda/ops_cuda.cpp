// CUDA implementations of the kernel ops declared in csrc/ops.cpp (TORCH_LIBRARY(datta, m)).
//
// Thin glue only: device guard, current stream, dtype dispatch, checks, output / workspace
// allocation, one call into the torch-free launchers of datta_cuda.h, error check.  The
// math lives in the .cu files.  Nothing here reads device memory from the host: the blend
// weights are converted (on the device) to the accumulation dtype and handed over as a
// pointer.  Compiled only in CUDA builds (setup.py / CMake define DATTA_WITH_CUDA).
#ifdef DATTA_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "datta_cuda.h"

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

/// Dense channels_last and not also dense NCHW (a tensor that is both, e.g. C == 1 or
/// H == W == 1, has the NCHW memory order and takes the NCHW kernels).
bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

at::MemoryFormat layout_of(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

/// Checks x and fills the problem part of Params (dtype, shape, layout, SM count, x).
Params problem(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "datta CUDA kernels: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "datta CUDA kernels: x must be (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "datta CUDA kernels: x must be dense NCHW or channels_last (ops.py makes it so), got strides ",
              x.strides());
  Params p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "datta_cuda",
                                  [&] { p.dtype = ElemOf<scalar_t>::value; });
  p.n = x.size(0);
  p.c = x.size(1);
  p.m = x.size(2) * x.size(3);
  p.channels_last = is_channels_last(x);
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  p.x = x.data_ptr();
  return p;
}

/// A dense acc-dtype copy (or the tensor itself) of a per-channel / per-(n, c) input.
at::Tensor as_acc(const at::Tensor& t, const at::Tensor& x, int64_t numel, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "datta CUDA kernels: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.numel() == numel, "datta CUDA kernels: ", name, " must have ", numel,
              " elements, got ", t.numel());
  return t.to(acc_type(x)).contiguous();
}

std::optional<at::Tensor> as_acc(const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t numel,
                                 const char* name) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return as_acc(*t, x, numel, name);
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

at::Tensor stats_like(const at::Tensor& x, at::IntArrayRef shape) {
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

/// Instance statistics of a tensor with no pixels: mean is NaN (mean of nothing), var 0.
void fill_empty_stats(const Params& p, at::Tensor& mean, at::Tensor& var) {
  if (p.m == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.zero_();
  }
}

std::tuple<at::Tensor, at::Tensor> instance_stats_cuda(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  Params p = problem(x);
  at::Tensor mean = stats_like(x, {p.n, p.c}), var = stats_like(x, {p.n, p.c});
  p.mean = mean.data_ptr();
  p.var = var.data_ptr();
  launch(Op::kInstanceStats, p, x, &instance_stats);
  fill_empty_stats(p, mean, var);
  return {mean, var};
}

at::Tensor diversity_angles_cuda(const at::Tensor& x, const at::Tensor& source_mean, const at::Tensor& batch_mean) {
  const c10::cuda::CUDAGuard guard(x.device());
  Params p = problem(x);
  const at::Tensor smean = as_acc(source_mean, x, p.c, "source_mean");
  const at::Tensor bmean = as_acc(batch_mean, x, p.c, "batch_mean");
  at::Tensor angles = stats_like(x, {p.n});
  p.source_mean = smean.data_ptr();
  p.batch_mean = bmean.data_ptr();
  p.angles = angles.data_ptr();
  launch(Op::kDiversityAngles, p, x, &diversity_angles);
  if (p.m == 0) {
    angles.fill_(std::numeric_limits<double>::quiet_NaN());  // mean over no pixels
  } else if (p.c == 0) {
    angles.fill_(std::acos(0.0));  // a = b = 0: cos = 0 / floor^2 = 0
  }
  return angles;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dabn_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& source_mean, const at::Tensor& source_var, const at::Tensor& blend,
    std::optional<double> shrink_k, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  Params p = problem(x);
  const at::Tensor smean = as_acc(source_mean, x, p.c, "source_mean");
  const at::Tensor svar = as_acc(source_var, x, p.c, "source_var");
  const at::Tensor w = as_acc(blend, x, 3, "blend");
  const std::optional<at::Tensor> gamma = as_acc(weight, x, p.c, "weight");
  const std::optional<at::Tensor> beta = as_acc(bias, x, p.c, "bias");
  at::Tensor y = at::empty_like(x, x.options(), layout_of(x));
  at::Tensor mean = stats_like(x, {p.n, p.c}), var = stats_like(x, {p.n, p.c});
  p.eps = eps;
  p.shrink = shrink_k.has_value();
  p.shrink_k = shrink_k.value_or(0.0);
  p.source_mean = smean.data_ptr();
  p.source_var = svar.data_ptr();
  p.blend = w.data_ptr();
  p.weight = ptr_or_null(gamma);
  p.bias = ptr_or_null(beta);
  p.y = y.data_ptr();
  p.mean = mean.data_ptr();
  p.var = var.data_ptr();
  launch(Op::kDabnForward, p, x, &dabn_forward);
  fill_empty_stats(p, mean, var);
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dabn_backward_cuda(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& source_mean, const at::Tensor& source_var, const at::Tensor& blend,
    std::optional<double> shrink_k, double eps, const at::Tensor& mean, const at::Tensor& var) {
  const c10::cuda::CUDAGuard guard(x.device());
  Params p = problem(x);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.device() == x.device(),
              "datta CUDA kernels: dy must match x in shape, dtype and device");
  const at::Tensor g = dy.contiguous(layout_of(x));  // no-op when ops.py already matched x
  const at::Tensor smean = as_acc(source_mean, x, p.c, "source_mean");
  const at::Tensor svar = as_acc(source_var, x, p.c, "source_var");
  const at::Tensor w = as_acc(blend, x, 3, "blend");
  const at::Tensor mu = as_acc(mean, x, p.n * p.c, "mean");
  const at::Tensor sigma2 = as_acc(var, x, p.n * p.c, "var");
  const std::optional<at::Tensor> gamma = as_acc(weight, x, p.c, "weight");
  at::Tensor dx = at::empty_like(x, x.options(), layout_of(x));
  at::Tensor dweight = stats_like(x, {p.c}), dbias = stats_like(x, {p.c});
  p.eps = eps;
  p.shrink = shrink_k.has_value();
  p.shrink_k = shrink_k.value_or(0.0);
  p.dy = g.data_ptr();
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
  if (p.n * p.c == 0 || p.m == 0) {  // no pixels: the sums over them are 0
    dweight.zero_();
    dbias.zero_();
  }
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace datta::cuda

TORCH_LIBRARY_IMPL(datta, CUDA, m) {
  m.impl("_instance_stats", TORCH_FN(datta::cuda::instance_stats_cuda));
  m.impl("_diversity_angles", TORCH_FN(datta::cuda::diversity_angles_cuda));
  m.impl("_dabn_forward", TORCH_FN(datta::cuda::dabn_forward_cuda));
  m.impl("_dabn_backward", TORCH_FN(datta::cuda::dabn_backward_cuda));
}

#endif  // DATTA_WITH_CUDA

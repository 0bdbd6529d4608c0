// The input check of every datta:: kernel op that reads x (defined once in ops.cpp, next to
// the schemas), called first by the CPU glue (cpu/dabn_cpu.cpp) and the CUDA glue
// (cuda/ops_cuda.cpp) alike.  Each throws a c10::Error that starts with the op's name.
//
// x must be 4-D, float64/float32/float16/bfloat16, non-empty, and dense in NCHW or
// channels_last order.  The other arguments, relative to x (N, C, H, W):
//   weight, bias, source_mean, source_var, batch_mean: (C,) floating, on x's device
//     (weight and bias may be absent)
//   blend: (3,) floating, on x's device: (w_s, w_b, w_i)
//   mean, var, a, b, c0: (N, C) floating, on x's device (instance statistics, coefficients)
//   dy: x's shape, dtype and device, dense in x's memory layout
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace datta {

void check_instance_stats(const at::Tensor& x);
void check_diversity_angles(const at::Tensor& x, const at::Tensor& source_mean,
                            const at::Tensor& batch_mean);
void check_dabn_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& source_mean,
                        const at::Tensor& source_var, const at::Tensor& blend);
void check_dabn_decide_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& source_mean,
                               const at::Tensor& source_var, const at::Tensor& blend_single,
                               const at::Tensor& blend_multiple, const at::Tensor& blend_skewed);
void check_dabn_normalize(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& source_mean,
                          const at::Tensor& source_var, const at::Tensor& blend,
                          const at::Tensor& mean, const at::Tensor& var);
void check_dabn_backward(const at::Tensor& dy, const at::Tensor& x,
                         const c10::optional<at::Tensor>& weight, const at::Tensor& source_mean,
                         const at::Tensor& source_var, const at::Tensor& blend,
                         const at::Tensor& mean, const at::Tensor& var);
void check_dabn_backward_sums(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean);
void check_dabn_backward_apply(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& a, const at::Tensor& b, const at::Tensor& c0);

/// The tensor of an optional argument, or nullptr when it is absent.
inline const at::Tensor* opt(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

/// Dense channels_last and not also NCHW-contiguous (the two coincide when C == 1 or H*W == 1;
/// such tensors are treated as NCHW, which is the same memory order).
bool is_channels_last(const at::Tensor& x);

}  // namespace datta

// The one shared input check of every datta:: kernel op (defined in ops.cpp), used by the
// CPU glue (cpu/dabn_cpu.cpp) and the CUDA glue alike.
#pragma once

#include <initializer_list>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace datta {

/// What an argument must look like relative to x (N, C, H, W).
enum class Expect {
  kChannel,        // (C,) floating, on x's device (weight, bias, source stats, batch mean)
  kBlend,          // (3,) floating, on x's device: (w_s, w_b, w_i)
  kInstanceStats,  // (N, C) floating, on x's device (saved mean_i / var_i)
  kLikeX,          // x's shape, dtype and device, dense in x's memory layout (dy)
};

struct TensorArg {
  const char* name;
  const at::Tensor* tensor;  // nullptr or undefined: an absent optional, skipped
  Expect expect;
};

inline const at::Tensor* opt(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

/// x must be 4-D, float64/float32/float16/bfloat16, non-empty, and dense in NCHW or
/// channels_last order; every argument must match its Expect.  Throws with the op's name.
void check_inputs(const char* op, const at::Tensor& x, std::initializer_list<TensorArg> args);

/// Dense channels_last and not also NCHW-contiguous (the two coincide when C == 1 or H*W == 1;
/// such tensors are treated as NCHW, which is the same memory order).
bool is_channels_last(const at::Tensor& x);

}  // namespace datta

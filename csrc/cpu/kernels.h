// Torch-free interface between the op glue (dabn_cpu.cpp) and the fused kernels, which are
// compiled once per instruction set (kernels_{default,avx2,avx512}.cpp) and picked at run time.
//
// All pointers are raw, dense and owned by the caller.  "acc" is the accumulation type:
// double for float64 inputs, float for float32 / float16 / bfloat16.
#pragma once

#include <cstdint>
#include <string>

namespace datta::cpu {

enum class DType { kFloat64, kFloat32, kFloat16, kBFloat16 };

/// x is (N, C, H, W) with M = H*W, dense in NCHW order, or in channels_last order (NHWC).
struct Geometry {
  int64_t n, c, m;
  bool channels_last;
};

struct KernelTable {
  const char* isa;       // "default", "avx2", "avx512"
  int vec_width_f32;     // at::vec::Vectorized<float>::size() in that build
  int vec_width_f64;

  /// Pass 1: per-(n, c) mean and M2 = sum (x - mean)^2 -> mean, m2: (N, C) acc.
  void (*moments)(DType, Geometry, const void* x, void* mean, void* m2);
  /// y = (x - center[n, c]) * scale[n, c] + shift[n, c]; center, scale, shift: (N, C) acc.
  void (*affine)(DType, Geometry, const void* x, const void* center, const void* scale,
                 const void* shift, void* y);
  /// Backward pass 1: sdy = sum_p dy, sdyxc = sum_p dy * (x - mu_i) -> (N, C) acc each.
  void (*backward_reduce)(DType, Geometry, const void* dy, const void* x, const void* mu_i,
                          void* sdy, void* sdyxc);
  /// Backward pass 2: dx = a * dy + b * (x - mu_i) + c0; a, b, c0, mu_i: (N, C) acc.
  void (*backward_apply)(DType, Geometry, const void* dy, const void* x, const void* mu_i,
                         const void* a, const void* b, const void* c0, void* dx);
  /// SPEC §2 pixel-mode angles: smean, bmean (C,) acc -> theta (N,) acc, radians.
  void (*angles)(DType, Geometry, const void* x, const void* smean, const void* bmean,
                 void* theta);
};

// One table per instruction set; nullptr when that variant was not compiled for this target.
const KernelTable* kernels_default();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();

/// The best table this CPU supports, capped by env DATTA_CPU_CAPABILITY=default|avx2|avx512
/// (read on every call, so tests can compare variants in one process).
const KernelTable& kernels();

/// "openmp=1;vec=avx2;vec_width_f32=8;..." (the CPU half of datta::_build_info).
std::string cpu_build_info();

}  // namespace datta::cpu

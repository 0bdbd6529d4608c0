// Torch-free host interface of the DATTA CUDA kernels (SPEC §2-§3).
//
// The glue (ops_cuda.cpp) fills one plain `Params` struct and calls a launcher; the
// launchers (dabn.cu, diversity.cu) enqueue kernels on the given stream and return the
// launch error.  Nothing here synchronises with the host: the blend weights stay on the
// device and are read by a kernel.
//
// Types: "elem" is the element type of x / dy / y / dx (fp32, fp64, fp16, bf16); "acc" is
// the accumulation type, double for fp64 and float otherwise.  Every (C,) / (N, C) / (3,)
// array below is a dense acc array on the same device as x.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace datta::cuda {

enum class ElemType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

/// Which launcher a workspace is sized for.
enum class Op : int {
  kInstanceStats,
  kDiversityAngles,
  kDabnForward,
  kDabnNormalize,
  kDabnBackward,
  kDabnBackwardSums,
  kDabnBackwardApply,
};

struct Params {
  // ---- problem: x is (n, c, H, W) with m = H*W, dense in NCHW order or, when
  // channels_last, in NHWC order; dy, y and dx have exactly x's layout.
  ElemType dtype = ElemType::kFloat32;
  int64_t n = 0, c = 0, m = 0;
  bool channels_last = false;
  int num_sms = 1;  // multiprocessor count of the device: sizes the grids

  // ---- scalars of SPEC §3
  double eps = 1e-5;
  bool shrink = false;  // NOTE-style shrinkage of instance statistics ...
  double shrink_k = 0;  // ... with threshold multiplier k

  // ---- elem tensors
  const void* x = nullptr;
  const void* dy = nullptr;  // backward
  void* y = nullptr;         // forward output
  void* dx = nullptr;        // backward output

  // ---- acc arrays
  const void* weight = nullptr;       // (C,) gamma; nullptr means 1
  const void* bias = nullptr;         // (C,) beta; nullptr means 0
  const void* source_mean = nullptr;  // (C,) mu_s
  const void* source_var = nullptr;   // (C,) sigma^2_s
  const void* blend = nullptr;        // (3,) (w_s, w_b, w_i), read on the device only
  const void* batch_mean = nullptr;   // (C,) mu_B for the diversity angles
  void* mean = nullptr;               // (N, C) instance mean: output of stats/forward, input of backward
  void* var = nullptr;                // (N, C) unbiased instance variance, likewise
  void* angles = nullptr;             // (N,) theta in radians
  void* dweight = nullptr;            // (C,) backward output
  void* dbias = nullptr;              // (C,) backward output
  void* sdy = nullptr;                // (N, C) sum_p dy: output of dabn_backward_sums
  void* sdyxc = nullptr;              // (N, C) sum_p dy (x - mean), likewise
  const void* coef_a = nullptr;       // (N, C) dabn_backward_apply's a, b, c0 (inputs)
  const void* coef_b = nullptr;
  const void* coef_c0 = nullptr;

  // ---- scratch owned by the caller: at least workspace_bytes(op, *this) bytes,
  // 256-byte aligned (any caching-allocator block is).
  void* workspace = nullptr;
};

/// Scratch bytes `op` needs for this problem.  Depends only on dtype, n, c, m,
/// channels_last and num_sms (never on the pointers), so it can be called before the
/// outputs are allocated.
size_t workspace_bytes(Op op, const Params& p);

/// mean, var <- per-(n, c) instance statistics of x.
cudaError_t instance_stats(const Params& p, cudaStream_t stream);

/// angles <- SPEC §2 pixel-mode angles of x against source_mean and batch_mean.
cudaError_t diversity_angles(const Params& p, cudaStream_t stream);

/// y, mean, var <- SPEC §3 blended normalization of x (and the instance statistics).
cudaError_t dabn_forward(const Params& p, cudaStream_t stream);

/// y <- SPEC §3 blended normalization of x given its instance statistics mean, var (inputs
/// here): the forward without its statistics pass (one read of x, one write of y).
cudaError_t dabn_normalize(const Params& p, cudaStream_t stream);

/// dx, dweight, dbias <- backward of dabn_forward, given dy and the saved mean, var.
cudaError_t dabn_backward(const Params& p, cudaStream_t stream);

/// The synced layer's per-(n, c) math (datta_kernels.distributed): the statistics of another
/// batch are given (batch_mean, batch_var (C,) and its element count, a 0-dim double read on
/// the device).  Every array is dense, on one device; "acc" is double when f64, else float.
struct SyncCoefParams {
  bool f64 = false;
  int64_t n = 0, c = 0, m = 0;
  double eps = 1e-5;
  bool shrink = false;
  double shrink_k = 0;
  // inputs (acc): (N, C) statistics and sums, (C,) per channel, (3,) blend; weight may be null
  const void* mean_i = nullptr;
  const void* var_i = nullptr;
  const void* source_mean = nullptr;
  const void* source_var = nullptr;
  const void* blend = nullptr;
  const void* weight = nullptr;
  const void* batch_mean = nullptr;
  const void* batch_var = nullptr;
  const double* batch_count = nullptr;
  const void* sdy = nullptr;
  const void* sdyxc = nullptr;
  const double* batch_terms_in = nullptr;  // (2C,) summed [dmu_B, dvar_B]
  // batch moments across ranks: packs [N M, mean (C), M2 (C), N] (2C + 2,) float64
  double* packed = nullptr;       // batch_moments_local's output
  const double* rows = nullptr;   // batch_moments_merge's input (world, 2C + 2)
  int64_t world = 0;
  double* count_out = nullptr;    // 0-dim outputs of batch_moments_merge
  double* samples_out = nullptr;
  // outputs
  void* mean = nullptr;          // (N, C) acc: blend_moments; (C,) acc: batch_moments_merge
  void* var = nullptr;
  double* batch_terms = nullptr;  // (2C,): backward_batch_terms
  void* dweight = nullptr;        // (C,) acc
  void* dbias = nullptr;
  void* coef_a = nullptr;         // (N, C) acc: backward_coefficients
  void* coef_b = nullptr;
  void* coef_c0 = nullptr;
};

/// packed <- SPEC D4 for this slice (mean_i, var_i (N, C), m).
cudaError_t batch_moments_local(const SyncCoefParams& p, cudaStream_t stream);

/// mean, var (C,), count_out, samples_out <- Chan's merge of `rows` in rank order.
cudaError_t batch_moments_merge(const SyncCoefParams& p, cudaStream_t stream);

/// mean, var <- SPEC D1-D3 with the given batch.
cudaError_t blend_moments(const SyncCoefParams& p, cudaStream_t stream);

/// batch_terms, dweight, dbias <- SPEC D5's [w_b sum_n dm, w_b sum_n dv] and this slice's sums.
cudaError_t backward_batch_terms(const SyncCoefParams& p, cudaStream_t stream);

/// coef_a, coef_b, coef_c0 <- SPEC D5's A, B, C0 given batch_terms_in.
cudaError_t backward_coefficients(const SyncCoefParams& p, cudaStream_t stream);

/// SPEC D5 pass 1 alone: sdy, sdyxc <- sum_p dy, sum_p dy (x - mean) (mean an input).
cudaError_t dabn_backward_sums(const Params& p, cudaStream_t stream);

/// SPEC D5 pass 2 alone: dx <- coef_a dy + coef_b (x - mean) + coef_c0 (the coef_b term only
/// where coef_b != 0), with given (N, C) coefficients.
cudaError_t dabn_backward_apply(const Params& p, cudaStream_t stream);

}  // namespace datta::cuda

// Every datta:: kernel-op schema, declared once; the input check of each op (one argument
// list per op, for the CPU and CUDA glue alike); _build_info; and, in the setup.py build only,
// the Python module init of datta_kernels._C.
//
// Kernels are registered per device elsewhere: cpu/dabn_cpu.cpp (CPU) and csrc/cuda/ (CUDA).
// Fake (meta) implementations live in datta_kernels/ops.py.  Semantics: docs/SPEC.md and
// datta_kernels/reference.py.
#include "ops.h"

#include <initializer_list>
#include <string>

#include <torch/library.h>

#include "cpu/kernels.h"

namespace datta {

bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

namespace {

/// What an argument must look like relative to x (N, C, H, W).
enum class Expect {
  kChannel,        // (C,) floating, on x's device (weight, bias, source stats, batch mean)
  kBlend,          // (3,) floating, on x's device: (w_s, w_b, w_i)
  kInstanceStats,  // (N, C) floating, on x's device (saved mean_i / var_i, coefficients)
  kLikeX,          // x's shape, dtype and device, dense in x's memory layout (dy)
};

struct TensorArg {
  const char* name;
  const at::Tensor* tensor;  // nullptr or undefined: an absent optional, skipped
  Expect expect;
};

bool supported_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_arg(const char* op, const at::Tensor& x, const TensorArg& a) {
  const at::Tensor& t = *a.tensor;
  TORCH_CHECK(t.device() == x.device(), op, ": ", a.name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", a.name,
              " must be floating point, got ", t.scalar_type());
  switch (a.expect) {
    case Expect::kChannel:
      TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", a.name, " must have shape (",
                  x.size(1), ",) to match x's channels, got ", t.sizes());
      break;
    case Expect::kBlend:
      TORCH_CHECK(t.dim() == 1 && t.size(0) == 3, op, ": ", a.name,
                  " must have shape (3,) = (w_s, w_b, w_i), got ", t.sizes());
      break;
    case Expect::kInstanceStats:
      TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), op, ": ",
                  a.name, " must have shape (", x.size(0), ", ", x.size(1), ") = (N, C), got ",
                  t.sizes());
      break;
    case Expect::kLikeX: {
      TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", a.name, " must have x's shape ", x.sizes(),
                  ", got ", t.sizes());
      TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", a.name, " must have x's dtype ",
                  x.scalar_type(), ", got ", t.scalar_type());
      const bool ok = is_channels_last(x) ? t.is_contiguous(at::MemoryFormat::ChannelsLast)
                                          : t.is_contiguous();
      TORCH_CHECK(ok, op, ": ", a.name, " must be dense in x's memory layout (",
                  is_channels_last(x) ? "channels_last" : "NCHW-contiguous", ")");
      break;
    }
  }
}

/// x must be 4-D, float64/float32/float16/bfloat16, non-empty, and dense in NCHW or
/// channels_last order; every argument must match its Expect.  Throws with the op's name.
void check_inputs(const char* op, const at::Tensor& x, std::initializer_list<TensorArg> args) {
  TORCH_CHECK(x.defined(), op, ": x is undefined");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(supported_dtype(x.scalar_type()), op,
              ": x must be float64, float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.numel() > 0, op, ": x is empty (shape ", x.sizes(),
              "); statistics are undefined");
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": x must be dense in NCHW or channels_last order (got strides ", x.strides(),
              "); call .contiguous() first");
  for (const TensorArg& a : args) {
    if (a.tensor != nullptr && a.tensor->defined()) check_arg(op, x, a);
  }
}

/// _dabn_forward's and _dabn_normalize's list (mean, var: null for the forward).
void check_blend_args(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, const at::Tensor& source_mean,
                      const at::Tensor& source_var, const at::Tensor& blend, const at::Tensor* mean,
                      const at::Tensor* var) {
  check_inputs(op, x,
               {{"weight", opt(weight), Expect::kChannel},
                {"bias", opt(bias), Expect::kChannel},
                {"source_mean", &source_mean, Expect::kChannel},
                {"source_var", &source_var, Expect::kChannel},
                {"blend", &blend, Expect::kBlend},
                {"mean", mean, Expect::kInstanceStats},
                {"var", var, Expect::kInstanceStats}});
}

}  // namespace

void check_instance_stats(const at::Tensor& x) { check_inputs("datta::_instance_stats", x, {}); }

void check_diversity_angles(const at::Tensor& x, const at::Tensor& source_mean,
                            const at::Tensor& batch_mean) {
  check_inputs("datta::_diversity_angles", x,
               {{"source_mean", &source_mean, Expect::kChannel},
                {"batch_mean", &batch_mean, Expect::kChannel}});
}

void check_dabn_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& source_mean,
                        const at::Tensor& source_var, const at::Tensor& blend) {
  check_blend_args("datta::_dabn_forward", x, weight, bias, source_mean, source_var, blend, nullptr,
                   nullptr);
}

void check_dabn_decide_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& source_mean,
                               const at::Tensor& source_var, const at::Tensor& blend_single,
                               const at::Tensor& blend_multiple, const at::Tensor& blend_skewed) {
  check_inputs("datta::_dabn_decide_forward", x,
               {{"weight", opt(weight), Expect::kChannel},
                {"bias", opt(bias), Expect::kChannel},
                {"source_mean", &source_mean, Expect::kChannel},
                {"source_var", &source_var, Expect::kChannel},
                {"blend_single", &blend_single, Expect::kBlend},
                {"blend_multiple", &blend_multiple, Expect::kBlend},
                {"blend_skewed", &blend_skewed, Expect::kBlend}});
}

void check_dabn_normalize(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& source_mean,
                          const at::Tensor& source_var, const at::Tensor& blend,
                          const at::Tensor& mean, const at::Tensor& var) {
  check_blend_args("datta::_dabn_normalize", x, weight, bias, source_mean, source_var, blend, &mean,
                   &var);
}

void check_dabn_backward(const at::Tensor& dy, const at::Tensor& x,
                         const c10::optional<at::Tensor>& weight, const at::Tensor& source_mean,
                         const at::Tensor& source_var, const at::Tensor& blend,
                         const at::Tensor& mean, const at::Tensor& var) {
  check_inputs("datta::_dabn_backward", x,
               {{"dy", &dy, Expect::kLikeX},
                {"weight", opt(weight), Expect::kChannel},
                {"source_mean", &source_mean, Expect::kChannel},
                {"source_var", &source_var, Expect::kChannel},
                {"blend", &blend, Expect::kBlend},
                {"mean", &mean, Expect::kInstanceStats},
                {"var", &var, Expect::kInstanceStats}});
}

void check_dabn_backward_sums(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean) {
  check_inputs("datta::_dabn_backward_sums", x,
               {{"dy", &dy, Expect::kLikeX}, {"mean", &mean, Expect::kInstanceStats}});
}

void check_dabn_backward_apply(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& a, const at::Tensor& b, const at::Tensor& c0) {
  check_inputs("datta::_dabn_backward_apply", x,
               {{"dy", &dy, Expect::kLikeX},
                {"mean", &mean, Expect::kInstanceStats},
                {"a", &a, Expect::kInstanceStats},
                {"b", &b, Expect::kInstanceStats},
                {"c0", &c0, Expect::kInstanceStats}});
}

namespace {

std::string build_info() {
#ifdef DATTA_WITH_CUDA
  const char* cuda = "1";
#else
  const char* cuda = "0";
#endif
  return cpu::cpu_build_info() + ";cuda=" + cuda;
}

}  // namespace
}  // namespace datta

TORCH_LIBRARY(datta, m) {
  m.def("_build_info() -> str", &datta::build_info);
  m.def("_instance_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("_diversity_angles(Tensor x, Tensor source_mean, Tensor batch_mean) -> Tensor");
  m.def(
      "_dabn_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor source_mean, "
      "Tensor source_var, Tensor blend, float? shrink_k, float eps) -> (Tensor y, Tensor mean, "
      "Tensor var)");
  m.def(
      "_dispersion_score(Tensor mean, Tensor var, Tensor source_mean, Tensor source_var, int m, "
      "float eps, str parts, str stat) -> (Tensor score, Tensor per_sample)");
  m.def(
      "_probe_spread(Tensor mean, Tensor var, Tensor source_mean, Tensor source_var, float eps, "
      "Tensor center, Tensor scale, Tensor weight, Tensor bias) -> Tensor");
  m.def(
      "_source_shift(Tensor mean, Tensor var, Tensor source_mean, Tensor source_var, float eps, "
      "bool signed_shift=False) -> Tensor");
  // DATTA's threshold rule at the score layer: probe spread, signed source shift, decision
  m.def(
      "_threshold_decide(Tensor score, Tensor mean, Tensor var, Tensor source_mean, "
      "Tensor source_var, float eps, Tensor? center, Tensor? scale, Tensor? weight, Tensor? bias, "
      "float threshold, float low, float? skew_cut, float? shift_lo, float? shift_hi) -> "
      "(Tensor spread, Tensor shift, Tensor flags)");
  // DATTA's score layer in one call on a batch that records no graph: instance statistics,
  // dispersion score, _threshold_decide's rule, the decision written into every layer's
  // decision / skewed buffer from this one on, and the normalisation with the decided blend
  m.def(
      "_dabn_decide_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor source_mean, "
      "Tensor source_var, Tensor blend_single, Tensor blend_multiple, Tensor blend_skewed, "
      "float? shrink_k, float eps, str parts, str stat, Tensor? center, Tensor? scale, Tensor? probe_weight, "
      "Tensor? probe_bias, float threshold, float low, float? skew_cut, float? shift_lo, "
      "float? shift_hi, Tensor(a!)[] decision, Tensor(b!)[] skewed, Tensor(c!)? stream_mean=None, "
      "Tensor(d!)? stream_var=None, float? stream_momentum=None, float? stream_reset=None) -> (Tensor y, Tensor mean, "
      "Tensor var, Tensor score, Tensor per_sample, Tensor spread, Tensor shift, Tensor flags)");
  // SPEC §3c: fold a batch not decided "multiple" into a layer's stream statistics (in place)
  // and return the source term of its blend (the stream statistics on a "skewed" batch)
  m.def(
      "_stream_anchor(Tensor mean, Tensor var, int m, Tensor(a!) stream_mean, Tensor(b!) stream_var, "
      "Tensor source_mean, Tensor source_var, Tensor decision, Tensor skewed, float momentum, "
      "float? reset=None, float eps=1e-05) -> (Tensor anchor_mean, Tensor anchor_var)");
  // a layer with stream statistics on a batch that records no graph: the decided blend, the
  // fold and the normalisation in one call
  m.def(
      "_dabn_stream_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor source_mean, "
      "Tensor source_var, Tensor blend_single, Tensor blend_multiple, Tensor blend_skewed, "
      "float? shrink_k, float eps, Tensor(a!) stream_mean, Tensor(b!) stream_var, Tensor decision, "
      "Tensor skewed, float momentum, float? reset=None) -> Tensor");
  m.def(
      "_dabn_normalize(Tensor x, Tensor? weight, Tensor? bias, Tensor source_mean, "
      "Tensor source_var, Tensor blend, float? shrink_k, float eps, Tensor mean, Tensor var) -> "
      "Tensor");
  m.def(
      "_dabn_backward(Tensor dy, Tensor x, Tensor? weight, Tensor source_mean, "
      "Tensor source_var, Tensor blend, float? shrink_k, float eps, Tensor mean, Tensor var) -> "
      "(Tensor dx, Tensor dweight, Tensor dbias)");
  // SPEC D5's passes alone: (sdy, sdyxc) = sums over pixels; dx = a dy + b (x - mean) + c0
  m.def("_dabn_backward_sums(Tensor dy, Tensor x, Tensor mean) -> (Tensor sdy, Tensor sdyxc)");
  m.def(
      "_dabn_backward_apply(Tensor dy, Tensor x, Tensor mean, Tensor a, Tensor b, Tensor c0) -> "
      "Tensor");
  // The synced layer's per-(n, c) math with another batch's statistics (batch_count: its
  // element count, 0-dim): SPEC D1-D3's blended moments; D5's batch terms
  // [w_b sum_n dm, w_b sum_n dv] (float64), dweight, dbias; D5's A, B, C0 given those terms
  // summed over a process group.
  // The global batch's moments from per-rank packs [N M, mean (C), M2 (C), N] (float64):
  // this rank's pack from its instance statistics (SPEC D4), and the rank-ordered Chan merge
  // of the gathered packs (W, 2C + 2) -> mu_B, var_B (dtype), count and samples (0-dim f64).
  m.def("_batch_moments_local(Tensor mean_i, Tensor var_i, int m) -> Tensor");
  m.def(
      "_batch_moments_merge(Tensor rows, ScalarType dtype) -> (Tensor mean, Tensor var, "
      "Tensor count, Tensor samples)");
  m.def(
      "_blend_moments(Tensor mean_i, Tensor var_i, Tensor source_mean, Tensor source_var, "
      "Tensor blend, Tensor batch_mean, Tensor batch_var, Tensor batch_count, int m, "
      "float? shrink_k, float eps) -> (Tensor mean, Tensor var)");
  m.def(
      "_dabn_backward_batch_terms(Tensor sdy, Tensor sdyxc, Tensor? weight, Tensor source_mean, "
      "Tensor source_var, Tensor blend, Tensor batch_mean, Tensor batch_var, Tensor batch_count, "
      "Tensor mean_i, Tensor var_i, int m, float? shrink_k, float eps) -> (Tensor batch_terms, "
      "Tensor dweight, Tensor dbias)");
  m.def(
      "_dabn_backward_coefficients(Tensor sdy, Tensor sdyxc, Tensor? weight, Tensor source_mean, "
      "Tensor source_var, Tensor blend, Tensor batch_mean, Tensor batch_var, Tensor batch_count, "
      "Tensor mean_i, Tensor var_i, int m, float? shrink_k, float eps, Tensor batch_terms) -> "
      "(Tensor a, Tensor b, Tensor c0)");
}

#ifdef DATTA_PYTHON_MODULE
// `import datta_kernels._C` only needs a module object: loading the library runs the static
// registrations above.  The CMake build (for libtorch users) has no Python dependency.
#include <Python.h>

PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "datta_kernels fused kernels", -1,
                               nullptr};
  return PyModule_Create(&module);
}
#endif

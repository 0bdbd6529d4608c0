// The score layer's (N, C) decision math (dispersion_cpu.cpp), shared with the fused score-layer
// forward datta::_dabn_decide_forward (dabn_cpu.cpp).
#pragma once

#include <tuple>

#include <ATen/ATen.h>

namespace datta::cpu {

/// datta::_dispersion_score: (score 0-dim, per_sample (N,)), float32 (SPEC §2).
std::tuple<at::Tensor, at::Tensor> dispersion_score_cpu(const at::Tensor& mean, const at::Tensor& var,
                                                        const at::Tensor& source_mean,
                                                        const at::Tensor& source_var, int64_t m, double eps,
                                                        c10::string_view parts, c10::string_view stat);

/// datta::_threshold_decide: (spread, shift, flags = (single, skewed)) (SPEC §6).
std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_decide_cpu(
    const at::Tensor& score, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& source_mean,
    const at::Tensor& source_var, double eps, const c10::optional<at::Tensor>& center,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double threshold, double low, c10::optional<double> skew_cut,
    c10::optional<double> shift_lo, c10::optional<double> shift_hi);

}  // namespace datta::cpu

// Element math of the masked step (fp32), shared by the CPU and CUDA kernels.
// Mirrors StepConfig's docstring in pecker_kernels/backends/base.py and torch.optim's formulas.
#pragma once

#include <cmath>

#include "pecker/codes.h"

namespace pecker {

PECKER_HD float saliency(float g, float w, int score_kind) {
  return score_kind == kScoreGradWeight ? fabsf(g * w) : fabsf(g);
}

// Updates p, m (first moment / momentum buffer) and v in place for one selected element.
// m and v are ignored where the optimizer keeps no such state.
PECKER_HD void step_element(const StepParams& s, float g, float& p, float& m, float& v) {
  if (s.has_clip) g = fminf(fmaxf(g, -s.clip_value), s.clip_value);
  if (s.kind == kAdamW) {
    p = p * (1.0f - s.lr * s.weight_decay);
  } else if (s.weight_decay != 0.0f) {
    g = g + s.weight_decay * p;
  }
  if (s.kind == kSGD) {
    if (s.has_exp_avg) {
      m = s.momentum_init ? g : s.momentum * m + (1.0f - s.dampening) * g;
      g = s.nesterov ? g + s.momentum * m : m;
    }
    p = p - s.lr * g;
    return;
  }
  m = s.has_exp_avg ? m + (1.0f - s.beta1) * (g - m) : g;
  v = s.beta2 * v + (1.0f - s.beta2) * g * g;
  const float denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;
  p = p - s.step_size * m / denom;
}

PECKER_HD float ema_element(const StepParams& s, float e, float p_stored) {
  return e + (1.0f - s.ema_decay) * (p_stored - e);
}

}  // namespace pecker

// Element math of the masked step (fp32), shared by the CPU and CUDA kernels.
// Mirrors StepConfig's docstring in pecker_kernels/backends/base.py and torch.optim's formulas.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "pecker/codes.h"

namespace pecker {

// Option-driven choice between two computed values (`use ? a : b`). On the host it is a bit blend:
// GCC 12 cannot vectorise a select whose condition is a loop-invariant bool (the options are), while a
// mask broadcast and two ANDs vectorise anywhere; exact either way.
PECKER_HD float pick(bool use, float a, float b) {
#if defined(__CUDACC__)
  return use ? a : b;
#else
  const uint32_t mask = 0u - static_cast<uint32_t>(use);
  uint32_t ua, ub;
  memcpy(&ua, &a, sizeof ua);
  memcpy(&ub, &b, sizeof ub);
  const uint32_t r = (ua & mask) | (ub & ~mask);
  float out;
  memcpy(&out, &r, sizeof out);
  return out;
#endif
}

PECKER_HD float saliency(float g, float w, int score_kind) {
  return score_kind == kScoreGradWeight ? fabsf(g * w) : fabsf(g);
}

// Updates p, m (first moment / momentum buffer) and v in place for one selected element.
// m and v are ignored where the optimizer keeps no such state.
// Branch-free on purpose: every arithmetic result is computed and the options pick among them with
// selects. Under GCC's default -ftrapping-math a float operation inside a conditional branch cannot
// be if-converted, and one such branch keeps the whole CPU loop scalar (GPUs predicate either way).
PECKER_HD void step_element(const StepParams& s, float g, float& p, float& m, float& v) {
  g = pick(s.has_grad_scale, g * s.inv_grad_scale, g);  // unscale first: clip and decay see true gradients
  g = pick(s.maximize, -g, g);
  // Comparisons rather than fminf/fmaxf: a NaN gradient stays NaN, as torch.clamp keeps it.
  const float clipped = g < -s.clip_value ? -s.clip_value : (g > s.clip_value ? s.clip_value : g);
  g = pick(s.has_clip, clipped, g);
  const bool adamw = s.kind == kAdamW;
  const float decayed = p * (s.has_coefficients ? s.decay_factor : 1.0f - s.lr * s.weight_decay);
  const float g_l2 = g + s.weight_decay * p;
  g = pick(!adamw && s.weight_decay != 0.0f, g_l2, g);
  p = pick(adamw, decayed, p);
  if (s.kind == kSGD) {
    if (s.has_exp_avg) {
      const float one_minus_dampening = s.has_coefficients ? s.one_minus_dampening : 1.0f - s.dampening;
      const float buf = s.momentum * m + one_minus_dampening * g;
      m = pick(s.momentum_init, g, buf);
      const float nesterov = g + s.momentum * m;
      g = pick(s.nesterov, nesterov, m);
    }
    p = p - s.lr * g;
    return;
  }
  const float one_minus_beta1 = s.has_coefficients ? s.one_minus_beta1 : 1.0f - s.beta1;
  const float one_minus_beta2 = s.has_coefficients ? s.one_minus_beta2 : 1.0f - s.beta2;
  const float m_avg = m + one_minus_beta1 * (g - m);
  m = pick(s.has_exp_avg, m_avg, g);
  v = s.beta2 * v + one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;
  p = p - s.step_size * m / denom;
}

PECKER_HD float ema_element(const StepParams& s, float e, float p_stored) {
  return e + (s.has_coefficients ? s.one_minus_ema_decay : 1.0f - s.ema_decay) * (p_stored - e);
}

}  // namespace pecker

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

// Scalar forms of the lane operations step_element uses beyond arithmetic. The CPU's SIMD lane types
// (csrc/cpu/vec8.inc) provide the same functions with the same rounding, found by argument-dependent
// lookup, so the element math below is written once for a float and for eight floats.
PECKER_HD float sqrt_of(float x) { return sqrtf(x); }

// clamp(g, -c, c) by comparisons rather than fminf/fmaxf: a NaN gradient stays NaN, as torch.clamp
// keeps it.
PECKER_HD float clip_keep_nan(float g, float c) { return g < -c ? -c : (g > c ? c : g); }

// What a kernel knows of the options at compile time. kAnyStep leaves every option to run time; the
// plain shapes say the step has no gradient unscaling, no maximize and no clipping and is that
// optimizer, so those picks compile away (the common case, and the one that decides the CPU's speed).
enum StepShape : int { kAnyStep = 0, kPlainAdamW = 1, kPlainAdam = 2 };

PECKER_HD bool is_plain_step(const StepParams& s, int kind) {
  return s.kind == kind && !s.has_grad_scale && !s.maximize && !s.has_clip;
}

// Updates p, m (first moment / momentum buffer) and v in place for one selected element (F = float),
// or for a vector of them (F = a lane type).
// m and v are ignored where the optimizer keeps no such state.
// Branch-free on purpose: every arithmetic result is computed and the options pick among them with
// selects. Under GCC's default -ftrapping-math a float operation inside a conditional branch cannot
// be if-converted, and one such branch keeps the whole CPU loop scalar (GPUs predicate either way).
template <int SHAPE = kAnyStep, class F>
PECKER_HD void step_element(const StepParams& s, F g, F& p, F& m, F& v) {
  if constexpr (SHAPE == kAnyStep) {
    g = pick(s.has_grad_scale, g * s.inv_grad_scale, g);  // unscale first: clip and decay see true gradients
    g = pick(s.maximize, -g, g);
    g = pick(s.has_clip, clip_keep_nan(g, s.clip_value), g);
  }
  const bool adamw = SHAPE == kAnyStep ? s.kind == kAdamW : SHAPE == kPlainAdamW;
  const F decayed = p * (s.has_coefficients ? s.decay_factor : 1.0f - s.lr * s.weight_decay);
  const F g_l2 = g + s.weight_decay * p;
  g = pick(!adamw && s.weight_decay != 0.0f, g_l2, g);
  p = pick(adamw, decayed, p);
  if (SHAPE == kAnyStep && s.kind == kSGD) {
    if (s.has_exp_avg) {
      const float one_minus_dampening = s.has_coefficients ? s.one_minus_dampening : 1.0f - s.dampening;
      const F buf = s.momentum * m + one_minus_dampening * g;
      m = pick(s.momentum_init, g, buf);
      const F nesterov = g + s.momentum * m;
      g = pick(s.nesterov, nesterov, m);
    }
    p = p - s.lr * g;
    return;
  }
  const float one_minus_beta1 = s.has_coefficients ? s.one_minus_beta1 : 1.0f - s.beta1;
  const float one_minus_beta2 = s.has_coefficients ? s.one_minus_beta2 : 1.0f - s.beta2;
  const F m_avg = m + one_minus_beta1 * (g - m);
  m = pick(s.has_exp_avg, m_avg, g);
  v = s.beta2 * v + one_minus_beta2 * g * g;
  const F denom = sqrt_of(v) / s.bias_correction2_sqrt + s.eps;
  p = p - s.step_size * m / denom;
}

PECKER_HD float ema_element(const StepParams& s, float e, float p_stored) {
  return e + (s.has_coefficients ? s.one_minus_ema_decay : 1.0f - s.ema_decay) * (p_stored - e);
}

}  // namespace pecker

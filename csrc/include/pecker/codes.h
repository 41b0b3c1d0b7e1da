// Integer codes shared with Python (pecker_kernels/backends/base.py) and the element math that
// every compiled backend applies, so the CPU and CUDA kernels cannot drift apart.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PECKER_HD __host__ __device__ __forceinline__
#else
#define PECKER_HD inline
#endif

namespace pecker {

enum ScoreKind : int { kScoreGrad = 0, kScoreGradWeight = 1 };
enum OptimizerKind : int { kAdamW = 0, kAdam = 1, kSGD = 2 };
enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaskWordBits = 32;

// Hyper-parameters of one update, step-dependent scalars precomputed on the host (StepConfig).
struct StepParams {
  int kind;
  float lr;
  float weight_decay;
  float beta1;
  float beta2;
  float eps;
  float step_size;              // lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  float momentum;
  float dampening;
  int nesterov;
  int momentum_init;
  int has_clip;
  float clip_value;
  int has_ema;
  float ema_decay;
  int has_exp_avg;  // Adam with beta1 == 0 keeps no first moment; SGD without momentum has no buffer
};

}  // namespace pecker

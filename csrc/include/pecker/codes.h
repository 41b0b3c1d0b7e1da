// Integer codes shared with Python (pecker_kernels/backends/base.py) and the element math that
// every compiled backend applies, so the CPU and CUDA kernels cannot drift apart.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PECKER_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced: the CPU kernels instantiate the element math in many loops, and once GCC's unit-growth limit
// stops inlining, the call keeps a loop scalar.
#define PECKER_HD inline __attribute__((always_inline))
#else
#define PECKER_HD inline
#endif

namespace pecker {

enum ScoreKind : int { kScoreGrad = 0, kScoreGradWeight = 1 };
enum OptimizerKind : int { kAdamW = 0, kAdam = 1, kSGD = 2 };
enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaskWordBits = 32;

// Radix digits of the fp32 score bits, most significant first: 11 + 11 + 10 bits (bit 31, the sign, is
// always 0 for a score). Every backend's radix select and the sharded select use these digits.
constexpr int kRadixPasses = 3;
constexpr int kRadixShift[kRadixPasses] = {21, 10, 0};
constexpr int kRadixWidth[kRadixPasses] = {11, 11, 10};
constexpr int kRadixBins = 1 << 11;

// Layout of the device step scalars (StepConfig.scalars, float32 [kNumStepScalars]).
enum StepScalar : int {
  kScalarStepSize = 0,
  kScalarBiasCorrection2Sqrt = 1,
  kScalarInvGradScale = 2,
  kScalarFoundInf = 3,
  kScalarMomentumInit = 4,
  kNumStepScalars = 5,
};

// Hyper-parameters of one update, step-dependent scalars precomputed on the host (StepConfig). Built in
// one place for every backend (pecker_kernels/backends/base.py: kernel_params); the field order is
// STEP_PARAM_FIELDS there. Zero-initialise it (StepParams{}): optional fields then mean "absent".
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
  // "1 - x" coefficients computed in double on the host and rounded once, as the eager oracle (torch)
  // does: in float they lose digits (1 - 0.999f = 0.00099998713, 1.3e-5 off). Used when
  // has_coefficients is set; callers that leave it 0 get the float derivations from the fields above.
  int has_coefficients;
  float decay_factor;  // 1 - lr * weight_decay (AdamW)
  float one_minus_beta1;
  float one_minus_beta2;
  float one_minus_dampening;
  float one_minus_ema_decay;
  // GradScaler unscaling, applied to the gradient before any other element math (the CPU backend
  // sets it from StepConfig.scalars on the host, the CUDA kernel from `scalars` on the device).
  int has_grad_scale;
  float inv_grad_scale;
  int maximize;  // negate the (unscaled) gradient: ascend instead of descend, as torch's maximize=True
  // Device address of StepConfig.scalars (float32, StepScalar layout), 0 when absent. Read by the CUDA
  // update kernel only.
  uint64_t scalars;
};

}  // namespace pecker

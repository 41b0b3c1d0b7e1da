// What both binding modules (pecker_kernels._C and _C_cuda) expose alike: the StepParams struct every
// backend receives, and the layouts shared with Python (codes, step scalars, radix digits), so a test can
// check Python's copies against the compiled ones (tests/test_layouts.py).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "../csrc/include/pecker/codes.h"

namespace pecker {
namespace bind {

namespace py = pybind11;

// Field order is STEP_PARAM_FIELDS in pecker_kernels/backends/base.py. module_local: _C and _C_cuda each
// register the same C++ type, which pybind11 allows only for module-local types.
inline void step_params(py::module_& m) {
  py::class_<StepParams>(m, "StepParams", py::module_local(), "Hyper-parameters of one update (pecker/codes.h)")
      .def(py::init([]() { return StepParams{}; }))
      .def_readwrite("kind", &StepParams::kind)
      .def_readwrite("lr", &StepParams::lr)
      .def_readwrite("weight_decay", &StepParams::weight_decay)
      .def_readwrite("beta1", &StepParams::beta1)
      .def_readwrite("beta2", &StepParams::beta2)
      .def_readwrite("eps", &StepParams::eps)
      .def_readwrite("step_size", &StepParams::step_size)
      .def_readwrite("bias_correction2_sqrt", &StepParams::bias_correction2_sqrt)
      .def_readwrite("momentum", &StepParams::momentum)
      .def_readwrite("dampening", &StepParams::dampening)
      .def_readwrite("nesterov", &StepParams::nesterov)
      .def_readwrite("momentum_init", &StepParams::momentum_init)
      .def_readwrite("has_clip", &StepParams::has_clip)
      .def_readwrite("clip_value", &StepParams::clip_value)
      .def_readwrite("has_ema", &StepParams::has_ema)
      .def_readwrite("ema_decay", &StepParams::ema_decay)
      .def_readwrite("has_exp_avg", &StepParams::has_exp_avg)
      .def_readwrite("has_coefficients", &StepParams::has_coefficients)
      .def_readwrite("decay_factor", &StepParams::decay_factor)
      .def_readwrite("one_minus_beta1", &StepParams::one_minus_beta1)
      .def_readwrite("one_minus_beta2", &StepParams::one_minus_beta2)
      .def_readwrite("one_minus_dampening", &StepParams::one_minus_dampening)
      .def_readwrite("one_minus_ema_decay", &StepParams::one_minus_ema_decay)
      .def_readwrite("has_grad_scale", &StepParams::has_grad_scale)
      .def_readwrite("inv_grad_scale", &StepParams::inv_grad_scale)
      .def_readwrite("maximize", &StepParams::maximize);
}

inline void layouts(py::module_& m) {
  py::dict codes;
  codes["score"] = py::dict(py::arg("grad") = static_cast<int>(kScoreGrad),
                            py::arg("grad_weight") = static_cast<int>(kScoreGradWeight));
  codes["optimizer"] = py::dict(py::arg("adamw") = static_cast<int>(kAdamW), py::arg("adam") = static_cast<int>(kAdam),
                                py::arg("sgd") = static_cast<int>(kSGD));
  codes["dtype"] = py::dict(py::arg("float32") = static_cast<int>(kFloat32),
                            py::arg("float16") = static_cast<int>(kFloat16),
                            py::arg("bfloat16") = static_cast<int>(kBFloat16));
  m.attr("CODES") = codes;
  m.attr("STEP_SCALARS") = py::dict(
      py::arg("step_size") = static_cast<int>(kScalarStepSize),
      py::arg("bias_correction2_sqrt") = static_cast<int>(kScalarBiasCorrection2Sqrt),
      py::arg("inv_grad_scale") = static_cast<int>(kScalarInvGradScale),
      py::arg("found_inf") = static_cast<int>(kScalarFoundInf),
      py::arg("momentum_init") = static_cast<int>(kScalarMomentumInit));
  std::vector<std::pair<int, int>> digits;
  for (int d = 0; d < kRadixPasses; ++d) digits.emplace_back(kRadixShift[d], kRadixWidth[d]);
  m.attr("RADIX_DIGITS") = digits;  // (lowest bit, width), most significant first
  m.attr("RADIX_BINS") = kRadixBins;
  m.attr("MASK_WORD_BITS") = kMaskWordBits;
}

}  // namespace bind
}  // namespace pecker

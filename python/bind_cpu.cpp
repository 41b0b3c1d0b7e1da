// pybind11 bindings of the CPU kernels (pecker_kernels._C). Raw pointers in, nothing returned.
// Tensors arrive as lists of data pointers (Python ints) with their sizes and dtype codes, so one call
// covers every tensor of a scope and the module never sees an at::Tensor.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "../csrc/cpu/kernels.h"

namespace py = pybind11;
using pecker::StepParams;
using Ptrs = std::vector<int64_t>;

namespace {

template <class T>
T* as_ptr(int64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

void select_op(const Ptrs& g, const Ptrs& w, const Ptrs& numel, const std::vector<int>& dtype, int score,
            const Ptrs& segments, const Ptrs& ks, int64_t threshold, int64_t take, int64_t ties, int threads) {
  const pecker::cpu::Tensors t{g, w, numel, dtype, score};
  pecker::cpu::select(t, segments, ks, as_ptr<float>(threshold), as_ptr<int64_t>(take), as_ptr<int64_t>(ties),
                      threads);
}

void write_masks_op(const Ptrs& g, const Ptrs& w, const Ptrs& numel, const std::vector<int>& dtype, int score,
                 const Ptrs& segments, int64_t threshold, int64_t take, int64_t ties, int64_t num_segments,
                 const Ptrs& masks_out, int threads) {
  const pecker::cpu::Tensors t{g, w, numel, dtype, score};
  pecker::cpu::write_masks(t, segments, as_ptr<const float>(threshold), as_ptr<const int64_t>(take),
                           as_ptr<const int64_t>(ties), num_segments, masks_out, threads);
}

void update_op(const Ptrs& p, const Ptrs& g, const Ptrs& m, const Ptrs& v, const Ptrs& e, const Ptrs& numel,
            const std::vector<int>& dtype, const std::vector<int>& state_dtype, const StepParams& params,
            int score, const Ptrs& segments, int64_t threshold, int64_t take, int64_t ties,
            int64_t num_segments, const Ptrs& mask_in, const Ptrs& mask_out, int threads) {
  if (state_dtype.size() != numel.size()) throw std::invalid_argument("state_dtype: one code per tensor");
  const pecker::cpu::UpdateTensors t{p, g, m, v, e, numel, dtype, state_dtype, mask_in, mask_out};
  pecker::cpu::update(t, params, score, segments, as_ptr<const float>(threshold), as_ptr<const int64_t>(take),
                      as_ptr<const int64_t>(ties), num_segments, threads);
}

void radix_histogram_op(const Ptrs& g, const Ptrs& w, const Ptrs& numel, const std::vector<int>& dtype,
                        int score, const Ptrs& segments, int64_t num_segments, int digit, int64_t prefix,
                        int64_t hist, int threads) {
  const pecker::cpu::Tensors t{g, w, numel, dtype, score};
  pecker::cpu::radix_histogram(t, segments, num_segments, digit, as_ptr<const uint32_t>(prefix),
                               as_ptr<int64_t>(hist), threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pecker_kernels CPU kernels (OpenMP, raw pointers)";

  py::class_<StepParams>(m, "StepParams", "Hyper-parameters of one update (csrc/include/pecker/codes.h)")
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
      .def_readwrite("inv_grad_scale", &StepParams::inv_grad_scale);

  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("select", &select_op, nogil,
        "Exact per-segment top-k threshold: writes threshold (float32), take and ties (int64) per segment.",
        py::arg("g"), py::arg("w"), py::arg("numel"), py::arg("dtype"), py::arg("score"), py::arg("segments"),
        py::arg("ks"), py::arg("threshold"), py::arg("take"), py::arg("ties"), py::arg("threads"));
  m.def("radix_histogram", &radix_histogram_op, nogil,
        "One radix digit pass: int64 [num_segments][2048] counts of the finite scores under each prefix.",
        py::arg("g"), py::arg("w"), py::arg("numel"), py::arg("dtype"), py::arg("score"), py::arg("segments"),
        py::arg("num_segments"), py::arg("digit"), py::arg("prefix"), py::arg("hist"), py::arg("threads"));
  m.def("write_masks", &write_masks_op, nogil, "Writes the packed int32 masks of a selection.", py::arg("g"),
        py::arg("w"), py::arg("numel"), py::arg("dtype"), py::arg("score"), py::arg("segments"),
        py::arg("threshold"), py::arg("take"), py::arg("ties"), py::arg("num_segments"), py::arg("masks_out"),
        py::arg("threads"));
  m.def("update", &update_op, nogil,
        "Fused masked optimizer step over many tensors (selection by threshold/take/ties or mask_in).",
        py::arg("p"), py::arg("g"), py::arg("m"), py::arg("v"), py::arg("e"), py::arg("numel"), py::arg("dtype"),
        py::arg("state_dtype"), py::arg("params"), py::arg("score"), py::arg("segments"), py::arg("threshold"),
        py::arg("take"), py::arg("ties"), py::arg("num_segments"), py::arg("mask_in"), py::arg("mask_out"),
        py::arg("threads"));
}

// pybind11 bindings of the CPU kernels (pecker_kernels._C). Raw pointers in, nothing returned.
// Tensors arrive as lists of data pointers (Python ints) with their sizes and dtype codes, so one call
// covers every tensor of a scope and the module never sees an at::Tensor.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "../csrc/cpu/kernels.h"
#include "bind_common.h"

namespace py = pybind11;
using pecker::StepParams;
using Ptrs = std::vector<int64_t>;

namespace {

template <class T>
T* as_ptr(int64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

void select_op(const Ptrs& g, const Ptrs& w, const Ptrs& numel, const std::vector<int>& dtype, int score,
            const Ptrs& segments, const Ptrs& ks, int64_t threshold, int64_t take, int64_t ties, int64_t cut,
            int threads) {
  const pecker::cpu::Tensors t{g, w, numel, dtype, score};
  pecker::cpu::select(t, segments, ks, as_ptr<float>(threshold), as_ptr<int64_t>(take), as_ptr<int64_t>(ties),
                      as_ptr<int64_t>(cut), threads);
}

void write_masks_op(const Ptrs& g, const Ptrs& w, const Ptrs& numel, const std::vector<int>& dtype, int score,
                 const Ptrs& segments, int64_t threshold, int64_t take, int64_t ties, int64_t cut,
                 int64_t num_segments, const Ptrs& masks_out, int threads) {
  const pecker::cpu::Tensors t{g, w, numel, dtype, score};
  pecker::cpu::write_masks(t, segments, as_ptr<const float>(threshold), as_ptr<const int64_t>(take),
                           as_ptr<const int64_t>(ties), as_ptr<const int64_t>(cut), num_segments, masks_out,
                           threads);
}

void update_op(const Ptrs& p, const Ptrs& g, const Ptrs& m, const Ptrs& v, const Ptrs& e, const Ptrs& numel,
            const std::vector<int>& dtype, const std::vector<int>& state_dtype, const StepParams& params,
            int score, const Ptrs& segments, int64_t threshold, int64_t take, int64_t ties, int64_t cut,
            int64_t num_segments, const Ptrs& mask_in, const Ptrs& mask_out, int threads) {
  if (state_dtype.size() != numel.size()) throw std::invalid_argument("state_dtype: one code per tensor");
  const pecker::cpu::UpdateTensors t{p, g, m, v, e, numel, dtype, state_dtype, mask_in, mask_out};
  pecker::cpu::update(t, params, score, segments, as_ptr<const float>(threshold), as_ptr<const int64_t>(take),
                      as_ptr<const int64_t>(ties), as_ptr<const int64_t>(cut), num_segments, threads);
}

void radix_histogram_op(const Ptrs& g, const Ptrs& w, const Ptrs& numel, const std::vector<int>& dtype,
                        int score, const Ptrs& segments, int64_t num_segments, int digit, int64_t prefix,
                        int64_t hist, int threads) {
  const pecker::cpu::Tensors t{g, w, numel, dtype, score};
  pecker::cpu::radix_histogram(t, segments, num_segments, digit, as_ptr<const uint32_t>(prefix),
                               as_ptr<int64_t>(hist), threads);
}

int64_t sample_scores_op(const Ptrs& g, const Ptrs& w, const Ptrs& numel, const std::vector<int>& dtype, int score,
                         int64_t runs, int64_t out, int64_t sampled, int threads) {
  const pecker::cpu::Tensors t{g, w, numel, dtype, score};
  return pecker::cpu::sample_scores(t, runs, as_ptr<float>(out), as_ptr<int64_t>(sampled), threads);
}

void bracket_counts_op(const Ptrs& g, const Ptrs& w, const Ptrs& numel, const std::vector<int>& dtype, int score,
                       float lo, float hi, int64_t cap, int64_t kept, int64_t counts, int threads) {
  const pecker::cpu::Tensors t{g, w, numel, dtype, score};
  pecker::cpu::bracket_counts(t, lo, hi, cap, as_ptr<float>(kept), as_ptr<int64_t>(counts), threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pecker_kernels CPU kernels (OpenMP, raw pointers)";

  pecker::bind::step_params(m);
  pecker::bind::layouts(m);

  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("kernel_isa", &pecker::cpu::kernels_isa,
        "The instruction set of the range kernels this process runs: \"avx512\", \"avx2\" or \"baseline\" "
        "(PECKER_CPU_ISA=avx2 or =baseline asks for a lesser one).");
  m.def("select", &select_op, nogil,
        "Exact per-segment top-k threshold: writes threshold (float32), take, ties and cut (int64; -1: not "
        "known) per segment.",
        py::arg("g"), py::arg("w"), py::arg("numel"), py::arg("dtype"), py::arg("score"), py::arg("segments"),
        py::arg("ks"), py::arg("threshold"), py::arg("take"), py::arg("ties"), py::arg("cut"), py::arg("threads"));
  m.def("radix_histogram", &radix_histogram_op, nogil,
        "One radix digit pass: int64 [num_segments][2048] counts of the finite scores under each prefix.",
        py::arg("g"), py::arg("w"), py::arg("numel"), py::arg("dtype"), py::arg("score"), py::arg("segments"),
        py::arg("num_segments"), py::arg("digit"), py::arg("prefix"), py::arg("hist"), py::arg("threads"));
  m.def("sample_scores", &sample_scores_op, nogil,
        "Finite scores of evenly spaced runs of 16 (out: float32 [16 * runs]); returns how many.",
        py::arg("g"), py::arg("w"), py::arg("numel"), py::arg("dtype"), py::arg("score"), py::arg("runs"),
        py::arg("out"), py::arg("sampled"), py::arg("threads"));
  m.def("bracket_counts", &bracket_counts_op, nogil,
        "One bracket pass: int64 counts [7] around [lo, hi] and the scores inside packed in kept.",
        py::arg("g"), py::arg("w"), py::arg("numel"), py::arg("dtype"), py::arg("score"), py::arg("lo"),
        py::arg("hi"), py::arg("cap"), py::arg("kept"), py::arg("counts"), py::arg("threads"));
  m.attr("BRACKET_COUNTS") = pecker::cpu::kBracketCounts;
  m.def("write_masks", &write_masks_op, nogil, "Writes the packed int32 masks of a selection.", py::arg("g"),
        py::arg("w"), py::arg("numel"), py::arg("dtype"), py::arg("score"), py::arg("segments"),
        py::arg("threshold"), py::arg("take"), py::arg("ties"), py::arg("cut"), py::arg("num_segments"),
        py::arg("masks_out"), py::arg("threads"));
  m.def("count_steps", &pecker::cpu::count_steps,
        "Adds one to each float32 step counter (data pointers of one-element tensors).", py::arg("steps"));
  m.def("update", &update_op, nogil,
        "Fused masked optimizer step over many tensors (selection by threshold/take/ties or mask_in).",
        py::arg("p"), py::arg("g"), py::arg("m"), py::arg("v"), py::arg("e"), py::arg("numel"), py::arg("dtype"),
        py::arg("state_dtype"), py::arg("params"), py::arg("score"), py::arg("segments"), py::arg("threshold"),
        py::arg("take"), py::arg("ties"), py::arg("cut"), py::arg("num_segments"), py::arg("mask_in"),
        py::arg("mask_out"), py::arg("threads"));
}

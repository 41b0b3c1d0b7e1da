// pybind11 bindings of the CUDA kernels (pecker_kernels._C_cuda). Raw device addresses (Python ints),
// sizes and the caller's stream in; nothing returned; errors raise RuntimeError. Tensor validation lives in
// pecker_kernels/validation.py, the metadata tables in backends/cuda.py, the StepParams every backend gets
// in backends/base.py (kernel_params). Importing needs no GPU.
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>

#include "../csrc/cuda/api.h"
#include "bind_common.h"

namespace py = pybind11;
namespace pc = pecker::cuda;

namespace {

template <class T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

pc::Scope make_scope(uintptr_t tensors, uintptr_t chunks, int64_t n_chunks, uintptr_t seg_ranges,
                     int64_t n_segments) {
  return pc::Scope{ptr<const pc::TensorDesc>(tensors), ptr<const pc::ChunkDesc>(chunks), n_chunks,
                   ptr<const int64_t>(seg_ranges), n_segments};
}

pc::SelectionArgs make_selection(uintptr_t threshold, uintptr_t take, uintptr_t ties, uintptr_t chunk_ties,
                                 uintptr_t chunk_base) {
  return pc::SelectionArgs{ptr<const float>(threshold), ptr<const int64_t>(take), ptr<const int64_t>(ties),
                           ptr<int64_t>(chunk_ties), ptr<int64_t>(chunk_base)};
}

void py_select(uintptr_t tensors, uintptr_t chunks, int64_t n_chunks, uintptr_t seg_ranges, int64_t n_segments,
               uintptr_t ks, uintptr_t hist, uintptr_t state, uintptr_t threshold, uintptr_t take, uintptr_t ties,
            int num_sms, uintptr_t stream) {
  pc::select(make_scope(tensors, chunks, n_chunks, seg_ranges, n_segments), ptr<const int64_t>(ks),
             ptr<uint64_t>(hist), ptr<int64_t>(state), ptr<float>(threshold), ptr<int64_t>(take),
             ptr<int64_t>(ties), num_sms, stream);
}

void py_write_masks(uintptr_t tensors, uintptr_t chunks, int64_t n_chunks, uintptr_t seg_ranges, int64_t n_segments,
                 uintptr_t threshold, uintptr_t take, uintptr_t ties, uintptr_t chunk_ties, uintptr_t chunk_base,
                 uintptr_t stream) {
  pc::write_masks(make_scope(tensors, chunks, n_chunks, seg_ranges, n_segments),
                  make_selection(threshold, take, ties, chunk_ties, chunk_base), stream);
}

void py_update(uintptr_t tensors, uintptr_t chunks, int64_t n_chunks, uintptr_t seg_ranges, int64_t n_segments,
               uintptr_t threshold, uintptr_t take, uintptr_t ties, uintptr_t chunk_ties, uintptr_t chunk_base,
               bool use_masks_in, bool weighted, pecker::StepParams params, uintptr_t scalars, uintptr_t stream) {
  params.scalars = scalars;  // the kernel sets has_grad_scale / inv_grad_scale from it
  pc::update(make_scope(tensors, chunks, n_chunks, seg_ranges, n_segments),
             make_selection(threshold, take, ties, chunk_ties, chunk_base), use_masks_in, weighted, params, stream);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pecker_kernels CUDA kernels (raw pointers, caller's stream)";
  m.attr("CHUNK") = pc::kChunk;
  pecker::bind::step_params(m);
  pecker::bind::layouts(m);
  m.attr("TENSOR_DESC_FIELDS") = static_cast<int>(sizeof(pc::TensorDesc) / sizeof(int64_t));
  // Each TensorDesc field's column in the int64 table that backends/cuda.py builds.
  py::dict offsets;
#define PECKER_COLUMN(field) offsets[#field] = static_cast<int>(offsetof(pc::TensorDesc, field) / sizeof(int64_t))
  PECKER_COLUMN(g);
  PECKER_COLUMN(w);
  PECKER_COLUMN(p);
  PECKER_COLUMN(m);
  PECKER_COLUMN(v);
  PECKER_COLUMN(e);
  PECKER_COLUMN(mask_in);
  PECKER_COLUMN(mask_out);
  PECKER_COLUMN(numel);
  PECKER_COLUMN(segment);
  PECKER_COLUMN(dtype);
  PECKER_COLUMN(w_dtype);
  PECKER_COLUMN(state_dtype);
  PECKER_COLUMN(reserved);
#undef PECKER_COLUMN
  m.attr("TENSOR_DESC_OFFSETS") = offsets;

  // Launches release the GIL: they only enqueue work on `stream`.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("select", &py_select, nogil, "Exact per-segment top-k threshold (3 radix passes, no host sync)",
        py::arg("tensors"), py::arg("chunks"), py::arg("n_chunks"), py::arg("seg_ranges"), py::arg("n_segments"),
        py::arg("ks"), py::arg("hist"), py::arg("state"), py::arg("threshold"), py::arg("take"), py::arg("ties"),
        py::arg("num_sms"), py::arg("stream"));
  m.def("write_masks", &py_write_masks, nogil, "Packed int32 masks of a selection", py::arg("tensors"),
        py::arg("chunks"), py::arg("n_chunks"), py::arg("seg_ranges"), py::arg("n_segments"), py::arg("threshold"),
        py::arg("take"), py::arg("ties"), py::arg("chunk_ties"), py::arg("chunk_base"), py::arg("stream"));
  m.def("update", &py_update, nogil, "Fused masked optimizer step", py::arg("tensors"), py::arg("chunks"),
        py::arg("n_chunks"), py::arg("seg_ranges"), py::arg("n_segments"), py::arg("threshold"), py::arg("take"),
        py::arg("ties"), py::arg("chunk_ties"), py::arg("chunk_base"), py::arg("use_masks_in"), py::arg("weighted"),
        py::arg("params"), py::arg("scalars"), py::arg("stream"));
}

// pybind11 bindings of the CUDA kernels (pecker_kernels._C_cuda). Raw pointers and a stream in.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pecker_kernels CUDA kernels (raw pointers, caller's stream)";
}

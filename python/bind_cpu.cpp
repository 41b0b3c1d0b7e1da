// pybind11 bindings of the CPU kernels (pecker_kernels._C). Raw pointers in, nothing returned.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pecker_kernels CPU kernels (OpenMP, raw pointers)";
}

// The range kernels for the baseline x86-64 instruction set (SSE2): the fallback on any CPU.
// No FP exceptions are observed here, so tell GCC so: under its default -ftrapping-math it will not
// if-convert a float compare or a float operation that sinks into a conditional, which keeps every
// blended update loop scalar. Results do not change (this is not -ffast-math). Set before any include
// so all inline code in this file shares the option (a mismatch blocks inlining).
#pragma GCC optimize("no-trapping-math")
#include "kernels_prelude.h"
#include "pecker/step_math.h"

namespace pecker {
namespace cpu {
namespace {
#include "kernels_impl.inc"
}  // namespace

const KernelTable kBaselineKernels = make_table();

}  // namespace cpu
}  // namespace pecker

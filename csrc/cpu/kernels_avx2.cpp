// The range kernels for AVX2 + F16C, picked at run time (no -march=native: the module is portable).
// FMA is deliberately not enabled, so a * b + c is not contracted and rounds like the eager oracle.
// No FP exceptions are observed here, so tell GCC so: under its default -ftrapping-math it will not
// if-convert a float compare or a float operation that sinks into a conditional, which keeps every
// blended update loop scalar. Results do not change (this is not -ffast-math). Set before any include
// so all inline code in this file shares the option (a mismatch blocks inlining).
#pragma GCC optimize("no-trapping-math")
#include "kernels_prelude.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,f16c")
#define PECKER_HAVE_AVX2_TABLE 1
// GCC does not define __AVX2__ under a target pragma, so the AVX2-only paths of kernels_impl.inc key
// on this instead.
#define PECKER_AVX2 1
#endif
// After the target: the element math is instantiated for the AVX2 lanes (vec8.inc) too.
#include "pecker/step_math.h"

namespace pecker {
namespace cpu {
#ifdef PECKER_HAVE_AVX2_TABLE
namespace {
#include "kernels_impl.inc"
}  // namespace

const KernelTable kAvx2Kernels = make_table();
#endif

}  // namespace cpu
}  // namespace pecker

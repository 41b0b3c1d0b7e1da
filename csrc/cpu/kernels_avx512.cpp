// The range kernels for AVX-512 (F, VL, BW, DQ), picked at run time where the CPU has it. The source is
// the AVX2 copy's: eight-lane (256-bit) vectors, so the lanes round exactly as there, but with 32 vector
// registers instead of 16 (the update's constants and moments no longer spill to the stack) and masked
// stores that leave unselected elements untouched instead of blending and storing them back.
// AVX-512F brings FMA: contraction stays off, so a * b + c rounds twice as in the eager oracle.
#pragma GCC optimize("no-trapping-math")
#pragma GCC optimize("fp-contract=off")
#include "kernels_prelude.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,f16c,avx512f,avx512vl,avx512bw,avx512dq")
#define PECKER_HAVE_AVX512_TABLE 1
#define PECKER_AVX2 1    // the AVX2 paths of kernels_impl.inc (see kernels_avx2.cpp)
#define PECKER_AVX512 1  // and their masked stores
#endif
#include "pecker/step_math.h"

namespace pecker {
namespace cpu {
#ifdef PECKER_HAVE_AVX512_TABLE
namespace {
#include "kernels_impl.inc"
}  // namespace

const KernelTable kAvx512Kernels = make_table();
#endif

}  // namespace cpu
}  // namespace pecker

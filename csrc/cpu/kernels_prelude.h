// Headers every copy of the range kernels needs; included before any `#pragma GCC target`, so library
// code is compiled for the baseline and only the kernels themselves follow the pragma.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // the AVX2 copy compacts kept scores with a permute (kernels_impl.inc)
#endif

#include "convert.h"
#include "kernels.h"
#include "pecker/step_math.h"

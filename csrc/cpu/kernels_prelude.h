// Headers every copy of the range kernels needs; included before any `#pragma GCC target`, so library
// code is compiled for the baseline and only the kernels themselves follow the pragma. Each copy then
// includes pecker/step_math.h after its pragma: the element math is a template that the AVX2 copy
// instantiates with vector lanes, and a function defined before the pragma cannot inline AVX2 code.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // the AVX2 copy compacts kept scores with a permute (kernels_impl.inc)
#endif

#include "convert.h"
#include "kernels.h"

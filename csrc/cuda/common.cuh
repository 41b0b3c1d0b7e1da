// Device helpers shared by the CUDA kernels: error checks, dtype load/store, the score of one element
// and the block-level "which of my elements are selected" routine (threshold, take and tie ranks).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "api.h"
#include "pecker/step_math.h"

namespace pecker {
namespace cuda {

// ---- errors -------------------------------------------------------------------------------------

inline void check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("pecker_kernels CUDA error in ") + what + ": " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ") at " + file +
                             ":" + std::to_string(line));
  }
}
#define PECKER_CUDA_CHECK(expr) ::pecker::cuda::check((expr), #expr, __FILE__, __LINE__)
// After every launch: reports a bad configuration (or an earlier asynchronous fault) at once.
#define PECKER_LAUNCH_CHECK(kernel) ::pecker::cuda::check(cudaGetLastError(), "launch of " kernel, __FILE__, __LINE__)

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

constexpr int kWarps = kBlock / 32;
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kChunk % 32 == 0, "chunks must start on a mask word");
static_assert(kItems * kWarps == 4 * 32, "the tie-rank scan gives each lane of one warp 4 entries");
static_assert(kItems <= 32, "per-thread selection bits live in one 32-bit word");

// ---- dtypes -------------------------------------------------------------------------------------

template <class T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, like torch's copy_ from fp32.
template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Read-only input (gradients, score weights): through the read-only data path.
template <class T>
__device__ __forceinline__ float load_ro(const T* ptr, int i) { return to_float<T>(__ldg(ptr + i)); }

// ---- scores -------------------------------------------------------------------------------------

// Finite scores only: false for +inf and NaN (scores are never negative). Compared as float, the
// same order as the IEEE bits of non-negative floats that the radix passes use.
__device__ __forceinline__ bool is_candidate(float s) { return s <= FLT_MAX; }

struct NoWeight {};

// Score of the elements of one chunk: |g| or |g * w| in fp32, for one (grad dtype, weight dtype).
template <class TG, class TW>
struct ScoreSource {
  const TG* g;
  const TW* w;
  __device__ __forceinline__ float operator()(int i) const {
    if constexpr (std::is_same<TW, NoWeight>::value) {
      return saliency(load_ro(g, i), 0.0f, kScoreGrad);
    } else {
      return saliency(load_ro(g, i), load_ro(w, i), kScoreGradWeight);
    }
  }
};

template <class TG, class F>
__device__ __forceinline__ auto with_weight_type(const TensorDesc& d, int64_t start, F& f) {
  const TG* g = reinterpret_cast<const TG*>(d.g) + start;
  switch (d.w_dtype) {
    case kFloat32: return f(ScoreSource<TG, float>{g, reinterpret_cast<const float*>(d.w) + start});
    case kFloat16: return f(ScoreSource<TG, __half>{g, reinterpret_cast<const __half*>(d.w) + start});
    case kBFloat16:
      return f(ScoreSource<TG, __nv_bfloat16>{g, reinterpret_cast<const __nv_bfloat16*>(d.w) + start});
    default: return f(ScoreSource<TG, NoWeight>{g, nullptr});
  }
}

// Returns f(ScoreSource) typed for tensor d's dtypes, positioned at element `start`. The dtypes are
// uniform over a block (one chunk = one tensor), so the switch never diverges.
template <class F>
__device__ __forceinline__ auto with_score_source(const TensorDesc& d, int64_t start, F&& f) {
  switch (d.dtype) {
    case kFloat16: return with_weight_type<__half>(d, start, f);
    case kBFloat16: return with_weight_type<__nv_bfloat16>(d, start, f);
    default: return with_weight_type<float>(d, start, f);
  }
}

// Valid elements of a chunk (the last chunk of a tensor is partial).
__device__ __forceinline__ int chunk_size(const TensorDesc& d, const ChunkDesc& c) {
  const int64_t rest = d.numel - c.start;
  return rest < kChunk ? static_cast<int>(rest) : kChunk;
}

// ---- selection of one chunk ---------------------------------------------------------------------

// What a block needs to know about its segment's selection.
struct SegmentSelection {
  float threshold;
  int64_t take;
  int64_t base;    // ties in the segment before this chunk (valid when need_rank)
  bool need_rank;  // take != ties: only the first `take` ties in flat order are selected
};

__device__ __forceinline__ SegmentSelection segment_selection(const SelectionArgs& a, int segment,
                                                              int64_t chunk) {
  SegmentSelection s;
  s.threshold = a.threshold[segment];
  s.take = a.take[segment];
  s.need_rank = s.take != a.ties[segment];
  s.base = s.need_rank ? a.chunk_base[chunk] : 0;
  return s;
}

struct RankScratch {
  unsigned prefix[kItems * kWarps];  // ties before (item, warp), in flat order within the chunk
};

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x & 31u; }

// Bit i of the result: this thread's element i (offset i * kBlock + threadIdx.x) is selected.
// s[i] is the element's score, or -1 past the end of the chunk. Must be reached by the whole block
// (it synchronises when ranks are needed); RankScratch is used once per call.
__device__ __forceinline__ unsigned select_bits(const float (&s)[kItems], const SegmentSelection& sel,
                                                RankScratch& scratch) {
  unsigned bits = 0;
  if (!sel.need_rank) {
    // take == ties: every finite score >= threshold (threshold is +inf when nothing is selected).
#pragma unroll
    for (int i = 0; i < kItems; ++i) bits |= unsigned(is_candidate(s[i]) && s[i] >= sel.threshold) << i;
    return bits;
  }
  // Flat order within the chunk is (item, warp, lane). A ballot per item gives each warp's ties;
  // one warp scans the kItems * kWarps counts; a tie's rank is then
  // base + prefix[item, warp] + ties at lower lanes of the same ballot.
  const unsigned lane = lane_id();
  const unsigned warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const unsigned word = __ballot_sync(kFullMask, is_candidate(s[i]) && s[i] == sel.threshold);
    if (lane == 0) scratch.prefix[i * kWarps + warp] = __popc(word);
  }
  __syncthreads();
  if (warp == 0) {
    unsigned c[4];
    unsigned local = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      c[j] = scratch.prefix[4 * lane + j];
      local += c[j];
    }
    unsigned incl = local;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const unsigned up = __shfl_up_sync(kFullMask, incl, d);
      if (lane >= unsigned(d)) incl += up;
    }
    unsigned run = incl - local;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      scratch.prefix[4 * lane + j] = run;
      run += c[j];
    }
  }
  __syncthreads();
  const unsigned lower = (1u << lane) - 1u;  // lanes below this one
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    // The ballot again rather than kItems words kept live across the barriers (register pressure).
    const bool tie = is_candidate(s[i]) && s[i] == sel.threshold;
    const unsigned word = __ballot_sync(kFullMask, tie);
    const int64_t rank = sel.base + scratch.prefix[i * kWarps + warp] + __popc(word & lower);
    const bool above = is_candidate(s[i]) && s[i] > sel.threshold;
    bits |= unsigned(above || (tie && rank < sel.take)) << i;
  }
  return bits;
}

}  // namespace cuda
}  // namespace pecker

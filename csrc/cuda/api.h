// Host-side interface of the CUDA kernels: plain C++ (no CUDA headers), so python/bind_cuda.cpp can be
// compiled by the host compiler. Everything is a raw device address, a size or a stream handle; the
// tables below are built by pecker_kernels/backends/cuda.py as int64 tensors with the same layout.
#pragma once

#include <cstdint>

#include "pecker/codes.h"

namespace pecker {
namespace cuda {

// Elements per work item ("chunk"). One block of kBlock threads handles one chunk, kItems elements
// per thread at offsets i * kBlock + threadIdx.x. A multiple of 32, so every chunk starts on a mask
// word and each warp's 32 consecutive elements form exactly one packed mask word.
constexpr int kBlock = 256;
constexpr int kItems = 16;
constexpr int kChunk = kBlock * kItems;

// One row per tensor of the scope (int64 [n_tensors, 16] on the host side). Addresses are 0 when
// absent. dtype codes: pecker::DtypeCode; w_dtype is -1 when the score does not use a weight.
struct TensorDesc {
  int64_t g;         // gradient (score input; the update's gradient)
  int64_t w;         // score weight ("grad_weight"), else 0
  int64_t p;         // parameter (update only)
  int64_t m;         // exp_avg / momentum buffer, of state_dtype (update only)
  int64_t v;         // exp_avg_sq, of state_dtype (update only)
  int64_t e;         // EMA copy, fp32 (update only)
  int64_t mask_in;   // packed int32 mask to apply instead of a selection
  int64_t mask_out;  // packed int32 mask to write
  int64_t numel;
  int64_t segment;
  int64_t dtype;    // of g (and of p in the update)
  int64_t w_dtype;  // of w, or -1
  int64_t state_dtype;  // of m and v: kFloat32 or kBFloat16
  int64_t reserved[3];
};
static_assert(sizeof(TensorDesc) == 16 * 8, "TensorDesc must match the int64 table built in cuda.py");

// One work item (int64 [n_chunks, 2]): chunks are grouped by segment and, within a segment, in flat
// order (tensor list order, then start), so a segment's chunks form one contiguous range.
struct ChunkDesc {
  int32_t tensor;   // low half of the first int64
  int32_t segment;  // high half of the first int64
  int64_t start;    // first element of the chunk within its tensor (a multiple of kChunk)
};
static_assert(sizeof(ChunkDesc) == 16, "ChunkDesc must match the int64 table built in cuda.py");

// The scope as the kernels see it. seg_ranges is int64 [n_segments, 2]: [first chunk, end chunk).
struct Scope {
  const TensorDesc* tensors;
  const ChunkDesc* chunks;
  int64_t n_chunks;
  const int64_t* seg_ranges;
  int64_t n_segments;
};

// A selection (device arrays of n_segments entries) plus the tie-rank scratch (n_chunks entries each).
struct SelectionArgs {
  const float* threshold;
  const int64_t* take;
  const int64_t* ties;
  int64_t* chunk_ties;  // scratch: ties per chunk
  int64_t* chunk_base;  // scratch: ties before each chunk within its segment (exclusive scan)
};

// Exact per-segment top-k: three radix passes (11 + 11 + 10 bits), bucket choice on the device.
// hist: int64 [n_segments, kRadixBins] scratch; state: int64 [n_segments, 2] scratch; ks: int64 [S].
void select(const Scope& scope, const int64_t* ks, uint64_t* hist, int64_t* state, float* threshold,
            int64_t* take, int64_t* ties, int num_sms, uintptr_t stream);

// Tie counts per chunk and their exclusive scan within each segment; both early-exit for segments
// with take == ties (no ranking needed). Used by write_masks and update.
void tie_ranks(const Scope& scope, const SelectionArgs& sel, uintptr_t stream);

// Writes the packed mask of the selection into every tensor's mask_out.
void write_masks(const Scope& scope, const SelectionArgs& sel, uintptr_t stream);

// The fused masked step. use_masks_in: apply each tensor's mask_in instead of the selection.
// weighted: the selection's score is |g * p| rather than |g|.
void update(const Scope& scope, const SelectionArgs& sel, bool use_masks_in, bool weighted,
            const StepParams& params, uintptr_t stream);

}  // namespace cuda
}  // namespace pecker

// Tie ranks across chunks: a tie (score == threshold) is selected iff fewer than `take` ties precede it
// in the segment's flat order. The count of ties before each chunk is an exclusive scan, within the
// segment, of per-chunk tie counts; the in-chunk part is done by select_bits (common.cuh). Segments
// with take == ties select every tie, need no ranks, and make both kernels exit at once.
#include "common.cuh"

namespace pecker {
namespace cuda {
namespace {

// A hand-written block scan: cub::BlockScan<int64_t> made ptxas report a small spill here.
constexpr int kScanThreads = 512;  // <= 1024: one warp scans the warp sums
constexpr int kScanItems = 8;

// One block per chunk: the number of finite scores equal to the segment's threshold.
__global__ void __launch_bounds__(kBlock) tie_count_kernel(Scope scope, SelectionArgs sel) {
  __shared__ unsigned block_total;
  const ChunkDesc chunk = scope.chunks[blockIdx.x];
  if (sel.take[chunk.segment] == sel.ties[chunk.segment]) return;  // uniform over the block
  const float threshold = sel.threshold[chunk.segment];
  const TensorDesc& d = scope.tensors[chunk.tensor];
  const int n = chunk_size(d, chunk);
  if (threadIdx.x == 0) block_total = 0;
  __syncthreads();
  unsigned count = with_score_source(d, chunk.start, [&](auto score) {
    float s[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int off = i * kBlock + threadIdx.x;
      s[i] = off < n ? score(off) : -1.0f;
    }
    unsigned ties = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) ties += (is_candidate(s[i]) && s[i] == threshold) ? 1u : 0u;
    return ties;
  });
  count = __reduce_add_sync(kFullMask, count);
  if (lane_id() == 0 && count != 0) atomicAdd(&block_total, count);
  __syncthreads();
  if (threadIdx.x == 0) sel.chunk_ties[blockIdx.x] = block_total;
}

__device__ __forceinline__ int64_t warp_inclusive_sum(int64_t x, unsigned lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int64_t up = __shfl_up_sync(kFullMask, x, d);
    if (lane >= unsigned(d)) x += up;
  }
  return x;
}

// One block per segment: exclusive scan of its (contiguous) chunks' tie counts, one tile of
// kScanThreads * kScanItems chunks at a time (thread t holds kScanItems consecutive chunks).
__global__ void __launch_bounds__(kScanThreads) tie_scan_kernel(Scope scope, SelectionArgs sel) {
  constexpr int kScanWarps = kScanThreads / 32;
  __shared__ int64_t warp_sums[kScanWarps];
  __shared__ int64_t tile_total;
  const int segment = blockIdx.x;
  if (sel.take[segment] == sel.ties[segment]) return;  // uniform over the block
  const int64_t begin = scope.seg_ranges[2 * segment];
  const int64_t end = scope.seg_ranges[2 * segment + 1];
  const unsigned lane = lane_id();
  const unsigned warp = threadIdx.x >> 5;
  int64_t running = 0;  // ties in the tiles before this one
  for (int64_t tile = begin; tile < end; tile += kScanThreads * kScanItems) {
    const int64_t first = tile + static_cast<int64_t>(threadIdx.x) * kScanItems;
    int64_t x[kScanItems];
    int64_t mine = 0;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      x[j] = first + j < end ? sel.chunk_ties[first + j] : 0;
      mine += x[j];
    }
    const int64_t incl = warp_inclusive_sum(mine, lane);
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const int64_t w = lane < unsigned(kScanWarps) ? warp_sums[lane] : 0;
      const int64_t w_incl = warp_inclusive_sum(w, lane);
      if (lane < unsigned(kScanWarps)) warp_sums[lane] = w_incl - w;  // exclusive over warps
      if (lane == kScanWarps - 1) tile_total = w_incl;
    }
    __syncthreads();
    int64_t before = running + warp_sums[warp] + incl - mine;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      if (first + j < end) sel.chunk_base[first + j] = before;
      before += x[j];
    }
    running += tile_total;
    __syncthreads();  // warp_sums and tile_total are rewritten by the next tile
  }
}

}  // namespace

void tie_ranks(const Scope& scope, const SelectionArgs& sel, uintptr_t stream) {
  if (scope.n_chunks <= 0 || scope.n_segments <= 0) return;
  const cudaStream_t st = as_stream(stream);
  tie_count_kernel<<<static_cast<unsigned>(scope.n_chunks), kBlock, 0, st>>>(scope, sel);
  PECKER_LAUNCH_CHECK("tie_count_kernel");
  tie_scan_kernel<<<static_cast<unsigned>(scope.n_segments), kScanThreads, 0, st>>>(scope, sel);
  PECKER_LAUNCH_CHECK("tie_scan_kernel");
}

}  // namespace cuda
}  // namespace pecker

// Writes the packed mask of a selection: bit b of word w is element 32 w + b. Each warp covers 32
// consecutive elements of a chunk, so one ballot is one mask word; bits past numel come out zero.
#include "common.cuh"

namespace pecker {
namespace cuda {
namespace {

__global__ void __launch_bounds__(kBlock) write_masks_kernel(Scope scope, SelectionArgs args) {
  __shared__ RankScratch scratch;
  const ChunkDesc chunk = scope.chunks[blockIdx.x];
  const TensorDesc& d = scope.tensors[chunk.tensor];
  if (d.mask_out == 0) return;  // uniform over the block
  const int n = chunk_size(d, chunk);
  const SegmentSelection sel = segment_selection(args, chunk.segment, blockIdx.x);
  const unsigned bits = with_score_source(d, chunk.start, [&](auto score) {
    float s[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int off = i * kBlock + threadIdx.x;
      s[i] = off < n ? score(off) : -1.0f;  // -1: never selected
    }
    return select_bits(s, sel, scratch);
  });
  uint32_t* out = reinterpret_cast<uint32_t*>(d.mask_out) + (chunk.start >> 5);
  const int warp_first = static_cast<int>(threadIdx.x & ~31u);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const unsigned word = __ballot_sync(kFullMask, (bits >> i) & 1u);
    const int first = i * kBlock + warp_first;
    if (lane_id() == 0 && first < n) out[first >> 5] = word;
  }
}

}  // namespace

void write_masks(const Scope& scope, const SelectionArgs& sel, uintptr_t stream) {
  if (scope.n_chunks <= 0) return;
  tie_ranks(scope, sel, stream);
  write_masks_kernel<<<static_cast<unsigned>(scope.n_chunks), kBlock, 0, as_stream(stream)>>>(scope, sel);
  PECKER_LAUNCH_CHECK("write_masks_kernel");
}

}  // namespace cuda
}  // namespace pecker

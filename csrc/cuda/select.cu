// Exact per-segment top-k threshold by most-significant-digit radix select on the score's IEEE bits
// (non-negative floats order like their bit patterns). Three passes of 11, 11 and 10 bits: each pass
// histograms, per segment, the digit of every finite score whose higher digits match the prefix
// chosen so far; a one-warp-per-segment kernel then picks the bucket holding the k-th largest score.
// k, the prefix and the remaining rank stay on the device: no host synchronisation anywhere.
#include <algorithm>

#include "common.cuh"

namespace pecker {
namespace cuda {
namespace {

// Per-segment radix state between passes (int64 [S, 2] on the host side).
struct RadixState {
  unsigned long long k_rem;  // rank of the threshold among the scores matching `prefix` (1-based)
  unsigned prefix;           // digits chosen so far, in place
  int active;                // 0: nothing to select (k_eff == 0), outputs already written
};
static_assert(sizeof(RadixState) == 16, "RadixState must match the int64 [S, 2] scratch");

struct PassParams {
  int shift;      // lowest bit of this pass's digit
  unsigned bins;  // mask of the digit after shifting
  unsigned high;  // bits above the digit (must equal the segment's prefix); 0 in the first pass
};

// Digits: bits 31..21, 20..10, 9..0 (bit 31, the sign, is always 0 for a score), as codes.h defines them.
static_assert(kRadixPasses == 3 && kRadixShift[0] == 21 && kRadixShift[1] == 10 && kRadixShift[2] == 0 &&
                  kRadixWidth[0] == 11 && kRadixWidth[1] == 11 && kRadixWidth[2] == 10,
              "pass_params below spells out the digits of codes.h");
__device__ __forceinline__ PassParams pass_params(int pass) {
  if (pass == 0) return PassParams{21, 0x7ffu, 0u};
  if (pass == 1) return PassParams{10, 0x7ffu, 0xffe00000u};
  return PassParams{0, 0x3ffu, 0xfffffc00u};
}

// Each block takes a contiguous range of chunks (possibly spanning segments, since a segment's chunks
// are contiguous) and keeps one shared-memory histogram, merged into the segment's global histogram
// by atomics whenever the segment changes. Amortises the 2048-bin flush over many chunks.
__global__ void __launch_bounds__(kBlock) radix_hist_kernel(Scope scope, const RadixState* state,
                                                            unsigned long long* hist, int pass,
                                                            int64_t chunks_per_block) {
  __shared__ unsigned counts[kRadixBins];
  const int64_t begin = blockIdx.x * chunks_per_block;
  const int64_t end = begin + chunks_per_block < scope.n_chunks ? begin + chunks_per_block : scope.n_chunks;
  if (begin >= end) return;  // uniform over the block
  const PassParams pp = pass_params(pass);

  for (int b = threadIdx.x; b < kRadixBins; b += kBlock) counts[b] = 0;
  __syncthreads();
  auto flush = [&](int segment) {
    unsigned long long* out = hist + static_cast<int64_t>(segment) * kRadixBins;
    for (int b = threadIdx.x; b < kRadixBins; b += kBlock) {
      const unsigned n = counts[b];
      if (n != 0) {
        atomicAdd(out + b, static_cast<unsigned long long>(n));
        counts[b] = 0;
      }
    }
  };

  int segment = scope.chunks[begin].segment;
  for (int64_t c = begin; c < end; ++c) {
    const ChunkDesc chunk = scope.chunks[c];
    if (chunk.segment != segment) {
      __syncthreads();
      flush(segment);
      __syncthreads();
      segment = chunk.segment;
    }
    unsigned prefix = 0;
    if (pass > 0) {
      const RadixState st = state[segment];
      if (!st.active) continue;  // uniform: k_eff == 0, nothing to count
      prefix = st.prefix;
    }
    const TensorDesc& d = scope.tensors[chunk.tensor];
    const int n = chunk_size(d, chunk);
    with_score_source(d, chunk.start, [&](auto score) {
      // All loads first (kItems in flight per thread), then the shared-memory atomics.
      float s[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int off = i * kBlock + threadIdx.x;
        s[i] = off < n ? score(off) : -1.0f;
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const unsigned bits = __float_as_uint(s[i]);
        if (is_candidate(s[i]) && s[i] >= 0.0f && (bits & pp.high) == prefix) {
          atomicAdd(&counts[(bits >> pp.shift) & pp.bins], 1u);
        }
      }
    });
  }
  __syncthreads();
  flush(segment);
}

// One warp per segment: lane l owns the 64 bins [2047 - 64 l - 63, 2047 - 64 l] (lane 0 the largest
// digits). A warp scan over the lanes' sums finds the lane whose bins hold the k_rem-th largest score;
// that lane walks its bins. The histogram is zeroed after reading, ready for the next pass.
__global__ void __launch_bounds__(32) radix_choose_kernel(const int64_t* ks, RadixState* state,
                                                          unsigned long long* hist, int pass,
                                                          float* threshold, int64_t* take,
                                                          int64_t* ties) {
  constexpr int kPerLane = kRadixBins / 32;
  const int segment = blockIdx.x;
  const unsigned lane = threadIdx.x;
  const PassParams pp = pass_params(pass);
  unsigned long long* h = hist + static_cast<int64_t>(segment) * kRadixBins;
  const int top = kRadixBins - 1 - kPerLane * static_cast<int>(lane);

  RadixState st{0, 0, 0};
  if (pass > 0) {
    st = state[segment];
    if (!st.active) return;  // nothing was counted for this segment; its outputs are final
  }

  unsigned long long sum = 0;
#pragma unroll 8
  for (int j = 0; j < kPerLane; ++j) sum += h[top - j];
  unsigned long long incl = sum;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const unsigned long long up = __shfl_up_sync(kFullMask, incl, d);
    if (lane >= unsigned(d)) incl += up;
  }

  if (pass == 0) {
    // k_eff = min(k, finite scores of the segment); the first pass counts every finite score.
    const unsigned long long finite = __shfl_sync(kFullMask, incl, 31);
    const int64_t k = ks[segment];
    const unsigned long long k_eff =
        k <= 0 ? 0ull : (static_cast<unsigned long long>(k) < finite ? static_cast<unsigned long long>(k) : finite);
    st.k_rem = k_eff;
    st.prefix = 0;
    st.active = k_eff > 0;
    if (k_eff == 0) {
      if (lane == 0) {
        threshold[segment] = __uint_as_float(0x7f800000u);  // +inf
        take[segment] = 0;
        ties[segment] = 0;
        state[segment] = st;
      }
      for (int j = 0; j < kPerLane; ++j) h[top - j] = 0;
      return;
    }
  }

  // First lane whose cumulative count (from the largest digit down) reaches k_rem; it exists because
  // k_rem <= the number of scores matching the prefix, all of which this pass counted.
  const unsigned owner = __ffs(__ballot_sync(kFullMask, incl >= st.k_rem)) - 1;
  if (lane == owner) {
    unsigned long long above = incl - sum;  // scores in larger digits (lanes before this one)
    int bin = top;
    unsigned long long count = 0;
    for (int j = 0; j < kPerLane; ++j) {
      bin = top - j;
      count = h[bin];
      if (above + count >= st.k_rem) break;
      above += count;
    }
    st.k_rem -= above;  // rank of the threshold among the scores in `bin`
    st.prefix |= static_cast<unsigned>(bin) << pp.shift;
    if (pass == 2) {
      threshold[segment] = __uint_as_float(st.prefix);
      take[segment] = static_cast<int64_t>(st.k_rem);
      ties[segment] = static_cast<int64_t>(count);
    } else {
      state[segment] = st;
    }
  }
  __syncwarp();
  for (int j = 0; j < kPerLane; ++j) h[top - j] = 0;
}

}  // namespace

void select(const Scope& scope, const int64_t* ks, uint64_t* hist, int64_t* state, float* threshold,
            int64_t* take, int64_t* ties, int num_sms, uintptr_t stream) {
  if (scope.n_segments <= 0) return;
  const cudaStream_t st = as_stream(stream);
  auto* h = reinterpret_cast<unsigned long long*>(hist);
  auto* radix = reinterpret_cast<RadixState*>(state);
  PECKER_CUDA_CHECK(cudaMemsetAsync(h, 0, sizeof(unsigned long long) * kRadixBins * scope.n_segments, st));

  int64_t grid = 0, per_block = 0;
  if (scope.n_chunks > 0) {
    int blocks_per_sm = 0;
    PECKER_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, radix_hist_kernel, kBlock, 0));
    const int64_t max_grid = static_cast<int64_t>(std::max(num_sms, 1)) * std::max(blocks_per_sm, 1);
    per_block = (scope.n_chunks + max_grid - 1) / max_grid;
    grid = (scope.n_chunks + per_block - 1) / per_block;  // no empty blocks
  }
  for (int pass = 0; pass < 3; ++pass) {
    if (grid > 0) {
      radix_hist_kernel<<<static_cast<unsigned>(grid), kBlock, 0, st>>>(scope, radix, h, pass, per_block);
      PECKER_LAUNCH_CHECK("radix_hist_kernel");
    }
    radix_choose_kernel<<<static_cast<unsigned>(scope.n_segments), 32, 0, st>>>(ks, radix, h, pass, threshold,
                                                                                take, ties);
    PECKER_LAUNCH_CHECK("radix_choose_kernel");
  }
}

}  // namespace cuda
}  // namespace pecker

// The fused masked optimizer step: one pass over p, g and the optimizer state per element. The
// selection is recomputed from the score (or read from a packed mask); selected elements get
// pecker::step_element, unselected ones are not written at all; the EMA follows every element from
// the stored (rounded) parameter. Optionally writes the applied mask. With device step scalars
// (StepParams::scalars) a found_inf skips the whole step without the host ever reading it.
#include "common.cuh"

namespace pecker {
namespace cuda {
namespace {

// Elements whose optimizer state is loaded together: kBatch loads per array in flight per thread
// (the compiler cannot hoist a load above a store to a pointer that might alias it).
constexpr int kBatch = 8;
static_assert(kItems % kBatch == 0, "kItems must be a multiple of kBatch");

struct UpdateArgs {
  SelectionArgs sel;
  StepParams params;
  int use_masks_in;
  int weighted;  // score |g * p| instead of |g|
};

// T: parameter and gradient type; TS: moment storage type (float or __nv_bfloat16, fp32 math either way).
template <class T, class TS>
__device__ __forceinline__ void update_chunk(const TensorDesc& d, const ChunkDesc& chunk, const UpdateArgs& a,
                                             RankScratch& scratch) {
  const int n = chunk_size(d, chunk);
  const unsigned lane = lane_id();
  const int warp_first = static_cast<int>(threadIdx.x & ~31u);
  T* p = reinterpret_cast<T*>(d.p) + chunk.start;
  const T* g = reinterpret_cast<const T*>(d.g) + chunk.start;
  TS* m = d.m ? reinterpret_cast<TS*>(d.m) + chunk.start : nullptr;
  TS* v = d.v ? reinterpret_cast<TS*>(d.v) + chunk.start : nullptr;
  float* e = d.e ? reinterpret_cast<float*>(d.e) + chunk.start : nullptr;
  const StepParams& sp = a.params;
  const bool adam = sp.kind != kSGD;

  float pv[kItems], gv[kItems];
  unsigned valid = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int off = i * kBlock + threadIdx.x;
    const bool in = off < n;
    pv[i] = in ? to_float<T>(p[off]) : 0.0f;
    gv[i] = in ? load_ro(g, off) : 0.0f;
    valid |= unsigned(in) << i;
  }

  unsigned bits = 0;
  if (a.use_masks_in) {
    // Plain loads: mask_in may be the very tensor mask_out overwrites (each word by the warp that read it).
    const uint32_t* words = reinterpret_cast<const uint32_t*>(d.mask_in) + (chunk.start >> 5);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int first = i * kBlock + warp_first;
      if (first < n) bits |= ((words[first >> 5] >> lane) & 1u) << i;
    }
    bits &= valid;  // bits past numel in the last word are not elements
  } else {
    const SegmentSelection sel = segment_selection(a.sel, chunk.segment, blockIdx.x);
    const int kind = a.weighted ? kScoreGradWeight : kScoreGrad;
    float s[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) s[i] = (valid >> i) & 1u ? saliency(gv[i], pv[i], kind) : -1.0f;
    bits = select_bits(s, sel, scratch);
  }

  if (d.mask_out) {  // uniform over the block: the ballots below need every lane
    uint32_t* out = reinterpret_cast<uint32_t*>(d.mask_out) + (chunk.start >> 5);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const unsigned word = __ballot_sync(kFullMask, (bits >> i) & 1u);
      const int first = i * kBlock + warp_first;
      if (lane == 0 && first < n) out[first >> 5] = word;
    }
  }

#pragma unroll
  for (int i0 = 0; i0 < kItems; i0 += kBatch) {
    // State of unselected elements is never read (saves its bandwidth on sparse selections).
    float mv[kBatch], vv[kBatch], ev[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = i0 + j;
      const int off = i * kBlock + threadIdx.x;
      const bool chosen = (bits >> i) & 1u;
      mv[j] = chosen && m ? to_float<TS>(m[off]) : 0.0f;
      vv[j] = chosen && adam && v ? to_float<TS>(v[off]) : 0.0f;
      ev[j] = e && ((valid >> i) & 1u) ? e[off] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = i0 + j;
      const int off = i * kBlock + threadIdx.x;
      float param = pv[i];
      if ((bits >> i) & 1u) {
        step_element(sp, gv[i], param, mv[j], vv[j]);
        const T stored = from_float<T>(param);
        p[off] = stored;
        param = to_float<T>(stored);
        if (m) m[off] = from_float<TS>(mv[j]);
        if (adam && v) v[off] = from_float<TS>(vv[j]);
      }
      if (e && ((valid >> i) & 1u)) e[off] = ema_element(sp, ev[j], param);
    }
  }
}

// Overrides the host step scalars with StepConfig.scalars; false on found_inf (the step is skipped).
__device__ __forceinline__ bool load_step_scalars(StepParams& sp) {
  const float* s = reinterpret_cast<const float*>(static_cast<uintptr_t>(sp.scalars));
  // All five loads issued before the branch: one memory round trip per block.
  const float step_size = __ldg(s + kScalarStepSize), bias_correction2_sqrt = __ldg(s + kScalarBiasCorrection2Sqrt);
  const float inv_grad_scale = __ldg(s + kScalarInvGradScale), found_inf = __ldg(s + kScalarFoundInf);
  const float momentum_init = __ldg(s + kScalarMomentumInit);
  if (found_inf != 0.0f) return false;
  sp.step_size = step_size;
  sp.bias_correction2_sqrt = bias_correction2_sqrt;
  sp.momentum_init = momentum_init != 0.0f;
  sp.has_grad_scale = 1;
  sp.inv_grad_scale = inv_grad_scale;
  return true;
}

template <class T>
__device__ __forceinline__ void update_tensor(const TensorDesc& d, const ChunkDesc& chunk, const UpdateArgs& a,
                                              RankScratch& scratch) {
  if (d.state_dtype == kBFloat16) {
    update_chunk<T, __nv_bfloat16>(d, chunk, a, scratch);
  } else {
    update_chunk<T, float>(d, chunk, a, scratch);
  }
}

__global__ void __launch_bounds__(kBlock) update_kernel(Scope scope, UpdateArgs args) {
  __shared__ RankScratch scratch;
  UpdateArgs a = args;
  // scalars is a kernel argument, so the return is uniform and comes before any store (mask_out too).
  if (a.params.scalars != 0 && !load_step_scalars(a.params)) return;
  const ChunkDesc chunk = scope.chunks[blockIdx.x];
  const TensorDesc& d = scope.tensors[chunk.tensor];
  switch (d.dtype) {  // one tensor per block: uniform
    case kFloat16: update_tensor<__half>(d, chunk, a, scratch); break;
    case kBFloat16: update_tensor<__nv_bfloat16>(d, chunk, a, scratch); break;
    default: update_tensor<float>(d, chunk, a, scratch); break;
  }
}

}  // namespace

void update(const Scope& scope, const SelectionArgs& sel, bool use_masks_in, bool weighted,
            const StepParams& params, uintptr_t stream) {
  if (scope.n_chunks <= 0) return;
  if (!use_masks_in) tie_ranks(scope, sel, stream);
  const UpdateArgs args{sel, params, use_masks_in ? 1 : 0, weighted ? 1 : 0};
  update_kernel<<<static_cast<unsigned>(scope.n_chunks), kBlock, 0, as_stream(stream)>>>(scope, args);
  PECKER_LAUNCH_CHECK("update_kernel");
}

}  // namespace cuda
}  // namespace pecker

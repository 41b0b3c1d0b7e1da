// CPU kernels of pecker_kernels._C: the per-range loops (compiled once per instruction set and picked
// at run time) and the drivers that plan the work over many tensors and run it with OpenMP.
#pragma once

#include <cstdint>
#include <vector>

#include "pecker/codes.h"

namespace pecker {
namespace cpu {

// Where the scores of one tensor come from: |g| or |g * w|, both of dtype `dtype`.
struct ScoreSrc {
  const void* g;
  const void* w;  // nullptr unless score == kScoreGradWeight
  int dtype;
  int score;
};

// One pass of the sample-bracket select over a range: counts around the bracket [lo, hi] and the
// scores inside it (appended to buf while they fit). `bracket` keeps the scores strictly inside and
// counts those at either end; `closed_bracket` keeps [lo, hi] whole and counts no ends (eq_* stay 0).
struct BracketAcc {
  int64_t finite = 0;  // finite scores
  int64_t above = 0;   // finite scores > hi
  int64_t eq_hi = 0;   // scores == hi
  int64_t eq_lo = 0;   // scores == lo (only when lo < hi)
  int64_t mid = 0;     // scores in (lo, hi); closed_bracket: in [lo, hi]
  float* buf = nullptr;
  int64_t size = 0;
  int64_t cap = 0;
  bool overflow = false;  // some mid scores were not stored
};

// Everything the update loop touches for one tensor. Absent state pointers are nullptr.
struct UpdateArgs {
  void* p;
  const void* g;
  void* m;  // moments, of dtype state_dtype
  void* v;
  float* e;
  const uint32_t* mask_in;  // nullptr: select by score
  uint32_t* mask_out;       // nullptr: no mask written
  int dtype;
  int state_dtype;  // kFloat32 or kBFloat16
  int score;
  StepParams sp;
};

// Range kernels; element indices are relative to the tensor, and every range starts at a multiple of
// 32 (a mask word). Selected by score: s >= (i < cut ? t_in : t_st) and s finite.
struct KernelTable {
  void (*bracket)(const ScoreSrc&, int64_t begin, int64_t end, float lo, float hi, BracketAcc& acc);
  void (*closed_bracket)(const ScoreSrc&, int64_t begin, int64_t end, float lo, float hi, BracketAcc& acc);
  // Radix digit histogram of the finite scores whose key >> prefix_shift == prefix.
  void (*histogram)(const ScoreSrc&, int64_t begin, int64_t end, int prefix_shift, uint32_t prefix,
                    int digit_shift, uint32_t digit_mask, uint32_t* hist);
  int64_t (*collect)(const ScoreSrc&, int64_t begin, int64_t end, float* out);  // finite scores
  int64_t (*count_equal)(const ScoreSrc&, int64_t begin, int64_t end, float value);
  void (*masks)(const ScoreSrc&, int64_t begin, int64_t end, int64_t cut, float t_in, float t_st,
                uint32_t* words);
  void (*update)(const UpdateArgs&, int64_t begin, int64_t end, int64_t cut, float t_in, float t_st);
};

extern const KernelTable kBaselineKernels;
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;
const KernelTable& kernels();  // the best table this CPU runs (PECKER_CPU_ISA may ask for a lesser one)
const char* kernels_isa();     // its name: "avx512", "avx2" or "baseline"

// ---- drivers (ops.cpp) -------------------------------------------------------------------------

struct Tensors {
  std::vector<int64_t> g;      // data pointers
  std::vector<int64_t> w;      // empty unless score == grad_weight
  std::vector<int64_t> numel;  // elements per tensor
  std::vector<int> dtype;      // codes.h dtype code per tensor
  int score;
};

// One digit pass of the radix select (digit 0, 1, 2: bits 31-21, 20-10, 9-0 of the fp32 score) over the
// finite scores whose higher digits equal prefix[segment]: hist is int64 [num_segments][2048].
void radix_histogram(const Tensors& t, const std::vector<int64_t>& segments, int64_t num_segments, int digit,
                     const uint32_t* prefix, int64_t* hist, int threads);

// Per segment: threshold, take and ties (backends/base.py), and cut: the segment flat index just past
// the take-th tie where the select found it without a pass of its own (a threshold inside the sample
// bracket: its ties are all among the kept scores), else -1. write_masks and update plan with it.
void select(const Tensors& t, const std::vector<int64_t>& segments, const std::vector<int64_t>& ks,
            float* threshold, int64_t* take, int64_t* ties, int64_t* cut, int threads);

// The sharded select's local passes (pecker_kernels.distributed): evenly spaced runs of 16 scores over
// the tensors' flat order, the finite ones written to `out` (room for 16 * runs; returns how many,
// `sampled` gets how many were read); and one bracket pass over every tensor, counts[kBracketCounts] =
// finite, > hi, == hi, == lo (lo < hi), in (lo, hi), kept, overflow, with the kept scores (those in
// (lo, hi), while each thread's share fits `cap`) packed at the front of `kept` (threads * cap floats).
constexpr int kBracketCounts = 7;
int64_t sample_scores(const Tensors& t, int64_t runs, float* out, int64_t* sampled, int threads);
void bracket_counts(const Tensors& t, float lo, float hi, int64_t cap, float* kept, int64_t* counts,
                    int threads);

void write_masks(const Tensors& t, const std::vector<int64_t>& segments, const float* threshold,
                 const int64_t* take, const int64_t* ties, const int64_t* cut, int64_t num_segments,
                 const std::vector<int64_t>& masks_out, int threads);

struct UpdateTensors {
  std::vector<int64_t> p, g, m, v, e;  // m, v, e empty when absent
  std::vector<int64_t> numel;
  std::vector<int> dtype;
  std::vector<int> state_dtype;  // of m and v, per tensor
  std::vector<int64_t> mask_in, mask_out;  // empty when absent
};

void update(const UpdateTensors& t, const StepParams& sp, int score, const std::vector<int64_t>& segments,
            const float* threshold, const int64_t* take, const int64_t* ties, const int64_t* cut,
            int64_t num_segments, int threads);

// Adds one to each float32 step counter (the optimizer's state["step"] of a host step): one call for
// every parameter instead of an in-place add each, a dispatch of microseconds apiece.
void count_steps(const std::vector<int64_t>& steps);

}  // namespace cpu
}  // namespace pecker

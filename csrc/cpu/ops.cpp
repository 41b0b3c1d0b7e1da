// Drivers of the CPU ops: plan the work over the tensor list, split it into chunks and run the range
// kernels with OpenMP. Scores are never stored; every pass recomputes them from g (and w).
#include <omp.h>

#include <algorithm>
#include <utility>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels.h"

namespace pecker {
namespace cpu {

const KernelTable& kernels() {
#if defined(__x86_64__) || defined(__i386__)
  // PECKER_CPU_ISA=avx2 or =baseline asks for a lesser table than the CPU runs (to test each here).
  static const KernelTable& best = []() -> const KernelTable& {
    const char* asked = std::getenv("PECKER_CPU_ISA");
    const std::string isa = asked == nullptr ? "" : asked;
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    if (isa == "baseline") return kBaselineKernels;
    if (avx512 && isa != "avx2") return kAvx512Kernels;
    if (avx2) return kAvx2Kernels;
    return kBaselineKernels;
  }();
  return best;
#else
  return kBaselineKernels;
#endif
}

const char* kernels_isa() {
  const KernelTable& k = kernels();
#if defined(__x86_64__) || defined(__i386__)
  if (&k == &kAvx512Kernels) return "avx512";
  if (&k == &kAvx2Kernels) return "avx2";
#endif
  return "baseline";
}

namespace {

// Chunk of work: a multiple of 32 (mask words stay inside one chunk) and small enough to balance the
// threads and to make per-chunk tie counts cheap to rescan.
constexpr int64_t kChunk = int64_t{1} << 15;
// Segments up to this size are selected by one thread each (copy + nth_element).
constexpr int64_t kSmallSegment = int64_t{1} << 15;
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = int64_t{1} << 14;

constexpr float kInf = __builtin_inff();
constexpr int kDigitBins = kRadixBins;

template <class T>
T* as_ptr(int64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

uint32_t float_bits(float x) {
  uint32_t key;
  std::memcpy(&key, &x, sizeof key);
  return key;
}

struct Range {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

void append_chunks(std::vector<Range>& out, int64_t tensor, int64_t numel) {
  for (int64_t b = 0; b < numel; b += kChunk) out.push_back({tensor, b, std::min(numel, b + kChunk)});
}

ScoreSrc score_src(const Tensors& t, int64_t i) {
  return ScoreSrc{as_ptr<const void>(t.g[i]), t.w.empty() ? nullptr : as_ptr<const void>(t.w[i]), t.dtype[i],
                  t.score};
}

struct Result {
  float threshold;
  int64_t take;
  int64_t ties;
  int64_t cut = -1;  // segment flat index just past the take-th tie; -1: not known (see select())
};

constexpr Result kNothing{kInf, 0, 0};

// The index just past the nth (1-based) score equal to `value` in [begin, end), which holds at least n
// (end if it holds fewer: the scan never leaves the range).
int64_t past_nth_tie(const KernelTable& K, const ScoreSrc& src, int64_t begin, int64_t end, float value,
                     int64_t n) {
  int64_t i = begin;
  for (; i < end; i += 64) {
    const int64_t c = K.count_equal(src, i, std::min(end, i + 64), value);
    if (c >= n) break;
    n -= c;
  }
  for (; i < end; ++i) {
    n -= K.count_equal(src, i, i + 1, value);
    if (n == 0) return i + 1;
  }
  return end;
}

// Exact selection among `n` finite scores held in memory (reordered in place). Large sets narrow the
// search with a 2048-bin histogram over their own key range and keep only the bucket holding the k-th
// largest: two linear passes per level instead of nth_element's several, and the kept scores of a
// bracket span a narrow range, so one or two levels leave a handful.
Result select_in_memory(float* s, int64_t n, int64_t k) {
  const int64_t k_eff = std::min(k, n);
  if (k_eff <= 0) return kNothing;
  constexpr int64_t kSmall = 4096;
  if (n <= kSmall) {
    std::nth_element(s, s + (k_eff - 1), s + n, std::greater<float>());
    const float thr = s[k_eff - 1];
    int64_t greater = 0, equal = 0;
    for (int64_t i = 0; i < n; ++i) {
      greater += s[i] > thr;
      equal += s[i] == thr;
    }
    return Result{thr, k_eff - greater, equal};
  }
  // Finite non-negative scores order like their bit patterns.
  uint32_t lo = UINT32_MAX, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t key;
    std::memcpy(&key, s + i, sizeof key);
    lo = std::min(lo, key);
    hi = std::max(hi, key);
  }
  if (lo == hi) return Result{s[0], k_eff, n};  // all equal
  int shift = 0;
  while (((hi - lo) >> shift) >= kDigitBins) ++shift;
  std::vector<int64_t> hist(kDigitBins, 0);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t key;
    std::memcpy(&key, s + i, sizeof key);
    ++hist[(key - lo) >> shift];
  }
  int64_t need = k_eff;
  uint32_t bucket = static_cast<uint32_t>((hi - lo) >> shift);
  for (; bucket > 0 && hist[bucket] < need; --bucket) need -= hist[bucket];
  int64_t m = 0;  // the bucket's scores, moved to the front
  for (int64_t i = 0; i < n; ++i) {
    uint32_t key;
    std::memcpy(&key, s + i, sizeof key);
    const float x = s[i];
    s[m] = x;
    m += ((key - lo) >> shift) == bucket;
  }
  // Everything above the bucket is above the threshold, and every tie is inside it.
  return select_in_memory(s, m, need);
}

// The idx-th largest (0-based) of n finite scores, for two indices at once: one histogram over the
// scores' key range finds the bucket of each, and an exact select finishes inside each bucket. `s` is
// left as it was; `scratch` holds 2 n floats.
std::pair<float, float> two_order_statistics(const float* s, int64_t n, int64_t idx_a, int64_t idx_b,
                                            float* scratch) {
  uint32_t lo = UINT32_MAX, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, float_bits(s[i]));
    hi = std::max(hi, float_bits(s[i]));
  }
  int shift = 0;
  while (((hi - lo) >> shift) >= kDigitBins) ++shift;
  int64_t hist[kDigitBins] = {};
  for (int64_t i = 0; i < n; ++i) ++hist[(float_bits(s[i]) - lo) >> shift];
  const auto bucket_of = [&](int64_t idx, int64_t& rank) {  // rank: 1-based, inside the bucket
    rank = idx + 1;
    int64_t b = static_cast<int64_t>((hi - lo) >> shift);
    for (; b > 0 && hist[b] < rank; --b) rank -= hist[b];
    return static_cast<uint32_t>(b);
  };
  int64_t rank_a, rank_b;
  const uint32_t bucket_a = bucket_of(idx_a, rank_a), bucket_b = bucket_of(idx_b, rank_b);
  float* in_a = scratch;
  float* in_b = scratch + n;
  int64_t na = 0, nb = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = (float_bits(s[i]) - lo) >> shift;
    if (b == bucket_a) in_a[na++] = s[i];
    if (b == bucket_b) in_b[nb++] = s[i];
  }
  return {select_in_memory(in_a, na, rank_a).threshold, select_in_memory(in_b, nb, rank_b).threshold};
}

struct Segment {
  std::vector<int64_t> members;  // tensor indices in list order
  int64_t numel = 0;
};

std::vector<Segment> segments_of(const std::vector<int64_t>& segments, const std::vector<int64_t>& numel,
                                 int64_t num_segments) {
  std::vector<Segment> out(static_cast<size_t>(num_segments));
  for (size_t i = 0; i < segments.size(); ++i) {
    Segment& s = out[static_cast<size_t>(segments[i])];
    s.members.push_back(static_cast<int64_t>(i));
    s.numel += numel[i];
  }
  return out;
}

// Radix digits of the score bits, most significant first (codes.h: 11 + 11 + 10 bits).
constexpr const int* kShift = kRadixShift;
constexpr uint32_t kMask[kRadixPasses] = {(1u << kRadixWidth[0]) - 1, (1u << kRadixWidth[1]) - 1,
                                          (1u << kRadixWidth[2]) - 1};

// MSD radix select on the score bits, one parallel histogram pass per digit.
Result radix_select(const Tensors& t, const std::vector<Range>& chunks, int64_t k, int threads) {
  const KernelTable& K = kernels();
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  int64_t total = 0;
  for (const Range& r : chunks) total += r.end - r.begin;
  const int nt = total >= kParallelMin ? std::max(1, threads) : 1;
  std::vector<uint32_t> hists(static_cast<size_t>(nt) * 2048);
  std::vector<int64_t> hist(2048);
  int prefix_shift = 31;
  uint32_t prefix = 0;
  int64_t need = 0;
  for (int d = 0; d < 3; ++d) {
    std::fill(hists.begin(), hists.end(), 0u);
#pragma omp parallel num_threads(nt)
    {
      uint32_t* mine = hists.data() + static_cast<size_t>(omp_get_thread_num()) * 2048;
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < nchunks; ++c) {
        const Range& r = chunks[static_cast<size_t>(c)];
        K.histogram(score_src(t, r.tensor), r.begin, r.end, prefix_shift, prefix, kShift[d], kMask[d], mine);
      }
    }
    // Chunks hold at most kChunk elements, so a uint32 bucket of one thread cannot overflow; the
    // merged counts are int64.
    std::fill(hist.begin(), hist.end(), 0);
    for (int th = 0; th < nt; ++th)
      for (int b = 0; b < 2048; ++b) hist[static_cast<size_t>(b)] += hists[static_cast<size_t>(th) * 2048 + b];
    if (d == 0) {
      int64_t finite = 0;
      for (int64_t c : hist) finite += c;
      need = std::min(k, finite);
      if (need <= 0) return kNothing;
    }
    int64_t bucket = static_cast<int64_t>(kMask[d]);
    for (; bucket > 0; --bucket) {
      const int64_t c = hist[static_cast<size_t>(bucket)];
      if (c >= need) break;
      need -= c;
    }
    prefix = (prefix << (d == 2 ? 10 : 11)) | static_cast<uint32_t>(bucket);
    prefix_shift = kShift[d];
    if (d == 2) {
      float thr;
      std::memcpy(&thr, &prefix, sizeof thr);
      return Result{thr, need, hist[static_cast<size_t>(bucket)]};
    }
  }
  return kNothing;  // not reached
}

// Scratch memory of the bracket select, kept by the calling thread from one call to the next: a fresh
// page costs a fault on first touch (microseconds each in a virtual machine), and one select at 1e7
// scores touches about 4 MB of scratch. Beyond kKeepFloats a buffer is handed back after the call.
struct SelectScratch {
  std::vector<float> slots, sample, order, kept, in_bucket;
  std::vector<int64_t> kept_per_run, bucket_at;
  std::vector<uint32_t> hists;
};
constexpr size_t kKeepFloats = size_t{1} << 24;

SelectScratch& select_scratch() {
  thread_local SelectScratch scratch;
  return scratch;
}

// Grows v to n elements (never shrinks: the capacity is what is being kept) and returns its data.
template <class T>
T* room(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

void trim(std::vector<float>& v) {
  if (v.capacity() > kKeepFloats) std::vector<float>().swap(v);
}

// Sample-bracket select: a sample of the scores gives [lo, hi] holding the k-th largest with high
// probability; one pass counts the scores above/at the bracket ends and keeps those inside it, and an
// exact select on the kept few finishes. A miss (or too many kept) falls back to radix_select, so the
// result is exact whatever the sample says.
// The sample is taken in short runs (one cache line of fp32 each): a run costs one cache miss where
// scattered single elements cost one each, and the runs still spread over the whole segment.
constexpr int64_t kRun = 16;

// Run j of `runs` covers [pos_j, pos_j + kRun) of the flat order of `members` (n elements in all), cut
// at its tensor's end; the finite scores of every run are packed into `sample` (room for runs * kRun).
// Returns how many; `sampled` gets how many scores were read, finite or not.
int64_t sample_runs_of(const Tensors& t, const std::vector<int64_t>& members, int64_t n, int64_t runs,
                       float* sample, int64_t* sampled, SelectScratch& scratch, int threads) {
  const KernelTable& K = kernels();
  std::vector<Range> sample_runs(static_cast<size_t>(runs));
  {
    size_t member = 0;
    int64_t offset = 0;  // flat index of the current member's first element
    for (int64_t j = 0; j < runs; ++j) {
      const int64_t pos = ((2 * j + 1) * n) / (2 * runs);
      while (pos >= offset + t.numel[static_cast<size_t>(members[member])]) {
        offset += t.numel[static_cast<size_t>(members[member])];
        ++member;
      }
      const int64_t i = members[member];
      const int64_t b = pos - offset;
      sample_runs[static_cast<size_t>(j)] = {i, b, std::min(b + kRun, t.numel[static_cast<size_t>(i)])};
    }
  }
  // Every run is a cache miss: the threads take them in parallel, each into its own slot of kRun.
  float* slots = room(scratch.slots, static_cast<size_t>(runs * kRun));
  int64_t* kept_per_run = room(scratch.kept_per_run, static_cast<size_t>(runs));
  const int sample_threads = n >= kParallelMin ? std::max(1, threads) : 1;
#pragma omp parallel for num_threads(sample_threads) schedule(static)
  for (int64_t j = 0; j < runs; ++j) {
    const Range& r = sample_runs[static_cast<size_t>(j)];
    kept_per_run[j] = K.collect(score_src(t, r.tensor), r.begin, r.end, slots + j * kRun);
  }
  int64_t m = 0;   // scores sampled, finite or not
  int64_t mf = 0;  // finite ones, packed at the front of `sample`
  for (int64_t j = 0; j < runs; ++j) {
    const Range& r = sample_runs[static_cast<size_t>(j)];
    m += r.end - r.begin;
    std::copy(slots + j * kRun, slots + j * kRun + kept_per_run[j], sample + mf);
    mf += kept_per_run[j];
  }
  *sampled = m;
  return mf;
}

// Where one chunk's kept scores lie: [begin, end) of thread `thread`'s region of the kept buffer.
struct KeptSlice {
  int thread = 0;
  int64_t begin = 0, end = 0;
};

// The bracket kernel over `chunks` on nt threads: thread th keeps its scores in [th * cap, th * cap +
// size) of `kept`, then runs after(th, its accumulator); returns every thread's accumulator. With
// `slices`, slices[c] records where chunk c's kept scores went.
using BracketKernel = void (*)(const ScoreSrc&, int64_t, int64_t, float, float, BracketAcc&);

template <class After>
std::vector<BracketAcc> bracket_pass(BracketKernel kernel, const Tensors& t, const std::vector<Range>& chunks,
                                     float lo, float hi, int64_t cap, float* kept, KeptSlice* slices, int nt,
                                     After&& after) {
  std::vector<BracketAcc> accs(static_cast<size_t>(nt));
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel num_threads(nt)
  {
    const int me = omp_get_thread_num();
    BracketAcc acc;
    acc.buf = kept + static_cast<size_t>(me) * static_cast<size_t>(cap);
    acc.cap = cap;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t c = 0; c < nchunks; ++c) {
      const Range& r = chunks[static_cast<size_t>(c)];
      const int64_t before = acc.size;
      kernel(score_src(t, r.tensor), r.begin, r.end, lo, hi, acc);
      if (slices != nullptr) slices[c] = KeptSlice{me, before, acc.size};
    }
    accs[static_cast<size_t>(me)] = acc;
    after(me, acc);
  }
  return accs;
}

BracketAcc merged(const std::vector<BracketAcc>& accs) {
  BracketAcc all;
  for (const BracketAcc& a : accs) {
    all.finite += a.finite;
    all.above += a.above;
    all.eq_hi += a.eq_hi;
    all.eq_lo += a.eq_lo;
    all.mid += a.mid;
    all.size += a.size;
    all.overflow |= a.overflow;
  }
  return all;
}

Result bracket_select(const Tensors& t, const Segment& seg, const std::vector<Range>& chunks, int64_t k,
                      int threads) {
  const int64_t n = seg.numel;
  // The sample costs about its size (its statistics read it three times), the kept scores about
  // n / sqrt(sample): the sum is least near a sample of n^(2/3) scores (~2400 runs at 1e7, ~500 at 1e6).
  const int64_t runs = std::clamp<int64_t>(
      static_cast<int64_t>(std::cbrt(static_cast<double>(n) * static_cast<double>(n)) / 19.0), 64, 4096);
  SelectScratch& scratch = select_scratch();
  struct TrimOnReturn {
    SelectScratch& s;
    ~TrimOnReturn() {
      for (std::vector<float>* v : {&s.slots, &s.sample, &s.order, &s.kept, &s.in_bucket}) trim(*v);
    }
  } trim_on_return{scratch};
  float* sample = room(scratch.sample, static_cast<size_t>(runs * kRun));
  int64_t m = 0;
  const int64_t mf = sample_runs_of(t, seg.members, n, runs, sample, &m, scratch, threads);
  float lo = 0.0f, hi = __FLT_MAX__;
  double kept_fraction = 1.0;
  bool closed = false;  // which bracket pass: kernels.h, BracketAcc
  if (mf > 0) {
    // Expected position of the k-th largest among the finite samples (clamped: k may exceed n).
    const double r = std::min(static_cast<double>(k) * static_cast<double>(m) / static_cast<double>(n) - 0.5,
                              static_cast<double>(m));
    const double margin = 4.0 * std::sqrt(std::max(r, 0.0) + 1.0) + 4.0;
    const int64_t hi_idx = static_cast<int64_t>(std::floor(r - margin));
    const int64_t lo_idx = static_cast<int64_t>(std::ceil(r + margin));
    // The two order statistics (0-based, descending) by the histogram select, on scratch copies.
    const auto [hi_stat, lo_stat] =
        two_order_statistics(sample, mf, std::clamp<int64_t>(hi_idx, 0, mf - 1),
                             std::clamp<int64_t>(lo_idx, 0, mf - 1), room(scratch.order, 2 * static_cast<size_t>(mf)));
    if (lo_idx < mf) lo = lo_stat;
    if (hi_idx >= 0) hi = hi_stat;
    kept_fraction =
        static_cast<double>(std::max<int64_t>(std::min(lo_idx, mf) - std::max<int64_t>(hi_idx, 0), 0)) / m;
    // The closed bracket keeps the scores equal to lo or hi too, so it suits ends that are not atoms:
    // where the sample holds at most half as many at the ends as inside, keeping them costs little.
    int64_t at_ends = 0, inside = 0;
    for (int64_t j = 0; j < mf; ++j) {
      at_ends += (sample[j] == lo) | (sample[j] == hi);
      inside += (sample[j] > lo) & (sample[j] < hi);
    }
    closed = lo < hi && 2 * at_ends <= inside;
    if (closed) kept_fraction = std::max(kept_fraction, static_cast<double>(at_ends + inside) / m);
  }
  const int nt = n >= kParallelMin ? std::max(1, threads) : 1;
  // Room for three times the expected share of each thread, so an unlucky spread rarely overflows.
  // Beyond n / 8 kept scores an in-memory select costs more than the radix passes it would save.
  const int64_t cap = std::min(std::max<int64_t>(n / 8, 65536),
                               static_cast<int64_t>(3.0 * kept_fraction * static_cast<double>(n) / nt) + 4096);
  // Thread th keeps its scores in [th * cap, th * cap + size) of one buffer, and a histogram of them
  // over the bracket's keys (finite non-negative scores order like their bits), so that the exact
  // select afterwards only has to look at the one bucket holding the threshold.
  const size_t region = static_cast<size_t>(cap);
  float* kept = room(scratch.kept, static_cast<size_t>(nt) * region);
  const uint32_t lo_key = float_bits(lo);
  int bucket_shift = 0;
  while (((float_bits(hi) - lo_key) >> bucket_shift) >= kDigitBins) ++bucket_shift;
  uint32_t* hists = room(scratch.hists, static_cast<size_t>(nt) * kDigitBins);
  std::fill(hists, hists + static_cast<size_t>(nt) * kDigitBins, 0u);
  const KernelTable& K = kernels();
  std::vector<KeptSlice> slices(chunks.size());
  const std::vector<BracketAcc> accs =
      bracket_pass(closed ? K.closed_bracket : K.bracket, t, chunks, lo, hi, cap, kept, slices.data(), nt,
                   [&](int me, const BracketAcc& acc) {
        uint32_t* hist = hists + static_cast<size_t>(me) * kDigitBins;  // at most cap < 2^32 scores a thread
        if (!acc.overflow)
          for (int64_t j = 0; j < acc.size; ++j) ++hist[(float_bits(acc.buf[j]) - lo_key) >> bucket_shift];
      });
  const BracketAcc all = merged(accs);
  const int64_t k_eff = std::min(k, all.finite);
  if (k_eff <= 0) return kNothing;
  // A threshold found among the kept scores has every tie kept: counting them chunk by chunk from the
  // kept slices (a few percent of the scores) finds the take-th tie in flat order, so ranking the ties
  // for the update reads one chunk instead of every score.
  const auto with_cut = [&](Result r) {
    if (r.take <= 0 || r.take >= r.ties) return r;
    const int64_t nchunks = static_cast<int64_t>(chunks.size());
    std::vector<int64_t> ties_in(chunks.size());
#pragma omp parallel for num_threads(all.size >= kParallelMin ? nt : 1) schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const KeptSlice& sl = slices[static_cast<size_t>(c)];
      const float* buf = kept + static_cast<size_t>(sl.thread) * region;
      int64_t count = 0;
      for (int64_t j = sl.begin; j < sl.end; ++j) count += buf[j] == r.threshold;
      ties_in[static_cast<size_t>(c)] = count;
    }
    int64_t left = r.take;
    int64_t flat = 0;  // segment flat index of chunk c's first element (chunks are in flat order)
    for (int64_t c = 0; c < nchunks; ++c) {
      const Range& ch = chunks[static_cast<size_t>(c)];
      if (ties_in[static_cast<size_t>(c)] >= left) {
        r.cut = flat + past_nth_tie(K, score_src(t, ch.tensor), ch.begin, ch.end, r.threshold, left) - ch.begin;
        break;
      }
      left -= ties_in[static_cast<size_t>(c)];
      flat += ch.end - ch.begin;
    }
    return r;
  };
  // The rank-th largest of the kept scores, all of which are stored; every score above them is counted.
  const auto from_kept = [&](int64_t rank) {
    // The bucket holding the rank-th largest kept score; every score of a higher bucket is above it.
    int64_t bucket = kDigitBins - 1;
    for (;; --bucket) {
      int64_t count = 0;
      for (int th = 0; th < nt; ++th) count += hists[static_cast<size_t>(th) * kDigitBins + bucket];
      if (count >= rank || bucket == 0) break;
      rank -= count;
    }
    // Each thread copies that bucket's scores into its share of one buffer (one slot more than it
    // needs: the copy stores every score and advances past the bucket's), then the shares are joined.
    // The kept regions stay whole: the tie ranking below reads them chunk by chunk.
    int64_t* bucket_at = room(scratch.bucket_at, static_cast<size_t>(nt) + 1);
    bucket_at[0] = 0;
    for (int th = 0; th < nt; ++th)
      bucket_at[th + 1] = bucket_at[th] + hists[static_cast<size_t>(th) * kDigitBins + bucket] + 1;
    float* in_bucket = room(scratch.in_bucket, static_cast<size_t>(bucket_at[nt]));
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int th = 0; th < nt; ++th) {
      const float* buf = kept + static_cast<size_t>(th) * region;
      float* out = in_bucket + bucket_at[th];
      int64_t m = 0;
      for (int64_t j = 0; j < accs[static_cast<size_t>(th)].size; ++j) {
        const float x = buf[j];
        out[m] = x;
        m += ((float_bits(x) - lo_key) >> bucket_shift) == static_cast<uint32_t>(bucket);
      }
    }
    int64_t at = 0;
    for (int th = 0; th < nt; ++th) {
      const int64_t size = bucket_at[th + 1] - bucket_at[th] - 1;
      std::memmove(in_bucket + at, in_bucket + bucket_at[th], sizeof(float) * size);
      at += size;
    }
    // Every tie of the threshold is among the kept scores (which hold every score of its value), and
    // in its bucket.
    return with_cut(select_in_memory(in_bucket, at, rank));
  };
  if (closed) {
    // Descending order of the finite scores: above | [lo, hi], kept | below.
    const int64_t rank = k_eff - all.above;
    if (rank >= 1 && rank <= all.mid && !all.overflow) return from_kept(rank);
  } else if (k_eff > all.above) {
    // Descending order of the finite scores: above | == hi | (lo, hi), kept | == lo | below.
    int64_t rank = k_eff - all.above;
    if (rank <= all.eq_hi) return Result{hi, rank, all.eq_hi};
    rank -= all.eq_hi;
    if (rank <= all.mid && !all.overflow) return from_kept(rank);
    if (rank > all.mid) {
      rank -= all.mid;
      if (rank <= all.eq_lo) return Result{lo, rank, all.eq_lo};
    }
  }
  return radix_select(t, chunks, k, threads);
}

// PECKER_CPU_SELECT=radix skips the bracket (to test the fallback on inputs where it would hit).
bool force_radix() {
  static const bool radix =
      std::getenv("PECKER_CPU_SELECT") && std::string(std::getenv("PECKER_CPU_SELECT")) == "radix";
  return radix;
}

}  // namespace

void radix_histogram(const Tensors& t, const std::vector<int64_t>& segments, int64_t num_segments, int digit,
                     const uint32_t* prefix, int64_t* hist, int threads) {
  const KernelTable& K = kernels();
  std::vector<Range> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < t.numel.size(); ++i) {
    append_chunks(chunks, static_cast<int64_t>(i), t.numel[i]);
    total += t.numel[i];
  }
  const int prefix_shift = digit == 0 ? 31 : kShift[digit - 1];
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  const int nt = total >= kParallelMin ? std::max(1, threads) : 1;
  const size_t per_thread = static_cast<size_t>(num_segments) * kDigitBins;
  // One uint32 histogram per thread and segment: a bucket overflows only past 2^32 elements a thread.
  std::vector<uint32_t> hists(static_cast<size_t>(nt) * per_thread, 0u);
#pragma omp parallel num_threads(nt)
  {
    uint32_t* mine = hists.data() + static_cast<size_t>(omp_get_thread_num()) * per_thread;
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < nchunks; ++c) {
      const Range& r = chunks[static_cast<size_t>(c)];
      const int64_t s = segments[static_cast<size_t>(r.tensor)];
      K.histogram(score_src(t, r.tensor), r.begin, r.end, prefix_shift, prefix[s], kShift[digit], kMask[digit],
                  mine + static_cast<size_t>(s) * kDigitBins);
    }
  }
  std::fill(hist, hist + per_thread, int64_t{0});
  for (int th = 0; th < nt; ++th)
    for (size_t b = 0; b < per_thread; ++b) hist[b] += hists[static_cast<size_t>(th) * per_thread + b];
}

void select(const Tensors& t, const std::vector<int64_t>& segments, const std::vector<int64_t>& ks,
            float* threshold, int64_t* take, int64_t* ties, int64_t* cut, int threads) {
  const KernelTable& K = kernels();
  const int64_t num_segments = static_cast<int64_t>(ks.size());
  const std::vector<Segment> segs = segments_of(segments, t.numel, num_segments);
  std::vector<int64_t> small;
  int64_t small_total = 0;
  for (int64_t s = 0; s < num_segments; ++s) {
    const Segment& seg = segs[static_cast<size_t>(s)];
    if (seg.numel <= kSmallSegment) {
      small.push_back(s);
      small_total += seg.numel;
      continue;
    }
    std::vector<Range> chunks;
    for (int64_t i : seg.members) append_chunks(chunks, i, t.numel[static_cast<size_t>(i)]);
    const int64_t k = ks[static_cast<size_t>(s)];
    const Result r = force_radix() ? radix_select(t, chunks, k, threads) : bracket_select(t, seg, chunks, k, threads);
    threshold[s] = r.threshold;
    take[s] = r.take;
    ties[s] = r.ties;
    cut[s] = r.cut;
  }
  const int64_t nsmall = static_cast<int64_t>(small.size());
  const int nt = small_total >= kParallelMin ? std::max(1, threads) : 1;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> buf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t idx = 0; idx < nsmall; ++idx) {
      const int64_t s = small[static_cast<size_t>(idx)];
      const Segment& seg = segs[static_cast<size_t>(s)];
      buf.resize(static_cast<size_t>(seg.numel));
      int64_t n = 0;
      for (int64_t i : seg.members)
        n += K.collect(score_src(t, i), 0, t.numel[static_cast<size_t>(i)], buf.data() + n);
      const Result r = select_in_memory(buf.data(), n, ks[static_cast<size_t>(s)]);
      threshold[s] = r.threshold;
      take[s] = r.take;
      ties[s] = r.ties;
      cut[s] = r.cut;
    }
  }
}

int64_t sample_scores(const Tensors& t, int64_t runs, float* out, int64_t* sampled, int threads) {
  std::vector<int64_t> members;
  int64_t n = 0;
  for (size_t i = 0; i < t.numel.size(); ++i) {
    if (t.numel[i] == 0) continue;  // a run never starts in an empty tensor
    members.push_back(static_cast<int64_t>(i));
    n += t.numel[i];
  }
  *sampled = 0;
  if (n == 0 || runs <= 0) return 0;
  return sample_runs_of(t, members, n, runs, out, sampled, select_scratch(), threads);
}

void bracket_counts(const Tensors& t, float lo, float hi, int64_t cap, float* kept, int64_t* counts,
                    int threads) {
  std::vector<Range> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < t.numel.size(); ++i) {
    append_chunks(chunks, static_cast<int64_t>(i), t.numel[i]);
    total += t.numel[i];
  }
  const int nt = total >= kParallelMin ? std::max(1, threads) : 1;
  const std::vector<BracketAcc> accs =
      bracket_pass(kernels().bracket, t, chunks, lo, hi, cap, kept, nullptr, nt, [](int, const BracketAcc&) {});
  const BracketAcc all = merged(accs);
  int64_t at = 0;  // the threads' scores moved together at the front
  for (int th = 0; th < nt; ++th) {
    const BracketAcc& a = accs[static_cast<size_t>(th)];
    std::memmove(kept + at, kept + static_cast<size_t>(th) * static_cast<size_t>(cap), sizeof(float) * a.size);
    at += a.size;
  }
  const int64_t values[kBracketCounts] = {all.finite, all.above, all.eq_hi, all.eq_lo,
                                          all.mid,    all.size,  all.overflow ? 1 : 0};
  std::copy(values, values + kBracketCounts, counts);
}

namespace {

// A chunk of one tensor with its selection rule: score >= t_in before `cut`, score >= t_st from it on
// (t_st is the next float above the threshold, so ">= t_st" is "> threshold").
struct Piece {
  int64_t tensor;
  int64_t begin;
  int64_t end;
  int64_t cut;
  float t_in;
  float t_st;
};

// Resolves the tie rule into per-chunk cut points: ties in flat segment order before the take-th one
// are selected. Segments with 0 < take < ties need an extra counting pass, unless select() found
// where the take-th tie is (cut[s] >= 0; cut may be nullptr).
std::vector<Piece> plan(const std::vector<int64_t>& numel, const std::vector<int64_t>& segments,
                        const float* threshold, const int64_t* take, const int64_t* ties, const int64_t* cut,
                        int64_t num_segments, const std::function<ScoreSrc(int64_t)>& src, int threads) {
  const KernelTable& K = kernels();
  std::vector<Piece> pieces;
  std::vector<int64_t> ranked;  // indices of pieces whose cut needs tie counts
  int64_t ranked_total = 0;
  std::vector<int64_t> flat(static_cast<size_t>(num_segments), 0);  // segment flat index of tensor i
  for (size_t i = 0; i < numel.size(); ++i) {
    const int64_t s = segments[i];
    const float thr = threshold[s];
    const float t_st = std::nextafter(thr, kInf);
    const int64_t n = numel[i];
    const int64_t at = flat[static_cast<size_t>(s)];
    flat[static_cast<size_t>(s)] += n;
    for (int64_t b = 0; b < n; b += kChunk) {
      const int64_t e = std::min(n, b + kChunk);
      int64_t cut_here = e;
      if (take[s] <= 0) {
        cut_here = b;
      } else if (take[s] < ties[s]) {
        if (cut != nullptr && cut[s] >= 0) {
          cut_here = std::clamp(cut[s] - at, b, e);  // clamped: a cut from elsewhere stays inside the chunk
        } else {
          ranked.push_back(static_cast<int64_t>(pieces.size()));
          ranked_total += e - b;
        }
      }
      pieces.push_back(Piece{static_cast<int64_t>(i), b, e, cut_here, thr, t_st});
    }
  }
  if (ranked.empty()) return pieces;
  const int64_t nranked = static_cast<int64_t>(ranked.size());
  std::vector<int64_t> count(ranked.size());
  const int nt = ranked_total >= kParallelMin ? std::max(1, threads) : 1;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t r = 0; r < nranked; ++r) {
    const Piece& p = pieces[static_cast<size_t>(ranked[static_cast<size_t>(r)])];
    count[static_cast<size_t>(r)] = K.count_equal(src(p.tensor), p.begin, p.end, p.t_in);
  }
  // Pieces are in list order, which is flat order within every segment: a running count per segment.
  std::vector<int64_t> before(static_cast<size_t>(num_segments), 0);
  std::vector<int64_t> boundary, limit;
  for (int64_t r = 0; r < nranked; ++r) {
    Piece& p = pieces[static_cast<size_t>(ranked[static_cast<size_t>(r)])];
    const int64_t s = segments[static_cast<size_t>(p.tensor)];
    const int64_t allowed = take[s] - before[static_cast<size_t>(s)];
    const int64_t c = count[static_cast<size_t>(r)];
    if (allowed <= 0) {
      p.cut = p.begin;
    } else if (allowed >= c) {
      p.cut = p.end;
    } else {
      boundary.push_back(ranked[static_cast<size_t>(r)]);
      limit.push_back(allowed);
    }
    before[static_cast<size_t>(s)] += c;
  }
  // At most one boundary chunk per segment: find the element after its allowed-th tie.
  const int64_t nboundary = static_cast<int64_t>(boundary.size());
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t b = 0; b < nboundary; ++b) {
    Piece& p = pieces[static_cast<size_t>(boundary[static_cast<size_t>(b)])];
    p.cut = past_nth_tie(K, src(p.tensor), p.begin, p.end, p.t_in, limit[static_cast<size_t>(b)]);
  }
  return pieces;
}

}  // namespace

void write_masks(const Tensors& t, const std::vector<int64_t>& segments, const float* threshold,
                 const int64_t* take, const int64_t* ties, const int64_t* cut, int64_t num_segments,
                 const std::vector<int64_t>& masks_out, int threads) {
  const KernelTable& K = kernels();
  auto src = [&](int64_t i) { return score_src(t, i); };
  const std::vector<Piece> pieces =
      plan(t.numel, segments, threshold, take, ties, cut, num_segments, src, threads);
  int64_t total = 0;
  for (int64_t n : t.numel) total += n;
  const int nt = total >= kParallelMin ? std::max(1, threads) : 1;
  const int64_t npieces = static_cast<int64_t>(pieces.size());
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < npieces; ++c) {
    const Piece& p = pieces[static_cast<size_t>(c)];
    K.masks(src(p.tensor), p.begin, p.end, p.cut, p.t_in, p.t_st,
            as_ptr<uint32_t>(masks_out[static_cast<size_t>(p.tensor)]));
  }
}

void update(const UpdateTensors& t, const StepParams& sp, int score, const std::vector<int64_t>& segments,
            const float* threshold, const int64_t* take, const int64_t* ties, const int64_t* cut,
            int64_t num_segments, int threads) {
  const KernelTable& K = kernels();
  auto src = [&](int64_t i) {
    return ScoreSrc{as_ptr<const void>(t.g[static_cast<size_t>(i)]),
                    score == kScoreGradWeight ? as_ptr<const void>(t.p[static_cast<size_t>(i)]) : nullptr,
                    t.dtype[static_cast<size_t>(i)], score};
  };
  std::vector<Piece> pieces;
  if (t.mask_in.empty()) {
    pieces = plan(t.numel, segments, threshold, take, ties, cut, num_segments, src, threads);
  } else {
    for (size_t i = 0; i < t.numel.size(); ++i)
      for (int64_t b = 0; b < t.numel[i]; b += kChunk)
        pieces.push_back(Piece{static_cast<int64_t>(i), b, std::min(t.numel[i], b + kChunk), 0, 0.0f, 0.0f});
  }
  int64_t total = 0;
  for (int64_t n : t.numel) total += n;
  const int nt = total >= kParallelMin ? std::max(1, threads) : 1;
  const int64_t npieces = static_cast<int64_t>(pieces.size());
  auto opt = [](const std::vector<int64_t>& v, size_t i, auto* type_tag) {
    using P = std::remove_pointer_t<decltype(type_tag)>;
    return v.empty() ? nullptr : as_ptr<P>(v[i]);
  };
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < npieces; ++c) {
    const Piece& p = pieces[static_cast<size_t>(c)];
    const size_t i = static_cast<size_t>(p.tensor);
    const UpdateArgs a{as_ptr<void>(t.p[i]),
                       as_ptr<const void>(t.g[i]),
                       opt(t.m, i, static_cast<void*>(nullptr)),
                       opt(t.v, i, static_cast<void*>(nullptr)),
                       opt(t.e, i, static_cast<float*>(nullptr)),
                       opt(t.mask_in, i, static_cast<const uint32_t*>(nullptr)),
                       opt(t.mask_out, i, static_cast<uint32_t*>(nullptr)),
                       t.dtype[i],
                       t.state_dtype[i],
                       score,
                       sp};
    K.update(a, p.begin, p.end, p.cut, p.t_in, p.t_st);
  }
}

void count_steps(const std::vector<int64_t>& steps) {
  for (int64_t address : steps) *as_ptr<float>(address) += 1.0f;
}

}  // namespace cpu
}  // namespace pecker

// The CPU DP solver's hot loop, included once per instruction set by
// dp_schedule.cpp (baseline) and dp_schedule_avx2.cpp. The includer defines
//   DDT_DP_LANES       doubles per vector (2: SSE2/NEON, 4: AVX2)
//   DDT_DP_TARGET      a function attribute selecting the instruction set, or nothing
//   DDT_DP_RELAX_ROWS  the name of the entry point (see dp_schedule_isa.h)
// Everything but the entry point has internal linkage, so code built for one
// instruction set can never be linked in place of another's.
#include <cstdint>

#include "ddt/dp_schedule.h"
#include "dp_schedule_isa.h"

namespace ddt {
namespace cpu {
namespace detail {
namespace {

// GCC/Clang vector extension: no intrinsics, any target.
typedef double vecd __attribute__((vector_size(8 * DDT_DP_LANES)));

constexpr double kInf = __builtin_inf();
constexpr int64_t kLanes = DDT_DP_LANES;
// The min runs over chunks of kChunk consecutive j: four independent
// accumulators, two vectors deep, so the add/min latency chain does not
// serialise.
constexpr int64_t kChunk = 8 * kLanes;

DDT_DP_TARGET inline vecd splat(double x) { return vecd{} + x; }

DDT_DP_TARGET inline vecd lane_index() {
  vecd v{};
  for (int l = 0; l < kLanes; ++l) v[l] = l;
  return v;
}

// The smaller of a and b per lane (a when unordered): std::min(a, b) lane by lane.
DDT_DP_TARGET inline vecd vmin(vecd a, vecd b) { return b < a ? b : a; }

DDT_DP_TARGET inline double hmin(vecd v) {
  double m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] < m ? v[l] : m;
  return m;
}

// dp::candidate lane by lane: C[k-1][j] + Q[i][j], one IEEE add per lane.
DDT_DP_TARGET inline vecd candidates(const double* cprev, const double* qrow, int64_t j) {
  vecd c, r;
  __builtin_memcpy(&c, cprev + j, sizeof c);
  __builtin_memcpy(&r, qrow + j, sizeof r);
  return c + r;
}

DDT_DP_TARGET inline vecd chunk_min(const double* cprev, const double* qrow, int64_t j) {
  vecd m[4];
  for (int a = 0; a < 4; ++a) m[a] = candidates(cprev, qrow, j + a * kLanes);
  for (int a = 0; a < 4; ++a) m[a] = vmin(m[a], candidates(cprev, qrow, j + (4 + a) * kLanes));
  return vmin(vmin(m[0], m[1]), vmin(m[2], m[3]));
}

// Folds the chunk starting at j into the per-lane minima and their first chunks.
DDT_DP_TARGET inline void take_chunk(const double* cprev, const double* qrow, int64_t j, vecd& lane_min,
                                     vecd& lane_chunk) {
  const vecd m = chunk_min(cprev, qrow, j);
  const auto better = m < lane_min;
  lane_min = better ? m : lane_min;
  lane_chunk = better ? splat(static_cast<double>(j)) : lane_chunk;
}

// C[k][i] = min over j in [lo, hi) of cprev[j] + qrow[j], and its first argmin.
//
// Pass one is a branch-free vectorised min that also remembers, per lane, the
// first chunk where that lane reached its minimum; the earliest of those
// chunks among the lanes holding the overall minimum contains the first
// argmin. Pass two searches only that chunk for the first j whose candidate
// (the same add, so bitwise the same value) equals the minimum. A range that
// is not a multiple of kChunk ends with a chunk overlapping the previous one:
// revisited values never compare strictly less, so they cannot move the
// remembered chunk.
DDT_DP_TARGET inline void relax(const double* cprev, const double* qrow, int64_t lo, int64_t hi, double* c_out,
                                int32_t* arg_out) {
  double best = kInf;
  int64_t at = lo;  // stays in range even if best is NaN (non-finite input)
  if (hi - lo < kChunk) {
    for (int64_t j = lo; j < hi; ++j) {
      const double v = dp::candidate(cprev[j], qrow[j]);
      if (v < best) best = v, at = j;
    }
    *c_out = best;
    *arg_out = static_cast<int32_t>(at);
    return;
  }

  vecd lane_min = splat(kInf), lane_chunk = splat(static_cast<double>(lo));  // exact in a double
  int64_t j = lo;
  for (; j + kChunk <= hi; j += kChunk) take_chunk(cprev, qrow, j, lane_min, lane_chunk);
  if (j < hi) take_chunk(cprev, qrow, hi - kChunk, lane_min, lane_chunk);

  best = hmin(lane_min);
  double chunk = kInf;
  for (int l = 0; l < kLanes; ++l)
    if (lane_min[l] == best && lane_chunk[l] < chunk) chunk = lane_chunk[l];
  const int64_t c = chunk < kInf ? static_cast<int64_t>(chunk) : lo;

  // First offset in the chunk whose candidate equals best, as a branch-free min.
  const vecd target = splat(best), none = splat(kInf), lanes = lane_index();
  vecd first = none;
  for (int64_t t = 0; t < kChunk; t += kLanes)
    first = vmin(first, candidates(cprev, qrow, c + t) == target ? lanes + static_cast<double>(t) : none);
  const double off = hmin(first);
  if (off < kInf) at = c + static_cast<int64_t>(off);
  *c_out = best;
  *arg_out = static_cast<int32_t>(at);
}

}  // namespace

DDT_DP_TARGET void DDT_DP_RELAX_ROWS(const double* cprev, const double* q, int64_t k, int64_t i_begin, int64_t i_end,
                                     double* ccur, int32_t* arg_k) {
  for (int64_t i = i_begin; i < i_end; ++i) relax(cprev, q + q_row(i), k - 1, i, ccur + i, arg_k + i);
}

}  // namespace detail
}  // namespace cpu
}  // namespace ddt

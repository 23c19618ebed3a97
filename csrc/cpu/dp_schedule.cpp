// CPU solver for the statistic DP (see ddt/dp_schedule.h). Torch-free.
#include "ddt/dp_schedule.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ddt {
namespace cpu {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Below this size a level of one problem is too little work to share
// between threads (a barrier per level costs more than it saves).
constexpr int64_t kMinNForParallelLevels = 96;

// Packed lower triangle: row i (1..n) holds Q[i][0..i-1] contiguously, so the
// inner loop over j reads both C[k-1][j] and Q[i][j] sequentially.
inline int64_t q_row(int64_t i) { return i * (i - 1) / 2; }

struct Scratch {
  std::vector<double> q;     // n (n+1) / 2 run costs
  std::vector<double> c;     // rows k-1 and k of C, n+1 each
  std::vector<int32_t> arg;  // argmin table, k_max x (n+1)

  Scratch(int64_t n, int64_t k_max)
      : q(static_cast<std::size_t>(n * (n + 1) / 2)),
        c(static_cast<std::size_t>(2 * (n + 1))),
        arg(static_cast<std::size_t>(k_max * (n + 1))) {}
};

void build_run_costs(const double* sim, int64_t n, double* q) {
  for (int64_t i = 1; i <= n; ++i) {
    const double* s = sim + (i - 1) * n;
    const double* prev = q + q_row(i - 1);
    double* row = q + q_row(i);
#pragma omp simd
    for (int64_t j = 0; j < i - 1; ++j) row[j] = dp::run_cost_extend(prev[j], s[j]);
    row[i - 1] = dp::run_cost_extend(0.0, s[i - 1]);
  }
}

// Two doubles: the SSE2 / NEON width every 64-bit target has, written with
// the GCC/Clang vector extension so no intrinsics are needed.
typedef double vec2 __attribute__((vector_size(16)));

inline vec2 load2(const double* p) {
  vec2 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// a < b ? a : b per lane (minpd semantics), the scalar std::min of each lane.
inline vec2 min2(vec2 a, vec2 b) { return b < a ? b : a; }
inline double hmin2(vec2 v) { return std::min(v[0], v[1]); }

// The min runs over chunks of kChunk consecutive j, four independent
// accumulators per chunk so the add/min latency chain does not serialise.
constexpr int64_t kChunk = 16;

inline vec2 candidate2(const double* cprev, const double* qrow, int64_t j) {
  return load2(cprev + j) + load2(qrow + j);  // lane-wise dp::candidate
}

inline vec2 chunk_min(const double* cprev, const double* qrow, int64_t j) {
  vec2 m[4];
  for (int a = 0; a < 4; ++a) m[a] = candidate2(cprev, qrow, j + 2 * a);
  for (int64_t t = 8; t < kChunk; t += 8)
    for (int a = 0; a < 4; ++a) m[a] = min2(m[a], candidate2(cprev, qrow, j + t + 2 * a));
  return min2(min2(m[0], m[1]), min2(m[2], m[3]));
}

// C[k][i] = min over j in [lo, hi) of C[k-1][j] + Q[i][j], and its first argmin.
//
// Pass one is a branch-free vectorised min that also remembers, per lane,
// the first chunk where that lane reached its minimum; the earliest of those
// chunks among the lanes holding the overall minimum contains the first
// argmin. Pass two searches only that chunk for the first j whose candidate
// (the same expression, so bitwise the same value) equals the minimum.
// A range that is not a multiple of kChunk ends with a chunk overlapping the
// previous one: revisited values never compare strictly less, so they cannot
// move the remembered chunk.
inline void relax(const double* cprev, const double* qrow, int64_t lo, int64_t hi, double* c_out,
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

  const double first_chunk = static_cast<double>(lo);  // chunk starts are exact in a double
  vec2 lane_min = {kInf, kInf}, lane_chunk = {first_chunk, first_chunk};
  auto take = [&](int64_t j) {
    const vec2 m = chunk_min(cprev, qrow, j);
    const vec2 start = {static_cast<double>(j), static_cast<double>(j)};
    const auto better = m < lane_min;
    lane_min = better ? m : lane_min;
    lane_chunk = better ? start : lane_chunk;
  };
  int64_t j = lo;
  for (; j + kChunk <= hi; j += kChunk) take(j);
  if (j < hi) take(hi - kChunk);

  best = hmin2(lane_min);
  double chunk = lane_min[0] == best ? lane_chunk[0] : lane_chunk[1];
  if (lane_min[1] == best) chunk = std::min(chunk, lane_chunk[1]);
  const int64_t c = static_cast<int64_t>(chunk);

  // First offset in the chunk whose candidate equals best, as a branch-free min.
  const vec2 target = {best, best}, none = {kInf, kInf};
  vec2 first = none;
  for (int64_t t = 0; t < kChunk; t += 2) {
    const vec2 offset = {static_cast<double>(t), static_cast<double>(t + 1)};
    first = min2(first, candidate2(cprev, qrow, c + t) == target ? offset : none);
  }
  const double off = hmin2(first);
  if (off < kChunk) at = c + static_cast<int64_t>(off);
  *c_out = best;
  *arg_out = static_cast<int32_t>(at);
}

// Runs f(i) for i in [lo, hi): as a worksharing loop of the enclosing
// parallel region (its implicit barrier included) when `shared`, else serially.
template <class F>
inline void for_range(int64_t lo, int64_t hi, bool shared, F&& f) {
  if (shared) {
    // Work per i grows with i; small interleaved chunks balance the threads.
#pragma omp for schedule(static, 4)
    for (int64_t i = lo; i < hi; ++i) f(i);
  } else {
    for (int64_t i = lo; i < hi; ++i) f(i);
  }
}

// The DP for one problem. With `shared` it must be called by every thread of
// an enclosing parallel region, which then splits each level over i.
void solve_one(const double* sim, int64_t n, int64_t k_max, double* cost, int32_t* steps,
               Scratch& ws, bool shared) {
  const int64_t ld = n + 1;
  double* q = ws.q.data();
  double* c = ws.c.data();  // C[k][.] lives in row k & 1
  int32_t* arg = ws.arg.data();

  if (shared) {
#pragma omp single
    build_run_costs(sim, n, q);
  } else {
    build_run_costs(sim, n, q);
  }

  for_range(1, n + 1, shared, [&](int64_t i) {
    c[ld + i] = q[q_row(i)];
    if (i == n) cost[0] = c[ld + n];
  });

  for (int64_t k = 2; k <= k_max; ++k) {
    const double* cprev = c + ((k - 1) & 1) * ld;
    double* ccur = c + (k & 1) * ld;
    int32_t* arg_k = arg + (k - 1) * ld;
    for_range(k, n + 1, shared, [&](int64_t i) {
      relax(cprev, q + q_row(i), k - 1, i, ccur + i, arg_k + i);
      if (i == n) cost[k - 1] = ccur[n];
    });
  }

  for_range(1, k_max + 1, shared, [&](int64_t k) {
    dp::write_schedule(arg, n, k, k_max, steps + (k - 1) * k_max);
  });
}

inline int thread_index() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace

void dp_schedule_solve(const double* sim, int64_t batch, int64_t n, int64_t k_max, double* cost,
                       int32_t* steps, int num_threads) {
  if (batch <= 0) return;
#if defined(_OPENMP)
  const int64_t threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  const int64_t threads = 1;
  (void)num_threads;
#endif
  const int64_t sim_stride = n * n, steps_stride = k_max * k_max;

  // Scratch is allocated here, outside the parallel regions, so that running
  // out of memory surfaces as an exception the caller can catch.
  if (batch >= threads || n < kMinNForParallelLevels || threads == 1) {
    const int team = static_cast<int>(std::min(threads, batch));
    std::vector<Scratch> scratch;
    scratch.reserve(static_cast<std::size_t>(team));
    for (int t = 0; t < team; ++t) scratch.emplace_back(n, k_max);
#pragma omp parallel num_threads(team)
    {
      Scratch& ws = scratch[static_cast<std::size_t>(thread_index())];
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < batch; ++b)
        solve_one(sim + b * sim_stride, n, k_max, cost + b * k_max, steps + b * steps_stride, ws,
                  false);
    }
    return;
  }

  // Fewer problems than threads: one problem at a time, each level split over i.
  Scratch ws(n, k_max);
#pragma omp parallel num_threads(static_cast<int>(threads))
  for (int64_t b = 0; b < batch; ++b)
    solve_one(sim + b * sim_stride, n, k_max, cost + b * k_max, steps + b * steps_stride, ws, true);
}

}  // namespace cpu
}  // namespace ddt

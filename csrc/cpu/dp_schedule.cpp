// CPU solver for the statistic DP (see ddt/dp_schedule.h). Torch-free.
#include "ddt/dp_schedule.h"

#include <algorithm>
#include <vector>

#include "cpu_helpers.h"
#include "dp_schedule_isa.h"

// The baseline build of the hot loop: two doubles per vector, which every
// 64-bit target has (SSE2, NEON).
#define DDT_DP_LANES 2
#define DDT_DP_TARGET
#define DDT_DP_RELAX_ROWS relax_rows_baseline
#include "dp_schedule_relax.h"
#undef DDT_DP_LANES
#undef DDT_DP_TARGET
#undef DDT_DP_RELAX_ROWS

namespace ddt {
namespace cpu {

namespace detail {
RelaxRowsFn relax_rows_best() {
#if defined(DDT_DP_HAVE_AVX2)
  static const RelaxRowsFn best = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? relax_rows_avx2 : relax_rows_baseline;
  }();
  return best;
#else
  return relax_rows_baseline;
#endif
}
}  // namespace detail

namespace {

using detail::q_row;

// Splitting one problem's levels over threads needs a barrier per level. It
// only pays when a level is long: with small N the barriers cost more than
// they save, and a thread descheduled by another busy process (common on
// small machines) stalls every level. Smaller problems are solved by one
// thread each.
constexpr int64_t kMinNForParallelLevels = 1024;
constexpr int64_t kRowsPerTask = 4;

struct Scratch {
  std::vector<double> q;     // n (n+1) / 2 run costs
  std::vector<double> c;     // rows k-1 and k of C, n+1 each
  std::vector<int32_t> arg;  // argmin table, k_max x (n+1)

  Scratch(int64_t n, int64_t k_max)
      : q(static_cast<std::size_t>(n * (n + 1) / 2)), c(static_cast<std::size_t>(2 * (n + 1))),
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

// The DP for one problem. With `shared` it must be called by every thread of
// an enclosing parallel region, which then splits each level over i (the
// implicit barrier of each worksharing loop orders the levels).
void solve_one(const double* sim, int64_t n, int64_t k_max, double* cost, int32_t* steps, Scratch& ws, bool shared,
               detail::RelaxRowsFn relax_rows) {
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

  // Level 1 is a copy and the traceback is O(k_max^2): one thread does them.
  auto first_level = [&] {
    for (int64_t i = 1; i <= n; ++i) c[ld + i] = q[q_row(i)];
    cost[0] = c[ld + n];
  };
  if (shared) {
#pragma omp single
    first_level();
  } else {
    first_level();
  }

  for (int64_t k = 2; k <= k_max; ++k) {
    const double* cprev = c + ((k - 1) & 1) * ld;
    double* ccur = c + (k & 1) * ld;
    int32_t* arg_k = arg + (k - 1) * ld;
    if (shared) {
      const int64_t tasks = (n + 1 - k + kRowsPerTask - 1) / kRowsPerTask;
      // Work grows with i; interleaved tasks of a few rows balance the threads.
#pragma omp for schedule(static, 1)
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t i0 = k + t * kRowsPerTask, i1 = std::min(i0 + kRowsPerTask, n + 1);
        relax_rows(cprev, q, k, i0, i1, ccur, arg_k);
        if (i1 == n + 1) cost[k - 1] = ccur[n];
      }
    } else {
      relax_rows(cprev, q, k, k, n + 1, ccur, arg_k);
      cost[k - 1] = ccur[n];
    }
  }

  auto trace = [&] {
    for (int64_t k = 1; k <= k_max; ++k) dp::write_schedule(arg, n, k, k_max, steps + (k - 1) * k_max);
  };
  if (shared) {
#pragma omp single
    trace();
  } else {
    trace();
  }
}

}  // namespace

void dp_schedule_solve(const double* sim, int64_t batch, int64_t n, int64_t k_max, double* cost, int32_t* steps,
                       int num_threads) {
  if (batch <= 0) return;
#if defined(DDT_FAST_HAVE_OPENMP)
  const int64_t threads = num_threads > 0 ? num_threads : cpu::num_threads();
#else
  const int64_t threads = 1;
  (void)num_threads;
#endif
  const detail::RelaxRowsFn relax_rows = detail::relax_rows_best();
  const int64_t sim_stride = n * n, steps_stride = k_max * k_max;

  // Scratch is allocated here, outside the parallel regions, so that running
  // out of memory surfaces as an exception the caller can catch.
  if (batch >= threads || n < kMinNForParallelLevels) {
    const int team = static_cast<int>(std::min(threads, batch));
    std::vector<Scratch> scratch;
    scratch.reserve(static_cast<std::size_t>(team));
    for (int t = 0; t < team; ++t) scratch.emplace_back(n, k_max);
#pragma omp parallel num_threads(team)
    {
      Scratch& ws = scratch[static_cast<std::size_t>(thread_id())];
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < batch; ++b)
        solve_one(sim + b * sim_stride, n, k_max, cost + b * k_max, steps + b * steps_stride, ws, false, relax_rows);
    }
    return;
  }

  // Fewer problems than threads, and long levels: one problem at a time,
  // each level split over i.
  Scratch ws(n, k_max);
#pragma omp parallel num_threads(static_cast<int>(threads))
  for (int64_t b = 0; b < batch; ++b)
    solve_one(sim + b * sim_stride, n, k_max, cost + b * k_max, steps + b * steps_stride, ws, true, relax_rows);
}

}  // namespace cpu
}  // namespace ddt

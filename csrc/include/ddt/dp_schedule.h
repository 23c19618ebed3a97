// Statistic dynamic programming for encoder-sharing schedules
// (docs/spec.md, "The statistic DP").
//
// Inputs: `batch` similarity matrices sim[b][i][j] (row-major, n x n, float64).
// Error e[i][j] = 1 - sim[i][j]. A run of the encoder at step j reused through
// step i (i >= j) costs E(j, i) = sum_{k=j..i} e[k][j].
// C[k][i] = best cost covering steps 0..i-1 with k runs;
// C[1][i] = E(0, i-1); C[k][i] = min_{j in [k-1, i-1]} C[k-1][j] + E(j, i-1),
// ties to the smallest j. One pass yields C[k][n] for every k in 1..k_max.
//
// Outputs per problem: cost[k-1] = C[k][n] and steps[k-1][0..k-1] = the
// recompute steps of the optimal k-run schedule (rows padded with -1).
//
// Non-finite similarities give unspecified costs and schedules, but every
// returned step is still a valid index (callers validate finiteness).
//
// The per-element arithmetic lives here so the CPU and CUDA kernels round
// identically (plain double adds, fixed order; no FMA is possible).
#pragma once

#include <cstddef>

#include "ddt/common.h"

namespace ddt {
namespace dp {

// run_cost(j, i) for i = j+1 .. n, laid out so that row i holds, over
// j < i, the cost E(j, i-1) of covering j..i-1 with one run started at j:
//   Q[i][j] = Q[i-1][j] + e[i-1][j],  Q[j][j] = 0.
// Summation order is k = j, j+1, ..., i-1 (the spec's order).
DDT_HD double run_cost_extend(double prev, double sim_ij) { return prev + (1.0 - sim_ij); }

// Candidate value of C[k][i] through a last run started at j.
DDT_HD double candidate(double c_prev_j, double run_cost_j_i) { return c_prev_j + run_cost_j_i; }

// Follow the argmin table back from C[k][n]. arg[(kk-1) * (n+1) + i] is the
// start of the last run in the optimal kk-run cover of steps 0..i-1.
DDT_HD void traceback(const int32_t* arg, int64_t n, int64_t k, int32_t* out_steps) {
  int64_t i = n;
  for (int64_t kk = k; kk >= 1; --kk) {
    const int32_t j = (kk == 1) ? 0 : arg[(kk - 1) * (n + 1) + i];
    out_steps[kk - 1] = j;
    i = j;
  }
}

// Row k-1 of the steps table: the k-run schedule, then -1 up to k_max.
DDT_HD void write_schedule(const int32_t* arg, int64_t n, int64_t k, int64_t k_max,
                           int32_t* steps_row) {
  traceback(arg, n, k, steps_row);
  for (int64_t m = k; m < k_max; ++m) steps_row[m] = -1;
}

}  // namespace dp

namespace cpu {
// Solves `batch` problems with up to `num_threads` OpenMP threads (<= 0: the
// OpenMP default): one thread per problem, except that with fewer problems
// than threads and N >= 1024 each level of a problem is split over i.
// Scratch memory is allocated once per thread, before the DP loops.
// cost: [batch, k_max]; steps: [batch, k_max, k_max] (padded with -1).
void dp_schedule_solve(const double* sim, int64_t batch, int64_t n, int64_t k_max, double* cost,
                       int32_t* steps, int num_threads = 0);
}  // namespace cpu

namespace cuda {
// Device scratch for dp_schedule_solve, per problem: the run-cost table in
// the transposed layout QT[j][i] = E(j, i-1) (n x (n+1) doubles, so threads
// over i read consecutive addresses), two DP rows (used when they do not fit
// in shared memory) and the argmin table (k_max x (n+1) int32).
inline std::size_t dp_schedule_workspace_bytes(int64_t batch, int64_t n, int64_t k_max) {
  const std::size_t doubles = static_cast<std::size_t>(n) * (n + 1) + 2 * static_cast<std::size_t>(n + 1);
  const std::size_t ints = static_cast<std::size_t>(k_max) * (n + 1);
  return static_cast<std::size_t>(batch) * (doubles * sizeof(double) + ints * sizeof(int32_t));
}

// Same contract as the CPU solver, on the device: one thread block per
// problem. sim, cost, steps and workspace (dp_schedule_workspace_bytes bytes,
// 8-byte aligned) are device pointers. Launched on `stream`; returns the CUDA
// error code (0 on success).
int dp_schedule_solve(const double* sim, int64_t batch, int64_t n, int64_t k_max, double* cost,
                      int32_t* steps, void* workspace, stream_t stream);
}  // namespace cuda

}  // namespace ddt

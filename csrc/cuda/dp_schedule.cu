// CUDA solver for the statistic DP (see ddt/dp_schedule.h). Torch-free.
//
// One thread block per problem. The run costs go to global memory in the
// transposed layout QT[j][i] = E(j, i-1), so in the DP, where threads own
// consecutive i and all loop over the same j, every read is coalesced.
// Rows k-1 and k of C live in shared memory when they fit (global otherwise);
// levels are separated by __syncthreads(). The traceback runs one budget per
// thread.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ddt/dp_schedule.h"

namespace ddt {
namespace cuda {
namespace {

constexpr int kMaxThreads = 256;

struct Workspace {
  double* qt;    // [batch][n][n+1]
  double* rows;  // [batch][2][n+1], used when the rows do not fit in shared memory
  int32_t* arg;  // [batch][k_max][n+1]
};

Workspace carve(void* base, int64_t batch, int64_t n) {
  Workspace ws;
  ws.qt = static_cast<double*>(base);
  ws.rows = ws.qt + batch * n * (n + 1);
  ws.arg = reinterpret_cast<int32_t*>(ws.rows + batch * 2 * (n + 1));
  return ws;
}

template <bool kRowsInShared>
__global__ void __launch_bounds__(kMaxThreads)
    dp_schedule_kernel(const double* __restrict__ sim, int64_t n, int64_t k_max,
                       double* __restrict__ cost, int32_t* __restrict__ steps, Workspace ws) {
  extern __shared__ double shared_rows[];
  const int64_t b = blockIdx.x;
  const int64_t ld = n + 1;
  const int64_t tid = threadIdx.x, nthreads = blockDim.x;
  const double* s = sim + b * n * n;
  double* qt = ws.qt + b * n * ld;
  double* c = kRowsInShared ? shared_rows : ws.rows + b * 2 * ld;  // C[k][.] in row k & 1
  int32_t* arg = ws.arg + b * k_max * ld;
  double* out_cost = cost + b * k_max;
  int32_t* out_steps = steps + b * k_max * k_max;

  // Thread j accumulates column j in the spec's order; the threads of a warp
  // read one row of sim together.
  for (int64_t j0 = 0; j0 < n; j0 += nthreads) {
    const int64_t j = j0 + tid;
    double acc = 0.0;
    for (int64_t i = j0 + 1; i <= n; ++i) {
      if (j < n && j < i) {
        acc = dp::run_cost_extend(acc, s[(i - 1) * n + j]);
        qt[j * ld + i] = acc;
      }
    }
  }
  __syncthreads();

  for (int64_t i = 1 + tid; i <= n; i += nthreads) {
    c[ld + i] = qt[i];  // C[1][i] = E(0, i-1)
    if (i == n) out_cost[0] = qt[n];
  }
  __syncthreads();

  for (int64_t k = 2; k <= k_max; ++k) {
    const double* cprev = c + ((k - 1) & 1) * ld;
    double* ccur = c + (k & 1) * ld;
    for (int64_t i = k + tid; i <= n; i += nthreads) {
      // Strict < in increasing j: the first minimiser, as on the CPU.
      double best = INFINITY;
      int64_t at = k - 1;
      for (int64_t j = k - 1; j < i; ++j) {
        const double v = dp::candidate(cprev[j], qt[j * ld + i]);
        if (v < best) best = v, at = j;
      }
      ccur[i] = best;
      arg[(k - 1) * ld + i] = static_cast<int32_t>(at);
      if (i == n) out_cost[k - 1] = best;
    }
    __syncthreads();
  }

  for (int64_t k = 1 + tid; k <= k_max; k += nthreads)
    dp::write_schedule(arg, n, k, k_max, out_steps + (k - 1) * k_max);
}

}  // namespace

int dp_schedule_solve(const double* sim, int64_t batch, int64_t n, int64_t k_max, double* cost,
                      int32_t* steps, void* workspace, stream_t stream) {
  if (batch <= 0) return cudaSuccess;
  if (n < 1 || k_max < 1 || k_max > n || batch > INT32_MAX) return cudaErrorInvalidValue;
  const Workspace ws = carve(workspace, batch, n);
  const int threads = static_cast<int>(n + 1 >= kMaxThreads ? kMaxThreads : ((n + 1 + 31) / 32) * 32);
  const dim3 grid(static_cast<unsigned>(batch));
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);

  // Two rows of n+1 doubles: 48 KiB by default, more where the device allows it.
  const size_t rows_bytes = 2 * static_cast<size_t>(n + 1) * sizeof(double);
  int device = 0, optin_bytes = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;

  if (rows_bytes <= static_cast<size_t>(optin_bytes)) {
    if (rows_bytes > 48 * 1024) {
      err = cudaFuncSetAttribute(dp_schedule_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(rows_bytes));
      if (err != cudaSuccess) return err;
    }
    dp_schedule_kernel<true><<<grid, threads, rows_bytes, s>>>(sim, n, k_max, cost, steps, ws);
  } else {
    dp_schedule_kernel<false><<<grid, threads, 0, s>>>(sim, n, k_max, cost, steps, ws);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ddt

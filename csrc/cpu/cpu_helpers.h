// Helpers shared by the CPU kernels in this folder: the OpenMP team, row
// ranges per thread, software prefetch, and the weight row in the
// accumulation type.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "ddt/dtypes.h"

#if defined(DDT_FAST_HAVE_OPENMP)
#include <omp.h>
#endif

namespace ddt {
namespace cpu {

// Threads a parallel region started here will have.
inline int num_threads() {
#if defined(DDT_FAST_HAVE_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Threads in the current parallel region.
inline int team_size() {
#if defined(DDT_FAST_HAVE_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#if defined(DDT_FAST_HAVE_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The calling thread's rows [first, second) of `rows`, inside a parallel region.
inline std::pair<int64_t, int64_t> thread_rows(int64_t rows) {
  const int t = thread_id(), nt = team_size();
  return {rows * t / nt, rows * (t + 1) / nt};
}

// Software prefetch (for reading) of every 64-byte line of [p, p + bytes).
inline void prefetch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

// A weight row [C] of dtype W in the accumulation type A; ones when there is
// no weight (so one loop serves the weighted and the weight-free norms).
template <class W, class A>
std::vector<A> widen_row(const void* weight, int64_t C) {
  std::vector<A> w(C, A(1));
  if (weight != nullptr)
    for (int64_t c = 0; c < C; ++c) w[c] = load<A>(static_cast<const W*>(weight)[c]);
  return w;
}

}  // namespace cpu
}  // namespace ddt

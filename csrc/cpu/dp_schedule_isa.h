// Internal to the CPU DP solver (not part of the kernel API): the per-level
// hot loop, compiled once per instruction set and picked at run time.
#pragma once

#include <cstdint>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define DDT_DP_HAVE_AVX2 1
#endif

namespace ddt {
namespace cpu {
namespace detail {

// Run costs as a packed lower triangle: row i (1..n) holds Q[i][0..i-1]
// (Q[i][j] = E(j, i-1)) contiguously, so the inner loop over j reads both
// C[k-1][j] and Q[i][j] sequentially.
inline int64_t q_row(int64_t i) { return i * (i - 1) / 2; }

// Level k of the DP for rows i in [i_begin, i_end) (k <= i_begin):
// ccur[i] = min over j in [k-1, i) of cprev[j] + Q[i][j], arg_k[i] = its first
// argmin. Every variant returns the same bits.
using RelaxRowsFn = void (*)(const double* cprev, const double* q, int64_t k, int64_t i_begin, int64_t i_end,
                             double* ccur, int32_t* arg_k);

void relax_rows_baseline(const double* cprev, const double* q, int64_t k, int64_t i_begin, int64_t i_end, double* ccur,
                         int32_t* arg_k);
#if defined(DDT_DP_HAVE_AVX2)
void relax_rows_avx2(const double* cprev, const double* q, int64_t k, int64_t i_begin, int64_t i_end, double* ccur,
                     int32_t* arg_k);
#endif

// The fastest variant the running CPU supports.
RelaxRowsFn relax_rows_best();

}  // namespace detail
}  // namespace cpu
}  // namespace ddt

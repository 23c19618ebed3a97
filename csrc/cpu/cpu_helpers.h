// Helpers shared by the CPU kernels in this folder: the OpenMP team, row
// ranges per thread, software prefetch, the weight row in the accumulation
// type, and bfloat16 pairs as 32-bit words (bf16_pairs).
#pragma once

#include <cstdint>
#include <cstring>
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

// bfloat16 rows as 32-bit words of two elements (element 2i in the low half,
// 2i + 1 in the high half). A loop over words widens each half with one shift
// or mask and packs two rounded results with one shift and one or; a loop
// over elements spends a widening unpack and a narrowing pack and permute per
// vector on moving between 16- and 32-bit lanes. Element-wise math runs on
// both halves alike, so only row sums see a different order.
namespace bf16_pairs {
inline uint32_t load(const bf16_t* p, int64_t i) {
  uint32_t w;
  std::memcpy(&w, p + 2 * i, 4);  // (any alignment; no aliasing through uint32_t)
  return w;
}
inline void store(bf16_t* p, int64_t i, uint32_t w) { std::memcpy(p + 2 * i, &w, 4); }
inline float lo(uint32_t w) { return bits_to_float(w << 16); }
inline float hi(uint32_t w) { return bits_to_float(w & 0xffff0000u); }
// The word of two float bit patterns already rounded to bfloat16 (low 16 bits zero).
inline uint32_t pack(uint32_t lo_bits, uint32_t hi_bits) { return (lo_bits >> 16) | hi_bits; }
// Where element c of a row of C values sits when the row is kept as its even
// elements followed by its odd ones (the word loops' per-thread sums).
inline int64_t plane_index(int64_t c, int64_t C) { return (c % 2) * (C / 2) + c / 2; }
// Rounding inside a word loop whose float operands are all widened bfloat16
// values or went through split() (see bf16_rounded_bits_of_bf16_nans).
inline uint32_t rounded(float v) { return bf16_rounded_bits_of_bf16_nans(v); }
// A float row of 2n values (a weight, a rotary table row) as its even and odd
// elements, in the word loop's order; a NaN becomes the default NaN's pattern,
// whose low bits are zero (still NaN, still propagates).
inline void split(const float* __restrict row, int64_t n, float* __restrict even, float* __restrict odd) {
  auto canonical = [](float v) { return v != v ? bits_to_float(0x7fc00000u) : v; };
  for (int64_t i = 0; i < n; ++i) {
    even[i] = canonical(row[2 * i]);
    odd[i] = canonical(row[2 * i + 1]);
  }
}
}  // namespace bf16_pairs

}  // namespace cpu
}  // namespace ddt

// Helpers shared by the CPU kernels in this folder: the OpenMP team, row
// ranges per thread, software prefetch, the weight row in the accumulation
// type, bfloat16 pairs as 32-bit words (bf16_pairs), float16 staging and F16C
// conversions (f16x8), and the float16 path switches.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ddt/dtypes.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

// The float16 loops with F16C conversions inside them (f16x8 below) need these.
#if defined(__F16C__) && defined(__FMA__) && defined(__AVX2__)
#define DDT_CPU_F16C_LOOPS 1
#endif

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

// float16 on the CPU: GCC 12 does not vectorise _Float16 conversions, so
// the kernels stage float16 operands through float rows (converted with the
// F16C instructions, 8 at a time, when the build targets them), run their
// float32 loops on them with float16's rounding points (round_to<f16_t>
// vectorises), and narrow the results once. (The norm kernels convert inside
// their row loops instead where the build has F16C: f16c in norm_modulate.cpp.)
template <class T>
constexpr bool staged_v = std::is_same_v<T, f16_t>;

#if defined(DDT_CPU_F16C_LOOPS)
// float16 loops with the F16C conversions inside them, 8 values per
// instruction (explicit intrinsics: GCC does not vectorise _Float16
// conversions): rounding to float16 at a rounding point is one conversion
// there and back (round to nearest even, as store<f16_t>).
namespace f16x8 {
inline __m256 load8(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m128i halves(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m256 rounded(__m256 v) { return _mm256_cvtph_ps(halves(v)); }  // v rounded to float16 precision
inline void store8(f16_t* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), halves(v)); }
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline float sum8(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
}  // namespace f16x8
#endif

// DDT_FAST_CPU_F16_FORWARD=staged / DDT_FAST_CPU_F16_BACKWARD=staged: the
// float16 forwards (norm + modulate, q/k norm + rotary) / the norm backward
// stage float16 operands through float rows (the paths of builds without
// F16C) instead of converting inside their loops; switches for comparing the
// two (tests, benchmarks), read once per process.
inline bool env_says_staged(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && std::string(env) == "staged";
}
inline bool use_staged_f16_forward() {
  static const bool staged = env_says_staged("DDT_FAST_CPU_F16_FORWARD");
  return staged;
}
inline bool use_staged_f16_backward() {
  static const bool staged = env_says_staged("DDT_FAST_CPU_F16_BACKWARD");
  return staged;
}

// v rounded to R's precision and stored as T (R is T, or float16 for float16
// values staged as float).
template <class T, class R, class A>
inline T store_rounded(A v) {
  if constexpr (std::is_same_v<T, R>) {
    return store<T>(v);
  } else {
    return store<T>(round_to<R>(v));
  }
}

// src[0, n) as float.
template <class T>
inline void widen_to_float(const T* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  if constexpr (std::is_same_v<T, f16_t>) {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = load<float>(src[i]);
}

// src[0, n) stored as T (round to nearest even).
template <class T>
inline void narrow_from_float(const float* __restrict src, T* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  if constexpr (std::is_same_v<T, f16_t>) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; ++i) dst[i] = store<T>(src[i]);
}

}  // namespace cpu
}  // namespace ddt

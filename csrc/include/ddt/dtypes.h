// Element types shared by the CPU and CUDA kernels, without torch or CUDA
// headers in host code. bf16/f16 are 16-bit storage types; arithmetic is
// always done in `acc_t` (float, or double for double inputs).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ddt/common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace ddt {

enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// Scoped enums rather than structs: they are scalar types, so loops that load
// and store them vectorise like loops over uint16_t.
enum class bf16_t : uint16_t {};
enum class f16_t : uint16_t {};

template <class T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
template <class T>
using acc_t = typename acc_type<T>::type;

DDT_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

DDT_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// Round-to-nearest-even, as PyTorch's float -> bfloat16 cast.
// Branch-free so that CPU loops over it vectorise.
// The float bits of the nearest bfloat16 (low 16 bits zero); NaN stays NaN,
// quieted. `f != f` rather than an integer test: one compare on the CPU.
DDT_HD uint32_t bf16_rounded_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return (f != f ? (u | 0x400000u) : rounded) & 0xffff0000u;
}

DDT_HD bf16_t to_bf16(float f) { return bf16_t(uint16_t(bf16_rounded_bits(f) >> 16)); }

DDT_HD float to_float(bf16_t v) { return bits_to_float(uint32_t(uint16_t(v)) << 16); }

DDT_HD float to_float(f16_t v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(uint16_t(v)));
#else
  _Float16 h;
  std::memcpy(&h, &v, 2);
  return static_cast<float>(h);
#endif
}

DDT_HD f16_t to_f16(float f) {
#if defined(__CUDA_ARCH__)
  return f16_t(__half_as_ushort(__float2half_rn(f)));
#else
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return f16_t(bits);
#endif
}

// The float value of the nearest float16 to f (round to nearest even, +-inf
// past the largest half, NaN stays NaN), in float arithmetic: (f + c) - c
// with c = 1.5 * 2^(e + 13), e the exponent of f clamped to [-14, 16], rounds
// f to a multiple of 2^(e - 10), the float16 spacing at that exponent (fixed
// below 2^-14: the subnormal halves). Unlike a conversion through _Float16,
// CPU loops vectorise it (GCC 12 does not vectorise _Float16 conversions).
DDT_HD float f16_rounded(float f) {
  const uint32_t u = float_to_bits(f);
  uint32_t e = u & 0x7f800000u;
  e = e < ((127u - 14u) << 23) ? ((127u - 14u) << 23) : e;
  e = e > ((127u + 16u) << 23) ? ((127u + 16u) << 23) : e;
  const float c = bits_to_float(e + (13u << 23) + 0x400000u);
  uint32_t a = float_to_bits((f + c) - c) & 0x7fffffffu;
  a = (a >= 0x47800000u && a <= 0x7f800000u) ? 0x7f800000u : a;  // >= 65536 (ties above 65504): inf
  return bits_to_float(a | (u & 0x80000000u));  // the sign of f, also for a zero result
}

DDT_HD float to_float(float v) { return v; }
DDT_HD double to_float(double v) { return v; }

// load<A>(T) and store<T>(A): convert between storage and accumulation types.
template <class A, class T>
DDT_HD A load(T v) {
  return static_cast<A>(to_float(v));
}

template <class T>
struct Store;
template <>
struct Store<float> {
  template <class A>
  DDT_HD static float from(A v) { return static_cast<float>(v); }
};
template <>
struct Store<double> {
  template <class A>
  DDT_HD static double from(A v) { return static_cast<double>(v); }
};
template <>
struct Store<bf16_t> {
  template <class A>
  DDT_HD static bf16_t from(A v) { return to_bf16(static_cast<float>(v)); }
};
template <>
struct Store<f16_t> {
  template <class A>
  DDT_HD static f16_t from(A v) { return to_f16(static_cast<float>(v)); }
};

template <class T, class A>
DDT_HD T store(A v) {
  return Store<T>::from(v);
}

// The value v takes after a round trip through T (the spec's "cast back to
// the input dtype" rounding points).
template <class T, class A>
DDT_HD A round_to(A v) {
  if constexpr (sizeof(A) == 4 && std::is_same_v<T, bf16_t>) {
    return bits_to_float(bf16_rounded_bits(v));  // no narrowing and widening
#if !defined(__CUDA_ARCH__)
  } else if constexpr (sizeof(A) == 4 && std::is_same_v<T, f16_t>) {
    return f16_rounded(v);  // vectorises on the CPU
#endif
  } else {
    return load<A>(store<T>(v));
  }
}

}  // namespace ddt

// Element types shared by the CPU and CUDA kernels, without torch or CUDA
// headers in host code. bf16/f16 are 16-bit storage types; arithmetic is
// always done in `acc_t` (float, or double for double inputs).
#pragma once

#include <cstdint>
#include <cstring>

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
DDT_HD bf16_t to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return bf16_t(uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded));
}

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
  return load<A>(store<T>(v));
}

}  // namespace ddt

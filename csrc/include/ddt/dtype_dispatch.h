// Runtime dtype -> template instantiation, shared by the CPU and CUDA
// launchers so both support exactly the same combinations.
//   dispatch_x(t, bad, fn)            fn(T{})            T in f32, f64, bf16, f16
//   dispatch_x_w(t, w, bad, fn)       fn(T{}, W{})       W is T, or float32 when T is 16-bit
//   dispatch_x_w_m(t, w, m, bad, fn)  fn(T{}, W{}, M{})  W and M each T, or float32 when T is 16-bit
// Each returns fn's result, or `bad` for a combination outside these.
#pragma once

#include <type_traits>

#include "ddt/dtypes.h"

namespace ddt {

template <class T>
constexpr DType dtype_v = std::is_same_v<T, float>    ? DType::f32
                          : std::is_same_v<T, double> ? DType::f64
                          : std::is_same_v<T, bf16_t> ? DType::bf16
                                                      : DType::f16;
template <class T>
constexpr bool is_16bit_v = std::is_same_v<T, bf16_t> || std::is_same_v<T, f16_t>;

template <class R, class Fn>
R dispatch_x(DType t, R bad, Fn&& fn) {
  switch (t) {
    case DType::f32: return fn(float{});
    case DType::f64: return fn(double{});
    case DType::bf16: return fn(bf16_t{});
    case DType::f16: return fn(f16_t{});
  }
  return bad;
}

// fn(T{}) when d is T's dtype, fn(float{}) when d is float32 and T is 16-bit.
template <class T, class R, class Fn>
R same_or_f32(DType d, R bad, Fn&& fn) {
  if (d == dtype_v<T>) return fn(T{});
  if constexpr (is_16bit_v<T>) {
    if (d == DType::f32) return fn(float{});
  }
  return bad;
}

template <class R, class Fn>
R dispatch_x_w(DType t, DType w, R bad, Fn&& fn) {
  return dispatch_x<R>(t, bad, [&](auto x) {
    return same_or_f32<decltype(x), R>(w, bad, [&](auto wv) { return fn(x, wv); });
  });
}

template <class R, class Fn>
R dispatch_x_w_m(DType t, DType w, DType m, R bad, Fn&& fn) {
  return dispatch_x_w<R>(t, w, bad, [&](auto x, auto wv) {
    return same_or_f32<decltype(x), R>(m, bad, [&](auto mv) { return fn(x, wv, mv); });
  });
}

}  // namespace ddt

// SwiGLU gate: out = silu(a) * b (design.md, "Fused families" 4), over R rows
// of H elements; a and b may be strided row views (e.g. the two halves of one
// packed [R, 2H] GEMM output), out/grads are contiguous [R, H].
// Rounding as the reference: silu(a) is cast to the input dtype, then the
// product is rounded once.
#pragma once

#include <cmath>

#include "ddt/common.h"
#include "ddt/dtypes.h"

namespace ddt {

struct Swiglu {
  int64_t R = 0, H = 0;
  DType dtype = DType::f32;
  const void* a = nullptr;
  int64_t a_stride = 0;  // elements between rows
  const void* b = nullptr;
  int64_t b_stride = 0;
  void* out = nullptr;            // forward
  const void* grad_out = nullptr; // backward, [R, H]
  void* grad_a = nullptr;         // [R, H]
  void* grad_b = nullptr;         // [R, H]
};

namespace sg {

template <class A>
DDT_HD A sigmoid(A x) {
  return A(1) / (A(1) + std::exp(-x));
}

template <class T, class A>
DDT_HD A forward(A a, A b) {
  return round_to<T>(a * sigmoid(a)) * b;
}

// d out / d a and d out / d b for incoming gradient g.
template <class T, class A>
DDT_HD void backward(A a, A b, A g, A& ga, A& gb) {
  const A s = sigmoid(a);
  ga = g * b * (s * (A(1) + a * (A(1) - s)));
  gb = g * round_to<T>(a * s);
}

}  // namespace sg

namespace cpu {
void swiglu_forward(const Swiglu& p);
void swiglu_backward(const Swiglu& p);
}  // namespace cpu

namespace cuda {
int swiglu_forward(const Swiglu& p, stream_t stream);
int swiglu_backward(const Swiglu& p, stream_t stream);
}  // namespace cuda

}  // namespace ddt

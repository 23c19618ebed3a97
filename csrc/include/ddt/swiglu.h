// SwiGLU gate: out = silu(a) * b (docs/spec.md, "Fused op families" 4), over R rows
// of H elements; a and b may be strided row views (e.g. the two halves of one
// packed [R, 2H] GEMM output), out/grads are contiguous [R, H].
// Rounding: computed in float32 and rounded once to the input dtype (eager
// PyTorch also rounds silu(a) before the product; one rounding less is both
// closer to the exact value and, for bf16 on the CPU, a third faster).
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

// exp for float32 that CPU loops vectorise (std::exp does not without
// -ffast-math): Cody-Waite range reduction to r in [-ln2/2, ln2/2] and a
// degree-6 polynomial (the Cephes expf coefficients), within 2 ulp of expf.
DDT_HD float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x > -87.3f ? x : -87.3f;
  x = x < 88.3f ? x : 88.3f;
  // round to nearest by adding and removing 1.5 * 2^23 (floor() would not
  // vectorise under the default -ftrapping-math)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
#endif
}

DDT_HD float sigmoid(float x) {
#if defined(__CUDA_ARCH__)
  // the hardware exp2 and reciprocal (a few ulp): the accurate expf and IEEE
  // division would make the 16-bit kernel compute-bound on an H100/H200
  return __fdividef(1.0f, 1.0f + __expf(-x));
#else
  return 1.0f / (1.0f + exp_f32(-x));
#endif
}
DDT_HD double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

template <class A>
DDT_HD A forward(A a, A b) {
  return a * sigmoid(a) * b;
}

// d out / d a and d out / d b for incoming gradient g.
template <class A>
DDT_HD void backward(A a, A b, A g, A& ga, A& gb) {
  const A s = sigmoid(a);
  ga = g * b * (s * (A(1) + a * (A(1) - s)));
  gb = g * a * s;
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

// CPU kernels for the SwiGLU gate (see ddt/swiglu.h): parallel over rows.
#include "ddt/swiglu.h"

#include "ddt/dtype_dispatch.h"

#include <stdexcept>

namespace ddt {
namespace cpu {
namespace {

template <class T>
void forward_impl(const Swiglu& p) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < p.R; ++r) {
    const T* a = static_cast<const T*>(p.a) + r * p.a_stride;
    const T* b = static_cast<const T*>(p.b) + r * p.b_stride;
    T* out = static_cast<T*>(p.out) + r * p.H;
#pragma omp simd
    for (int64_t i = 0; i < p.H; ++i) out[i] = store<T>(sg::forward<A>(load<A>(a[i]), load<A>(b[i])));
  }
}

template <class T>
void backward_impl(const Swiglu& p) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < p.R; ++r) {
    const T* a = static_cast<const T*>(p.a) + r * p.a_stride;
    const T* b = static_cast<const T*>(p.b) + r * p.b_stride;
    const T* g = static_cast<const T*>(p.grad_out) + r * p.H;
    T* ga = static_cast<T*>(p.grad_a) + r * p.H;
    T* gb = static_cast<T*>(p.grad_b) + r * p.H;
#pragma omp simd
    for (int64_t i = 0; i < p.H; ++i) {
      A da, db;
      sg::backward<A>(load<A>(a[i]), load<A>(b[i]), load<A>(g[i]), da, db);
      ga[i] = store<T>(da);
      gb[i] = store<T>(db);
    }
  }
}

}  // namespace

void swiglu_forward(const Swiglu& p) {
  if (!dispatch_x<bool>(p.dtype, false, [&](auto t) { return forward_impl<decltype(t)>(p), true; }))
    throw std::invalid_argument("swiglu: unsupported dtype");
}
void swiglu_backward(const Swiglu& p) {
  if (!dispatch_x<bool>(p.dtype, false, [&](auto t) { return backward_impl<decltype(t)>(p), true; }))
    throw std::invalid_argument("swiglu: unsupported dtype");
}

}  // namespace cpu
}  // namespace ddt

// CPU kernels for the SwiGLU gate (see ddt/swiglu.h): parallel over rows.
#include "ddt/swiglu.h"

#include "ddt/dtype_dispatch.h"

#include <algorithm>
#include <stdexcept>

namespace ddt {
namespace cpu {
namespace {

// Rows are taken in blocks of kBlock elements, and the sigmoid of a block is
// computed in a loop of its own before the loop that uses it. exp and the
// division form a long dependency chain per element; fused with the rest in
// one loop, the core's out-of-order window holds too few elements to overlap
// the chains (split, the loop runs about twice as fast on an AVX2 core).
constexpr int64_t kBlock = 256;

// body(r, i0, n, s): elements [i0, i0 + n) of row r, with s[i] = sigmoid(a[i0 + i]).
template <class T, class Body>
void for_each_block(const Swiglu& p, Body&& body) {
  using A = acc_t<T>;
#pragma omp parallel
  {
    alignas(64) A sig[kBlock];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.R; ++r) {
      const T* a = static_cast<const T*>(p.a) + r * p.a_stride;
      for (int64_t i0 = 0; i0 < p.H; i0 += kBlock) {
        const int64_t n = std::min(kBlock, p.H - i0);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) sig[i] = sg::sigmoid(load<A>(a[i0 + i]));
        body(r, i0, n, sig);
      }
    }
  }
}

template <class T>
void forward_impl(const Swiglu& p) {
  using A = acc_t<T>;
  for_each_block<T>(p, [&](int64_t r, int64_t i0, int64_t n, const A* __restrict s) {
    const T* __restrict a = static_cast<const T*>(p.a) + r * p.a_stride + i0;
    const T* __restrict b = static_cast<const T*>(p.b) + r * p.b_stride + i0;
    T* __restrict out = static_cast<T*>(p.out) + r * p.H + i0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = store<T>(sg::forward_from_sigmoid<A>(load<A>(a[i]), s[i], load<A>(b[i])));
  });
}

template <class T>
void backward_impl(const Swiglu& p) {
  using A = acc_t<T>;
  for_each_block<T>(p, [&](int64_t r, int64_t i0, int64_t n, const A* __restrict s) {
    const T* __restrict a = static_cast<const T*>(p.a) + r * p.a_stride + i0;
    const T* __restrict b = static_cast<const T*>(p.b) + r * p.b_stride + i0;
    const T* __restrict g = static_cast<const T*>(p.grad_out) + r * p.H + i0;
    T* __restrict ga = static_cast<T*>(p.grad_a) + r * p.H + i0;
    T* __restrict gb = static_cast<T*>(p.grad_b) + r * p.H + i0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      A da, db;
      sg::backward_from_sigmoid<A>(load<A>(a[i]), s[i], load<A>(b[i]), load<A>(g[i]), da, db);
      ga[i] = store<T>(da);
      gb[i] = store<T>(db);
    }
  });
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

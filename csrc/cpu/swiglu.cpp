// CPU kernels for the SwiGLU gate (see ddt/swiglu.h): parallel over rows.
#include "ddt/swiglu.h"

#include "cpu_helpers.h"
#include "ddt/dtype_dispatch.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace ddt {
namespace cpu {
namespace {

// Rows are taken in blocks of kBlock elements, and the sigmoid of a block is
// computed in a loop of its own before the loop that uses it. exp and the
// division form a long dependency chain per element; fused with the rest in
// one loop, the core's out-of-order window holds too few elements to overlap
// the chains (split, the loop runs about twice as fast on an AVX2 core).
constexpr int64_t kBlock = 256;

// sg::forward and sg::backward (ddt/swiglu.h) from s = sigmoid(a), computed
// in the loop before: the same operations in the same order, so the same values.
template <class A>
A forward_from_sigmoid(A a, A s, A b) {
  return a * s * b;
}

template <class A>
void backward_from_sigmoid(A a, A s, A b, A g, A& ga, A& gb) {
  ga = g * b * (s * (A(1) + a * (A(1) - s)));
  gb = g * a * s;
}

// One block of n elements; s receives sigmoid(a).
template <class A, class T>
void forward_block(const T* __restrict a, const T* __restrict b, T* __restrict out, int64_t n, A* __restrict s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] = sg::sigmoid(load<A>(a[i]));
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = store<T>(forward_from_sigmoid<A>(load<A>(a[i]), s[i], load<A>(b[i])));
}

template <class A, class T>
void backward_block(const T* __restrict a, const T* __restrict b, const T* __restrict g, T* __restrict ga,
                    T* __restrict gb, int64_t n, A* __restrict s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] = sg::sigmoid(load<A>(a[i]));
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    A da, db;
    backward_from_sigmoid<A>(load<A>(a[i]), s[i], load<A>(b[i]), load<A>(g[i]), da, db);
    ga[i] = store<T>(da);
    gb[i] = store<T>(db);
  }
}

// block(r, i0, n, scratch): elements [i0, i0 + n) of row r; scratch holds
// kBlock accumulator values of the calling thread.
template <class T, class Block>
void for_each_block(const Swiglu& p, Block&& block) {
  using A = acc_t<T>;
#pragma omp parallel
  {
    std::vector<A> scratch(kBlock);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.R; ++r)
      for (int64_t i0 = 0; i0 < p.H; i0 += kBlock) block(r, i0, std::min(kBlock, p.H - i0), scratch.data());
  }
}

template <class T>
void forward_impl(const Swiglu& p) {
  using A = acc_t<T>;
  for_each_block<T>(p, [&](int64_t r, int64_t i0, int64_t n, A* scratch) {
    const T* a = static_cast<const T*>(p.a) + r * p.a_stride + i0;
    const T* b = static_cast<const T*>(p.b) + r * p.b_stride + i0;
    T* out = static_cast<T*>(p.out) + r * p.H + i0;
    forward_block<A>(a, b, out, n, scratch);
  });
}

template <class T>
void backward_impl(const Swiglu& p) {
  using A = acc_t<T>;
  for_each_block<T>(p, [&](int64_t r, int64_t i0, int64_t n, A* scratch) {
    const T* a = static_cast<const T*>(p.a) + r * p.a_stride + i0;
    const T* b = static_cast<const T*>(p.b) + r * p.b_stride + i0;
    const T* g = static_cast<const T*>(p.grad_out) + r * p.H + i0;
    T* ga = static_cast<T*>(p.grad_a) + r * p.H + i0;
    T* gb = static_cast<T*>(p.grad_b) + r * p.H + i0;
    backward_block<A>(a, b, g, ga, gb, n, scratch);
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

// CPU kernels for the SwiGLU gate (see ddt/swiglu.h): parallel over rows.
#include "ddt/swiglu.h"

#include "cpu_helpers.h"
#include "ddt/dtype_dispatch.h"

#include <algorithm>
#include <stdexcept>
#include <type_traits>
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

// One block of n elements; s receives sigmoid(a).
template <class A, class T>
void forward_block(const T* __restrict a, const T* __restrict b, T* __restrict out, int64_t n, A* __restrict s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] = sg::sigmoid(load<A>(a[i]));
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = store<T>(sg::forward_from_sigmoid<A>(load<A>(a[i]), s[i], load<A>(b[i])));
}

template <class A, class T>
void backward_block(const T* __restrict a, const T* __restrict b, const T* __restrict g, T* __restrict ga,
                    T* __restrict gb, int64_t n, A* __restrict s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] = sg::sigmoid(load<A>(a[i]));
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    A da, db;
    sg::backward_from_sigmoid<A>(load<A>(a[i]), s[i], load<A>(b[i]), load<A>(g[i]), da, db);
    ga[i] = store<T>(da);
    gb[i] = store<T>(db);
  }
}

// bfloat16 blocks (even length) as 32-bit words of two elements (see
// bf16_pairs): no widening unpacks or narrowing packs, and roundings without
// the NaN test (a and b are widened bfloat16 values; sigmoid's exp clamps its
// argument, so s is never NaN). Same values as the element loops.
namespace pairs {

using bf16_pairs::hi;
using bf16_pairs::lo;
using bf16_pairs::pack;
using bf16_pairs::rounded;

// sigmoid of the even and odd elements of a's n words, into s0/s1 (a loop of
// its own, as in forward_block).
inline void sigmoids(const bf16_t* __restrict a, int64_t n, float* __restrict s0, float* __restrict s1) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t aw = bf16_pairs::load(a, i);
    s0[i] = sg::sigmoid(lo(aw));
    s1[i] = sg::sigmoid(hi(aw));
  }
}

inline void forward_block(const bf16_t* __restrict a, const bf16_t* __restrict b, bf16_t* __restrict out, int64_t n,
                          float* __restrict s0, float* __restrict s1) {
  sigmoids(a, n, s0, s1);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t aw = bf16_pairs::load(a, i), bw = bf16_pairs::load(b, i);
    bf16_pairs::store(out, i,
                      pack(rounded(sg::forward_from_sigmoid(lo(aw), s0[i], lo(bw))),
                           rounded(sg::forward_from_sigmoid(hi(aw), s1[i], hi(bw)))));
  }
}

inline void backward_block(const bf16_t* __restrict a, const bf16_t* __restrict b, const bf16_t* __restrict g,
                           bf16_t* __restrict ga, bf16_t* __restrict gb, int64_t n, float* __restrict s0,
                           float* __restrict s1) {
  sigmoids(a, n, s0, s1);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t aw = bf16_pairs::load(a, i), bw = bf16_pairs::load(b, i), gw = bf16_pairs::load(g, i);
    float da0, db0, da1, db1;
    sg::backward_from_sigmoid(lo(aw), s0[i], lo(bw), lo(gw), da0, db0);
    sg::backward_from_sigmoid(hi(aw), s1[i], hi(bw), hi(gw), da1, db1);
    bf16_pairs::store(ga, i, pack(rounded(da0), rounded(da1)));
    bf16_pairs::store(gb, i, pack(rounded(db0), rounded(db1)));
  }
}

}  // namespace pairs

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
    if constexpr (std::is_same_v<T, bf16_t>) {
      if (n % 2 == 0) pairs::forward_block(a, b, out, n / 2, scratch, scratch + kBlock / 2);
      else forward_block<A>(a, b, out, n, scratch);
    } else {
      forward_block<A>(a, b, out, n, scratch);
    }
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
    if constexpr (std::is_same_v<T, bf16_t>) {
      if (n % 2 == 0) pairs::backward_block(a, b, g, ga, gb, n / 2, scratch, scratch + kBlock / 2);
      else backward_block<A>(a, b, g, ga, gb, n, scratch);
    } else {
      backward_block<A>(a, b, g, ga, gb, n, scratch);
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

// CPU kernels for q/k RMSNorm + 2D rotary + head split (see ddt/qk_norm_rope.h).
// Parallel over tokens (b, l); the weight gradients use per-thread
// accumulators summed in thread order (deterministic for a thread count).
#include "ddt/qk_norm_rope.h"

#include "cpu_helpers.h"
#include "ddt/dtype_dispatch.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace ddt {
namespace cpu {
namespace {

// One token's q (or k) heads, H contiguous vectors of D at x, widened into xv
// with each head's 1/RMS in rinv. All heads' statistics are taken before any
// head is rotated, so no head waits on its own reduction and square root.
template <class T, class A>
void widen_heads(const T* __restrict x, int64_t H, int64_t D, double eps, A* __restrict xv, A* __restrict rinv) {
  for (int64_t h = 0; h < H; ++h) {
    A* __restrict xa = xv + h * D;
    A sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t d = 0; d < D; ++d) {
      xa[d] = load<A>(x[h * D + d]);
      sq += xa[d] * xa[d];
    }
    rinv[h] = sq;
  }
#pragma omp simd
  for (int64_t h = 0; h < H; ++h) rinv[h] = nm::inv_std<A>(rinv[h] / A(D), eps);
}

// The q and k weights in the accumulation type: [q_weight | k_weight].
template <class W, class A>
std::vector<A> widen_weights(const QkNormRope& p) {
  std::vector<A> wv = widen_row<W, A>(p.q_weight, p.D);
  const std::vector<A> k = widen_row<W, A>(p.k_weight, p.D);
  wv.insert(wv.end(), k.begin(), k.end());
  return wv;
}

// Token (b, l)'s q and k: RMSNorm, weight, rotation. token: its packed
// [3, H, D] row; outs: the q and k outputs.
template <class T, class A>
void forward_token(const QkNormRope& p, const T* token, int64_t b, int64_t l, const A* wv, A* xv, A* rinv,
                   T* const* outs) {
  const int64_t D = p.D, half = D / 2;
  const float* __restrict rope = p.rope + l * half * 2;
  for (int part = 0; part < 2; ++part) {
    widen_heads<T, A>(token + part * p.H * D, p.H, D, p.eps, xv, rinv);
    const A* __restrict w = wv + part * D;
    for (int64_t h = 0; h < p.H; ++h) {
      const A* __restrict xa = xv + h * D;
      const A r = rinv[h];
      T* __restrict out = outs[part] + qk::split(p, b, h, l);
#pragma omp simd
      for (int64_t m = 0; m < half; ++m) {
        const A u0 = round_to<T>(xa[2 * m] * r) * w[2 * m];
        const A u1 = round_to<T>(xa[2 * m + 1] * r) * w[2 * m + 1];
        A r0, r1;
        qk::rotate<A>(u0, u1, A(rope[2 * m]), A(rope[2 * m + 1]), r0, r1);
        out[2 * m] = store<T>(r0);
        out[2 * m + 1] = store<T>(r1);
      }
    }
  }
}

// v is copied as it is.
template <class T>
void copy_v(const QkNormRope& p, const T* qkv, T* v_out, int64_t b, int64_t l) {
  for (int64_t h = 0; h < p.H; ++h) {
    const T* v = qkv + qk::packed(p, b, l, 2, h);
    std::copy(v, v + p.D, v_out + qk::split(p, b, h, l));
  }
}

template <class T, class W>
void forward_impl(const QkNormRope& p) {
  using A = acc_t<T>;
  const T* qkv = static_cast<const T*>(p.qkv);
  T* const outs[2] = {static_cast<T*>(p.q), static_cast<T*>(p.k)};
#pragma omp parallel
  {
    // Per thread: the weights, and one token's q (or k) heads with their 1/RMS.
    const std::vector<A> wv = widen_weights<W, A>(p);
    std::vector<A> xv(p.H * p.D), rinv(p.H);
#pragma omp for schedule(static)
    for (int64_t bl = 0; bl < p.B * p.L; ++bl) {
      const int64_t b = bl / p.L, l = bl % p.L;
      forward_token<T, A>(p, qkv + qk::packed(p, b, l, 0, 0), b, l, wv.data(), xv.data(), rinv.data(), outs);
      copy_v(p, qkv, static_cast<T*>(p.v), b, l);
    }
  }
}

// Software prefetch of token l's incoming q and k gradients, read in the
// [B, H, L, D] layout: one short row (D elements) per head, 2H streams that
// the hardware prefetcher does not follow (bfloat16 backward 1.15-1.25x faster
// at DDT shapes on a Zen 3; float32 unchanged; adding grad_v gained nothing).
template <class T>
void prefetch_next_token(const QkNormRope& p, const T* const* grads, int64_t b, int64_t l) {
  for (int part = 0; part < 2; ++part) {
    if (grads[part] == nullptr) continue;
    for (int64_t h = 0; h < p.H; ++h) {
      prefetch_lines(grads[part] + qk::split(p, b, h, l), p.D * int64_t(sizeof(T)));
    }
  }
}

// Scratch of one thread for the backward of a token.
template <class A>
struct TokenScratch {
  std::vector<A> xv, rinv, xhat, gn;
  TokenScratch(const QkNormRope& p) : xv(p.H * p.D), rinv(p.H), xhat(p.D), gn(p.D) {}
};

// The gradient of token (b, l)'s packed q and k rows (gx_token: [2, H, D])
// from the incoming gradients grads[part] ([B, H, L, D]; null for a part
// whose gradient is missing: zero). acc: the weight gradients' sums [2, D].
template <class T, class A>
void backward_token(const QkNormRope& p, const T* token, int64_t b, int64_t l, const T* const* grads, const A* wv,
                    A* acc, TokenScratch<A>& t, T* gx_token) {
  const int64_t D = p.D, half = D / 2;
  const float* rope = p.rope + l * half * 2;
  for (int part = 0; part < 2; ++part) {
    if (grads[part] == nullptr) {
      std::fill(gx_token + part * p.H * D, gx_token + (part + 1) * p.H * D, store<T>(A(0)));
      continue;
    }
    widen_heads<T, A>(token + part * p.H * D, p.H, D, p.eps, t.xv.data(), t.rinv.data());
    for (int64_t h = 0; h < p.H; ++h) {
      const A* __restrict x = t.xv.data() + h * D;
      T* __restrict gx = gx_token + (part * p.H + h) * D;
      const T* __restrict g = grads[part] + qk::split(p, b, h, l);
      const A r = t.rinv[h];
      const A* __restrict w = wv + part * D;
      A* __restrict acc_w = acc + part * D;
      A* __restrict xh = t.xhat.data();
      A* __restrict gnv = t.gn.data();
      A dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t m = 0; m < half; ++m) {
        // d/du of a rotation is the inverse rotation of the incoming gradient.
        A gu0, gu1;
        qk::rotate<A>(load<A>(g[2 * m]), load<A>(g[2 * m + 1]), A(rope[2 * m]), -A(rope[2 * m + 1]), gu0, gu1);
        const A xh0 = x[2 * m] * r, xh1 = x[2 * m + 1] * r;
        acc_w[2 * m] += gu0 * round_to<T>(xh0);
        acc_w[2 * m + 1] += gu1 * round_to<T>(xh1);
        const A gn0 = gu0 * w[2 * m], gn1 = gu1 * w[2 * m + 1];
        xh[2 * m] = xh0;
        xh[2 * m + 1] = xh1;
        gnv[2 * m] = gn0;
        gnv[2 * m + 1] = gn1;
        dot += gn0 * xh0 + gn1 * xh1;
      }
      dot /= A(D);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) gx[d] = store<T>(r * (gnv[d] - xh[d] * dot));
    }
  }
}

template <class T, class W>
void backward_impl(const QkNormRope& p) {
  using A = acc_t<T>;
  const T* qkv = static_cast<const T*>(p.qkv);
  const T* const grads[2] = {static_cast<const T*>(p.grad_q), static_cast<const T*>(p.grad_k)};
  const T* grad_v = static_cast<const T*>(p.grad_v);
  T* grad_qkv = static_cast<T*>(p.grad_qkv);
  const int64_t D = p.D;
  const int threads = num_threads();
  std::vector<A> acc(size_t(threads) * 2 * D, A(0));
#pragma omp parallel
  {
    A* mine = acc.data() + size_t(thread_id()) * 2 * D;
    const std::vector<A> wv = widen_weights<W, A>(p);
    TokenScratch<A> scratch(p);
#pragma omp for schedule(static)
    for (int64_t bl = 0; bl < p.B * p.L; ++bl) {
      const int64_t b = bl / p.L, l = bl % p.L;
      if (l + 1 < p.L) prefetch_next_token(p, grads, b, l + 1);
      const T* token = qkv + qk::packed(p, b, l, 0, 0);
      T* gx_token = grad_qkv + qk::packed(p, b, l, 0, 0);
      backward_token<T, A>(p, token, b, l, grads, wv.data(), mine, scratch, gx_token);
      for (int64_t h = 0; h < p.H; ++h) {
        T* gv = grad_qkv + qk::packed(p, b, l, 2, h);
        if (grad_v) {
          const T* g = grad_v + qk::split(p, b, h, l);
          std::copy(g, g + D, gv);
        } else {
          std::fill(gv, gv + D, store<T>(A(0)));
        }
      }
    }
  }
  W* outs[2] = {static_cast<W*>(p.grad_q_weight), static_cast<W*>(p.grad_k_weight)};
  for (int part = 0; part < 2; ++part)
    for (int64_t d = 0; d < D; ++d) {
      A s = 0;
      for (int t = 0; t < threads; ++t) s += acc[size_t(t) * 2 * D + part * D + d];
      outs[part][d] = store<W>(s);
    }
}

template <class Fn>
void dispatch(const QkNormRope& p, Fn&& fn) {
  const bool ok = dispatch_x_w<bool>(p.x_dtype, p.w_dtype, false, [&](auto t, auto w) {
    fn(t, w);
    return true;
  });
  if (!ok) throw std::invalid_argument("qk_norm_rope: unsupported dtype combination");
}

}  // namespace

void qk_norm_rope_forward(const QkNormRope& p) {
  dispatch(p, [&](auto t, auto w) { forward_impl<decltype(t), decltype(w)>(p); });
}

void qk_norm_rope_backward(const QkNormRope& p) {
  dispatch(p, [&](auto t, auto w) { backward_impl<decltype(t), decltype(w)>(p); });
}

}  // namespace cpu
}  // namespace ddt

// CPU kernels for q/k RMSNorm + 2D rotary + head split (see ddt/qk_norm_rope.h).
// Parallel over tokens (b, l); the weight gradients use per-thread
// accumulators summed in thread order (deterministic for a thread count).
#include "ddt/qk_norm_rope.h"

#include "cpu_helpers.h"
#include "ddt/dtype_dispatch.h"

#include <algorithm>
#include <stdexcept>
#include <type_traits>
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

// bfloat16 (the bf16 model and autocast): each rotary pair (v[2m], v[2m+1])
// is one 32-bit word (see bf16_pairs), so the rotation reads and writes words
// with no interleaving shuffles, and no widened copy of the token is kept:
// the statistics pass and the rotation both read the row from L1. The
// weights and this token's (cos, sin) are split into even and odd planes
// (NaNs made canonical), so the roundings skip their NaN test. Same values
// as forward_impl up to the order of the sums of squares.
namespace pairs {

using bf16_pairs::hi;
using bf16_pairs::lo;
using bf16_pairs::rounded;

// 1/RMS of each of a token's H heads (D values each, as words) into rinv.
inline void heads_rinv(const QkNormRope& p, const bf16_t* heads, float* rinv) {
  for (int64_t h = 0; h < p.H; ++h) {
    const bf16_t* __restrict x = heads + h * p.D;
    float sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < p.D / 2; ++i) {
      const uint32_t xw = bf16_pairs::load(x, i);
      sq += lo(xw) * lo(xw) + hi(xw) * hi(xw);
    }
    rinv[h] = nm::inv_std<float>(sq / float(p.D), p.eps);
  }
}

template <class W>
void forward(const QkNormRope& p) {
  const bf16_t* qkv = static_cast<const bf16_t*>(p.qkv);
  bf16_t* outs[2] = {static_cast<bf16_t*>(p.q), static_cast<bf16_t*>(p.k)};
  const int64_t D = p.D, half = D / 2;
#pragma omp parallel
  {
    // [q | k] weights' even and odd elements; this token's cos and sin; 1/RMS per head
    const std::vector<float> wv = widen_weights<W, float>(p);
    std::vector<float> w0(D), w1(D), cos_l(half), sin_l(half), rinv(p.H);
    for (int part = 0; part < 2; ++part)
      bf16_pairs::split(wv.data() + part * D, half, w0.data() + part * half, w1.data() + part * half);
#pragma omp for schedule(static)
    for (int64_t bl = 0; bl < p.B * p.L; ++bl) {
      const int64_t b = bl / p.L, l = bl % p.L;
      bf16_pairs::split(p.rope + l * half * 2, half, cos_l.data(), sin_l.data());
      for (int part = 0; part < 2; ++part) {
        const bf16_t* heads = qkv + qk::packed(p, b, l, part, 0);
        heads_rinv(p, heads, rinv.data());  // every head's statistics before any rotation (as widen_heads)
        const float* __restrict wa = w0.data() + part * half;
        const float* __restrict wb = w1.data() + part * half;
        const float* __restrict c = cos_l.data();
        const float* __restrict s = sin_l.data();
        for (int64_t h = 0; h < p.H; ++h) {
          const bf16_t* __restrict x = heads + h * D;
          bf16_t* __restrict out = outs[part] + qk::split(p, b, h, l);
          const float r = rinv[h];
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const uint32_t xw = bf16_pairs::load(x, i);
            // the spec's rounding point, then weight and rotation in float
            const float u0 = bits_to_float(rounded(lo(xw) * r)) * wa[i];
            const float u1 = bits_to_float(rounded(hi(xw) * r)) * wb[i];
            float r0, r1;
            qk::rotate<float>(u0, u1, c[i], s[i], r0, r1);
            bf16_pairs::store(out, i, bf16_pairs::pack(rounded(r0), rounded(r1)));
          }
        }
      }
      copy_v(p, qkv, static_cast<bf16_t*>(p.v), b, l);
    }
  }
}

}  // namespace pairs

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
  TokenScratch() = default;
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

// bfloat16 backward of a token over words (as pairs::forward): the same math
// as backward_token, with the weight gradient's sums kept as even and odd
// planes per part (backward_impl puts them back in element order).
namespace pairs {

// One head: acc0/acc1 the weight gradient's even/odd sums; xh0..gn1: half
// floats of scratch each. (A function of its own, every operand a parameter,
// so the word stores do not force reloads.)
inline void backward_head(int64_t half, const bf16_t* __restrict x, const bf16_t* __restrict g, float r,
                          const float* __restrict w0, const float* __restrict w1, const float* __restrict c,
                          const float* __restrict s, float* __restrict acc0, float* __restrict acc1,
                          float* __restrict xh0, float* __restrict xh1, float* __restrict gn0, float* __restrict gn1,
                          bf16_t* __restrict gx) {
  float dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < half; ++i) {
    const uint32_t gw = bf16_pairs::load(g, i), xw = bf16_pairs::load(x, i);
    // d/du of a rotation is the inverse rotation of the incoming gradient.
    float gu0, gu1;
    qk::rotate<float>(lo(gw), hi(gw), c[i], -s[i], gu0, gu1);
    const float a0 = lo(xw) * r, a1 = hi(xw) * r;
    acc0[i] += gu0 * bits_to_float(rounded(a0));
    acc1[i] += gu1 * bits_to_float(rounded(a1));
    xh0[i] = a0;
    xh1[i] = a1;
    gn0[i] = gu0 * w0[i];
    gn1[i] = gu1 * w1[i];
    dot += gn0[i] * a0 + gn1[i] * a1;
  }
  dot /= float(2 * half);
#pragma omp simd
  for (int64_t i = 0; i < half; ++i)
    bf16_pairs::store(gx, i,
                      bf16_pairs::pack(rounded(r * (gn0[i] - xh0[i] * dot)), rounded(r * (gn1[i] - xh1[i] * dot))));
}

// Scratch and weights of one thread.
struct BackwardScratch {
  std::vector<float> w0, w1, cos_l, sin_l, rinv, xh0, xh1, gn0, gn1;
  template <class W>
  static BackwardScratch of(const QkNormRope& p) {
    const int64_t D = p.D, half = D / 2;
    BackwardScratch t{std::vector<float>(D),    std::vector<float>(D),    std::vector<float>(half),
                      std::vector<float>(half), std::vector<float>(p.H),  std::vector<float>(half),
                      std::vector<float>(half), std::vector<float>(half), std::vector<float>(half)};
    const std::vector<float> wv = widen_weights<W, float>(p);
    for (int part = 0; part < 2; ++part)
      bf16_pairs::split(wv.data() + part * D, half, t.w0.data() + part * half, t.w1.data() + part * half);
    return t;
  }
};

// One token (b, l): its packed q and k rows' gradients into gx_token; acc:
// this thread's weight-gradient sums [2][even half | odd half].
inline void backward_token(const QkNormRope& p, const bf16_t* token, int64_t b, int64_t l, const bf16_t* const* grads,
                           float* acc, BackwardScratch& t, bf16_t* gx_token) {
  const int64_t D = p.D, half = D / 2;
  bf16_pairs::split(p.rope + l * half * 2, half, t.cos_l.data(), t.sin_l.data());
  for (int part = 0; part < 2; ++part) {
    const bf16_t* heads = token + part * p.H * D;
    if (grads[part] == nullptr) {
      std::fill(gx_token + part * p.H * D, gx_token + (part + 1) * p.H * D, store<bf16_t>(0.f));
      continue;
    }
    heads_rinv(p, heads, t.rinv.data());
    for (int64_t h = 0; h < p.H; ++h)
      backward_head(half, heads + h * D, grads[part] + qk::split(p, b, h, l), t.rinv[h], t.w0.data() + part * half,
                    t.w1.data() + part * half, t.cos_l.data(), t.sin_l.data(), acc + part * D, acc + part * D + half,
                    t.xh0.data(), t.xh1.data(), t.gn0.data(), t.gn1.data(), gx_token + (part * p.H + h) * D);
  }
}

}  // namespace pairs

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
    // bfloat16 (see pairs): weights and scratch of its own, the sums in plane order
    constexpr bool kWords = std::is_same_v<T, bf16_t>;
    const std::vector<A> wv = kWords ? std::vector<A>{} : widen_weights<W, A>(p);
    TokenScratch<A> scratch = kWords ? TokenScratch<A>{} : TokenScratch<A>(p);
    auto pairs_scratch = kWords ? pairs::BackwardScratch::of<W>(p) : pairs::BackwardScratch{};
#pragma omp for schedule(static)
    for (int64_t bl = 0; bl < p.B * p.L; ++bl) {
      const int64_t b = bl / p.L, l = bl % p.L;
      if (l + 1 < p.L) prefetch_next_token(p, grads, b, l + 1);
      const T* token = qkv + qk::packed(p, b, l, 0, 0);
      T* gx_token = grad_qkv + qk::packed(p, b, l, 0, 0);
      if constexpr (kWords) {
        pairs::backward_token(p, token, b, l, grads, mine, pairs_scratch, gx_token);
      } else {
        backward_token<T, A>(p, token, b, l, grads, wv.data(), mine, scratch, gx_token);
      }
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
  // (bfloat16: each part's sums hold its even elements, then its odd ones)
  constexpr bool kPlanes = std::is_same_v<T, bf16_t>;
  for (int part = 0; part < 2; ++part)
    for (int64_t d = 0; d < D; ++d) {
      const int64_t at = part * D + (kPlanes ? bf16_pairs::plane_index(d, D) : d);
      A s = 0;
      for (int t = 0; t < threads; ++t) s += acc[size_t(t) * 2 * D + at];
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
  dispatch(p, [&](auto t, auto w) {
    if constexpr (std::is_same_v<decltype(t), bf16_t>) {
      pairs::forward<decltype(w)>(p);
    } else {
      forward_impl<decltype(t), decltype(w)>(p);
    }
  });
}

void qk_norm_rope_backward(const QkNormRope& p) {
  dispatch(p, [&](auto t, auto w) { backward_impl<decltype(t), decltype(w)>(p); });
}

}  // namespace cpu
}  // namespace ddt

// CPU kernels for q/k RMSNorm + 2D rotary + head split (see ddt/qk_norm_rope.h).
// Parallel over tokens (b, l); the weight gradients use per-thread
// accumulators summed in thread order (deterministic for a thread count).
#include "ddt/qk_norm_rope.h"

#include "ddt/dtype_dispatch.h"

#include <stdexcept>
#include <vector>

#if defined(DDT_FAST_HAVE_OPENMP)
#include <omp.h>
#endif

namespace ddt {
namespace cpu {
namespace {

// 1 / RMS of one head vector.
template <class T, class A>
A head_rinv(const T* x, int64_t D, double eps) {
  A sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t d = 0; d < D; ++d) sq += load<A>(x[d]) * load<A>(x[d]);
  return nm::inv_std<A>(sq / A(D), eps);
}

template <class T, class W>
void forward_impl(const QkNormRope& p) {
  using A = acc_t<T>;
  const T* qkv = static_cast<const T*>(p.qkv);
  const W* weights[2] = {static_cast<const W*>(p.q_weight), static_cast<const W*>(p.k_weight)};
  T* outs[2] = {static_cast<T*>(p.q), static_cast<T*>(p.k)};
  T* v_out = static_cast<T*>(p.v);
  const int64_t D = p.D, half = D / 2;
#pragma omp parallel for schedule(static)
  for (int64_t bl = 0; bl < p.B * p.L; ++bl) {
    const int64_t b = bl / p.L, l = bl % p.L;
    const float* rope = p.rope + l * half * 2;
    for (int64_t h = 0; h < p.H; ++h) {
      for (int part = 0; part < 2; ++part) {
        const T* x = qkv + qk::packed(p, b, l, part, h);
        const A rinv = head_rinv<T, A>(x, D, p.eps);
        T* out = outs[part] + qk::split(p, b, h, l);
#pragma omp simd
        for (int64_t m = 0; m < half; ++m) {
          const A u0 = round_to<T>(load<A>(x[2 * m]) * rinv) * load<A>(weights[part][2 * m]);
          const A u1 = round_to<T>(load<A>(x[2 * m + 1]) * rinv) * load<A>(weights[part][2 * m + 1]);
          A r0, r1;
          qk::rotate<A>(u0, u1, A(rope[2 * m]), A(rope[2 * m + 1]), r0, r1);
          out[2 * m] = store<T>(r0);
          out[2 * m + 1] = store<T>(r1);
        }
      }
      const T* v = qkv + qk::packed(p, b, l, 2, h);
      T* vo = v_out + qk::split(p, b, h, l);
      for (int64_t d = 0; d < D; ++d) vo[d] = v[d];
    }
  }
}

template <class T, class W>
void backward_impl(const QkNormRope& p) {
  using A = acc_t<T>;
  const T* qkv = static_cast<const T*>(p.qkv);
  const W* weights[2] = {static_cast<const W*>(p.q_weight), static_cast<const W*>(p.k_weight)};
  const T* grads[2] = {static_cast<const T*>(p.grad_q), static_cast<const T*>(p.grad_k)};
  const T* grad_v = static_cast<const T*>(p.grad_v);
  T* grad_qkv = static_cast<T*>(p.grad_qkv);
  const int64_t D = p.D, half = D / 2;
#if defined(DDT_FAST_HAVE_OPENMP)
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  std::vector<A> acc(size_t(threads) * 2 * D, A(0));
#pragma omp parallel
  {
#if defined(DDT_FAST_HAVE_OPENMP)
    A* mine = acc.data() + size_t(omp_get_thread_num()) * 2 * D;
#else
    A* mine = acc.data();
#endif
    std::vector<A> xhat(D), gn(D), wv(2 * D);  // wv: q and k weights, converted once
    for (int part = 0; part < 2; ++part)
      for (int64_t d = 0; d < D; ++d) wv[part * D + d] = load<A>(weights[part][d]);
#pragma omp for schedule(static)
    for (int64_t bl = 0; bl < p.B * p.L; ++bl) {
      const int64_t b = bl / p.L, l = bl % p.L;
      const float* rope = p.rope + l * half * 2;
      for (int64_t h = 0; h < p.H; ++h) {
        for (int part = 0; part < 2; ++part) {
          const T* x = qkv + qk::packed(p, b, l, part, h);
          T* gx = grad_qkv + qk::packed(p, b, l, part, h);
          if (grads[part] == nullptr) {
            for (int64_t d = 0; d < D; ++d) gx[d] = store<T>(A(0));
            continue;
          }
          const T* __restrict g = grads[part] + qk::split(p, b, h, l);
          const A rinv = head_rinv<T, A>(x, D, p.eps);
          const A* __restrict w = wv.data() + part * D;
          A* __restrict acc_w = mine + part * D;
          A* __restrict xh = xhat.data();
          A* __restrict gnv = gn.data();
          A dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t m = 0; m < half; ++m) {
            // d/du of a rotation is the inverse rotation of the incoming gradient.
            A gu0, gu1;
            qk::rotate<A>(load<A>(g[2 * m]), load<A>(g[2 * m + 1]), A(rope[2 * m]), -A(rope[2 * m + 1]), gu0, gu1);
            const A xh0 = load<A>(x[2 * m]) * rinv, xh1 = load<A>(x[2 * m + 1]) * rinv;
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
          for (int64_t d = 0; d < D; ++d) gx[d] = store<T>(rinv * (gnv[d] - xh[d] * dot));
        }
        T* gv = grad_qkv + qk::packed(p, b, l, 2, h);
        const T* g = grad_v ? grad_v + qk::split(p, b, h, l) : nullptr;
        for (int64_t d = 0; d < D; ++d) gv[d] = g ? g[d] : store<T>(A(0));
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

// CPU kernels for the fused norm + modulate family (see ddt/norm_modulate.h).
// Rows run in parallel (OpenMP, static schedule); reductions over rows
// (weight gradient, per-sample modulation gradients) use per-thread
// accumulators summed in thread order, so results are deterministic for a
// given thread count.
#include "ddt/norm_modulate.h"

#include "ddt/dtype_dispatch.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#if defined(DDT_FAST_HAVE_OPENMP)
#include <omp.h>
#endif

namespace ddt {
namespace cpu {
namespace {

int num_threads() {
#if defined(DDT_FAST_HAVE_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int thread_id() {
#if defined(DDT_FAST_HAVE_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

template <class T>
const T* row(const Rows& r, int64_t b, int64_t l) {
  return static_cast<const T*>(r.ptr) + b * r.stride_b + l * r.stride_l;
}
template <class T>
T* row(const MutRows& r, int64_t b, int64_t l) {
  return static_cast<T*>(r.ptr) + b * r.stride_b + l * r.stride_l;
}

// Mean (0 for RMSNorm) and 1/std of a row.
template <class A>
void row_stats(NormKind kind, const A* __restrict xr, int64_t C, double eps, A& mean, A& rinv) {
  mean = 0;
  if (kind == NormKind::layer) {
    A sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < C; ++c) sum += xr[c];
    mean = sum / A(C);
  }
  A sq = 0;
  const A mu = mean;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < C; ++c) {
    const A d = xr[c] - mu;
    sq += d * d;
  }
  rinv = nm::inv_std<A>(sq / A(C), eps);
}

// Normalise a row into xhat (unrounded) and return 1/std.
template <class A>
A normalise(NormKind kind, const A* __restrict xr, A* __restrict xhat, int64_t C, double eps) {
  A mean, rinv;
  row_stats<A>(kind, xr, C, eps, mean, rinv);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) xhat[c] = (xr[c] - mean) * rinv;
  return rinv;
}

template <class T, class W, class M>
void forward_impl(const NormModulateForward& p) {
  using A = acc_t<T>;
  const int64_t rows = p.B * p.L, C = p.C;
  const bool has_weight = p.weight != nullptr;
  const W* weight = static_cast<const W*>(p.weight);
#pragma omp parallel
  {
    std::vector<A> xr(C);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / p.L, l = r % p.L;
      const T* x = row<T>(p.x, b, l);
      if (p.residual) {
        const T* y = row<T>(p.y, b, l);
        const M* g = row<M>(p.gate, b, l);
        T* xo = row<T>(p.x_out, b, l);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          xr[c] = round_to<T>(nm::residual<A>(load<A>(x[c]), load<A>(g[c]), load<A>(y[c])));
          xo[c] = store<T>(xr[c]);
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) xr[c] = load<A>(x[c]);
      }
      if (p.kind == NormKind::none) continue;
      A mean, rinv;
      row_stats<A>(p.kind, xr.data(), C, p.eps, mean, rinv);
      const A* __restrict xrow = xr.data();
      const M* sh = row<M>(p.shift, b, l);
      const M* sc = row<M>(p.scale, b, l);
      T* out = row<T>(p.out, b, l);
      if (has_weight) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          out[c] = store<T>(nm::modulate<A>(round_to<T>((xrow[c] - mean) * rinv), load<A>(weight[c]),
                                            load<A>(sh[c]), load<A>(sc[c])));
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          out[c] = store<T>(nm::modulate<A>(round_to<T>((xrow[c] - mean) * rinv), A(1), load<A>(sh[c]),
                                            load<A>(sc[c])));
      }
    }
  }
}

template <class T, class W, class M>
void backward_impl(const NormModulateBackward& p) {
  using A = acc_t<T>;
  const int64_t rows = p.B * p.L, C = p.C;
  const bool norm = p.kind != NormKind::none;
  const bool has_weight = p.weight != nullptr;
  const W* weight = static_cast<const W*>(p.weight);
  // What is reduced over rows: [C] for the weight, [B, C] per per-sample operand.
  const bool sum_shift = norm && !p.shift.per_token();
  const bool sum_scale = norm && !p.scale.per_token();
  const bool sum_gate = p.residual && !p.gate.per_token();
  const int threads = num_threads();
  const int64_t stride = C * (1 + p.B * 3);  // per-thread accumulator block
  std::vector<A> acc(size_t(threads) * size_t(stride), A(0));

#pragma omp parallel
  {
    // Row buffers (L1-resident for DDT widths); simple loops over them vectorise.
    std::vector<A> xr(C), xhat(C), nrm(C), gbuf(C), abuf(C), gn(C), gx(C), wv(C, A(1));
    if (has_weight)
      for (int64_t c = 0; c < C; ++c) wv[c] = load<A>(weight[c]);
    A* mine = acc.data() + size_t(thread_id()) * size_t(stride);
    A* acc_w = mine;
    A* acc_shift = mine + C;
    A* acc_scale = acc_shift + p.B * C;
    A* acc_gate = acc_scale + p.B * C;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / p.L, l = r % p.L;
      A* __restrict gxr = gx.data();
      if (norm) {
        const T* x = row<T>(p.x, b, l);
        const T* go = row<T>(p.grad_out, b, l);
        const M* sc = row<M>(p.scale, b, l);
        A* __restrict xv = xr.data();
        A* __restrict xh = xhat.data();
        A* __restrict n = nrm.data();
        A* __restrict g = gbuf.data();
        A* __restrict a = abuf.data();
        A* __restrict d = gn.data();
        const A* __restrict w = wv.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) xv[c] = load<A>(x[c]);
        const A rinv = normalise<A>(p.kind, xv, xh, C, p.eps);
        A dot = 0, sum_d = 0;
#pragma omp simd reduction(+ : dot, sum_d)
        for (int64_t c = 0; c < C; ++c) {
          g[c] = load<A>(go[c]);
          a[c] = A(1) + load<A>(sc[c]);
          n[c] = round_to<T>(xh[c]);
          d[c] = g[c] * a[c] * w[c];  // d out / d xhat
          dot += d[c] * xh[c];
          sum_d += d[c];
        }
        if (has_weight) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) acc_w[c] += g[c] * a[c] * n[c];
        }
        if (sum_shift) {
          A* __restrict acc_b = acc_shift + b * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) acc_b[c] += g[c];
        } else {
          M* gsh = static_cast<M*>(p.grad_shift) + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gsh[c] = store<M>(g[c]);
        }
        if (sum_scale) {
          A* __restrict acc_b = acc_scale + b * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) acc_b[c] += g[c] * n[c] * w[c];
        } else {
          M* gsc = static_cast<M*>(p.grad_scale) + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gsc[c] = store<M>(g[c] * n[c] * w[c]);
        }
        dot /= A(C);
        const A mean_d = p.kind == NormKind::layer ? sum_d / A(C) : A(0);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) gxr[c] = rinv * (d[c] - mean_d - xh[c] * dot);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) gxr[c] = A(0);
      }
      T* grad_x = static_cast<T*>(p.grad_x) + r * C;
      if (p.residual) {
        if (p.grad_x_out.ptr) {
          const T* gxo = row<T>(p.grad_x_out, b, l);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gxr[c] += load<A>(gxo[c]);
        }
        const T* y = row<T>(p.y, b, l);
        const M* gate = row<M>(p.gate, b, l);
        T* grad_y = static_cast<T*>(p.grad_y) + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          grad_x[c] = store<T>(gxr[c]);
          grad_y[c] = store<T>(gxr[c] * load<A>(gate[c]));
        }
        if (sum_gate) {
          A* __restrict acc_b = acc_gate + b * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) acc_b[c] += gxr[c] * load<A>(y[c]);
        } else {
          M* ggate = static_cast<M*>(p.grad_gate) + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) ggate[c] = store<M>(gxr[c] * load<A>(y[c]));
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) grad_x[c] = store<T>(gxr[c]);
      }
    }
  }

  // Sum the per-thread accumulators in thread order (deterministic).
  auto reduce_into = [&](int64_t offset, int64_t n, auto* out) {
    using O = std::remove_pointer_t<decltype(out)>;
    for (int64_t i = 0; i < n; ++i) {
      A s = 0;
      for (int t = 0; t < threads; ++t) s += acc[size_t(t) * size_t(stride) + size_t(offset + i)];
      out[i] = store<O>(s);
    }
  };
  if (norm && has_weight) reduce_into(0, C, static_cast<W*>(p.grad_weight));
  if (sum_shift) reduce_into(C, p.B * C, static_cast<M*>(p.grad_shift));
  if (sum_scale) reduce_into(C + p.B * C, p.B * C, static_cast<M*>(p.grad_scale));
  if (sum_gate) reduce_into(C + 2 * p.B * C, p.B * C, static_cast<M*>(p.grad_gate));
}

}  // namespace

// One instantiation per supported (x, weight, modulation) dtype triple.
template <class P, class Fn>
void dispatch(const P& p, Fn&& fn) {
  const bool ok = dispatch_x_w_m<bool>(p.x_dtype, p.w_dtype, p.mod_dtype, false, [&](auto t, auto w, auto m) {
    fn(t, w, m);
    return true;
  });
  if (!ok) throw std::invalid_argument("norm_modulate: unsupported dtype combination");
}

void norm_modulate_forward(const NormModulateForward& p) {
  dispatch(p, [&](auto t, auto w, auto m) { forward_impl<decltype(t), decltype(w), decltype(m)>(p); });
}
void norm_modulate_backward(const NormModulateBackward& p) {
  dispatch(p, [&](auto t, auto w, auto m) { backward_impl<decltype(t), decltype(w), decltype(m)>(p); });
}

}  // namespace cpu
}  // namespace ddt

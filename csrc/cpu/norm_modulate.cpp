// CPU kernels for the fused norm + modulate family (see ddt/norm_modulate.h).
// Rows run in parallel (OpenMP, static schedule); reductions over rows
// (weight gradient, per-sample modulation gradients) use per-thread
// accumulators summed in thread order, so results are deterministic for a
// given thread count.
#include "ddt/norm_modulate.h"

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
    std::vector<A> xr(C), xhat(C), gn(C), gx(C);
    A* mine = acc.data() + size_t(thread_id()) * size_t(stride);
    A* acc_w = mine;
    A* acc_shift = mine + C;
    A* acc_scale = acc_shift + p.B * C;
    A* acc_gate = acc_scale + p.B * C;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / p.L, l = r % p.L;
      for (int64_t c = 0; c < C; ++c) gx[c] = A(0);
      if (norm) {
        const T* x = row<T>(p.x, b, l);
        for (int64_t c = 0; c < C; ++c) xr[c] = load<A>(x[c]);
        const A rinv = normalise<A>(p.kind, xr.data(), xhat.data(), C, p.eps);
        const T* go = row<T>(p.grad_out, b, l);
        const M* sc = row<M>(p.scale, b, l);
        M* gsh = sum_shift ? nullptr : static_cast<M*>(p.grad_shift) + r * C;
        M* gsc = sum_scale ? nullptr : static_cast<M*>(p.grad_scale) + r * C;
        A dot = 0, mean_gn = 0;
        for (int64_t c = 0; c < C; ++c) {
          const A g = load<A>(go[c]);
          const A n = round_to<T>(xhat[c]);
          const A w = has_weight ? load<A>(weight[c]) : A(1);
          const A a = A(1) + load<A>(sc[c]);
          const A gnw = g * a;  // d out / d (n * w)
          if (has_weight) acc_w[c] += gnw * n;
          if (sum_shift) acc_shift[b * C + c] += g; else gsh[c] = store<M>(g);
          if (sum_scale) acc_scale[b * C + c] += g * n * w; else gsc[c] = store<M>(g * n * w);
          gn[c] = gnw * w;  // d out / d xhat
          dot += gn[c] * xhat[c];
          mean_gn += gn[c];
        }
        dot /= A(C);
        mean_gn = p.kind == NormKind::layer ? mean_gn / A(C) : A(0);
        for (int64_t c = 0; c < C; ++c) gx[c] = rinv * (gn[c] - mean_gn - xhat[c] * dot);
      }
      T* grad_x = static_cast<T*>(p.grad_x) + r * C;
      if (p.residual) {
        const T* gxo = p.grad_x_out.ptr ? row<T>(p.grad_x_out, b, l) : nullptr;
        const T* y = row<T>(p.y, b, l);
        const M* gate = row<M>(p.gate, b, l);
        T* grad_y = static_cast<T*>(p.grad_y) + r * C;
        M* ggate = sum_gate ? nullptr : static_cast<M*>(p.grad_gate) + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const A g = gx[c] + (gxo ? load<A>(gxo[c]) : A(0));
          grad_x[c] = store<T>(g);
          grad_y[c] = store<T>(g * load<A>(gate[c]));
          const A gg = g * load<A>(y[c]);
          if (sum_gate) acc_gate[b * C + c] += gg; else ggate[c] = store<M>(gg);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) grad_x[c] = store<T>(gx[c]);
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

// One instantiation per supported (x, weight, modulation) dtype triple.
template <template <class, class, class> class Fn, class P>
void dispatch(const P& p) {
  const DType t = p.x_dtype, w = p.w_dtype, m = p.mod_dtype;
  auto is = [](DType d, DType e) { return d == e; };
  if (is(t, DType::f32) && is(w, DType::f32) && is(m, DType::f32)) return Fn<float, float, float>::run(p);
  if (is(t, DType::f64) && is(w, DType::f64) && is(m, DType::f64)) return Fn<double, double, double>::run(p);
  if (is(t, DType::bf16)) {
    if (is(w, DType::bf16) && is(m, DType::bf16)) return Fn<bf16_t, bf16_t, bf16_t>::run(p);
    if (is(w, DType::f32) && is(m, DType::bf16)) return Fn<bf16_t, float, bf16_t>::run(p);
    if (is(w, DType::f32) && is(m, DType::f32)) return Fn<bf16_t, float, float>::run(p);
    if (is(w, DType::bf16) && is(m, DType::f32)) return Fn<bf16_t, bf16_t, float>::run(p);
  }
  if (is(t, DType::f16)) {
    if (is(w, DType::f16) && is(m, DType::f16)) return Fn<f16_t, f16_t, f16_t>::run(p);
    if (is(w, DType::f32) && is(m, DType::f16)) return Fn<f16_t, float, f16_t>::run(p);
    if (is(w, DType::f32) && is(m, DType::f32)) return Fn<f16_t, float, float>::run(p);
    if (is(w, DType::f16) && is(m, DType::f32)) return Fn<f16_t, f16_t, float>::run(p);
  }
  throw std::invalid_argument("norm_modulate: unsupported dtype combination");
}

template <class T, class W, class M>
struct Forward {
  static void run(const NormModulateForward& p) { forward_impl<T, W, M>(p); }
};
template <class T, class W, class M>
struct Backward {
  static void run(const NormModulateBackward& p) { backward_impl<T, W, M>(p); }
};

}  // namespace

void norm_modulate_forward(const NormModulateForward& p) { dispatch<Forward>(p); }
void norm_modulate_backward(const NormModulateBackward& p) { dispatch<Backward>(p); }

}  // namespace cpu
}  // namespace ddt

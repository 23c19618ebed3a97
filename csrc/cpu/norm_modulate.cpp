// CPU kernels for the fused norm + modulate family (see ddt/norm_modulate.h).
// Each OpenMP thread takes one contiguous range of rows; reductions over rows
// (weight gradient, per-sample modulation gradients) use per-thread
// accumulators summed in thread order, so results are deterministic for a
// given thread count.
#include "ddt/norm_modulate.h"

#include "cpu_helpers.h"
#include "ddt/dtype_dispatch.h"

#include <stdexcept>
#include <type_traits>
#include <vector>

namespace ddt {
namespace cpu {
namespace {

template <class T>
const T* row(const Rows& r, int64_t b, int64_t l) {
  return static_cast<const T*>(r.ptr) + b * r.stride_b + l * r.stride_l;
}
template <class T>
T* row(const MutRows& r, int64_t b, int64_t l) {
  return static_cast<T*>(r.ptr) + b * r.stride_b + l * r.stride_l;
}

// Software prefetch of one row of a per-token modulation operand (shift,
// scale, gate). These are chunk(6, -1) views of a [B, L, 6C] tensor, so every
// row starts a new stream 6C elements past the last, and the hardware
// prefetcher, which stops at 4 KiB page boundaries, barely trains on a row
// shorter than a page before it ends. Measured on a Zen 3 at 1024 tokens:
// bfloat16 rows (1.5-2.3 KiB) 1.1-1.3x faster forward and backward; float32
// rows of 3-4.5 KiB unchanged, so longer rows are left to the hardware.
struct RowPrefetch {
  const char* base = nullptr;  // null: off
  int64_t stride_b = 0, stride_l = 0, L = 1, bytes = 0;

  template <class M>
  static RowPrefetch of(const Rows& r, int64_t L, int64_t C) {
    constexpr int64_t kPageBytes = 4096;
    RowPrefetch f;
    if (r.ptr && r.per_token() && C * int64_t(sizeof(M)) < kPageBytes)
      f = {static_cast<const char*>(r.ptr), r.stride_b * int64_t(sizeof(M)), r.stride_l * int64_t(sizeof(M)), L,
           C * int64_t(sizeof(M))};
    return f;
  }
  // Row `rr` of the flattened [B * L] rows; rows past `end` are skipped.
  void operator()(int64_t rr, int64_t end) const {
    if (!base || rr >= end) return;
    prefetch_lines(base + (rr / L) * stride_b + (rr % L) * stride_l, bytes);
  }
};

// The sum of (x - mu)^2 over a row.
template <class A>
A sum_sq_dev(const A* __restrict xr, int64_t C, A mu) {
  A sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < C; ++c) {
    const A d = xr[c] - mu;
    sq += d * d;
  }
  return sq;
}

// Mean (0 for RMSNorm) and 1/std of a row, from the row's sum and sum of
// squares; LayerNorm takes a second pass for the variance (about the mean:
// E[x^2] - mean^2 would cancel).
template <class A>
void finish_stats(NormKind kind, const A* __restrict xr, int64_t C, A sum, A sq, double eps, A& mean, A& rinv) {
  mean = 0;
  if (kind == NormKind::layer) {
    mean = sum / A(C);
    sq = sum_sq_dev<A>(xr, C, mean);
  }
  rinv = nm::inv_std<A>(sq / A(C), eps);
}

// Pass 1 over a row of x: its values in the accumulation type A, read in
// place when x already is A, else widened into buf as they are read.
template <class T>
struct WidenRow {
  using A = acc_t<T>;
  static constexpr bool kInPlace = std::is_same_v<T, A>;
  const T* __restrict x;
  A* __restrict buf;

  const A* values() const {
    if constexpr (kInPlace) {
      return reinterpret_cast<const A*>(x);
    } else {
      return buf;
    }
  }
  A operator()(int64_t c) const {
    if constexpr (kInPlace) {
      return x[c];
    } else {
      buf[c] = load<A>(x[c]);
      return buf[c];
    }
  }
};

// Adds value f to the one row sum norm kind K needs: the sum of squares for
// RMSNorm, the sum for LayerNorm (whose variance finish_stats takes about the mean).
template <NormKind K, class A>
inline void add_to_sums(A f, A& sum, A& sq) {
  if constexpr (K == NormKind::rms) sq += f * f;
  else sum += f;
}

// Pass 1 alone over a row: first(c) for every c, with the row sum(s) kind K
// needs of the values it returns.
template <NormKind K, class A, class First>
void first_pass(int64_t C, const First& first, A& sum, A& sq) {
  A s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
  for (int64_t c = 0; c < C; ++c) add_to_sums<K>(first(c), s, q);
  sum = s;
  sq = q;
}

// with_flags(fn, a, b, ...) calls fn(std::bool_constant<a>{}, ...): runtime
// flags as compile-time ones, so the row loops below carry no branches (a
// branch in a loop that stores 16-bit values stops it vectorising).
template <class Fn>
void with_flags(Fn&& fn) {
  fn();
}
template <class Fn, class... Rest>
void with_flags(Fn&& fn, bool first, Rest... rest) {
  if (first) with_flags([&](auto... f) { fn(std::true_type{}, f...); }, rest...);
  else with_flags([&](auto... f) { fn(std::false_type{}, f...); }, rest...);
}

// with_kind(k, fn, flags...) calls fn(kind_c<k>{}, std::bool_constant<flag>{}...):
// the norm kind as a compile-time value too (RMSNorm skips the zero mean and
// the row sums it does not need, the weight-free LayerNorm its multiplies by one).
template <NormKind K>
using kind_c = std::integral_constant<NormKind, K>;
template <class Fn, class... Flags>
void with_kind(NormKind k, Fn&& fn, Flags... flags) {
  auto as = [&](auto kind) { with_flags([&](auto... f) { fn(kind, f...); }, flags...); };
  switch (k) {
    case NormKind::rms: return as(kind_c<NormKind::rms>{});
    case NormKind::layer: return as(kind_c<NormKind::layer>{});
    case NormKind::none: return as(kind_c<NormKind::none>{});
  }
}

// The forward's two passes over a row, element by element, so that one loop
// can run pass 2 of row r together with pass 1 of row r + 1.
// T, W, M: the element types read and written.
template <class T, class W, class M, bool kResidual>
struct ForwardRow {
  using A = acc_t<T>;
  // Pass 1 operands: x (and y, gate, x_out for the residual form); buf
  // receives the row to normalise unless x is read in place.
  WidenRow<T> widen;
  const T* __restrict y;
  const M* __restrict gate;
  T* __restrict x_out;
  // Pass 2 operands.
  const A* __restrict xrow;
  const M* __restrict shift;
  const M* __restrict scale;
  T* __restrict out;
  A mean, rinv;

  ForwardRow(const NormModulateForward& p, int64_t r, A* buffer) {
    const int64_t b = r / p.L, l = r % p.L;
    widen = {row<T>(p.x, b, l), buffer};
    y = kResidual ? row<T>(p.y, b, l) : nullptr;
    gate = kResidual ? row<M>(p.gate, b, l) : nullptr;
    x_out = kResidual ? row<T>(p.x_out, b, l) : nullptr;
    xrow = kResidual ? buffer : widen.values();
    const bool norm = p.kind != NormKind::none;
    shift = norm ? row<M>(p.shift, b, l) : nullptr;
    scale = norm ? row<M>(p.scale, b, l) : nullptr;
    out = norm ? row<T>(p.out, b, l) : nullptr;
  }

  // Pass 1 at c: the value the norm reads (x' as stored, or x widened).
  A first(int64_t c) const {
    if constexpr (kResidual) {
      const T v = store<T>(nm::residual<A>(load<A>(widen.x[c]), load<A>(gate[c]), load<A>(y[c])));
      x_out[c] = v;
      widen.buf[c] = load<A>(v);
      return widen.buf[c];
    } else {
      return widen(c);
    }
  }

  // Pass 2 at c: round the normalised value to T (the spec's rounding point),
  // modulate, store. K: RMSNorm skips the zero mean, the weight-free
  // LayerNorm the multiply by one (same values).
  template <NormKind K>
  void second(int64_t c, const A* __restrict w) const {
    const A n = round_to<T>((K == NormKind::rms ? xrow[c] : xrow[c] - mean) * rinv);
    out[c] = store<T>(nm::modulate<A>(n, K == NormKind::rms ? w[c] : A(1), load<A>(shift[c]), load<A>(scale[c])));
  }
};

// Rows [r0, r1) of p, by the calling thread. Pass 2 of row r (modulate and
// store) runs in the same loop as pass 1 of row r + 1 (load, residual,
// statistics): a pass over one row alone keeps too few memory streams in
// flight to reach DRAM bandwidth on large inputs. xbuf: 2 * C scratch; w: the
// weight row in the accumulation type (ones for the weight-free LayerNorm).
template <class T, class W, class M>
void forward_rows(const NormModulateForward& p, int64_t r0, int64_t r1, acc_t<T>* xbuf, const acc_t<T>* __restrict w) {
  using A = acc_t<T>;
  const int64_t C = p.C;
  const bool norm = p.kind != NormKind::none;
  const RowPrefetch shift_ahead = RowPrefetch::of<M>(p.shift, p.L, C);
  const RowPrefetch scale_ahead = RowPrefetch::of<M>(p.scale, p.L, C);
  const RowPrefetch gate_ahead = p.residual ? RowPrefetch::of<M>(p.gate, p.L, C) : RowPrefetch{};
  with_kind(
      p.kind,
      [&](auto kind, auto residual_c) {
        using Row = ForwardRow<T, W, M, decltype(residual_c)::value>;
        constexpr NormKind K = decltype(kind)::value;
        if (r0 >= r1) return;
        Row cur(p, r0, xbuf);
        A sum = 0, sq = 0;
        first_pass<K>(C, [&](int64_t c) { return cur.first(c); }, sum, sq);
        for (int64_t r = r0 + 1; r < r1 && !norm; ++r) {  // x' alone: pass 1 only
          const Row next(p, r, xbuf);
          first_pass<K>(C, [&](int64_t c) { return next.first(c); }, sum, sq);
        }
        for (int64_t r = r0; r < r1 && norm; ++r) {
          // (the last row of the range redoes its own pass 1 into the other
          // buffer, which keeps this loop free of branches)
          Row next(p, r + 1 < r1 ? r + 1 : r, xbuf + ((r + 1 - r0) & 1) * C);
          // the operands of the next iteration that the hardware prefetcher misses
          shift_ahead(r + 1, r1);
          scale_ahead(r + 1, r1);
          gate_ahead(r + 2, r1);
          finish_stats<A>(K, cur.xrow, C, sum, sq, p.eps, cur.mean, cur.rinv);
          A s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
          for (int64_t c = 0; c < C; ++c) {
            cur.template second<K>(c, w);
            add_to_sums<K>(next.first(c), s, q);
          }
          sum = s;
          sq = q;
          cur = next;
        }
      },
      p.residual);
}

// One contiguous range of rows per thread.
template <class T, class W, class M>
void forward_impl(const NormModulateForward& p) {
  using A = acc_t<T>;
#pragma omp parallel
  {
    const auto [r0, r1] = thread_rows(p.B * p.L);
    std::vector<A> xbuf(2 * p.C);
    const std::vector<A> w = widen_row<W, A>(p.weight, p.C);
    forward_rows<T, W, M>(p, r0, r1, xbuf.data(), w.data());
  }
}

// Either adds v into a per-thread sum over rows (per-sample operand) or stores
// it as this row's gradient (per-token operand).
template <class Sum, class A, class O>
inline void sum_or_store(A* __restrict acc, O* __restrict out, int64_t c, A v) {
  if constexpr (Sum::value) {
    acc[c] += v;
  } else {
    out[c] = store<O>(v);
  }
}

// Per-thread sums over rows: the weight gradient [C], and the per-sample
// operands' gradients, sample b's row at shift + b * C (and so on).
template <class A>
struct RowSums {
  A* w;
  A* shift;
  A* scale;
  A* gate;
};

// Pass 2 of a row of the backward: d out / d xhat (into d) with its two row
// sums, and the gradients of the weight, shift and scale (summed when per
// sample: acc_*; gsh/gsc are row r's when per token). kRms: RMSNorm (mean 0,
// weight w), else the weight-free LayerNorm. A function of its own: with
// every operand a parameter, GCC vectorises it for every flag combination.
template <class T, class M, bool kRms, bool kHasW, bool kSumShift, bool kSumScale, class A = acc_t<T>>
void backward_pass2(int64_t C, const A* __restrict x, const T* __restrict go, const M* __restrict sc,
                    const A* __restrict w, A mean, A rinv, A* __restrict d, A* __restrict acc_w, A* __restrict acc_sh,
                    A* __restrict acc_sc, M* __restrict gsh, M* __restrict gsc, A& dot_out, A& sum_d_out) {
  using SumShift = std::bool_constant<kSumShift>;
  using SumScale = std::bool_constant<kSumScale>;
  A dot = 0, sum_d = 0;
#pragma omp simd reduction(+ : dot, sum_d)
  for (int64_t c = 0; c < C; ++c) {
    const A xh = (kRms ? x[c] : x[c] - mean) * rinv;
    const A n = round_to<T>(xh);  // the forward's rounding point
    const A g = load<A>(go[c]);
    const A ga = g * (A(1) + load<A>(sc[c]));
    const A dc = kRms ? ga * w[c] : ga;
    d[c] = dc;
    dot += dc * xh;
    if constexpr (!kRms) sum_d += dc;
    if constexpr (kHasW) acc_w[c] += ga * n;
    sum_or_store<SumShift>(acc_sh, gsh, c, g);
    sum_or_store<SumScale>(acc_sc, gsc, c, kRms ? g * n * w[c] : g * n);
  }
  dot_out = dot;
  sum_d_out = sum_d;
}

// Rows [r0, r1) of p, by the calling thread: gradients of per-token operands
// stored, of the weight and per-sample operands added into sums. xbuf: 2 * C
// and dbuf: C scratch; w: the weight row (ones without one).
template <class T, class W, class M>
void backward_rows(const NormModulateBackward& p, int64_t r0, int64_t r1, RowSums<acc_t<T>> sums, acc_t<T>* xbuf,
                   acc_t<T>* dbuf, const acc_t<T>* __restrict w) {
  using A = acc_t<T>;
  const int64_t C = p.C;
  const bool norm = p.kind != NormKind::none;
  const bool has_weight = p.weight != nullptr;
  const bool sum_shift = norm && !p.shift.per_token();
  const bool sum_scale = norm && !p.scale.per_token();
  const bool sum_gate = p.residual && !p.gate.per_token();
  const RowPrefetch scale_ahead = norm ? RowPrefetch::of<M>(p.scale, p.L, C) : RowPrefetch{};
  const RowPrefetch gate_ahead = p.residual ? RowPrefetch::of<M>(p.gate, p.L, C) : RowPrefetch{};
  A* __restrict acc_w = sums.w;
  // As in the forward: pass 1 of row r + 1 runs in the same loop as pass 3 of row r.
  // Row r of x, widened into the buffer of its parity within the range.
  auto widen_at = [&](int64_t r, int64_t slot) {
    return WidenRow<T>{row<T>(p.x, r / p.L, r % p.L), xbuf + ((slot - r0) & 1) * C};
  };
  A sum = 0, sq = 0;  // pass 1 sums of the current row
  if (norm && r0 < r1)
    with_kind(p.kind, [&](auto kind) { first_pass<decltype(kind)::value>(C, widen_at(r0, r0), sum, sq); });
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.L, l = r % p.L;
    // (the last row of the range re-reads itself into the other buffer,
    // which keeps this loop free of branches)
    const WidenRow<T> next = widen_at(r + 1 < r1 ? r + 1 : r, r + 1);
    const A* __restrict xrow = widen_at(r, r).values();
    scale_ahead(r + 1, r1);  // (see RowPrefetch)
    gate_ahead(r + 1, r1);
    A mean = 0, rinv = 0, dot = 0, mean_d = 0;
    A* __restrict d = dbuf;
    if (norm) {
      finish_stats<A>(p.kind, xrow, C, sum, sq, p.eps, mean, rinv);
      // Pass 2: d out / d xhat, its two row reductions, and the gradients of
      // the weight, shift and scale.
      const T* go = row<T>(p.grad_out, b, l);
      const M* sc = row<M>(p.scale, b, l);
      A sum_d = 0;
      M* gsh = static_cast<M*>(p.grad_shift) + (sum_shift ? 0 : r * C);
      M* gsc = static_cast<M*>(p.grad_scale) + (sum_scale ? 0 : r * C);
      with_flags(
          [&](auto layer_c, auto has_w, auto sum_sh, auto sum_sc) {
            backward_pass2<T, M, !decltype(layer_c)::value, decltype(has_w)::value, decltype(sum_sh)::value,
                           decltype(sum_sc)::value>(C, xrow, go, sc, w, mean, rinv, d, acc_w, sums.shift + b * C,
                                                    sums.scale + b * C, gsh, gsc, dot, sum_d);
          },
          p.kind == NormKind::layer, has_weight, sum_shift, sum_scale);
      dot /= A(C);
      mean_d = p.kind == NormKind::layer ? sum_d / A(C) : A(0);
    }
    // Pass 3: grad_x (plus the gradient that reached x' directly), and the
    // residual's grad_y and grad_gate; with pass 1 of the next row.
    T* __restrict grad_x = static_cast<T*>(p.grad_x) + r * C;
    const T* gxo = p.residual && p.grad_x_out.ptr ? row<T>(p.grad_x_out, b, l) : nullptr;
    const T* y = p.residual ? row<T>(p.y, b, l) : nullptr;
    const M* gate = p.residual ? row<M>(p.gate, b, l) : nullptr;
    T* __restrict grad_y = p.residual ? static_cast<T*>(p.grad_y) + r * C : nullptr;
    // The row's scalars and pointers are captured by value: captured by
    // reference, a float could alias the float stores in the loop, and GCC
    // kept some flag combinations scalar (bfloat16 backward 4x slower).
    with_kind(
        p.kind,
        [&, mean, rinv, mean_d, dot, xrow, d, next](auto kind, auto residual_c, auto has_gxo, auto sum_g) {
          constexpr NormKind K = decltype(kind)::value;
          using SumGate = decltype(sum_g);
          A* __restrict acc_g = sums.gate + b * C;
          M* __restrict ggate = static_cast<M*>(p.grad_gate) + (SumGate::value ? 0 : r * C);
          A s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
          for (int64_t c = 0; c < C; ++c) {
            A gx = 0;
            if constexpr (K == NormKind::rms) gx = rinv * (d[c] - xrow[c] * rinv * dot);  // (mean, mean_d: 0)
            if constexpr (K == NormKind::layer) gx = rinv * (d[c] - mean_d - (xrow[c] - mean) * rinv * dot);
            if constexpr (decltype(has_gxo)::value) gx += load<A>(gxo[c]);
            grad_x[c] = store<T>(gx);
            if constexpr (decltype(residual_c)::value) {
              grad_y[c] = store<T>(gx * load<A>(gate[c]));
              sum_or_store<SumGate>(acc_g, ggate, c, gx * load<A>(y[c]));
            }
            if constexpr (K != NormKind::none) add_to_sums<K>(next(c), s, q);  // (next(c) widens T rows: every c)
          }
          sum = s;
          sq = q;
        },
        p.residual, gxo != nullptr, sum_gate);
  }
}

// The backward's sums over rows, one block per thread, added up in thread
// order at the end (deterministic for a thread count).
template <class A>
struct ThreadSums {
  int64_t C, B, stride;
  int threads;
  std::vector<A> acc;

  ThreadSums(const NormModulateBackward& p)
      : C(p.C), B(p.B), stride(p.C * (1 + 3 * p.B)), threads(num_threads()),
        acc(size_t(threads) * size_t(stride), A(0)) {}
  RowSums<A> mine() {
    A* m = acc.data() + size_t(thread_id()) * size_t(stride);
    return {m, m + C, m + C + B * C, m + C + 2 * B * C};
  }
  template <class W, class M>
  void store(const NormModulateBackward& p) const {
    auto reduce_into = [&](int64_t offset, int64_t n, auto* out) {
      using O = std::remove_pointer_t<decltype(out)>;
      for (int64_t i = 0; i < n; ++i) {
        A s = 0;
        for (int t = 0; t < threads; ++t) s += acc[size_t(t) * size_t(stride) + size_t(offset + i)];
        out[i] = ddt::store<O>(s);
      }
    };
    const bool norm = p.kind != NormKind::none;
    if (norm && p.weight != nullptr) reduce_into(0, C, static_cast<W*>(p.grad_weight));
    if (norm && !p.shift.per_token()) reduce_into(C, B * C, static_cast<M*>(p.grad_shift));
    if (norm && !p.scale.per_token()) reduce_into(C + B * C, B * C, static_cast<M*>(p.grad_scale));
    if (p.residual && !p.gate.per_token()) reduce_into(C + 2 * B * C, B * C, static_cast<M*>(p.grad_gate));
  }
};

template <class T, class W, class M>
void backward_impl(const NormModulateBackward& p) {
  using A = acc_t<T>;
  ThreadSums<A> sums(p);
#pragma omp parallel
  {
    // Row buffers (L1-resident for DDT widths): two for widened rows and d out / d xhat.
    std::vector<A> xbuf(2 * p.C), dbuf(p.C);
    const std::vector<A> w = widen_row<W, A>(p.weight, p.C);
    const auto [r0, r1] = thread_rows(p.B * p.L);
    backward_rows<T, W, M>(p, r0, r1, sums.mine(), xbuf.data(), dbuf.data(), w.data());
  }
  sums.template store<W, M>(p);
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

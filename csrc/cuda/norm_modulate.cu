// CUDA kernels for the fused norm + modulate family (see ddt/norm_modulate.h).
//
// Forward: one warp per row. When every operand allows 16-byte packs and the
// row fits in registers (the model's case), forward_packed_kernel reads each
// element from memory once, with packed loads issued before any reduction;
// otherwise forward_kernel reads the row twice (statistics, then output), the
// second read mostly from L1/L2. Both compute the same values.
// Backward: (1) a warp per row computes grad_x / grad_y and every per-token
// gradient, and saves each row's mean and 1/std; (2) a column kernel sums the
// row-reduced gradients (weight; per-sample shift/scale/gate) over chunks of
// rows with coalesced reads; (3) a small kernel adds the chunks up in a fixed
// order. No atomics: results are deterministic.
#include <cuda_runtime.h>

#include <cstdlib>
#include <type_traits>

#include "ddt/dtype_dispatch.h"
#include "ddt/norm_modulate.h"
#include "pack.cuh"

namespace ddt {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;  // warps per block in the row kernels
constexpr int kColThreads = 128;  // columns per block in the column kernel
constexpr int kRowsPerChunk = 32;

template <class A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T>
__device__ __forceinline__ const T* row_ptr(const Rows& r, int64_t b, int64_t l) {
  return static_cast<const T*>(r.ptr) + b * r.stride_b + l * r.stride_l;
}

// Row statistics of the (already formed) normalised input: mean (0 for RMS) and 1/std.
template <class T, class A>
__device__ void row_stats(NormKind kind, const T* x, int64_t C, double eps, int lane, A& mean, A& rinv) {
  mean = A(0);
  if (kind == NormKind::layer) {
    A s = 0;
    for (int64_t c = lane; c < C; c += kWarp) s += load<A>(x[c]);
    mean = warp_sum(s) / A(C);
  }
  A sq = 0;
  for (int64_t c = lane; c < C; c += kWarp) {
    const A d = load<A>(x[c]) - mean;
    sq += d * d;
  }
  rinv = nm::inv_std<A>(warp_sum(sq) / A(C), eps);
}

template <class T, class W, class M>
__global__ void forward_kernel(NormModulateForward p) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= p.B * p.L) return;
  const int64_t b = r / p.L, l = r % p.L, C = p.C;
  const T* x = row_ptr<T>(p.x, b, l);
  if (p.residual) {
    const T* y = row_ptr<T>(p.y, b, l);
    const M* g = row_ptr<M>(p.gate, b, l);
    T* xo = static_cast<T*>(p.x_out.ptr) + b * p.x_out.stride_b + l * p.x_out.stride_l;
    for (int64_t c = lane; c < C; c += kWarp)
      xo[c] = store<T>(nm::residual<A>(load<A>(x[c]), load<A>(g[c]), load<A>(y[c])));
    x = xo;  // each lane re-reads only what it wrote itself
  }
  if (p.kind == NormKind::none) return;
  A mean, rinv;
  row_stats<T, A>(p.kind, x, C, p.eps, lane, mean, rinv);
  const M* sh = row_ptr<M>(p.shift, b, l);
  const M* sc = row_ptr<M>(p.scale, b, l);
  const W* weight = static_cast<const W*>(p.weight);
  const bool has_weight = weight != nullptr;
  T* out = static_cast<T*>(p.out.ptr) + b * p.out.stride_b + l * p.out.stride_l;
  for (int64_t c = lane; c < C; c += kWarp) {
    // The second pass re-forms xr the way the first did (residual rows were
    // re-read from x_out, so they are already rounded to T).
    const A xr = load<A>(x[c]);
    const A n = round_to<T>((xr - mean) * rinv);
    const A w = has_weight ? load<A>(weight[c]) : A(1);
    out[c] = store<T>(nm::modulate<A>(n, w, load<A>(sh[c]), load<A>(sc[c])));
  }
}

// G elements per pack (16 bytes of x), V packs per lane: a row of up to
// 32 * V * G elements lives in registers.
// kPrefetch: issue the shift/scale loads before the row reduction (kept
// packed in registers) instead of after it, so no warp waits on them
// after its reduction; costs registers (fewer resident warps).
template <class T, class W, class M, int V, bool kPrefetch>
__global__ void __launch_bounds__(kRowsPerBlock* kWarp) forward_packed_kernel(NormModulateForward p) {
  using A = acc_t<T>;
  constexpr int G = 16 / int(sizeof(T));
  const int lane = threadIdx.x % kWarp;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= p.B * p.L) return;
  const int64_t b = r / p.L, l = r % p.L, C = p.C;
  A xr[V][G];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t c = (int64_t(v) * kWarp + lane) * G;
    if (c < C) load_pack<G>(row_ptr<T>(p.x, b, l) + c, xr[v]);
  }
  if (p.residual) {
    T* xo = static_cast<T*>(p.x_out.ptr) + b * p.x_out.stride_b + l * p.x_out.stride_l;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t c = (int64_t(v) * kWarp + lane) * G;
      if (c >= C) continue;
      A y[G], g[G];
      load_pack<G>(row_ptr<T>(p.y, b, l) + c, y);
      load_pack<G>(row_ptr<M>(p.gate, b, l) + c, g);
#pragma unroll
      for (int j = 0; j < G; ++j) xr[v][j] = round_to<T>(nm::residual<A>(xr[v][j], g[j], y[j]));
      store_pack<G>(xo + c, xr[v]);  // exact: xr is already rounded to T
    }
  }
  if (p.kind == NormKind::none) return;
  RawPack<M, G> sh_raw[kPrefetch ? V : 1], sc_raw[kPrefetch ? V : 1];
  if constexpr (kPrefetch) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t c = (int64_t(v) * kWarp + lane) * G;
      if (c >= C) continue;
      load_raw<G>(row_ptr<M>(p.shift, b, l) + c, sh_raw[v]);
      load_raw<G>(row_ptr<M>(p.scale, b, l) + c, sc_raw[v]);
    }
  }
  A mean = 0;
  if (p.kind == NormKind::layer) {
    A s = 0;
#pragma unroll
    for (int v = 0; v < V; ++v)
      if ((int64_t(v) * kWarp + lane) * G < C)
#pragma unroll
        for (int j = 0; j < G; ++j) s += xr[v][j];
    mean = warp_sum(s) / A(C);
  }
  A sq = 0;
#pragma unroll
  for (int v = 0; v < V; ++v)
    if ((int64_t(v) * kWarp + lane) * G < C)
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const A d = xr[v][j] - mean;
        sq += d * d;
      }
  const A rinv = nm::inv_std<A>(warp_sum(sq) / A(C), p.eps);
  const W* weight = static_cast<const W*>(p.weight);
  T* out = static_cast<T*>(p.out.ptr) + b * p.out.stride_b + l * p.out.stride_l;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t c = (int64_t(v) * kWarp + lane) * G;
    if (c >= C) continue;
    A sh[G], sc[G], w[G];
    if constexpr (kPrefetch) {
      unpack<G>(sh_raw[v], sh);
      unpack<G>(sc_raw[v], sc);
    } else {
      load_pack<G>(row_ptr<M>(p.shift, b, l) + c, sh);
      load_pack<G>(row_ptr<M>(p.scale, b, l) + c, sc);
    }
    if (weight) {
      load_pack<G>(weight + c, w);
    } else {
#pragma unroll
      for (int j = 0; j < G; ++j) w[j] = A(1);
    }
    A o[G];
#pragma unroll
    for (int j = 0; j < G; ++j) o[j] = nm::modulate<A>(round_to<T>((xr[v][j] - mean) * rinv), w[j], sh[j], sc[j]);
    store_pack<G>(out + c, o);
  }
}

template <class T, int N, class R>
bool rows_packable(const R& r) {
  return r.ptr == nullptr || (pack_aligned<T, N>(r.ptr, r.stride_b) && pack_aligned<T, N>(r.ptr, r.stride_l));
}

// The packed forward keeps at most this many elements of a row per lane in
// registers (more would spill); longer rows take the scalar kernel.
constexpr int kMaxRegistersPerLane = 64;

// Packs per lane (template V) of the packed forward: exact for the model's
// widths (768 and 1152 in 16-bit: 3 and 5), rounded up otherwise.
constexpr int kPackCounts[] = {2, 3, 5, 8, 16};

// Packs per lane the packed forward needs for p (0: use the scalar kernel).
template <class T, class W, class M>
int forward_packs_per_lane(const NormModulateForward& p) {
  constexpr int G = 16 / int(sizeof(T));
  if (p.C % G != 0) return 0;
  const bool aligned = rows_packable<T, G>(p.x) && rows_packable<T, G>(p.y) && rows_packable<M, G>(p.gate) &&
                       rows_packable<M, G>(p.shift) && rows_packable<M, G>(p.scale) &&
                       rows_packable<T, G>(p.out) && rows_packable<T, G>(p.x_out) &&
                       (p.weight == nullptr || pack_aligned<W, G>(p.weight));
  if (!aligned) return 0;
  const int64_t per_lane = (p.C / G + kWarp - 1) / kWarp;
  for (int v : kPackCounts)
    if (per_lane <= v && v * G <= kMaxRegistersPerLane) return v;
  return 0;
}

struct Workspace {
  float* mean;      // [rows]
  float* rinv;      // [rows]
  float* partial;   // [4][B][chunks][C]: weight, shift, scale, gate
  int64_t chunks;
};

int64_t chunks_for(int64_t L) { return (L + kRowsPerChunk - 1) / kRowsPerChunk; }

Workspace carve(const NormModulateBackward& p, void* base) {
  Workspace w;
  const int64_t rows = p.B * p.L;
  w.chunks = chunks_for(p.L);
  char* ptr = static_cast<char*>(base);
  w.mean = reinterpret_cast<float*>(ptr);
  ptr += ((rows * sizeof(float) + 255) / 256) * 256;
  w.rinv = reinterpret_cast<float*>(ptr);
  ptr += ((rows * sizeof(float) + 255) / 256) * 256;
  w.partial = reinterpret_cast<float*>(ptr);
  return w;
}

template <class T, class W, class M>
__global__ void backward_rows_kernel(NormModulateBackward p, Workspace ws) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= p.B * p.L) return;
  const int64_t b = r / p.L, l = r % p.L, C = p.C;
  const bool norm = p.kind != NormKind::none;
  const W* weight = static_cast<const W*>(p.weight);
  const bool has_weight = weight != nullptr;
  T* grad_x = static_cast<T*>(p.grad_x) + r * C;
  A mean = 0, rinv = 1, dot = 0, mean_gn = 0;
  const T* x = row_ptr<T>(p.x, b, l);
  const T* go = norm ? row_ptr<T>(p.grad_out, b, l) : nullptr;
  const M* sc = norm ? row_ptr<M>(p.scale, b, l) : nullptr;
  if (norm) {
    row_stats<T, A>(p.kind, x, C, p.eps, lane, mean, rinv);
    if (lane == 0) {
      ws.mean[r] = float(mean);
      ws.rinv[r] = float(rinv);
    }
    for (int64_t c = lane; c < C; c += kWarp) {
      const A xhat = (load<A>(x[c]) - mean) * rinv;
      const A w = has_weight ? load<A>(weight[c]) : A(1);
      const A gn = load<A>(go[c]) * (A(1) + load<A>(sc[c])) * w;
      dot += gn * xhat;
      mean_gn += gn;
    }
    dot = warp_sum(dot) / A(C);
    mean_gn = p.kind == NormKind::layer ? warp_sum(mean_gn) / A(C) : A(0);
  }
  const T* gxo = (p.residual && p.grad_x_out.ptr) ? row_ptr<T>(p.grad_x_out, b, l) : nullptr;
  for (int64_t c = lane; c < C; c += kWarp) {
    A g = gxo ? load<A>(gxo[c]) : A(0);
    if (norm) {
      const A xhat = (load<A>(x[c]) - mean) * rinv;
      const A w = has_weight ? load<A>(weight[c]) : A(1);
      const A gout = load<A>(go[c]);
      const A gn = gout * (A(1) + load<A>(sc[c])) * w;
      g += rinv * (gn - mean_gn - xhat * dot);
      if (p.shift.per_token()) static_cast<M*>(p.grad_shift)[r * C + c] = store<M>(gout);
      if (p.scale.per_token())
        static_cast<M*>(p.grad_scale)[r * C + c] = store<M>(gout * round_to<T>(xhat) * w);
    }
    grad_x[c] = store<T>(g);
    if (p.residual) {
      static_cast<T*>(p.grad_y)[r * C + c] = store<T>(g * load<A>(row_ptr<M>(p.gate, b, l)[c]));
      if (p.gate.per_token())
        static_cast<M*>(p.grad_gate)[r * C + c] = store<M>(g * load<A>(row_ptr<T>(p.y, b, l)[c]));
    }
  }
}

// grid: (ceil(C / kColThreads), B * chunks). Sums over the rows of one chunk
// of one sample; writes partial[q][b][chunk][c].
template <class T, class W, class M>
__global__ void backward_cols_kernel(NormModulateBackward p, Workspace ws) {
  using A = acc_t<T>;
  const int64_t c = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (c >= p.C) return;
  const int64_t b = blockIdx.y / ws.chunks, chunk = blockIdx.y % ws.chunks;
  const int64_t l0 = chunk * kRowsPerChunk, l1 = min(p.L, l0 + kRowsPerChunk);
  const bool norm = p.kind != NormKind::none;
  const W* weight = static_cast<const W*>(p.weight);
  const A w = weight ? load<A>(weight[c]) : A(1);
  A acc_w = 0, acc_shift = 0, acc_scale = 0, acc_gate = 0;
  for (int64_t l = l0; l < l1; ++l) {
    const int64_t r = b * p.L + l;
    if (norm) {
      const A g = load<A>(row_ptr<T>(p.grad_out, b, l)[c]);
      const A n = round_to<T>((load<A>(row_ptr<T>(p.x, b, l)[c]) - A(ws.mean[r])) * A(ws.rinv[r]));
      acc_w += g * (A(1) + load<A>(row_ptr<M>(p.scale, b, l)[c])) * n;
      acc_shift += g;
      acc_scale += g * n * w;
    }
    if (p.residual && !p.gate.per_token())
      acc_gate += load<A>(static_cast<const T*>(p.grad_x)[r * p.C + c]) * load<A>(row_ptr<T>(p.y, b, l)[c]);
  }
  const int64_t plane = p.B * ws.chunks * p.C, at = (b * ws.chunks + chunk) * p.C + c;
  ws.partial[0 * plane + at] = float(acc_w);
  ws.partial[1 * plane + at] = float(acc_shift);
  ws.partial[2 * plane + at] = float(acc_scale);
  ws.partial[3 * plane + at] = float(acc_gate);
}

// grid: (ceil(C / kColThreads), B + 1): rows b < B sum one sample's chunks
// (per-sample gradients); the last row sums everything (the weight).
template <class W, class M>
__global__ void backward_finish_kernel(NormModulateBackward p, Workspace ws) {
  const int64_t c = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (c >= p.C) return;
  const int64_t plane = p.B * ws.chunks * p.C;
  const bool norm = p.kind != NormKind::none;
  if (blockIdx.y == p.B) {
    if (!(norm && p.weight)) return;
    float s = 0.f;
    for (int64_t i = 0; i < p.B * ws.chunks; ++i) s += ws.partial[i * p.C + c];
    static_cast<W*>(p.grad_weight)[c] = store<W>(s);
    return;
  }
  const int64_t b = blockIdx.y;
  float sums[3] = {0.f, 0.f, 0.f};
  for (int64_t k = 0; k < ws.chunks; ++k)
    for (int q = 0; q < 3; ++q) sums[q] += ws.partial[(q + 1) * plane + (b * ws.chunks + k) * p.C + c];
  if (norm && !p.shift.per_token()) static_cast<M*>(p.grad_shift)[b * p.C + c] = store<M>(sums[0]);
  if (norm && !p.scale.per_token()) static_cast<M*>(p.grad_scale)[b * p.C + c] = store<M>(sums[1]);
  if (p.residual && !p.gate.per_token()) static_cast<M*>(p.grad_gate)[b * p.C + c] = store<M>(sums[2]);
}

// Prefetch shift/scale in the packed forward (rows of up to 5 packs per
// lane)? Off unless DDT_FAST_NORM_PREFETCH=1 (a tuning switch for benchmarks).
bool forward_prefetch_modulation() {
  static const bool on = [] {
    const char* env = std::getenv("DDT_FAST_NORM_PREFETCH");
    return env != nullptr && env[0] == '1';
  }();
  return on;
}

template <class T, class W, class M>
struct Launch {
  static int forward(const NormModulateForward& p, cudaStream_t s) {
    const int64_t rows = p.B * p.L;
    const unsigned blocks = unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock);
    constexpr unsigned kThreads = kRowsPerBlock * kWarp;
    // float64 (tests, gradcheck) always takes the scalar kernel
    const int packs = std::is_same_v<T, double> ? 0 : forward_packs_per_lane<T, W, M>(p);
    if constexpr (!std::is_same_v<T, double>) {
      constexpr int G = 16 / int(sizeof(T));
      if (forward_prefetch_modulation()) {
        if (packs == 2) forward_packed_kernel<T, W, M, 2, true><<<blocks, kThreads, 0, s>>>(p);
        if (packs == 3) forward_packed_kernel<T, W, M, 3, true><<<blocks, kThreads, 0, s>>>(p);
        if (packs == 5) forward_packed_kernel<T, W, M, 5, true><<<blocks, kThreads, 0, s>>>(p);
        if (packs == 8 || packs == 16) forward_kernel<T, W, M><<<blocks, kThreads, 0, s>>>(p);
      } else {
        if (packs == 2) forward_packed_kernel<T, W, M, 2, false><<<blocks, kThreads, 0, s>>>(p);
        if (packs == 3) forward_packed_kernel<T, W, M, 3, false><<<blocks, kThreads, 0, s>>>(p);
        if (packs == 5) forward_packed_kernel<T, W, M, 5, false><<<blocks, kThreads, 0, s>>>(p);
        if (packs == 8) forward_packed_kernel<T, W, M, 8, false><<<blocks, kThreads, 0, s>>>(p);
        if constexpr (16 * G <= kMaxRegistersPerLane) {
          if (packs == 16) forward_packed_kernel<T, W, M, 16, false><<<blocks, kThreads, 0, s>>>(p);
        }
      }
      static_assert(sizeof(kPackCounts) / sizeof(int) == 5, "launch every pack count above");
    }
    if (packs == 0) forward_kernel<T, W, M><<<blocks, kThreads, 0, s>>>(p);
    return int(cudaGetLastError());
  }
  static int backward(const NormModulateBackward& p, void* workspace, cudaStream_t s) {
    const Workspace ws = carve(p, workspace);
    const int64_t rows = p.B * p.L;
    const unsigned row_blocks = unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock);
    backward_rows_kernel<T, W, M><<<row_blocks, kRowsPerBlock * kWarp, 0, s>>>(p, ws);
    const bool norm = p.kind != NormKind::none;
    const bool reduce = (norm && (p.weight || !p.shift.per_token() || !p.scale.per_token())) ||
                        (p.residual && !p.gate.per_token());
    if (!reduce) return int(cudaGetLastError());
    const unsigned col_blocks = unsigned((p.C + kColThreads - 1) / kColThreads);
    backward_cols_kernel<T, W, M><<<dim3(col_blocks, unsigned(p.B * ws.chunks)), kColThreads, 0, s>>>(p, ws);
    backward_finish_kernel<W, M><<<dim3(col_blocks, unsigned(p.B + 1)), kColThreads, 0, s>>>(p, ws);
    return int(cudaGetLastError());
  }
};

template <class P, class Fn>
int dispatch(const P& p, Fn&& fn) {
  return dispatch_x_w_m<int>(p.x_dtype, p.w_dtype, p.mod_dtype, int(cudaErrorInvalidValue),
                             [&](auto t, auto w, auto m) {
                               return fn(Launch<decltype(t), decltype(w), decltype(m)>{});
                             });
}

}  // namespace

int64_t norm_modulate_backward_workspace_bytes(const NormModulateBackward& p) {
  const int64_t rows = p.B * p.L;
  const int64_t stats = 2 * ((rows * int64_t(sizeof(float)) + 255) / 256) * 256;
  return stats + 4 * p.B * chunks_for(p.L) * p.C * int64_t(sizeof(float)) + 256;
}

int norm_modulate_forward(const NormModulateForward& p, stream_t stream) {
  return dispatch(p, [&](auto launch) { return decltype(launch)::forward(p, stream); });
}

int norm_modulate_backward(const NormModulateBackward& p, void* workspace, stream_t stream) {
  return dispatch(p, [&](auto launch) { return decltype(launch)::backward(p, workspace, stream); });
}

}  // namespace cuda
}  // namespace ddt

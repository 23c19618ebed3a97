// CUDA kernels for the fused norm + modulate family (see ddt/norm_modulate.h).
//
// Forward: one warp per row. When every operand allows 16-byte packs and the
// row fits in registers (the model's case), forward_raw_kernel reads each
// element from memory once, keeps the row packed as loaded, and issues every
// load before any store; otherwise forward_kernel reads the row twice
// (statistics, then output), the second read mostly from L1/L2. Both compute
// the same values.
// Backward, packed (aligned rows of up to 40 elements per lane): one block per
// chunk of 32 rows of a sample, one pass over memory; the column sums (norm
// weight; per-sample shift/scale/gate) are accumulated in per-warp shared
// memory slices and added in a fixed order. Scalar fallback: (1) a warp per
// row computes grad_x / grad_y and every per-token gradient, and saves each
// row's mean and 1/std; (2) a column kernel sums the row-reduced gradients over
// chunks of rows with coalesced reads. Both end with the same small kernels
// adding the chunks up, per sample and then over samples. No atomics: results
// are deterministic.
#include <cuda_runtime.h>

#include <cstdlib>
#include <string>
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

// Packed forwards: G elements per pack (16 bytes of x), V packs per lane, a
// row of up to 32 * V * G elements in registers. Lane `lane` owns packs
// v * 32 + lane.
template <int G>
__device__ __forceinline__ int64_t pack_column(int v, int lane) {
  return (int64_t(v) * kWarp + lane) * G;
}

// forward_raw_kernel keeps the row packed as loaded (two 16-bit values per
// register, half the registers of widened floats, so more warps fit on an SM)
// and is ordered load-all / compute / store-all: no load waits behind a store
// to memory the compiler cannot prove distinct, so every pack's latency
// overlaps. kStream: evict-first hints on x/y reads and out/x_out writes
// (read or written once), leaving L2 to shift/scale/weight, which rows share.
// (Capping registers for more resident warps spills at 5 packs per lane.)
template <class T, class W, class M, int V, bool kStream>
__global__ void __launch_bounds__(kRowsPerBlock* kWarp) forward_raw_kernel(NormModulateForward p) {
  using A = acc_t<T>;
  constexpr int G = 16 / int(sizeof(T));
  const int lane = threadIdx.x % kWarp;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= p.B * p.L) return;
  const int64_t b = r / p.L, l = r - b * p.L, C = p.C;
  RawPack<T, G> xr[V];
#pragma unroll
  for (int v = 0; v < V; ++v)
    if (pack_column<G>(v, lane) < C) load_raw_hinted<kStream, G>(row_ptr<T>(p.x, b, l) + pack_column<G>(v, lane), xr[v]);
  if (p.residual) {
    RawPack<T, G> yr[V];
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (pack_column<G>(v, lane) < C) load_raw_hinted<kStream, G>(row_ptr<T>(p.y, b, l) + pack_column<G>(v, lane), yr[v]);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t c = pack_column<G>(v, lane);
      if (c >= C) continue;
      A xv[G], yv[G], g[G];
      unpack<G>(xr[v], xv);
      unpack<G>(yr[v], yv);
      load_pack<G>(row_ptr<M>(p.gate, b, l) + c, g);
#pragma unroll
      for (int j = 0; j < G; ++j) xv[j] = nm::residual<A>(xv[j], g[j], yv[j]);
      pack<G>(xv, xr[v]);  // x' rounded to T, as stored and as normalised
    }
    T* xo = static_cast<T*>(p.x_out.ptr) + b * p.x_out.stride_b + l * p.x_out.stride_l;
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (pack_column<G>(v, lane) < C) store_raw_hinted<kStream>(xo + pack_column<G>(v, lane), xr[v]);
  }
  if (p.kind == NormKind::none) return;
  A mean = 0;
  if (p.kind == NormKind::layer) {
    A s = 0;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (pack_column<G>(v, lane) >= C) continue;
      A xv[G];
      unpack<G>(xr[v], xv);
#pragma unroll
      for (int j = 0; j < G; ++j) s += xv[j];
    }
    mean = warp_sum(s) / A(C);
  }
  A sq = 0;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    if (pack_column<G>(v, lane) >= C) continue;
    A xv[G];
    unpack<G>(xr[v], xv);
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const A d = xv[j] - mean;
      sq += d * d;
    }
  }
  const A rinv = nm::inv_std<A>(warp_sum(sq) / A(C), p.eps);
  const W* weight = static_cast<const W*>(p.weight);
#pragma unroll
  for (int v = 0; v < V; ++v) {  // loads only: the compiler may issue them all at once
    const int64_t c = pack_column<G>(v, lane);
    if (c >= C) continue;
    A xv[G], sh[G], sc[G], w[G];
    unpack<G>(xr[v], xv);
    load_pack<G>(row_ptr<M>(p.shift, b, l) + c, sh);
    load_pack<G>(row_ptr<M>(p.scale, b, l) + c, sc);
    if (weight) {
      load_pack<G>(weight + c, w);
    } else {
#pragma unroll
      for (int j = 0; j < G; ++j) w[j] = A(1);
    }
#pragma unroll
    for (int j = 0; j < G; ++j) xv[j] = nm::modulate<A>(round_to<T>((xv[j] - mean) * rinv), w[j], sh[j], sc[j]);
    pack<G>(xv, xr[v]);
  }
  T* out = static_cast<T*>(p.out.ptr) + b * p.out.stride_b + l * p.out.stride_l;
#pragma unroll
  for (int v = 0; v < V; ++v)
    if (pack_column<G>(v, lane) < C) store_raw_hinted<kStream>(out + pack_column<G>(v, lane), xr[v]);
}

// forward_widened_kernel: the previous packed forward (row widened to floats
// in registers, loads interleaved with stores), kept while the two are compared.
template <class T, class W, class M, int V>
__global__ void __launch_bounds__(kRowsPerBlock* kWarp) forward_widened_kernel(NormModulateForward p) {
  using A = acc_t<T>;
  constexpr int G = 16 / int(sizeof(T));
  const int lane = threadIdx.x % kWarp;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= p.B * p.L) return;
  const int64_t b = r / p.L, l = r % p.L, C = p.C;
  A xr[V][G];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t c = pack_column<G>(v, lane);
    if (c < C) load_pack<G>(row_ptr<T>(p.x, b, l) + c, xr[v]);
  }
  if (p.residual) {
    T* xo = static_cast<T*>(p.x_out.ptr) + b * p.x_out.stride_b + l * p.x_out.stride_l;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t c = pack_column<G>(v, lane);
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
  A mean = 0;
  if (p.kind == NormKind::layer) {
    A s = 0;
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (pack_column<G>(v, lane) < C)
#pragma unroll
        for (int j = 0; j < G; ++j) s += xr[v][j];
    mean = warp_sum(s) / A(C);
  }
  A sq = 0;
#pragma unroll
  for (int v = 0; v < V; ++v)
    if (pack_column<G>(v, lane) < C)
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
    const int64_t c = pack_column<G>(v, lane);
    if (c >= C) continue;
    A sh[G], sc[G], w[G];
    load_pack<G>(row_ptr<M>(p.shift, b, l) + c, sh);
    load_pack<G>(row_ptr<M>(p.scale, b, l) + c, sc);
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

// The packed backward holds several operands of a row per lane (x, grad_out,
// scale, grad_x_out, y, gate): past 40 elements per lane it spills.
constexpr int kMaxBackwardElementsPerLane = 40;

// Packs per lane the packed backward needs for p (0: use the scalar kernels).
template <class T, class W, class M>
int backward_packs_per_lane(const NormModulateBackward& p) {
  constexpr int G = 16 / int(sizeof(T));
  if (std::is_same_v<T, double> || p.C % G != 0) return 0;
  const bool aligned = rows_packable<T, G>(p.x) && rows_packable<T, G>(p.grad_out) &&
                       rows_packable<T, G>(p.grad_x_out) && rows_packable<T, G>(p.y) &&
                       rows_packable<M, G>(p.gate) && rows_packable<M, G>(p.scale) &&
                       (p.weight == nullptr || pack_aligned<W, G>(p.weight)) && pack_aligned<T, G>(p.grad_x) &&
                       (p.grad_y == nullptr || pack_aligned<T, G>(p.grad_y)) &&
                       (p.grad_gate == nullptr || pack_aligned<M, G>(p.grad_gate)) &&
                       (p.grad_shift == nullptr || pack_aligned<M, G>(p.grad_shift)) &&
                       (p.grad_scale == nullptr || pack_aligned<M, G>(p.grad_scale));
  if (!aligned) return 0;
  const int64_t per_lane = (p.C / G + kWarp - 1) / kWarp;
  for (int v : kPackCounts)
    if (per_lane <= v && v * G <= kMaxBackwardElementsPerLane) return v;
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

// Packed backward: one block per chunk of kRowsPerChunk rows of one sample,
// kBackwardWarps warps taking every kBackwardWarps-th row of it. Each row is
// loaded once with 16-byte packs (all of a row's loads issued before its
// arithmetic), and the column sums the scalar path gets from a second pass
// over memory (backward_cols_kernel) are accumulated on chip instead: every
// warp adds its rows into its own shared-memory slice (a lane owns its
// columns, so no atomics), and the block adds the slices in a fixed order into
// the same partial[q][b][chunk][c] the column kernel writes; the finish kernel
// is shared. Deterministic, like the scalar path.
constexpr int kBackwardWarps = 4;

// Shared-memory slices (one per column sum in use) for p; slot[q] = -1 unused.
struct ColumnSlots {
  int slot[4] = {-1, -1, -1, -1};  // weight, shift, scale, gate (partial's q)
  int count = 0;
};

ColumnSlots column_slots(const NormModulateBackward& p) {
  ColumnSlots s;
  const bool norm = p.kind != NormKind::none;
  const bool used[4] = {norm && p.weight != nullptr, norm && !p.shift.per_token(), norm && !p.scale.per_token(),
                        p.residual && !p.gate.per_token()};
  for (int q = 0; q < 4; ++q)
    if (used[q]) s.slot[q] = s.count++;
  return s;
}

// dst[j] += v[j] in shared memory, 16 bytes at a time (dst is 16-byte aligned:
// slices hold a multiple of 4 floats and c is a multiple of G >= 4).
template <int G, class A>
__device__ __forceinline__ void add_columns(float* dst, const A (&v)[G]) {
  static_assert(G % 4 == 0, "packs of 4 floats");
#pragma unroll
  for (int j = 0; j < G; j += 4) {
    float4 d = *reinterpret_cast<float4*>(dst + j);
    d.x += float(v[j]);
    d.y += float(v[j + 1]);
    d.z += float(v[j + 2]);
    d.w += float(v[j + 3]);
    *reinterpret_cast<float4*>(dst + j) = d;
  }
}

// G shared-memory floats (16-byte aligned) widened to A.
template <int G, class A>
__device__ __forceinline__ void load_columns(const float* src, A (&out)[G]) {
#pragma unroll
  for (int j = 0; j < G; j += 4) {
    const float4 d = *reinterpret_cast<const float4*>(src + j);
    out[j] = A(d.x);
    out[j + 1] = A(d.y);
    out[j + 2] = A(d.z);
    out[j + 3] = A(d.w);
  }
}

// Shared memory of the packed backward, in floats: the warps' column-sum
// slices, then the block's staged weight, per-sample scale and per-sample gate.
template <int V, int G>
size_t backward_packed_smem_floats(int slot_count) {
  return size_t(kBackwardWarps * slot_count + 3) * V * kWarp * G;
}

// kResidual: compiled separately, so the norm-only kernels (fewer operands per
// row) get fewer registers and more resident warps (4 blocks per SM: a few
// bytes spill at 5 packs per lane; the residual kernel keeps 2 blocks, as 3
// would spill hundreds of bytes).
template <class T, class W, class M, int V, bool kResidual>
__global__ void __launch_bounds__(kBackwardWarps* kWarp, kResidual ? 2 : 4)
    backward_packed_kernel(NormModulateBackward p, Workspace ws, ColumnSlots slots) {
  using A = acc_t<T>;
  constexpr int G = 16 / int(sizeof(T));
  constexpr int kCols = V * kWarp * G;  // columns a slice holds (the row, padded)
  extern __shared__ float4 smem_raw[];
  float* column_sums = reinterpret_cast<float*>(smem_raw);  // [kBackwardWarps][slots.count][kCols]
  float* weight_s = column_sums + kBackwardWarps * slots.count * kCols;
  float* scale_s = weight_s + kCols;  // per-sample scale of this block's sample
  float* gate_s = scale_s + kCols;    // per-sample gate of this block's sample
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t b = blockIdx.x / ws.chunks, chunk = blockIdx.x % ws.chunks, C = p.C;
  const int64_t l0 = chunk * kRowsPerChunk, l1 = min(p.L, l0 + kRowsPerChunk);
  const bool norm = p.kind != NormKind::none, layer = p.kind == NormKind::layer;
  const bool token_scale = norm && p.scale.per_token(), token_gate = kResidual && p.gate.per_token();
  const W* weight = static_cast<const W*>(p.weight);
  // Operands shared by every row of the block, staged once (widening to float is exact).
  for (int64_t c = threadIdx.x; c < kCols; c += kBackwardWarps * kWarp) {
    weight_s[c] = (weight && c < C) ? float(load<A>(weight[c])) : 1.f;
    if (norm && !token_scale) scale_s[c] = c < C ? float(load<A>(row_ptr<M>(p.scale, b, 0)[c])) : 0.f;
    if (kResidual && !token_gate) gate_s[c] = c < C ? float(load<A>(row_ptr<M>(p.gate, b, 0)[c])) : 0.f;
  }
  float* mine = column_sums + warp * slots.count * kCols;
  for (int q = 0; q < slots.count; ++q)
#pragma unroll
    for (int v = 0; v < V; ++v)
#pragma unroll
      for (int j = 0; j < G; ++j) mine[q * kCols + pack_column<G>(v, lane) + j] = 0.f;
  __syncthreads();
  const bool grad_through = kResidual && p.grad_x_out.ptr != nullptr;
  for (int64_t l = l0 + warp; l < l1; l += kBackwardWarps) {
    const int64_t r = b * p.L + l;
    constexpr int R = kResidual ? V : 1;
    RawPack<T, G> xr[V], gor[V], gxr[R], yr[R];
    RawPack<M, G> scr[V], gater[R];
    // every load of the row first, so their latencies overlap
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t c = pack_column<G>(v, lane);
      if (c >= C) continue;
      load_raw<G>(row_ptr<T>(p.x, b, l) + c, xr[v]);
      if (norm) load_raw<G>(row_ptr<T>(p.grad_out, b, l) + c, gor[v]);
      if (token_scale) load_raw<G>(row_ptr<M>(p.scale, b, l) + c, scr[v]);
      if constexpr (kResidual) {
        if (grad_through) load_raw<G>(row_ptr<T>(p.grad_x_out, b, l) + c, gxr[v]);
        load_raw<G>(row_ptr<T>(p.y, b, l) + c, yr[v]);
        if (token_gate) load_raw<G>(row_ptr<M>(p.gate, b, l) + c, gater[v]);
      }
    }
    auto scale_of = [&](int v, int64_t c, A(&sc)[G]) {
      if (token_scale)
        unpack<G>(scr[v], sc);
      else
        load_columns<G>(scale_s + c, sc);
    };
    A mean = 0, rinv = 1, dot = 0, mean_gn = 0;
    if (norm) {
      if (layer) {
        A s = 0;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (pack_column<G>(v, lane) >= C) continue;
          A xv[G];
          unpack<G>(xr[v], xv);
#pragma unroll
          for (int j = 0; j < G; ++j) s += xv[j];
        }
        mean = warp_sum(s) / A(C);
      }
      A sq = 0;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (pack_column<G>(v, lane) >= C) continue;
        A xv[G];
        unpack<G>(xr[v], xv);
#pragma unroll
        for (int j = 0; j < G; ++j) sq += (xv[j] - mean) * (xv[j] - mean);
      }
      rinv = nm::inv_std<A>(warp_sum(sq) / A(C), p.eps);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t c = pack_column<G>(v, lane);
        if (c >= C) continue;
        A xv[G], go[G], sc[G], w[G];
        unpack<G>(xr[v], xv);
        unpack<G>(gor[v], go);
        scale_of(v, c, sc);
        load_columns<G>(weight_s + c, w);
#pragma unroll
        for (int j = 0; j < G; ++j) {
          const A gn = go[j] * (A(1) + sc[j]) * w[j];
          dot += gn * ((xv[j] - mean) * rinv);
          mean_gn += gn;
        }
      }
      dot = warp_sum(dot) / A(C);
      mean_gn = layer ? warp_sum(mean_gn) / A(C) : A(0);
    }
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t c = pack_column<G>(v, lane);
      if (c >= C) continue;
      A g[G];
      if (grad_through) {
        unpack<G>(gxr[kResidual ? v : 0], g);
      } else {
#pragma unroll
        for (int j = 0; j < G; ++j) g[j] = A(0);
      }
      if (norm) {
        A xv[G], go[G], sc[G], w[G], gsc[G], sum_w[G];
        unpack<G>(xr[v], xv);
        unpack<G>(gor[v], go);
        scale_of(v, c, sc);
        load_columns<G>(weight_s + c, w);
#pragma unroll
        for (int j = 0; j < G; ++j) {
          const A xhat = (xv[j] - mean) * rinv;
          const A n = round_to<T>(xhat);
          const A gn = go[j] * (A(1) + sc[j]) * w[j];
          g[j] += rinv * (gn - mean_gn - xhat * dot);
          gsc[j] = go[j] * n * w[j];
          sum_w[j] = go[j] * (A(1) + sc[j]) * n;
        }
        if (slots.slot[0] >= 0) add_columns<G>(mine + slots.slot[0] * kCols + c, sum_w);
        if (slots.slot[1] >= 0) add_columns<G>(mine + slots.slot[1] * kCols + c, go);
        if (slots.slot[2] >= 0) add_columns<G>(mine + slots.slot[2] * kCols + c, gsc);
        if (p.shift.per_token()) store_pack<G>(static_cast<M*>(p.grad_shift) + r * C + c, go);
        if (token_scale) store_pack<G>(static_cast<M*>(p.grad_scale) + r * C + c, gsc);
      }
      store_pack<G>(static_cast<T*>(p.grad_x) + r * C + c, g);
      if constexpr (kResidual) {
        A y[G], gate[G], gy[G], gg[G], sum_gate[G];
        unpack<G>(yr[v], y);
        if (token_gate)
          unpack<G>(gater[v], gate);
        else
          load_columns<G>(gate_s + c, gate);
#pragma unroll
        for (int j = 0; j < G; ++j) {
          gy[j] = g[j] * gate[j];
          gg[j] = g[j] * y[j];
          sum_gate[j] = round_to<T>(g[j]) * y[j];  // the scalar path sums grad_x as stored (in T) times y
        }
        if (slots.slot[3] >= 0) add_columns<G>(mine + slots.slot[3] * kCols + c, sum_gate);
        store_pack<G>(static_cast<T*>(p.grad_y) + r * C + c, gy);
        if (token_gate) store_pack<G>(static_cast<M*>(p.grad_gate) + r * C + c, gg);
      }
    }
  }
  if (slots.count == 0) return;
  __syncthreads();
  const int64_t plane = p.B * ws.chunks * p.C, at = (b * ws.chunks + chunk) * p.C;
  for (int64_t c = threadIdx.x; c < C; c += kBackwardWarps * kWarp)
    for (int q = 0; q < 4; ++q) {
      if (slots.slot[q] < 0) continue;
      float s = 0.f;
      for (int w = 0; w < kBackwardWarps; ++w) s += column_sums[(w * slots.count + slots.slot[q]) * kCols + c];
      ws.partial[q * plane + at + c] = s;
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

// grid: (ceil(C / kColThreads), B): block row b sums sample b's chunks, for
// the per-sample gradients and for the weight; the weight's per-sample sums
// go back into partial (chunk 0 of plane 0; each thread reads its column's
// chunks before writing) for backward_weight_kernel. Short serial chains
// (chunks, then B) instead of one over B * chunks.
template <class W, class M>
__global__ void backward_finish_kernel(NormModulateBackward p, Workspace ws) {
  const int64_t c = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (c >= p.C) return;
  const int64_t plane = p.B * ws.chunks * p.C;
  const bool norm = p.kind != NormKind::none;
  const int64_t b = blockIdx.y;
  const bool need[4] = {norm && p.weight != nullptr, norm && !p.shift.per_token(), norm && !p.scale.per_token(),
                        p.residual && !p.gate.per_token()};
  float sums[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
  for (int64_t k = 0; k < ws.chunks; ++k)
#pragma unroll
    for (int q = 0; q < 4; ++q)
      if (need[q]) sums[q] += ws.partial[q * plane + (b * ws.chunks + k) * p.C + c];
  if (need[0]) ws.partial[(b * ws.chunks) * p.C + c] = sums[0];
  if (need[1]) static_cast<M*>(p.grad_shift)[b * p.C + c] = store<M>(sums[1]);
  if (need[2]) static_cast<M*>(p.grad_scale)[b * p.C + c] = store<M>(sums[2]);
  if (need[3]) static_cast<M*>(p.grad_gate)[b * p.C + c] = store<M>(sums[3]);
}

// grid: ceil(C / kColThreads): the weight gradient, summing the per-sample
// sums backward_finish_kernel left in partial, in sample order.
template <class W>
__global__ void backward_weight_kernel(NormModulateBackward p, Workspace ws) {
  const int64_t c = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (c >= p.C) return;
  float s = 0.f;
#pragma unroll 4
  for (int64_t b = 0; b < p.B; ++b) s += ws.partial[(b * ws.chunks) * p.C + c];
  static_cast<W*>(p.grad_weight)[c] = store<W>(s);
}

// Which packed forward runs: DDT_FAST_NORM_FORWARD=raw (default),
// raw_stream (raw with evict-first hints) or widened (the previous kernel).
// A tuning switch for benchmarks; all three compute identical values.
enum class PackedForward { raw, raw_stream, widened };
PackedForward packed_forward_variant() {
  static const PackedForward v = [] {
    const char* env = std::getenv("DDT_FAST_NORM_FORWARD");
    const std::string s = env ? env : "";
    if (s == "raw_stream") return PackedForward::raw_stream;
    if (s == "widened") return PackedForward::widened;
    return PackedForward::raw;
  }();
  return v;
}

template <class T, class W, class M, int V>
void launch_packed_forward(const NormModulateForward& p, unsigned blocks, unsigned threads, cudaStream_t s) {
  switch (packed_forward_variant()) {
    case PackedForward::raw: forward_raw_kernel<T, W, M, V, false><<<blocks, threads, 0, s>>>(p); break;
    case PackedForward::raw_stream: forward_raw_kernel<T, W, M, V, true><<<blocks, threads, 0, s>>>(p); break;
    case PackedForward::widened: forward_widened_kernel<T, W, M, V><<<blocks, threads, 0, s>>>(p); break;
  }
}

// Backward path: DDT_FAST_NORM_BACKWARD=packed (default; one pass, column
// sums on chip) or rows (the scalar row kernel plus the column pass). A
// tuning switch for benchmarks; both are deterministic.
bool packed_backward_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("DDT_FAST_NORM_BACKWARD");
    return env == nullptr || std::string(env) != "rows";
  }();
  return on;
}

// The column sums' last two stages (both backward paths).
template <class W, class M>
void launch_backward_finish(const NormModulateBackward& p, const Workspace& ws, cudaStream_t s) {
  const unsigned col_blocks = unsigned((p.C + kColThreads - 1) / kColThreads);
  backward_finish_kernel<W, M><<<dim3(col_blocks, unsigned(p.B)), kColThreads, 0, s>>>(p, ws);
  if (p.kind != NormKind::none && p.weight != nullptr)
    backward_weight_kernel<W><<<col_blocks, kColThreads, 0, s>>>(p, ws);
}

template <class T, class W, class M, int V, bool kResidual>
int launch_packed_backward_kernel(const NormModulateBackward& p, const Workspace& ws, const ColumnSlots& slots,
                                  cudaStream_t s) {
  constexpr int G = 16 / int(sizeof(T));
  const size_t smem = backward_packed_smem_floats<V, G>(slots.count) * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(backward_packed_kernel<T, W, M, V, kResidual>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return int(e);
  }
  backward_packed_kernel<T, W, M, V, kResidual>
      <<<unsigned(p.B * ws.chunks), kBackwardWarps * kWarp, smem, s>>>(p, ws, slots);
  return int(cudaGetLastError());
}

template <class T, class W, class M, int V>
int launch_packed_backward(const NormModulateBackward& p, const Workspace& ws, cudaStream_t s) {
  const ColumnSlots slots = column_slots(p);
  const int e = p.residual ? launch_packed_backward_kernel<T, W, M, V, true>(p, ws, slots, s)
                           : launch_packed_backward_kernel<T, W, M, V, false>(p, ws, slots, s);
  if (e != 0) return e;
  if (slots.count > 0) launch_backward_finish<W, M>(p, ws, s);
  return int(cudaGetLastError());
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
      if (packs == 2) launch_packed_forward<T, W, M, 2>(p, blocks, kThreads, s);
      if (packs == 3) launch_packed_forward<T, W, M, 3>(p, blocks, kThreads, s);
      if (packs == 5) launch_packed_forward<T, W, M, 5>(p, blocks, kThreads, s);
      if (packs == 8) launch_packed_forward<T, W, M, 8>(p, blocks, kThreads, s);
      if constexpr (16 * G <= kMaxRegistersPerLane) {
        if (packs == 16) launch_packed_forward<T, W, M, 16>(p, blocks, kThreads, s);
      }
      static_assert(sizeof(kPackCounts) / sizeof(int) == 5, "launch every pack count above");
    }
    if (packs == 0) forward_kernel<T, W, M><<<blocks, kThreads, 0, s>>>(p);
    return int(cudaGetLastError());
  }
  static int backward(const NormModulateBackward& p, void* workspace, cudaStream_t s) {
    const Workspace ws = carve(p, workspace);
    if constexpr (!std::is_same_v<T, double>) {
      constexpr int G = 16 / int(sizeof(T));
      const int packs = packed_backward_enabled() ? backward_packs_per_lane<T, W, M>(p) : 0;
      if (packs == 2) return launch_packed_backward<T, W, M, 2>(p, ws, s);
      if (packs == 3) return launch_packed_backward<T, W, M, 3>(p, ws, s);
      if (packs == 5) return launch_packed_backward<T, W, M, 5>(p, ws, s);
      if constexpr (8 * G <= kMaxBackwardElementsPerLane) {
        if (packs == 8) return launch_packed_backward<T, W, M, 8>(p, ws, s);
      }
    }
    const int64_t rows = p.B * p.L;
    const unsigned row_blocks = unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock);
    backward_rows_kernel<T, W, M><<<row_blocks, kRowsPerBlock * kWarp, 0, s>>>(p, ws);
    const bool norm = p.kind != NormKind::none;
    const bool reduce = (norm && (p.weight || !p.shift.per_token() || !p.scale.per_token())) ||
                        (p.residual && !p.gate.per_token());
    if (!reduce) return int(cudaGetLastError());
    const unsigned col_blocks = unsigned((p.C + kColThreads - 1) / kColThreads);
    backward_cols_kernel<T, W, M><<<dim3(col_blocks, unsigned(p.B * ws.chunks)), kColThreads, 0, s>>>(p, ws);
    launch_backward_finish<W, M>(p, ws, s);
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

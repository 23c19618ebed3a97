// CUDA kernels for q/k RMSNorm + 2D rotary + head split (see ddt/qk_norm_rope.h).
// One warp per head vector; lanes own rotary pairs. The backward runs a fixed
// grid of warps over the head vectors, each warp keeping its share of the
// weight gradients in registers, then a finish kernel sums the warps' partial
// rows in a fixed order (deterministic, no atomics).
#include <cuda_runtime.h>

#include "ddt/dtype_dispatch.h"
#include "ddt/qk_norm_rope.h"

namespace ddt {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kMaxPairsPerLane = 4;  // D <= 256
// Warps of the backward's fixed grid: enough to fill a large GPU (each keeps
// its own partial weight-gradient rows; the finish kernel sums them).
constexpr int kBackwardWarps = 16384;
constexpr int64_t kForwardBlocks = 16384;  // cap of the forward's grid-stride grid

template <class A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// grid-wide index of this warp's head vector: (part, b, l, h), part outermost.
struct HeadVec {
  int64_t part, b, l, h;
};
__device__ __forceinline__ HeadVec decode(const QkNormRope& p, int64_t r) {
  const int64_t per_part = p.B * p.L * p.H;
  HeadVec v;
  v.part = r / per_part;
  r %= per_part;
  v.h = r % p.H;
  r /= p.H;
  v.l = r % p.L;
  v.b = r / p.L;
  return v;
}

// Grid-stride over the head vectors of parts [p.parts_begin, p.parts_end):
// a capped grid of warps that each take many vectors (one-vector blocks
// spend more time being scheduled than computing).
template <class T, class W>
__global__ void forward_kernel(QkNormRope p) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t per_part = p.B * p.L * p.H, half = p.D / 2;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = p.parts_begin * per_part + int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       r < p.parts_end * per_part; r += warps) {
    const HeadVec hv = decode(p, r);
    const T* x = static_cast<const T*>(p.qkv) + qk::packed(p, hv.b, hv.l, hv.part, hv.h);
    const int64_t out_at = qk::split(p, hv.b, hv.h, hv.l);
    if (hv.part == 2) {
      T* v = static_cast<T*>(p.v) + out_at;
      for (int64_t d = lane; d < p.D; d += kWarp) v[d] = x[d];
      continue;
    }
    A sq = 0;
    for (int64_t d = lane; d < p.D; d += kWarp) sq += load<A>(x[d]) * load<A>(x[d]);
    const A rinv = nm::inv_std<A>(warp_sum(sq) / A(p.D), p.eps);
    const W* w = static_cast<const W*>(hv.part == 0 ? p.q_weight : p.k_weight);
    T* out = static_cast<T*>(hv.part == 0 ? p.q : p.k) + out_at;
    const float* rope = p.rope + hv.l * half * 2;
    for (int64_t m = lane; m < half; m += kWarp) {
      const A u0 = round_to<T>(load<A>(x[2 * m]) * rinv) * load<A>(w[2 * m]);
      const A u1 = round_to<T>(load<A>(x[2 * m + 1]) * rinv) * load<A>(w[2 * m + 1]);
      A r0, r1;
      qk::rotate<A>(u0, u1, A(rope[2 * m]), A(rope[2 * m + 1]), r0, r1);
      out[2 * m] = store<T>(r0);
      out[2 * m + 1] = store<T>(r1);
    }
  }
}

template <class T, class W>
__global__ void backward_kernel(QkNormRope p, float* partial) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  const int64_t half = p.D / 2, per_part = p.B * p.L * p.H;
  A acc[2][kMaxPairsPerLane][2] = {};
  for (int64_t r = warp; r < 3 * per_part; r += warps) {
    const HeadVec hv = decode(p, r);
    const int64_t in_at = qk::packed(p, hv.b, hv.l, hv.part, hv.h), out_at = qk::split(p, hv.b, hv.h, hv.l);
    T* gx = static_cast<T*>(p.grad_qkv) + in_at;
    const T* g = static_cast<const T*>(hv.part == 0 ? p.grad_q : hv.part == 1 ? p.grad_k : p.grad_v);
    if (g == nullptr) {
      for (int64_t d = lane; d < p.D; d += kWarp) gx[d] = store<T>(A(0));
      continue;
    }
    g += out_at;
    if (hv.part == 2) {
      for (int64_t d = lane; d < p.D; d += kWarp) gx[d] = g[d];
      continue;
    }
    const T* x = static_cast<const T*>(p.qkv) + in_at;
    const W* w = static_cast<const W*>(hv.part == 0 ? p.q_weight : p.k_weight);
    const float* rope = p.rope + hv.l * half * 2;
    A sq = 0;
    for (int64_t d = lane; d < p.D; d += kWarp) sq += load<A>(x[d]) * load<A>(x[d]);
    const A rinv = nm::inv_std<A>(warp_sum(sq) / A(p.D), p.eps);
    A gn[kMaxPairsPerLane][2], xhat[kMaxPairsPerLane][2];
    A dot = 0;
#pragma unroll
    for (int j = 0; j < kMaxPairsPerLane; ++j) {
      const int64_t m = lane + int64_t(j) * kWarp;
      if (m >= half) break;
      A gu[2];
      qk::rotate<A>(load<A>(g[2 * m]), load<A>(g[2 * m + 1]), A(rope[2 * m]), -A(rope[2 * m + 1]), gu[0], gu[1]);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        xhat[j][e] = load<A>(x[2 * m + e]) * rinv;
        acc[hv.part][j][e] += gu[e] * round_to<T>(xhat[j][e]);
        gn[j][e] = gu[e] * load<A>(w[2 * m + e]);
        dot += gn[j][e] * xhat[j][e];
      }
    }
    dot = warp_sum(dot) / A(p.D);
#pragma unroll
    for (int j = 0; j < kMaxPairsPerLane; ++j) {
      const int64_t m = lane + int64_t(j) * kWarp;
      if (m >= half) break;
      for (int e = 0; e < 2; ++e) gx[2 * m + e] = store<T>(rinv * (gn[j][e] - xhat[j][e] * dot));
    }
  }
  // partial[warp][part][d]
#pragma unroll
  for (int part = 0; part < 2; ++part)
#pragma unroll
    for (int j = 0; j < kMaxPairsPerLane; ++j) {
      const int64_t m = lane + int64_t(j) * kWarp;
      if (m >= half) break;
      for (int e = 0; e < 2; ++e) partial[(warp * 2 + part) * p.D + 2 * m + e] = float(acc[part][j][e]);
    }
}

// One block per weight entry: its threads sum the warps' partials in a fixed
// strided order, then a fixed shared-memory tree (deterministic).
constexpr int kFinishThreads = 256;

template <class W>
__global__ void backward_finish_kernel(QkNormRope p, const float* partial, int64_t warps) {
  __shared__ float sums[kFinishThreads];
  const int64_t i = blockIdx.x;  // part * D + d
  float s = 0.f;
  for (int64_t w = threadIdx.x; w < warps; w += kFinishThreads) s += partial[w * 2 * p.D + i];
  sums[threadIdx.x] = s;
  __syncthreads();
  for (int n = kFinishThreads / 2; n > 0; n /= 2) {
    if (threadIdx.x < n) sums[threadIdx.x] += sums[threadIdx.x + n];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    W* out = static_cast<W*>(i < p.D ? p.grad_q_weight : p.grad_k_weight);
    out[i % p.D] = store<W>(sums[0]);
  }
}

int64_t backward_warps(const QkNormRope& p) {
  const int64_t rows = 3 * p.B * p.L * p.H;
  const int64_t want = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock * kWarpsPerBlock;
  return want < kBackwardWarps ? (want > 0 ? want : kWarpsPerBlock) : kBackwardWarps;
}

template <class T, class W>
struct Launch {
  static int forward(const QkNormRope& p, cudaStream_t s) {
    const int64_t rows = (p.parts_end - p.parts_begin) * p.B * p.L * p.H;
    const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    if (blocks <= 0) return 0;
    forward_kernel<T, W><<<unsigned(blocks < kForwardBlocks ? blocks : kForwardBlocks), kWarpsPerBlock * kWarp, 0, s>>>(p);
    return int(cudaGetLastError());
  }
  static int backward(const QkNormRope& p, void* workspace, cudaStream_t s) {
    const int64_t warps = backward_warps(p);
    float* partial = static_cast<float*>(workspace);
    backward_kernel<T, W><<<unsigned(warps / kWarpsPerBlock), kWarpsPerBlock * kWarp, 0, s>>>(p, partial);
    backward_finish_kernel<W><<<unsigned(2 * p.D), kFinishThreads, 0, s>>>(p, partial, warps);
    return int(cudaGetLastError());
  }
};

template <class Fn>
int dispatch(const QkNormRope& p, Fn&& fn) {
  if (p.D > 2 * kWarp * kMaxPairsPerLane || p.D % 4 != 0) return int(cudaErrorInvalidValue);
  return dispatch_x_w<int>(p.x_dtype, p.w_dtype, int(cudaErrorInvalidValue),
                           [&](auto t, auto w) { return fn(Launch<decltype(t), decltype(w)>{}); });
}

}  // namespace

int64_t qk_norm_rope_backward_workspace_bytes(const QkNormRope& p) {
  return backward_warps(p) * 2 * p.D * int64_t(sizeof(float));
}

int qk_norm_rope_forward(const QkNormRope& p, stream_t stream) {
  return dispatch(p, [&](auto launch) { return decltype(launch)::forward(p, stream); });
}

int qk_norm_rope_backward(const QkNormRope& p, void* workspace, stream_t stream) {
  return dispatch(p, [&](auto launch) { return decltype(launch)::backward(p, workspace, stream); });
}

}  // namespace cuda
}  // namespace ddt

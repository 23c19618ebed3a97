// CUDA kernels for the SwiGLU gate (see ddt/swiglu.h): a 2D grid, rows x
// column tiles (rows grid-strided past 65535), so strided row views need no
// index division per element. When every row start is 16-byte aligned and H
// a multiple of the pack width (the model's case), each thread moves 16-byte
// packs over a flat grid (packed_*_kernel); otherwise one element at a time.
#include <cuda_runtime.h>

#include <type_traits>

#include "ddt/dtype_dispatch.h"
#include "ddt/swiglu.h"
#include "pack.cuh"

namespace ddt {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void forward_kernel(Swiglu p) {
  using A = acc_t<T>;
  for (int64_t r = blockIdx.y; r < p.R; r += gridDim.y) {
    const T* a = static_cast<const T*>(p.a) + r * p.a_stride;
    const T* b = static_cast<const T*>(p.b) + r * p.b_stride;
    T* out = static_cast<T*>(p.out) + r * p.H;
    for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.H; i += int64_t(gridDim.x) * kThreads)
      out[i] = store<T>(sg::forward<A>(load<A>(a[i]), load<A>(b[i])));
  }
}

template <class T>
__global__ void backward_kernel(Swiglu p) {
  using A = acc_t<T>;
  for (int64_t r = blockIdx.y; r < p.R; r += gridDim.y) {
    const T* a = static_cast<const T*>(p.a) + r * p.a_stride;
    const T* b = static_cast<const T*>(p.b) + r * p.b_stride;
    const T* g = static_cast<const T*>(p.grad_out) + r * p.H;
    T* ga = static_cast<T*>(p.grad_a) + r * p.H;
    T* gb = static_cast<T*>(p.grad_b) + r * p.H;
    for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.H; i += int64_t(gridDim.x) * kThreads) {
      A da, db;
      sg::backward<A>(load<A>(a[i]), load<A>(b[i]), load<A>(g[i]), da, db);
      ga[i] = store<T>(da);
      gb[i] = store<T>(db);
    }
  }
}

// Packed variants: G = 16 bytes of T per thread and step, a flat 1D grid
// over all R * H / G packs (a row of the model's H = 3072 bf16 is only 384
// packs: one block per row would leave threads idle). I: the index type
// (32-bit division when the pack count fits).
template <class T, class I>
__global__ void packed_forward_kernel(Swiglu p) {
  using A = acc_t<T>;
  constexpr int G = 16 / int(sizeof(T));
  const I per_row = I(p.H / G), total = I(p.R) * per_row;
  for (I idx = I(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += I(gridDim.x) * kThreads) {
    const I r = idx / per_row, i = (idx - r * per_row) * G;
    A av[G], bv[G], o[G];
    load_pack<G>(static_cast<const T*>(p.a) + int64_t(r) * p.a_stride + i, av);
    load_pack<G>(static_cast<const T*>(p.b) + int64_t(r) * p.b_stride + i, bv);
#pragma unroll
    for (int j = 0; j < G; ++j) o[j] = sg::forward<A>(av[j], bv[j]);
    store_pack<G>(static_cast<T*>(p.out) + int64_t(r) * p.H + i, o);
  }
}

template <class T, class I>
__global__ void packed_backward_kernel(Swiglu p) {
  using A = acc_t<T>;
  constexpr int G = 16 / int(sizeof(T));
  const I per_row = I(p.H / G), total = I(p.R) * per_row;
  for (I idx = I(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += I(gridDim.x) * kThreads) {
    const I r = idx / per_row, i = (idx - r * per_row) * G;
    const int64_t row = int64_t(r) * p.H + i;
    A av[G], bv[G], gv[G], da[G], db[G];
    load_pack<G>(static_cast<const T*>(p.a) + int64_t(r) * p.a_stride + i, av);
    load_pack<G>(static_cast<const T*>(p.b) + int64_t(r) * p.b_stride + i, bv);
    load_pack<G>(static_cast<const T*>(p.grad_out) + row, gv);
#pragma unroll
    for (int j = 0; j < G; ++j) sg::backward<A>(av[j], bv[j], gv[j], da[j], db[j]);
    store_pack<G>(static_cast<T*>(p.grad_a) + row, da);
    store_pack<G>(static_cast<T*>(p.grad_b) + row, db);
  }
}

// Blocks of the flat packed grid (grid-stride past the cap).
unsigned packed_blocks(const Swiglu& p, int G) {
  const int64_t total = p.R * (p.H / G), blocks = (total + kThreads - 1) / kThreads;
  return unsigned(blocks < (int64_t(1) << 24) ? blocks : (int64_t(1) << 24));
}

// The scalar kernels' grid: column tiles x rows.
dim3 grid(const Swiglu& p) {
  const int64_t tiles = (p.H + kThreads - 1) / kThreads;
  return dim3(unsigned(tiles < 8 ? tiles : 8), unsigned(p.R < 65535 ? p.R : 65535));
}

// Does the flat packed grid index fit 32 bits?
bool packed_index_fits_32(const Swiglu& p, int G, unsigned blocks) {
  return p.R * (p.H / G) + int64_t(blocks) * kThreads < (int64_t(1) << 32);
}

template <class T>
bool packable(const Swiglu& p, bool backward) {
  if constexpr (std::is_same_v<T, double>) {
    return false;  // float64 (tests, gradcheck) takes the scalar kernels
  } else {
    constexpr int G = 16 / int(sizeof(T));
    const bool rows = p.H % G == 0 && pack_aligned<T, G>(p.a, p.a_stride) && pack_aligned<T, G>(p.b, p.b_stride);
    if (backward) return rows && pack_aligned<T, G>(p.grad_out) && pack_aligned<T, G>(p.grad_a) &&
                         pack_aligned<T, G>(p.grad_b);
    return rows && pack_aligned<T, G>(p.out);
  }
}

// One launcher for both directions: the packed kernel (32- or 64-bit index)
// when the operands allow it, else the scalar one.
template <class T>
int launch(const Swiglu& p, cudaStream_t s, bool backward) {
  if constexpr (!std::is_same_v<T, double>) {
    constexpr int G = 16 / int(sizeof(T));
    if (packable<T>(p, backward)) {
      const unsigned blocks = packed_blocks(p, G);
      if (blocks == 0) return 0;
      const bool i32 = packed_index_fits_32(p, G, blocks);
      void (*kernel)(Swiglu) = backward
                                   ? (i32 ? packed_backward_kernel<T, uint32_t> : packed_backward_kernel<T, int64_t>)
                                   : (i32 ? packed_forward_kernel<T, uint32_t> : packed_forward_kernel<T, int64_t>);
      kernel<<<blocks, kThreads, 0, s>>>(p);
      return int(cudaGetLastError());
    }
  }
  (backward ? backward_kernel<T> : forward_kernel<T>)<<<grid(p), kThreads, 0, s>>>(p);
  return int(cudaGetLastError());
}

}  // namespace

int swiglu_forward(const Swiglu& p, stream_t stream) {
  return dispatch_x<int>(p.dtype, int(cudaErrorInvalidValue),
                         [&](auto t) { return launch<decltype(t)>(p, stream, false); });
}

int swiglu_backward(const Swiglu& p, stream_t stream) {
  return dispatch_x<int>(p.dtype, int(cudaErrorInvalidValue),
                         [&](auto t) { return launch<decltype(t)>(p, stream, true); });
}

}  // namespace cuda
}  // namespace ddt

// CUDA kernels for the SwiGLU gate (see ddt/swiglu.h): a 2D grid, rows x
// column tiles (rows grid-strided past 65535), so strided row views need no
// index division per element.
#include <cuda_runtime.h>

#include "ddt/dtype_dispatch.h"
#include "ddt/swiglu.h"

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

dim3 grid(const Swiglu& p) {
  const int64_t tiles = (p.H + kThreads - 1) / kThreads;
  return dim3(unsigned(tiles < 8 ? tiles : 8), unsigned(p.R < 65535 ? p.R : 65535));
}

template <class T>
struct Launch {
  static int forward(const Swiglu& p, cudaStream_t s) {
    forward_kernel<T><<<grid(p), kThreads, 0, s>>>(p);
    return int(cudaGetLastError());
  }
  static int backward(const Swiglu& p, cudaStream_t s) {
    backward_kernel<T><<<grid(p), kThreads, 0, s>>>(p);
    return int(cudaGetLastError());
  }
};

}  // namespace

int swiglu_forward(const Swiglu& p, stream_t stream) {
  return dispatch_x<int>(p.dtype, int(cudaErrorInvalidValue),
                         [&](auto t) { return Launch<decltype(t)>::forward(p, stream); });
}

int swiglu_backward(const Swiglu& p, stream_t stream) {
  return dispatch_x<int>(p.dtype, int(cudaErrorInvalidValue),
                         [&](auto t) { return Launch<decltype(t)>::backward(p, stream); });
}

}  // namespace cuda
}  // namespace ddt

// Shared by the CPU (.cpp) and CUDA (.cu) kernels. Torch-free.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DDT_HD __host__ __device__ __forceinline__
#define DDT_DEVICE __device__ __forceinline__
#else
#define DDT_HD inline
#define DDT_DEVICE inline
#endif

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
struct CUstream_st;
#endif

namespace ddt {

// The CUDA stream handle, spelled without cuda_runtime.h so that host-only
// translation units can declare the CUDA launchers.
using stream_t = struct CUstream_st*;

}  // namespace ddt

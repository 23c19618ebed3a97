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

// Declared at global scope in every translation unit: an elaborated
// `struct CUstream_st*` inside namespace ddt would otherwise name a different
// type, ddt::CUstream_st, in host-only files, and the launchers declared with
// stream_t would not link against their CUDA definitions.
struct CUstream_st;

namespace ddt {

// The CUDA stream handle, spelled without cuda_runtime.h so that host-only
// translation units can declare the CUDA launchers.
using stream_t = CUstream_st*;

}  // namespace ddt

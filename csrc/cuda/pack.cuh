// Packed (vector) loads and stores for the memory-bound CUDA kernels: N
// consecutive elements moved with 16-byte (or, for N * sizeof(T) < 16,
// 8- or 4-byte) transactions and widened to / narrowed from the accumulation
// type with the same load<A>/store<T> conversions the scalar kernels use, so
// packed and scalar paths compute identical values.
//
// Callers guarantee the alignment: ptr 16-byte aligned (the launchers check
// base pointers and strides before choosing a packed kernel).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ddt/dtypes.h"

namespace ddt {
namespace cuda {

template <int Bytes>
struct RawChunk;
template <>
struct RawChunk<16> {
  using type = uint4;
};
template <>
struct RawChunk<8> {
  using type = uint2;
};
template <>
struct RawChunk<4> {
  using type = uint32_t;
};

// Bytes per transaction for N elements of T: 16, or the whole pack when smaller.
template <class T, int N>
constexpr int chunk_bytes() {
  return int(sizeof(T)) * N < 16 ? int(sizeof(T)) * N : 16;
}

// N elements of T as loaded, before widening (16-bit values stay packed two
// per register, so a prefetched pack costs half the registers of a widened one).
template <class T, int N>
struct RawPack {
  static constexpr int kBytes = chunk_bytes<T, N>();
  static constexpr int kPer = kBytes / int(sizeof(T));
  static_assert(kPer * int(sizeof(T)) == kBytes && N % kPer == 0, "pack must split into whole chunks");
  typename RawChunk<kBytes>::type chunk[N / kPer];
};

template <int N, class T>
__device__ __forceinline__ void load_raw(const T* ptr, RawPack<T, N>& p) {
  using Raw = typename RawChunk<RawPack<T, N>::kBytes>::type;
#pragma unroll
  for (int i = 0; i < N / RawPack<T, N>::kPer; ++i) p.chunk[i] = reinterpret_cast<const Raw*>(ptr)[i];
}

// kStream: the evict-first ("streaming") cache hint, for data read once.
template <bool kStream, int N, class T>
__device__ __forceinline__ void load_raw_hinted(const T* ptr, RawPack<T, N>& p) {
  if constexpr (kStream) {
    using Raw = typename RawChunk<RawPack<T, N>::kBytes>::type;
#pragma unroll
    for (int i = 0; i < N / RawPack<T, N>::kPer; ++i) p.chunk[i] = __ldcs(reinterpret_cast<const Raw*>(ptr) + i);
  } else {
    load_raw<N>(ptr, p);
  }
}

template <bool kStream, int N, class T>
__device__ __forceinline__ void store_raw_hinted(T* ptr, const RawPack<T, N>& p) {
  using Raw = typename RawChunk<RawPack<T, N>::kBytes>::type;
#pragma unroll
  for (int i = 0; i < N / RawPack<T, N>::kPer; ++i) {
    if constexpr (kStream)
      __stcs(reinterpret_cast<Raw*>(ptr) + i, p.chunk[i]);
    else
      reinterpret_cast<Raw*>(ptr)[i] = p.chunk[i];
  }
}

template <int N, class A, class T>
__device__ __forceinline__ void unpack(const RawPack<T, N>& p, A (&out)[N]) {
  constexpr int kPer = RawPack<T, N>::kPer;
#pragma unroll
  for (int i = 0; i < N / kPer; ++i) {
    union {
      typename RawChunk<RawPack<T, N>::kBytes>::type raw;
      T v[kPer];
    } u;
    u.raw = p.chunk[i];
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[i * kPer + j] = load<A>(u.v[j]);
  }
}

template <int N, class A, class T>
__device__ __forceinline__ void load_pack(const T* ptr, A (&out)[N]) {
  RawPack<T, N> p;
  load_raw<N>(ptr, p);
  unpack<N>(p, out);
}

// Narrow N accumulation-type values to T, packed as they will be stored.
template <int N, class T, class A>
__device__ __forceinline__ void pack(const A (&in)[N], RawPack<T, N>& p) {
  constexpr int kPer = RawPack<T, N>::kPer;
#pragma unroll
  for (int i = 0; i < N / kPer; ++i) {
    union {
      typename RawChunk<RawPack<T, N>::kBytes>::type raw;
      T v[kPer];
    } u;
#pragma unroll
    for (int j = 0; j < kPer; ++j) u.v[j] = store<T>(in[i * kPer + j]);
    p.chunk[i] = u.raw;
  }
}

template <int N, class T, class A>
__device__ __forceinline__ void store_pack(T* ptr, const A (&in)[N]) {
  RawPack<T, N> p;
  pack<N>(in, p);
  store_raw_hinted<false>(ptr, p);
}

// Host side: can `elements`-wide packs of T start at ptr + k * stride for
// every k? (pointer and stride in elements of T, pack bytes as chunk_bytes.)
template <class T, int N>
inline bool pack_aligned(const void* ptr, int64_t stride = 0) {
  constexpr int kBytes = chunk_bytes<T, N>();
  return reinterpret_cast<uintptr_t>(ptr) % kBytes == 0 && (stride * int64_t(sizeof(T))) % kBytes == 0;
}

}  // namespace cuda
}  // namespace ddt

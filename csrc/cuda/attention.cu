// Flash attention kernels (see ddt/attention.h).
//
// Tiles: a CTA of 4 warps owns 64 rows (each warp 16, the M of one mma), and
// streams the other operand through shared memory in 64-row tiles, two
// stages deep (cp.async, zero-filled past the sequence end). All tensor-core
// work goes through two warp-level building blocks:
//   rows_x_rows: C[16 x N] += A[16 x D] * B[N x D]^T, both from shared memory
//                (contraction over the head dim: q k^T, dO v^T, k q^T, v dO^T)
//   probs_x_rows: C[16 x D] += P[16 x K] * X[K x D], P in registers in the
//                accumulator layout, X from shared memory read transposed
//                (contraction over rows: P v, dS k, P^T dO, dS^T q)
// Fragment layouts are PTX's for mma.m16n8k16 / m16n8k8 (row.col): with
// g = lane / 4 and t = lane % 4, a thread holds C rows g and g + 8, columns
// 2t and 2t + 1 of each 8-wide n-tile.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "ddt/attention.h"
#include "ddt/norm_modulate.h"  // nm::inv_std
#include "ddt/qk_norm_rope.h"   // qk::rotate

namespace ddt {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarp;
constexpr int kRows = 16 * kWarps;  // rows a CTA owns (queries, or keys in the dK/dV kernel)
constexpr int kTile = 64;           // rows per streamed tile in the forward and dQ kernels
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Query tile of the dK/dV kernel: it keeps dK and dV (2 x D/8 x 4 floats)
// plus two 16 x tile score blocks in registers, so D = 128 uses 32 rows.
constexpr int dkdv_tile(int D) { return D > 72 ? 32 : 64; }

// ---------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; `valid == false` writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

template <class T>
struct Mma;

template <>
struct Mma<bf16_t> {
  static __device__ __forceinline__ void k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void k8(float (&c)[4], const uint32_t (&a)[2], uint32_t b0) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  }
};

template <>
struct Mma<f16_t> {
  static __device__ __forceinline__ void k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void k8(float (&c)[4], const uint32_t (&a)[2], uint32_t b0) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  }
};

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class A, int N>
__device__ __forceinline__ void zero(A (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) a[i][e] = 0.f;
}

// ---------------------------------------------------------------- tiles

// Rows [row0, row0 + kN) of a strided [L, D] matrix into shared memory [kN][S].
template <class T, int D, int kN>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int64_t row0, int64_t L) {
  constexpr int S = attention_smem_stride(D), kChunks = D / 8;
  for (int i = threadIdx.x; i < kN * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const int64_t row = row0 + r;
    const bool valid = row < L;
    cp_async16(dst + r * S + c * 8, src + (valid ? row : 0) * row_stride + c * 8, valid);
  }
}

// The fused prologue: q/k RMSNorm + 2D rotary on a tile in shared memory,
// with qk_norm_rope's rounding points. A quad of threads shares a row, each
// owning D/8 consecutive rotary pairs, so 32 rows are in flight at once and
// each thread has D/8 independent pairs (one warp per row is latency-bound).
template <class T, int D, int kN>
__device__ void norm_rope_tile(T* tile, int64_t row0, int64_t L, const float* weight, const float* rope,
                               double eps) {
  constexpr int S = attention_smem_stride(D), kPairs = D / 8, kHalf = D / 2;
  static_assert(kN % (kThreads / 4) == 0, "every quad takes the same number of rows (shuffles below)");
  const int quad = threadIdx.x / 4, part = threadIdx.x % 4;
  for (int r = quad; r < kN; r += kThreads / 4) {
    const int64_t l = row0 + r;
    uint32_t* x = reinterpret_cast<uint32_t*>(tile + r * S) + part * kPairs;  // pairs as 32-bit words
    float v[kPairs][2];
    float sq = 0.f;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const uint32_t w = x[j];
      v[j][0] = load<float>(static_cast<T>(uint16_t(w & 0xffffu)));
      v[j][1] = load<float>(static_cast<T>(uint16_t(w >> 16)));
      sq += v[j][0] * v[j][0] + v[j][1] * v[j][1];
    }
    sq += __shfl_xor_sync(0xffffffffu, sq, 1);
    sq += __shfl_xor_sync(0xffffffffu, sq, 2);
    if (l >= L) continue;  // zero-filled row past the end: leave it
    const float rinv = nm::inv_std<float>(sq / float(D), eps);
    const float* rot = rope + l * kHalf * 2;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const int m = part * kPairs + j;
      const float u0 = round_to<T>(v[j][0] * rinv) * weight[2 * m];
      const float u1 = round_to<T>(v[j][1] * rinv) * weight[2 * m + 1];
      float r0, r1;
      qk::rotate<float>(u0, u1, rot[2 * m], rot[2 * m + 1], r0, r1);
      x[j] = Mma<T>::pack(r0, r1);
    }
  }
}

// ---------------------------------------------------------------- warp matmuls

// acc[kM][16 x kN] += A[kM * 16 x D] * B[kN x D]^T. A: this warp's kM * 16
// rows, B: kN rows, both row-major in shared memory with stride S. Each B
// fragment is loaded once and used for all kM row tiles: with kM = 2 a warp
// reads half as much shared memory per multiply-add as with kM = 1.
template <class T, int D, int kN, int kM>
__device__ __forceinline__ void rows_x_rows_m(float (&acc)[kM][kN / 8][4], const T* a, const T* b) {
  constexpr int S = attention_smem_stride(D), kK16 = D / 16;
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int kc = 0; kc < kK16; ++kc) {
    uint32_t af[kM][4];
    // matrices: rows 0-7 | 8-15 x cols +0 | +8 -> a0..a3
#pragma unroll
    for (int mi = 0; mi < kM; ++mi) ldmatrix_x4(af[mi], a + (mi * 16 + lane % 16) * S + kc * 16 + (lane / 16) * 8);
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t bf[4];
      // matrices: (rows +0, cols +0) (rows +0, cols +8) (rows +8, cols +0) (rows +8, cols +8)
      ldmatrix_x4(bf, b + (np * 16 + (lane / 16) * 8 + lane % 8) * S + kc * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
      for (int mi = 0; mi < kM; ++mi) {
        Mma<T>::k16(acc[mi][2 * np], af[mi], bf[0], bf[1]);
        Mma<T>::k16(acc[mi][2 * np + 1], af[mi], bf[2], bf[3]);
      }
    }
  }
  if constexpr (D % 16 == 8) {  // the last 8 of the head dim (D = 72)
    constexpr int c0 = kK16 * 16;
    uint32_t af[kM][2];
#pragma unroll
    for (int mi = 0; mi < kM; ++mi) ldmatrix_x2(af[mi], a + (mi * 16 + lane % 16) * S + c0);
#pragma unroll
    for (int nq = 0; nq < kN / 32; ++nq) {
      uint32_t bf[4];  // four n-tiles, one b register each
      ldmatrix_x4(bf, b + (nq * 32 + lane) * S + c0);
#pragma unroll
      for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int mi = 0; mi < kM; ++mi) Mma<T>::k8(acc[mi][nq * 4 + m], af[mi], bf[m]);
    }
    if constexpr (kN % 32 == 16) {
      uint32_t bf[2];
      ldmatrix_x2(bf, b + ((kN / 32) * 32 + lane % 16) * S + c0);
#pragma unroll
      for (int mi = 0; mi < kM; ++mi) {
        Mma<T>::k8(acc[mi][kN / 8 - 2], af[mi], bf[0]);
        Mma<T>::k8(acc[mi][kN / 8 - 1], af[mi], bf[1]);
      }
    }
  }
}

// One 16-row tile: acc[16 x kN] += A[16 x D] * B[kN x D]^T.
template <class T, int D, int kN>
__device__ __forceinline__ void rows_x_rows(float (&acc)[kN / 8][4], const T* a, const T* b) {
  rows_x_rows_m<T, D, kN, 1>(reinterpret_cast<float(&)[1][kN / 8][4]>(acc), a, b);
}

// acc[kM][16 x D] += P[kM][16 x kK] * X[kK x D]. P in registers (accumulator
// layout, rounded to T here), X row-major in shared memory with stride S,
// each X fragment loaded once for all kM row tiles.
template <class T, int D, int kK, int kM>
__device__ __forceinline__ void probs_x_rows_m(float (&acc)[kM][D / 8][4], const float (&p)[kM][kK / 8][4],
                                               const T* x) {
  constexpr int S = attention_smem_stride(D);
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int kc = 0; kc < kK / 16; ++kc) {
    uint32_t pf[kM][4];
#pragma unroll
    for (int mi = 0; mi < kM; ++mi) {
      pf[mi][0] = Mma<T>::pack(p[mi][2 * kc][0], p[mi][2 * kc][1]);
      pf[mi][1] = Mma<T>::pack(p[mi][2 * kc][2], p[mi][2 * kc][3]);
      pf[mi][2] = Mma<T>::pack(p[mi][2 * kc + 1][0], p[mi][2 * kc + 1][1]);
      pf[mi][3] = Mma<T>::pack(p[mi][2 * kc + 1][2], p[mi][2 * kc + 1][3]);
    }
    const T* rows = x + (kc * 16 + ((lane / 8) % 2) * 8 + lane % 8) * S;
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t bf[4];
      // transposed matrices: (rows +0, cols +0) (rows +8, cols +0) (rows +0, cols +8) (rows +8, cols +8)
      ldmatrix_x4_trans(bf, rows + dp * 16 + (lane / 16) * 8);
#pragma unroll
      for (int mi = 0; mi < kM; ++mi) {
        Mma<T>::k16(acc[mi][2 * dp], pf[mi], bf[0], bf[1]);
        Mma<T>::k16(acc[mi][2 * dp + 1], pf[mi], bf[2], bf[3]);
      }
    }
    if constexpr (D % 16 == 8) {
      uint32_t bf[2];
      ldmatrix_x2_trans(bf, rows + (D / 16) * 16);
#pragma unroll
      for (int mi = 0; mi < kM; ++mi) Mma<T>::k16(acc[mi][D / 8 - 1], pf[mi], bf[0], bf[1]);
    }
  }
}

// One 16-row tile: acc[16 x D] += P[16 x kK] * X[kK x D].
template <class T, int D, int kK>
__device__ __forceinline__ void probs_x_rows(float (&acc)[D / 8][4], const float (&p)[kK / 8][4], const T* x) {
  probs_x_rows_m<T, D, kK, 1>(reinterpret_cast<float(&)[1][D / 8][4]>(acc),
                              reinterpret_cast<const float(&)[1][kK / 8][4]>(p), x);
}

// Store a warp's 16 x D accumulator rows (times `mul`) to a strided matrix;
// rows at or past L are skipped.
template <class T, int D>
__device__ __forceinline__ void store_rows(T* dst, int64_t row_stride, int64_t row0, int64_t L,
                                           const float (&acc)[D / 8][4], float mul0, float mul1) {
  const int lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = row0 + g + 8 * half;
    if (row >= L) continue;
    const float mul = half ? mul1 : mul0;
    T* out = dst + row * row_stride + 2 * t;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      const uint32_t v = Mma<T>::pack(acc[nt][2 * half] * mul, acc[nt][2 * half + 1] * mul);
      *reinterpret_cast<uint32_t*>(out + nt * 8) = v;
    }
  }
}

template <class T>
__device__ __forceinline__ const T* head(const Strided& s, int64_t b, int64_t h) {
  return static_cast<const T*>(s.ptr) + b * s.batch + h * s.head;
}
template <class T>
__device__ __forceinline__ T* head_mut(const Strided& s, int64_t b, int64_t h) {
  return const_cast<T*>(head<T>(s, b, h));
}

// ---------------------------------------------------------------- forward

// Query rows per CTA of the forward: kM 16-row tiles per warp.
template <int kM>
constexpr int forward_rows() {
  return 16 * kM * kWarps;
}

template <class T, int D, int kM>
constexpr int forward_smem_bytes() {
  return (forward_rows<kM>() + 4 * kTile) * attention_smem_stride(D) * int(sizeof(uint16_t));
}

// kM: 16-row query tiles per warp (2 halves the shared-memory reads per
// multiply-add; 1 leaves registers for D = 128).
template <class T, int D, int kNormRope, int kM>
__global__ void __launch_bounds__(kThreads) forward_kernel(FlashAttention p) {
  constexpr int S = attention_smem_stride(D), kQRows = forward_rows<kM>();
  extern __shared__ __align__(16) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* sk = sq + kQRows * S;     // [2][kTile][S]
  T* sv = sk + 2 * kTile * S;  // [2][kTile][S]
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, t = lane % 4;
  const int64_t q_tiles = (p.Lq + kQRows - 1) / kQRows;
  const int64_t bh = blockIdx.x / q_tiles, q0 = (blockIdx.x % q_tiles) * kQRows;
  const int64_t b = bh / p.H, h = bh % p.H;
  const T* q = head<T>(p.q, b, h);
  const T* k = head<T>(p.k, b, h);
  const T* v = head<T>(p.v, b, h);
  const int n_tiles = int((p.Lk + kTile - 1) / kTile);

  load_tile<T, D, kQRows>(sq, q, p.q.row, q0, p.Lq);
  load_tile<T, D, kTile>(sk, k, p.k.row, 0, p.Lk);
  load_tile<T, D, kTile>(sv, v, p.v.row, 0, p.Lk);
  cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  // per row tile mi: output, running max and sum of the rows g and g + 8
  float o[kM][D / 8][4], m[kM][2], l[kM][2];
#pragma unroll
  for (int mi = 0; mi < kM; ++mi) {
    zero(o[mi]);
    m[mi][0] = m[mi][1] = -INFINITY;
    l[mi][0] = l[mi][1] = 0.f;
  }
  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j % 2;
    T* skj = sk + stage * kTile * S;
    T* svj = sv + stage * kTile * S;
    if (j + 1 < n_tiles) {
      load_tile<T, D, kTile>(sk + (1 - stage) * kTile * S, k, p.k.row, int64_t(j + 1) * kTile, p.Lk);
      load_tile<T, D, kTile>(sv + (1 - stage) * kTile * S, v, p.v.row, int64_t(j + 1) * kTile, p.Lk);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (kNormRope != kNormRopeNone) {
      if (j == 0) norm_rope_tile<T, D, kQRows>(sq, q0, p.Lq, p.q_norm_weight, p.rope, p.eps);
      if (kNormRope == kNormRopeQK) norm_rope_tile<T, D, kTile>(skj, int64_t(j) * kTile, p.Lk, p.k_norm_weight,
                                                                p.rope, p.eps);
      if (kNormRope == kNormRopeQK || j == 0) __syncthreads();
    }
    float s[kM][kTile / 8][4];
#pragma unroll
    for (int mi = 0; mi < kM; ++mi) zero(s[mi]);
    rows_x_rows_m<T, D, kTile, kM>(s, sq + warp * 16 * kM * S, skj);
    const int64_t key0 = int64_t(j) * kTile;
    const bool tail = key0 + kTile > p.Lk;
#pragma unroll
    for (int mi = 0; mi < kM; ++mi) {
#pragma unroll
      for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool valid = !tail || key0 + nt * 8 + 2 * t + (e & 1) < p.Lk;
          s[mi][nt][e] = valid ? s[mi][nt][e] * scale_log2 : -INFINITY;
        }
      float mx[2] = {m[mi][0], m[mi][1]};
#pragma unroll
      for (int nt = 0; nt < kTile / 8; ++nt) {
        mx[0] = fmaxf(mx[0], fmaxf(s[mi][nt][0], s[mi][nt][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[mi][nt][2], s[mi][nt][3]));
      }
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = quad_max(mx[r]);  // finite: every tile holds at least one key
        alpha[r] = exp2f(m[mi][r] - mx[r]);
        m[mi][r] = mx[r];
        l[mi][r] *= alpha[r];
      }
#pragma unroll
      for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mi][nt][e] = exp2f(s[mi][nt][e] - m[mi][e / 2]);
          l[mi][e / 2] += s[mi][nt][e];
        }
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mi][nt][e] *= alpha[e / 2];
    }
    probs_x_rows_m<T, D, kTile, kM>(o, s, svj);
    __syncthreads();  // this stage is refilled next iteration
  }
#pragma unroll
  for (int mi = 0; mi < kM; ++mi) {
    const int64_t row0 = q0 + (warp * kM + mi) * 16;
    for (int r = 0; r < 2; ++r) l[mi][r] = quad_sum(l[mi][r]);
    store_rows<T, D>(head_mut<T>(p.out, b, h), p.out.row, row0, p.Lq, o[mi], 1.f / l[mi][0], 1.f / l[mi][1]);
    if (t == 0) {
      const int g = lane / 4;
      for (int r = 0; r < 2; ++r) {
        const int64_t row = row0 + g + 8 * r;
        if (row < p.Lq) p.lse[bh * p.Lq + row] = (m[mi][r] + log2f(l[mi][r])) * kLn2;
      }
    }
  }
}

// ---------------------------------------------------------------- backward

// delta[b, h, i] = sum_d dO[i, d] * O[i, d], one warp per row.
template <class T>
__global__ void __launch_bounds__(kThreads) delta_kernel(FlashAttention p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (r >= p.B * p.H * p.Lq) return;
  const int64_t i = r % p.Lq, bh = r / p.Lq, b = bh / p.H, h = bh % p.H;
  const T* go = head<T>(p.grad_out, b, h) + i * p.grad_out.row;
  const T* o = head<T>(p.out, b, h) + i * p.out.row;
  float acc = 0.f;
  for (int64_t d = lane; d < p.D; d += kWarp) acc += load<float>(go[d]) * load<float>(o[d]);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[r] = acc;
}

template <class T, int D>
constexpr int dq_smem_bytes() {
  return (2 * kRows + 4 * kTile) * attention_smem_stride(D) * int(sizeof(uint16_t));
}

// dQ for one 64-query tile, streaming key/value tiles.
template <class T, int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(FlashAttention p) {
  constexpr int S = attention_smem_stride(D);
  extern __shared__ __align__(16) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* sdo = sq + kRows * S;
  T* sk = sdo + kRows * S;     // [2][kTile][S]
  T* sv = sk + 2 * kTile * S;  // [2][kTile][S]
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  const int64_t q_tiles = (p.Lq + kRows - 1) / kRows;
  const int64_t bh = blockIdx.x / q_tiles, q0 = (blockIdx.x % q_tiles) * kRows;
  const int64_t b = bh / p.H, h = bh % p.H;
  const T* k = head<T>(p.k, b, h);
  const T* v = head<T>(p.v, b, h);
  const int n_tiles = int((p.Lk + kTile - 1) / kTile);

  load_tile<T, D, kRows>(sq, head<T>(p.q, b, h), p.q.row, q0, p.Lq);
  load_tile<T, D, kRows>(sdo, head<T>(p.grad_out, b, h), p.grad_out.row, q0, p.Lq);
  load_tile<T, D, kTile>(sk, k, p.k.row, 0, p.Lk);
  load_tile<T, D, kTile>(sv, v, p.v.row, 0, p.Lk);
  cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  const int64_t row0 = q0 + warp * 16;
  float lse2[2], delta[2];
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + g + 8 * r;
    lse2[r] = row < p.Lq ? p.lse[bh * p.Lq + row] * kLog2e : INFINITY;
    delta[r] = row < p.Lq ? p.delta[bh * p.Lq + row] : 0.f;
  }
  float dq[D / 8][4];
  zero(dq);
  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j % 2;
    T* skj = sk + stage * kTile * S;
    T* svj = sv + stage * kTile * S;
    if (j + 1 < n_tiles) {
      load_tile<T, D, kTile>(sk + (1 - stage) * kTile * S, k, p.k.row, int64_t(j + 1) * kTile, p.Lk);
      load_tile<T, D, kTile>(sv + (1 - stage) * kTile * S, v, p.v.row, int64_t(j + 1) * kTile, p.Lk);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    float s[kTile / 8][4], dp[kTile / 8][4];
    zero(s);
    zero(dp);
    rows_x_rows<T, D, kTile>(s, sq + warp * 16 * S, skj);
    rows_x_rows<T, D, kTile>(dp, sdo + warp * 16 * S, svj);
    const int64_t key0 = int64_t(j) * kTile;
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool valid = key0 + nt * 8 + 2 * t + (e & 1) < p.Lk;
        const float prob = valid ? exp2f(s[nt][e] * scale_log2 - lse2[e / 2]) : 0.f;
        s[nt][e] = prob * (dp[nt][e] - delta[e / 2]);  // dS
      }
    probs_x_rows<T, D, kTile>(dq, s, skj);
    __syncthreads();
  }
  store_rows<T, D>(head_mut<T>(p.grad_q, b, h), p.grad_q.row, row0, p.Lq, dq, p.scale, p.scale);
}

template <class T, int D>
constexpr int dkdv_smem_bytes() {
  return (2 * kRows + 4 * dkdv_tile(D)) * attention_smem_stride(D) * int(sizeof(uint16_t)) +
         4 * dkdv_tile(D) * int(sizeof(float));
}

// dK and dV for one 64-key tile, streaming query tiles.
template <class T, int D>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(FlashAttention p) {
  constexpr int S = attention_smem_stride(D), kQ = dkdv_tile(D);
  extern __shared__ __align__(16) unsigned char smem[];
  T* sk = reinterpret_cast<T*>(smem);
  T* sv = sk + kRows * S;
  T* sq = sv + kRows * S;      // [2][kQ][S]
  T* sdo = sq + 2 * kQ * S;    // [2][kQ][S]
  float* slse = reinterpret_cast<float*>(sdo + 2 * kQ * S);  // [2][kQ], log2 units
  float* sdelta = slse + 2 * kQ;                            // [2][kQ]
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, t = lane % 4;
  const int64_t k_tiles = (p.Lk + kRows - 1) / kRows;
  const int64_t bh = blockIdx.x / k_tiles, k0 = (blockIdx.x % k_tiles) * kRows;
  const int64_t b = bh / p.H, h = bh % p.H;
  const T* q = head<T>(p.q, b, h);
  const T* go = head<T>(p.grad_out, b, h);
  const float* lse = p.lse + bh * p.Lq;
  const float* dlt = p.delta + bh * p.Lq;
  const int n_tiles = int((p.Lq + kQ - 1) / kQ);

  load_tile<T, D, kRows>(sk, head<T>(p.k, b, h), p.k.row, k0, p.Lk);
  load_tile<T, D, kRows>(sv, head<T>(p.v, b, h), p.v.row, k0, p.Lk);
  load_tile<T, D, kQ>(sq, q, p.q.row, 0, p.Lq);
  load_tile<T, D, kQ>(sdo, go, p.grad_out.row, 0, p.Lq);
  cp_async_commit();
  // +inf log-sum-exp past the end: those queries get probability 0
  for (int i = threadIdx.x; i < kQ; i += kThreads) {
    slse[i] = i < p.Lq ? lse[i] * kLog2e : INFINITY;
    sdelta[i] = i < p.Lq ? dlt[i] : 0.f;
  }

  const float scale_log2 = p.scale * kLog2e;
  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j % 2;
    T* sqj = sq + stage * kQ * S;
    T* sdoj = sdo + stage * kQ * S;
    const float* lsej = slse + stage * kQ;
    const float* deltaj = sdelta + stage * kQ;
    if (j + 1 < n_tiles) {
      const int64_t next = int64_t(j + 1) * kQ;
      load_tile<T, D, kQ>(sq + (1 - stage) * kQ * S, q, p.q.row, next, p.Lq);
      load_tile<T, D, kQ>(sdo + (1 - stage) * kQ * S, go, p.grad_out.row, next, p.Lq);
      cp_async_commit();
      for (int i = threadIdx.x; i < kQ; i += kThreads) {
        slse[(1 - stage) * kQ + i] = next + i < p.Lq ? lse[next + i] * kLog2e : INFINITY;
        sdelta[(1 - stage) * kQ + i] = next + i < p.Lq ? dlt[next + i] : 0.f;
      }
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    float st[kQ / 8][4], dpt[kQ / 8][4];
    zero(st);
    zero(dpt);
    rows_x_rows<T, D, kQ>(st, sk + warp * 16 * S, sqj);    // S^T = K Q^T
    rows_x_rows<T, D, kQ>(dpt, sv + warp * 16 * S, sdoj);  // dP^T = V dO^T
#pragma unroll
    for (int nt = 0; nt < kQ / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + (e & 1);
        st[nt][e] = exp2f(st[nt][e] * scale_log2 - lsej[col]);  // P^T
        dpt[nt][e] = st[nt][e] * (dpt[nt][e] - deltaj[col]);    // dS^T
      }
    probs_x_rows<T, D, kQ>(dv, st, sdoj);  // dV += P^T dO
    probs_x_rows<T, D, kQ>(dk, dpt, sqj);  // dK += dS^T Q
    __syncthreads();
  }
  const int64_t row0 = k0 + warp * 16;
  store_rows<T, D>(head_mut<T>(p.grad_k, b, h), p.grad_k.row, row0, p.Lk, dk, p.scale, p.scale);
  store_rows<T, D>(head_mut<T>(p.grad_v, b, h), p.grad_v.row, row0, p.Lk, dv, 1.f, 1.f);
}

// ---------------------------------------------------------------- launch

// 16-row query tiles per warp in the forward for D <= 72: 2, or what
// DDT_FAST_ATTENTION_WARP_ROWS (16 or 32 rows) says (for benchmarking both).
int forward_row_tiles_per_warp() {
  static const int tiles = [] {
    const char* env = std::getenv("DDT_FAST_ATTENTION_WARP_ROWS");
    return env != nullptr && std::atoi(env) == 16 ? 1 : 2;
  }();
  return tiles;
}

template <class Kernel>
int launch(Kernel kernel, int64_t blocks, int smem, cudaStream_t stream, const FlashAttention& p) {
  if (blocks <= 0) return 0;
  if (blocks > 0x7fffffff) return int(cudaErrorInvalidConfiguration);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return int(e);
  }
  kernel<<<unsigned(blocks), kThreads, smem, stream>>>(p);
  return int(cudaGetLastError());
}

template <class T, int D, int kM>
int forward_m(const FlashAttention& p, cudaStream_t s) {
  const int64_t blocks = p.B * p.H * ((p.Lq + forward_rows<kM>() - 1) / forward_rows<kM>());
  constexpr int smem = forward_smem_bytes<T, D, kM>();
  switch (p.norm_rope) {
    case kNormRopeQK: return launch(forward_kernel<T, D, kNormRopeQK, kM>, blocks, smem, s, p);
    case kNormRopeQ: return launch(forward_kernel<T, D, kNormRopeQ, kM>, blocks, smem, s, p);
    default: return launch(forward_kernel<T, D, kNormRopeNone, kM>, blocks, smem, s, p);
  }
}

template <class T, int D>
int forward(const FlashAttention& p, cudaStream_t s) {
  if constexpr (D <= 72) {  // D = 128 with two row tiles per warp would spill
    if (forward_row_tiles_per_warp() == 2) return forward_m<T, D, 2>(p, s);
  }
  return forward_m<T, D, 1>(p, s);
}

template <class T, int D>
int backward(const FlashAttention& p, cudaStream_t s) {
  int err = launch(delta_kernel<T>, (p.B * p.H * p.Lq + kWarps - 1) / kWarps, 0, s, p);
  if (err) return err;
  err = launch(dq_kernel<T, D>, p.B * p.H * ((p.Lq + kRows - 1) / kRows), dq_smem_bytes<T, D>(), s, p);
  if (err) return err;
  return launch(dkdv_kernel<T, D>, p.B * p.H * ((p.Lk + kRows - 1) / kRows), dkdv_smem_bytes<T, D>(), s, p);
}

template <class Fn>
int dispatch(const FlashAttention& p, Fn&& fn) {
  auto by_dim = [&](auto t) -> int {
    using T = decltype(t);
    switch (p.D) {
      case 64: return fn.template operator()<T, 64>();
      case 72: return fn.template operator()<T, 72>();
      case 128: return fn.template operator()<T, 128>();
      default: return int(cudaErrorInvalidValue);
    }
  };
  if (p.dtype == DType::bf16) return by_dim(bf16_t{});
  if (p.dtype == DType::f16) return by_dim(f16_t{});
  return int(cudaErrorInvalidValue);
}

}  // namespace

int flash_attention_forward(const FlashAttention& p, stream_t stream) {
  if (p.norm_rope != kNormRopeNone && p.Lq != p.Lk) return int(cudaErrorInvalidValue);
  return dispatch(p, [&]<class T, int D>() { return forward<T, D>(p, stream); });
}

int flash_attention_backward(const FlashAttention& p, stream_t stream) {
  return dispatch(p, [&]<class T, int D>() { return backward<T, D>(p, stream); });
}

}  // namespace cuda
}  // namespace ddt

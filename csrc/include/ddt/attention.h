// Flash attention for DDT shapes (docs/spec.md, "Fused op families" 5), CUDA only.
//
// softmax(scale * q k^T) v per (batch, head), online softmax over key tiles,
// no L x L matrix in memory. Inputs are 16-bit (bf16 or f16); products
// accumulate in float32 on the tensor cores (mma.sync m16n8k16, plus m16n8k8
// for the last 8 of head dim 72). Head dims 64, 72 and 128.
//
// Every tensor is addressed through element strides for (batch, head, row);
// the head dim is contiguous. That lets one kernel read q/k/v either as
// [B, H, L, D] tensors or straight out of the packed qkv [B, L, 3, H, D]
// projection, and write the output either way, [B, H, L, D] or the merged
// [B, L, H*D] the output projection reads.
//
// The fused prologue (`norm_rope`): q (and with kNormRopeQK also k) are the
// raw packed projections, and each such tile gets the q/k RMSNorm and the 2D
// rotary embedding in shared memory after it lands, with the rounding points
// of ddt/qk_norm_rope.h. With kNormRopeQ, k was normalised beforehand (by
// the qk_norm_rope kernel, k alone): every query tile reads every key tile,
// so normalising keys in the prologue repeats that work L/64 times.
//
// Backward (deterministic, no atomics): delta = rowsum(dO * O), then one
// kernel per query tile for dQ and one per key tile for dK and dV, each
// recomputing the probabilities from the saved log-sum-exp.
#pragma once

#include <cstdint>

#include "ddt/common.h"
#include "ddt/dtypes.h"

namespace ddt {

enum : int { kNormRopeNone = 0, kNormRopeQK = 1, kNormRopeQ = 2 };

struct Strided {
  const void* ptr = nullptr;
  int64_t batch = 0, head = 0, row = 0;  // element strides
};

struct FlashAttention {
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, D = 0;
  DType dtype = DType::bf16;  // q, k, v, out and their gradients
  float scale = 1.f;          // softmax scale (1/sqrt(D) by default)
  Strided q, k, v;
  Strided out;     // forward: written (ptr cast away from const); backward: read
  float* lse = nullptr;  // [B, H, Lq]: natural-log log-sum-exp of the scaled scores
  // fused prologue (forward only): kNormRopeNone | kNormRopeQK | kNormRopeQ
  int norm_rope = 0;
  const float* q_norm_weight = nullptr;  // [D], float32
  const float* k_norm_weight = nullptr;  // [D], float32
  const float* rope = nullptr;           // [Lq, D/2, 2] (cos, sin); needs Lq == Lk
  double eps = 1e-6;
  // backward
  Strided grad_out;
  Strided grad_q, grad_k, grad_v;  // written
  float* delta = nullptr;          // workspace [B, H, Lq]
};

// Shared-memory row stride (elements) of a D-wide tile: 16-byte rows whose
// count per row is odd, so the 8 row addresses of an ldmatrix hit 8 distinct
// 16-byte bank groups (no conflicts).
DDT_HD constexpr int attention_smem_stride(int D) { return (D / 8) % 2 == 1 ? D : D + 8; }

DDT_HD constexpr bool attention_head_dim_supported(int64_t D) { return D == 64 || D == 72 || D == 128; }

namespace cuda {
int flash_attention_forward(const FlashAttention& p, stream_t stream);
int flash_attention_backward(const FlashAttention& p, stream_t stream);
}  // namespace cuda

}  // namespace ddt

// q/k RMSNorm + 2D rotary embedding + head split (docs/spec.md, "Fused op families" 3).
//
// From the packed attention input qkv [B, L, 3, H, D] (contiguous) write
//   q = rope(RMSNorm(q_raw) * q_weight), k = rope(RMSNorm(k_raw) * k_weight), v = v_raw
// each as [B, H, L, D] (the layout attention reads). The rotary table holds
// (cos, sin) per token and pair: rope[L, D/2, 2] float32; pair m of a head
// vector, (v[2m], v[2m+1]) = re + i*im, is multiplied by cos + i*sin.
// Rounding: the normalised value is cast to the input dtype (the spec's
// rounding point); weight and rotation are applied in float32 and the result
// rounded once to the input dtype.
#pragma once

#include <cmath>

#include "ddt/common.h"
#include "ddt/dtypes.h"
#include "ddt/norm_modulate.h"  // nm::inv_std

namespace ddt {

struct QkNormRope {
  int64_t B = 0, L = 0, H = 0, D = 0;
  double eps = 1e-6;
  DType x_dtype = DType::f32;  // qkv, q, k, v (and their gradients)
  DType w_dtype = DType::f32;  // q_weight, k_weight
  const void* qkv = nullptr;
  const void* q_weight = nullptr;
  const void* k_weight = nullptr;
  const float* rope = nullptr;  // [L, D/2, 2]
  // forward: the parts written (0 q, 1 k, 2 v; CUDA kernel only — the
  // flash-attention prologue asks for k alone); outputs of other parts may be null
  int parts_begin = 0, parts_end = 3;
  void* q = nullptr;
  void* k = nullptr;
  void* v = nullptr;
  // backward: inputs grad_q/k/v [B, H, L, D] (any may be null = zero), outputs
  const void* grad_q = nullptr;
  const void* grad_k = nullptr;
  const void* grad_v = nullptr;
  void* grad_qkv = nullptr;       // [B, L, 3, H, D]
  void* grad_q_weight = nullptr;  // [D]
  void* grad_k_weight = nullptr;  // [D]
};

namespace qk {

// Offsets of (b, l, part, h) in the packed input and of (b, h, l) in the outputs.
DDT_HD int64_t packed(const QkNormRope& p, int64_t b, int64_t l, int64_t part, int64_t h) {
  return (((b * p.L + l) * 3 + part) * p.H + h) * p.D;
}
DDT_HD int64_t split(const QkNormRope& p, int64_t b, int64_t h, int64_t l) { return ((b * p.H + h) * p.L + l) * p.D; }

// (re, im) * (cos, sin): a complex product (float32 for 16/32-bit inputs, as
// the reference's complex64; double for float64 so gradcheck sees exact math).
template <class A>
DDT_HD void rotate(A re, A im, A c, A s, A& out_re, A& out_im) {
  out_re = re * c - im * s;
  out_im = re * s + im * c;
}

}  // namespace qk

namespace cpu {
void qk_norm_rope_forward(const QkNormRope& p);
void qk_norm_rope_backward(const QkNormRope& p);
}  // namespace cpu

namespace cuda {
int64_t qk_norm_rope_backward_workspace_bytes(const QkNormRope& p);
int qk_norm_rope_forward(const QkNormRope& p, stream_t stream);
int qk_norm_rope_backward(const QkNormRope& p, void* workspace, stream_t stream);
}  // namespace cuda

}  // namespace ddt

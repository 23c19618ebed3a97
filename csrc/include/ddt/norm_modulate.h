// Fused adaLN glue of a DDT block (docs/spec.md, "Fused op families" 1 and 2):
//   x' = x + gate * y                          (residual, optional)
//   out = norm(x') * (1 + scale) + shift       (norm: RMSNorm with weight, weight-free LayerNorm, or none)
// over rows of C elements; shift/scale/gate are per sample ([B,1,C], row
// stride 0 over L) or per token ([B,L,C]), possibly strided views of one
// [B, L, k*C] modulation tensor. Forward and backward; torch-free.
//
// Rounding: the normalised value is cast to the input dtype before the weight
// (the spec's rounding point); everything after it stays in float32 and is
// rounded once when stored in x's dtype (as torch.compile's fused code does;
// eager PyTorch rounds after every 16-bit op, so 16-bit results differ from
// eager by about one ulp).
#pragma once

#include <cmath>

#include "ddt/common.h"
#include "ddt/dtypes.h"

namespace ddt {

enum class NormKind : int { none = 0, rms = 1, layer = 2 };

// A [B, L, C] operand: element (b, l, c) at ptr[b * stride_b + l * stride_l + c].
// stride_l == 0 broadcasts one row per sample.
struct Rows {
  const void* ptr = nullptr;
  int64_t stride_b = 0;
  int64_t stride_l = 0;
  DDT_HD bool per_token() const { return stride_l != 0; }
};
struct MutRows {
  void* ptr = nullptr;
  int64_t stride_b = 0;
  int64_t stride_l = 0;
};

struct NormModulateForward {
  int64_t B = 0, L = 0, C = 0;
  NormKind kind = NormKind::rms;
  bool residual = false;
  double eps = 1e-6;
  DType x_dtype = DType::f32;    // x, y, out, x_out
  DType w_dtype = DType::f32;    // weight
  DType mod_dtype = DType::f32;  // shift, scale, gate
  Rows x, y, gate, shift, scale;
  const void* weight = nullptr;  // [C], rms only
  MutRows out;                   // kind != none
  MutRows x_out;                 // residual
};

struct NormModulateBackward {
  int64_t B = 0, L = 0, C = 0;
  NormKind kind = NormKind::rms;
  bool residual = false;
  double eps = 1e-6;
  DType x_dtype = DType::f32, w_dtype = DType::f32, mod_dtype = DType::f32;
  Rows grad_out;     // kind != none
  Rows grad_x_out;   // residual (may be null: no gradient flowed into x')
  Rows x;            // the normalised rows: x' when residual, else x
  Rows y, gate;      // residual
  Rows scale;        // kind != none (its per_token() also shapes grad_scale)
  Rows shift;        // only per_token() is read: shapes grad_shift
  const void* weight = nullptr;
  // Outputs. grad_shift/grad_scale/grad_gate are [B, L, C] contiguous when the
  // forward operand was per token, [B, 1, C] when per sample (summed over L).
  void* grad_x = nullptr;       // x dtype
  void* grad_y = nullptr;       // x dtype, residual
  void* grad_gate = nullptr;    // mod dtype, residual
  void* grad_shift = nullptr;   // mod dtype, kind != none
  void* grad_scale = nullptr;   // mod dtype, kind != none
  void* grad_weight = nullptr;  // w dtype, rms
};

namespace nm {

// x' = x + gate * y (the caller stores it in x's dtype).
template <class A>
DDT_HD A residual(A x, A gate, A y) {
  return x + gate * y;
}

// norm(x') * w * (1 + scale) + shift from the rounded normalised value n.
template <class A>
DDT_HD A modulate(A n, A w, A shift, A scale) {
  return n * w * (A(1) + scale) + shift;
}

template <class A>
DDT_HD A inv_std(A sum_sq_or_var, double eps) {
  return A(1) / std::sqrt(sum_sq_or_var + A(eps));
}

}  // namespace nm

namespace cpu {
void norm_modulate_forward(const NormModulateForward& p);
void norm_modulate_backward(const NormModulateBackward& p);
}  // namespace cpu

namespace cuda {
// Scratch the backward needs for per-sample and weight reductions, in bytes.
int64_t norm_modulate_backward_workspace_bytes(const NormModulateBackward& p);
int norm_modulate_forward(const NormModulateForward& p, stream_t stream);
int norm_modulate_backward(const NormModulateBackward& p, void* workspace, stream_t stream);
}  // namespace cuda

}  // namespace ddt

// torch.ops.ddt_fast: q/k RMSNorm + 2D rotary + head split (schemas, checks, CPU/CUDA).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <utility>

#if defined(DDT_FAST_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "ddt/qk_norm_rope.h"
#include "checks.h"
#include "dtype.h"

namespace {

struct Prepared {
  ddt::QkNormRope p;
  at::Tensor qkv, q_weight, k_weight, rope;
};

Prepared prepare(const at::Tensor& qkv_in, const at::Tensor& q_weight, const at::Tensor& k_weight, int64_t num_heads,
                 const at::Tensor& rope, double eps) {
  Prepared r;
  TORCH_CHECK(qkv_in.dim() == 3, "ddt_fast: qkv must be [B, L, 3C], got ", qkv_in.sizes());
  ddt_fast::check_num_heads(num_heads, qkv_in.size(2));
  ddt_fast::check_eps(eps);
  ddt_fast::dtype_of(qkv_in, "qkv");
  r.qkv = qkv_in.contiguous();
  auto& p = r.p;
  p.B = r.qkv.size(0), p.L = r.qkv.size(1), p.H = num_heads, p.D = r.qkv.size(2) / (3 * num_heads);
  TORCH_CHECK(p.D % 4 == 0, "ddt_fast: head dim ", p.D, " must be a multiple of 4 for the 2D rotary embedding");
  p.eps = eps;
  p.x_dtype = ddt_fast::dtype_of(r.qkv, "qkv");
  const std::pair<const at::Tensor*, const char*> weights[] = {{&q_weight, "q_weight"}, {&k_weight, "k_weight"}};
  for (const auto& [w, name] : weights) {
    TORCH_CHECK(w->dim() == 1 && w->size(0) == p.D, "ddt_fast: ", name, ": q/k norm weights must be [head_dim] = [",
                p.D, "], got ", w->sizes());
    TORCH_CHECK(w->scalar_type() == r.qkv.scalar_type() || w->scalar_type() == at::kFloat, "ddt_fast: ", name,
                ": q/k norm weights must have qkv's dtype (", r.qkv.scalar_type(), ") or float32, got ",
                w->scalar_type());
    ddt_fast::check_device(*w, name, r.qkv, "qkv");
  }
  TORCH_CHECK(q_weight.scalar_type() == k_weight.scalar_type(), "ddt_fast: q_weight and k_weight differ in dtype (",
              q_weight.scalar_type(), " and ", k_weight.scalar_type(), ")");
  r.q_weight = q_weight.contiguous();
  r.k_weight = k_weight.contiguous();
  p.w_dtype = ddt_fast::dtype_of(r.q_weight, "q_weight");
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.dim() == 3 && rope.size(0) == p.L && rope.size(1) == p.D / 2 &&
                  rope.size(2) == 2,
              "ddt_fast: rope must be float32 [L, D/2, 2] = [", p.L, ", ", p.D / 2, ", 2] (cos, sin), got ",
              rope.scalar_type(), " ", rope.sizes());
  ddt_fast::check_device(rope, "rope", r.qkv, "qkv");
  r.rope = rope.contiguous();
  p.qkv = r.qkv.data_ptr();
  p.q_weight = r.q_weight.data_ptr();
  p.k_weight = r.k_weight.data_ptr();
  p.rope = r.rope.data_ptr<float>();
  return r;
}

at::Tensor split_like(const Prepared& r) { return at::empty({r.p.B, r.p.H, r.p.L, r.p.D}, r.qkv.options()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& qkv, const at::Tensor& q_weight,
                                                            const at::Tensor& k_weight, int64_t num_heads,
                                                            const at::Tensor& rope, double eps) {
  auto r = prepare(qkv, q_weight, k_weight, num_heads, rope, eps);
  at::Tensor q = split_like(r), k = split_like(r), v = split_like(r);
  r.p.q = q.data_ptr(), r.p.k = k.data_ptr(), r.p.v = v.data_ptr();
  if (q.numel() == 0) return {q, k, v};
#if defined(DDT_FAST_WITH_CUDA)
  if (r.qkv.is_cuda()) {
    const c10::cuda::CUDAGuard guard(r.qkv.device());
    const int err = ddt::cuda::qk_norm_rope_forward(r.p, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, "ddt_fast: qk_norm_rope CUDA launch failed (error ", err, ")");
    return {q, k, v};
  }
#endif
  ddt::cpu::qk_norm_rope_forward(r.p);
  return {q, k, v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward(const c10::optional<at::Tensor>& grad_q,
                                                                     const c10::optional<at::Tensor>& grad_k,
                                                                     const c10::optional<at::Tensor>& grad_v,
                                                                     const at::Tensor& qkv, const at::Tensor& q_weight,
                                                                     const at::Tensor& k_weight, int64_t num_heads,
                                                                     const at::Tensor& rope, double eps) {
  auto r = prepare(qkv, q_weight, k_weight, num_heads, rope, eps);
  at::Tensor g[3];
  const c10::optional<at::Tensor>* in[3] = {&grad_q, &grad_k, &grad_v};
  const char* names[3] = {"grad_q", "grad_k", "grad_v"};
  const void** slots[3] = {&r.p.grad_q, &r.p.grad_k, &r.p.grad_v};
  for (int i = 0; i < 3; ++i) {
    if (!in[i]->has_value()) continue;
    const at::Tensor& gi = **in[i];
    ddt_fast::check_grad(gi, names[i], r.qkv, "qkv");
    TORCH_CHECK(
        gi.dim() == 4 && gi.size(0) == r.p.B && gi.size(1) == r.p.H && gi.size(2) == r.p.L && gi.size(3) == r.p.D,
        "ddt_fast: ", names[i], ": qk_norm_rope gradients must be [B, H, L, D] = [", r.p.B, ", ", r.p.H, ", ", r.p.L,
        ", ", r.p.D, "], got ", gi.sizes());
    g[i] = gi.to(r.qkv.scalar_type()).contiguous();
    *slots[i] = g[i].data_ptr();
  }
  at::Tensor grad_qkv = at::empty_like(r.qkv), gqw = at::empty_like(r.q_weight), gkw = at::empty_like(r.k_weight);
  r.p.grad_qkv = grad_qkv.data_ptr(), r.p.grad_q_weight = gqw.data_ptr(), r.p.grad_k_weight = gkw.data_ptr();
  if (r.qkv.numel() == 0) {
    gqw.zero_(), gkw.zero_();
    return {grad_qkv, gqw, gkw};
  }
#if defined(DDT_FAST_WITH_CUDA)
  if (r.qkv.is_cuda()) {
    const c10::cuda::CUDAGuard guard(r.qkv.device());
    auto ws = at::empty({ddt::cuda::qk_norm_rope_backward_workspace_bytes(r.p)}, r.qkv.options().dtype(at::kByte));
    const int err = ddt::cuda::qk_norm_rope_backward(r.p, ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, "ddt_fast: qk_norm_rope_backward CUDA launch failed (error ", err, ")");
    return {grad_qkv, gqw, gkw};
  }
#endif
  ddt::cpu::qk_norm_rope_backward(r.p);
  return {grad_qkv, gqw, gkw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ddt_fast, m) {
  m.def(
      "qk_norm_rope(Tensor qkv, Tensor q_weight, Tensor k_weight, int num_heads, Tensor rope, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "qk_norm_rope_backward(Tensor? grad_q, Tensor? grad_k, Tensor? grad_v, Tensor qkv, Tensor q_weight, "
      "Tensor k_weight, int num_heads, Tensor rope, float eps) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ddt_fast, CPU, m) {
  m.impl("qk_norm_rope", &qk_norm_rope);
  m.impl("qk_norm_rope_backward", &qk_norm_rope_backward);
}

#if defined(DDT_FAST_WITH_CUDA)
TORCH_LIBRARY_IMPL(ddt_fast, CUDA, m) {
  m.impl("qk_norm_rope", &qk_norm_rope);
  m.impl("qk_norm_rope_backward", &qk_norm_rope_backward);
}
#endif

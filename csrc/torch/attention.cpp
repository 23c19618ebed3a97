// torch.ops.ddt_fast: flash attention (schemas, checks, CUDA registration).
//
//   flash_attention(q, k, v, scale) -> (out, lse)
//       q [B, H, Lq, D], k and v [B, H, Lk, D]; out [B, H, Lq, D] (stored as
//       [B, Lq, H, D], so out.transpose(1, 2).reshape(B, Lq, H * D) is free);
//       lse [B, H, Lq] float32.
//   flash_attention_backward(grad_out, q, k, v, out, lse, scale) -> (grad_q, grad_k, grad_v)
//   qkv_attention(qkv, q_weight, k_weight, num_heads, rope, eps, scale, k_prepass=True) -> (out, lse)
//       the fused prologue: qkv [B, L, 3C] as the qkv projection writes it,
//       q/k RMSNorm + 2D rotary applied on the fly; out [B, L, C] merged.
//       k_prepass: normalise k once with the qk_norm_rope kernel (k alone)
//       instead of in every query tile's prologue (see ddt/attention.h).
// The schemas exist in every build (so fake tensors and dispatch checks work);
// the kernels only in CUDA builds.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <utility>

#if defined(DDT_FAST_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "ddt/attention.h"
#include "ddt/qk_norm_rope.h"
#include "checks.h"
#include "dtype.h"

namespace {

#if defined(DDT_FAST_WITH_CUDA)

bool kernel_addressable(const at::Tensor& t) {
  // 16-byte row loads: contiguous head dim, every other stride a multiple of 8 elements
  if (t.stride(-1) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.stride(d) % 8 != 0) return false;
  return true;
}

// A tensor the kernel can address: `t`, or a fresh (so aligned) contiguous copy.
// (t.contiguous() would hand back a contiguous but misaligned `t` unchanged.)
at::Tensor addressable(const at::Tensor& t) {
  return kernel_addressable(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

ddt::Strided strided_bhld(const at::Tensor& t) {
  ddt::Strided s;
  s.ptr = t.data_ptr();
  s.batch = t.stride(0), s.head = t.stride(1), s.row = t.stride(2);
  return s;
}

void check_bhld(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 4, "ddt_fast: attention expects ", name, " as [B, H, L, D], got ", t.sizes());
  TORCH_CHECK(t.is_cuda(), "ddt_fast: the flash-attention kernel runs on CUDA tensors; ", name, " is on ", t.device(),
              " (use torch.nn.functional.scaled_dot_product_attention on the CPU)");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "ddt_fast: attention inputs differ in dtype (", name, " is ",
              t.scalar_type(), ", q is ", like.scalar_type(), ")");
  ddt_fast::check_device(t, name, like, "q");
  TORCH_CHECK(t.size(0) == like.size(0) && t.size(1) == like.size(1) && t.size(3) == like.size(3), "ddt_fast: ", name,
              " has shape ", t.sizes(), ", incompatible with q ", like.sizes());
}

void check_head_dim_and_dtype(int64_t D, const at::Tensor& t, const char* name) {
  TORCH_CHECK(ddt::attention_head_dim_supported(D),
              "ddt_fast: the flash-attention kernel supports head dims 64, 72 "
              "and 128, got ",
              D, "; use DDT_FAST_ATTENTION=sdpa (ddt_fast.ops.attention falls back by itself)");
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, "ddt_fast: ", name, " has dtype ",
              t.scalar_type(), "; the flash-attention kernel takes bfloat16 or float16");
}

void run(int err, const char* what) {
  TORCH_CHECK(err == 0, "ddt_fast: ", what, " CUDA launch failed (error ", err, ")");
}

std::tuple<at::Tensor, at::Tensor> flash_attention(const at::Tensor& q_in, const at::Tensor& k_in,
                                                   const at::Tensor& v_in, double scale) {
  check_bhld(q_in, "q", q_in);
  check_bhld(k_in, "k", q_in);
  check_bhld(v_in, "v", q_in);
  TORCH_CHECK(k_in.size(2) == v_in.size(2), "ddt_fast: k and v differ in length: ", k_in.sizes(), " vs ", v_in.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(1), Lq = q_in.size(2), Lk = k_in.size(2), D = q_in.size(3);
  check_head_dim_and_dtype(D, q_in, "q");
  ddt_fast::check_scale(scale);
  TORCH_CHECK(Lk > 0 || Lq == 0, "ddt_fast: attention over zero keys is undefined");
  const at::Tensor q = addressable(q_in), k = addressable(k_in), v = addressable(v_in);
  at::Tensor out = at::empty({B, Lq, H, D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const c10::cuda::CUDAGuard guard(q.device());
  ddt::FlashAttention p;
  p.B = B, p.H = H, p.Lq = Lq, p.Lk = Lk, p.D = D;
  p.dtype = ddt_fast::dtype_of(q, "q");
  p.scale = float(scale);
  p.q = strided_bhld(q), p.k = strided_bhld(k), p.v = strided_bhld(v), p.out = strided_bhld(out);
  p.lse = lse.data_ptr<float>();
  run(ddt::cuda::flash_attention_forward(p, c10::cuda::getCurrentCUDAStream().stream()), "flash_attention");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward(const at::Tensor& grad_out_in,
                                                                        const at::Tensor& q_in, const at::Tensor& k_in,
                                                                        const at::Tensor& v_in,
                                                                        const at::Tensor& out_in,
                                                                        const at::Tensor& lse_in, double scale) {
  check_bhld(q_in, "q", q_in);
  check_bhld(k_in, "k", q_in);
  check_bhld(v_in, "v", q_in);
  check_bhld(out_in, "out", q_in);
  check_bhld(grad_out_in, "grad_out", q_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), Lq = q_in.size(2), Lk = k_in.size(2), D = q_in.size(3);
  check_head_dim_and_dtype(D, q_in, "q");
  ddt_fast::check_scale(scale);
  TORCH_CHECK(out_in.sizes() == q_in.sizes(), "ddt_fast: out must be shaped like q ", q_in.sizes(), ", got ",
              out_in.sizes());
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes(), "ddt_fast: grad_out must be shaped like q ", q_in.sizes(), ", got ",
              grad_out_in.sizes());
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), "ddt_fast: v must be shaped like k ", k_in.sizes(), ", got ", v_in.sizes());
  TORCH_CHECK(Lk > 0 || Lq == 0, "ddt_fast: attention over zero keys is undefined");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H &&
                  lse_in.size(2) == Lq,
              "ddt_fast: lse must be float32 [B, H, Lq] = [", B, ", ", H, ", ", Lq, "], got ", lse_in.scalar_type(),
              " ", lse_in.sizes());
  ddt_fast::check_device(lse_in, "lse", q_in, "q");
  const at::Tensor q = addressable(q_in), k = addressable(k_in), v = addressable(v_in);
  const at::Tensor out = addressable(out_in), grad_out = addressable(grad_out_in), lse = lse_in.contiguous();
  at::Tensor grad_q = at::empty_like(q_in, at::MemoryFormat::Contiguous);
  at::Tensor grad_k = at::empty_like(k_in, at::MemoryFormat::Contiguous);
  at::Tensor grad_v = at::empty_like(v_in, at::MemoryFormat::Contiguous);
  if (B * H == 0 || D == 0) return {grad_q, grad_k, grad_v};
  if (Lq == 0) {  // no queries: nothing flows back to k and v
    grad_k.zero_(), grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor delta = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  ddt::FlashAttention p;
  p.B = B, p.H = H, p.Lq = Lq, p.Lk = Lk, p.D = D;
  p.dtype = ddt_fast::dtype_of(q, "q");
  p.scale = float(scale);
  p.q = strided_bhld(q), p.k = strided_bhld(k), p.v = strided_bhld(v), p.out = strided_bhld(out);
  p.grad_out = strided_bhld(grad_out);
  p.grad_q = strided_bhld(grad_q), p.grad_k = strided_bhld(grad_k), p.grad_v = strided_bhld(grad_v);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.delta = delta.data_ptr<float>();
  run(ddt::cuda::flash_attention_backward(p, c10::cuda::getCurrentCUDAStream().stream()), "flash_attention_backward");
  return {grad_q, grad_k, grad_v};
}

std::tuple<at::Tensor, at::Tensor> qkv_attention(const at::Tensor& qkv_in, const at::Tensor& q_weight,
                                                 const at::Tensor& k_weight, int64_t num_heads, const at::Tensor& rope,
                                                 double eps, double scale, bool k_prepass) {
  TORCH_CHECK(qkv_in.dim() == 3, "ddt_fast: qkv must be [B, L, 3C], got ", qkv_in.sizes());
  TORCH_CHECK(qkv_in.is_cuda(), "ddt_fast: qkv_attention runs on CUDA tensors; qkv is on ", qkv_in.device());
  ddt_fast::check_num_heads(num_heads, qkv_in.size(2));
  const int64_t B = qkv_in.size(0), L = qkv_in.size(1), H = num_heads, C = qkv_in.size(2) / 3, D = C / H;
  check_head_dim_and_dtype(D, qkv_in, "qkv");
  ddt_fast::check_eps(eps);
  ddt_fast::check_scale(scale);
  const std::pair<const at::Tensor*, const char*> weights[] = {{&q_weight, "q_weight"}, {&k_weight, "k_weight"}};
  for (const auto& [w, name] : weights) {
    TORCH_CHECK(w->dim() == 1 && w->size(0) == D, "ddt_fast: ", name, ": q/k norm weights must be [head_dim] = [", D,
                "], got ", w->sizes());
    TORCH_CHECK(w->scalar_type() == qkv_in.scalar_type() || w->scalar_type() == at::kFloat, "ddt_fast: ", name,
                ": q/k norm weights must have qkv's dtype (", qkv_in.scalar_type(), ") or float32, got ",
                w->scalar_type());
    ddt_fast::check_device(*w, name, qkv_in, "qkv");
  }
  TORCH_CHECK(q_weight.scalar_type() == k_weight.scalar_type(), "ddt_fast: q_weight and k_weight differ in dtype (",
              q_weight.scalar_type(), " and ", k_weight.scalar_type(), ")");
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.dim() == 3 && rope.size(0) == L && rope.size(1) == D / 2 &&
                  rope.size(2) == 2,
              "ddt_fast: rope must be float32 [L, D/2, 2] = [", L, ", ", D / 2, ", 2] (cos, sin), got ",
              rope.scalar_type(), " ", rope.sizes());
  ddt_fast::check_device(rope, "rope", qkv_in, "qkv");
  // contiguous and 16-byte aligned (a fresh copy otherwise)
  const at::Tensor qkv = qkv_in.is_contiguous() && reinterpret_cast<uintptr_t>(qkv_in.data_ptr()) % 16 == 0
                             ? qkv_in
                             : qkv_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor qw = q_weight.to(at::kFloat).contiguous(), kw = k_weight.to(at::kFloat).contiguous();
  const at::Tensor rot = rope.contiguous();
  at::Tensor out = at::empty({B, L, C}, qkv.options());
  at::Tensor lse = at::empty({B, H, L}, qkv.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const c10::cuda::CUDAGuard guard(qkv.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  ddt::FlashAttention p;
  p.B = B, p.H = H, p.Lq = L, p.Lk = L, p.D = D;
  p.dtype = ddt_fast::dtype_of(qkv, "qkv");
  p.scale = float(scale);
  // q, k, v straight out of the packed projection [B, L, 3, H, D]
  for (int part = 0; part < 3; ++part) {
    ddt::Strided& s = part == 0 ? p.q : part == 1 ? p.k : p.v;
    s.ptr = static_cast<const char*>(qkv.data_ptr()) + part * C * qkv.element_size();
    s.batch = 3 * L * C, s.head = D, s.row = 3 * C;
  }
  at::Tensor k_normed;
  if (k_prepass) {  // k normalised once by the qk_norm_rope kernel (k alone), q in the prologue
    k_normed = at::empty({B, H, L, D}, qkv.options());
    ddt::QkNormRope n;
    n.B = B, n.L = L, n.H = H, n.D = D, n.eps = eps;
    n.x_dtype = p.dtype, n.w_dtype = ddt::DType::f32;
    n.qkv = qkv.data_ptr(), n.q_weight = qw.data_ptr(), n.k_weight = kw.data_ptr();
    n.rope = rot.data_ptr<float>();
    n.k = k_normed.data_ptr();
    n.parts_begin = 1, n.parts_end = 2;
    run(ddt::cuda::qk_norm_rope_forward(n, stream), "qkv_attention (k prepass)");
    p.k = strided_bhld(k_normed);
  }
  p.out.ptr = out.data_ptr();
  p.out.batch = L * C, p.out.head = D, p.out.row = C;
  p.lse = lse.data_ptr<float>();
  p.norm_rope = k_prepass ? ddt::kNormRopeQ : ddt::kNormRopeQK;
  p.q_norm_weight = qw.data_ptr<float>(), p.k_norm_weight = kw.data_ptr<float>();
  p.rope = rot.data_ptr<float>();
  p.eps = eps;
  run(ddt::cuda::flash_attention_forward(p, stream), "qkv_attention");
  return {out, lse};
}

#endif  // DDT_FAST_WITH_CUDA

}  // namespace

TORCH_LIBRARY_FRAGMENT(ddt_fast, m) {
  m.def("flash_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def(
      "flash_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "qkv_attention(Tensor qkv, Tensor q_weight, Tensor k_weight, int num_heads, Tensor rope, float eps, "
      "float scale, bool k_prepass=True) -> (Tensor, Tensor)");
}

#if defined(DDT_FAST_WITH_CUDA)
TORCH_LIBRARY_IMPL(ddt_fast, CUDA, m) {
  m.impl("flash_attention", &flash_attention);
  m.impl("flash_attention_backward", &flash_attention_backward);
  m.impl("qkv_attention", &qkv_attention);
}
#endif

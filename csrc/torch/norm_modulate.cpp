// torch.ops.ddt_fast: fused norm + modulate family (schemas, checks, CPU/CUDA).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <utility>

#if defined(DDT_FAST_WITH_CUDA)
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "ddt/norm_modulate.h"
#include "checks.h"
#include "dtype.h"

namespace {

using ddt::DType;
using ddt::NormKind;

// A [B, L|1, C] modulation operand (shift/scale/gate): last dim contiguous,
// any row strides (chunk views of [B, L, k*C] are taken as they are).
ddt::Rows mod_rows(const at::Tensor& t, const char* name, const at::Tensor& x) {
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  TORCH_CHECK(t.dim() == 3 && t.size(0) == B && (t.size(1) == 1 || t.size(1) == L) && t.size(2) == C,
              "ddt_fast: ", name, " must be [B, 1, C] (per sample) or [B, L, C] (per token) = [", B, ", 1|", L, ", ", C,
              "], got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1, "ddt_fast: ", name, " must be contiguous in its last dim (got stride ", t.stride(2),
              "); call .contiguous()");
  ddt_fast::check_device(t, name, x, "x");
  return {t.data_ptr(), t.stride(0), t.size(1) == 1 ? 0 : t.stride(1)};
}

ddt::Rows dense_rows(const at::Tensor& t) { return {t.data_ptr(), t.size(1) * t.size(2), t.size(2)}; }

at::Tensor check_x(const at::Tensor& x, const char* name = "x") {
  TORCH_CHECK(x.dim() == 3, "ddt_fast: ", name, " must be [B, L, C], got ", x.sizes());
  TORCH_CHECK(x.size(2) > 0, "ddt_fast: ", name, " has an empty channel dim");
  ddt_fast::dtype_of(x, name);
  return x.contiguous();
}

void check_same_dtype(const at::Tensor& t, at::ScalarType want, const char* name, const char* what) {
  TORCH_CHECK(t.scalar_type() == want || t.scalar_type() == at::kFloat, "ddt_fast: ", name, " must be ", what, " (",
              want, ") or float32, got ", t.scalar_type());
}

struct Forward {
  ddt::NormModulateForward p;
  at::Tensor x, y, weight, out, x_out;
};

Forward prepare_forward(const at::Tensor& x_in, const c10::optional<at::Tensor>& gate,
                        const c10::optional<at::Tensor>& y_in, const c10::optional<at::Tensor>& weight_in,
                        const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale, double eps,
                        NormKind kind, bool allocate_outputs = true) {
  Forward f;
  ddt_fast::check_eps(eps);
  f.x = check_x(x_in);
  auto& p = f.p;
  p.B = f.x.size(0), p.L = f.x.size(1), p.C = f.x.size(2);
  p.kind = kind;
  p.eps = eps;
  p.residual = gate.has_value();
  p.x_dtype = ddt_fast::dtype_of(f.x, "x");
  p.x = dense_rows(f.x);
  p.mod_dtype = p.x_dtype;
  p.w_dtype = p.x_dtype;
  c10::optional<at::ScalarType> mod_type;
  auto take_mod = [&](const at::Tensor& t, const char* name) {
    check_same_dtype(t, f.x.scalar_type(), name, "the dtype of x");
    TORCH_CHECK(!mod_type || *mod_type == t.scalar_type(), "ddt_fast: shift, scale and gate must share one dtype, got ",
                *mod_type, " and ", t.scalar_type(), " (", name, ")");
    mod_type = t.scalar_type();
    p.mod_dtype = ddt_fast::dtype_of(t, name);
    return mod_rows(t, name, f.x);
  };
  if (p.residual) {
    TORCH_CHECK(y_in.has_value(), "ddt_fast: a gated residual needs y (the branch output, like x); got None");
    TORCH_CHECK(
        y_in->sizes() == f.x.sizes() && y_in->scalar_type() == f.x.scalar_type() && y_in->device() == f.x.device(),
        "ddt_fast: y must match x (", f.x.sizes(), ", ", f.x.scalar_type(), ", ", f.x.device(), "), got ",
        y_in->sizes(), ", ", y_in->scalar_type(), ", ", y_in->device());
    f.y = y_in->contiguous();
    p.y = dense_rows(f.y);
    p.gate = take_mod(*gate, "gate");
    if (allocate_outputs) {
      f.x_out = at::empty_like(f.x);
      p.x_out = {f.x_out.data_ptr(), p.L * p.C, p.C};
    }
  }
  if (kind != NormKind::none) {
    const char* kind_name = kind == NormKind::rms ? "1 (rms)" : "2 (layer)";
    TORCH_CHECK(shift.has_value(), "ddt_fast: norm kind ", kind_name, " needs shift ([B, 1|L, C]); got None");
    TORCH_CHECK(scale.has_value(), "ddt_fast: norm kind ", kind_name, " needs scale ([B, 1|L, C]); got None");
    p.shift = take_mod(*shift, "shift");
    p.scale = take_mod(*scale, "scale");
    if (allocate_outputs) {
      f.out = at::empty_like(f.x);
      p.out = {f.out.data_ptr(), p.L * p.C, p.C};
    }
  }
  if (kind == NormKind::rms) {
    TORCH_CHECK(weight_in.has_value(), "ddt_fast: norm kind 1 (rms) needs weight ([C] = [", p.C, "]); got None");
    TORCH_CHECK(weight_in->dim() == 1 && weight_in->size(0) == p.C, "ddt_fast: weight must be [C] = [", p.C, "], got ",
                weight_in->sizes());
    ddt_fast::check_device(*weight_in, "weight", f.x, "x");
    check_same_dtype(*weight_in, f.x.scalar_type(), "weight", "the dtype of x");
    f.weight = weight_in->contiguous();
    p.w_dtype = ddt_fast::dtype_of(f.weight, "weight");
    p.weight = f.weight.data_ptr();
  }
  return f;
}

void run_forward(const Forward& f) {
  if (f.x.numel() == 0) return;
#if defined(DDT_FAST_WITH_CUDA)
  if (f.x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(f.x.device());
    const int err = ddt::cuda::norm_modulate_forward(f.p, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, "ddt_fast: norm_modulate CUDA launch failed (error ", err, ")");
    return;
  }
#endif
  ddt::cpu::norm_modulate_forward(f.p);
}

at::Tensor rms_norm_modulate(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shift,
                             const at::Tensor& scale, double eps) {
  auto f = prepare_forward(x, c10::nullopt, c10::nullopt, weight, shift, scale, eps, NormKind::rms);
  run_forward(f);
  return f.out;
}

at::Tensor layer_norm_modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps) {
  auto f = prepare_forward(x, c10::nullopt, c10::nullopt, c10::nullopt, shift, scale, eps, NormKind::layer);
  run_forward(f);
  return f.out;
}

at::Tensor gated_residual(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  auto f = prepare_forward(x, gate, y, c10::nullopt, c10::nullopt, c10::nullopt, 0.0, NormKind::none);
  run_forward(f);
  return f.x_out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_rms_norm_modulate(const at::Tensor& x, const at::Tensor& gate,
                                                                    const at::Tensor& y, const at::Tensor& weight,
                                                                    const at::Tensor& shift, const at::Tensor& scale,
                                                                    double eps) {
  auto f = prepare_forward(x, gate, y, weight, shift, scale, eps, NormKind::rms);
  run_forward(f);
  return {f.x_out, f.out};
}

// Gradients of the whole family; outputs a caller did not need are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_modulate_backward(
    const c10::optional<at::Tensor>& grad_out_in, const c10::optional<at::Tensor>& grad_x_out_in,
    const at::Tensor& x_in, const c10::optional<at::Tensor>& gate, const c10::optional<at::Tensor>& y,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& shift,
    const c10::optional<at::Tensor>& scale, double eps, int64_t kind_in, bool residual) {
  TORCH_CHECK(kind_in >= 0 && kind_in <= 2, "ddt_fast: kind must be 0 (none), 1 (rms) or 2 (layer), got ", kind_in);
  const auto kind = static_cast<NormKind>(kind_in);
  // Every tensor given, used by this kind or not, on x's device.
  const std::pair<const c10::optional<at::Tensor>*, const char*> given[] = {{&grad_out_in, "grad_out"},
                                                                            {&grad_x_out_in, "grad_x_out"},
                                                                            {&gate, "gate"},
                                                                            {&y, "y"},
                                                                            {&weight, "weight"},
                                                                            {&shift, "shift"},
                                                                            {&scale, "scale"}};
  for (const auto& [t, name] : given)
    if (t->has_value()) ddt_fast::check_device(**t, name, x_in, "x");
  TORCH_CHECK(!residual || gate.has_value(), "ddt_fast: residual=True needs gate ([B, 1|L, C]); got None");
  TORCH_CHECK(!residual || y.has_value(), "ddt_fast: residual=True needs y (like x); got None");
  // Reuse the forward's checks for shapes/dtypes; its outputs are not computed.
  auto f = prepare_forward(x_in, residual ? gate : c10::nullopt, residual ? y : c10::nullopt,
                           kind == NormKind::rms ? weight : c10::nullopt, shift, scale, eps, kind,
                           /*allocate_outputs=*/false);
  ddt::NormModulateBackward p;
  p.B = f.p.B, p.L = f.p.L, p.C = f.p.C, p.kind = kind, p.residual = residual, p.eps = eps;
  p.x_dtype = f.p.x_dtype, p.w_dtype = f.p.w_dtype, p.mod_dtype = f.p.mod_dtype;
  p.x = f.p.x, p.y = f.p.y, p.gate = f.p.gate, p.shift = f.p.shift, p.scale = f.p.scale, p.weight = f.p.weight;
  const auto& x = f.x;
  at::Tensor grad_out, grad_x_out;
  if (kind != NormKind::none) {
    TORCH_CHECK(grad_out_in.has_value(), "ddt_fast: norm_modulate_backward with norm kind ", kind_in,
                " needs grad_out (like x); got None");
    ddt_fast::check_grad(*grad_out_in, "grad_out", x, "x");
    TORCH_CHECK(grad_out_in->sizes() == x.sizes(), "ddt_fast: grad_out must be ", x.sizes(), ", got ",
                grad_out_in->sizes());
    grad_out = grad_out_in->to(x.scalar_type()).contiguous();
    p.grad_out = dense_rows(grad_out);
  }
  if (residual && grad_x_out_in.has_value()) {
    ddt_fast::check_grad(*grad_x_out_in, "grad_x_out", x, "x");
    TORCH_CHECK(grad_x_out_in->sizes() == x.sizes(), "ddt_fast: grad_x_out must be ", x.sizes(), ", got ",
                grad_x_out_in->sizes());
    grad_x_out = grad_x_out_in->to(x.scalar_type()).contiguous();
    p.grad_x_out = dense_rows(grad_x_out);
  }
  auto mod_grad = [&](const at::Tensor& like) {
    return at::empty({p.B, like.size(1), p.C}, x.options().dtype(like.scalar_type()));
  };
  at::Tensor grad_x = at::empty_like(x), grad_y, grad_gate, grad_weight, grad_shift, grad_scale;
  p.grad_x = grad_x.data_ptr();
  if (residual) {
    grad_y = at::empty_like(x);
    grad_gate = mod_grad(*gate);
    p.grad_y = grad_y.data_ptr();
    p.grad_gate = grad_gate.data_ptr();
  }
  if (kind != NormKind::none) {
    grad_shift = mod_grad(*shift);
    grad_scale = mod_grad(*scale);
    p.grad_shift = grad_shift.data_ptr();
    p.grad_scale = grad_scale.data_ptr();
  }
  if (kind == NormKind::rms) {
    grad_weight = at::empty_like(f.weight);
    p.grad_weight = grad_weight.data_ptr();
  }
  if (x.numel() > 0) {
#if defined(DDT_FAST_WITH_CUDA)
    if (x.is_cuda()) {
      const c10::cuda::CUDAGuard guard(x.device());
      auto ws = at::empty({ddt::cuda::norm_modulate_backward_workspace_bytes(p)}, x.options().dtype(at::kByte));
      const int err = ddt::cuda::norm_modulate_backward(p, ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
      TORCH_CHECK(err == 0, "ddt_fast: norm_modulate_backward CUDA launch failed (error ", err, ")");
    } else
#endif
      ddt::cpu::norm_modulate_backward(p);
  } else {
    for (auto* t : {&grad_gate, &grad_weight, &grad_shift, &grad_scale})
      if (t->defined()) t->zero_();
  }
  auto empty = [&](at::Tensor& t) { return t.defined() ? t : at::empty({0}, x.options()); };
  return {grad_x, empty(grad_y), empty(grad_gate), empty(grad_weight), empty(grad_shift), empty(grad_scale)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ddt_fast, m) {
  m.def("rms_norm_modulate(Tensor x, Tensor weight, Tensor shift, Tensor scale, float eps) -> Tensor");
  m.def("layer_norm_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor");
  m.def("gated_residual(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def(
      "gated_residual_rms_norm_modulate(Tensor x, Tensor gate, Tensor y, Tensor weight, Tensor shift, "
      "Tensor scale, float eps) -> (Tensor, Tensor)");
  m.def(
      "norm_modulate_backward(Tensor? grad_out, Tensor? grad_x_out, Tensor x, Tensor? gate, Tensor? y, "
      "Tensor? weight, Tensor? shift, Tensor? scale, float eps, int kind, bool residual) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ddt_fast, CPU, m) {
  m.impl("rms_norm_modulate", &rms_norm_modulate);
  m.impl("layer_norm_modulate", &layer_norm_modulate);
  m.impl("gated_residual", &gated_residual);
  m.impl("gated_residual_rms_norm_modulate", &gated_residual_rms_norm_modulate);
  m.impl("norm_modulate_backward", &norm_modulate_backward);
}

#if defined(DDT_FAST_WITH_CUDA)
TORCH_LIBRARY_IMPL(ddt_fast, CUDA, m) {
  m.impl("rms_norm_modulate", &rms_norm_modulate);
  m.impl("layer_norm_modulate", &layer_norm_modulate);
  m.impl("gated_residual", &gated_residual);
  m.impl("gated_residual_rms_norm_modulate", &gated_residual_rms_norm_modulate);
  m.impl("norm_modulate_backward", &norm_modulate_backward);
}
#endif

// torch.ops.ddt_fast: SwiGLU gate silu(a) * b (schemas, checks, CPU/CUDA).
#include <ATen/ATen.h>
#include <ATen/TensorUtils.h>
#include <torch/library.h>

#if defined(DDT_FAST_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "ddt/swiglu.h"
#include "checks.h"
#include "dtype.h"

namespace {

// [..., H] -> [R, H] rows with one row stride: a view whenever the leading
// dims collapse (the halves of a packed [..., 2H] GEMM output do), else a copy.
at::Tensor as_rows(const at::Tensor& t) {
  const int64_t H = t.size(-1), R = H > 0 ? t.numel() / H : 0;
  at::Tensor r = t.stride(-1) == 1 ? t : t.contiguous();
  if (R == 0) return at::empty({0, H}, t.options());
  auto strides = at::detail::computeStride(r.sizes(), r.strides(), at::IntArrayRef{R, H});
  return strides ? r.as_strided({R, H}, *strides) : r.reshape({R, H});
}

ddt::Swiglu prepare(const at::Tensor& a, const at::Tensor& b, at::Tensor& ar, at::Tensor& br) {
  TORCH_CHECK(a.dim() >= 1 && a.sizes() == b.sizes(), "ddt_fast: swiglu needs a and b of one shape, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "ddt_fast: swiglu needs a and b of one dtype, got ", a.scalar_type(),
              " and ", b.scalar_type());
  ddt_fast::check_device(b, "b", a, "a");
  ddt::Swiglu p;
  p.dtype = ddt_fast::dtype_of(a, "a");
  ar = as_rows(a), br = as_rows(b);
  p.R = ar.size(0), p.H = ar.size(1);
  p.a = ar.data_ptr(), p.a_stride = ar.stride(0);
  p.b = br.data_ptr(), p.b_stride = br.stride(0);
  return p;
}

at::Tensor swiglu(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor ar, br;
  auto p = prepare(a, b, ar, br);
  at::Tensor out = at::empty(a.sizes(), a.options().memory_format(at::MemoryFormat::Contiguous));
  p.out = out.data_ptr();
  if (out.numel() == 0) return out;
#if defined(DDT_FAST_WITH_CUDA)
  if (a.is_cuda()) {
    const c10::cuda::CUDAGuard guard(a.device());
    const int err = ddt::cuda::swiglu_forward(p, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, "ddt_fast: swiglu CUDA launch failed (error ", err, ")");
    return out;
  }
#endif
  ddt::cpu::swiglu_forward(p);
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad_out, const at::Tensor& a,
                                                   const at::Tensor& b) {
  at::Tensor ar, br;
  auto p = prepare(a, b, ar, br);
  ddt_fast::check_grad(grad_out, "grad_out", a, "a");
  TORCH_CHECK(grad_out.sizes() == a.sizes(), "ddt_fast: grad_out must be ", a.sizes(), ", got ", grad_out.sizes());
  at::Tensor g = grad_out.to(a.scalar_type()).contiguous();
  at::Tensor ga = at::empty(a.sizes(), g.options()), gb = at::empty(a.sizes(), g.options());
  p.grad_out = g.data_ptr(), p.grad_a = ga.data_ptr(), p.grad_b = gb.data_ptr();
  if (g.numel() == 0) return {ga, gb};
#if defined(DDT_FAST_WITH_CUDA)
  if (a.is_cuda()) {
    const c10::cuda::CUDAGuard guard(a.device());
    const int err = ddt::cuda::swiglu_backward(p, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, "ddt_fast: swiglu_backward CUDA launch failed (error ", err, ")");
    return {ga, gb};
  }
#endif
  ddt::cpu::swiglu_backward(p);
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ddt_fast, m) {
  m.def("swiglu(Tensor a, Tensor b) -> Tensor");
  m.def("swiglu_backward(Tensor grad_out, Tensor a, Tensor b) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ddt_fast, CPU, m) {
  m.impl("swiglu", &swiglu);
  m.impl("swiglu_backward", &swiglu_backward);
}

#if defined(DDT_FAST_WITH_CUDA)
TORCH_LIBRARY_IMPL(ddt_fast, CUDA, m) {
  m.impl("swiglu", &swiglu);
  m.impl("swiglu_backward", &swiglu_backward);
}
#endif

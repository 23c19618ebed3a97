// Argument checks shared by the op bindings. They run before any kernel and
// only read tensor metadata (device, dtype, sizes) and scalars.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "dtype.h"

namespace ddt_fast {

// `t` (argument `name`) lives on the device of `like` (argument `like_name`).
inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), "ddt_fast: ", name, " is on ", t.device(), " but ", like_name, " is on ",
              like.device(), "; move it with .to(", like_name, ".device)");
}

// A gradient the binding converts to x's dtype: on x's device, and a floating
// dtype the kernels take (an integer or complex gradient is a caller's bug,
// not something to convert).
inline void check_grad(const at::Tensor& g, const char* name, const at::Tensor& like, const char* like_name) {
  check_device(g, name, like, like_name);
  dtype_of(g, name);
}

// eps of a norm: finite and >= 0 (the model uses 1e-6).
inline void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "ddt_fast: eps must be a finite number >= 0, got ", eps,
              " (the model uses 1e-6)");
}

// Softmax scale of attention: finite (head_dim ** -0.5 for the model).
inline void check_scale(double scale) {
  TORCH_CHECK(std::isfinite(scale), "ddt_fast: scale must be finite, got ", scale,
              " (softmax attention uses head_dim ** -0.5)");
}

// num_heads splits `width` = 3 * num_heads * head_dim.
inline void check_num_heads(int64_t num_heads, int64_t width) {
  TORCH_CHECK(num_heads > 0, "ddt_fast: num_heads must be > 0, got ", num_heads);
  // width % (3 * num_heads), without the product (which could overflow)
  TORCH_CHECK(width % 3 == 0 && (width / 3) % num_heads == 0, "ddt_fast: qkv's last dim ", width,
              " is not 3 * num_heads (", num_heads, ") * head_dim; num_heads must divide C = ", width / 3,
              " and qkv be [B, L, 3C]");
}

}  // namespace ddt_fast

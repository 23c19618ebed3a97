// at::ScalarType -> ddt::DType, with a clear error for unsupported dtypes.
#pragma once

#include <ATen/ATen.h>

#include "ddt/dtypes.h"

namespace ddt_fast {

inline ddt::DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ddt::DType::f32;
    case at::kDouble: return ddt::DType::f64;
    case at::kHalf: return ddt::DType::f16;
    case at::kBFloat16: return ddt::DType::bf16;
    default:
      TORCH_CHECK(false, "ddt_fast: ", name, " has dtype ", t.scalar_type(),
                  "; supported: float32, float64, float16, bfloat16");
  }
}

}  // namespace ddt_fast

// The Python module ddt_fast._C: build facts for ddt_fast.info().
// Operator schemas live beside their implementations (one
// TORCH_LIBRARY_FRAGMENT per op family); this file owns the library itself.
#include <torch/extension.h>

#if defined(DDT_FAST_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#define DDT_FAST_STR2(x) #x
#define DDT_FAST_STR(x) DDT_FAST_STR2(x)

TORCH_LIBRARY(ddt_fast, m) {
  m.def("build_marker() -> int");  // present so the namespace exists before any fragment
}

namespace {
int64_t build_marker() { return 1; }
}  // namespace

TORCH_LIBRARY_IMPL(ddt_fast, CompositeExplicitAutograd, m) { m.impl("build_marker", &build_marker); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", []() {
    pybind11::dict d;
    d["torch_version"] =
        DDT_FAST_STR(TORCH_VERSION_MAJOR) "." DDT_FAST_STR(TORCH_VERSION_MINOR) "." DDT_FAST_STR(TORCH_VERSION_PATCH);
#if defined(DDT_FAST_WITH_CUDA)
    d["with_cuda"] = true;
    d["cuda_runtime_version"] = CUDART_VERSION;  // e.g. 13000
    d["cuda_archs"] = DDT_FAST_STR(DDT_FAST_CUDA_ARCHS);
#else
    d["with_cuda"] = false;
    d["cuda_runtime_version"] = pybind11::none();
    d["cuda_archs"] = "";
#endif
#if defined(DDT_FAST_HAVE_OPENMP)
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["compiler"] = __VERSION__;
    return d;
  });
}

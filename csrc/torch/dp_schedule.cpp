// Binding of the statistic DP solver: ddt_fast::dp_schedule_solve.
//
//   dp_schedule_solve(Tensor sim, int k_max) -> (Tensor cost, Tensor steps)
//
// sim: [B, N, N] float32 or float64 (solved in float64), finite. cost: float64
// [B, k_max], cost[b][k-1] = optimal cost with k encoder runs. steps: int32
// [B, k_max, k_max], row k-1 = the k recompute steps, then -1.
// The fake (meta) implementation is registered in ddt_fast/schedule/_ops.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "ddt/dp_schedule.h"

#if defined(DDT_FAST_WITH_CUDA)
// c10's stream header rather than ATen/cuda/CUDAContext.h, which also pulls in
// the cuBLAS/cuSPARSE headers that a bare CUDA toolkit may not ship.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace {

// The DP needs finite similarities (as ddt_fast.schedule.solve): names the
// first non-finite entry. On CUDA the test costs one device sync.
void check_finite(const at::Tensor& sim) {
  bool finite;
  if (sim.is_cpu()) {
    const double* v = sim.const_data_ptr<double>();
    const int64_t n = sim.numel();
    int bad = 0;
#pragma omp simd reduction(| : bad)
    for (int64_t i = 0; i < n; ++i) bad |= !std::isfinite(v[i]);
    finite = bad == 0;
  } else {
    finite = at::isfinite(sim).all().item<bool>();
  }
  if (finite) return;
  const at::Tensor where = at::logical_not(at::isfinite(sim)).nonzero()[0].cpu();
  const int64_t b = where[0].item<int64_t>(), i = where[1].item<int64_t>(), j = where[2].item<int64_t>();
  const double value = sim[b][i][j].item<double>();
  TORCH_CHECK(false, "dp_schedule_solve: sim[", b, "] (problem ", b, ") has a non-finite similarity ", value, " at [",
              i, ", ", j,
              "]; the DP needs finite values: recompute that matrix, or repair it (e.g. torch.nan_to_num) "
              "before solving");
}

// Checks shared by every device; returns sim as a contiguous float64 tensor.
at::Tensor checked_input(const at::Tensor& sim, int64_t k_max, c10::DeviceType device) {
  TORCH_CHECK(sim.dim() == 3, "dp_schedule_solve: sim must be 3-D [B, N, N], got ", sim.dim(), "-D with shape ",
              sim.sizes());
  TORCH_CHECK(sim.size(1) == sim.size(2),
              "dp_schedule_solve: sim must be square in its last two dimensions, got shape ", sim.sizes());
  const int64_t n = sim.size(1);
  TORCH_CHECK(n >= 1, "dp_schedule_solve: sim needs at least one step (N >= 1), got N = 0");
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "dp_schedule_solve: N = ", n,
              " does not fit the int32 steps table");
  TORCH_CHECK(k_max >= 1 && k_max <= n, "dp_schedule_solve: k_max must be in 1..N = 1..", n, ", got ", k_max);
  TORCH_CHECK(sim.scalar_type() == at::kFloat || sim.scalar_type() == at::kDouble,
              "dp_schedule_solve: sim must be float32 or float64, got ", sim.scalar_type(),
              "; convert it with sim.double()");
  TORCH_CHECK(sim.device().type() == device, "dp_schedule_solve: expected a ", c10::DeviceTypeName(device),
              " tensor, got one on ", sim.device());
  at::Tensor sim64 = sim.to(at::kDouble).contiguous();
  check_finite(sim64);
  return sim64;
}

std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& sim, int64_t k_max) {
  const int64_t batch = sim.size(0);
  auto cost = at::empty({batch, k_max}, sim.options().dtype(at::kDouble));
  auto steps = at::empty({batch, k_max, k_max}, sim.options().dtype(at::kInt));
  return {cost, steps};
}

std::tuple<at::Tensor, at::Tensor> dp_schedule_solve_cpu(const at::Tensor& sim_in, int64_t k_max) {
  const at::Tensor sim = checked_input(sim_in, k_max, c10::DeviceType::CPU);
  auto [cost, steps] = allocate_outputs(sim, k_max);
  ddt::cpu::dp_schedule_solve(sim.const_data_ptr<double>(), sim.size(0), sim.size(1), k_max,
                              cost.mutable_data_ptr<double>(), steps.mutable_data_ptr<int32_t>(),
                              at::get_num_threads());
  return {cost, steps};
}

#if defined(DDT_FAST_WITH_CUDA)
std::tuple<at::Tensor, at::Tensor> dp_schedule_solve_cuda(const at::Tensor& sim_in, int64_t k_max) {
  const c10::cuda::CUDAGuard guard(sim_in.device());
  const at::Tensor sim = checked_input(sim_in, k_max, c10::DeviceType::CUDA);
  auto [cost, steps] = allocate_outputs(sim, k_max);
  const int64_t batch = sim.size(0), n = sim.size(1);
  if (batch == 0) return {cost, steps};
  const auto bytes = ddt::cuda::dp_schedule_workspace_bytes(batch, n, k_max);
  auto workspace = at::empty({static_cast<int64_t>(bytes)}, sim.options().dtype(at::kByte));
  const int err = ddt::cuda::dp_schedule_solve(
      sim.const_data_ptr<double>(), batch, n, k_max, cost.mutable_data_ptr<double>(), steps.mutable_data_ptr<int32_t>(),
      workspace.mutable_data_ptr(), reinterpret_cast<ddt::stream_t>(c10::cuda::getCurrentCUDAStream().stream()));
  TORCH_CHECK(err == 0, "dp_schedule_solve: CUDA kernel launch failed (B = ", batch, ", N = ", n, ", k_max = ", k_max,
              "): ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {cost, steps};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(ddt_fast, m) {
  m.set_python_module("ddt_fast.schedule._ops");
  m.def("dp_schedule_solve(Tensor sim, int k_max) -> (Tensor cost, Tensor steps)");
}

TORCH_LIBRARY_IMPL(ddt_fast, CPU, m) { m.impl("dp_schedule_solve", &dp_schedule_solve_cpu); }

#if defined(DDT_FAST_WITH_CUDA)
TORCH_LIBRARY_IMPL(ddt_fast, CUDA, m) { m.impl("dp_schedule_solve", &dp_schedule_solve_cuda); }
#endif

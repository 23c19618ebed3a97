// Large CPU outputs get transparent huge pages before the kernel first touches
// them. glibc serves allocations of 32 MiB and more with a fresh mmap every
// time, so an op that writes one pays a 4 KiB page fault per page on every
// call: SwiGLU's 50 MB output at DDT-XL shapes took 23 ms instead of 9. With
// MADV_HUGEPAGE (honoured when /sys/kernel/mm/transparent_hugepage/enabled is
// `madvise` or `always`) the kernel faults in 2 MiB pages. Smaller outputs
// come back from the heap already mapped and are left alone.
// DDT_FAST_CPU_HUGE_PAGES=0 turns this off.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ddt_fast {

// Read once per process; false where the platform has no MADV_HUGEPAGE.
inline bool cpu_huge_pages_enabled() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* v = std::getenv("DDT_FAST_CPU_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
#else
  return false;
#endif
}

// Returns t; on the CPU, advises huge pages for its 2 MiB-aligned interior when
// it is 32 MiB or larger.
inline at::Tensor with_huge_pages(at::Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  constexpr size_t kMinBytes = size_t(32) << 20;
  if (t.device().is_cpu() && t.nbytes() >= kMinBytes && cpu_huge_pages_enabled()) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr()), end = begin + t.nbytes();
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
  }
#endif
  return t;
}

}  // namespace ddt_fast

// The CPU DP solver's hot loop built for AVX2; dp_schedule.cpp picks it at
// run time on CPUs that have AVX2. Torch-free.
#include "dp_schedule_isa.h"

#if defined(DDT_DP_HAVE_AVX2)
#define DDT_DP_LANES 4
#define DDT_DP_TARGET __attribute__((target("avx2")))
#define DDT_DP_RELAX_ROWS relax_rows_avx2
#include "dp_schedule_relax.h"
#endif

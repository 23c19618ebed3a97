// Shared per-element math of the kernels (csrc/include/ddt/): conversions
// and the vectorisable exp, against libm and hand-checked bit patterns.
#include <cmath>
#include <cstdio>
#include <cstring>

#include "ddt/dtypes.h"
#include "ddt/swiglu.h"

static int failures = 0;
#define CHECK(cond, ...)                               \
  do {                                                 \
    if (!(cond)) {                                     \
      ++failures;                                      \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
    }                                                  \
  } while (0)

int main() {
  using namespace ddt;
  // exp_f32 within 2 ulp of exp over the whole useful range.
  double worst = 0;
  for (float x = -87.f; x < 88.f; x += 0.00071f) {
    const double e = std::exp(double(x));
    const double rel = std::fabs(sg::exp_f32(x) - e) / e;
    worst = rel > worst ? rel : worst;
  }
  CHECK(worst < 1.2e-7, "exp_f32 worst relative error %g", worst);
  CHECK(sg::sigmoid(-200.f) < 1e-37f && sg::sigmoid(200.f) == 1.f, "sigmoid saturation");

  // bf16: round to nearest even, NaN stays NaN.
  CHECK(uint16_t(to_bf16(1.0f)) == 0x3f80, "bf16(1)");
  CHECK(uint16_t(to_bf16(bits_to_float(0x3f808000u))) == 0x3f80, "tie rounds to even (down)");
  CHECK(uint16_t(to_bf16(bits_to_float(0x3f818000u))) == 0x3f82, "tie rounds to even (up)");
  CHECK(uint16_t(to_bf16(bits_to_float(0x3f808001u))) == 0x3f81, "above tie rounds up");
  CHECK(std::isnan(to_float(to_bf16(std::nanf("")))), "NaN survives");
  CHECK(std::isinf(to_float(to_bf16(INFINITY))), "inf survives");
  // f16 round trip of every finite half value.
  int bad = 0;
  for (uint32_t b = 0; b < 0x7c00u; ++b) {
    const f16_t h = f16_t(uint16_t(b));
    if (uint16_t(to_f16(to_float(h))) != b) ++bad;
  }
  CHECK(bad == 0, "%d half values do not round-trip", bad);
  CHECK(to_float(to_f16(65504.f)) == 65504.f, "f16 max");
  CHECK(round_to<bf16_t>(1.00390625f) == 1.0f, "round_to<bf16>");
  // Every float: the bf16 bits against a plain statement of round-to-nearest-
  // even (NaN: quieted, sign and top payload kept), round_to<bf16> against
  // to_bf16, and round_to<f16> against the float -> _Float16 -> float round
  // trip: same bits, or both NaN.
  uint64_t bad_bf16 = 0, bad_round = 0, bad_f16 = 0;
  for (uint64_t i = 0; i < (uint64_t(1) << 32); ++i) {
    const uint32_t u = uint32_t(i);
    const float f = bits_to_float(u);
    uint32_t expect;
    if (std::isnan(f)) {
      expect = (u >> 16) | 0x40u;
    } else {
      const uint32_t low = u & 0xffffu, keep = u >> 16;
      expect = (low > 0x8000u || (low == 0x8000u && (keep & 1u))) ? keep + 1 : keep;
    }
    const uint16_t got = uint16_t(to_bf16(f));
    if (got != expect) ++bad_bf16;
    if (float_to_bits(round_to<bf16_t>(f)) != uint32_t(got) << 16) ++bad_round;
    const float h = round_to<f16_t>(f), want = to_float(to_f16(f));
    if (std::isnan(want) ? !std::isnan(h) : float_to_bits(h) != float_to_bits(want)) ++bad_f16;
  }
  CHECK(bad_f16 == 0, "%llu floats where round_to<f16> and the _Float16 round trip differ",
        (unsigned long long)bad_f16);
  CHECK(bad_bf16 == 0, "%llu floats round to the wrong bf16", (unsigned long long)bad_bf16);
  CHECK(bad_round == 0, "%llu floats where round_to<bf16> and to_bf16 differ", (unsigned long long)bad_round);

  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all elementwise math checks passed\n");
  return 0;
}

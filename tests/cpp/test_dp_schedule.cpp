// The torch-free CPU DP solver against hand-worked cases and a brute-force
// enumeration of every schedule. Exits non-zero and prints each failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "ddt/dp_schedule.h"
#include "../../csrc/cpu/dp_schedule_isa.h"

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                         \
  do {                                                            \
    if (!(cond)) {                                                \
      ++failures;                                                 \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)

struct Result {
  std::vector<double> cost;    // [batch, k_max]
  std::vector<int32_t> steps;  // [batch, k_max, k_max]
};

Result solve(const std::vector<double>& sim, int64_t batch, int64_t n, int64_t k_max, int threads) {
  Result r{std::vector<double>(batch * k_max, NAN), std::vector<int32_t>(batch * k_max * k_max, -7)};
  ddt::cpu::dp_schedule_solve(sim.data(), batch, n, k_max, r.cost.data(), r.steps.data(), threads);
  return r;
}

// Cost of a schedule straight from the definition: runs left to right, each
// run's errors summed from its start step on.
double schedule_cost(const std::vector<double>& sim, int64_t n, const std::vector<int>& steps) {
  double total = 0.0;
  for (size_t m = 0; m < steps.size(); ++m) {
    const int j = steps[m];
    const int end = m + 1 < steps.size() ? steps[m + 1] : static_cast<int>(n);
    double run = 0.0;
    for (int k = j; k < end; ++k) run += 1.0 - sim[k * n + j];
    total += run;
  }
  return total;
}

struct Brute {
  double cost;
  std::vector<int> steps;
  int near_optimal;  // schedules within 1e-9 (relative) of the best
};

// Every schedule with k runs. Among equal costs the one whose last run starts
// earliest wins, then the second-to-last, and so on: the DP's rule in exact
// arithmetic.
Brute brute_force(const std::vector<double>& sim, int64_t n, int64_t k) {
  std::vector<std::pair<double, std::vector<int>>> all;
  for (uint32_t mask = 0; mask < (1u << (n - 1)); ++mask) {
    if (__builtin_popcount(mask) != k - 1) continue;
    std::vector<int> steps{0};
    for (int s = 1; s < n; ++s)
      if (mask & (1u << (s - 1))) steps.push_back(s);
    all.emplace_back(schedule_cost(sim, n, steps), steps);
  }
  Brute best{INFINITY, {}, 0};
  for (auto& [c, s] : all) {
    bool better = c < best.cost;
    if (c == best.cost) {
      for (int m = static_cast<int>(k) - 1; m >= 0; --m) {
        if (s[m] != best.steps[m]) {
          better = s[m] < best.steps[m];
          break;
        }
      }
    }
    if (better) best = {c, s, 0};
  }
  for (auto& [c, s] : all) best.near_optimal += c <= best.cost + 1e-9 * std::max(1.0, std::fabs(best.cost));
  return best;
}

std::vector<int> row_steps(const Result& r, int64_t b, int64_t k_max, int64_t k) {
  const int32_t* row = r.steps.data() + (b * k_max + (k - 1)) * k_max;
  return std::vector<int>(row, row + k);
}

bool padded(const Result& r, int64_t b, int64_t k_max, int64_t k) {
  const int32_t* row = r.steps.data() + (b * k_max + (k - 1)) * k_max;
  for (int64_t m = k; m < k_max; ++m)
    if (row[m] != -1) return false;
  return true;
}

std::vector<double> from_errors(const std::vector<double>& e) {
  std::vector<double> sim(e.size());
  for (size_t t = 0; t < e.size(); ++t) sim[t] = 1.0 - e[t];
  return sim;
}

void test_known_cases() {
  {  // one step: the single run costs e[0][0]
    Result r = solve({0.25}, 1, 1, 1, 1);
    EXPECT(r.cost[0] == 0.75, "cost %g", r.cost[0]);
    EXPECT(r.steps[0] == 0, "step %d", r.steps[0]);
  }
  {  // e (row = step reusing, column = run start); worked by hand
    const std::vector<double> e = {0.0, 9.0,  9.0,   //
                                   0.5, 0.0,  9.0,   //
                                   1.0, 0.25, 0.0};  //
    Result r = solve(from_errors(e), 1, 3, 3, 1);
    EXPECT(r.cost[0] == 1.5, "K=1 cost %g", r.cost[0]);
    EXPECT(r.cost[1] == 0.25, "K=2 cost %g", r.cost[1]);
    EXPECT(r.cost[2] == 0.0, "K=3 cost %g", r.cost[2]);
    EXPECT(row_steps(r, 0, 3, 1) == std::vector<int>({0}), "K=1 steps");
    EXPECT(row_steps(r, 0, 3, 2) == std::vector<int>({0, 1}), "K=2 steps");
    EXPECT(row_steps(r, 0, 3, 3) == std::vector<int>({0, 1, 2}), "K=3 steps");
    EXPECT(padded(r, 0, 3, 1) && padded(r, 0, 3, 2), "padding");
  }
  {  // an exact tie at K=2: starts 1 and 2 both cost 0.5; the smaller wins
    const std::vector<double> e = {0.0, 9.0,  9.0,   //
                                   0.5, 0.25, 9.0,   //
                                   9.0, 0.25, 0.0};  //
    Result r = solve(from_errors(e), 1, 3, 2, 1);
    EXPECT(r.cost[1] == 0.5, "tie cost %g", r.cost[1]);
    EXPECT(row_steps(r, 0, 2, 2) == std::vector<int>({0, 1}), "tie goes to the smaller start");
  }
  {  // all-ones similarity: every schedule costs 0, so the earliest steps win
    const int64_t n = 7;
    Result r = solve(std::vector<double>(n * n, 1.0), 1, n, n, 1);
    for (int64_t k = 1; k <= n; ++k) {
      std::vector<int> want;
      for (int m = 0; m < k; ++m) want.push_back(m);
      EXPECT(r.cost[k - 1] == 0.0, "all-ones K=%ld cost %g", (long)k, r.cost[k - 1]);
      EXPECT(row_steps(r, 0, n, k) == want, "all-ones K=%ld steps", (long)k);
    }
  }
}

void test_against_brute_force() {
  std::mt19937_64 rng(1234);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  std::uniform_int_distribution<int> eighths(0, 8);
  for (int64_t n = 1; n <= 11; ++n) {
    for (int variant = 0; variant < 3; ++variant) {
      // 0: arbitrary reals; 1: a similarity (diagonal 1); 2: multiples of 1/8,
      // where every sum is exact so the tie rule must match exactly.
      std::vector<double> sim(n * n);
      for (int64_t t = 0; t < n * n; ++t) sim[t] = variant == 2 ? eighths(rng) / 8.0 : uni(rng);
      if (variant == 1)
        for (int64_t d = 0; d < n; ++d) sim[d * n + d] = 1.0;
      Result r = solve(sim, 1, n, n, 1);
      for (int64_t k = 1; k <= n; ++k) {
        const Brute bf = brute_force(sim, n, k);
        const double got = r.cost[k - 1];
        EXPECT(std::fabs(got - bf.cost) <= 1e-12 * std::max(1.0, std::fabs(bf.cost)),
               "n=%ld variant=%d K=%ld: cost %.17g, brute force %.17g", (long)n, variant, (long)k, got, bf.cost);
        const std::vector<int> steps = row_steps(r, 0, n, k);
        if (variant == 2 || bf.near_optimal == 1)
          EXPECT(steps == bf.steps, "n=%ld variant=%d K=%ld: steps differ from brute force", (long)n, variant, (long)k);
        EXPECT(schedule_cost(sim, n, steps) == got, "n=%ld K=%ld: reported cost is not the schedule's", (long)n,
               (long)k);
        EXPECT(padded(r, 0, n, k), "n=%ld K=%ld: padding", (long)n, (long)k);
      }
    }
  }
}

// The recurrence written out plainly (scalar loops, strict < so ties go to
// the smallest j), for sizes beyond brute force: the solver's vectorised
// inner loop must give the same costs and schedules bit for bit.
Result plain_dp(const std::vector<double>& sim, int64_t n, int64_t k_max) {
  std::vector<std::vector<double>> run(n + 1, std::vector<double>(n + 1, 0.0));  // run[j][i] = E(j, i-1)
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = j + 1; i <= n; ++i) run[j][i] = run[j][i - 1] + (1.0 - sim[(i - 1) * n + j]);
  std::vector<std::vector<double>> c(k_max + 1, std::vector<double>(n + 1, INFINITY));
  std::vector<std::vector<int>> from(k_max + 1, std::vector<int>(n + 1, 0));
  for (int64_t i = 1; i <= n; ++i) c[1][i] = run[0][i];
  for (int64_t k = 2; k <= k_max; ++k)
    for (int64_t i = k; i <= n; ++i)
      for (int64_t j = k - 1; j < i; ++j)
        if (c[k - 1][j] + run[j][i] < c[k][i]) c[k][i] = c[k - 1][j] + run[j][i], from[k][i] = j;
  Result r{std::vector<double>(k_max), std::vector<int32_t>(k_max * k_max, -1)};
  for (int64_t k = 1; k <= k_max; ++k) {
    r.cost[k - 1] = c[k][n];
    int64_t i = n;
    for (int64_t m = k; m >= 1; --m) {
      const int j = m == 1 ? 0 : from[m][i];
      r.steps[(k - 1) * k_max + m - 1] = j;
      i = j;
    }
  }
  return r;
}

void test_long_ranges_against_plain_dp() {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  std::uniform_int_distribution<int> few(0, 2);  // many exact ties
  for (int64_t n : {15, 16, 17, 31, 33, 64, 100, 203}) {
    for (int variant = 0; variant < 3; ++variant) {
      std::vector<double> sim(n * n);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < n; ++j) {
          // 0: arbitrary; 1: similarity decaying with |r - j| plus noise; 2: ties
          const double d = static_cast<double>(r > j ? r - j : j - r);
          sim[r * n + j] = variant == 0   ? uni(rng)
                           : variant == 1 ? std::exp(-d / 20.0) + 0.01 * uni(rng)
                                          : few(rng) / 2.0;
        }
      const int64_t k_max = std::min<int64_t>(n, 60);
      const Result got = solve(sim, 1, n, k_max, 1);
      const Result want = plain_dp(sim, n, k_max);
      for (int64_t k = 1; k <= k_max; ++k) {
        EXPECT(got.cost[k - 1] == want.cost[k - 1], "n=%ld variant=%d K=%ld: cost %.17g, plain %.17g", (long)n, variant,
               (long)k, got.cost[k - 1], want.cost[k - 1]);
        EXPECT(row_steps(got, 0, k_max, k) == row_steps(want, 0, k_max, k),
               "n=%ld variant=%d K=%ld: steps differ from the plain DP", (long)n, variant, (long)k);
      }
    }
  }
}

// Each instruction-set build of the level loop against a scalar loop, on
// ranges of every length around the vector chunk sizes and on data with many
// exact ties (the solver above only runs the variant this CPU prefers).
void check_relax_rows(const char* name, ddt::cpu::detail::RelaxRowsFn relax_rows) {
  using ddt::cpu::detail::q_row;
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> uni(0.0, 4.0);
  std::uniform_int_distribution<int> few(0, 3);
  const int64_t n = 140;
  for (int ties = 0; ties < 2; ++ties) {
    std::vector<double> cprev(n + 1), q(q_row(n + 1));
    for (double& v : cprev) v = ties ? few(rng) : uni(rng);
    for (double& v : q) v = ties ? few(rng) : uni(rng);
    for (int64_t k : {2, 3, 40, 100, 139, 140}) {
      std::vector<double> got(n + 1, NAN);
      std::vector<int32_t> arg(n + 1, -1);
      relax_rows(cprev.data(), q.data(), k, k, n + 1, got.data(), arg.data());
      for (int64_t i = k; i <= n; ++i) {
        double best = INFINITY;
        int32_t at = -1;
        for (int64_t j = k - 1; j < i; ++j)
          if (cprev[j] + q[q_row(i) + j] < best) best = cprev[j] + q[q_row(i) + j], at = static_cast<int32_t>(j);
        EXPECT(got[i] == best && arg[i] == at, "%s ties=%d k=%ld i=%ld: got (%g, %d), want (%g, %d)", name, ties,
               (long)k, (long)i, got[i], arg[i], best, at);
      }
    }
  }
}

void test_every_instruction_set() {
  check_relax_rows("baseline", ddt::cpu::detail::relax_rows_baseline);
#if defined(DDT_DP_HAVE_AVX2)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) check_relax_rows("avx2", ddt::cpu::detail::relax_rows_avx2);
  else std::printf("note: this CPU has no AVX2; the AVX2 build was not run\n");
#endif
}

// The parallel paths (over problems, and over i within a level) must give the
// serial answers bit for bit; the serial answers are checked above.
void test_parallel_paths_match_serial() {
  std::mt19937_64 rng(99);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  const int64_t n = 1100, batch = 3, k_max = 12;
  std::vector<double> sim(batch * n * n);
  for (double& v : sim) v = uni(rng);
  const Result serial = solve(sim, batch, n, k_max, 1);
  for (int threads : {2, 3, 8}) {
    const Result par = solve(sim, batch, n, k_max, threads);
    EXPECT(par.cost == serial.cost && par.steps == serial.steps, "batch of %ld with %d threads", (long)batch, threads);
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<double> one(sim.begin() + b * n * n, sim.begin() + (b + 1) * n * n);
      const Result single = solve(one, 1, n, k_max, threads);
      bool same = true;
      for (int64_t t = 0; t < k_max; ++t) same &= single.cost[t] == serial.cost[b * k_max + t];
      for (int64_t t = 0; t < k_max * k_max; ++t) same &= single.steps[t] == serial.steps[b * k_max * k_max + t];
      EXPECT(same, "problem %ld alone with %d threads", (long)b, threads);
    }
  }
}

void test_empty_batch_writes_nothing() {
  double cost = 42.0;
  int32_t steps = 42;
  ddt::cpu::dp_schedule_solve(nullptr, 0, 4, 2, &cost, &steps, 2);
  EXPECT(cost == 42.0 && steps == 42, "batch 0 wrote output");
}

}  // namespace

int main() {
  test_known_cases();
  test_against_brute_force();
  test_long_ranges_against_plain_dp();
  test_every_instruction_set();
  test_parallel_paths_match_serial();
  test_empty_batch_writes_nothing();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("dp_schedule: all checks passed\n");
  return 0;
}

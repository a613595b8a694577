// Unit tests of the torch-free C++ core (rng.h, resample.cpp, gather.cpp, twist_sample.cpp). No framework: each
// CHECK prints the failing expression and the process exits nonzero if any failed.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gather.h"
#include "resample.h"
#include "rng.h"
#include "twist_sample.h"

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond)                                                        \
  do {                                                                     \
    ++g_checks;                                                            \
    if (!(cond)) {                                                         \
      ++g_failures;                                                        \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                      \
  } while (0)

using tsmc::Scheme;
static const Scheme kSchemes[] = {Scheme::kSystematic, Scheme::kStratified, Scheme::kMultinomial, Scheme::kResidual};
static const double kNegInf = -std::numeric_limits<double>::infinity();

// Known answers computed with tsmc_kernels/rng.py (the PyTorch reference).
static void test_hash_known_answers() {
  using namespace tsmc::rng;
  CHECK(mix32(0u) == 0u);
  CHECK(mix32(1u) == 0x688990c0u);
  CHECK(mix32(0xDEADBEEFu) == 0xe628c683u);
  CHECK(mix32(0xFFFFFFFFu) == 0x6768824au);
  CHECK(fold_seed(12345u) == 12345u);
  CHECK(fold_seed((uint64_t{1} << 40) + 5) == 261u);

  uint32_t k = row_key(fold_seed(0), 0, kStreamResample, 0);
  CHECK(k == 0xb7446a20u);
  CHECK(uniform(k, 0) == 0x1.c2840ffcp-3);
  CHECK(uniform(k, 1) == 0x1.b31d613dp-1);
  CHECK(uniform(k, 1000) == 0x1.eec5fad8p-4);

  k = row_key(fold_seed(12345), 7, kStreamResample, 3);
  CHECK(k == 0x779d958du);
  CHECK(uniform(k, 0) == 0x1.b46c32a5p-1);
  CHECK(uniform(k, 1) == 0x1.13c80742p-2);
  CHECK(uniform(k, 1000) == 0x1.c18b5849p-1);

  // seed 2**40 + 5, step 2**33 + 1 (taken mod 2**32), token stream, row 99.
  k = row_key(fold_seed((uint64_t{1} << 40) + 5), (int64_t{1} << 33) + 1, kStreamToken, 99);
  CHECK(k == 0xdc945191u);
  CHECK(uniform(k, 0) == 0x1.b0fca7c6p-2);
  CHECK(uniform(k, 1) == 0x1.b424d57ep-2);
  CHECK(uniform(k, 1000) == 0x1.eb576b5p-5);

  // Uniforms lie strictly inside (0, 1).
  for (int64_t c = 0; c < 100000; ++c) {
    const double u = uniform(0x12345678u, c);
    if (!(u > 0.0 && u < 1.0)) { CHECK(u > 0.0 && u < 1.0); break; }
  }
}

// Known answers of reference.resample(log([.1,.2,.3,.4,0,0,0,0]), seed=42, step=3).
static void test_resample_known_answers() {
  const double p[8] = {0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0, 0.0};
  double lw[8];
  for (int i = 0; i < 8; ++i) lw[i] = std::log(p[i]);
  const int64_t expect[4][8] = {{0, 1, 2, 3, 1, 2, 3, 3},
                                {0, 1, 2, 3, 1, 2, 3, 3},
                                {0, 1, 2, 3, 1, 2, 2, 2},
                                {0, 1, 2, 3, 1, 2, 3, 3}};
  const bool mask = true;
  for (int s = 0; s < 4; ++s) {
    int64_t a[8];
    tsmc::resample(lw, &mask, 1, 8, kSchemes[s], tsmc::rng::fold_seed(42), 3, a);
    CHECK(std::memcmp(a, expect[s], sizeof(a)) == 0);
  }
  tsmc::Scheme sch;
  CHECK(tsmc::parse_scheme("residual", &sch) && sch == Scheme::kResidual);
  CHECK(!tsmc::parse_scheme("Systematic", &sch));
  CHECK(std::strcmp(tsmc::scheme_name(Scheme::kMultinomial), "multinomial") == 0);
}

// Random log weights [B, N] with some -inf entries (and some all -inf prompts).
static std::vector<double> random_log_weights(std::mt19937_64& gen, int64_t B, int64_t N) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  std::vector<double> lw(static_cast<size_t>(B * N));
  for (int64_t b = 0; b < B; ++b) {
    const double scale = 5.0 * unif(gen);
    const double p_dead = unif(gen) < 0.1 ? 1.0 : 0.3 * unif(gen);
    for (int64_t i = 0; i < N; ++i) lw[b * N + i] = unif(gen) < p_dead ? kNegInf : scale * normal(gen);
  }
  return lw;
}

static bool is_identity(const int64_t* a, int64_t N) {
  for (int64_t i = 0; i < N; ++i) if (a[i] != i) return false;
  return true;
}

static void test_resample_properties() {
  std::mt19937_64 gen(20240611);
  std::vector<double> scratch;
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t B = 1 + trial % 5;
    const int64_t N = 1 + (trial * 37) % 97;
    std::vector<double> lw = random_log_weights(gen, B, N);
    bool mask[8];
    for (int64_t b = 0; b < B; ++b) mask[b] = (gen() % 5) != 0;
    scratch.assign(2 * static_cast<size_t>(N + 1), 0.0);
    for (Scheme sch : kSchemes) {
      const uint32_t seed = static_cast<uint32_t>(gen());
      std::vector<int64_t> a(static_cast<size_t>(B * N), -7);
      tsmc::resample(lw.data(), mask, B, N, sch, seed, trial, a.data());
      for (int64_t b = 0; b < B; ++b) {
        const double* w = lw.data() + b * N;
        const int64_t* ab = a.data() + b * N;
        bool all_dead = true;
        for (int64_t i = 0; i < N; ++i) all_dead = all_dead && w[i] == kNegInf;
        if (!mask[b] || all_dead) {
          CHECK(is_identity(ab, N));
          continue;
        }
        // Range and permutation property: a[j] == j whenever j has an offspring.
        bool ok = true;
        std::vector<int64_t> n_off(static_cast<size_t>(N), 0);
        for (int64_t i = 0; i < N; ++i) {
          ok = ok && ab[i] >= 0 && ab[i] < N;
          if (ok) n_off[ab[i]] += 1;
        }
        CHECK(ok);
        if (!ok) continue;
        for (int64_t j = 0; j < N; ++j) {
          if (n_off[j] > 0 && ab[j] != j) { CHECK(ab[j] == j); break; }
          if (w[j] == kNegInf && n_off[j] > 0) { CHECK(!"zero-weight particle got an offspring"); break; }
        }
        // Counts from offspring_counts_row agree with the ancestors and sum to N.
        std::vector<int64_t> counts(static_cast<size_t>(N));
        CHECK(tsmc::offspring_counts_row(w, N, sch, seed, trial, b, counts.data(), scratch.data()));
        int64_t total = 0;
        for (int64_t i = 0; i < N; ++i) total += counts[i];
        CHECK(total == N);
        CHECK(counts == n_off);
        if (sch == Scheme::kSystematic || sch == Scheme::kResidual) {
          // Systematic: floor(N W_i) or floor(N W_i) + 1; residual: at least floor(N W_i)
          // (an ulp of slack at integer boundaries).
          double m = kNegInf;
          for (int64_t i = 0; i < N; ++i) m = std::max(m, w[i]);
          double s = 0.0;
          for (int64_t i = 0; i < N; ++i) s += std::exp(w[i] - m);
          for (int64_t i = 0; i < N; ++i) {
            const double nw = N * std::exp(w[i] - m) / s;
            const double lo = std::floor(nw * (1 - 1e-12));
            const double hi = sch == Scheme::kResidual ? N : std::floor(nw * (1 + 1e-12)) + 1;
            if (counts[i] < lo || counts[i] > hi) { CHECK(counts[i] >= lo && counts[i] <= hi); break; }
          }
        }
      }
    }
  }
}

static void test_identity_cases() {
  const int64_t N = 6;
  const double lw[2 * N] = {kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf,  // dead prompt
                            -5.0, 3.0, kNegInf, 0.0, 1.0, 2.0};
  for (Scheme sch : kSchemes) {
    int64_t a[2 * N];
    const bool mask_on[2] = {true, true};
    tsmc::resample(lw, mask_on, 2, N, sch, 1, 1, a);
    CHECK(is_identity(a, N));         // all -inf
    const bool mask_off[2] = {true, false};
    tsmc::resample(lw, mask_off, 2, N, sch, 1, 1, a);
    CHECK(is_identity(a + N, N));     // masked off
    const double nan_row[N] = {0.0, std::nan(""), 1.0, 2.0, 3.0, 4.0};
    tsmc::resample(nan_row, nullptr, 1, N, sch, 1, 1, a);
    CHECK(is_identity(a, N));         // NaN: documented identity
    const double one[1] = {-3.0};
    tsmc::resample(one, nullptr, 1, 1, sch, 1, 1, a);
    CHECK(a[0] == 0);                 // N == 1
  }
  // A single live particle takes every slot.
  const double single[5] = {kNegInf, kNegInf, 0.5, kNegInf, kNegInf};
  for (Scheme sch : kSchemes) {
    int64_t a[5];
    tsmc::resample(single, nullptr, 1, 5, sch, 9, 2, a);
    for (int i = 0; i < 5; ++i) CHECK(a[i] == 2);
  }
}

static void test_ancestors_from_counts() {
  const int64_t counts[8] = {0, 3, 0, 1, 0, 2, 2, 0};
  int64_t a[8];
  tsmc::ancestors_from_counts_row(counts, 8, a);
  const int64_t expect[8] = {1, 1, 1, 3, 5, 5, 6, 6};
  CHECK(std::memcmp(a, expect, sizeof(a)) == 0);
  const int64_t all_one[4] = {1, 1, 1, 1};
  tsmc::ancestors_from_counts_row(all_one, 4, a);
  CHECK(is_identity(a, 4));
}

static void test_gather() {
  std::mt19937_64 gen(7);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t B = 1 + trial % 4, N = 1 + trial % 13, M = B * N;
    std::vector<double> lw = random_log_weights(gen, B, N);
    std::vector<int64_t> local(static_cast<size_t>(M)), a(static_cast<size_t>(M));
    tsmc::resample(lw.data(), nullptr, B, N, kSchemes[trial % 4], static_cast<uint32_t>(trial), trial, local.data());
    for (int64_t i = 0; i < M; ++i) a[i] = local[i] + (i / N) * N;
    int why = -1;
    CHECK(tsmc::check_ancestors(a.data(), M, &why) == -1 && why == 0);

    // Two buffers: contiguous rows of 13 bytes, and strided rows (48-byte rows, 64-byte stride).
    const int64_t rb0 = 13, rb1 = 48, st1 = 64;
    std::vector<unsigned char> src0(static_cast<size_t>(M * rb0)), src1(static_cast<size_t>(M * st1));
    for (auto& x : src0) x = static_cast<unsigned char>(gen());
    for (auto& x : src1) x = static_cast<unsigned char>(gen());
    std::vector<unsigned char> buf0 = src0, buf1 = src1;
    const tsmc::RowBuffer bufs[2] = {{buf0.data(), rb0, rb0}, {buf1.data(), rb1, st1}};
    tsmc::gather_inplace(bufs, 2, a.data(), M);
    bool ok = true;
    for (int64_t i = 0; i < M; ++i) {
      ok = ok && std::memcmp(&buf0[i * rb0], &src0[a[i] * rb0], rb0) == 0;
      ok = ok && std::memcmp(&buf1[i * st1], &src1[a[i] * st1], rb1) == 0;
      ok = ok && std::memcmp(&buf1[i * st1 + rb1], &src1[i * st1 + rb1], st1 - rb1) == 0;  // gap untouched
    }
    CHECK(ok);
  }
  // Unmoved rows are not written: poison detection via a read-only source region.
  {
    const int64_t M = 4;
    unsigned char buf[M * 3] = {1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4};
    const int64_t a[M] = {0, 0, 2, 2};
    const tsmc::RowBuffer b = {buf, 3, 3};
    tsmc::gather_inplace(&b, 1, a, M);
    const unsigned char expect[M * 3] = {1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3};
    CHECK(std::memcmp(buf, expect, sizeof(buf)) == 0);
    const std::vector<int64_t> moved = tsmc::moved_rows(a, M);
    CHECK(moved.size() == 2 && moved[0] == 1 && moved[1] == 3);
  }
  // Identity: nothing moved.
  {
    const int64_t a[3] = {0, 1, 2};
    CHECK(tsmc::moved_rows(a, 3).empty());
  }
  // Validation.
  int why = 0;
  const int64_t out_of_range[3] = {0, 3, 2};
  CHECK(tsmc::check_ancestors(out_of_range, 3, &why) == 1 && why == 1);
  const int64_t negative[3] = {-1, 1, 2};
  CHECK(tsmc::check_ancestors(negative, 3, &why) == 0 && why == 1);
  const int64_t chain[3] = {1, 2, 2};  // row 1 is read by row 0 but overwritten from row 2
  CHECK(tsmc::check_ancestors(chain, 3, &why) == 0 && why == 2);
}

// One row of twist_sample against closed forms: p0 = (1, 2, 3, 0) / 6, and the token against a
// brute-force Gumbel-max over every entry (no skipping).
struct TwistRow {
  int64_t token;
  float logp, logq, log_zpi, log_psi, entropy;
};

static TwistRow run_twist_row(const std::vector<float>& x, const std::vector<float>* tw, double temperature,
                              int64_t top_k, int64_t step, const int64_t* given = nullptr) {
  const int64_t V = static_cast<int64_t>(x.size());
  TwistRow r{};
  std::vector<double> scratch(2 * V);
  tsmc::TwistSampleArgs a{x.data(), V, tw ? tw->data() : nullptr, V, 1, V, temperature, top_k,
                          tsmc::rng::fold_seed(7), &step, 0, given, &r.token, &r.logp, &r.logq,
                          &r.log_zpi, &r.log_psi, &r.entropy};
  tsmc::twist_sample_rows(a, 0, 1, scratch.data());
  return r;
}

static void test_twist_sample() {
  const float ninf = -std::numeric_limits<float>::infinity();
  const std::vector<float> x = {0.0f, std::log(2.0f), std::log(3.0f), ninf};
  const double p[4] = {1.0 / 6, 2.0 / 6, 3.0 / 6, 0.0};
  double h = 0.0;
  for (double pv : p) h -= pv > 0 ? pv * std::log(pv) : 0.0;
  for (int64_t step = 0; step < 200; ++step) {
    const TwistRow r = run_twist_row(x, nullptr, 1.0, 0, step);
    const uint32_t key = tsmc::rng::row_key(tsmc::rng::fold_seed(7), step, tsmc::rng::kStreamToken, 0);
    int64_t best = -1;
    double best_val = -INFINITY;
    for (int64_t v = 0; v < 3; ++v) {
      const double val = std::log(p[v]) - std::log(-std::log(tsmc::rng::uniform(key, v)));
      if (val > best_val) best_val = val, best = v;
    }
    CHECK(r.token == best);
    CHECK(std::fabs(r.logp - std::log(p[r.token])) < 1e-6 && r.logq == r.logp);
    CHECK(std::fabs(r.entropy - h) < 1e-6 && std::fabs(r.log_zpi) < 1e-6 && r.log_psi == 0.0f);
  }
  // A twist that kills entry 2 and a top-1 proposal: the only candidate is entry 1.
  const std::vector<float> tw = {0.0f, 0.0f, ninf, 0.0f};
  const TwistRow k = run_twist_row(x, &tw, 0.5, 1, 3);
  CHECK(k.token == 1 && std::fabs(k.logq) < 1e-6 && std::fabs(k.log_zpi - std::log(3.0 / 6)) < 1e-6);
  // Teacher forcing: the given token's values; outside the top-k, logq = -inf.
  const int64_t given = 0;
  const TwistRow f = run_twist_row(x, &tw, 0.5, 1, 3, &given);
  CHECK(f.token == 0 && f.logq == ninf && std::fabs(f.logp - std::log(p[0])) < 1e-6);
  // No finite proposal entry: token 0, logq -inf. A NaN logit: token 0, NaN values.
  const std::vector<float> dead = {ninf, ninf};
  const TwistRow d = run_twist_row(dead, nullptr, 1.0, 0, 0);
  CHECK(d.token == 0 && d.logq == ninf && d.logp == ninf && d.entropy == 0.0f);
  const std::vector<float> nan_row = {0.0f, std::numeric_limits<float>::quiet_NaN(), 1.0f};
  const TwistRow n = run_twist_row(nan_row, nullptr, 1.0, 0, 0);
  CHECK(n.token == 0 && std::isnan(n.logp) && std::isnan(n.logq) && std::isnan(n.entropy));
}

int main() {
  test_hash_known_answers();
  test_resample_known_answers();
  test_resample_properties();
  test_identity_cases();
  test_ancestors_from_counts();
  test_gather();
  test_twist_sample();
  if (g_failures) {
    std::fprintf(stderr, "%d of %d checks failed\n", g_failures, g_checks);
    return 1;
  }
  std::printf("all %d checks passed\n", g_checks);
  return 0;
}

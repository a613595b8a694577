// See resample.h for the contract; the comments here point at the reference lines mirrored.
#include "resample.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "logsumexp.h"
#include "rng.h"

namespace tsmc {

bool parse_scheme(const std::string& name, Scheme* out) {
  static const char* const kNames[] = {"systematic", "stratified", "multinomial", "residual"};
  for (int i = 0; i < 4; ++i) {
    if (name == kNames[i]) {
      *out = static_cast<Scheme>(i);
      return true;
    }
  }
  return false;
}

const char* scheme_name(Scheme scheme) {
  switch (scheme) {
    case Scheme::kSystematic: return "systematic";
    case Scheme::kStratified: return "stratified";
    case Scheme::kMultinomial: return "multinomial";
    case Scheme::kResidual: return "residual";
  }
  return "?";
}

namespace {

// torch.logsumexp of an array (NaN if any entry is NaN).
double logsumexp(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return x[i];
    m = std::max(m, x[i]);
  }
  return logsumexp_given_max([x](int64_t i) { return x[i]; }, n, m);
}

// cw[i] = (w[0] + ... + w[i]) / (w[0] + ... + w[n-1]), sequential as torch.cumsum on CPU.
void normalised_cumsum(double* cw, int64_t n) {
  for (int64_t i = 1; i < n; ++i) cw[i] += cw[i - 1];
  const double last = cw[n - 1];
  for (int64_t i = 0; i < n; ++i) cw[i] /= last;
}

// pos[k] = c_k / c_n with c = cumsum(-log u_j), j = 0..n: n sorted uniforms (multinomial draws).
void sorted_uniforms(uint32_t key, int64_t n, double* pos) {
  double c = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    c += -std::log(rng::uniform(key, j));
    pos[j] = c;
  }
  c += -std::log(rng::uniform(key, n));
  for (int64_t j = 0; j < n; ++j) pos[j] /= c;
}

// counts[min(upper_bound(cw, pos[k]), n-1)] += 1 for sorted positions (a merge, same result as
// torch.searchsorted(right=True) on a non-decreasing cw).
void add_counts(const double* cw, int64_t n, const double* pos, int64_t n_pos, int64_t* counts) {
  int64_t j = 0;
  for (int64_t k = 0; k < n_pos; ++k) {
    while (j < n && !(pos[k] < cw[j])) ++j;
    counts[std::min(j, n - 1)] += 1;
  }
}

}  // namespace

bool offspring_counts_row(const double* log_w, int64_t N, Scheme scheme, uint32_t seed32, int64_t step, int64_t row,
                          int64_t* counts, double* scratch) {
  std::fill(counts, counts + N, int64_t{1});
  if (N <= 0) return false;
  const double lse = logsumexp(log_w, N);
  if (!std::isfinite(lse)) return false;  // all -inf (dead prompt), or NaN / +inf (undefined)
  double* cw = scratch;           // N weights, then their normalised cumsum
  double* pos = scratch + N + 1;  // up to N positions
  for (int64_t i = 0; i < N; ++i) cw[i] = std::exp(log_w[i] - lse);
  const uint32_t key = rng::row_key(seed32, step, rng::kStreamResample, row);
  const double n = static_cast<double>(N);
  std::fill(counts, counts + N, int64_t{0});

  if (scheme == Scheme::kResidual) {
    double base_sum = 0.0;
    for (int64_t i = 0; i < N; ++i) {
      const double nw = n * cw[i];
      const double base = std::floor(nw);
      counts[i] = static_cast<int64_t>(base);
      base_sum += base;
      cw[i] = nw - base;  // remainder
    }
    const int64_t R = static_cast<int64_t>(n - base_sum);
    if (R <= 0) return true;
    normalised_cumsum(cw, N);
    sorted_uniforms(key, R, pos);
    add_counts(cw, N, pos, R, counts);
    return true;
  }

  normalised_cumsum(cw, N);
  switch (scheme) {
    case Scheme::kSystematic: {
      const double u = rng::uniform(key, 0);
      for (int64_t k = 0; k < N; ++k) pos[k] = (static_cast<double>(k) + u) / n;
      break;
    }
    case Scheme::kStratified:
      for (int64_t k = 0; k < N; ++k) pos[k] = (static_cast<double>(k) + rng::uniform(key, k)) / n;
      break;
    default:  // kMultinomial
      sorted_uniforms(key, N, pos);
      break;
  }
  add_counts(cw, N, pos, N, counts);
  return true;
}

void ancestors_from_counts_row(const int64_t* counts, int64_t N, int64_t* ancestors) {
  // The d-th dead slot takes the particle i with extra_end[i-1] <= d < extra_end[i], where
  // extra_end is the inclusive cumsum of max(counts - 1, 0): a two-pointer walk.
  int64_t src = 0;
  int64_t used = 0;  // extra copies of `src` already handed out
  for (int64_t j = 0; j < N; ++j) {
    if (counts[j] != 0) {
      ancestors[j] = j;
      continue;
    }
    while (src < N && used >= std::max<int64_t>(counts[src] - 1, 0)) {
      ++src;
      used = 0;
    }
    ancestors[j] = std::min(src, N - 1);
    ++used;
  }
}

void resample_rows(const double* log_w, const bool* mask, int64_t B, int64_t N, Scheme scheme, uint32_t seed32,
                   int64_t step, int64_t* ancestors, int64_t b_begin, int64_t b_end) {
  (void)B;
  std::vector<double> scratch;
  std::vector<int64_t> counts;
  for (int64_t b = b_begin; b < b_end; ++b) {
    int64_t* anc = ancestors + b * N;
    bool live = mask == nullptr || mask[b];
    if (live) {
      if (scratch.empty()) {
        scratch.resize(2 * static_cast<size_t>(N + 1));
        counts.resize(static_cast<size_t>(N));
      }
      live = offspring_counts_row(log_w + b * N, N, scheme, seed32, step, b, counts.data(), scratch.data());
    }
    if (live) {
      ancestors_from_counts_row(counts.data(), N, anc);
    } else {
      for (int64_t j = 0; j < N; ++j) anc[j] = j;
    }
  }
}

}  // namespace tsmc

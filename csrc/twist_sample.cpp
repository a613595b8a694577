// See twist_sample.h for the contract; the passes below mirror reference._proposal / twist_sample.
#include "twist_sample.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "logsumexp.h"
#include "rng.h"

namespace tsmc {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

void write_row(const TwistSampleArgs& a, int64_t m, int64_t token, double logp, double logq, double log_zpi,
               double log_psi, double entropy) {
  a.token[m] = token;
  a.logp[m] = static_cast<float>(logp);
  a.logq[m] = static_cast<float>(logq);
  a.log_zpi[m] = static_cast<float>(log_zpi);
  a.log_psi[m] = static_cast<float>(log_psi);
  a.entropy[m] = static_cast<float>(entropy);
}

void one_row(const TwistSampleArgs& a, int64_t m, double* r, double* kth_buf) {
  const int64_t V = a.V;
  const float* x = a.logits + m * a.ld_logits;
  const float* tw = a.twist != nullptr ? a.twist + m * a.ld_twist : nullptr;
  auto twist = [&](int64_t v) { return tw != nullptr ? static_cast<double>(tw[v]) : 0.0; };

  // Pass 1: max of the logits, and bad values (NaN / +inf).
  double m0 = -kInf;
  bool bad_x = false, bad_t = false;
  for (int64_t v = 0; v < V; ++v) {
    const double xv = x[v];
    bad_x |= !(xv < kInf);
    m0 = xv > m0 ? xv : m0;
  }
  if (tw != nullptr) {
    for (int64_t v = 0; v < V; ++v) bad_t |= !(tw[v] < std::numeric_limits<float>::infinity());
  }
  const int64_t tok0 = a.given != nullptr ? a.given[m] : 0;
  if (bad_x) {
    write_row(a, m, tok0, kNaN, kNaN, kNaN, twist(tok0), kNaN);
    return;
  }

  // Pass 2: lse0 and the entropy (S0 = sum e^(x - m0), A0 = sum e^(x - m0) (x - m0)). When the
  // proposal is p0 itself (no twist, T = 1, no top-k) these exps are also its group sums (pass 4).
  const bool same_r = a.temperature == 1.0 && !(a.top_k > 0 && a.top_k < V);
  const bool base_is_proposal = same_r && tw == nullptr;
  double* group_sum = kth_buf;  // [#groups] (kth_buf's top-k use excludes base_is_proposal)
  const double shift0 = std::isinf(m0) ? 0.0 : m0;
  double s0 = 0.0, a0 = 0.0;
  for (int64_t g0 = 0, g = 0; g0 < V; g0 += rng::kTokenGroup, ++g) {
    const int64_t g_end = std::min<int64_t>(g0 + rng::kTokenGroup, V);
    double sg = 0.0;
    for (int64_t v = g0; v < g_end; ++v) {
      const double d = static_cast<double>(x[v]) - shift0;
      const double e = std::exp(d);
      sg += e;
      a0 += e > 0.0 ? e * d : 0.0;
    }
    s0 += sg;
    if (base_is_proposal) group_sum[g] = sg;
  }
  const double lse0 = std::log(s0) + shift0;
  const bool dead0 = lse0 == -kInf;
  const double entropy = dead0 ? 0.0 : std::log(s0) - a0 / s0;
  auto logp0 = [&](int64_t v) { return dead0 ? -kInf : static_cast<double>(x[v]) - lse0; };
  if (bad_t) {
    write_row(a, m, tok0, logp0(tok0), kNaN, kNaN, twist(tok0), entropy);
    return;
  }

  // Pass 3: r = (logp0 + tw) / T, its max (and top-k threshold), the max of s = logp0 + tw.
  double ms = -kInf, mr = -kInf;
  for (int64_t v = 0; v < V; ++v) {
    const double s = logp0(v) + twist(v);
    ms = s > ms ? s : ms;
    r[v] = s / a.temperature;
  }
  if (a.top_k > 0 && a.top_k < V) {
    std::copy(r, r + V, kth_buf);
    std::nth_element(kth_buf, kth_buf + (a.top_k - 1), kth_buf + V, std::greater<double>());
    const double kth = kth_buf[a.top_k - 1];
    for (int64_t v = 0; v < V; ++v) r[v] = r[v] >= kth ? r[v] : -kInf;
  }
  for (int64_t v = 0; v < V; ++v) mr = r[v] > mr ? r[v] : mr;

  // Pass 4: sums of e^(r - max r) per vocabulary group, one exp per entry (pass 2's when the base
  // is the proposal: r - max r = x - m0): the proposal's logsumexp and each group's log mass for
  // the draw. log Zpi = logsumexp(s): without a twist s = logp0, whose logsumexp is lse0 - lse0 = 0
  // (the reference's own sum gives 0 within an ulp); with a twist at T = 1 and no top-k s = r, the
  // same sum; otherwise a pass of its own.
  const double shift_r = base_is_proposal ? shift0 - (dead0 ? 0.0 : lse0) : std::isinf(mr) ? 0.0 : mr;
  double total = s0;
  if (!base_is_proposal) {
    total = 0.0;
    for (int64_t g0 = 0, g = 0; g0 < V; g0 += rng::kTokenGroup, ++g) {
      const int64_t g_end = std::min<int64_t>(g0 + rng::kTokenGroup, V);
      double sg = 0.0;
      for (int64_t v = g0; v < g_end; ++v) sg += std::exp(r[v] - shift_r);
      group_sum[g] = sg;
      total += sg;
    }
  }
  const double lse_r_sum = std::log(total) + shift_r;
  const double log_zpi = tw == nullptr ? (dead0 ? -kInf : 0.0)
                         : same_r      ? lse_r_sum
                                       : logsumexp_given_max([&](int64_t v) { return logp0(v) + twist(v); }, V, ms);
  const double lse_r = same_r ? log_zpi : lse_r_sum;
  if (a.given != nullptr) {  // teacher forcing: the reference's values at the given token
    write_row(a, m, tok0, logp0(tok0), r[tok0] - lse_r, log_zpi, twist(tok0), entropy);
    return;
  }
  if (lse_r == -kInf) {  // no finite proposal entry: token 0, logq = -inf
    write_row(a, m, 0, logp0(0), -kInf, log_zpi, twist(0), entropy);
    return;
  }

  // Pass 5: the two-level Gumbel-max of reference.gumbel_max. The group with the largest
  // log mass + group noise (earliest on ties), then the token with the largest logq + token noise
  // inside it: token noise for one group only.
  const int64_t step = a.steps[m * a.step_stride];
  const uint32_t group_key = rng::row_key(a.seed32, step, rng::kStreamTokenGroup, m);
  int64_t group = 0;
  double best_group = -kInf;
  for (int64_t g0 = 0, g = 0; g0 < V; g0 += rng::kTokenGroup, ++g) {
    if (group_sum[g] == 0.0) continue;  // no finite entry (or none within e^-745 of the max)
    const double val = (std::log(group_sum[g]) + shift_r - lse_r) + rng::gumbel(group_key, g);
    if (val > best_group) {
      best_group = val;
      group = g0;
    }
  }
  const uint32_t key = rng::row_key(a.seed32, step, rng::kStreamToken, m);
  const int64_t g_end = std::min<int64_t>(group + rng::kTokenGroup, V);
  int64_t token = group;
  double best = -kInf;
  for (int64_t v = group; v < g_end; ++v) {
    const double lq = r[v] - lse_r;
    if (lq == -kInf) continue;
    const double val = lq + rng::gumbel(key, v);
    if (val > best) {
      best = val;
      token = v;
    }
  }
  write_row(a, m, token, logp0(token), r[token] - lse_r, log_zpi, twist(token), entropy);
}

}  // namespace

void twist_sample_rows(const TwistSampleArgs& args, int64_t m_begin, int64_t m_end, double* scratch) {
  for (int64_t m = m_begin; m < m_end; ++m) one_row(args, m, scratch, scratch + args.V);
}

}  // namespace tsmc

// torch.logsumexp's arithmetic, shared by the CPU kernels so that they round as the reference does.
#pragma once

#include <cmath>
#include <cstdint>

namespace tsmc {

// logsumexp of the n values f(0..n-1) given their max: shift by the max (0 when it is +-inf), sum
// exp, log, add the shift back (all -inf: -inf).
template <typename F>
double logsumexp_given_max(F f, int64_t n, double max) {
  const double shift = std::isinf(max) ? 0.0 : max;
  double s = 0.0;
  for (int64_t v = 0; v < n; ++v) s += std::exp(f(v) - shift);
  return std::log(s) + shift;
}

}  // namespace tsmc

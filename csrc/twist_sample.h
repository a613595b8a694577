// Twist scoring + Gumbel-max sampling on the CPU (SPEC §6.1), row by row.
//
// Torch-free. The arithmetic follows reference.twist_sample step for step, in fp64:
//
//   lse0   = logsumexp(x)                      (max-shifted, as torch.logsumexp)
//   logp0  = x - lse0                          (-inf everywhere when lse0 = -inf)
//   s      = logp0 + tw;  log_zpi = logsumexp(s)
//   r      = s / T, kept where r >= its k-th largest (top-k), else -inf;  logq = r - logsumexp(r)
//   token  = the two-level Gumbel-max of reference.gumbel_max over logq: the group of
//            rng::kTokenGroup ids with the largest logsumexp + gumbel(STREAM_TOKEN_GROUP, group),
//            then argmax_v in it of logq_v + gumbel(STREAM_TOKEN, v)
//   entropy = logsumexp(x) - sum_v p0_v x_v    (computed as log S0 - sum e^(x-m0) (x-m0) / S0)
//
// so tokens equal the reference's (the noise is bit-identical; only libm-vs-PyTorch last-bit
// differences in exp / log could flip an exact tie).
//
// Rows with bad values: a NaN or +inf logit makes logp, logq, log_zpi and entropy NaN and the token
// 0 (log_psi is tw[0]); a NaN or +inf twist makes logq and log_zpi NaN and the token 0. A row whose
// proposal has no finite entry gets token 0 and logq = -inf. Every backend, the reference included,
// follows these conventions (ops.twist_sample).
#pragma once

#include <cstdint>

namespace tsmc {

struct TwistSampleArgs {
  const float* logits;   // [M, V], row stride ld_logits (elements)
  int64_t ld_logits;
  const float* twist;    // [M, V] or null (log psi = 0), row stride ld_twist
  int64_t ld_twist;
  int64_t M, V;
  double temperature;    // > 0
  int64_t top_k;         // 0 or >= V: off
  uint32_t seed32;       // rng::fold_seed(seed)
  const int64_t* steps;  // step of row m: steps[m * step_stride] (step_stride 0: one step for all)
  int64_t step_stride;
  const int64_t* given;  // null: sample; else score these tokens (teacher forcing, in [0, V))
  // Outputs, [M] each.
  int64_t* token;
  float* logp;
  float* logq;
  float* log_zpi;
  float* log_psi;
  float* entropy;
};

// Rows [m_begin, m_end). `scratch` must hold 2 * V doubles.
void twist_sample_rows(const TwistSampleArgs& args, int64_t m_begin, int64_t m_end, double* scratch);

}  // namespace tsmc

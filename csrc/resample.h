// Resampling for SMC, per prompt: offspring counts, then the ancestor permutation (SPEC §2, §6.3).
//
// Torch-free. The arithmetic follows tsmc_kernels/reference.py step for step, in fp64, so the
// ancestors equal `reference.resample` exactly (up to the last-bit differences between libm and
// the vectorised exp/log of PyTorch, which can only matter when a position lands within an ulp
// of a cumulative weight — not observed on random inputs):
//
//   w      = exp(log_w - logsumexp(log_w))               (max-shifted, as torch.logsumexp)
//   cw     = cumsum(w) / cumsum(w)[N-1]                  (exactly 1.0 at the end)
//   pos_k  = systematic:  (k + u_0) / N
//            stratified:  (k + u_k) / N
//            multinomial: c_k / c_N,  c = cumsum(-log u_j), j = 0..N  (sorted uniforms)
//   anc_k  = min(upper_bound(cw, pos_k), N - 1);  counts = bincount(anc)
//   residual: counts = floor(N w) + multinomial(R = N - sum floor(N w)) over the remainders
//             N w - floor(N w), drawing R + 1 exponentials from the same stream.
//
// The uniforms are rng::uniform(rng::row_key(seed32, step, kStreamResample, b), counter).
// Ancestors: a particle with offspring is its own ancestor; the extra copies of each particle,
// in particle order, fill the slots with no offspring in slot order. Prompts that are not
// masked, whose weights are all -inf, or whose weights are not finite after normalisation
// (NaN or +inf: undefined in the reference) get the identity.
#pragma once

#include <cstdint>
#include <string>

namespace tsmc {

enum class Scheme { kSystematic = 0, kStratified = 1, kMultinomial = 2, kResidual = 3 };

// Parses "systematic" / "stratified" / "multinomial" / "residual"; false for anything else.
bool parse_scheme(const std::string& name, Scheme* out);
const char* scheme_name(Scheme scheme);

// Offspring counts of one prompt's N particles (int64, summing to N). Returns false, leaving
// `counts` as all ones (the identity), when the weights are all -inf or not finite.
// `scratch` must hold at least 2 * (N + 1) doubles.
bool offspring_counts_row(const double* log_w, int64_t N, Scheme scheme, uint32_t seed32, int64_t step,
                          int64_t row, int64_t* counts, double* scratch);

// SPEC §2 ancestor permutation from offspring counts summing to N. Indices are clamped to
// [0, N) whatever the counts.
void ancestors_from_counts_row(const int64_t* counts, int64_t N, int64_t* ancestors);

// Ancestors int64 [B, N] (row-major) for the prompts b in [b_begin, b_end). `mask` may be null
// (every prompt resamples). `seed32` is the folded seed (rng::fold_seed).
void resample_rows(const double* log_w, const bool* mask, int64_t B, int64_t N, Scheme scheme, uint32_t seed32,
                   int64_t step, int64_t* ancestors, int64_t b_begin, int64_t b_end);

// All prompts.
inline void resample(const double* log_w, const bool* mask, int64_t B, int64_t N, Scheme scheme, uint32_t seed32,
                     int64_t step, int64_t* ancestors) {
  resample_rows(log_w, mask, B, N, scheme, seed32, step, ancestors, 0, B);
}

}  // namespace tsmc

// Counter-based random numbers: the exact arithmetic of tsmc_kernels/rng.py on uint32 words.
//
// Every backend (PyTorch reference, Triton, C++, CUDA) draws randomness from a pure function of
// (seed, step, stream, row, counter), so they all draw bit-identical numbers:
//
//     mix32(x):  x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
//     key   = mix32(mix32(mix32(seed32 ^ (stream * 0x9E3779B9)) ^ step32) ^ row32)
//     bits  = mix32(key ^ (counter * 0x85EBCA6B))
//     u     = (bits + 0.5) / 2**32                   // in [2**-33, 1 - 2**-33], exact in fp64
//
// with seed32 = (seed ^ (seed >> 32)) mod 2**32 and step32 / row32 taken mod 2**32.
// Header-only, torch-free, usable from host and device code.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TSMC_HD __host__ __device__ __forceinline__
#else
#define TSMC_HD inline
#endif

namespace tsmc {
namespace rng {

constexpr uint32_t kStreamToken = 1;     // Gumbel noise for token sampling
constexpr uint32_t kStreamResample = 2;  // resampling uniforms: row = prompt, counter = draw
constexpr uint32_t kStreamTokenGroup = 3;  // Gumbel noise for the vocabulary group: counter = group
constexpr int64_t kTokenGroup = 2048;      // vocabulary ids per group (rng.TOKEN_GROUP)
constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint32_t kCounterMul = 0x85EBCA6Bu;

// Chris Wellons' lowbias32 (unsigned arithmetic wraps mod 2**32, as the Python masks do).
TSMC_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// (seed ^ (seed >> 32)) mod 2**32; the caller rejects negative seeds.
TSMC_HD uint32_t fold_seed(uint64_t seed) { return static_cast<uint32_t>(seed ^ (seed >> 32)); }

// Per-row key; step and row are taken mod 2**32 (two's complement for negative values, as in
// the reference's `& MASK32` on int64).
TSMC_HD uint32_t row_key(uint32_t seed32, int64_t step, uint32_t stream, int64_t row) {
  const uint32_t base = seed32 ^ (stream * kGolden);
  return mix32(mix32(mix32(base) ^ static_cast<uint32_t>(step)) ^ static_cast<uint32_t>(row));
}

TSMC_HD uint32_t bits(uint32_t key, int64_t counter) {
  return mix32(key ^ (static_cast<uint32_t>(counter) * kCounterMul));
}

// Uniform in (0, 1) in fp64: (bits + 0.5) * 2**-32, exact (all 32 bits: the Gumbel tails need them,
// see tsmc_kernels/rng.py).
TSMC_HD double uniform(uint32_t key, int64_t counter) {
  return (static_cast<double>(bits(key, counter)) + 0.5) * (1.0 / 4294967296.0);
}

// Standard Gumbel noise -log(-log u) in fp64 (host code).
inline double gumbel(uint32_t key, int64_t counter) { return -std::log(-std::log(uniform(key, counter))); }

}  // namespace rng
}  // namespace tsmc

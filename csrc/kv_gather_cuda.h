// Launcher of the one-launch CUDA KV gather (kv_gather.cu). Torch-free and CUDA-header-free so
// the bindings can declare it without nvcc; compiled only with -DTSMC_WITH_CUDA.
#pragma once

#include <cstdint>

#include "gather.h"

namespace tsmc {

// Largest number of buffers one launch takes (a kernel-argument table); more are launched in
// groups of this size on the same stream.
constexpr int kKvGatherMaxTensors = 64;

// For every buffer and every row i with a[i] != i: row a[i] -> row i, on `stream` (a
// cudaStream_t). `a` is a device pointer to M int64 global row indices satisfying the
// permutation property; the buffers are device memory. No host synchronisation, no allocation:
// capturable in a CUDA graph. Returns the cudaError_t of the launches (0 = success).
int kv_gather_cuda(const RowBuffer* bufs, int64_t n_bufs, const int64_t* a, int64_t M, void* stream);

}  // namespace tsmc

// Launcher of the one-launch CUDA KV gather (kv_gather.cu). Torch-free and CUDA-header-free so
// the bindings can declare it without nvcc; compiled only with -DTSMC_WITH_CUDA.
#pragma once

#include <cstdint>

#include "gather.h"

namespace tsmc {

// Largest number of buffers one launch takes (its table is a kernel argument): 512 when built
// with CUDA >= 12.1 (kernel arguments up to 32 KB), 64 before (4 KB). More are launched in groups
// of this size on the same stream.
int kv_gather_cuda_max_tensors();

// For every buffer and every row i with a[i] != i: row a[i] -> row i, on `stream` (a
// cudaStream_t). `a` is a device pointer to M int64 global row indices satisfying the
// permutation property; the buffers are device memory. No host synchronisation, no allocation:
// capturable in a CUDA graph. Returns the cudaError_t of the launches (0 = success).
int kv_gather_cuda(const RowBuffer* bufs, int64_t n_bufs, const int64_t* a, int64_t M, void* stream);

}  // namespace tsmc

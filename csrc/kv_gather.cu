// One-launch in-place KV-cache gather (SPEC §6.4), torch-free CUDA.
//
// Grid: x = (tensor, 16 KiB chunk of its row) flattened over all tensors of the launch,
//       y = row groups; block (c, g) walks rows i = g, g + gridDim.y, ... and copies chunk c of
//       row a[i] onto row i where a[i] != i. A row with a[i] == i costs one broadcast load, so
//       the identity does no copying and needs no host-side list of moved rows (no sync).
// The per-tensor table {base, row bytes, row stride, first chunk, vector width} is a
// __grid_constant__ kernel argument (up to kKvGatherMaxTensors per launch), so nothing is
// allocated or copied from the host: the launch is CUDA-graph capturable. 36 bytes a tensor:
// CUDA >= 12.1 takes kernel arguments up to 32,764 bytes on Volta and newer, room for 512 tensors
// (a 28-layer model's K and V split per head, 112 views, plus the sampler's buffers: one launch);
// older toolkits stop at 4 KB, 64 tensors.
// Copies use 16-byte vectors (uint4) when base, stride and row bytes are 16-byte aligned,
// else 4-byte words, else bytes.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kv_gather_cuda.h"

namespace tsmc {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kChunkBytes = int64_t{kThreads} * 16 * kUnroll;  // 16 KiB
constexpr int kTargetBlocks = 4096;                                 // enough to fill any GPU
constexpr int kMaxGridY = 65535;
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kKvGatherMaxTensors = 512;
#else
constexpr int kKvGatherMaxTensors = 64;
#endif

struct GatherTable {
  char* base[kKvGatherMaxTensors];
  int64_t row_bytes[kKvGatherMaxTensors];
  int64_t row_stride[kKvGatherMaxTensors];
  int64_t chunk_start[kKvGatherMaxTensors + 1];  // prefix sum of chunks per tensor
  int32_t vec[kKvGatherMaxTensors];              // 16, 4 or 1
  int32_t n;
};
// The table plus the other two arguments must fit the launch's parameter space.
static_assert(sizeof(GatherTable) + 2 * sizeof(int64_t) <= (kKvGatherMaxTensors > 64 ? 32764 : 4096),
              "kernel arguments too large");

__device__ __forceinline__ void copy_chunk16(char* dst, const char* src, int64_t len) {
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
  const int64_t n = len / 16;  // len is a multiple of 16 here
  uint4 r[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t k = threadIdx.x + int64_t{u} * kThreads;
    if (k < n) r[u] = __ldg(s + k);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t k = threadIdx.x + int64_t{u} * kThreads;
    if (k < n) d[k] = r[u];
  }
}

__device__ __forceinline__ void copy_chunk4(char* dst, const char* src, int64_t len) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t k = threadIdx.x; k < len / 4; k += kThreads) d[k] = s[k];
}

__device__ __forceinline__ void copy_chunk1(char* dst, const char* src, int64_t len) {
  for (int64_t k = threadIdx.x; k < len; k += kThreads) dst[k] = src[k];
}

__global__ void __launch_bounds__(kThreads) kv_gather_kernel(const __grid_constant__ GatherTable table,
                                                             const int64_t* __restrict__ a, int64_t M) {
  const int64_t chunk = blockIdx.x;
  // The tensor owning this chunk: the last t with chunk_start[t] <= chunk (binary search).
  int lo = 0, hi = table.n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  const int t = lo;
  const int64_t off = (chunk - table.chunk_start[t]) * kChunkBytes;
  const int64_t rest = table.row_bytes[t] - off;
  const int64_t len = rest < kChunkBytes ? rest : kChunkBytes;
  const int64_t stride = table.row_stride[t];
  char* base = table.base[t] + off;
  const int vec = table.vec[t];
  for (int64_t i = blockIdx.y; i < M; i += gridDim.y) {
    const int64_t src = a[i];
    if (src == i) continue;  // survivors and untouched rows: no work
    if (src < 0 || src >= M) continue;  // out of range (possible only unvalidated): copy nothing
    char* d = base + i * stride;
    const char* s = base + src * stride;
    if (vec == 16) copy_chunk16(d, s, len);
    else if (vec == 4) copy_chunk4(d, s, len);
    else copy_chunk1(d, s, len);
  }
}

int vector_width(const RowBuffer& b) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(b.base);
  for (int w : {16, 4}) {
    if (p % w == 0 && b.row_bytes % w == 0 && b.row_stride % w == 0) return w;
  }
  return 1;
}

}  // namespace

int kv_gather_cuda_max_tensors() { return kKvGatherMaxTensors; }

int kv_gather_cuda(const RowBuffer* bufs, int64_t n_bufs, const int64_t* a, int64_t M, void* stream) {
  if (M <= 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  for (int64_t first = 0; first < n_bufs; first += kKvGatherMaxTensors) {
    GatherTable table;
    table.n = 0;
    int64_t chunks = 0;
    for (int64_t k = first; k < std::min<int64_t>(n_bufs, first + kKvGatherMaxTensors); ++k) {
      const RowBuffer& b = bufs[k];
      if (b.row_bytes <= 0) continue;
      const int n = table.n++;
      table.base[n] = static_cast<char*>(b.base);
      table.row_bytes[n] = b.row_bytes;
      table.row_stride[n] = b.row_stride;
      table.vec[n] = vector_width(b);
      table.chunk_start[n] = chunks;
      chunks += (b.row_bytes + kChunkBytes - 1) / kChunkBytes;
    }
    table.chunk_start[table.n] = chunks;
    if (chunks == 0) continue;
    const int64_t groups = std::min<int64_t>({M, int64_t{kMaxGridY}, std::max<int64_t>(1, kTargetBlocks / chunks)});
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(groups));
    kv_gather_kernel<<<grid, kThreads, 0, s>>>(table, a, M);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

}  // namespace tsmc

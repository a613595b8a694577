// In-place row gather on raw byte buffers (SPEC §6.4), torch-free.
//
// A buffer is M rows of `row_bytes` contiguous bytes, row i starting at base + i * row_stride.
// For every i with a[i] != i, row a[i] is copied onto row i. With the permutation property
// (a row that is read is never written: a[a[i]] == a[i]) the result does not depend on the
// order of the copies, so no temporary buffer is needed; only moved rows are touched.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace tsmc {

struct RowBuffer {
  void* base;
  int64_t row_bytes;   // contiguous bytes per row
  int64_t row_stride;  // bytes between the starts of consecutive rows (>= row_bytes when M > 1)
};

// Index of the first invalid entry of `a` (length M), or -1 if valid. Invalid: out of [0, M),
// or a moved row copies from a row that is itself moved (violates the permutation property).
// `*why` is set to 1 for out of range, 2 for the permutation property.
int64_t check_ancestors(const int64_t* a, int64_t M, int* why);

// The rows i with a[i] != i, in increasing order.
std::vector<int64_t> moved_rows(const int64_t* a, int64_t M);

// Copies row a[i] onto row i of `buf` for every i in moved[begin:end].
void gather_rows(const RowBuffer& buf, const int64_t* a, const int64_t* moved, int64_t begin, int64_t end);

// The whole gather for a list of buffers (serial). Assumes check_ancestors(a, M) == -1.
void gather_inplace(const RowBuffer* bufs, int64_t n_bufs, const int64_t* a, int64_t M);

}  // namespace tsmc

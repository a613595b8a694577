#include "gather.h"

#include <cstring>

namespace tsmc {

int64_t check_ancestors(const int64_t* a, int64_t M, int* why) {
  for (int64_t i = 0; i < M; ++i) {
    if (a[i] < 0 || a[i] >= M) {
      if (why) *why = 1;
      return i;
    }
  }
  for (int64_t i = 0; i < M; ++i) {
    if (a[i] != i && a[a[i]] != a[i]) {
      if (why) *why = 2;
      return i;
    }
  }
  if (why) *why = 0;
  return -1;
}

std::vector<int64_t> moved_rows(const int64_t* a, int64_t M) {
  std::vector<int64_t> moved;
  for (int64_t i = 0; i < M; ++i) {
    if (a[i] != i) moved.push_back(i);
  }
  return moved;
}

void gather_rows(const RowBuffer& buf, const int64_t* a, const int64_t* moved, int64_t begin, int64_t end) {
  if (buf.row_bytes <= 0) return;
  char* base = static_cast<char*>(buf.base);
  const size_t n = static_cast<size_t>(buf.row_bytes);
  for (int64_t k = begin; k < end; ++k) {
    const int64_t i = moved[k];
    std::memcpy(base + i * buf.row_stride, base + a[i] * buf.row_stride, n);
  }
}

void gather_inplace(const RowBuffer* bufs, int64_t n_bufs, const int64_t* a, int64_t M) {
  const std::vector<int64_t> moved = moved_rows(a, M);
  const int64_t n_moved = static_cast<int64_t>(moved.size());
  if (n_moved == 0) return;
  for (int64_t t = 0; t < n_bufs; ++t) gather_rows(bufs[t], a, moved.data(), 0, n_moved);
}

}  // namespace tsmc

// torch / pybind11 bindings of the C++ kernels: module tsmc_kernels._C.
//
//   resample(log_w, mask, scheme, seed, step) -> ancestors   (CPU; see resample.h)
//   twist_sample(logits, log_twist, temperature, top_k, seed32, step, tokens) -> 6 tensors
//                                                            (CPU; see twist_sample.h)
//   kv_gather_(tensors, ancestors) -> None                   (CPU; see gather.h)
//   kv_gather_cuda_(tensors, ancestors) -> None              (CUDA, when built with it)
//   with_cuda: bool
//
// Bad arguments raise ValueError / TypeError naming the argument. The bindings bypass autograd
// (no version-counter bump): call them through tsmc_kernels.ops, whose custom op does that.
// Narrow includes instead of <torch/extension.h>: halves the compile time of this file.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <vector>

#include "gather.h"
#include "resample.h"
#include "rng.h"
#include "twist_sample.h"

#ifdef TSMC_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "kv_gather_cuda.h"
#endif

namespace py = pybind11;

namespace {

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + (t.dim() == 1 ? ",)" : ")");
}

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }

at::Tensor resample(const at::Tensor& log_w, const at::Tensor& mask, const std::string& scheme, int64_t seed,
                    int64_t step) {
  tsmc::Scheme sch;
  if (!tsmc::parse_scheme(scheme, &sch)) {
    value_error("unknown resampling scheme '" + scheme +
                "'; expected one of ('systematic', 'stratified', 'multinomial', 'residual')");
  }
  if (log_w.dim() != 2) value_error("log_w must have 2 dimensions [B, N], got shape " + shape_str(log_w));
  if (log_w.scalar_type() != at::kDouble) type_error("log_w must be float64, got " + std::string(c10::toString(log_w.scalar_type())));
  if (!log_w.device().is_cpu()) value_error("log_w must be on the CPU, got " + log_w.device().str());
  if (mask.dim() != 1) value_error("mask must have 1 dimension [B], got shape " + shape_str(mask));
  if (mask.scalar_type() != at::kBool) type_error("mask must be bool, got " + std::string(c10::toString(mask.scalar_type())));
  if (!mask.device().is_cpu()) value_error("mask must be on the CPU, got " + mask.device().str());
  if (mask.size(0) != log_w.size(0)) {
    value_error("mask has " + std::to_string(mask.size(0)) + " prompts but log_w has " + std::to_string(log_w.size(0)) +
                " (B mismatch)");
  }
  if (seed < 0) value_error("seed must be non-negative, got " + std::to_string(seed));
  const at::Tensor lw = log_w.contiguous();
  const at::Tensor mk = mask.contiguous();
  const int64_t B = lw.size(0), N = lw.size(1);
  at::Tensor out = at::empty({B, N}, lw.options().dtype(at::kLong));
  if (B == 0 || N == 0) return out;
  const double* w = lw.data_ptr<double>();
  const bool* m = mk.data_ptr<bool>();
  int64_t* a = out.data_ptr<int64_t>();
  const uint32_t seed32 = tsmc::rng::fold_seed(static_cast<uint64_t>(seed));
  const int64_t grain = std::max<int64_t>(1, 4096 / N);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    tsmc::resample_rows(w, m, B, N, sch, seed32, step, a, b0, b1);
  });
  return out;
}

// A [M, V] float32 view with unit stride along V (a copy for other dtypes or strides).
at::Tensor float_rows(const at::Tensor& t) {
  at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  return f.stride(1) == 1 ? f : f.contiguous();
}

std::vector<at::Tensor> twist_sample(const at::Tensor& logits, const std::optional<at::Tensor>& log_twist,
                                     double temperature, int64_t top_k, int64_t seed32, const at::Tensor& step,
                                     const std::optional<at::Tensor>& tokens) {
  if (logits.dim() != 2) value_error("logits must have 2 dimensions [M, V], got shape " + shape_str(logits));
  if (!logits.is_floating_point()) type_error("logits must be a floating tensor, got " + std::string(c10::toString(logits.scalar_type())));
  if (!logits.device().is_cpu()) value_error("logits must be on the CPU, got " + logits.device().str());
  const int64_t M = logits.size(0), V = logits.size(1);
  if (V < 1) value_error("logits must have a non-empty vocabulary dimension");
  if (log_twist && (log_twist->sizes() != logits.sizes() || !log_twist->device().is_cpu() || !log_twist->is_floating_point())) {
    value_error("log_twist must be a floating CPU tensor of the logits' shape " + shape_str(logits) + ", got " +
                shape_str(*log_twist));
  }
  if (!(temperature > 0)) value_error("temperature must be > 0, got " + std::to_string(temperature));
  if (top_k < 0) value_error("top_k must be >= 0, got " + std::to_string(top_k));
  if (seed32 < 0 || seed32 > 0xFFFFFFFFll) value_error("seed32 must be a folded 32-bit seed, got " + std::to_string(seed32));
  if (!step.device().is_cpu()) value_error("step must be on the CPU, got " + step.device().str());
  const at::Tensor st = step.to(at::kLong).reshape({-1}).contiguous();
  if (!(st.numel() == 1 || st.numel() == M)) value_error("step must have 1 or M elements, got shape " + shape_str(step));
  at::Tensor given;
  if (tokens) {
    if (tokens->dim() != 1 || tokens->size(0) != M) value_error("tokens must have shape [M], got " + shape_str(*tokens));
    if (!tokens->device().is_cpu()) value_error("tokens must be on the CPU, got " + tokens->device().str());
    given = tokens->to(at::kLong).contiguous();
    const int64_t* g = given.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m) {
      if (g[m] < 0 || g[m] >= V) value_error("tokens[" + std::to_string(m) + "] = " + std::to_string(g[m]) + " is not in [0, " + std::to_string(V) + ")");
    }
  }
  const at::Tensor x = float_rows(logits);
  const at::Tensor t = log_twist ? float_rows(*log_twist) : at::Tensor();
  std::vector<at::Tensor> out;
  out.push_back(at::empty({M}, logits.options().dtype(at::kLong)));
  for (int k = 0; k < 5; ++k) out.push_back(at::empty({M}, logits.options().dtype(at::kFloat)));
  tsmc::TwistSampleArgs args{x.data_ptr<float>(), x.stride(0), t.defined() ? t.data_ptr<float>() : nullptr,
                             t.defined() ? t.stride(0) : 0, M, V, temperature, top_k,
                             static_cast<uint32_t>(seed32), st.data_ptr<int64_t>(), st.numel() == 1 ? 0 : 1,
                             given.defined() ? given.data_ptr<int64_t>() : nullptr, out[0].data_ptr<int64_t>(),
                             out[1].data_ptr<float>(), out[2].data_ptr<float>(), out[3].data_ptr<float>(),
                             out[4].data_ptr<float>(), out[5].data_ptr<float>()};
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<double> scratch(2 * V);
    tsmc::twist_sample_rows(args, m0, m1, scratch.data());
  });
  return out;
}

// ancestors [M] or [B, N] (within-prompt) -> contiguous int64 [M] global row indices, range-checked.
at::Tensor flat_ancestors(const at::Tensor& ancestors) {
  if (ancestors.dim() != 1 && ancestors.dim() != 2) {
    value_error("ancestors must have 1 or 2 dimensions ([M] or [B, N]), got shape " + shape_str(ancestors));
  }
  if (ancestors.scalar_type() != at::kLong && ancestors.scalar_type() != at::kInt) {
    type_error("ancestors must be int64 or int32, got " + std::string(c10::toString(ancestors.scalar_type())));
  }
  at::Tensor a = ancestors.to(at::kLong);
  if (a.dim() == 2) {
    const int64_t B = a.size(0), N = a.size(1);
    a = a.add(at::arange(B, a.options()).mul_(N).unsqueeze(1)).reshape({-1});
  }
  return a.contiguous();
}

// Checks a host copy of the flat ancestors; raises ValueError naming the first bad entry.
void check_ancestors_host(const at::Tensor& flat_cpu) {
  const int64_t M = flat_cpu.numel();
  int why = 0;
  const int64_t bad = tsmc::check_ancestors(flat_cpu.data_ptr<int64_t>(), M, &why);
  if (bad < 0) return;
  const int64_t v = flat_cpu.data_ptr<int64_t>()[bad];
  if (why == 1) {
    value_error("ancestors out of range: global row " + std::to_string(bad) + " has ancestor " + std::to_string(v) +
                ", not in [0, " + std::to_string(M) + ")");
  }
  value_error("ancestors violate the permutation property: row " + std::to_string(bad) + " copies row " +
              std::to_string(v) + ", which is itself overwritten");
}

// Whether t's dim-0 slices are contiguous and do not overlap, so a row is one memcpy.
bool rows_are_flat(const at::Tensor& t) {
  if (t.layout() != at::kStrided) return false;
  const int64_t M = t.size(0);
  if (M == 0 || t.numel() == 0) return true;
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return M == 1 || t.stride(0) >= expected;
}

tsmc::RowBuffer row_buffer(const at::Tensor& t) {
  const int64_t M = t.size(0);
  const int64_t es = static_cast<int64_t>(t.element_size());
  const int64_t row_bytes = M == 0 ? 0 : (t.numel() / M) * es;
  return tsmc::RowBuffer{t.data_ptr(), row_bytes, t.stride(0) * es};
}

void check_tensors(const std::vector<at::Tensor>& tensors, int64_t M, const c10::Device& device) {
  for (size_t k = 0; k < tensors.size(); ++k) {
    const at::Tensor& t = tensors[k];
    const std::string name = "tensors[" + std::to_string(k) + "]";
    if (!t.defined()) type_error(name + " is an undefined tensor");
    if (t.dim() < 1 || t.size(0) != M) {
      value_error(name + " has shape " + shape_str(t) + "; dim 0 must equal the " + std::to_string(M) +
                  " particle rows of ancestors");
    }
    if (t.device() != device) {
      value_error(name + " is on " + t.device().str() + " but ancestors are on " + device.str() +
                  "; move them to one device");
    }
    if (t.layout() != at::kStrided) type_error(name + " must be a strided (dense) tensor");
  }
}

void kv_gather_cpu(const std::vector<at::Tensor>& tensors, const at::Tensor& ancestors) {
  if (!ancestors.device().is_cpu()) value_error("ancestors must be on the CPU, got " + ancestors.device().str());
  const at::Tensor a = flat_ancestors(ancestors);
  const int64_t M = a.numel();
  check_tensors(tensors, M, a.device());
  check_ancestors_host(a);
  const int64_t* ap = a.data_ptr<int64_t>();
  const std::vector<int64_t> moved = tsmc::moved_rows(ap, M);
  const int64_t n_moved = static_cast<int64_t>(moved.size());
  if (n_moved == 0) return;

  std::vector<tsmc::RowBuffer> bufs;
  int64_t total_row_bytes = 0;
  for (const at::Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    if (rows_are_flat(t)) {
      bufs.push_back(row_buffer(t));
      total_row_bytes += bufs.back().row_bytes;
    } else {  // strided rows: torch copies each moved row (still only the moved ones)
      for (int64_t i : moved) t.select(0, i).copy_(t.select(0, ap[i]));
    }
  }
  if (bufs.empty()) return;
  // Work item k = (buffer k / n_moved, moved row k % n_moved); ~256 KiB per task.
  const int64_t n_items = static_cast<int64_t>(bufs.size()) * n_moved;
  const int64_t avg = std::max<int64_t>(1, total_row_bytes / static_cast<int64_t>(bufs.size()));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / avg);
  at::parallel_for(0, n_items, grain, [&](int64_t k0, int64_t k1) {
    while (k0 < k1) {
      const int64_t b = k0 / n_moved;
      const int64_t r0 = k0 % n_moved;
      const int64_t r1 = std::min(n_moved, r0 + (k1 - k0));
      tsmc::gather_rows(bufs[b], ap, moved.data(), r0, r1);
      k0 += r1 - r0;
    }
  });
}

#ifdef TSMC_WITH_CUDA
void kv_gather_cuda(const std::vector<at::Tensor>& tensors, const at::Tensor& ancestors) {
  if (!ancestors.device().is_cuda()) value_error("ancestors must be on a CUDA device, got " + ancestors.device().str());
  const c10::cuda::CUDAGuard guard(ancestors.device());
  const at::Tensor a = flat_ancestors(ancestors);  // device ops only: no sync
  const int64_t M = a.numel();
  check_tensors(tensors, M, a.device());
  std::vector<tsmc::RowBuffer> bufs;
  for (const at::Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    if (rows_are_flat(t)) {
      bufs.push_back(row_buffer(t));
    } else {  // strided rows: gather every row through a temporary (correct, no sync, more bytes)
      t.copy_(t.index_select(0, a));
    }
  }
  if (bufs.empty() || M == 0) return;
  const int err = tsmc::kv_gather_cuda(bufs.data(), static_cast<int64_t>(bufs.size()), a.data_ptr<int64_t>(), M,
                                       c10::cuda::getCurrentCUDAStream(a.device().index()).stream());
  TORCH_CHECK(err == 0, "kv_gather_cuda_ launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tsmc_kernels C++ kernels: CPU twist sampling, resampling and KV gather, CUDA KV gather";
  m.def("resample", &resample, py::arg("log_w"), py::arg("mask"), py::arg("scheme"), py::arg("seed"), py::arg("step"),
        "Ancestors int64 [B, N] of reference.resample from float64 log weights [B, N] and a bool mask [B] (CPU).");
  m.def("twist_sample", &twist_sample, py::arg("logits"), py::arg("log_twist"), py::arg("temperature"),
        py::arg("top_k"), py::arg("seed32"), py::arg("step"), py::arg("tokens") = py::none(),
        "reference.twist_sample (tokens=None) or reference.twist_score (tokens [M]) on CPU tensors [M, V]: "
        "[token int64, logp, logq, log_zpi, log_psi, entropy fp32] (see csrc/twist_sample.h).");
  m.def("kv_gather_", &kv_gather_cpu, py::arg("tensors"), py::arg("ancestors"),
        "In place t[i] = t[a[i]] for rows with a[i] != i of every CPU tensor (ancestors [M] or [B, N]).");
#ifdef TSMC_WITH_CUDA
  m.def("kv_gather_cuda_", &kv_gather_cuda, py::arg("tensors"), py::arg("ancestors"),
        "One-launch CUDA version of kv_gather_ (no host sync; CUDA-graph capturable). Does not validate values.");
  m.attr("with_cuda") = true;
  m.attr("kv_gather_cuda_max_tensors") = tsmc::kv_gather_cuda_max_tensors();
#else
  m.attr("with_cuda") = false;
#endif
}

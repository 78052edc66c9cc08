// Sparse linear layer for decoding: reads only the weight rows whose input is kept.
//
// y[t, :] = bias + sum_i keep(t, i) * x[t, i] * wt[i, :]   with   keep(t, i) = |x[t, i]| * scale[i] > thresh[i]
//
// `wt` is the transposed weight [in, out], so each kept input channel is one contiguous row:
// at 50% sparsity half the weight bytes are never touched, which is what makes memory-bound
// decoding faster. For several rows (t) the union of kept channels is read once: each kept
// weight row is loaded from memory exactly once per call, whatever the number of rows.
// Accumulation is in float32 for both float32 and bfloat16 weights.
//
// One build runs on every x86-64 CPU: nothing here is compiled with -march. The inner loops exist
// three times -- portable C++ (common.h), AVX2+FMA (avx2.h), AVX-512 F/BW/VL (avx512.h) -- the
// vector ones compiled for their instruction set with `#pragma GCC target`, and one is picked at
// run time from cpuid (`__builtin_cpu_supports`, dispatch.h). ACTSCOPE_KERNEL_ISA=scalar|avx2|avx512 (read at load) or
// `set_isa(name)` forces a path; forcing one the CPU lacks is an error, not a crash.
//
// This file holds the calls (masking, the kernel's ranges, the group split) and the Python
// bindings; it is the one translation unit and includes the headers beside it.
#include "common.h"
#include "dispatch.h"
#include "pool.h"

namespace {

// ---------------------------------------------------------------------------------------------
// Writes y's columns, in order, into `outs` (contiguous, [rows, width] each, widths summing to out):
// one output for a lone linear, one per member for a group (group.py), so no split is needed after.
template <typename T>
void run(const torch::Tensor& x, const torch::Tensor& wt, const c10::optional<torch::Tensor>& bias,
         const torch::Tensor& thresh, const torch::Tensor& scale, const torch::Tensor& counter,
         const std::vector<torch::Tensor>& outs) {
  const int64_t in = wt.size(0), out = wt.size(1), ld = wt.stride(0);
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);  // x [..., in]
  const T* xp = x.data_ptr<T>();
  const T* wp = wt.data_ptr<T>();
  const float* tp = thresh.data_ptr<float>();
  const bool per_channel = thresh.numel() == in;
  const float* sp = scale.numel() ? scale.data_ptr<float>() : nullptr;

  // 1. which channels are kept, per row and in the union over rows
  std::vector<int64_t> active;
  active.reserve(in);
  std::vector<float> xt(rows * in);
  int64_t kept = 0;
  for (int64_t i = 0; i < in; ++i) {
    const float t = per_channel ? tp[i] : tp[0];
    const float s = sp ? sp[i] : 1.0f;
    bool any = false;
    for (int64_t r = 0; r < rows; ++r) {
      const float v = load(xp, r * in + i);
      const bool k = std::abs(v) * s > t;
      xt[r * in + i] = k ? v : 0.0f;
      any |= k;
      kept += k;
    }
    if (any) active.push_back(i);
  }
  const int64_t na = static_cast<int64_t>(active.size());
  std::vector<float> xs(rows * na);  // [rows, n_active], zero where that row does not keep the channel
  std::vector<const T*> wrows(na);
  for (int64_t j = 0; j < na; ++j) {
    wrows[j] = wp + active[j] * ld;
    for (int64_t r = 0; r < rows; ++r) xs[r * na + j] = xt[r * in + active[j]];
  }
  if (counter.defined() && counter.numel() == 2) {
    int64_t* c = counter.data_ptr<int64_t>();
    c[0] += kept;
    c[1] += rows * in;
  }

  // 2. y = xs @ wt[active]. The kept rows are cut into one contiguous range per thread (a
  //    multiple of the 8-row group; a second thread only once there are more kept rows than
  //    about 128 KiB of weights), and each range is streamed whole (what the prefetcher likes)
  //    into its own [rows x out] partial sum; the partial sums are added in range order. So a
  //    call gives the same bits every time for the same input, thread count and instruction set,
  //    whichever thread takes which range: when threads claimed 128 KiB chunks as they came free,
  //    100-200 calls of one input gave 70-138 different results, and the fixed ranges measured
  //    the same speed. A range no helper has started is run by the caller (see Pool).
  const int64_t row_bytes = out * static_cast<int64_t>(sizeof(T));
  const int64_t min_rows = std::max<int64_t>(8, ((131072 / std::max<int64_t>(1, row_bytes)) + 7) / 8 * 8);
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (na + min_rows - 1) / min_rows));
  const int64_t per = std::max<int64_t>(8, ((na + want - 1) / want + 7) / 8 * 8);
  const int nthreads = static_cast<int>(std::max<int64_t>(1, (na + per - 1) / per));  // rounding may leave one idle
  std::vector<float> partial(static_cast<size_t>(nthreads) * rows * out, 0.0f);
  const BlockFn<T> fn = block_fn<T>();
  pool().run(nthreads - 1, nthreads, [&](int, int64_t range) {
    const int64_t k0 = range * per, k1 = std::min(na, k0 + per);
    if (k0 < k1) fn(partial.data() + range * rows * out, wrows.data() + k0, xs.data() + k0, na, rows, k1 - k0, out);
  });
  torch::Tensor bias_f;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    bias_f = bias->to(torch::kFloat32).contiguous();
    bp = bias_f.data_ptr<float>();
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* p0 = partial.data() + r * out;
    for (int t = 1; t < nthreads; ++t) {
      const float* pt = partial.data() + (t * rows + r) * out;
      for (int64_t o = 0; o < out; ++o) p0[o] += pt[o];
    }
    int64_t a = 0;
    for (const auto& y : outs) {
      const int64_t w = y.size(-1);
      T* yp = y.data_ptr<T>() + r * w;
      for (int64_t o = 0; o < w; ++o) yp[o] = static_cast<T>(bp ? p0[a + o] + bp[a + o] : p0[a + o]);
      a += w;
    }
  }
}

template <typename T>
torch::Tensor run_rows(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& idx) {
  const int64_t rows = x.size(0), in = x.size(1), out = w.size(0), n = idx.size(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<float> xf(rows * in);
  for (int64_t i = 0; i < rows * in; ++i) xf[i] = load(xp, i);
  auto y = torch::zeros({rows, out}, x.options());
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, n, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const T* wr = wp + ip[j] * in;
      for (int64_t r = 0; r < rows; ++r) yp[r * out + ip[j]] = static_cast<T>(dot<T>(xf.data() + r * in, wr, in));
    }
  });
  return y;
}

}  // namespace

namespace {
template <typename T>
torch::Tensor run_masked(const torch::Tensor& x, const torch::Tensor& thresh, const torch::Tensor& scale,
                         const torch::Tensor& counter) {
  const int64_t rows = x.size(0), in = x.size(1);
  const T* xp = x.data_ptr<T>();
  const float* tp = thresh.data_ptr<float>();
  const bool per_channel = thresh.numel() == in;
  const float* sp = scale.numel() ? scale.data_ptr<float>() : nullptr;
  auto out = torch::empty_like(x);
  T* op = out.data_ptr<T>();
  std::atomic<int64_t> kept{0};
  const int isa = g_isa;
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, in)), [&](int64_t r0, int64_t r1) {
    int64_t k = 0;
    for (int64_t r = r0; r < r1; ++r) {
#ifdef ACTSCOPE_X86
      if (isa == AVX512) {
        k += avx512::mask_row(xp + r * in, op + r * in, in, tp, per_channel, sp);
        continue;
      }
      if (isa == AVX2) {
        k += avx2::mask_row(xp + r * in, op + r * in, in, tp, per_channel, sp);
        continue;
      }
#endif
      k += mask_scalar(xp + r * in, op + r * in, 0, in, tp, per_channel, sp);
    }
    kept.fetch_add(k);
  });
  if (counter.defined() && counter.numel() == 2) {
    int64_t* c = counter.data_ptr<int64_t>();
    c[0] += kept.load();
    c[1] += rows * in;
  }
  return out;
}
}  // namespace

// x with the inputs the keep rule drops set to 0 (x [rows, in]; counter += [kept, all]): the input
// of the masked dense product that prompts and evaluation take, in one pass over x where torch
// ops take four (absolute value, compare, count, multiply). Vectorised on AVX-512 and AVX2.
torch::Tensor masked_input(torch::Tensor x, torch::Tensor thresh, torch::Tensor scale, torch::Tensor counter) {
  TORCH_CHECK(x.dim() == 2 && !x.is_cuda(), "masked_input: x [rows, in] on CPU");
  TORCH_CHECK(thresh.scalar_type() == torch::kFloat32 && (thresh.numel() == 1 || thresh.numel() == x.size(1)),
              "masked_input: thresh must be float32, one value or one per input");
  TORCH_CHECK(!scale.numel() || (scale.scalar_type() == torch::kFloat32 && scale.numel() == x.size(1)),
              "masked_input: scale must be float32, one per input");
  x = x.contiguous();
  thresh = thresh.contiguous();
  scale = scale.contiguous();
  if (x.scalar_type() == torch::kFloat32) return run_masked<float>(x, thresh, scale, counter);
  if (x.scalar_type() == torch::kBFloat16) return run_masked<at::BFloat16>(x, thresh, scale, counter);
  TORCH_CHECK(false, "masked_input: float32 or bfloat16 only, got ", x.scalar_type());
}

// y[:, idx] = x @ w[idx].T and zero elsewhere: only the listed output rows of w [out, in] are read
// (contiguous in PyTorch's layout). Used for the up projection once the gate's kept neurons are known.
torch::Tensor rows_linear(torch::Tensor x, torch::Tensor w, torch::Tensor idx) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "rows_linear: x [rows, in], w [out, in]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rows_linear: x and w need one dtype");
  TORCH_CHECK(idx.scalar_type() == torch::kInt64, "rows_linear: idx must be int64");
  x = x.contiguous();
  w = w.contiguous();
  idx = idx.contiguous();
  if (x.scalar_type() == torch::kFloat32) return run_rows<float>(x, w, idx);
  if (x.scalar_type() == torch::kBFloat16) return run_rows<at::BFloat16>(x, w, idx);
  TORCH_CHECK(false, "rows_linear: float32 or bfloat16 only, got ", x.scalar_type());
}

// y = (x * keep) @ wt + bias for x [..., in] and wt [in, out] (rows may be a column slice of a
// wider block), written as one output [..., size] per entry of `sizes` (empty: one output
// [..., out]). A group's members get their own contiguous outputs straight from the kernel: in
// Python, reshaping and splitting one output cost more than the kernel's own overhead on a small
// model. A `values` tensor of x's size and dtype receives a copy of x (the group's record of the
// input it answered, for inference tensors, which have no version counter); empty: no copy.
std::vector<torch::Tensor> sparse_linear_split(torch::Tensor x, torch::Tensor wt, c10::optional<torch::Tensor> bias,
                                               torch::Tensor thresh, torch::Tensor scale, torch::Tensor counter,
                                               std::vector<int64_t> sizes, torch::Tensor values) {
  TORCH_CHECK(x.dim() >= 1 && wt.dim() == 2 && x.size(-1) == wt.size(0),
              "sparse_linear: x [..., in], wt [in, out]; got x ", x.sizes(), " and wt ", wt.sizes());
  TORCH_CHECK(x.scalar_type() == wt.scalar_type(), "sparse_linear: x and wt need one dtype");
  const int64_t in = wt.size(0), out = wt.size(1);
  TORCH_CHECK(thresh.scalar_type() == torch::kFloat32 && (thresh.numel() == 1 || thresh.numel() == in),
              "sparse_linear: thresh must be float32, one value or one per input; got ", thresh.numel(), " values for ",
              in, " inputs");
  TORCH_CHECK(!scale.numel() || (scale.scalar_type() == torch::kFloat32 && scale.numel() == in),
              "sparse_linear: scale must be empty or float32, one per input");
  TORCH_CHECK(!bias.has_value() || !bias->defined() || bias->numel() == out,
              "sparse_linear: bias must have one value per output (", out, "), got ", bias->numel());
  TORCH_CHECK(!counter.defined() || !counter.numel() ||
                  (counter.numel() == 2 && counter.scalar_type() == torch::kInt64 && counter.is_contiguous()),
              "sparse_linear: counter must be empty or a contiguous int64 tensor of 2");
  TORCH_CHECK(x.device().is_cpu() && wt.device().is_cpu() && thresh.device().is_cpu() && scale.device().is_cpu() &&
                  (!counter.defined() || counter.device().is_cpu()) &&
                  (!bias.has_value() || !bias->defined() || bias->device().is_cpu()),
              "sparse_linear: CPU tensors only (the Triton kernel serves CUDA)");
  thresh = thresh.contiguous();
  scale = scale.contiguous();
  x = x.contiguous();
  if (wt.stride(1) != 1 || wt.stride(0) < wt.size(1)) wt = wt.contiguous();
  if (sizes.empty()) sizes.push_back(wt.size(1));
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  TORCH_CHECK(total == wt.size(1), "sparse_linear: output sizes sum to ", total, ", not wt's ", wt.size(1), " columns");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  std::vector<torch::Tensor> outs;
  outs.reserve(sizes.size());
  for (int64_t s : sizes) {
    shape.back() = s;
    outs.push_back(torch::empty(shape, x.options()));
  }
  if (values.defined() && values.numel()) {
    TORCH_CHECK(values.numel() == x.numel() && values.scalar_type() == x.scalar_type() && values.is_contiguous() &&
                    values.device().is_cpu(),
                "sparse_linear: values must be a contiguous CPU tensor of x's size and dtype");
    std::memcpy(values.data_ptr(), x.data_ptr(), x.nbytes());
  }
  if (x.scalar_type() == torch::kFloat32) {
    run<float>(x, wt, bias, thresh, scale, counter, outs);
  } else if (x.scalar_type() == torch::kBFloat16) {
    run<at::BFloat16>(x, wt, bias, thresh, scale, counter, outs);
  } else {
    TORCH_CHECK(false, "sparse_linear: float32 or bfloat16 only, got ", x.scalar_type());
  }
  return outs;
}

torch::Tensor sparse_linear(torch::Tensor x, torch::Tensor wt, c10::optional<torch::Tensor> bias,
                            torch::Tensor thresh, torch::Tensor scale, torch::Tensor counter) {
  return sparse_linear_split(x, wt, bias, thresh, scale, counter, {}, torch::Tensor())[0];
}

// Whether two CPU tensors hold the same values in memory order: the group's check that an
// inference tensor was not edited in place between its members' calls, without torch's dispatch.
// `b` is the contiguous copy sparse_linear_split made; a non-contiguous `a` is compared as the
// contiguous copy it would give (one copy, rather than a false "changed" and a second kernel call).
bool same_bytes(const torch::Tensor& a, const torch::Tensor& b) {
  if (!a.device().is_cpu() || !b.device().is_cpu() || !b.is_contiguous() || a.numel() != b.numel() ||
      a.scalar_type() != b.scalar_type())
    return false;
  const torch::Tensor c = a.contiguous();
  return std::memcmp(c.data_ptr(), b.data_ptr(), c.nbytes()) == 0;
}

// The CPU implementation of the operator `actscope::sparse_linear` (defined in sparsify/ops.py,
// which torch.compile keeps inside a compiled decoding step): registered from here, so each call
// goes from the compiled graph straight to the kernel, with no Python in between.
// Other dtypes (float16, float64) get the masked dense computation, as kernel.reference does.
at::Tensor sparse_linear_op(const at::Tensor& x, const at::Tensor& wt, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& thresh, const at::Tensor& scale, at::Tensor& counter) {
  if (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16)
    return sparse_linear(x, wt, bias, thresh, scale, counter);
  auto a = x.abs().to(torch::kFloat32);
  if (scale.numel()) a = a * scale;
  const auto keep = a > thresh;
  if (counter.defined() && counter.numel() == 2) {
    counter[0] += keep.sum();
    counter[1] += keep.numel();
  }
  auto y = at::matmul((x * keep).to(torch::kFloat32), wt.to(torch::kFloat32));
  if (bias.has_value() && bias->defined()) y = y + bias->to(torch::kFloat32);
  return y.to(x.scalar_type());
}

void register_op() {
  static torch::Library* lib = nullptr;  // lives as long as the process, like the Python library object
  if (lib != nullptr) return;
  lib = new torch::Library(torch::Library::IMPL, "actscope", c10::DispatchKey::CPU, __FILE__, __LINE__);
  lib->impl("sparse_linear", TORCH_FN(sparse_linear_op));
}

// The instruction set the kernels use now, the ones this CPU can run, and a way to force one.
std::string isa() { return ISA_NAMES[g_isa]; }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int i = 0; i < 3; ++i)
    if (cpu_supports(i)) out.push_back(ISA_NAMES[i]);
  return out;
}

void set_isa(const std::string& name) {
  const int want = name.empty() ? best_isa() : parse_isa(name);
  TORCH_CHECK(cpu_supports(want), "sparse_linear: this CPU cannot run the ", name, " path");
  g_isa = want;
}

void set_prefetch_groups(int64_t groups) { g_prefetch_groups = static_cast<int>(std::max<int64_t>(1, groups)); }

// A plain streaming read of `t`'s bytes (as float32 words) by the same threads, pool and
// instruction set as the kernel: the bandwidth the kernel is measured against
// (bench/sparse_kernel.py). Chunks of 128 KiB, contiguous.
double stream_read(torch::Tensor t) {
  TORCH_CHECK(t.is_contiguous() && !t.is_cuda() && t.nbytes() % 4 == 0, "stream_read: a contiguous CPU tensor");
  const float* p = reinterpret_cast<const float*>(t.data_ptr());
  const int64_t n = static_cast<int64_t>(t.nbytes() / 4);
  constexpr int64_t CHUNK = 32768;  // floats
  const int64_t nchunks = (n + CHUNK - 1) / CHUNK;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nchunks)));
  std::vector<double> sums(nthreads, 0.0);
  pool().run(nthreads - 1, nchunks, [&](int slot, int64_t c) {
    const int64_t a = c * CHUNK, b = std::min(n, a + CHUNK);
#ifdef ACTSCOPE_X86
    if (g_isa == AVX512) { sums[slot] += avx512::stream(p + a, b - a); return; }
    if (g_isa == AVX2) { sums[slot] += avx2::stream(p + a, b - a); return; }
#endif
    sums[slot] += stream_scalar(p + a, b - a);
  });
  double s = 0;
  for (double v : sums) s += v;
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const char* env = std::getenv("ACTSCOPE_KERNEL_ISA");
  g_isa = best_isa();
  if (env && *env) set_isa(env);  // an unknown or unsupported name fails the import, loudly
  m.def("sparse_linear", &sparse_linear, "y = (x * keep) @ wt + bias, reading only kept rows of wt (rows may be strided)");
  m.def("sparse_linear_split", &sparse_linear_split, "sparse_linear with y's columns split into one output per size");
  m.def("same_bytes", &same_bytes, "whether two contiguous CPU tensors hold the same bytes");
  m.def("register_op", &register_op, "register the kernel as actscope::sparse_linear's CPU implementation");
  m.def("rows_linear", &rows_linear, "y[:, idx] = x @ w[idx].T, zero elsewhere");
  m.def("masked_input", &masked_input, "x with the inputs the keep rule drops set to 0, counted");
  m.def("isa", &isa, "the instruction set the kernels use: scalar, avx2 or avx512");
  m.def("supported_isas", &supported_isas, "the instruction sets this CPU can run");
  m.def("set_isa", &set_isa, "force an instruction set ('' = the best this CPU has)");
  m.def("set_prefetch_groups", &set_prefetch_groups, "groups of 8 kept rows prefetched ahead (tuning)");
  m.def("stream_read", &stream_read, "sum of a tensor's bytes read as float32: a plain streaming read");
}

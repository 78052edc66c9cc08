// The scan's per-batch statistics in single passes over the activations (stats/fast.py):
// `mlp_pass` for the MLP statistics (stats/mlp.py), `layer_use` and `above` for the residual
// stream's (stats/residual.py).
//
// mlp_pass:
// The torch version makes about ten passes over the same [tokens, d_ff] block (absolute value,
// compare, per-neuron count, chunk union, bit packing, the top-k's maximum and gather, and the
// profiled sequences' tau counts and deltas), each with its own temporary; on the default model
// that cost 40% of a forward pass. Here each value is read once and every count is exact
// integer arithmetic, so the results are the torch version's, bit for bit (tested):
//
//   active[t, d]      = |a[t, d]| > tau                                  (a NaN is not active)
//   neuron_active[d] += sum_t active[t, d]
//   hash[t]           = sum_w word(t, w) * salt[w]   (mod 2^64; word w holds columns 64w..64w+63,
//                                                      bit j = column 64w + j, as numpy packbits(little))
//   chunks           += sum over full chunks of `chunk` tokens of |union of their active sets|
//   for the profiled sequences: at_tau[j] += #{|a| > taus[j]}, delta_small += #{|a_t - a_{t-1}| <= tau}
//   top-k per neuron: a value above the neuron's k-th largest (strictly) is inserted in order,
//                     with its global token index (a NaN is never inserted); among equal values
//                     the earlier token stays first, where torch.topk leaves the order open, so
//                     the indices of tied values may differ from the torch path's
//
// Columns are cut into ranges of 64-column words, one range per thread; each word's counts and
// hash terms are kept apart and summed in word order afterwards, so any thread count gives the
// same integers. Nothing is compiled with -march: GCC vectorises the plain loops for the build's
// baseline, and on x86-64 `target_clones` adds AVX2 and AVX-512 versions picked at load from cpuid.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Args {
  const float* a;
  int64_t n, d, words, seq_len, chunk, k, offset;
  float tau;
  const float* taus;
  int64_t n_taus;
  const uint8_t* profiled;  // [n / seq_len]: 1 where the sequence's tau counts and deltas are taken
  const uint64_t* salt;
  int64_t* neuron_active;
  float* top_v;    // [k, d], each column sorted from the largest
  int64_t* top_i;  // [k, d]
  uint64_t* hash_terms;  // [n, words]
  int64_t* per_word;     // [words, 2 + n_taus]: chunks, delta_small, at_tau...
};

void insert(const Args& g, int64_t col, float v, int64_t token) {
  int64_t p = g.k - 1;
  while (p > 0 && v > g.top_v[(p - 1) * g.d + col]) {
    g.top_v[p * g.d + col] = g.top_v[(p - 1) * g.d + col];
    g.top_i[p * g.d + col] = g.top_i[(p - 1) * g.d + col];
    --p;
  }
  g.top_v[p * g.d + col] = v;
  g.top_i[p * g.d + col] = token;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define ACTSCOPE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ACTSCOPE_CLONES
#endif

ACTSCOPE_CLONES
void word_range(const Args& g, int64_t w0, int64_t w1) {
  const int64_t stride = 2 + g.n_taus;
  std::vector<uint64_t> uni(w1 - w0, 0);
  for (int64_t t = 0; t < g.n; ++t) {
    const int64_t pos = t % g.seq_len;
    const bool profiled = g.profiled[t / g.seq_len] != 0;
    const bool chunk_start = pos % g.chunk == 0;
    const bool chunk_end = (pos % g.chunk == g.chunk - 1) && (pos < (g.seq_len / g.chunk) * g.chunk);
    const float* row = g.a + t * g.d;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t c0 = w * 64, width = std::min<int64_t>(64, g.d - c0);
      const float* x = row + c0;
      const float* thr = g.top_v + (g.k - 1) * g.d + c0;
      int64_t* cnt = g.neuron_active + c0;
      uint64_t bits = 0;
      int above = 0;
      for (int64_t j = 0; j < width; ++j) {
        const bool act = std::fabs(x[j]) > g.tau;
        bits |= static_cast<uint64_t>(act) << j;
        cnt[j] += act;
        above |= x[j] > thr[j];
      }
      if (above)
        for (int64_t j = 0; j < width; ++j)
          if (x[j] > thr[j]) insert(g, c0 + j, x[j], g.offset + t);
      g.hash_terms[t * g.words + w] = bits * g.salt[w];
      int64_t* out = g.per_word + w * stride;
      uint64_t& u = uni[w - w0];
      if (chunk_start) u = 0;
      u |= bits;
      if (chunk_end) out[0] += __builtin_popcountll(u);
      if (profiled) {
        for (int64_t q = 0; q < g.n_taus; ++q) {
          int64_t c = 0;
          for (int64_t j = 0; j < width; ++j) c += std::fabs(x[j]) > g.taus[q];
          out[2 + q] += c;
        }
        if (pos > 0) {
          const float* prev = x - g.d;
          int64_t c = 0;
          for (int64_t j = 0; j < width; ++j) c += std::fabs(x[j] - prev[j]) <= g.tau;
          out[1] += c;
        }
      }
    }
  }
}

}  // namespace

// a [n, d] float32 (n a multiple of seq_len, sequences in order); neuron_active int64 [d], top_v
// float32 [k, d] and top_i int64 [k, d] updated in place. Returns (hashes int64 [n], counts int64
// [2 + len(taus)]: active chunk cells, small deltas, then active cells per tau).
std::vector<torch::Tensor> mlp_pass(torch::Tensor a, double tau, int64_t seq_len, int64_t chunk, torch::Tensor taus,
                                    torch::Tensor profiled, torch::Tensor salt, torch::Tensor neuron_active,
                                    torch::Tensor top_v, torch::Tensor top_i, int64_t offset) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == torch::kFloat32 && a.device().is_cpu(), "mlp_pass: a [n, d] float32 on CPU");
  const int64_t n = a.size(0), d = a.size(1), words = (d + 63) / 64;
  TORCH_CHECK(seq_len > 0 && chunk > 0 && n % seq_len == 0, "mlp_pass: n must be a multiple of seq_len");
  TORCH_CHECK(profiled.scalar_type() == torch::kUInt8 && profiled.numel() == n / seq_len && profiled.is_contiguous(),
              "mlp_pass: profiled is uint8, one per sequence");
  TORCH_CHECK(salt.scalar_type() == torch::kInt64 && salt.numel() >= words && salt.is_contiguous(), "mlp_pass: salt int64 [words]");
  TORCH_CHECK(neuron_active.scalar_type() == torch::kInt64 && neuron_active.numel() == d && neuron_active.is_contiguous(),
              "mlp_pass: neuron_active int64 [d]");
  TORCH_CHECK(top_v.dim() == 2 && top_v.size(1) == d && top_v.size(0) >= 1 && top_v.scalar_type() == torch::kFloat32 &&
                  top_v.is_contiguous() && top_i.sizes() == top_v.sizes() && top_i.scalar_type() == torch::kInt64 &&
                  top_i.is_contiguous(),
              "mlp_pass: top_v float32 [k, d] and top_i int64 [k, d], contiguous");
  TORCH_CHECK(taus.scalar_type() == torch::kFloat32 && taus.is_contiguous(), "mlp_pass: taus float32");
  a = a.contiguous();
  auto hash_terms = torch::empty({n, words}, torch::kInt64);
  auto per_word = torch::zeros({words, 2 + taus.numel()}, torch::kInt64);
  Args g{a.data_ptr<float>(), n, d, words, seq_len, chunk, top_v.size(0), offset, static_cast<float>(tau),
         taus.data_ptr<float>(), taus.numel(), profiled.data_ptr<uint8_t>(),
         reinterpret_cast<const uint64_t*>(salt.data_ptr<int64_t>()), neuron_active.data_ptr<int64_t>(),
         top_v.data_ptr<float>(), top_i.data_ptr<int64_t>(), reinterpret_cast<uint64_t*>(hash_terms.data_ptr<int64_t>()),
         per_word.data_ptr<int64_t>()};
  at::parallel_for(0, words, 1, [&](int64_t w0, int64_t w1) { word_range(g, w0, w1); });
  return {hash_terms.sum(1), per_word.sum(0)};  // int64 sums wrap like the uint64 ones
}

// Sums over the rows of h_in and h_out [n, d] (attn and mlp [n, d] when not empty), in double:
//   ||h_out - h_in|| / max(||h_in||, 1e-12),   cos(attn, h_in),   cos(mlp, mid)
// with mid = h_in for a parallel block (or no attn), else h_in + attn, and
// cos(x, y) = x.y / (max(||x||, 1e-8) max(||y||, 1e-8)), torch's cosine_similarity. One read of
// each tensor where torch's ops make about a dozen passes and temporaries. Each row's terms are
// summed in row order, so the result does not depend on the thread count.
torch::Tensor layer_use(torch::Tensor h_in, torch::Tensor h_out, torch::Tensor attn, torch::Tensor mlp, bool parallel) {
  const auto ok = [&](const torch::Tensor& t) {
    return t.dim() == 2 && t.sizes() == h_in.sizes() && t.scalar_type() == torch::kFloat32 && t.device().is_cpu();
  };
  TORCH_CHECK(ok(h_in) && ok(h_out) && (!attn.numel() || ok(attn)) && (!mlp.numel() || ok(mlp)),
              "layer_use: float32 CPU tensors [n, d] of one shape");
  h_in = h_in.contiguous();
  h_out = h_out.contiguous();
  attn = attn.contiguous();
  mlp = mlp.contiguous();
  const int64_t n = h_in.size(0), d = h_in.size(1);
  const float *pi = h_in.data_ptr<float>(), *po = h_out.data_ptr<float>();
  const float* pa = attn.numel() ? attn.data_ptr<float>() : nullptr;
  const float* pm = mlp.numel() ? mlp.data_ptr<float>() : nullptr;
  std::vector<double> rows(n * 3, 0.0);
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *x = pi + r * d, *y = po + r * d;
      double xx = 0, dd = 0, aa = 0, ax = 0, mm = 0, mz = 0, zz = 0;
      for (int64_t j = 0; j < d; ++j) {
        const double xi = x[j], di = static_cast<double>(y[j]) - xi;
        xx += xi * xi;
        dd += di * di;
        double z = xi;
        if (pa) {
          const double a = pa[r * d + j];
          aa += a * a;
          ax += a * xi;
          if (!parallel) z += a;
        }
        if (pm) {
          const double m = pm[r * d + j];
          mm += m * m;
          mz += m * z;
          zz += z * z;
        }
      }
      const double nx = std::sqrt(xx);
      rows[r * 3] = std::sqrt(dd) / std::max(nx, 1e-12);
      if (pa) rows[r * 3 + 1] = ax / (std::max(std::sqrt(aa), 1e-8) * std::max(nx, 1e-8));
      if (pm) rows[r * 3 + 2] = mz / (std::max(std::sqrt(mm), 1e-8) * std::max(std::sqrt(zz), 1e-8));
    }
  });
  auto out = torch::zeros({3}, torch::kFloat64);
  double* o = out.data_ptr<double>();
  for (int64_t r = 0; r < n; ++r)
    for (int q = 0; q < 3; ++q) o[q] += rows[r * 3 + q];
  return out;
}

// The flat indices, in order, of the entries of h with |h| > bound (compared in float32, as
// torch compares a float32 tensor with a Python float): the massive-activation candidates.
torch::Tensor above(torch::Tensor h, double bound) {
  TORCH_CHECK(h.scalar_type() == torch::kFloat32 && h.device().is_cpu(), "above: a float32 CPU tensor");
  h = h.contiguous();
  const float* p = h.data_ptr<float>();
  const float b = static_cast<float>(bound);
  std::vector<int64_t> hits;
  for (int64_t i = 0, n = h.numel(); i < n; ++i)
    if (std::fabs(p[i]) > b) hits.push_back(i);
  return torch::tensor(hits, torch::kInt64);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mlp_pass", &mlp_pass, "the scan's per-layer MLP statistics in one pass (stats/mlp.py)");
  m.def("layer_use", &layer_use, "sums of relative update and cosines over rows (stats/residual.py)");
  m.def("above", &above, "flat indices of |h| > bound (stats/residual.py)");
}

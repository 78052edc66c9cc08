// What every path of the sparse kernel shares: the includes, bfloat16 loads, the keep rule's plain
// loop, the block kernel's signature and the portable loops. Included by sparse_linear.cpp only
// (one translation unit), hence the unnamed namespace.
#pragma once
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ACTSCOPE_X86 1
#endif

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const at::BFloat16* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The keep rule on inputs [i, n) of one row: y = x where |x| * scale > thresh, else 0 (a NaN is
// dropped); returns how many were kept. The plain loop of masked_input, and its vector paths' tail.
template <typename T>
int64_t mask_scalar(const T* x, T* y, int64_t i, int64_t n, const float* t, bool per_channel, const float* s) {
  int64_t kept = 0;
  for (; i < n; ++i) {
    const bool keep = std::abs(load(x, i)) * (s ? s[i] : 1.0f) > (per_channel ? t[i] : t[0]);
    y[i] = keep ? x[i] : T(0.0f);
    kept += keep;
  }
  return kept;
}

// Rows of the weight prefetched ahead, in groups of kept rows. The rows are scattered (only kept
// channels), so the hardware prefetcher only catches up a few lines into each one; asking for
// the next group's lines while this group is summed keeps enough misses in flight.
int g_prefetch_groups = 1;

// ---------------------------------------------------------------------------------------------
// The block kernel, one signature for every instruction set:
//   acc[b, 0:n] += sum_j xs[b * ldx + j] * rows[j][0:n]    for b < nb, j < nrows
// Each weight row is read once; the nb accumulator rows (<= 16 x n floats) stay in L1/L2.
template <typename W>
using BlockFn = void (*)(float*, const W* const*, const float*, int64_t, int64_t, int64_t, int64_t);

template <typename W>
void block_scalar(float* acc, const W* const* rows, const float* xs, int64_t ldx, int64_t nb, int64_t nrows,
                  int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= nrows; j += 4) {
    const W *r0 = rows[j], *r1 = rows[j + 1], *r2 = rows[j + 2], *r3 = rows[j + 3];
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = xs + b * ldx + j;
      float* a = acc + b * n;
      for (int64_t o = 0; o < n; ++o)
        a[o] += x[0] * load(r0, o) + x[1] * load(r1, o) + x[2] * load(r2, o) + x[3] * load(r3, o);
    }
  }
  for (; j < nrows; ++j)
    for (int64_t b = 0; b < nb; ++b) {
      const float x = xs[b * ldx + j];
      float* a = acc + b * n;
      for (int64_t o = 0; o < n; ++o) a[o] += x * load(rows[j], o);
    }
}

float dot_scalar(const float* x, const float* w, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += x[i] * w[i];
  return s;
}
float dot_scalar(const float* x, const at::BFloat16* w, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += x[i] * load(w, i);
  return s;
}

double stream_scalar(const float* p, int64_t n) {
  float s[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int q = 0; q < 8; ++q) s[q] += p[i + q];
  for (; i < n; ++i) s[0] += p[i];
  double t = 0;
  for (float v : s) t += v;
  return t;
}

}  // namespace

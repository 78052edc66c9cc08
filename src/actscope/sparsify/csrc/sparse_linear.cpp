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
// three times -- portable C++, AVX2+FMA, AVX-512 (F/BW/VL) -- the vector ones compiled for their
// instruction set with `#pragma GCC target`, and one is picked at run time from cpuid
// (`__builtin_cpu_supports`). ACTSCOPE_KERNEL_ISA=scalar|avx2|avx512 (read at load) or
// `set_isa(name)` forces a path; forcing one the CPU lacks is an error, not a crash.
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

#ifdef ACTSCOPE_X86
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: 8 outputs per vector, 8 weight rows per pass over the accumulators.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
inline __m256 ld(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 ld(const at::BFloat16* p) {  // widen 8 bfloat16: zero-extend, shift into the high half
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <typename W, int R>
inline void group(float* acc, const W* const* rows, const float* xs, int64_t ldx, int64_t nb, int64_t n,
                  const W* const* next) {
  constexpr int64_t LINE = 64 / sizeof(W);  // elements per cache line: one prefetch each
  int64_t o = 0;
  if (nb == 1) {
    __m256 xv[R];
    for (int q = 0; q < R; ++q) xv[q] = _mm256_set1_ps(xs[q]);
    for (; o + 8 <= n; o += 8) {
      if (next && (o % LINE) == 0)
        for (int q = 0; q < R; ++q) _mm_prefetch(reinterpret_cast<const char*>(next[q] + o), _MM_HINT_T0);
      __m256 a = _mm256_loadu_ps(acc + o);
      for (int q = 0; q < R; ++q) a = _mm256_fmadd_ps(xv[q], ld(rows[q] + o), a);
      _mm256_storeu_ps(acc + o, a);
    }
  } else {
    for (; o + 8 <= n; o += 8) {
      if (next && (o % LINE) == 0)
        for (int q = 0; q < R; ++q) _mm_prefetch(reinterpret_cast<const char*>(next[q] + o), _MM_HINT_T0);
      __m256 w[R];
      for (int q = 0; q < R; ++q) w[q] = ld(rows[q] + o);
      for (int64_t b = 0; b < nb; ++b) {
        const float* x = xs + b * ldx;
        __m256 a = _mm256_loadu_ps(acc + b * n + o);
        for (int q = 0; q < R; ++q) a = _mm256_fmadd_ps(_mm256_set1_ps(x[q]), w[q], a);
        _mm256_storeu_ps(acc + b * n + o, a);
      }
    }
  }
  for (; o < n; ++o)  // tail: fewer than 8 outputs
    for (int64_t b = 0; b < nb; ++b)
      for (int q = 0; q < R; ++q) acc[b * n + o] += xs[b * ldx + q] * load(rows[q], o);
}

// One input row of float32 weights: four accumulators per pass, so four FMA chains are in
// flight instead of one, and no software prefetch: on float32 rows the hardware prefetcher
// keeps up, and prefetch instructions only took load slots. A step's linears alone ran 8%
// faster on the 1B shape and 4% on the default model (docs/benchmarks.md); bfloat16 rows,
// which are widened on the way in, keep `group` and its prefetch, which measured better there.
template <int R>
inline void group_row(float* acc, const float* const* rows, const float* xs, int64_t n) {
  __m256 xv[R];
  for (int q = 0; q < R; ++q) xv[q] = _mm256_set1_ps(xs[q]);
  int64_t o = 0;
  for (; o + 32 <= n; o += 32) {
    __m256 a0 = _mm256_loadu_ps(acc + o), a1 = _mm256_loadu_ps(acc + o + 8);
    __m256 a2 = _mm256_loadu_ps(acc + o + 16), a3 = _mm256_loadu_ps(acc + o + 24);
    for (int q = 0; q < R; ++q) {
      a0 = _mm256_fmadd_ps(xv[q], _mm256_loadu_ps(rows[q] + o), a0);
      a1 = _mm256_fmadd_ps(xv[q], _mm256_loadu_ps(rows[q] + o + 8), a1);
      a2 = _mm256_fmadd_ps(xv[q], _mm256_loadu_ps(rows[q] + o + 16), a2);
      a3 = _mm256_fmadd_ps(xv[q], _mm256_loadu_ps(rows[q] + o + 24), a3);
    }
    _mm256_storeu_ps(acc + o, a0);
    _mm256_storeu_ps(acc + o + 8, a1);
    _mm256_storeu_ps(acc + o + 16, a2);
    _mm256_storeu_ps(acc + o + 24, a3);
  }
  for (; o + 8 <= n; o += 8) {
    __m256 a = _mm256_loadu_ps(acc + o);
    for (int q = 0; q < R; ++q) a = _mm256_fmadd_ps(xv[q], _mm256_loadu_ps(rows[q] + o), a);
    _mm256_storeu_ps(acc + o, a);
  }
  for (; o < n; ++o)
    for (int q = 0; q < R; ++q) acc[o] += xs[q] * rows[q][o];
}

template <typename W>
void block(float* acc, const W* const* rows, const float* xs, int64_t ldx, int64_t nb, int64_t nrows, int64_t n) {
  constexpr int R = 8;
  int64_t j = 0;
  if constexpr (std::is_same<W, float>::value) {
    if (nb == 1) {
      for (; j + R <= nrows; j += R) group_row<R>(acc, rows + j, xs + j, n);
      for (; j < nrows; ++j) group_row<1>(acc, rows + j, xs + j, n);
      return;
    }
  }
  for (; j + R <= nrows; j += R) {
    const int64_t jn = j + R * g_prefetch_groups;
    group<W, R>(acc, rows + j, xs + j, ldx, nb, n, jn + R <= nrows ? rows + jn : nullptr);
  }
  for (; j < nrows; ++j) group<W, 1>(acc, rows + j, xs + j, ldx, nb, n, nullptr);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename W>
float dot(const float* x, const W* w, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), ld(w + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), ld(w + i + 8), a1);
  }
  float s = hsum(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) s += x[i] * load(w, i);
  return s;
}

double stream(const float* p, int64_t n) {
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int q = 0; q < 4; ++q) a[q] = _mm256_add_ps(a[q], _mm256_loadu_ps(p + i + 8 * q));
  double s = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
  for (; i < n; ++i) s += p[i];
  return s;
}

// One row of the keep rule (see avx512::mask_row): 8 inputs per vector, the tail scalar.
inline __m256 keep8(__m256 v, int64_t i, const float* t, bool per_channel, const float* s) {
  __m256 a = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
  if (s) a = _mm256_mul_ps(a, _mm256_loadu_ps(s + i));
  return _mm256_cmp_ps(a, per_channel ? _mm256_loadu_ps(t + i) : _mm256_set1_ps(t[0]), _CMP_GT_OQ);
}
inline int64_t mask_row(const float* x, float* y, int64_t n, const float* t, bool per_channel, const float* s) {
  int64_t kept = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 k = keep8(v, i, t, per_channel, s);
    _mm256_storeu_ps(y + i, _mm256_and_ps(k, v));
    kept += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(k)));
  }
  return kept + mask_scalar(x, y, i, n, t, per_channel, s);
}
inline int64_t mask_row(const at::BFloat16* x, at::BFloat16* y, int64_t n, const float* t, bool per_channel,
                        const float* s) {
  int64_t kept = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i));
    const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    const __m256 k = keep8(v, i, t, per_channel, s);
    const __m256i k32 = _mm256_castps_si256(k);  // 0 or -1 per input: narrowed to 16-bit lanes
    const __m128i k16 = _mm_packs_epi32(_mm256_castsi256_si128(k32), _mm256_extracti128_si256(k32, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm_and_si128(k16, raw));
    kept += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(k)));
  }
  return kept + mask_scalar(x, y, i, n, t, per_channel, s);
}
}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// AVX-512 (F, BW, VL): 16 outputs per vector, masked loads for the tails.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
namespace avx512 {
inline __m512 ld(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 ldm(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 ldm(const at::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename W, int R>
inline void group(float* acc, const W* const* rows, const float* xs, int64_t ldx, int64_t nb, int64_t n,
                  const W* const* next) {
  constexpr int64_t LINE = 64 / sizeof(W);
  int64_t o = 0;
  if (nb == 1) {
    __m512 xv[R];
    for (int q = 0; q < R; ++q) xv[q] = _mm512_set1_ps(xs[q]);
    for (; o + 16 <= n; o += 16) {
      if (next && (o % LINE) == 0)
        for (int q = 0; q < R; ++q) _mm_prefetch(reinterpret_cast<const char*>(next[q] + o), _MM_HINT_T0);
      __m512 a = _mm512_loadu_ps(acc + o);
      for (int q = 0; q < R; ++q) a = _mm512_fmadd_ps(xv[q], ld(rows[q] + o), a);
      _mm512_storeu_ps(acc + o, a);
    }
    if (o < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - o)) - 1);
      __m512 a = _mm512_maskz_loadu_ps(m, acc + o);
      for (int q = 0; q < R; ++q) a = _mm512_fmadd_ps(xv[q], ldm(rows[q] + o, m), a);
      _mm512_mask_storeu_ps(acc + o, m, a);
    }
    return;
  }
  for (; o < n; o += 16) {
    const __mmask16 m = n - o >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - o)) - 1);
    if (next && (o % LINE) == 0)
      for (int q = 0; q < R; ++q) _mm_prefetch(reinterpret_cast<const char*>(next[q] + o), _MM_HINT_T0);
    __m512 w[R];
    for (int q = 0; q < R; ++q) w[q] = ldm(rows[q] + o, m);
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = xs + b * ldx;
      __m512 a = _mm512_maskz_loadu_ps(m, acc + b * n + o);
      for (int q = 0; q < R; ++q) a = _mm512_fmadd_ps(_mm512_set1_ps(x[q]), w[q], a);
      _mm512_mask_storeu_ps(acc + b * n + o, m, a);
    }
  }
}

// Several input rows (2-16): register tiles of 4 rows x 64 outputs. Each group of R kept weight
// rows is widened to float32 once per 64 outputs into an L1 buffer; then every tile of 4 input
// rows keeps its 16 accumulators in registers over the R weight rows, loading 4 weight vectors
// and 4 broadcasts per 16 FMAs, where one row at a time needed 9 loads per 8. The sums are added
// in the same order as before, so results are unchanged.
template <int BB, int R>
inline void tile(float* acc, int64_t lda, const float* xs, int64_t ldx, const float (*wbuf)[64], int64_t w) {
  __mmask16 m[4];
  for (int v = 0; v < 4; ++v) {
    const int64_t left = w - 16 * v;
    m[v] = left >= 16 ? static_cast<__mmask16>(0xFFFF) : left <= 0 ? static_cast<__mmask16>(0)
                                                                    : static_cast<__mmask16>((1u << left) - 1);
  }
  __m512 a[BB][4];
  for (int b = 0; b < BB; ++b)
    for (int v = 0; v < 4; ++v) a[b][v] = _mm512_maskz_loadu_ps(m[v], acc + b * lda + 16 * v);
  for (int q = 0; q < R; ++q) {
    __m512 wv[4];
    for (int v = 0; v < 4; ++v) wv[v] = _mm512_load_ps(wbuf[q] + 16 * v);
    for (int b = 0; b < BB; ++b) {
      const __m512 x = _mm512_set1_ps(xs[b * ldx + q]);
      for (int v = 0; v < 4; ++v) a[b][v] = _mm512_fmadd_ps(x, wv[v], a[b][v]);
    }
  }
  for (int b = 0; b < BB; ++b)
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(acc + b * lda + 16 * v, m[v], a[b][v]);
}

template <typename W, int R>
inline void group_rows(float* acc, const W* const* rows, const float* xs, int64_t ldx, int64_t nb, int64_t n) {
  alignas(64) float wbuf[R][64];
  for (int64_t o = 0; o < n; o += 64) {
    const int64_t w = std::min<int64_t>(64, n - o);
    for (int q = 0; q < R; ++q)
      for (int v = 0; v < 4; ++v) {
        const int64_t left = w - 16 * v;
        const __mmask16 mv = left >= 16 ? static_cast<__mmask16>(0xFFFF) : left <= 0 ? static_cast<__mmask16>(0)
                                                                                      : static_cast<__mmask16>((1u << left) - 1);
        _mm512_store_ps(wbuf[q] + 16 * v, ldm(rows[q] + o + 16 * v, mv));
      }
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) tile<4, R>(acc + b * n + o, n, xs + b * ldx, ldx, wbuf, w);
    switch (nb - b) {
      case 3: tile<3, R>(acc + b * n + o, n, xs + b * ldx, ldx, wbuf, w); break;
      case 2: tile<2, R>(acc + b * n + o, n, xs + b * ldx, ldx, wbuf, w); break;
      case 1: tile<1, R>(acc + b * n + o, n, xs + b * ldx, ldx, wbuf, w); break;
      default: break;
    }
  }
}

// One input row of float32 weights (see avx2::group_row).
template <int R>
inline void group_row(float* acc, const float* const* rows, const float* xs, int64_t n) {
  __m512 xv[R];
  for (int q = 0; q < R; ++q) xv[q] = _mm512_set1_ps(xs[q]);
  int64_t o = 0;
  for (; o + 64 <= n; o += 64) {
    __m512 a0 = _mm512_loadu_ps(acc + o), a1 = _mm512_loadu_ps(acc + o + 16);
    __m512 a2 = _mm512_loadu_ps(acc + o + 32), a3 = _mm512_loadu_ps(acc + o + 48);
    for (int q = 0; q < R; ++q) {
      a0 = _mm512_fmadd_ps(xv[q], _mm512_loadu_ps(rows[q] + o), a0);
      a1 = _mm512_fmadd_ps(xv[q], _mm512_loadu_ps(rows[q] + o + 16), a1);
      a2 = _mm512_fmadd_ps(xv[q], _mm512_loadu_ps(rows[q] + o + 32), a2);
      a3 = _mm512_fmadd_ps(xv[q], _mm512_loadu_ps(rows[q] + o + 48), a3);
    }
    _mm512_storeu_ps(acc + o, a0);
    _mm512_storeu_ps(acc + o + 16, a1);
    _mm512_storeu_ps(acc + o + 32, a2);
    _mm512_storeu_ps(acc + o + 48, a3);
  }
  for (; o < n; o += 16) {
    const __mmask16 m = n - o >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - o)) - 1);
    __m512 a = _mm512_maskz_loadu_ps(m, acc + o);
    for (int q = 0; q < R; ++q) a = _mm512_fmadd_ps(xv[q], _mm512_maskz_loadu_ps(m, rows[q] + o), a);
    _mm512_mask_storeu_ps(acc + o, m, a);
  }
}

template <typename W>
void block(float* acc, const W* const* rows, const float* xs, int64_t ldx, int64_t nb, int64_t nrows, int64_t n) {
  constexpr int R = 8;
  int64_t j = 0;
  if constexpr (std::is_same<W, float>::value) {
    if (nb == 1) {
      for (; j + R <= nrows; j += R) group_row<R>(acc, rows + j, xs + j, n);
      for (; j < nrows; ++j) group_row<1>(acc, rows + j, xs + j, n);
      return;
    }
  }
  if (nb > 1) {  // 2-16 rows: register tiles (group_rows); measured -4..+5% in float32, 18-27% faster in bfloat16
    for (; j + R <= nrows; j += R) group_rows<W, R>(acc, rows + j, xs + j, ldx, nb, n);
    for (; j < nrows; ++j) group<W, 1>(acc, rows + j, xs + j, ldx, nb, n, nullptr);
    return;
  }
  for (; j + R <= nrows; j += R) {
    const int64_t jn = j + R * g_prefetch_groups;
    group<W, R>(acc, rows + j, xs + j, ldx, nb, n, jn + R <= nrows ? rows + jn : nullptr);
  }
  for (; j < nrows; ++j) group<W, 1>(acc, rows + j, xs + j, ldx, nb, n, nullptr);
}

template <typename W>
float dot(const float* x, const W* w, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), ld(w + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), ld(w + i + 16), a1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), ldm(w + i, m), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

double stream(const float* p, int64_t n) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int q = 0; q < 4; ++q) a[q] = _mm512_add_ps(a[q], _mm512_loadu_ps(p + i + 16 * q));
  double s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
  for (; i < n; ++i) s += p[i];
  return s;
}

// One row of the keep rule: y = x where |x| * scale > thresh, else 0; returns how many were kept.
// (mask_input: the input of the masked dense product that prompts take.) NaN is dropped.
inline __m512 abs16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_and_epi32(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)));
}
inline __mmask16 keep16(__m512 v, int64_t i, __mmask16 m, const float* t, bool per_channel, const float* s) {
  __m512 a = abs16(v);
  if (s) a = _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, s + i));
  const __m512 th = per_channel ? _mm512_maskz_loadu_ps(m, t + i) : _mm512_set1_ps(t[0]);
  return _mm512_mask_cmp_ps_mask(m, a, th, _CMP_GT_OQ);
}
inline int64_t mask_row(const float* x, float* y, int64_t n, const float* t, bool per_channel, const float* s) {
  int64_t kept = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    const __mmask16 k = keep16(v, i, m, t, per_channel, s);
    _mm512_mask_storeu_ps(y + i, m, _mm512_maskz_mov_ps(k, v));
    kept += __builtin_popcount(static_cast<unsigned>(k));
  }
  return kept;
}
inline int64_t mask_row(const at::BFloat16* x, at::BFloat16* y, int64_t n, const float* t, bool per_channel,
                        const float* s) {
  int64_t kept = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m256i raw = _mm256_maskz_loadu_epi16(m, x + i);
    const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    const __mmask16 k = keep16(v, i, m, t, per_channel, s);
    _mm256_mask_storeu_epi16(y + i, m, _mm256_maskz_mov_epi16(k, raw));
    kept += __builtin_popcount(static_cast<unsigned>(k));
  }
  return kept;
}
}  // namespace avx512
#pragma GCC pop_options
#endif  // ACTSCOPE_X86

// ---------------------------------------------------------------------------------------------
// Run-time dispatch.
enum Isa : int { SCALAR = 0, AVX2 = 1, AVX512 = 2 };
const char* const ISA_NAMES[] = {"scalar", "avx2", "avx512"};

bool cpu_supports(int isa) {
  if (isa == SCALAR) return true;
#ifdef ACTSCOPE_X86
  __builtin_cpu_init();
  if (isa == AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == AVX512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
#endif
  return false;
}

int best_isa() {
  for (int isa = AVX512; isa > SCALAR; --isa)
    if (cpu_supports(isa)) return isa;
  return SCALAR;
}

int parse_isa(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == ISA_NAMES[i]) return i;
  TORCH_CHECK(false, "sparse_linear: unknown instruction set '", name, "'; use scalar, avx2 or avx512");
}

int g_isa = SCALAR;

template <typename W>
BlockFn<W> block_fn() {
#ifdef ACTSCOPE_X86
  if (g_isa == AVX512) return &avx512::block<W>;
  if (g_isa == AVX2) return &avx2::block<W>;
#endif
  return &block_scalar<W>;
}

template <typename W>
float dot(const float* x, const W* w, int64_t n) {
#ifdef ACTSCOPE_X86
  if (g_isa == AVX512) return avx512::dot<W>(x, w, n);
  if (g_isa == AVX2) return avx2::dot<W>(x, w, n);
#endif
  return dot_scalar(x, w, n);
}

// ---------------------------------------------------------------------------------------------
// A help-first thread pool. Work is cut into tasks (the kernel: one range of kept rows per
// thread; stream_read: 128 KiB chunks) that threads claim one at a time; the caller works too
// and then waits only for tasks *in progress*, never for a helper that has not started. On a machine shared with other jobs a helper thread is often not
// running when a call begins; with a fork-join region (OpenMP) every call -- seven per layer --
// then waits for the scheduler to run it, which made 2 threads slower than 1 under load.
class Pool {
 public:
  // Runs fn(slot, task) for every task in [0, n) on the caller and up to `helpers` helpers;
  // slot < helpers + 1 tells which thread runs it (for per-thread sums).
  void run(int helpers, int64_t n, const std::function<void(int, int64_t)>& fn) {
    if (helpers <= 0 || n <= 1) {
      for (int64_t c = 0; c < n; ++c) fn(0, c);
      return;
    }
    if (use_openmp_team()) {  // torch's own OpenMP team (see use_openmp_team)
      std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(helpers + 1)
      {
        const int slot = omp_get_thread_num();
        int64_t c;
        while ((c = next.fetch_add(1)) < n) fn(slot, c);
      }
      return;
    }
    ensure(helpers);
    std::lock_guard<std::mutex> serial(call_mutex_);  // one job at a time (calls from several Python threads)
    fn_ = &fn;
    n_ = n;
    max_slots_ = helpers + 1;
    next_.store(0);
    slots_.store(1);
    const uint64_t g = (state_.load() >> 1) + 1;
    state_.store((g << 1) | 1);  // open: helpers may join from here on
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lk(m_);
      cv_.notify_all();
    }
    work(0);
    state_.store(g << 1);  // closed: helpers that have not joined yet stay out
    while (pending_.load() != 0) _spin();
  }

 private:
  // By default chunks are claimed by the threads of an OpenMP parallel region. The extension
  // links the libgomp that torch loaded (same soname), so the region reuses torch's worker
  // threads, which keep spinning for a while after each torch op: a helper thread of our own
  // would wait for the core they hold, and most calls would run on one thread. On a quiet
  // 2-core Xeon this took compiled TEAL 50% decoding of the 135M default model from 23 to
  // 30-35 tok/s (docs/benchmarks.md).
  // ACTSCOPE_KERNEL_POOL=own (read once) selects the help-first pool below instead, which never
  // waits for a thread that the scheduler has not run: better on an oversubscribed machine.
  static bool use_openmp_team() {
    static const bool on = [] {
      const char* env = std::getenv("ACTSCOPE_KERNEL_POOL");
      return env == nullptr || std::string(env) != "own";
    }();
    return on;
  }

  static void _spin() {
#ifdef ACTSCOPE_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  void work(int slot) {
    int64_t c;
    while ((c = next_.fetch_add(1)) < n_) (*fn_)(slot, c);
  }

  void ensure(int helpers) {
    std::lock_guard<std::mutex> lk(start_mutex_);
    while (static_cast<int>(threads_.size()) < helpers) {
      threads_.emplace_back([this] { loop(); });
      threads_.back().detach();  // lives as long as the process
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t s = state_.load();
      for (int i = 0; (s >> 1) == seen || !(s & 1); ++i) {  // wait for a new open job
        if (i < 4000) {
          _spin();
        } else {
          std::unique_lock<std::mutex> lk(m_);
          sleeping_.fetch_add(1);
          cv_.wait_for(lk, std::chrono::milliseconds(50), [&] {
            const uint64_t t = state_.load();
            return (t >> 1) != seen && (t & 1);
          });
          sleeping_.fetch_sub(1);
          i = 0;
        }
        s = state_.load();
      }
      seen = s >> 1;
      pending_.fetch_add(1);
      if (state_.load() == s) {  // still open: join it (the caller now waits for this thread)
        const int slot = slots_.fetch_add(1);
        if (slot < max_slots_) work(slot);
      }
      pending_.fetch_sub(1);
    }
  }

  int max_slots_ = 1;
  std::mutex call_mutex_, start_mutex_, m_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int> pending_{0}, sleeping_{0}, slots_{1};
  const std::function<void(int, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads outlive static destruction
  return *p;
}

// ---------------------------------------------------------------------------------------------
// Writes y's columns, in order, into `outs` (contiguous, [rows, width] each, widths summing to out):
// one output for a lone linear, one per member for a group (group.py), so no split is needed after.
template <typename T>
void run(const torch::Tensor& x, const torch::Tensor& wt, const c10::optional<torch::Tensor>& bias,
         const torch::Tensor& thresh, const torch::Tensor& scale, const torch::Tensor& counter,
         const std::vector<torch::Tensor>& outs) {
  const int64_t in = wt.size(0), rows = x.numel() / in, out = wt.size(1), ld = wt.stride(0);
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
  //    multiple of the 8-row group; one thread below about 128 KiB of weights each), and each
  //    range is streamed whole (what the prefetcher likes) into its own [rows x out] partial
  //    sum; the partial sums are added in range order. So a call gives the same bits every time,
  //    whichever thread takes which range: when threads claimed 128 KiB chunks as they came
  //    free, 200 calls of one input gave 70-90 different results, and the fixed ranges measured
  //    the same speed. A range no helper has started is run by the caller (see Pool).
  const int64_t row_bytes = out * static_cast<int64_t>(sizeof(T));
  const int64_t min_rows = std::max<int64_t>(8, ((131072 / std::max<int64_t>(1, row_bytes)) + 7) / 8 * 8);
  const int nthreads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (na + min_rows - 1) / min_rows)));
  const int64_t per = ((na + nthreads - 1) / nthreads + 7) / 8 * 8;
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
      const int64_t w = y.numel() / rows;
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
  TORCH_CHECK(thresh.scalar_type() == torch::kFloat32, "sparse_linear: thresh must be float32");
  TORCH_CHECK(!x.is_cuda(), "sparse_linear: CPU tensors only (the Triton kernel serves CUDA)");
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
    TORCH_CHECK(values.numel() == x.numel() && values.scalar_type() == x.scalar_type() && values.is_contiguous(),
                "sparse_linear: values must be a contiguous tensor of x's size and dtype");
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

// Whether two contiguous CPU tensors hold the same bytes: the group's check that an inference
// tensor was not edited in place between its members' calls, without torch's dispatch.
bool same_bytes(const torch::Tensor& a, const torch::Tensor& b) {
  if (!a.is_contiguous() || !b.is_contiguous() || a.is_cuda() || b.is_cuda() || a.nbytes() != b.nbytes() ||
      a.scalar_type() != b.scalar_type())
    return false;
  return std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0;
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

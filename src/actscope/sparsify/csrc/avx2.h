// The AVX2 + FMA loops of the sparse kernel, compiled for that instruction set whatever the build's
// flags (picked at run time by dispatch.h).
#pragma once
#include "common.h"

#ifdef ACTSCOPE_X86
namespace {

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

}  // namespace
#endif  // ACTSCOPE_X86

// Run-time choice of the instruction set: cpuid, ACTSCOPE_KERNEL_ISA, and the function pointers.
#pragma once
#include "avx2.h"
#include "avx512.h"
#include "common.h"

namespace {

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

}  // namespace

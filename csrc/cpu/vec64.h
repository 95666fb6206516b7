// 64-byte vectors for the CPU kernel bodies (simd.cpp, hvp_simd.cpp), through GCC's vector
// extension: one zmm register in the AVX-512 clone, two ymm in the AVX2 clone, four xmm in the
// baseline clone. Everything here is always inlined into the cloned definitions, so each clone
// gets its own instruction set. Include only from a kernel-definition translation unit.
#pragma once

#include <cstdint>

#include "simd_clones.h"

// The vectors are passed by value only between always-inlined helpers, so the ABI note GCC gives
// for that in the baseline clone does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace imaml_ext {
namespace simd {
namespace {

// Loads and stores go through memcpy (unaligned).
template <typename T>
struct Vec64 {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using vec_t = typename Vec64<T>::type;
template <typename T>
constexpr int kVec = 64 / sizeof(T);

template <typename T>
IMAML_INLINE vec_t<T> vload(const T* p) {
  vec_t<T> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
IMAML_INLINE void vstore(T* p, vec_t<T> v) {
  __builtin_memcpy(p, &v, sizeof v);
}

template <typename T>
IMAML_INLINE T vsum(vec_t<T> v) {
  T s[kVec<T>];
  for (int l = 0; l < kVec<T>; ++l) s[l] = v[l];
  for (int w = kVec<T> / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  return s[0];
}

// sum_i a_i b_i with two vector accumulators (two zmm / four ymm FMA chains).
template <typename T>
IMAML_INLINE T dot_impl(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  constexpr int L = kVec<T>;
  vec_t<T> s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    s0 += vload(a + i) * vload(b + i);
    s1 += vload(a + i + L) * vload(b + i + L);
  }
  if (i + L <= n) {
    s0 += vload(a + i) * vload(b + i);
    i += L;
  }
  T tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return vsum<T>(s0 + s1) + tail;
}

}  // namespace
}  // namespace simd
}  // namespace imaml_ext

// Definitions of the softmax-head primitives declared in simd.h, in simd.cpp's pattern: each
// exported function is cloned for AVX2+FMA and a baseline target (function multi-versioning),
// and the always_inline bodies below are compiled into each clone. The per-class arithmetic
// (softmax, u = p (z - p.z)) comes from hvp_math.h, the functions the CUDA kernels call.
#include "simd.h"

#include "../hvp_math.h"

#include "simd_clones.h"
#include "vec64.h"

namespace imaml_ext {
namespace simd {
namespace {

template <typename T>
IMAML_INLINE void axpy_impl(T* __restrict__ y, T alpha, const T* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <typename T>
IMAML_INLINE void probs_impl(const T* __restrict__ F, int64_t f, int64_t c, int64_t row_begin,
                             int64_t row_end, const T* __restrict__ W, const T* __restrict__ bias,
                             T* __restrict__ probs) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* fi = F + i * f;
    T* pi = probs + i * c;
    for (int64_t k = 0; k < c; ++k) pi[k] = dot_impl(W + k * f, fi, f) + bias[k];
    softmax_inplace(pi, c);
  }
}

template <typename T>
IMAML_INLINE void rows_impl(const T* __restrict__ F, int64_t f, int64_t c, int64_t row_begin,
                            int64_t row_end, const T* __restrict__ W, const T* __restrict__ bias,
                            const T* __restrict__ probs, const T* __restrict__ V,
                            const T* __restrict__ vb, T* __restrict__ accW, T* __restrict__ accb,
                            T* __restrict__ work) {
  T* p = work;      // (c) this sample's probabilities (when not precomputed)
  T* z = work + c;  // (c) V f_i + vb, then u_i in place
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* fi = F + i * f;
    const T* pi;
    if (probs != nullptr) {
      for (int64_t k = 0; k < c; ++k) z[k] = dot_impl(V + k * f, fi, f) + vb[k];
      pi = probs + i * c;
    } else {
      // Two plain dot products per class, the second reading f_i from L1: a fused two-sum
      // loop (32 partial sums) ran 4x slower with GCC 12 (register pressure).
      for (int64_t k = 0; k < c; ++k) {
        p[k] = dot_impl(W + k * f, fi, f) + bias[k];
        z[k] = dot_impl(V + k * f, fi, f) + vb[k];
      }
      softmax_inplace(p, c);
      pi = p;
    }
    softmax_head_u_inplace(pi, z, c);
    for (int64_t k = 0; k < c; ++k) {
      axpy_impl(accW + k * f, z[k], fi, f);
      accb[k] += z[k];
    }
  }
}

}  // namespace

#define IMAML_DEFINE_HVP_SIMD(T)                                                               \
  IMAML_SIMD void softmax_head_probs(const T* F, int64_t f, int64_t c, int64_t row_begin,      \
                                     int64_t row_end, const T* W, const T* bias, T* probs) {   \
    probs_impl(F, f, c, row_begin, row_end, W, bias, probs);                                   \
  }                                                                                            \
  IMAML_SIMD void softmax_head_rows(const T* F, int64_t f, int64_t c, int64_t row_begin,       \
                                    int64_t row_end, const T* W, const T* bias,                \
                                    const T* probs, const T* V, const T* vb, T* accW, T* accb, \
                                    T* work) {                                                 \
    rows_impl(F, f, c, row_begin, row_end, W, bias, probs, V, vb, accW, accb, work);           \
  }

IMAML_DEFINE_HVP_SIMD(float)
IMAML_DEFINE_HVP_SIMD(double)

#undef IMAML_DEFINE_HVP_SIMD

}  // namespace simd
}  // namespace imaml_ext

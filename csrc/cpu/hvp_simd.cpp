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

// The transposed layout for heads with many classes and short feature vectors (the 20-way
// Omniglot head: f = 64, c = 20): c dot products of length f each end in a horizontal sum that
// costs more than the products themselves, so instead z = sum_j f_ij Vt[j, :] runs as f
// broadcast FMAs into ceil(c / L) vector accumulators (times 4 partial sums over j, for the FMA
// latency), on V transposed into (f, cp), cp = c padded to whole vectors with zeros.
template <typename T>
IMAML_INLINE int64_t padded_classes(int64_t c) {
  constexpr int L = kVec<T>;
  return (c + L - 1) / L * L;
}

template <typename T>
IMAML_INLINE bool use_transposed(int64_t f, int64_t c) {
  constexpr int L = kVec<T>;
  const int64_t nv = padded_classes<T>(c) / L;
  // vector FMAs per sample: f * nv transposed; c * (f / L + ~6 for the horizontal sum) as dots
  return nv <= 4 && f * nv < c * ((f + L - 1) / L + 6);
}

template <typename T>
IMAML_INLINE void transpose_padded(const T* __restrict__ V, int64_t c, int64_t f, int64_t cp,
                                   T* __restrict__ Vt) {
  for (int64_t j = 0; j < f; ++j) {
    T* row = Vt + j * cp;
    for (int64_t k = 0; k < c; ++k) row[k] = V[k * f + j];
    for (int64_t k = c; k < cp; ++k) row[k] = T(0);
  }
}

// out[k] = b[k] + sum_j fi[j] Vt[j, k] for k < c; Vt (f, NV * L).
template <int NV, typename T>
IMAML_INLINE void tmatvec(const T* __restrict__ Vt, const T* __restrict__ fi, int64_t f,
                          const T* __restrict__ b, int64_t c, T* __restrict__ out) {
  constexpr int L = kVec<T>;
  constexpr int cp = NV * L;
  vec_t<T> a[4][NV];
  for (int u = 0; u < 4; ++u)
    for (int m = 0; m < NV; ++m) a[u][m] = vec_t<T>{};
  int64_t j = 0;
  for (; j + 4 <= f; j += 4) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const T s = fi[j + u];
#pragma GCC unroll 4
      for (int m = 0; m < NV; ++m) a[u][m] += s * vload(Vt + (j + u) * cp + m * L);
    }
  }
  for (; j < f; ++j)
    for (int m = 0; m < NV; ++m) a[0][m] += fi[j] * vload(Vt + j * cp + m * L);
  for (int m = 0; m < NV; ++m) {
    T tmp[L];
    vstore(tmp, (a[0][m] + a[1][m]) + (a[2][m] + a[3][m]));
    for (int l = 0; l < L && m * L + l < c; ++l) out[m * L + l] = tmp[l] + b[m * L + l];
  }
}

template <typename T>
IMAML_INLINE void tmatvec_any(const T* Vt, const T* fi, int64_t f, const T* b, int64_t c,
                              T* out) {
  switch (padded_classes<T>(c) / kVec<T>) {
    case 1: tmatvec<1>(Vt, fi, f, b, c, out); break;
    case 2: tmatvec<2>(Vt, fi, f, b, c, out); break;
    case 3: tmatvec<3>(Vt, fi, f, b, c, out); break;
    default: tmatvec<4>(Vt, fi, f, b, c, out); break;
  }
}

// Samples whose outer products u_i f_i^T are added to the accumulator together: each row of accW
// is then loaded and stored once per kBlock samples instead of once per sample (the per-sample
// loop was bound by those stores at the 20-way head, f = 64, c = 20). Whole vectors and a scalar
// tail, no peeling prologue, which for the short rows of a head cost as much as the arithmetic.
constexpr int kBlock = 4;

// accW[k, :] += sum_s zs[s * c + k] fs[s], accb[k] += sum_s zs[s * c + k], for ns <= kBlock
// samples (the missing ones enter with coefficient 0).
template <typename T>
IMAML_INLINE void accumulate_block(T* __restrict__ accW, T* __restrict__ accb,
                                   const T* const* fs, const T* __restrict__ zs, int ns,
                                   int64_t c, int64_t f) {
  constexpr int L = kVec<T>;
  const T* f0 = fs[0];
  const T* f1 = ns > 1 ? fs[1] : f0;
  const T* f2 = ns > 2 ? fs[2] : f0;
  const T* f3 = ns > 3 ? fs[3] : f0;
  for (int64_t k = 0; k < c; ++k) {
    const T a0 = zs[k];
    const T a1 = ns > 1 ? zs[c + k] : T(0);
    const T a2 = ns > 2 ? zs[2 * c + k] : T(0);
    const T a3 = ns > 3 ? zs[3 * c + k] : T(0);
    T* row = accW + k * f;
    int64_t i = 0;
    for (; i + L <= f; i += L) {
      vstore(row + i, vload(row + i) + ((a0 * vload(f0 + i) + a1 * vload(f1 + i)) +
                                        (a2 * vload(f2 + i) + a3 * vload(f3 + i))));
    }
    for (; i < f; ++i) row[i] += (a0 * f0[i] + a1 * f1[i]) + (a2 * f2[i] + a3 * f3[i]);
    accb[k] += (a0 + a1) + (a2 + a3);
  }
}

template <typename T>
IMAML_INLINE void rows_impl(const T* __restrict__ F, int64_t f, int64_t c, int64_t row_begin,
                            int64_t row_end, const T* __restrict__ W, const T* __restrict__ bias,
                            const T* __restrict__ probs, const T* __restrict__ V,
                            const T* __restrict__ vb, T* __restrict__ accW, T* __restrict__ accb,
                            T* __restrict__ work) {
  T* p = work;       // (c) this sample's probabilities (when not precomputed)
  T* zb = work + c;  // (kBlock, c): V f_i + vb, then u_i in place, for a block of samples
  const T* fs[kBlock];
  int ns = 0;
  // No rows, nothing to add; and the solver passes no W (its probabilities are given) even
  // where an empty system leaves the probability buffer null, so W is not read here either.
  if (row_begin >= row_end) return;
  if (use_transposed<T>(f, c)) {
    const int64_t cp = padded_classes<T>(c);
    T* Vt = zb + kBlock * c;  // (f, cp)
    T* Wt = Vt + f * cp;   // (f, cp), when the probabilities are computed here
    transpose_padded(V, c, f, cp, Vt);
    if (probs == nullptr) transpose_padded(W, c, f, cp, Wt);
    for (int64_t i = row_begin; i < row_end; ++i) {
      const T* fi = F + i * f;
      T* z = zb + ns * c;
      tmatvec_any(Vt, fi, f, vb, c, z);
      const T* pi = p;
      if (probs != nullptr) {
        pi = probs + i * c;
      } else {
        tmatvec_any(Wt, fi, f, bias, c, p);
        softmax_inplace(p, c);
      }
      softmax_head_u_inplace(pi, z, c);
      fs[ns++] = fi;
      if (ns == kBlock) {
        accumulate_block(accW, accb, fs, zb, ns, c, f);
        ns = 0;
      }
    }
    if (ns > 0) accumulate_block(accW, accb, fs, zb, ns, c, f);
    return;
  }
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* fi = F + i * f;
    T* z = zb + ns * c;
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
    fs[ns++] = fi;
    if (ns == kBlock) {
      accumulate_block(accW, accb, fs, zb, ns, c, f);
      ns = 0;
    }
  }
  if (ns > 0) accumulate_block(accW, accb, fs, zb, ns, c, f);
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

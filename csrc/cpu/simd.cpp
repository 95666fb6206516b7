// Definitions of csrc/cpu/simd.h. The per-element arithmetic of the CG updates comes from
// cg_math.h, the same functions the CUDA kernels call.
#include "simd.h"

#include <unistd.h>

#include "../cg_math.h"

#include "simd_clones.h"
#include "vec64.h"

namespace imaml_ext {
namespace simd {
namespace {

// 16 lanes: two AVX2 registers of float or four of double, enough independent FMA chains to
// cover the FMA latency.
constexpr int kLanes = 16;

template <typename T>
IMAML_INLINE T reduce_lanes(const T* acc) {
  T s[kLanes / 2];
  for (int l = 0; l < kLanes / 2; ++l) s[l] = acc[l] + acc[l + kLanes / 2];
  for (int w = kLanes / 4; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  return s[0];
}

template <typename T>
IMAML_INLINE void axpy_impl(T* __restrict__ y, T alpha, const T* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <typename T>
IMAML_INLINE T update_xr_impl(T* __restrict__ x, T* __restrict__ r, const T* __restrict__ p,
                        const T* __restrict__ ap, T alpha, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 16
    for (int l = 0; l < kLanes; ++l)
      acc[l] += cg_update_xr<T, T>(x + i + l, r + i + l, p[i + l], ap[i + l], alpha);
  }
  T tail = 0;
  for (; i < n; ++i) tail += cg_update_xr<T, T>(x + i, r + i, p[i], ap[i], alpha);
  return reduce_lanes(acc) + tail;
}

template <typename T>
IMAML_INLINE void update_p_impl(T* __restrict__ p, const T* __restrict__ r, T beta, int64_t n) {
  for (int64_t i = 0; i < n; ++i) cg_update_p<T, T>(p + i, r[i], beta);
}

template <typename T>
IMAML_INLINE void combine_impl(T* __restrict__ out, const T* __restrict__ v, const T* __restrict__ acc,
                         double shift, double scale, int64_t n) {
  const T s = static_cast<T>(shift), c = static_cast<T>(scale);
  for (int64_t i = 0; i < n; ++i) out[i] = s * v[i] + c * acc[i];
}

// t[k] = x_k . v for the R consecutive rows x_k = X[k] (row stride d): the R dot products share
// each load of v and run as R independent FMA chains.
template <int R, typename T>
IMAML_INLINE void dots_block(const T* __restrict__ X, int64_t d, const T* __restrict__ v,
                             T* __restrict__ t) {
  constexpr int L = kVec<T>;
  const int64_t dv = d - d % L;
  vec_t<T> s[R];
  for (int k = 0; k < R; ++k) s[k] = vec_t<T>{};
  for (int64_t j = 0; j < dv; j += L) {
    const vec_t<T> vj = vload(v + j);
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k) s[k] += vload(X + k * d + j) * vj;
  }
  for (int k = 0; k < R; ++k) {
    t[k] = vsum<T>(s[k]);
    for (int64_t j = dv; j < d; ++j) t[k] += X[k * d + j] * v[j];
  }
}

// The update of acc with R rows and their dot products t: acc += sum_k t[k] x_k. When `next` is
// not null, the dot products of the R rows at `next` are taken in the same sweep (into t_next):
// the loads of the next block stream from memory while this block's rows, read one sweep
// earlier, come back from L1/L2, so the memory stream never pauses for the update. The dot
// products are summed in exactly the order dots_block uses.
template <int R, typename T>
IMAML_INLINE void update_block(const T* __restrict__ X, int64_t d, const T* __restrict__ t,
                               T* __restrict__ acc, const T* __restrict__ next,
                               const T* __restrict__ v, T* __restrict__ t_next) {
  constexpr int L = kVec<T>;
  const int64_t dv = d - d % L;
  vec_t<T> s[R];
  for (int k = 0; k < R; ++k) s[k] = vec_t<T>{};
  for (int64_t j = 0; j < dv; j += L) {
    if (next != nullptr) {
      const vec_t<T> vj = vload(v + j);
#pragma GCC unroll 8
      for (int k = 0; k < R; ++k) s[k] += vload(next + k * d + j) * vj;
    }
    vec_t<T> a = vload(acc + j);
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k) a += t[k] * vload(X + k * d + j);
    vstore(acc + j, a);
  }
  for (int64_t j = dv; j < d; ++j) {
    T a = acc[j];
    for (int k = 0; k < R; ++k) a += t[k] * X[k * d + j];
    acc[j] = a;
  }
  if (next != nullptr) {
    for (int k = 0; k < R; ++k) {
      t_next[k] = vsum<T>(s[k]);
      for (int64_t j = dv; j < d; ++j) t_next[k] += next[k * d + j] * v[j];
    }
  }
}

template <typename T>
IMAML_INLINE void matvec_rows_impl(const T* __restrict__ A, int64_t d, int64_t row_begin,
                                   int64_t row_end, const T* __restrict__ v, T* __restrict__ out,
                                   bool reverse) {
  const int64_t nb = (row_end - row_begin) / 4;
  const int64_t tail = row_begin + nb * 4;
  auto tail_rows = [&] {
    for (int64_t i = tail; i < row_end; ++i) dots_block<1>(A + i * d, d, v, out + i);
  };
  if (reverse) tail_rows();
  for (int64_t k = 0; k < nb; ++k) {
    const int64_t i = row_begin + (reverse ? nb - 1 - k : k) * 4;
    dots_block<4>(A + i * d, d, v, out + i);
  }
  if (!reverse) tail_rows();
}

// acc += X^T (X v) over rows [row_begin, row_end), one pass over X, in blocks of R rows: block
// b's update runs in the same sweep as block b+1's dot products (update_block), so the update
// re-reads rows loaded one sweep earlier. R comes from xtxv_block_rows (simd.h). Eight rows
// rather than four halve the loads of v and acc per element of X; measured on a Xeon (CG solve,
// 20 iterations, float32, interleaved): 1.03-1.13x at (B, n, d) = (1, 4000, 4000), (32, 500,
// 2000) and (32, 50, 200); twelve and sixteen rows were slower (register pressure). Two rows
// where only they keep the re-read rows in L1: on an AMD EPYC (48 KB L1d), one 500 x 2000
// system's CG iteration 53.6 us against 76 us with eight (1 thread), 28.6 against 39.2 us (2
// threads). R changes the rounding, not the accuracy: a reverse sweep visits the blocks last to
// first but each block's rows first to last, so the order rows are added in depends on R (and
// the compiler may contract each instantiation's a += t x differently); results can differ in
// the last bits between hosts whose L1d sizes pick different R for the same d.
template <int R, typename T>
IMAML_INLINE void xtxv_rows_impl(const T* __restrict__ X, int64_t d, int64_t row_begin,
                                 int64_t row_end, const T* __restrict__ v, T* __restrict__ acc,
                                 bool reverse) {
  const int64_t nb = (row_end - row_begin) / R;
  const int64_t tail = row_begin + nb * R;  // rows [tail, row_end): fewer than R
  auto tail_rows = [&] {
    for (int64_t i = tail; i < row_end; ++i) {
      T t;
      dots_block<1>(X + i * d, d, v, &t);
      update_block<1>(X + i * d, d, &t, acc, static_cast<const T*>(nullptr), v,
                      static_cast<T*>(nullptr));
    }
  };
  if (reverse) tail_rows();
  if (nb > 0) {
    // Block k's first row, in sweep order (forward: k = 0, 1, ...; reverse: the last first).
    auto row = [&](int64_t k) { return row_begin + (reverse ? nb - 1 - k : k) * R; };
    T t[2][R];
    int cur = 0;
    dots_block<R>(X + row(0) * d, d, v, t[cur]);
    for (int64_t k = 0; k + 1 < nb; ++k, cur ^= 1)
      update_block<R>(X + row(k) * d, d, t[cur], acc, X + row(k + 1) * d, v, t[cur ^ 1]);
    update_block<R>(X + row(nb - 1) * d, d, t[cur], acc, static_cast<const T*>(nullptr), v,
                    static_cast<T*>(nullptr));
  }
  if (!reverse) tail_rows();
}

}  // namespace

int64_t l1d_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL1_DCACHE_SIZE  // glibc; elsewhere (macOS, musl, BSDs) the 32 KiB default
    const long v = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    if (v > 0) return static_cast<int64_t>(v);
#endif
    return int64_t{32768};
  }();
  return bytes;
}

#define IMAML_DEFINE_SIMD(T)                                                                   \
  IMAML_SIMD T dot(const T* a, const T* b, int64_t n) { return dot_impl(a, b, n); }                       \
  IMAML_SIMD void axpy(T* y, T alpha, const T* x, int64_t n) { axpy_impl(y, alpha, x, n); }              \
  IMAML_SIMD T update_xr(T* x, T* r, const T* p, const T* ap, T alpha, int64_t n) {                       \
    return update_xr_impl(x, r, p, ap, alpha, n);                                              \
  }                                                                                            \
  IMAML_SIMD void update_p(T* p, const T* r, T beta, int64_t n) { update_p_impl(p, r, beta, n); }         \
  IMAML_SIMD void combine(T* out, const T* v, const T* acc, double shift, double scale, int64_t n) {      \
    combine_impl(out, v, acc, shift, scale, n);                                                \
  }                                                                                            \
  IMAML_SIMD void matvec_rows(const T* A, int64_t d, int64_t row_begin, int64_t row_end,        \
                              const T* v, T* out, bool reverse) {                              \
    matvec_rows_impl(A, d, row_begin, row_end, v, out, reverse);                               \
  }                                                                                            \
  IMAML_SIMD void xtxv_rows(const T* X, int64_t d, int64_t row_begin, int64_t row_end, const T* v,        \
                 T* acc, bool reverse) {                                                       \
    switch (xtxv_block_rows(d, sizeof(T), l1d_bytes())) {                                                   \
      case 2: xtxv_rows_impl<2>(X, d, row_begin, row_end, v, acc, reverse); break;             \
      case 4: xtxv_rows_impl<4>(X, d, row_begin, row_end, v, acc, reverse); break;             \
      default: xtxv_rows_impl<8>(X, d, row_begin, row_end, v, acc, reverse);                   \
    }                                                                                          \
  }

IMAML_DEFINE_SIMD(float)
IMAML_DEFINE_SIMD(double)

#undef IMAML_DEFINE_SIMD

}  // namespace simd
}  // namespace imaml_ext

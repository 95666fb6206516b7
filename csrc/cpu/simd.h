// Vector primitives for the CPU kernels. Each is compiled three times through GCC function
// multi-versioning: an AVX-512 clone (arch=x86-64-v4), an AVX2+FMA clone (arch=x86-64-v3) and a
// baseline clone, picked at load time by the processor's cpuid. So the package needs no -march=native and still runs on a CPU without
// AVX2. Reductions keep kLanes independent partial sums: that lets the compiler vectorise them
// without -ffast-math (which would also break the isfinite checks of cg_math.h).
#pragma once

#include <cstdint>
#include <initializer_list>

// The clones are declared on the definitions only (simd.cpp): callers in other translation units
// then call the plain symbol, which is the resolver-backed ifunc.

namespace imaml_ext {
namespace simd {

// sum_i a_i b_i
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);

// y += alpha x
void axpy(float* y, float alpha, const float* x, int64_t n);
void axpy(double* y, double alpha, const double* x, int64_t n);

// x += alpha p; r -= alpha ap; returns r.r (after the update)
float update_xr(float* x, float* r, const float* p, const float* ap, float alpha,
                           int64_t n);
double update_xr(double* x, double* r, const double* p, const double* ap, double alpha,
                            int64_t n);

// p = r + beta p
void update_p(float* p, const float* r, float beta, int64_t n);
void update_p(double* p, const double* r, double beta, int64_t n);

// out = shift v + scale acc
void combine(float* out, const float* v, const float* acc, double shift, double scale,
                        int64_t n);
void combine(double* out, const double* v, const double* acc, double shift,
                        double scale, int64_t n);

// out[i] = A[i] . v for the rows i in [row_begin, row_end) of a row-major (n, d) A; reverse:
// visit the rows last to first (the same results).
void matvec_rows(const float* A, int64_t d, int64_t row_begin, int64_t row_end, const float* v,
                 float* out, bool reverse = false);
void matvec_rows(const double* A, int64_t d, int64_t row_begin, int64_t row_end, const double* v,
                 double* out, bool reverse = false);

// acc += X^T (X v) over the rows [row_begin, row_end) of a row-major (n, d) X, in ONE pass over
// X: each row's dot product is taken while the row is in L1, then the row is reused for the axpy.
// reverse: sweep the rows last to first (the solvers alternate directions to keep rows in L2).
void xtxv_rows(const float* X, int64_t d, int64_t row_begin, int64_t row_end,
                          const float* v, float* acc, bool reverse = false);
void xtxv_rows(const double* X, int64_t d, int64_t row_begin, int64_t row_end,
                          const double* v, double* acc, bool reverse = false);

// The rows per block of xtxv_rows (8, 4 or 2) for rows of d elements of elem_bytes each and an
// L1 data cache of l1_bytes: the most rows whose two blocks in flight (this one's, re-read by
// the update, and the next one's, read for its dot products) fit in L1 beside v and acc, so that
// the re-read comes from L1; where even two rows' do not fit, eight (the re-read comes from L2
// whatever the block, and eight rows halve the loads of v and acc).
inline int xtxv_block_rows(int64_t d, int64_t elem_bytes, int64_t l1_bytes) {
  for (int r : {8, 4, 2})
    if ((2 * r + 2) * d * elem_bytes <= l1_bytes) return r;
  return 8;
}
// This processor's L1 data cache per core in bytes (sysconf; 32 KiB where it is not known).
int64_t l1d_bytes();

// ---- the softmax cross-entropy head (csrc/hvp_math.h), definitions in hvp_simd.cpp ----------
// Rows [row_begin, row_end) of one system's features F (n, f), row-major; W, V (c, f); bias,
// vb (c); probs (n, c).

// probs[i] = softmax(W f_i + bias) for each row i.
void softmax_head_probs(const float* F, int64_t f, int64_t c, int64_t row_begin, int64_t row_end,
                        const float* W, const float* bias, float* probs);
void softmax_head_probs(const double* F, int64_t f, int64_t c, int64_t row_begin,
                        int64_t row_end, const double* W, const double* bias, double* probs);

// accW += sum_i u_i f_i^T and accb += sum_i u_i, u_i = p_i * (z_i - p_i . z_i), z_i = V f_i + vb,
// in ONE pass over F: each row f_i is read once from memory and reused from L1 for its dot
// products and c axpys. p_i is read from probs when it is not null, else computed from W and
// bias while f_i is in L1. work: softmax_head_work(f, c) scratch.
// Scratch entries softmax_head_rows needs: 5c (one sample's probabilities, a block of 4
// samples' u), plus V and W transposed into (f, c padded to a multiple of 16) for heads with many
// classes and short features (hvp_simd.cpp).
inline int64_t softmax_head_work(int64_t f, int64_t c) {
  return 5 * c + 2 * f * ((c + 15) / 16 * 16);
}
void softmax_head_rows(const float* F, int64_t f, int64_t c, int64_t row_begin, int64_t row_end,
                       const float* W, const float* bias, const float* probs, const float* V,
                       const float* vb, float* accW, float* accb, float* work);
void softmax_head_rows(const double* F, int64_t f, int64_t c, int64_t row_begin, int64_t row_end,
                       const double* W, const double* bias, const double* probs, const double* V,
                       const double* vb, double* accW, double* accb, double* work);

}  // namespace simd
}  // namespace imaml_ext

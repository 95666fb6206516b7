// The arithmetic of the softmax cross-entropy head's Hessian-vector product, written once and
// shared by the CPU kernels (csrc/cpu/hvp_*.cpp) and the CUDA kernels (csrc/cuda/hvp_cuda.cu,
// csrc/cuda/cg_fused_cuda.cu), like cg_math.h is for CG. Backends differ only in how they map
// samples and classes to threads and in the order of their sums.
//
// Loss: L(W, bias) = (1/n) sum_i CE(W f_i + bias, y_i), W (c, f), bias (c), features f_i (f).
// Its Hessian applied to a direction (V, v_b), per sample i (labels drop out):
//   p_i = softmax(W f_i + bias)                      (c)
//   z_i = V f_i + v_b                                (c): the logits' directional derivative
//   u_i = diag(p_i) z_i - p_i p_i^T z_i = p_i * (z_i - p_i . z_i)
//   H (V, v_b) = ((1/n) sum_i u_i f_i^T, (1/n) sum_i u_i)
// The ops return shift * (V, v_b) + scale * H (V, v_b); (I + H/lam) is shift=1, scale=1/lam.
//
// Flat layout of one system's unknown in the whole-loop solver: P = c * (f + 1) entries,
// [W row-major (c*f entries, row k = class k), then bias (c entries)].
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace imaml_ext {

template <typename acc_t>
C10_HOST_DEVICE inline acc_t hvp_exp(acc_t v) {
#ifdef __CUDA_ARCH__
  return ::exp(v);
#else
  return std::exp(v);
#endif
}

// One softmax term exp(l_k - max_l): the shift by the maximum keeps every term in (0, 1], so
// the sum is >= 1 and never overflows.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_term(acc_t logit, acc_t max_logit) {
  return hvp_exp(logit - max_logit);
}

// u_k from p_k, z_k and the reduction p . z: p_k (z_k - p . z). Written as a product with the
// difference (not p z - p (p.z)) so that a large common offset of z cancels before the product.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_head_u(acc_t p, acc_t z, acc_t pz) {
  return p * (z - pz);
}

// Softmax of c logits in place (sequential reductions; the CUDA kernels spread the same steps
// over a warp). c == 0 is a no-op.
template <typename acc_t>
C10_HOST_DEVICE inline void softmax_inplace(acc_t* l, int64_t c) {
  if (c <= 0) return;
  acc_t m = l[0];
  for (int64_t k = 1; k < c; ++k) m = l[k] > m ? l[k] : m;
  acc_t s = 0;
  for (int64_t k = 0; k < c; ++k) {
    l[k] = softmax_term(l[k], m);
    s += l[k];
  }
  const acc_t inv = acc_t(1) / s;
  for (int64_t k = 0; k < c; ++k) l[k] *= inv;
}

// z <- u = p * (z - p . z) for one sample's c classes (sequential reduction).
template <typename acc_t>
C10_HOST_DEVICE inline void softmax_head_u_inplace(const acc_t* p, acc_t* z, int64_t c) {
  acc_t pz = 0;
  for (int64_t k = 0; k < c; ++k) pz += p[k] * z[k];
  for (int64_t k = 0; k < c; ++k) z[k] = softmax_head_u(p[k], z[k], pz);
}

// The factor of the accumulated sums: scale * (1/n), with the mean over no samples taken as 0
// (H = 0 for n = 0, so the operator is shift * I).
C10_HOST_DEVICE inline double softmax_head_factor(double scale, int64_t n) {
  return n > 0 ? scale / static_cast<double>(n) : 0.0;
}

}  // namespace imaml_ext

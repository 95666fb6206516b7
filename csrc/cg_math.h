// The arithmetic of one conjugate-gradient system, written once and shared by the CPU kernels
// (csrc/cpu/*) and the CUDA kernels (csrc/cuda/*): the CPU tests exercise exactly the decisions
// the GPU makes. Only thread mapping, reductions and launches live in the backend files.
//
// One CG iteration for system b (Hestenes-Stiefel form, A symmetric):
//   pAp   = p . A p                      (reduction 1)
//   alpha = rs / pAp                     stop with kNegativeCurvature if pAp <= 0 (x untouched:
//                                        the last good iterate), kNonFinite if pAp is NaN/Inf
//   x    += alpha p ;  r -= alpha A p
//   rs'   = r . r                        (reduction 2)
//   stop with kConverged if rs' <= tol^2, tol = max(rtol * ||b||, atol)
//   beta  = rs' / rs ;  p = r + beta p
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace imaml_ext {

// Per-system status, stored as int32 in a (B,) tensor. Systems stop changing once it is not
// kRunning; a system still kRunning after max_iter iterations has not converged.
enum CgStatus : int32_t {
  kRunning = 0,
  kConverged = 1,
  kNegativeCurvature = 2,
  kNonFinite = 3,
};

template <typename acc_t>
C10_HOST_DEVICE inline bool cg_isfinite(acc_t v) {
#ifdef __CUDA_ARCH__
  return ::isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// tol^2 from ||b||^2: compared against r.r so that no square root is needed per iteration.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t cg_tol2(acc_t bnorm2, double rtol, double atol) {
  const acc_t rt = static_cast<acc_t>(rtol);
  const acc_t at = static_cast<acc_t>(atol);
  const acc_t t1 = rt * rt * bnorm2;
  const acc_t t2 = at * at;
  return t1 > t2 ? t1 : t2;
}

// Status of a system before its first iteration (r0 = b - A x0 already formed).
template <typename acc_t>
C10_HOST_DEVICE inline int32_t cg_initial_status(acc_t rs, acc_t tol2) {
  if (!cg_isfinite(rs) || !cg_isfinite(tol2)) return kNonFinite;
  return rs <= tol2 ? kConverged : kRunning;
}

// Step length from p.Ap; updates *status when the system must stop before its x update.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t cg_alpha(acc_t rs, acc_t pAp, int32_t* status) {
  if (*status != kRunning) return acc_t(0);
  if (!cg_isfinite(pAp)) {
    *status = kNonFinite;
    return acc_t(0);
  }
  if (pAp <= acc_t(0)) {
    *status = kNegativeCurvature;
    return acc_t(0);
  }
  return rs / pAp;
}

// x += alpha p, r -= alpha Ap for one element; returns the new r_i^2 for reduction 2.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t cg_update_xr(scalar_t* x, scalar_t* r, scalar_t p, scalar_t ap,
                                          acc_t alpha) {
  const acc_t xi = static_cast<acc_t>(*x) + alpha * static_cast<acc_t>(p);
  const acc_t ri = static_cast<acc_t>(*r) - alpha * static_cast<acc_t>(ap);
  *x = static_cast<scalar_t>(xi);
  *r = static_cast<scalar_t>(ri);
  return ri * ri;
}

// beta from the new and old r.r; marks convergence (this iteration's x is kept) or breakdown.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t cg_beta(acc_t rs_new, acc_t rs_old, acc_t tol2, int32_t* status) {
  if (!cg_isfinite(rs_new)) {
    *status = kNonFinite;
    return acc_t(0);
  }
  if (rs_new <= tol2) *status = kConverged;
  return rs_new / rs_old;  // rs_old > tol2 >= 0 while the system was running
}

template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void cg_update_p(scalar_t* p, scalar_t r, acc_t beta) {
  *p = static_cast<scalar_t>(static_cast<acc_t>(r) + beta * static_cast<acc_t>(*p));
}

// The operator value one CG step uses for one element, A p = shift * p + scale * (M p), M p the
// caller's product: an affine operator such as iMAML's (1 + damping) I + H / cg_lam is folded into
// the step instead of costing two more elementwise passes (and launches) per iteration.
// affine = false (shift 0, scale 1) passes the product through unchanged.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t cg_affine(acc_t p, acc_t mp, acc_t shift, acc_t scale, bool affine) {
  return affine ? shift * p + scale * mp : mp;
}

// The scale of one system's right-hand side: the power of two s with max|b_i| / s in [1, 2), so
// that ||b / s||^2 can neither underflow to 0 (read as converged at x = 0) nor overflow; dividing
// by s is exact, and so are the iterates (the unscaled ones over s). 1 when max|b_i| is 0 or any
// entry is NaN/Inf (amax_or_inf = +Inf then: that system is flagged non-finite as it is). s <=
// max|b_i|, so s is finite even for entries near the largest float (2^e with e from frexp would
// overflow there).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t cg_rhs_scale(acc_t amax_or_inf) {
  if (!(amax_or_inf > acc_t(0)) || !cg_isfinite(amax_or_inf)) return acc_t(1);
  int e = 0;
#ifdef __CUDA_ARCH__
  (void)::frexp(amax_or_inf, &e);  // amax = f 2^e, f in [0.5, 1)
  return ::ldexp(acc_t(1), e - 1);
#else
  (void)std::frexp(amax_or_inf, &e);
  return std::ldexp(acc_t(1), e - 1);
#endif
}

// The structured least-squares operator: A v = shift * v + scale * X^T (X v). Element j of the
// result from the accumulated (X^T X v)_j.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t lstsq_combine(acc_t v, acc_t xtxv, double shift, double scale) {
  return static_cast<acc_t>(shift) * v + static_cast<acc_t>(scale) * xtxv;
}

}  // namespace imaml_ext

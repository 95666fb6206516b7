// The whole-loop CG machinery of the CPU solvers, shared by every structured operator
// (cg_cpu.cpp: dense and least squares; hvp_cpu.cpp: the softmax head).
//
// Locality is the design: a whole-loop solver finishes all iterations of one system before it
// moves to the next, so that system's operator data stays in cache across iterations (sweeping
// the whole batch once per iteration streams B operators from memory every iteration). Systems
// go to threads through at::parallel_for; when there are fewer systems than threads, or when a
// system's operator overflows one core's L2 but fits in the threads' L2 caches together
// (split_rows), the systems run one after another and the operator's rows are split over the
// threads instead.
//
// An operator is a struct with `void apply(const scalar_t* v, scalar_t* out, bool parallel)`:
// out = A v for one system, splitting its rows over the threads when `parallel` is set.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>

#include "../cg_math.h"
#include "../ops.h"
#include "simd.h"

namespace imaml_ext {
namespace cpu {

// One CG iteration of one system; the same decisions as the CUDA kernels (cg_math.h).
template <typename scalar_t>
void step_one(scalar_t* x, scalar_t* r, scalar_t* p, const scalar_t* ap, scalar_t* rs,
              scalar_t tol2, int32_t* status, int32_t* iters, int64_t P) {
  if (*status != kRunning) return;
  int32_t st = kRunning;
  const scalar_t alpha = cg_alpha<scalar_t>(*rs, simd::dot(p, ap, P), &st);
  if (st != kRunning) {
    *status = st;
    return;
  }
  const scalar_t rs_new = simd::update_xr(x, r, p, ap, alpha, P);
  *iters += 1;
  const scalar_t beta = cg_beta<scalar_t>(rs_new, *rs, tol2, &st);
  if (st == kRunning) simd::update_p(p, r, beta, P);
  *rs = rs_new;
  *status = st;
}

// ---- operators: out = A v for one system; `parallel` splits the rows over the threads -------

// Successive products sweep an operator's rows forward and backward in turn, so that a sweep
// starts on the rows the previous one ended on, still in L2: when the operator overflows L2 (or
// a thread's share of it does) only the overflow streams from L3 each iteration, where cycling
// through the rows in one direction would evict each row before its next use. Measured here
// (CG, 20 iterations, float32, B = 32, interleaved): least squares 1.15x at 4 MB per system,
// 1.13x at 5.6 MB, 1.10x at 8 MB; dense 1.36x at 4 MB (P = 1000), 1.02-1.03x at 2.6 MB, 1.07x at
// 7.8 MB (B = 16); neutral where the operator fits L2. The dense results are bit-identical
// either way (each row's dot product is independent of the order).
struct AlternatingSweeps {
  mutable bool backward = false;
  bool next_direction() const {
    backward = !backward;
    return backward;
  }
};

template <typename scalar_t>
struct DenseOp : AlternatingSweeps {
  DenseOp(const scalar_t* A_, int64_t P_) : A(A_), P(P_) {}
  const scalar_t* A;  // (P, P) of this system
  int64_t P;
  void apply(const scalar_t* v, scalar_t* out, bool parallel) const {
    const bool rev = next_direction();
    auto rows = [&](int64_t lo, int64_t hi) { simd::matvec_rows(A, P, lo, hi, v, out, rev); };
    if (parallel)
      at::parallel_for(0, P, 64, rows);
    else
      rows(0, P);
  }
};

template <typename scalar_t>
struct LstsqOp : AlternatingSweeps {
  LstsqOp(const scalar_t* X_, int64_t n_, int64_t d_, double shift_, double scale_,
          scalar_t* acc_, int nthreads_)
      : X(X_), n(n_), d(d_), shift(shift_), scale(scale_), acc(acc_), nthreads(nthreads_) {}
  const scalar_t* X;  // (n, d) of this system
  int64_t n, d;
  double shift, scale;
  scalar_t* acc;  // (nthreads, d) scratch: one X^T X v partial per thread
  int nthreads;
  void apply(const scalar_t* v, scalar_t* out, bool parallel) const {
    if (!parallel || nthreads == 1) {
      std::fill(acc, acc + d, scalar_t(0));
      simd::xtxv_rows(X, d, 0, n, v, acc, next_direction());
      simd::combine(out, v, acc, shift, scale, d);
      return;
    }
    std::fill(acc, acc + nthreads * d, scalar_t(0));
    const bool rev = next_direction();
    at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
      simd::xtxv_rows(X, d, lo, hi, v, acc + at::get_thread_num() * d, rev);
    });
    for (int t = 1; t < nthreads; ++t) simd::axpy(acc, scalar_t(1), acc + t * d, d);
    simd::combine(out, v, acc, shift, scale, d);
  }
};

// All iterations of one system: r = b - A x0, then CG until converged, stopped or max_iter.
template <typename scalar_t, typename Op>
void solve_one(const Op& op, const scalar_t* b, scalar_t* x, scalar_t* r, scalar_t* p,
               scalar_t* ap, int64_t P, int64_t max_iter, double rtol, double atol,
               int32_t* iters, scalar_t* rnorm, int32_t* status, bool parallel) {
  // x0 = 0 (the usual start) needs no product: r = b exactly, as A 0 = 0 for a finite A (an A
  // with a non-finite entry is flagged at the first product instead, with the same status and
  // iteration count). Saves one of max_iter + 1 passes over the operator.
  const bool x_zero = std::all_of(x, x + P, [](scalar_t v) { return v == scalar_t(0); });
  if (x_zero) {
    std::fill(ap, ap + P, scalar_t(0));
  } else {
    op.apply(x, ap, parallel);
  }
  for (int64_t i = 0; i < P; ++i) {
    r[i] = b[i] - ap[i];
    p[i] = r[i];
  }
  scalar_t rs = simd::dot(r, r, P);
  const scalar_t tol2 = cg_tol2<scalar_t>(simd::dot(b, b, P), rtol, atol);
  int32_t st = cg_initial_status(rs, tol2);
  int32_t it = 0;
  for (int64_t k = 0; k < max_iter && st == kRunning; ++k) {
    op.apply(p, ap, parallel);
    step_one(x, r, p, ap, &rs, tol2, &st, &it, P);
  }
  *iters = it;
  *rnorm = std::sqrt(rs);
  *status = st;
}

// Bytes of one core's L2 cache (sysconf; 1 MiB where the C library does not know).
inline int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t(1) << 20;
  }();
  return bytes;
}

// Whether to run the systems in turn with each operator's rows split over the threads, rather
// than give each thread whole systems: when there are fewer systems than threads, and when one
// system's operator data overflows a core's L2 cache while its share per thread is not far over
// it, so that most of each thread's share stays in its L2 between iterations (with LstsqOp's
// alternating sweeps). Measured here (2 threads, 2 MiB L2 each; least-squares CG, 20
// iterations, float32, alternating sweeps, interleaved): splitting is 1.25x at 4.0 MB per
// system, 1.16x at 5.6 MB, 1.13x at 6.4 MB; 0.97-1.02x at 2.4 MB, 8 MB and 16 MB; and 0.44x at
// 40 KB (a barrier per iteration for almost no work).
inline bool split_rows(int64_t B, int nthreads, int64_t op_bytes) {
  if (nthreads <= 1) return false;
  if (B < nthreads) return true;
  const int64_t l2 = l2_cache_bytes();
  return op_bytes > l2 && op_bytes <= nthreads * l2 * 3 / 2;
}

// Solves the B systems of b (B, P) from x0. make_op(scalar_t(0), sys, worker, inner) returns the
// operator of system `sys`, run by `worker` (a thread index, 0 when inner); `inner` says whether
// the operator should split its rows over the threads (split_rows). op_bytes: the operator's
// data per system, for split_rows.
template <typename MakeOp>
SolveResult solve_batch(const at::Tensor& b_in, const at::Tensor& x0,
                        int64_t max_iter, double rtol, double atol, int64_t op_bytes,
                        MakeOp make_op) {
  const auto b = b_in.contiguous();
  const int64_t B = b.size(0), P = b.size(1);
  auto x = x0.contiguous().clone();
  auto iters = at::zeros({B}, b.options().dtype(at::kInt));
  auto status = at::zeros({B}, b.options().dtype(at::kInt));
  auto rnorm = at::empty({B}, b.options());
  const int nthreads = at::get_num_threads();
  const bool inner = split_rows(B, nthreads, op_bytes);
  const int64_t workers = inner ? 1 : std::min<int64_t>(B, nthreads);
  auto work = at::empty({workers, 3, P}, b.options());
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "cg_solve_cpu", [&] {
    const auto* bp = b.data_ptr<scalar_t>();
    auto* xp = x.data_ptr<scalar_t>();
    auto* wp = work.data_ptr<scalar_t>();
    auto* ip = iters.data_ptr<int32_t>();
    auto* sp = status.data_ptr<int32_t>();
    auto* np = rnorm.data_ptr<scalar_t>();
    auto one = [&](int64_t sys, int64_t worker) {
      scalar_t* w = wp + worker * 3 * P;
      auto op = make_op(scalar_t(0), sys, worker, inner);
      solve_one<scalar_t>(op, bp + sys * P, xp + sys * P, w, w + P, w + 2 * P, P, max_iter, rtol,
                          atol, ip + sys, np + sys, sp + sys, inner);
    };
    if (inner) {
      for (int64_t sys = 0; sys < B; ++sys) one(sys, 0);
    } else {
      at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t sys = lo; sys < hi; ++sys) one(sys, at::get_thread_num());
      });
    }
  });
  return {x, iters, rnorm, status};
}

}  // namespace cpu
}  // namespace imaml_ext

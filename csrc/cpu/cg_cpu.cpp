// CPU kernels of the CG ops: cg_step (one fused iteration for B systems) and the whole-loop
// solvers cg_solve_dense / cg_solve_lstsq, plus the structured operator lstsq_apply. The
// whole-loop machinery (per-system locality, the operators, solve_one/solve_batch) is in
// solve.h, shared with the softmax-head solver of hvp_cpu.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../cg_math.h"
#include "../ops.h"
#include "simd.h"
#include "solve.h"

namespace imaml_ext {
namespace {

using cpu::DenseOp;
using cpu::LstsqOp;
using cpu::solve_batch;
using cpu::step_one;

void cg_step_cpu(at::Tensor x, at::Tensor r, at::Tensor p, const at::Tensor& Ap_in, at::Tensor rs,
                 const at::Tensor& bnorm2_in, at::Tensor status, at::Tensor iters, double rtol,
                 double atol) {
  check_cg_state("cg_step", x, r, p, Ap_in, rs, bnorm2_in, status, iters, rtol, atol);
  const auto Ap = Ap_in.contiguous();
  const auto bnorm2 = bnorm2_in.contiguous();
  const int64_t B = x.size(0), P = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_cpu", [&] {
    auto* xp = x.data_ptr<scalar_t>();
    auto* rp = r.data_ptr<scalar_t>();
    auto* pp = p.data_ptr<scalar_t>();
    const auto* app = Ap.data_ptr<scalar_t>();
    auto* rsp = rs.data_ptr<scalar_t>();
    const auto* bp = bnorm2.data_ptr<scalar_t>();
    auto* sp = status.data_ptr<int32_t>();
    auto* ip = iters.data_ptr<int32_t>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b)
        step_one(xp + b * P, rp + b * P, pp + b * P, app + b * P, rsp + b,
                 cg_tol2<scalar_t>(bp[b], rtol, atol), sp + b, ip + b, P);
    });
  });
}

SolveResult cg_solve_dense_cpu(const at::Tensor& A_in, const at::Tensor& b, const at::Tensor& x0,
                               int64_t max_iter, double rtol, double atol) {
  check_solve_args("cg_solve_dense", b, x0, max_iter, rtol, atol);
  TORCH_CHECK_VALUE(A_in.dim() == 3 && A_in.size(0) == b.size(0) && A_in.size(1) == b.size(1) &&
                  A_in.size(2) == b.size(1),
              "cg_solve_dense: A must be (", b.size(0), ", ", b.size(1), ", ", b.size(1),
              ") to match b ", b.sizes(), ", got ", A_in.sizes());
  TORCH_CHECK_VALUE(A_in.scalar_type() == b.scalar_type() && A_in.device() == b.device(),
              "cg_solve_dense: A must have b's dtype and device (", b.scalar_type(), ", ",
              b.device(), "), got ", A_in.scalar_type(), ", ", A_in.device());
  const auto A = A_in.contiguous();
  const int64_t P = b.size(1);
  return solve_batch(b, x0, max_iter, rtol, atol, P * P * A.element_size(),
                     [&](auto zero, int64_t sys, int64_t, bool) {
                       using scalar_t = decltype(zero);
                       return DenseOp<scalar_t>{A.data_ptr<scalar_t>() + sys * P * P, P};
                     });
}

SolveResult cg_solve_lstsq_cpu(const at::Tensor& X_in, const at::Tensor& b, const at::Tensor& x0,
                               double shift, double scale, int64_t max_iter, double rtol,
                               double atol) {
  check_solve_args("cg_solve_lstsq", b, x0, max_iter, rtol, atol);
  check_lstsq_operator("cg_solve_lstsq", X_in, b, shift, scale);
  const auto X = X_in.contiguous();
  const int64_t n = X.size(1), d = X.size(2);
  const int nthreads = at::get_num_threads();
  // One X^T X v accumulator per thread (used whole when rows are split over threads).
  auto scratch = at::empty({nthreads, d}, b.options());
  return solve_batch(b, x0, max_iter, rtol, atol, n * d * X.element_size(),
                     [&](auto zero, int64_t sys, int64_t worker, bool inner) {
                       using scalar_t = decltype(zero);
                       auto* acc = scratch.data_ptr<scalar_t>() + (inner ? 0 : worker * d);
                       return LstsqOp<scalar_t>{X.data_ptr<scalar_t>() + sys * n * d, n, d, shift,
                                                scale, acc, inner ? nthreads : 1};
                     });
}

at::Tensor lstsq_apply_cpu(const at::Tensor& X_in, const at::Tensor& v_in, double shift,
                           double scale) {
  check_lstsq_operator("lstsq_apply", X_in, v_in, shift, scale);
  const auto X = X_in.contiguous();
  const auto v = v_in.contiguous();
  const int64_t B = X.size(0), n = X.size(1), d = X.size(2);
  auto out = at::empty_like(v);
  const int nthreads = at::get_num_threads();
  const bool inner = B < nthreads;  // one pass over X: no reuse for split_rows to keep in L2
  auto scratch = at::empty({nthreads, d}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "lstsq_apply_cpu", [&] {
    auto* sc = scratch.data_ptr<scalar_t>();
    auto one = [&](int64_t sys, int64_t worker) {
      LstsqOp<scalar_t> op{X.data_ptr<scalar_t>() + sys * n * d, n, d, shift, scale,
                           sc + (inner ? 0 : worker * d), inner ? nthreads : 1};
      op.apply(v.data_ptr<scalar_t>() + sys * d, out.data_ptr<scalar_t>() + sys * d, inner);
    };
    if (inner) {
      for (int64_t sys = 0; sys < B; ++sys) one(sys, 0);
    } else {
      at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t sys = lo; sys < hi; ++sys) one(sys, at::get_thread_num());
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CPU, m) {
  m.impl("cg_step", &cg_step_cpu);
  m.impl("cg_solve_dense", &cg_solve_dense_cpu);
  m.impl("cg_solve_lstsq", &cg_solve_lstsq_cpu);
  m.impl("lstsq_apply", &lstsq_apply_cpu);
}

}  // namespace imaml_ext

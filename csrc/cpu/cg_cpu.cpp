// CPU kernels of the CG ops: cg_step (one fused iteration for B systems), cg_begin / cg_end (a
// step-by-step solve's set-up and finish), the whole-loop solvers cg_solve_dense /
// cg_solve_lstsq, and the structured operator lstsq_apply. The whole-loop machinery (per-system
// locality, the operators, solve_one/solve_batch) is in solve.h, shared with the softmax-head
// solver of hvp_cpu.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
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
                 double atol, double shift, double scale) {
  check_cg_state("cg_step", x, r, p, Ap_in, rs, bnorm2_in, status, iters, rtol, atol);
  check_affine("cg_step", shift, scale);
  const auto Ap = Ap_in.contiguous();
  const auto bnorm2 = bnorm2_in.contiguous();
  const int64_t B = x.size(0), P = x.size(1);
  const bool affine = !(shift == 0.0 && scale == 1.0);
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
      // The affine operator's A p = shift p + scale Ap, one system at a time (cg_math.h
      // cg_affine), in a buffer that stays in cache for the step's two passes.
      std::vector<scalar_t> eff(affine ? P : 0);
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t* ap = app + b * P;
        if (affine && sp[b] == kRunning) {
          simd::combine(eff.data(), pp + b * P, ap, shift, scale, P);
          ap = eff.data();
        }
        step_one(xp + b * P, rp + b * P, pp + b * P, ap, rsp + b,
                 cg_tol2<scalar_t>(bp[b], rtol, atol), sp + b, ip + b, P);
      }
    });
  });
}

// cg_begin (csrc/module.cpp): the state of B solves from x0 = 0, each system by itself.
BeginResult cg_begin_cpu(const at::Tensor& b_in, double rtol, double atol, bool rescale) {
  check_cg_begin("cg_begin", b_in, rtol, atol, rescale);
  const auto b = b_in.contiguous();
  const int64_t B = b.size(0), P = b.size(1);
  auto out = empty_cg_begin(b);
  // (named references, not a structured binding: the kernels' lambdas capture them)
  at::Tensor &x = std::get<0>(out), &r = std::get<1>(out), &p = std::get<2>(out);
  at::Tensor &rs = std::get<3>(out), &bnorm2 = std::get<4>(out), &status = std::get<5>(out);
  at::Tensor &iters = std::get<6>(out), &s = std::get<7>(out);
  x.zero_();
  iters.zero_();
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "cg_begin_cpu", [&] {
    const auto* bp = b.data_ptr<scalar_t>();
    auto* rp = r.data_ptr<scalar_t>();
    auto* pp = p.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t sys = lo; sys < hi; ++sys) {
        const scalar_t* bs = bp + sys * P;
        scalar_t amax = 0;
        for (int64_t i = 0; i < P && rescale; ++i) {
          const scalar_t a = std::abs(bs[i]);
          amax = cg_isfinite(a) ? std::max(amax, a) : std::numeric_limits<scalar_t>::infinity();
        }
        const scalar_t sc = rescale ? cg_rhs_scale<scalar_t>(amax) : scalar_t(1);
        scalar_t* rsys = rp + sys * P;
        for (int64_t i = 0; i < P; ++i) rsys[i] = bs[i] / sc;
        std::copy(rsys, rsys + P, pp + sys * P);
        const scalar_t rr = simd::dot(rsys, rsys, P);
        rs.data_ptr<scalar_t>()[sys] = rr;
        bnorm2.data_ptr<scalar_t>()[sys] = rr;
        status.data_ptr<int32_t>()[sys] = cg_initial_status<scalar_t>(rr, cg_tol2<scalar_t>(rr, rtol, atol));
        s.data_ptr<scalar_t>()[sys] = sc;
      }
    });
  });
  return out;
}

// cg_end (csrc/module.cpp): x s, sqrt(rs) s, and the fallback rows.
std::tuple<at::Tensor, at::Tensor> cg_end_cpu(const at::Tensor& x_in, const at::Tensor& rs_in,
                                              const at::Tensor& status_in,
                                              const at::Tensor& iters_in,
                                              const at::Tensor& scale_in,
                                              const std::optional<at::Tensor>& fallback_in) {
  const EndArgs args = prepare_cg_end(x_in, rs_in, status_in, iters_in, scale_in, fallback_in);
  const at::Tensor &x = args.x, &rs = args.rs, &status = args.status, &iters = args.iters;
  const at::Tensor &sc = args.scale, &fallback = args.fallback;
  const int64_t B = x.size(0), P = x.size(1);
  auto out = at::empty_like(x);
  auto rnorm = at::empty_like(rs);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_end_cpu", [&] {
    const auto* xp = x.data_ptr<scalar_t>();
    const auto* fp = fallback.defined() ? fallback.data_ptr<scalar_t>() : nullptr;
    auto* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t sys = lo; sys < hi; ++sys) {
        const scalar_t s = sc.data_ptr<scalar_t>()[sys];
        rnorm.data_ptr<scalar_t>()[sys] = std::sqrt(rs.data_ptr<scalar_t>()[sys]) * s;
        const bool fall = fp != nullptr && status.data_ptr<int32_t>()[sys] == kNegativeCurvature &&
                          iters.data_ptr<int32_t>()[sys] == 0;
        if (fall) {
          std::copy(fp + sys * P, fp + (sys + 1) * P, op + sys * P);
        } else {
          for (int64_t i = 0; i < P; ++i) op[sys * P + i] = xp[sys * P + i] * s;
        }
      }
    });
  });
  return {out, rnorm};
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
  check_lstsq_operator("cg_solve_lstsq", X_in, b, "b", shift, scale);
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
  check_lstsq_operator("lstsq_apply", X_in, v_in, "v", shift, scale);
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
  m.impl("cg_begin", &cg_begin_cpu);
  m.impl("cg_end", &cg_end_cpu);
  m.impl("cg_solve_dense", &cg_solve_dense_cpu);
  m.impl("cg_solve_lstsq", &cg_solve_lstsq_cpu);
  m.impl("lstsq_apply", &lstsq_apply_cpu);
}

}  // namespace imaml_ext

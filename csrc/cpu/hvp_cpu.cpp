// CPU kernels of the softmax-head ops (schemas in csrc/module.cpp, arithmetic in
// csrc/hvp_math.h): softmax_head_hvp (the fused Hessian-vector product) and
// cg_solve_softmax_head (the whole-loop CG of solve.h on that operator).
//
// Threads: systems go to threads through at::parallel_for, each system's samples processed by
// one thread with the system's data in its cache (solve.h explains why). With fewer systems
// than threads, systems run in turn and their samples are split over the threads, each thread
// summing into its own accumulator; the accumulators are added in thread order afterwards.
//
// Probabilities: the standalone HVP recomputes p_i = softmax(W f_i + bias) on its single pass
// over F (computing the logits shares every load of f_i with z_i = V f_i + vb, so that is one
// pass over F, and no (B, n, c) buffer is written), except for short features and many classes,
// where the scalar exps dominate and torch's vectorised softmax fills a buffer first. The solver computes them once per system
// before its first iteration into an (n, c) buffer, since W and bias do not change across
// iterations: that halves the dot products of every later product for a buffer that is c/f of
// F's size.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>

#include "../cg_math.h"
#include "../hvp_math.h"
#include "../ops.h"
#include "simd.h"
#include "solve.h"

namespace imaml_ext {
namespace {

// Samples per parallel_for task when one system's samples are split over the threads.
constexpr int64_t kSampleGrain = 4;

// Accumulates H-products of one system into acc = [accW (c*f), accb (c), work]; with
// `parallel`, the samples are split over `nthreads` accumulators of `stride` entries, which are
// summed into the first. probs may be null (computed from W, bias on the same pass).
template <typename scalar_t>
void accumulate_system(const scalar_t* F, int64_t n, int64_t f, int64_t c, const scalar_t* W,
                       const scalar_t* bias, const scalar_t* probs, const scalar_t* V,
                       const scalar_t* vb, scalar_t* acc, int64_t stride, int nthreads,
                       bool parallel) {
  const int64_t P = c * (f + 1);
  if (!parallel || nthreads == 1) {
    std::fill(acc, acc + P, scalar_t(0));
    simd::softmax_head_rows(F, f, c, 0, n, W, bias, probs, V, vb, acc, acc + c * f, acc + P);
    return;
  }
  for (int t = 0; t < nthreads; ++t) std::fill(acc + t * stride, acc + t * stride + P, scalar_t(0));
  at::parallel_for(0, n, kSampleGrain, [&](int64_t lo, int64_t hi) {
    scalar_t* a = acc + at::get_thread_num() * stride;
    simd::softmax_head_rows(F, f, c, lo, hi, W, bias, probs, V, vb, a, a + c * f, a + P);
  });
  for (int t = 1; t < nthreads; ++t) simd::axpy(acc, scalar_t(1), acc + t * stride, P);
}

// The operator of one system over the flat layout [W row-major (c*f), bias (c)].
template <typename scalar_t>
struct SoftmaxHeadOp {
  const scalar_t* F;      // (n, f) of this system
  const scalar_t* probs;  // (n, c) of this system, computed before the first product
  int64_t n, f, c;
  double shift, factor;  // factor = scale / n
  scalar_t* acc;         // nthreads accumulators of `stride` entries (one when not parallel)
  int64_t stride;
  int nthreads;
  void apply(const scalar_t* v, scalar_t* out, bool parallel) const {
    accumulate_system(F, n, f, c, static_cast<const scalar_t*>(nullptr),
                      static_cast<const scalar_t*>(nullptr), probs, v, v + c * f, acc, stride,
                      nthreads, parallel);
    simd::combine(out, v, acc, shift, factor, c * (f + 1));
  }
};

// Rows of a system's p_i = softmax(W f_i + bias), split over the threads when `parallel`.
template <typename scalar_t>
void system_probs(const scalar_t* F, int64_t n, int64_t f, int64_t c, const scalar_t* W,
                  const scalar_t* bias, scalar_t* probs, bool parallel) {
  if (parallel) {
    at::parallel_for(0, n, kSampleGrain, [&](int64_t lo, int64_t hi) {
      simd::softmax_head_probs(F, f, c, lo, hi, W, bias, probs);
    });
  } else {
    simd::softmax_head_probs(F, f, c, 0, n, W, bias, probs);
  }
}

std::tuple<at::Tensor, at::Tensor> softmax_head_hvp_cpu(const at::Tensor& F_in,
                                                        const at::Tensor& W_in,
                                                        const at::Tensor& bias_in,
                                                        const at::Tensor& V_in,
                                                        const at::Tensor& vb_in, double shift,
                                                        double scale) {
  check_softmax_head("softmax_head_hvp", F_in, W_in, bias_in, shift, scale);
  check_softmax_head_direction("softmax_head_hvp", W_in, bias_in, V_in, vb_in);
  const auto F = F_in.contiguous();
  const auto W = W_in.contiguous();
  const auto bias = bias_in.contiguous();
  const auto V = V_in.contiguous();
  const auto vb = vb_in.contiguous();
  const int64_t B = F.size(0), n = F.size(1), f = F.size(2), c = W.size(1);
  auto outW = at::empty(V.sizes(), V.options());
  auto outb = at::empty(vb.sizes(), vb.options());
  const int nthreads = at::get_num_threads();
  const bool inner = B < nthreads;
  const int64_t stride = c * (f + 1) + simd::softmax_head_work(f, c);
  auto scratch = at::empty({nthreads, stride}, F.options());
  const double factor = softmax_head_factor(scale, n);
  // Short features and many classes (f < 8c, e.g. the 20-way head, f = 64, c = 20): the c
  // scalar exps per sample cost more than its products, so the probabilities come first from
  // torch's vectorised softmax, one (B, n, c) buffer, instead of on the pass over F.
  at::Tensor probs;
  if (n > 0 && f < 8 * c) {
    probs = at::softmax(at::baddbmm(bias.unsqueeze(1), F, W.transpose(1, 2)), -1).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "softmax_head_hvp_cpu", [&] {
    const auto* Fp = F.data_ptr<scalar_t>();
    const auto* Wp = W.data_ptr<scalar_t>();
    const auto* bp = bias.data_ptr<scalar_t>();
    const auto* Vp = V.data_ptr<scalar_t>();
    const auto* vbp = vb.data_ptr<scalar_t>();
    auto* oW = outW.data_ptr<scalar_t>();
    auto* ob = outb.data_ptr<scalar_t>();
    auto* sc = scratch.data_ptr<scalar_t>();
    auto one = [&](int64_t sys, int64_t worker) {
      scalar_t* acc = sc + (inner ? 0 : worker * stride);
      const scalar_t* pr =
          probs.defined() ? probs.data_ptr<scalar_t>() + sys * n * c : nullptr;
      accumulate_system(Fp + sys * n * f, n, f, c, Wp + sys * c * f, bp + sys * c, pr,
                        Vp + sys * c * f, vbp + sys * c, acc, stride, inner ? nthreads : 1,
                        inner);
      simd::combine(oW + sys * c * f, Vp + sys * c * f, acc, shift, factor, c * f);
      simd::combine(ob + sys * c, vbp + sys * c, acc + c * f, shift, factor, c);
    };
    if (inner) {
      for (int64_t sys = 0; sys < B; ++sys) one(sys, 0);
    } else {
      at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t sys = lo; sys < hi; ++sys) one(sys, at::get_thread_num());
      });
    }
  });
  return {outW, outb};
}

SolveResult cg_solve_softmax_head_cpu(const at::Tensor& F_in, const at::Tensor& W_in,
                                      const at::Tensor& bias_in, const at::Tensor& b,
                                      const at::Tensor& x0, double shift, double scale,
                                      int64_t max_iter, double rtol, double atol) {
  const char* op = "cg_solve_softmax_head";
  check_solve_args(op, b, x0, max_iter, rtol, atol);
  check_softmax_head(op, F_in, W_in, bias_in, shift, scale);
  check_softmax_head_flat(op, "b", W_in, b);
  const auto F = F_in.contiguous();
  const auto W = W_in.contiguous();
  const auto bias = bias_in.contiguous();
  const int64_t n = F.size(1), f = F.size(2), c = W.size(1);
  const int nthreads = at::get_num_threads();
  const int64_t stride = c * (f + 1) + simd::softmax_head_work(f, c);
  // One accumulator per thread (all of them for one system when samples are split over
  // threads), and one probability buffer per worker.
  auto scratch = at::empty({nthreads, stride}, b.options());
  auto probs = at::empty({nthreads, n * c}, b.options());
  const double factor = softmax_head_factor(scale, n);
  const int64_t op_bytes = n * (f + c) * F.element_size();  // F and the probabilities
  return cpu::solve_batch(
      b, x0, max_iter, rtol, atol, op_bytes, [&](auto zero, int64_t sys, int64_t worker, bool inner) {
        using scalar_t = decltype(zero);
        const scalar_t* Fs = F.data_ptr<scalar_t>() + sys * n * f;
        scalar_t* pr = probs.data_ptr<scalar_t>() + (inner ? 0 : worker * n * c);
        system_probs(Fs, n, f, c, W.data_ptr<scalar_t>() + sys * c * f,
                     bias.data_ptr<scalar_t>() + sys * c, pr, inner);
        scalar_t* acc = scratch.data_ptr<scalar_t>() + (inner ? 0 : worker * stride);
        return SoftmaxHeadOp<scalar_t>{Fs, pr,     n,   f,      c,
                                       shift, factor, acc, stride, inner ? nthreads : 1};
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CPU, m) {
  m.impl("softmax_head_hvp", &softmax_head_hvp_cpu);
  m.impl("cg_solve_softmax_head", &cg_solve_softmax_head_cpu);
}

}  // namespace imaml_ext

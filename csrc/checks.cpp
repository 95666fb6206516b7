// Argument checks shared by every backend of the CG ops. Messages name the op, the argument,
// what was expected and what came, so Python users see the same text from CPU and CUDA.
#include "ops.h"

#include <cmath>

namespace imaml_ext {
namespace {

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

void check_same(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " like ",
              ref_name, ", got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ",
              ref.scalar_type(), " like ", ref_name, ", got ", t.scalar_type());
}

void check_tolerances(const char* op, double rtol, double atol) {
  TORCH_CHECK_VALUE(std::isfinite(rtol) && rtol >= 0, op, ": rtol must be finite and >= 0, got ", rtol);
  TORCH_CHECK_VALUE(std::isfinite(atol) && atol >= 0, op, ": atol must be finite and >= 0, got ", atol);
}

}  // namespace

void check_cg_state(const char* op, const at::Tensor& x, const at::Tensor& r, const at::Tensor& p,
                    const at::Tensor& Ap, const at::Tensor& rs, const at::Tensor& bnorm2,
                    const at::Tensor& status, const at::Tensor& iters, double rtol, double atol) {
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be (B, P), got ", x.sizes());
  const auto B = x.size(0);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"r", r}, {"p", p}, {"Ap", Ap}}) {
    check_same(op, name, t, "x", x);
    TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " must be ", x.sizes(), " like x, got ",
                t.sizes());
  }
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"rs", rs}, {"bnorm2", bnorm2}}) {
    check_same(op, name, t, "x", x);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, op, ": ", name, " must be (", B, ",), got ",
                t.sizes());
  }
  for (auto [name, t] :
       {std::pair<const char*, const at::Tensor&>{"status", status}, {"iters", iters}}) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
                t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ",
                t.device());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, op, ": ", name, " must be (", B, ",), got ",
                t.sizes());
  }
  // The mutated buffers are written in place, so they cannot be silently copied.
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"x", x}, {"r", r}, {"p", p},
                         {"rs", rs}, {"status", status}, {"iters", iters}}) {
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " is written in place and must be contiguous");
  }
  check_tolerances(op, rtol, atol);
}

void check_solve_args(const char* op, const at::Tensor& b, const at::Tensor& x0, int64_t max_iter,
                      double rtol, double atol) {
  check_float(op, "b", b);
  TORCH_CHECK_VALUE(b.dim() == 2, op, ": b must be (B, P), got ", b.sizes());
  check_same(op, "x0", x0, "b", b);
  TORCH_CHECK_VALUE(x0.sizes() == b.sizes(), op, ": x0 must be ", b.sizes(), " like b, got ",
              x0.sizes());
  TORCH_CHECK_VALUE(max_iter >= 1, op, ": max_iter must be >= 1, got ", max_iter);
  check_tolerances(op, rtol, atol);
}

void check_lstsq_operator(const char* op, const at::Tensor& X, const at::Tensor& v, double shift,
                          double scale) {
  check_float(op, "X", X);
  TORCH_CHECK_VALUE(X.dim() == 3, op, ": X must be (B, n, d), got ", X.sizes());
  check_same(op, "X", X, "b", v);
  TORCH_CHECK_VALUE(v.dim() == 2 && v.size(0) == X.size(0) && v.size(1) == X.size(2), op,
              ": the vector must be (", X.size(0), ", ", X.size(2), ") to match X ", X.sizes(),
              ", got ", v.sizes());
  TORCH_CHECK_VALUE(std::isfinite(shift) && std::isfinite(scale), op,
              ": shift and scale must be finite, got ", shift, " and ", scale);
}

void check_softmax_head(const char* op, const at::Tensor& F, const at::Tensor& W,
                        const at::Tensor& bias, double shift, double scale) {
  check_float(op, "F", F);
  TORCH_CHECK_VALUE(F.dim() == 3, op, ": F must be (B, n, f), got ", F.sizes());
  const auto B = F.size(0), f = F.size(2);
  check_same(op, "W", W, "F", F);
  TORCH_CHECK_VALUE(W.dim() == 3 && W.size(0) == B && W.size(2) == f, op, ": W must be (", B,
                    ", c, ", f, ") to match F ", F.sizes(), ", got ", W.sizes());
  check_same(op, "bias", bias, "F", F);
  TORCH_CHECK_VALUE(bias.dim() == 2 && bias.size(0) == B && bias.size(1) == W.size(1), op,
                    ": bias must be (", B, ", ", W.size(1), ") to match W ", W.sizes(), ", got ",
                    bias.sizes());
  TORCH_CHECK_VALUE(std::isfinite(shift) && std::isfinite(scale), op,
                    ": shift and scale must be finite, got ", shift, " and ", scale);
}

void check_softmax_head_direction(const char* op, const at::Tensor& W, const at::Tensor& bias,
                                  const at::Tensor& V, const at::Tensor& vb) {
  check_same(op, "V", V, "W", W);
  TORCH_CHECK_VALUE(V.sizes() == W.sizes(), op, ": V must be ", W.sizes(), " like W, got ",
                    V.sizes());
  check_same(op, "vb", vb, "bias", bias);
  TORCH_CHECK_VALUE(vb.sizes() == bias.sizes(), op, ": vb must be ", bias.sizes(),
                    " like bias, got ", vb.sizes());
}

void check_softmax_head_flat(const char* op, const char* name, const at::Tensor& W,
                             const at::Tensor& v) {
  check_same(op, name, v, "W", W);
  const auto B = W.size(0), c = W.size(1), f = W.size(2);
  TORCH_CHECK_VALUE(v.dim() == 2 && v.size(0) == B && v.size(1) == c * (f + 1), op, ": ", name,
                    " must be (", B, ", ", c * (f + 1), ") = (B, c*(f+1)) for W ", W.sizes(),
                    " (layout: W row-major, then bias), got ", v.sizes());
}

}  // namespace imaml_ext

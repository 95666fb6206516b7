// Host declarations shared by csrc/cpu/ and csrc/cuda/, and the argument checks every backend
// runs before launching (so a CPU and a CUDA call fail with the same message).
#pragma once

#include <torch/types.h>

#include <tuple>

namespace imaml_ext {

// The common shape/dtype/device checks of the CG ops; `op` names the op in every message.
void check_cg_state(const char* op, const at::Tensor& x, const at::Tensor& r, const at::Tensor& p,
                    const at::Tensor& Ap, const at::Tensor& rs, const at::Tensor& bnorm2,
                    const at::Tensor& status, const at::Tensor& iters, double rtol, double atol);

void check_solve_args(const char* op, const at::Tensor& b, const at::Tensor& x0,
                      int64_t max_iter, double rtol, double atol);

void check_lstsq_operator(const char* op, const at::Tensor& X, const at::Tensor& v, double shift,
                          double scale);

// The softmax-head operator (csrc/hvp_math.h): F (B, n, f), W (B, c, f), bias (B, c), all of one
// float dtype and device; shift and scale finite.
void check_softmax_head(const char* op, const at::Tensor& F, const at::Tensor& W,
                        const at::Tensor& bias, double shift, double scale);

// A direction of the softmax head as two tensors: V (B, c, f) like W, vb (B, c) like bias.
void check_softmax_head_direction(const char* op, const at::Tensor& W, const at::Tensor& bias,
                                  const at::Tensor& V, const at::Tensor& vb);

// A flat vector of the softmax head: `name` (B, c*(f+1)), layout [W row-major, then bias].
void check_softmax_head_flat(const char* op, const char* name, const at::Tensor& W,
                             const at::Tensor& v);

using SolveResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace imaml_ext

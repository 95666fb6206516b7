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

using SolveResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace imaml_ext

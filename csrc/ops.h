// Host declarations shared by csrc/cpu/ and csrc/cuda/, and the argument checks every backend
// runs before launching (so a CPU and a CUDA call fail with the same message).
#pragma once

#include <torch/types.h>

#include "pooled_bn_math.h"

#include <optional>
#include <tuple>

namespace imaml_ext {

// The common shape/dtype/device checks of the CG ops; `op` names the op in every message.
void check_cg_state(const char* op, const at::Tensor& x, const at::Tensor& r, const at::Tensor& p,
                    const at::Tensor& Ap, const at::Tensor& rs, const at::Tensor& bnorm2,
                    const at::Tensor& status, const at::Tensor& iters, double rtol, double atol);

// cg_step's affine operator: shift and scale finite.
void check_affine(const char* op, double shift, double scale);

// cg_begin: b (B, P) float32/float64; tolerances finite and >= 0.
void check_cg_begin(const char* op, const at::Tensor& b, double rtol, double atol, bool rescale);

// cg_end: x (B, P) float; rs, scale (B,) like x; status, iters (B,) int32 on x's device; fallback
// absent or like x.
void check_cg_end(const char* op, const at::Tensor& x, const at::Tensor& rs,
                  const at::Tensor& status, const at::Tensor& iters, const at::Tensor& scale,
                  const std::optional<at::Tensor>& fallback);

void check_solve_args(const char* op, const at::Tensor& b, const at::Tensor& x0,
                      int64_t max_iter, double rtol, double atol);

// v_name: "b" for a solve (X is then checked against b), "v" for a product (v against X).
void check_lstsq_operator(const char* op, const at::Tensor& X, const at::Tensor& v,
                          const char* v_name, double shift, double scale);

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

// The pooled batch-norm block's derivative ops (csrc/pooled_bn_math.h), their argument checks
// and outputs, shared by the CPU and CUDA kernels: h 4-d float, dense NCHW or channels-last
// (NCHW when both); the pooling geometry with disjoint windows; idx int64 of the pooled shape;
// every pooled-size tensor in h's pooled shape, dtype, device and layout, ch in h's; every
// per-channel one (C,) contiguous; coef (6, 5, C). Outputs are allocated in h's layout.
struct PooledBnForward {
  PooledBnGeometry g;
  int64_t H, W, Wo, kH, kW, sH, sW;
  at::Tensor y, xhat, idx, mean, r, rw, kb, kg;
};
PooledBnForward pooled_bn_forward_setup(const at::Tensor& h, const at::Tensor& weight,
                                        const at::Tensor& bias, double eps,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride);

struct PooledBnBackward {
  PooledBnGeometry g;
  at::Tensor gh, gw, gb, gu;
};
PooledBnBackward pooled_bn_backward_setup(
    const at::Tensor& gy, const at::Tensor& y, const at::Tensor& xhat, const at::Tensor& h,
    const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& rw, const at::Tensor& kb,
    const at::Tensor& kg, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode);

struct PooledBnDouble {
  PooledBnGeometry g;
  at::Tensor ch, cw, cb, gu, h, xhat, idx, mean, y, rw, coef, a2;  // ch, cw, cb may be undefined
  at::Tensor d_gy, d_h, d_w;  // d_gy / d_h empty unless needed
  bool need_gy, need_h;

  template <typename T>
  PooledBnDoubleArgs<T> args() const {
    auto in = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; };
    return {in(ch), in(cw), in(cb), in(gu), in(h), in(xhat), idx.const_data_ptr<int64_t>(),
            in(mean), in(y), in(rw), in(coef), in(a2),
            need_gy ? d_gy.data_ptr<T>() : nullptr, need_h ? d_h.data_ptr<T>() : nullptr,
            d_w.data_ptr<T>()};
  }
};
PooledBnDouble pooled_bn_double_backward_setup(
    const std::optional<at::Tensor>& ch, const std::optional<at::Tensor>& cw,
    const std::optional<at::Tensor>& cb, const at::Tensor& gu, const at::Tensor& h,
    const at::Tensor& xhat, const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& y,
    const at::Tensor& rw, const at::Tensor& coef, const at::Tensor& a2,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool ceil_mode, bool need_gy, bool need_h);

// pooled_bn_coefficients' checks: every argument a contiguous (C,) float tensor, one dtype and
// device; n >= 1. Returns C.
int64_t check_pooled_bn_coefficients(const at::Tensor& r, const at::Tensor& w,
                                     const at::Tensor& rw, const at::Tensor& kb,
                                     const at::Tensor& kg, const at::Tensor& gb,
                                     const at::Tensor& gw, int64_t n);

using SolveResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// cg_begin's outputs (x, r, p, rs, bnorm2, status, iters, s), allocated like b (B, P), unfilled.
using BeginResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor>;
BeginResult empty_cg_begin(const at::Tensor& b);

// cg_end's arguments after check_cg_end, contiguous; fallback undefined when absent.
struct EndArgs {
  at::Tensor x, rs, status, iters, scale, fallback;
};
EndArgs prepare_cg_end(const at::Tensor& x, const at::Tensor& rs, const at::Tensor& status,
                       const at::Tensor& iters, const at::Tensor& scale,
                       const std::optional<at::Tensor>& fallback);

}  // namespace imaml_ext

// CUDA kernels of the pooled batch-norm block's two derivatives (schemas in csrc/module.cpp,
// arithmetic in csrc/pooled_bn_math.h, CPU twins in csrc/cpu/pooled_bn_cpu.cpp, which has the
// formulas; pure-PyTorch twins imaml_ext.reference.pooled_bn_backward / _double_backward).
//
// One block per channel, each derivative one launch (the reference's ATen ops are 13 and 19
// launches per block of the conv net). A block sums its channel's pooled-size (and map) terms
// with block_sum, takes the per-channel factors, writes the dense part of the map gradient,
// then (after a barrier: the same block wrote those values) adds the scatter to the arg-max
// positions; the windows are disjoint (checked on the host), so no two threads add to one
// position. Maps are NCHW or channels-last (PooledBnGeometry: NCHW reads are coalesced,
// channels-last ones strided by C). Out-of-range arg-max indices are skipped (they come from
// max_pool2d; the CPU kernel raises on them).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#include <torch/types.h>

#include <optional>

#include "../ops.h"
#include "../pooled_bn_math.h"
#include "common.cuh"

namespace imaml_ext {
namespace {

using cuda::block_sum;
using cuda::kBlockSize;

// The forward, one block per channel: mean and variance (two passes, block_sum), the factors
// (thread 0), then each window's arg-max, xhat and y.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kBlockSize)
    pooled_bn_forward_kernel(PooledBnGeometry g, int64_t W, int64_t Wo, int64_t kH, int64_t kW,
                             int64_t sH, int64_t sW, const T* __restrict__ h,
                             const T* __restrict__ w, const T* __restrict__ b, double eps,
                             bool flip, T* __restrict__ y, T* __restrict__ xhat,
                             int64_t* __restrict__ idx, T* __restrict__ mean, T* __restrict__ r,
                             T* __restrict__ rw, T* __restrict__ kb, T* __restrict__ kg) {
  const int64_t c = blockIdx.x;
  const int64_t NP = g.N * g.P, NPo = g.N * g.Po;
  acc_t s1 = 0;
  for (int64_t i = threadIdx.x; i < NP; i += kBlockSize)
    s1 += static_cast<acc_t>(h[g.map(i / g.P, c, i % g.P)]);
  const acc_t mu = block_sum(s1) / static_cast<acc_t>(NP);
  acc_t s2 = 0;
  for (int64_t i = threadIdx.x; i < NP; i += kBlockSize) {
    const acc_t d = static_cast<acc_t>(h[g.map(i / g.P, c, i % g.P)]) - mu;
    s2 += d * d;
  }
  const acc_t var = block_sum(s2) / static_cast<acc_t>(NP);
  const T m = static_cast<T>(mu);
  const T rc = T(1) / sqrt(static_cast<T>(var) + static_cast<T>(eps));
  const T wc = w[c], bc = b[c];
  if (threadIdx.x == 0) {
    mean[c] = m;
    r[c] = rc;
    const T rwc = rc * wc, kbc = rwc / -static_cast<T>(NP);
    rw[c] = rwc;
    kb[c] = kbc;
    kg[c] = kbc * rc;
  }
  const T s = flip && wc < T(0) ? T(-1) : T(1);
  const int64_t step = g.channels_last ? g.C : 1;
  for (int64_t i = threadIdx.x; i < NPo; i += kBlockSize) {
    const int64_t n = i / g.Po, q = i % g.Po;
    const T* hp = h + g.map(n, c, 0);
    const int64_t at = pooled_argmax(hp, step, W, q / Wo, q % Wo, kH, kW, sH, sW, s);
    const int64_t o = g.pooled(n, c, q);
    const T x = (hp[at * step] - m) * rc;
    idx[o] = at;
    xhat[o] = x;
    y[o] = pooled_bn_out(x, wc, bc);
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kBlockSize)
    pooled_bn_backward_kernel(PooledBnGeometry g, const T* __restrict__ gy,
                              const T* __restrict__ y, const T* __restrict__ xhat,
                              const T* __restrict__ h, const int64_t* __restrict__ idx,
                              const T* __restrict__ mean, const T* __restrict__ rw,
                              const T* __restrict__ kb, const T* __restrict__ kg, T* gh,
                              T* __restrict__ gw, T* __restrict__ gb, T* gu) {
  const int64_t c = blockIdx.x;
  const int64_t NPo = g.N * g.Po, NP = g.N * g.P;
  acc_t sb = 0, sw = 0;
  for (int64_t i = threadIdx.x; i < NPo; i += kBlockSize) {
    const int64_t o = g.pooled(i / g.Po, c, i % g.Po);
    const T u = relu_pass(gy[o], y[o]);
    gu[o] = u;
    sb += static_cast<acc_t>(u);
    sw += static_cast<acc_t>(u) * static_cast<acc_t>(xhat[o]);
  }
  sb = block_sum(sb);
  sw = block_sum(sw);
  const T gbc = static_cast<T>(sb), gwc = static_cast<T>(sw);
  if (threadIdx.x == 0) {
    gb[c] = gbc;
    gw[c] = gwc;
  }
  const T alpha = kb[c] * gbc, beta = kg[c] * gwc, m = mean[c], s = rw[c];
  for (int64_t i = threadIdx.x; i < NP; i += kBlockSize) {
    const int64_t o = g.map(i / g.P, c, i % g.P);
    gh[o] = alpha + beta * (h[o] - m);
  }
  __syncthreads();  // the dense part is written before the scatter adds to it
  for (int64_t i = threadIdx.x; i < NPo; i += kBlockSize) {
    const int64_t n = i / g.Po;
    const int64_t o = g.pooled(n, c, i % g.Po);
    const int64_t p = idx[o];
    if (p >= 0 && p < g.P) gh[g.map(n, c, p)] += s * gu[o];
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kBlockSize)
    pooled_bn_double_backward_kernel(PooledBnGeometry g, PooledBnDoubleArgs<T> a) {
  const int64_t c = blockIdx.x;
  const int64_t NPo = g.N * g.Po, NP = g.N * g.P;
  const T m = a.mean[c];
  acc_t k[5] = {0, 0, 0, a.cw != nullptr ? static_cast<acc_t>(a.cw[c]) : acc_t(0),
                a.cb != nullptr ? static_cast<acc_t>(a.cb[c]) : acc_t(0)};
  if (a.ch != nullptr) {  // the same in every thread: the block_sums below are reached by all
    acc_t k0 = 0, k1 = 0, pc = 0;
    for (int64_t i = threadIdx.x; i < NP; i += kBlockSize) {
      const int64_t o = g.map(i / g.P, c, i % g.P);
      const acc_t v = static_cast<acc_t>(a.ch[o]);
      k0 += v;
      k1 += v * static_cast<acc_t>(a.h[o] - m);
    }
    for (int64_t i = threadIdx.x; i < NPo; i += kBlockSize) {
      const int64_t n = i / g.Po;
      const int64_t o = g.pooled(n, c, i % g.Po);
      const int64_t p = a.idx[o];
      if (p >= 0 && p < g.P)
        pc += static_cast<acc_t>(a.ch[g.map(n, c, p)]) * static_cast<acc_t>(a.gu[o]);
    }
    k[0] = block_sum(k0);
    k[1] = block_sum(k1);
    k[2] = block_sum(pc);
  }
  acc_t f[6];
  pooled_bn_factors<acc_t, T>(a.coef, g.C, c, k, f);
  if (threadIdx.x == 0) a.d_w[c] = static_cast<T>(f[2]);
  const T c0 = static_cast<T>(f[0]), c1 = static_cast<T>(f[1]), a1 = static_cast<T>(f[3]);
  const T a3 = static_cast<T>(f[4]), a4 = static_cast<T>(f[5]), a2 = a.a2[c], r = a.rw[c];
  if (a.d_gy != nullptr) {
    for (int64_t i = threadIdx.x; i < NPo; i += kBlockSize) {
      const int64_t n = i / g.Po;
      const int64_t o = g.pooled(n, c, i % g.Po);
      T t = c0 + c1 * a.xhat[o];
      if (a.ch != nullptr) {
        const int64_t p = a.idx[o];
        if (p >= 0 && p < g.P) t += r * a.ch[g.map(n, c, p)];
      }
      a.d_gy[o] = relu_pass(t, a.y[o]);
    }
  }
  if (a.d_h != nullptr) {  // uniform over the block, so the barrier below is reached by all
    for (int64_t i = threadIdx.x; i < NP; i += kBlockSize) {
      const int64_t o = g.map(i / g.P, c, i % g.P);
      T t = a4 + a3 * (a.h[o] - m);
      if (a.ch != nullptr) t += a2 * a.ch[o];
      a.d_h[o] = t;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < NPo; i += kBlockSize) {
      const int64_t n = i / g.Po;
      const int64_t o = g.pooled(n, c, i % g.Po);
      const int64_t p = a.idx[o];
      if (p >= 0 && p < g.P) a.d_h[g.map(n, c, p)] += a1 * a.gu[o];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockSize)
    pooled_bn_coefficients_kernel(const T* __restrict__ r, const T* __restrict__ w,
                                  const T* __restrict__ rw, const T* __restrict__ kb,
                                  const T* __restrict__ kg, const T* __restrict__ gb,
                                  const T* __restrict__ gw, T n, int64_t C, T* __restrict__ coef,
                                  T* __restrict__ a2) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBlockSize + threadIdx.x;
  if (c < C) pooled_bn_coefficients_at<T>(r[c], w[c], rw[c], kb[c], kg[c], gb[c], gw[c], n, C, c,
                                          coef, a2);
}

std::tuple<at::Tensor, at::Tensor> pooled_bn_coefficients_cuda(
    const at::Tensor& r, const at::Tensor& w, const at::Tensor& rw, const at::Tensor& kb,
    const at::Tensor& kg, const at::Tensor& gb, const at::Tensor& gw, int64_t n) {
  const int64_t C = check_pooled_bn_coefficients(r, w, rw, kb, kg, gb, gw, n);
  c10::cuda::OptionalCUDAGuard guard(r.device());
  at::Tensor coef = at::empty({6, 5, C}, r.options()), a2 = at::empty({C}, r.options());
  if (C == 0) return {coef, a2};
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "pooled_bn_coefficients_cuda", [&] {
    const auto blocks = static_cast<unsigned>((C + kBlockSize - 1) / kBlockSize);
    pooled_bn_coefficients_kernel<scalar_t>
        <<<blocks, kBlockSize, 0, at::cuda::getCurrentCUDAStream()>>>(
            r.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
            rw.const_data_ptr<scalar_t>(), kb.const_data_ptr<scalar_t>(),
            kg.const_data_ptr<scalar_t>(), gb.const_data_ptr<scalar_t>(),
            gw.const_data_ptr<scalar_t>(), static_cast<scalar_t>(n), C,
            coef.data_ptr<scalar_t>(), a2.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {coef, a2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
pooled_bn_forward_cuda(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                       double eps, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       bool flip) {
  c10::cuda::OptionalCUDAGuard guard(h.device());
  PooledBnForward f = pooled_bn_forward_setup(h, weight, bias, eps, kernel_size, stride);
  if (f.g.C > 0) {
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "pooled_bn_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      pooled_bn_forward_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned>(f.g.C), kBlockSize, 0, at::cuda::getCurrentCUDAStream()>>>(
              f.g, f.W, f.Wo, f.kH, f.kW, f.sH, f.sW, h.const_data_ptr<scalar_t>(),
              weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), eps, flip,
              f.y.data_ptr<scalar_t>(), f.xhat.data_ptr<scalar_t>(), f.idx.data_ptr<int64_t>(),
              f.mean.data_ptr<scalar_t>(), f.r.data_ptr<scalar_t>(), f.rw.data_ptr<scalar_t>(),
              f.kb.data_ptr<scalar_t>(), f.kg.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {f.y, f.xhat, f.idx, f.mean, f.r, f.rw, f.kb, f.kg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pooled_bn_backward_cuda(
    const at::Tensor& gy, const at::Tensor& y, const at::Tensor& xhat, const at::Tensor& h,
    const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& rw, const at::Tensor& kb,
    const at::Tensor& kg, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  c10::cuda::OptionalCUDAGuard guard(h.device());
  PooledBnBackward o = pooled_bn_backward_setup(gy, y, xhat, h, idx, mean, rw, kb, kg,
                                                kernel_size, stride, padding, dilation, ceil_mode);
  if (o.g.C == 0) return {o.gh, o.gw, o.gb, o.gu};
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "pooled_bn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    pooled_bn_backward_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(o.g.C), kBlockSize, 0, at::cuda::getCurrentCUDAStream()>>>(
            o.g, gy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
            xhat.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
            idx.const_data_ptr<int64_t>(), mean.const_data_ptr<scalar_t>(),
            rw.const_data_ptr<scalar_t>(), kb.const_data_ptr<scalar_t>(),
            kg.const_data_ptr<scalar_t>(), o.gh.data_ptr<scalar_t>(), o.gw.data_ptr<scalar_t>(),
            o.gb.data_ptr<scalar_t>(), o.gu.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {o.gh, o.gw, o.gb, o.gu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_bn_double_backward_cuda(
    const std::optional<at::Tensor>& ch, const std::optional<at::Tensor>& cw,
    const std::optional<at::Tensor>& cb, const at::Tensor& gu, const at::Tensor& h,
    const at::Tensor& xhat, const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& y,
    const at::Tensor& rw, const at::Tensor& coef, const at::Tensor& a2,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool ceil_mode, bool need_gy, bool need_h) {
  c10::cuda::OptionalCUDAGuard guard(h.device());
  const PooledBnDouble d = pooled_bn_double_backward_setup(
      ch, cw, cb, gu, h, xhat, idx, mean, y, rw, coef, a2, kernel_size, stride, padding,
      dilation, ceil_mode, need_gy, need_h);
  if (d.g.C == 0) return {d.d_gy, d.d_h, d.d_w};
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "pooled_bn_double_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    pooled_bn_double_backward_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(d.g.C), kBlockSize, 0, at::cuda::getCurrentCUDAStream()>>>(
            d.g, d.args<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {d.d_gy, d.d_h, d.d_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CUDA, m) {
  m.impl("pooled_bn_forward", &pooled_bn_forward_cuda);
  m.impl("pooled_bn_coefficients", &pooled_bn_coefficients_cuda);
  m.impl("pooled_bn_backward", &pooled_bn_backward_cuda);
  m.impl("pooled_bn_double_backward", &pooled_bn_double_backward_cuda);
}

}  // namespace imaml_ext

// CPU kernels of the pooled batch-norm block's two derivatives in the HVP layout (schemas in
// csrc/module.cpp, arithmetic in csrc/pooled_bn_math.h, twins imaml_ext.reference.
// pooled_bn_backward / pooled_bn_double_backward).
//
// Why: a double-backward Hessian-vector product of the conv net runs, per block, the block's
// backward (13 ATen ops) and its derivative (19), each op a full pass over a map; on a GPU
// each is a launch, which is what bounds the product there (benchmarks/probes/hvp_op_count.py).
// Here each derivative is one op: passes over the pooled-size tensors for the per-channel sums,
// one over the map for the dense part and a scatter to the arg-max positions.
//
//   pooled_bn_backward:  gu = gy [y > 0],  gb = sum gu,  gw = sum gu xhat,
//                        gh = kb gb + kg gw (h - mean)  (+ rw gu at the arg-max)
//   pooled_bn_double_backward, for cotangents (ch, cw, cb):
//                        K0 = sum ch, K1 = sum ch (h - mean), Pc = sum cg gu (cg = ch at the
//                        arg-max); (c0, c1, d_w, a1, a3, a4) = coef . (K0, K1, Pc, cw, cb);
//                        d_gy = [y > 0] (c0 + c1 xhat + rw cg),
//                        d_h  = a4 + a3 (h - mean) + a2 ch  (+ a1 gu at the arg-max)
//
// Layouts: channels-last maps are rows of C contiguous channels, so positions go to threads and
// each thread sums into its own row of C doubles (added in thread order); NCHW maps are planes,
// so channels go to threads and each channel is done start to end by one. Sums in double. The
// windows are disjoint (checked), so the scatters of different windows never meet.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "../ops.h"
#include "../pooled_bn_math.h"
#include "channel_sums.h"

namespace imaml_ext {
namespace {

constexpr int64_t kRows = 64;  // channels-last positions per parallel_for task

using cpu::ThreadAcc;

// Sums into the calling thread's row of acc; total() adds the rows (in thread order).
double* my_row(ThreadAcc& acc) { return acc.row(at::get_thread_num()); }
const double* total(ThreadAcc& acc) {
  acc.reduce(at::get_num_threads());
  return acc.buf.data();
}

void check_idx(bool bad, const char* op) {
  TORCH_CHECK_VALUE(!bad, op, ": idx holds a position outside the H x W plane");
}

// The forward: per-channel mean and variance (two passes, in double), then each window's
// arg-max of s h, xhat and y; the per-channel factors.
template <typename T>
void forward_kernel(const PooledBnForward& f, const T* h, const T* w, const T* b, double eps,
                    bool flip, T* y, T* xhat, int64_t* idx, T* mean, T* r, T* rw, T* kb, T* kg) {
  const PooledBnGeometry& g = f.g;
  const int64_t N = g.N, C = g.C, P = g.P, Po = g.Po;
  const double n = static_cast<double>(N * P);
  std::vector<double> mu(C, 0.0), var(C, 0.0);
  if (g.channels_last) {  // the statistics pass of the first-order block (blocks_cpu.cpp)
    std::vector<T> center(C);
    for (int pass = 0; pass < 2; ++pass) {
      ThreadAcc acc(C, at::get_num_threads());
      at::parallel_for(0, N * P, kRows, [&](int64_t lo, int64_t hi) {
        cpu::stats_rows(h + lo * C, hi - lo, C, pass == 0 ? nullptr : center.data(),
                        my_row(acc));
      });
      const double* tot = total(acc);
      for (int64_t c = 0; c < C; ++c) (pass == 0 ? mu : var)[c] = tot[c] / n;
      if (pass == 0)
        for (int64_t c = 0; c < C; ++c) center[c] = static_cast<T>(mu[c]);
    }
  } else {
    at::parallel_for(0, C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        double s1 = 0, s2 = 0;
        for (int64_t nn = 0; nn < N; ++nn)
          for (int64_t p = 0; p < P; ++p) s1 += static_cast<double>(h[(nn * C + c) * P + p]);
        mu[c] = s1 / n;
        for (int64_t nn = 0; nn < N; ++nn)
          for (int64_t p = 0; p < P; ++p) {
            const double d = static_cast<double>(h[(nn * C + c) * P + p]) - mu[c];
            s2 += d * d;
          }
        var[c] = s2 / n;
      }
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = static_cast<T>(mu[c]);
    r[c] = T(1) / std::sqrt(static_cast<T>(var[c]) + static_cast<T>(eps));
    rw[c] = r[c] * w[c];
    kb[c] = rw[c] / -static_cast<T>(N * P);
    kg[c] = kb[c] * r[c];
  }
  const int64_t step = g.channels_last ? C : 1;
  at::parallel_for(0, N * Po, kRows, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t nn = row / Po, q = row % Po, oh = q / f.Wo, ow = q % f.Wo;
      for (int64_t c = 0; c < C; ++c) {
        const T s = flip && w[c] < T(0) ? T(-1) : T(1);
        const T* hp = h + g.map(nn, c, 0);
        const int64_t at = pooled_argmax(hp, step, f.W, oh, ow, f.kH, f.kW, f.sH, f.sW, s);
        const int64_t o = g.pooled(nn, c, q);
        const T x = (hp[at * step] - mean[c]) * r[c];
        idx[o] = at;
        xhat[o] = x;
        y[o] = pooled_bn_out(x, w[c], b[c]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
pooled_bn_forward_cpu(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                      double eps, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      bool flip) {
  PooledBnForward f = pooled_bn_forward_setup(h, weight, bias, eps, kernel_size, stride);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "pooled_bn_forward", [&] {
    forward_kernel<scalar_t>(f, h.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                             bias.const_data_ptr<scalar_t>(), eps, flip,
                             f.y.data_ptr<scalar_t>(), f.xhat.data_ptr<scalar_t>(),
                             f.idx.data_ptr<int64_t>(), f.mean.data_ptr<scalar_t>(),
                             f.r.data_ptr<scalar_t>(), f.rw.data_ptr<scalar_t>(),
                             f.kb.data_ptr<scalar_t>(), f.kg.data_ptr<scalar_t>());
  });
  return {f.y, f.xhat, f.idx, f.mean, f.r, f.rw, f.kb, f.kg};
}

template <typename T>
void backward_kernel(const PooledBnGeometry& g, const T* gy, const T* y, const T* xhat,
                     const T* h, const int64_t* idx, const T* mean, const T* rw, const T* kb,
                     const T* kg, T* gh, T* gw, T* gb, T* gu) {
  const int64_t N = g.N, C = g.C, P = g.P, Po = g.Po;
  std::atomic<bool> bad{false};
  if (g.channels_last) {
    ThreadAcc sums(2 * C, at::get_num_threads());
    at::parallel_for(0, N * Po, kRows, [&](int64_t lo, int64_t hi) {
      double* sb = my_row(sums);
      double* sw = sb + C;
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t o = r * C;
        for (int64_t c = 0; c < C; ++c) {
          const T u = relu_pass(gy[o + c], y[o + c]);
          gu[o + c] = u;
          sb[c] += static_cast<double>(u);
          sw[c] += static_cast<double>(u * xhat[o + c]);
        }
      }
    });
    const double* tot = total(sums);
    std::vector<T> alpha(C), beta(C);
    for (int64_t c = 0; c < C; ++c) {
      gb[c] = static_cast<T>(tot[c]);
      gw[c] = static_cast<T>(tot[C + c]);
      alpha[c] = kb[c] * gb[c];
      beta[c] = kg[c] * gw[c];
    }
    at::parallel_for(0, N * P, kRows, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const T* hr = h + r * C;
        T* dr = gh + r * C;
        for (int64_t c = 0; c < C; ++c) dr[c] = alpha[c] + beta[c] * (hr[c] - mean[c]);
      }
    });
    at::parallel_for(0, N * Po, kRows, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t n = r / Po, o = r * C;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t p = idx[o + c];
          if (p < 0 || p >= P) { bad = true; continue; }
          gh[(n * P + p) * C + c] += rw[c] * gu[o + c];
        }
      }
    });
  } else {
    at::parallel_for(0, C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        double sb = 0, sw = 0;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t o = (n * C + c) * Po;
          for (int64_t q = 0; q < Po; ++q) {
            const T u = relu_pass(gy[o + q], y[o + q]);
            gu[o + q] = u;
            sb += static_cast<double>(u);
            sw += static_cast<double>(u * xhat[o + q]);
          }
        }
        gb[c] = static_cast<T>(sb);
        gw[c] = static_cast<T>(sw);
        const T alpha = kb[c] * gb[c], beta = kg[c] * gw[c], m = mean[c], s = rw[c];
        for (int64_t n = 0; n < N; ++n) {
          const T* hp = h + (n * C + c) * P;
          T* dp = gh + (n * C + c) * P;
          for (int64_t p = 0; p < P; ++p) dp[p] = alpha + beta * (hp[p] - m);
          const int64_t o = (n * C + c) * Po;
          for (int64_t q = 0; q < Po; ++q) {
            const int64_t p = idx[o + q];
            if (p < 0 || p >= P) { bad = true; continue; }
            dp[p] += s * gu[o + q];
          }
        }
      }
    });
  }
  check_idx(bad, "pooled_bn_backward");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pooled_bn_backward_cpu(
    const at::Tensor& gy, const at::Tensor& y, const at::Tensor& xhat, const at::Tensor& h,
    const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& rw, const at::Tensor& kb,
    const at::Tensor& kg, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  PooledBnBackward o = pooled_bn_backward_setup(gy, y, xhat, h, idx, mean, rw, kb, kg,
                                                kernel_size, stride, padding, dilation, ceil_mode);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "pooled_bn_backward", [&] {
    backward_kernel<scalar_t>(
        o.g, gy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
        xhat.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
        idx.const_data_ptr<int64_t>(), mean.const_data_ptr<scalar_t>(),
        rw.const_data_ptr<scalar_t>(), kb.const_data_ptr<scalar_t>(),
        kg.const_data_ptr<scalar_t>(), o.gh.data_ptr<scalar_t>(), o.gw.data_ptr<scalar_t>(),
        o.gb.data_ptr<scalar_t>(), o.gu.data_ptr<scalar_t>());
  });
  return {o.gh, o.gw, o.gb, o.gu};
}

// (c0, c1, d_w, a1, a3, a4) of every channel from the sums K0, K1, Pc (each (C,)).
template <typename T>
std::vector<T> factors(const PooledBnDoubleArgs<T>& a, int64_t C, const double* K0,
                       const double* K1, const double* Pc) {
  std::vector<T> f(6 * C);
  for (int64_t c = 0; c < C; ++c) {
    const double k[5] = {K0 ? K0[c] : 0.0, K1 ? K1[c] : 0.0, Pc ? Pc[c] : 0.0,
                         a.cw ? static_cast<double>(a.cw[c]) : 0.0,
                         a.cb ? static_cast<double>(a.cb[c]) : 0.0};
    double out[6];
    pooled_bn_factors<double, T>(a.coef, C, c, k, out);
    for (int i = 0; i < 6; ++i) f[i * C + c] = static_cast<T>(out[i]);
  }
  return f;
}

template <typename T>
void double_backward_kernel(const PooledBnGeometry& g, const PooledBnDoubleArgs<T>& a) {
  const int64_t N = g.N, C = g.C, P = g.P, Po = g.Po;
  std::atomic<bool> bad{false};
  if (g.channels_last) {
    std::vector<T> f;
    if (a.ch != nullptr) {
      ThreadAcc sums(3 * C, at::get_num_threads());
      at::parallel_for(0, N * P, kRows, [&](int64_t lo, int64_t hi) {
        double* k0 = my_row(sums);
        double* k1 = k0 + C;
        for (int64_t r = lo; r < hi; ++r) {
          const T* cr = a.ch + r * C;
          const T* hr = a.h + r * C;
          for (int64_t c = 0; c < C; ++c) {
            k0[c] += static_cast<double>(cr[c]);
            k1[c] += static_cast<double>(cr[c] * (hr[c] - a.mean[c]));
          }
        }
      });
      at::parallel_for(0, N * Po, kRows, [&](int64_t lo, int64_t hi) {
        double* pc = my_row(sums) + 2 * C;
        for (int64_t r = lo; r < hi; ++r) {
          const int64_t n = r / Po, o = r * C;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t p = a.idx[o + c];
            if (p < 0 || p >= P) { bad = true; continue; }
            pc[c] += static_cast<double>(a.ch[(n * P + p) * C + c] * a.gu[o + c]);
          }
        }
      });
      const double* tot = total(sums);
      f = factors(a, C, tot, tot + C, tot + 2 * C);
    } else {
      f = factors<T>(a, C, nullptr, nullptr, nullptr);
    }
    const T *c0 = f.data(), *c1 = c0 + C, *dw = c1 + C, *a1 = dw + C, *a3 = a1 + C, *a4 = a3 + C;
    std::copy(dw, dw + C, a.d_w);
    if (a.d_gy != nullptr) {
      at::parallel_for(0, N * Po, kRows, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
          const int64_t n = r / Po, o = r * C;
          for (int64_t c = 0; c < C; ++c) {
            T t = c0[c] + c1[c] * a.xhat[o + c];
            if (a.ch != nullptr) {
              const int64_t p = a.idx[o + c];
              if (p >= 0 && p < P) t += a.rw[c] * a.ch[(n * P + p) * C + c];
              else bad = true;
            }
            a.d_gy[o + c] = relu_pass(t, a.y[o + c]);
          }
        }
      });
    }
    if (a.d_h != nullptr) {
      at::parallel_for(0, N * P, kRows, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
          const T* hr = a.h + r * C;
          T* dr = a.d_h + r * C;
          if (a.ch != nullptr) {
            const T* cr = a.ch + r * C;
            for (int64_t c = 0; c < C; ++c)
              dr[c] = a4[c] + a3[c] * (hr[c] - a.mean[c]) + a.a2[c] * cr[c];
          } else {
            for (int64_t c = 0; c < C; ++c) dr[c] = a4[c] + a3[c] * (hr[c] - a.mean[c]);
          }
        }
      });
      at::parallel_for(0, N * Po, kRows, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
          const int64_t n = r / Po, o = r * C;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t p = a.idx[o + c];
            if (p < 0 || p >= P) { bad = true; continue; }
            a.d_h[(n * P + p) * C + c] += a1[c] * a.gu[o + c];
          }
        }
      });
    }
  } else {
    at::parallel_for(0, C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const T m = a.mean[c];
        double k[5] = {0, 0, 0, a.cw ? static_cast<double>(a.cw[c]) : 0.0,
                       a.cb ? static_cast<double>(a.cb[c]) : 0.0};
        if (a.ch != nullptr) {
          for (int64_t n = 0; n < N; ++n) {
            const T* cp = a.ch + (n * C + c) * P;
            const T* hp = a.h + (n * C + c) * P;
            for (int64_t p = 0; p < P; ++p) {
              k[0] += static_cast<double>(cp[p]);
              k[1] += static_cast<double>(cp[p] * (hp[p] - m));
            }
            const int64_t o = (n * C + c) * Po;
            for (int64_t q = 0; q < Po; ++q) {
              const int64_t p = a.idx[o + q];
              if (p < 0 || p >= P) { bad = true; continue; }
              k[2] += static_cast<double>(cp[p] * a.gu[o + q]);
            }
          }
        }
        double f[6];
        pooled_bn_factors<double, T>(a.coef, C, c, k, f);
        const T c0 = static_cast<T>(f[0]), c1 = static_cast<T>(f[1]), a1 = static_cast<T>(f[3]);
        const T a3 = static_cast<T>(f[4]), a4 = static_cast<T>(f[5]), a2 = a.a2[c];
        a.d_w[c] = static_cast<T>(f[2]);
        for (int64_t n = 0; n < N; ++n) {
          const int64_t o = (n * C + c) * Po;
          const T* cp = a.ch != nullptr ? a.ch + (n * C + c) * P : nullptr;
          if (a.d_gy != nullptr) {
            for (int64_t q = 0; q < Po; ++q) {
              T t = c0 + c1 * a.xhat[o + q];
              if (cp != nullptr) {
                const int64_t p = a.idx[o + q];
                if (p >= 0 && p < P) t += a.rw[c] * cp[p];
                else bad = true;
              }
              a.d_gy[o + q] = relu_pass(t, a.y[o + q]);
            }
          }
          if (a.d_h != nullptr) {
            const T* hp = a.h + (n * C + c) * P;
            T* dp = a.d_h + (n * C + c) * P;
            if (cp != nullptr) {
              for (int64_t p = 0; p < P; ++p) dp[p] = a4 + a3 * (hp[p] - m) + a2 * cp[p];
            } else {
              for (int64_t p = 0; p < P; ++p) dp[p] = a4 + a3 * (hp[p] - m);
            }
            for (int64_t q = 0; q < Po; ++q) {
              const int64_t p = a.idx[o + q];
              if (p < 0 || p >= P) { bad = true; continue; }
              dp[p] += a1 * a.gu[o + q];
            }
          }
        }
      }
    });
  }
  check_idx(bad, "pooled_bn_double_backward");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_bn_double_backward_cpu(
    const std::optional<at::Tensor>& ch, const std::optional<at::Tensor>& cw,
    const std::optional<at::Tensor>& cb, const at::Tensor& gu, const at::Tensor& h,
    const at::Tensor& xhat, const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& y,
    const at::Tensor& rw, const at::Tensor& coef, const at::Tensor& a2,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool ceil_mode, bool need_gy, bool need_h) {
  const PooledBnDouble d = pooled_bn_double_backward_setup(
      ch, cw, cb, gu, h, xhat, idx, mean, y, rw, coef, a2, kernel_size, stride, padding,
      dilation, ceil_mode, need_gy, need_h);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "pooled_bn_double_backward", [&] {
    double_backward_kernel<scalar_t>(d.g, d.args<scalar_t>());
  });
  return {d.d_gy, d.d_h, d.d_w};
}

std::tuple<at::Tensor, at::Tensor> pooled_bn_coefficients_cpu(
    const at::Tensor& r, const at::Tensor& w, const at::Tensor& rw, const at::Tensor& kb,
    const at::Tensor& kg, const at::Tensor& gb, const at::Tensor& gw, int64_t n) {
  const int64_t C = check_pooled_bn_coefficients(r, w, rw, kb, kg, gb, gw, n);
  at::Tensor coef = at::empty({6, 5, C}, r.options()), a2 = at::empty({C}, r.options());
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "pooled_bn_coefficients", [&] {
    const scalar_t *rp = r.const_data_ptr<scalar_t>(), *wp = w.const_data_ptr<scalar_t>();
    const scalar_t *rwp = rw.const_data_ptr<scalar_t>(), *kbp = kb.const_data_ptr<scalar_t>();
    const scalar_t *kgp = kg.const_data_ptr<scalar_t>(), *gbp = gb.const_data_ptr<scalar_t>();
    const scalar_t* gwp = gw.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c)
      pooled_bn_coefficients_at<scalar_t>(rp[c], wp[c], rwp[c], kbp[c], kgp[c], gbp[c], gwp[c],
                                          static_cast<scalar_t>(n), C, c,
                                          coef.data_ptr<scalar_t>(), a2.data_ptr<scalar_t>());
  });
  return {coef, a2};
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CPU, m) {
  m.impl("pooled_bn_forward", &pooled_bn_forward_cpu);
  m.impl("pooled_bn_coefficients", &pooled_bn_coefficients_cpu);
  m.impl("pooled_bn_backward", &pooled_bn_backward_cpu);
  m.impl("pooled_bn_double_backward", &pooled_bn_double_backward_cpu);
}

}  // namespace imaml_ext

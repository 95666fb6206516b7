// The per-element and per-channel arithmetic of the pooled batch-norm block's derivatives
// (imaml_ext.hvp._PooledBatchNormBackward; twins imaml_ext.reference.pooled_bn_backward and
// pooled_bn_double_backward), shared by csrc/cpu/pooled_bn_cpu.cpp and
// csrc/cuda/pooled_bn_cuda.cu.
//
// Layout: a map (N, C, H, W) is dense NCHW or dense channels-last; position (n, c, p), p a flat
// H*W (or pooled Ho*Wo) index, lies at (n C + c) plane + p or (n plane + p) C + c.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace imaml_ext {

struct PooledBnGeometry {
  int64_t N, C, P, Po;  // samples, channels, H*W, Ho*Wo
  bool channels_last;

  C10_HOST_DEVICE int64_t map(int64_t n, int64_t c, int64_t p) const {
    return channels_last ? (n * P + p) * C + c : (n * C + c) * P + p;
  }
  C10_HOST_DEVICE int64_t pooled(int64_t n, int64_t c, int64_t q) const {
    return channels_last ? (n * Po + q) * C + c : (n * C + c) * Po + q;
  }
};

// The double backward's pointers: ch, cw, cb null for zero cotangents, d_gy / d_h null when not
// needed.
template <typename T>
struct PooledBnDoubleArgs {
  const T *ch, *cw, *cb, *gu, *h, *xhat;
  const int64_t* idx;
  const T *mean, *y, *rw, *coef, *a2;
  T *d_gy, *d_h, *d_w;
};

// The block's forward at pooled position (oh, ow) of one channel's plane hp (H x W, element
// (i, j) at hp[(i W + j) * step]): the arg-max of s * h over the window of kH x kW at
// (oh sH, ow sW), windows inside the map (no padding, dilation 1, floor mode), ATen's rule
// (a greater value or a NaN replaces the maximum, from -inf at the window's first position).
// Returns the flat position; z = h there.
template <typename T>
C10_HOST_DEVICE inline int64_t pooled_argmax(const T* hp, int64_t step, int64_t W, int64_t oh,
                                             int64_t ow, int64_t kH, int64_t kW, int64_t sH,
                                             int64_t sW, T s) {
  const int64_t p0 = oh * sH * W + ow * sW;
  T best = -INFINITY;
  int64_t at = p0;
  for (int64_t i = 0; i < kH; ++i)
    for (int64_t j = 0; j < kW; ++j) {
      const int64_t p = p0 + i * W + j;
      const T v = s * hp[p * step];
      if (v > best || v != v) {
        best = v;
        at = p;
      }
    }
  return at;
}

// relu(b + xhat w), NaN kept (torch.relu).
template <typename T>
C10_HOST_DEVICE inline T pooled_bn_out(T xhat, T w, T b) {
  const T t = b + xhat * w;
  return (t > T(0) || t != t) ? t : T(0);
}

// ATen's threshold_backward(g, y, 0): g where y > 0 or y is NaN, else 0.
template <typename T>
C10_HOST_DEVICE inline T relu_pass(T g, T y) {
  return y <= T(0) ? T(0) : g;
}

// The double backward's factor table of channel c (imaml_ext.reference.pooled_bn_coefficients
// has the derivation's names): coef (6, 5, C) rows c0, c1, d_w, A1, A3, A4 as combinations of
// (K0, K1, P, cw, cb), and a2 = A2, from the point's r, w, rw = r w, kb = -rw / n, kg = kb r,
// gb, gw and n (the values per channel of the pre-pool map). In T, in the reference's order.
template <typename T>
C10_HOST_DEVICE inline void pooled_bn_coefficients_at(T r, T w, T rw, T kb, T kg, T gb, T gw,
                                                      T n, int64_t C, int64_t c, T* coef,
                                                      T* a2) {
  const T nq = r / -n;
  const T nqgb = nq * gb, nqgw = nq * gw, nm = nq * r;
  const T rows[30] = {
      kb, T(0), T(0), T(0), T(1),                                          // c0
      T(0), kg, T(0), T(1), T(0),                                          // c1
      nqgb, nqgw * r, r, T(0), T(0),                                       // d w
      T(0), kg * r, T(0), r, T(0),                                         // A1
      nm * w * nqgb, (w * nqgw + T(2) * (gw * kb)) * (nm * r), nm * rw, nm * gw, T(0),  // A3
      nqgw * kb, nqgb * kg, T(0), nqgb, T(0)};                             // A4
  for (int i = 0; i < 30; ++i) coef[i * C + c] = rows[i];
  a2[c] = kg * gw;
}

// The double backward's six per-channel factors (c0, c1, d_w, a1, a3, a4) of channel c, each
// sum_j coef[i, j, c] k[j] for the sums k = (K0, K1, P, cw, cb); coef (6, 5, C) contiguous.
template <typename acc_t, typename T>
C10_HOST_DEVICE inline void pooled_bn_factors(const T* coef, int64_t C, int64_t c,
                                              const acc_t* k, acc_t* out) {
  for (int i = 0; i < 6; ++i) {
    acc_t s = 0;
    for (int j = 0; j < 5; ++j) s += static_cast<acc_t>(coef[(i * 5 + j) * C + c]) * k[j];
    out[i] = s;
  }
}

}  // namespace imaml_ext

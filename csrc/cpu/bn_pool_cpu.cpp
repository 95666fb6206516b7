// CPU kernels of the fused block relu(max_pool2d(batch_norm(h), 2)) and its backward (schemas in
// csrc/module.cpp; the pure-PyTorch twin is imaml_ext.reference.bn_relu_pool).
//
// Why: in the conv net's first-order evaluations on the CPU (inner GD steps, query gradients),
// batch norm, ReLU and max-pooling as separate ATen kernels take about a third of a 5-way
// 1-shot gradient and half of a 20-way 5-shot one: each reads and writes the full pre-pool map
// several times (statistics, normalise, pool with int64 indices, then on the way back a zeroed
// map to scatter into, the ReLU mask, the two batch-norm reductions and the input gradient).
// Here the forward reads the map three times (mean, variance, normalise-and-pool) and writes only
// pooled-size outputs: the block's output, the input value at each window's arg-max (`hsel`)
// and the arg-max as one byte (`idx`, 0..3 in row-major window order). The backward reads the
// pooled-size tensors for the two per-channel sums, then reads the map once and writes its
// gradient once:
//   dz   = grad_out * (a hsel + c > 0)            at each window's arg-max, 0 elsewhere
//   s1   = sum dz,  s2 = sum dz * xhat(hsel)      (= grad_bias, grad_weight)
//   dh   = a dz - (a / R) (s1 + xhat(h) s2),  xhat(h) = (h - mean) invstd,  a = weight * invstd
// with R = N*H*W, the formula of ATen's batch-norm backward.
//
// Layout: channels-last (N, H, W, C in memory), so each spatial position is a row of C
// contiguous channels and every inner loop runs over channels; statistics are accumulated in
// double. Threads: positions (forward statistics, backward sums) or pooled row bands (the rest)
// go to at::parallel_for; each thread sums into its own accumulator row, added in thread order.
// Max-pooling: kernel 2, stride 2, no padding, floor mode (an odd last row or column is in the
// statistics and gets a gradient, but is not pooled); ties take the first maximum, a NaN is
// taken like ATen's max_pool2d does. First-order only: the backward is not differentiable.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../ops.h"
#include "simd_clones.h"
#include "vec64.h"

namespace imaml_ext {
namespace {

constexpr int64_t kRowGrain = 64;   // positions per parallel_for task (statistics)
constexpr int64_t kBandGrain = 1;   // pooled row bands per task

// acc[c] += sum over `rows` rows of h[c] (center == nullptr) or of (h[c] - center[c])^2. Rows
// are taken kTile at a time, summed in vector registers in T and then added to the double
// accumulators: updating acc (C doubles, 4 KiB at C = 512) row by row was 4x slower, load-bound
// on the store-to-load traffic of acc.
constexpr int64_t kTile = 16;

template <typename T>
IMAML_INLINE void stats_rows_impl(const T* __restrict__ h, int64_t rows, int64_t C,
                                  const T* __restrict__ center, double* __restrict__ acc) {
  using simd::vec_t;
  using simd::vload;
  constexpr int L = simd::kVec<T>;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t rt = std::min(kTile, rows - r0);
    const T* hb = h + r0 * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      vec_t<T> s{};
      if (center == nullptr) {
        for (int64_t r = 0; r < rt; ++r) s += vload(hb + r * C + c);
      } else {
        const vec_t<T> m = vload(center + c);
        for (int64_t r = 0; r < rt; ++r) {
          const vec_t<T> d = vload(hb + r * C + c) - m;
          s += d * d;
        }
      }
      for (int l = 0; l < L; ++l) acc[c + l] += static_cast<double>(s[l]);
    }
    for (; c < C; ++c) {
      T s = 0;
      for (int64_t r = 0; r < rt; ++r) {
        const T d = center == nullptr ? hb[r * C + c] : hb[r * C + c] - center[c];
        s += center == nullptr ? d : d * d;
      }
      acc[c] += static_cast<double>(s);
    }
  }
}

IMAML_SIMD void stats_rows(const float* h, int64_t rows, int64_t C, const float* center,
                           double* acc) {
  stats_rows_impl(h, rows, C, center, acc);
}
IMAML_SIMD void stats_rows(const double* h, int64_t rows, int64_t C, const double* center,
                           double* acc) {
  stats_rows_impl(h, rows, C, center, acc);
}

// One pooled position: the four window rows p[0..3] (row-major window order) of C channels.
template <typename T>
IMAML_INLINE void pool_window_impl(const T* __restrict__ p0, const T* __restrict__ p1,
                                   const T* __restrict__ p2, const T* __restrict__ p3, int64_t C,
                                   const T* __restrict__ a, const T* __restrict__ b,
                                   T* __restrict__ out, T* __restrict__ hsel,
                                   uint8_t* __restrict__ idx) {
  for (int64_t c = 0; c < C; ++c) {
    const T ac = a[c], bc = b[c];
    T best = ac * p0[c] + bc, hb = p0[c];
    uint8_t k = 0;
    const T z1 = ac * p1[c] + bc, z2 = ac * p2[c] + bc, z3 = ac * p3[c] + bc;
    // ATen's rule, in window order: take a value that is greater, or NaN
    bool t = (z1 > best) || (z1 != z1);
    best = t ? z1 : best; hb = t ? p1[c] : hb; k = t ? 1 : k;
    t = (z2 > best) || (z2 != z2);
    best = t ? z2 : best; hb = t ? p2[c] : hb; k = t ? 2 : k;
    t = (z3 > best) || (z3 != z3);
    best = t ? z3 : best; hb = t ? p3[c] : hb; k = t ? 3 : k;
    out[c] = best < T(0) ? T(0) : best;  // relu; NaN stays NaN
    hsel[c] = hb;
    idx[c] = k;
  }
}

IMAML_SIMD void pool_window(const float* p0, const float* p1, const float* p2, const float* p3,
                            int64_t C, const float* a, const float* b, float* out, float* hsel,
                            uint8_t* idx) {
  pool_window_impl(p0, p1, p2, p3, C, a, b, out, hsel, idx);
}
IMAML_SIMD void pool_window(const double* p0, const double* p1, const double* p2,
                            const double* p3, int64_t C, const double* a, const double* b,
                            double* out, double* hsel, uint8_t* idx) {
  pool_window_impl(p0, p1, p2, p3, C, a, b, out, hsel, idx);
}

// dz = g * (a hsel + b > 0) over `rows` pooled rows; s1 += dz, s2 += dz * (hsel - mean) invstd,
// kTile rows at a time in T (as stats_rows_impl).
template <typename T>
IMAML_INLINE void grad_sums_impl(const T* __restrict__ g, const T* __restrict__ hsel,
                                 int64_t rows, int64_t C, const T* __restrict__ a,
                                 const T* __restrict__ b, const T* __restrict__ mean,
                                 const T* __restrict__ invstd, double* __restrict__ s1,
                                 double* __restrict__ s2) {
  using simd::vec_t;
  using simd::vload;
  constexpr int L = simd::kVec<T>;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t rt = std::min(kTile, rows - r0);
    const T* gb = g + r0 * C;
    const T* hb = hsel + r0 * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const vec_t<T> ac = vload(a + c), bc = vload(b + c), mc = vload(mean + c);
      const vec_t<T> ic = vload(invstd + c);
      vec_t<T> t1{}, t2{};
      for (int64_t r = 0; r < rt; ++r) {
        const vec_t<T> hv = vload(hb + r * C + c);
        const vec_t<T> z = ac * hv + bc;
        const vec_t<T> dz = z > T(0) ? vload(gb + r * C + c) : vec_t<T>{};
        t1 += dz;
        t2 += dz * ((hv - mc) * ic);
      }
      for (int l = 0; l < L; ++l) {
        s1[c + l] += static_cast<double>(t1[l]);
        s2[c + l] += static_cast<double>(t2[l]);
      }
    }
    for (; c < C; ++c) {
      T t1 = 0, t2 = 0;
      for (int64_t r = 0; r < rt; ++r) {
        const T hv = hb[r * C + c];
        const T dz = (a[c] * hv + b[c] > T(0)) ? gb[r * C + c] : T(0);
        t1 += dz;
        t2 += dz * ((hv - mean[c]) * invstd[c]);
      }
      s1[c] += static_cast<double>(t1);
      s2[c] += static_cast<double>(t2);
    }
  }
}

IMAML_SIMD void grad_sums(const float* g, const float* hsel, int64_t rows, int64_t C,
                          const float* a, const float* b, const float* mean, const float* invstd,
                          double* s1, double* s2) {
  grad_sums_impl(g, hsel, rows, C, a, b, mean, invstd, s1, s2);
}
IMAML_SIMD void grad_sums(const double* g, const double* hsel, int64_t rows, int64_t C,
                          const double* a, const double* b, const double* mean,
                          const double* invstd, double* s1, double* s2) {
  grad_sums_impl(g, hsel, rows, C, a, b, mean, invstd, s1, s2);
}

// The dense part of dh over `rows` rows: dh = k1 + k2 * (h - mean), k1 = -a s1 / R,
// k2 = -a invstd s2 / R.
template <typename T>
IMAML_INLINE void dense_rows_impl(const T* __restrict__ h, int64_t rows, int64_t C,
                                  const T* __restrict__ mean, const T* __restrict__ k1,
                                  const T* __restrict__ k2, T* __restrict__ dh) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* hr = h + r * C;
    T* dr = dh + r * C;
    for (int64_t c = 0; c < C; ++c) dr[c] = k1[c] + k2[c] * (hr[c] - mean[c]);
  }
}

IMAML_SIMD void dense_rows(const float* h, int64_t rows, int64_t C, const float* mean,
                           const float* k1, const float* k2, float* dh) {
  dense_rows_impl(h, rows, C, mean, k1, k2, dh);
}
IMAML_SIMD void dense_rows(const double* h, int64_t rows, int64_t C, const double* mean,
                           const double* k1, const double* k2, double* dh) {
  dense_rows_impl(h, rows, C, mean, k1, k2, dh);
}

// The sparse part: dh[window row idx] += a * dz for one pooled position.
template <typename T>
IMAML_INLINE void sparse_window_impl(T* __restrict__ d0, T* __restrict__ d1, T* __restrict__ d2,
                                     T* __restrict__ d3, int64_t C, const T* __restrict__ g,
                                     const T* __restrict__ hsel, const uint8_t* __restrict__ idx,
                                     const T* __restrict__ a, const T* __restrict__ b) {
  for (int64_t c = 0; c < C; ++c) {
    const T dz = (a[c] * hsel[c] + b[c] > T(0)) ? g[c] : T(0);
    const T v = a[c] * dz;
    const uint8_t k = idx[c];
    d0[c] += k == 0 ? v : T(0);
    d1[c] += k == 1 ? v : T(0);
    d2[c] += k == 2 ? v : T(0);
    d3[c] += k == 3 ? v : T(0);
  }
}

IMAML_SIMD void sparse_window(float* d0, float* d1, float* d2, float* d3, int64_t C,
                              const float* g, const float* hsel, const uint8_t* idx,
                              const float* a, const float* b) {
  sparse_window_impl(d0, d1, d2, d3, C, g, hsel, idx, a, b);
}
IMAML_SIMD void sparse_window(double* d0, double* d1, double* d2, double* d3, int64_t C,
                              const double* g, const double* hsel, const uint8_t* idx,
                              const double* a, const double* b) {
  sparse_window_impl(d0, d1, d2, d3, C, g, hsel, idx, a, b);
}

// Per-thread accumulator rows of C doubles, summed into row 0 in thread order.
struct ThreadAcc {
  int64_t C;
  std::vector<double> buf;
  ThreadAcc(int64_t C_, int nthreads) : C(C_), buf(static_cast<size_t>(C_) * nthreads, 0.0) {}
  double* row(int t) { return buf.data() + static_cast<size_t>(t) * C; }
  void reduce(int nthreads) {
    for (int t = 1; t < nthreads; ++t)
      for (int64_t c = 0; c < C; ++c) buf[c] += buf[static_cast<size_t>(t) * C + c];
  }
};

void check_block_input(const char* op, const at::Tensor& h, const at::Tensor& weight,
                       const at::Tensor& bias, double eps) {
  TORCH_CHECK(h.dim() == 4, op, ": h must be 4-d (N, C, H, W), got ", h.dim(), "-d of shape ",
              h.sizes());
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble, op,
              ": h must be float32 or float64, got ", h.scalar_type());
  TORCH_CHECK(h.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": h must be channels-last contiguous, got strides ", h.strides());
  const int64_t C = h.size(1);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"weight", weight},
                         std::pair<const char*, const at::Tensor&>{"bias", bias}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must be (", C,
                ",) = (C,) for h ", h.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == h.scalar_type(), op, ": ", name, " must have dtype ",
                h.scalar_type(), " like h, got ", t.scalar_type());
    TORCH_CHECK(t.device() == h.device(), op, ": ", name, " must be on ", h.device(),
                " like h, got ", t.device());
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  // (so every channel has at least 4 values: batch norm's "more than 1 value" holds)
  TORCH_CHECK(h.size(0) >= 1 && h.size(2) >= 2 && h.size(3) >= 2, op,
              ": h must have a sample and be at least 2x2 for 2x2 max-pooling, got shape ", h.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_cpu(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_block_input("bn_relu_pool", h, weight, bias, eps);
  const int64_t N = h.size(0), C = h.size(1), H = h.size(2), W = h.size(3);
  const int64_t Ho = H / 2, Wo = W / 2, R = N * H * W;
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty({N, C, Ho, Wo}, h.options().memory_format(cl));
  at::Tensor hsel = at::empty({N, C, Ho, Wo}, h.options().memory_format(cl));
  at::Tensor idx = at::empty({N, C, Ho, Wo}, h.options().dtype(at::kByte).memory_format(cl));
  at::Tensor mean = at::empty({C}, h.options());
  at::Tensor invstd = at::empty({C}, h.options());
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "bn_relu_pool", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const int nthreads = at::get_num_threads();
    // two passes over h for the statistics (mean, then the centred sum of squares), in double
    std::vector<double> mean_d(C), var_d(C);
    std::vector<scalar_t> mean_t(C);
    for (int pass = 0; pass < 2; ++pass) {
      ThreadAcc acc(C, nthreads);
      const scalar_t* center = pass == 0 ? nullptr : mean_t.data();
      at::parallel_for(0, R, kRowGrain, [&](int64_t lo, int64_t hi) {
        stats_rows(hp + lo * C, hi - lo, C, center, acc.row(at::get_thread_num()));
      });
      acc.reduce(nthreads);
      for (int64_t c = 0; c < C; ++c) (pass == 0 ? mean_d : var_d)[c] = acc.buf[c] / R;
      if (pass == 0)
        for (int64_t c = 0; c < C; ++c) mean_t[c] = static_cast<scalar_t>(mean_d[c]);
    }
    std::vector<scalar_t> a(C), shift(C);
    scalar_t* mp = mean.data_ptr<scalar_t>();
    scalar_t* ip = invstd.data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      mp[c] = static_cast<scalar_t>(mean_d[c]);
      ip[c] = static_cast<scalar_t>(1.0 / std::sqrt(var_d[c] + eps));
      a[c] = wp[c] * ip[c];
      shift[c] = bp[c] - mp[c] * a[c];
    }
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* sp = hsel.data_ptr<scalar_t>();
    uint8_t* xp = idx.data_ptr<uint8_t>();
    at::parallel_for(0, N * Ho, kBandGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t band = lo; band < hi; ++band) {
        const int64_t n = band / Ho, yo = band % Ho;
        const scalar_t* top = hp + ((n * H + 2 * yo) * W) * C;
        const scalar_t* bot = top + W * C;
        const int64_t o = (band * Wo) * C;
        for (int64_t xo = 0; xo < Wo; ++xo) {
          const scalar_t* t0 = top + 2 * xo * C;
          const scalar_t* b0 = bot + 2 * xo * C;
          pool_window(t0, t0 + C, b0, b0 + C, C, a.data(), shift.data(), op + o + xo * C,
                      sp + o + xo * C, xp + o + xo * C);
        }
      }
    });
  });
  return {out, mean, invstd, hsel, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& hsel, const at::Tensor& idx) {
  const char* op = "bn_relu_pool_backward";
  check_block_input(op, h, weight, bias, 0.0);
  const int64_t N = h.size(0), C = h.size(1), H = h.size(2), W = h.size(3);
  const int64_t Ho = H / 2, Wo = W / 2, R = N * H * W;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const std::vector<int64_t> pooled{N, C, Ho, Wo};
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out},
                         std::pair<const char*, const at::Tensor&>{"hsel", hsel},
                         std::pair<const char*, const at::Tensor&>{"idx", idx}}) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(pooled), op, ": ", name, " must be ",
                at::IntArrayRef(pooled), " = (N, C, H/2, W/2) for h ", h.sizes(), ", got ",
                t.sizes());
    TORCH_CHECK(t.is_contiguous(cl), op, ": ", name, " must be channels-last contiguous");
    TORCH_CHECK(t.scalar_type() == (t.is_same(idx) ? at::kByte : h.scalar_type()), op, ": ",
                name, " has dtype ", t.scalar_type());
  }
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean},
                         std::pair<const char*, const at::Tensor&>{"invstd", invstd}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.scalar_type() == h.scalar_type(), op, ": ",
                name, " must be (", C, ",) of dtype ", h.scalar_type(), ", got ", t.sizes(),
                " of ", t.scalar_type());
  }
  at::Tensor grad_h = at::empty_like(h, h.options().memory_format(cl));
  at::Tensor grad_w = at::empty({C}, h.options());
  at::Tensor grad_b = at::empty({C}, h.options());
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const at::Tensor m = mean.contiguous(), is = invstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "bn_relu_pool_backward", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* sp = hsel.const_data_ptr<scalar_t>();
    const uint8_t* xp = idx.const_data_ptr<uint8_t>();
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const scalar_t* ip = is.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    std::vector<scalar_t> a(C), shift(C), k1(C), k2(C);
    for (int64_t c = 0; c < C; ++c) {
      a[c] = wp[c] * ip[c];
      shift[c] = bp[c] - mp[c] * a[c];
    }
    const int nthreads = at::get_num_threads();
    const int64_t P = N * Ho * Wo;
    ThreadAcc s1(C, nthreads), s2(C, nthreads);
    at::parallel_for(0, P, kRowGrain, [&](int64_t lo, int64_t hi) {
      const int t = at::get_thread_num();
      grad_sums(gp + lo * C, sp + lo * C, hi - lo, C, a.data(), shift.data(), mp, ip, s1.row(t),
                s2.row(t));
    });
    s1.reduce(nthreads);
    s2.reduce(nthreads);
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    scalar_t* gb = grad_b.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      gb[c] = static_cast<scalar_t>(s1.buf[c]);
      gw[c] = static_cast<scalar_t>(s2.buf[c]);
      k1[c] = static_cast<scalar_t>(-static_cast<double>(a[c]) * s1.buf[c] / R);
      k2[c] = static_cast<scalar_t>(-static_cast<double>(a[c]) * ip[c] * s2.buf[c] / R);
    }
    scalar_t* dp = grad_h.data_ptr<scalar_t>();
    // bands of two input rows (one pooled row); an odd last row is a band of its own
    const int64_t bands = (H + 1) / 2;
    at::parallel_for(0, N * bands, kBandGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t band = lo; band < hi; ++band) {
        const int64_t n = band / bands, yb = band % bands;
        const int64_t rows = std::min<int64_t>(2, H - 2 * yb) * W;
        const int64_t first = (n * H + 2 * yb) * W * C;
        dense_rows(hp + first, rows, C, mp, k1.data(), k2.data(), dp + first);
        if (yb >= Ho) continue;
        scalar_t* top = dp + first;
        scalar_t* bot = top + W * C;
        const int64_t o = ((n * Ho + yb) * Wo) * C;
        for (int64_t xo = 0; xo < Wo; ++xo) {
          scalar_t* t0 = top + 2 * xo * C;
          scalar_t* b0 = bot + 2 * xo * C;
          sparse_window(t0, t0 + C, b0, b0 + C, C, gp + o + xo * C, sp + o + xo * C,
                        xp + o + xo * C, a.data(), shift.data());
        }
      }
    });
  });
  return {grad_h, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CPU, m) {
  m.impl("bn_relu_pool", &bn_relu_pool_cpu);
  m.impl("bn_relu_pool_backward", &bn_relu_pool_backward_cpu);
}

}  // namespace imaml_ext

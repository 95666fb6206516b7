// CPU kernels of the conv net's blocks with the tasks folded into channels (imaml_ext.hvp):
// (1) the fused block relu(max_pool2d(batch_norm(h), 2)); (2) the first layer's grouped
// convolution with one input channel per group, and its weight gradient; (3) the two fused:
// relu(max_pool2d(batch_norm(conv1ch(x)), 2)). Schemas in csrc/module.cpp; pure-PyTorch twins
// in imaml_ext.reference (bn_relu_pool, conv1ch, conv1ch_weight_grad, conv1ch_bn_relu_pool).
//
// ---- (1) the batch-norm / ReLU / max-pool block ----
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
// ---- (2) the grouped convolution with one input channel per group ----
//
// Why: the conv net's first layer on a gray-scale data set, with the tasks folded into channels
// (imaml_ext.hvp), is a grouped convolution with groups = tasks and one input channel per group.
// oneDNN runs it at 0.1 ms per task on some shapes and 0.6-1.5 ms per task on others (measured
// on the 2-core Xeon, 5 or 25 images of 28x28, 64 filters: 8 tasks took 5.3 ms in a 5-way 1-shot
// gradient, about a fifth of it, for 0.15 GFLOP). The convolution is 9 multiply-adds per output:
// written directly it is bound by writing the output once.
//
//   y[n, g*C + c, i, j] = bias[g*C + c]
//                         + sum_{ky,kx} w[g*C + c, 0, ky, kx] x[n, g, i*sh + ky - ph, j*sw + kx - pw]
//   gw[g*C + c, 0, ky, kx] = sum_{n,i,j} gy[n, g*C + c, i, j] x[n, g, i*sh + ky - ph, j*sw + kx - pw]
//   gb[g*C + c] = sum_{n,i,j} gy[n, g*C + c, i, j]
//
// (taps outside the image are skipped: zero padding). Both are linear in w (resp. gy), so the
// pair is closed under differentiation: the derivative of gw with respect to gy is the forward
// convolution again, which is how imaml_ext.ops makes the layer differentiable to any order.
//
// Layout: x contiguous (N, G, H, W): each group's image is one plane, read by tap; y and gy
// channels-last (N, Ho, Wo, G*C in memory): every inner loop runs over a group's C contiguous
// channels. Threads: output rows (n, i) go to at::parallel_for; the weight gradient sums each
// row in T into a tile, adds the tile to its thread's double accumulator, and the thread
// accumulators are added in thread order.
// ---- (3) conv1ch -> batch norm -> ReLU -> 2x2 max-pool, fused ----
//
// With one input channel per group, the convolution's output at a position is w_c . p (+ bias)
// for the position's patch p (kh*kw input values, 0 in the padding), so the batch statistics of
// channel c of group g are closed forms of the patch moments of that group's images:
//   mean_c = w_c . m_g + bias_c,   var_c = w_c^T S_g w_c,
// m_g, S_g the mean and covariance of the patches over all positions (kh*kw and (kh*kw)^2 numbers
// per group, from x alone). The forward therefore computes the moments (two passes over the small
// x, in double), the statistics, and then the convolution only at the pooling windows, which it
// pools at once: no full-size map is written or read. In the backward, the batch-norm gradient
// dh = a dz - (a/R)(s1 + xhat(h) s2) splits into a dense part whose convolution-weight gradient
// is again closed form, sum_pos (k1 + k2 (h - mean)) p = R (k1 m_g + k2 S_g w_c), and the sparse
// part a dz at each window's arg-max, which needs that position's patch only: the backward reads
// pooled-size tensors and x. First-order only, like (1). Measured: see imaml_ext.hvp.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "../ops.h"
#include "channel_sums.h"
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

}  // namespace

IMAML_SIMD void cpu::stats_rows(const float* h, int64_t rows, int64_t C, const float* center,
                                double* acc) {
  stats_rows_impl(h, rows, C, center, acc);
}
IMAML_SIMD void cpu::stats_rows(const double* h, int64_t rows, int64_t C, const double* center,
                                double* acc) {
  stats_rows_impl(h, rows, C, center, acc);
}

namespace {

using cpu::stats_rows;
using cpu::ThreadAcc;

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

// The batch-norm backward's per-channel pieces, shared by the two block backwards: the affine
// map at the pooled positions, a = weight * invstd and shift = bias - mean * a, and the sums
// over the P pooled positions s1 = sum dz, s2 = sum dz xhat(hsel) (grad_bias, grad_weight),
// accumulated per thread in double and reduced.
template <typename T>
struct BlockGradSums {
  std::vector<T> a, shift;
  ThreadAcc s1, s2;
  BlockGradSums(const T* g, const T* hsel, int64_t P, int64_t C, const T* weight, const T* bias,
                const T* mean, const T* invstd)
      : a(C), shift(C), s1(C, at::get_num_threads()), s2(C, at::get_num_threads()) {
    for (int64_t c = 0; c < C; ++c) {
      a[c] = weight[c] * invstd[c];
      shift[c] = bias[c] - mean[c] * a[c];
    }
    const int nthreads = at::get_num_threads();
    at::parallel_for(0, P, kRowGrain, [&](int64_t lo, int64_t hi) {
      const int t = at::get_thread_num();
      grad_sums(g + lo * C, hsel + lo * C, hi - lo, C, a.data(), shift.data(), mean, invstd,
                s1.row(t), s2.row(t));
    });
    s1.reduce(nthreads);
    s2.reduce(nthreads);
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

// idx's values: the position in a 2x2 window, 0..3 (the kernels index the window's patches or
// pixels with it; a larger value read past them or dropped the gradient). One pass over bytes.
void check_window_idx(const char* op, const at::Tensor& idx) {
  const uint8_t* p = idx.const_data_ptr<uint8_t>();
  const int64_t n = idx.numel();
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
    uint8_t m = 0;
    for (int64_t i = lo; i < hi; ++i) m = std::max(m, p[i]);
    if (m > 3) bad = true;
  });
  TORCH_CHECK(!bad.load(), op, ": idx must be in 0..3 (the position in a 2x2 window)");
}

// The checks of a block backward's pooled-size inputs and saved statistics.
void check_saved_block(const char* op, const std::vector<int64_t>& pooled, at::ScalarType dtype,
                       const at::Tensor& grad_out, const at::Tensor& hsel, const at::Tensor& idx,
                       const at::Tensor& mean, const at::Tensor& invstd) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out},
                         std::pair<const char*, const at::Tensor&>{"hsel", hsel},
                         std::pair<const char*, const at::Tensor&>{"idx", idx}}) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(pooled), op, ": ", name, " must be ",
                at::IntArrayRef(pooled), " (the pooled output), got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(cl), op, ": ", name, " must be channels-last contiguous");
    TORCH_CHECK(t.scalar_type() == (t.is_same(idx) ? at::kByte : dtype), op, ": ", name,
                " has dtype ", t.scalar_type());
  }
  check_window_idx(op, idx);
  const int64_t C = pooled[1];
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean},
                         std::pair<const char*, const at::Tensor&>{"invstd", invstd}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.scalar_type() == dtype, op, ": ", name,
                " must be (", C, ",) of dtype ", dtype, ", got ", t.sizes(), " of ",
                t.scalar_type());
  }
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
  check_saved_block(op, pooled, h.scalar_type(), grad_out, hsel, idx, mean, invstd);
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
    BlockGradSums<scalar_t> sums(gp, sp, N * Ho * Wo, C, w.const_data_ptr<scalar_t>(),
                                 b.const_data_ptr<scalar_t>(), mp, ip);
    const std::vector<scalar_t>& a = sums.a;
    const std::vector<scalar_t>& shift = sums.shift;
    const ThreadAcc& s1 = sums.s1;
    const ThreadAcc& s2 = sums.s2;
    std::vector<scalar_t> k1(C), k2(C);
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

// ==== the grouped convolution with one input channel per group ====

constexpr int64_t kMaxTaps = 121;  // kernels up to 11x11

// The taps of output column j that fall inside the image: their index ky*kw + kx and the offset
// of their input pixel within a plane, for the output row whose first input row is y0.
struct Taps {
  int n = 0;
  int index[kMaxTaps];
  int64_t offset[kMaxTaps];
  void build(int64_t y0, int64_t x0, int64_t H, int64_t W, int64_t kh, int64_t kw) {
    n = 0;
    for (int64_t ky = 0; ky < kh; ++ky) {
      const int64_t yy = y0 + ky;
      if (yy < 0 || yy >= H) continue;
      for (int64_t kx = 0; kx < kw; ++kx) {
        const int64_t xx = x0 + kx;
        if (xx < 0 || xx >= W) continue;
        index[n] = static_cast<int>(ky * kw + kx);
        offset[n] = yy * W + xx;
        ++n;
      }
    }
  }
};

// y[c] = b[c] + sum_q v[q] wt[index[q] * C + c] for one (position, group); wt: (taps, C).
template <typename T>
IMAML_INLINE void conv_point_impl(const T* __restrict__ v, const int* __restrict__ index, int nt,
                                  const T* __restrict__ wt, const T* __restrict__ b, int64_t C,
                                  T* __restrict__ y) {
  using simd::vec_t;
  using simd::vload;
  constexpr int L = simd::kVec<T>;
  int64_t c = 0;
  for (; c + 2 * L <= C; c += 2 * L) {
    vec_t<T> a0 = b == nullptr ? vec_t<T>{} : vload(b + c);
    vec_t<T> a1 = b == nullptr ? vec_t<T>{} : vload(b + c + L);
    for (int q = 0; q < nt; ++q) {
      const T* w = wt + index[q] * C + c;
      a0 += v[q] * vload(w);
      a1 += v[q] * vload(w + L);
    }
    simd::vstore(y + c, a0);
    simd::vstore(y + c + L, a1);
  }
  for (; c < C; ++c) {
    T a = b == nullptr ? T(0) : b[c];
    for (int q = 0; q < nt; ++q) a += v[q] * wt[index[q] * C + c];
    y[c] = a;
  }
}

IMAML_SIMD void conv_point(const float* v, const int* index, int nt, const float* wt,
                           const float* b, int64_t C, float* y) {
  conv_point_impl(v, index, nt, wt, b, C, y);
}
IMAML_SIMD void conv_point(const double* v, const int* index, int nt, const double* wt,
                           const double* b, int64_t C, double* y) {
  conv_point_impl(v, index, nt, wt, b, C, y);
}

// acc[index[q] * C + c] += v[q] gy[c], accb[c] += gy[c] for one (position, group).
template <typename T>
IMAML_INLINE void wgrad_point_impl(const T* __restrict__ v, const int* __restrict__ index, int nt,
                                   const T* __restrict__ gy, int64_t C, T* __restrict__ acc,
                                   T* __restrict__ accb) {
  using simd::vec_t;
  using simd::vload;
  using simd::vstore;
  constexpr int L = simd::kVec<T>;
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    const vec_t<T> g = vload(gy + c);
    vstore(accb + c, vload(accb + c) + g);
    for (int q = 0; q < nt; ++q) {
      T* a = acc + index[q] * C + c;
      vstore(a, vload(a) + v[q] * g);
    }
  }
  for (; c < C; ++c) {
    accb[c] += gy[c];
    for (int q = 0; q < nt; ++q) acc[index[q] * C + c] += v[q] * gy[c];
  }
}

IMAML_SIMD void wgrad_point(const float* v, const int* index, int nt, const float* gy, int64_t C,
                            float* acc, float* accb) {
  wgrad_point_impl(v, index, nt, gy, C, acc, accb);
}
IMAML_SIMD void wgrad_point(const double* v, const int* index, int nt, const double* gy,
                            int64_t C, double* acc, double* accb) {
  wgrad_point_impl(v, index, nt, gy, C, acc, accb);
}

struct Geometry {
  int64_t N, G, H, W, C, kh, kw, sh, sw, ph, pw, Ho, Wo;
};

Geometry check_geometry(const char* op, const at::Tensor& x, int64_t GC, at::IntArrayRef kernel,
                        at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-d (N, groups, H, W), got ", x.dim(),
              "-d of shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous (N, groups, H, W), got strides ",
              x.strides());
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": kernel size, stride and padding must have 2 entries each");
  Geometry g{};
  g.N = x.size(0), g.G = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.kh = kernel[0], g.kw = kernel[1], g.sh = stride[0], g.sw = stride[1];
  g.ph = padding[0], g.pw = padding[1];
  TORCH_CHECK(g.G >= 1 && g.N >= 1, op, ": x must have at least one sample and one group, got ",
              x.sizes());
  TORCH_CHECK(GC % g.G == 0 && GC >= g.G, op, ": the output channels (", GC,
              ") must be a positive multiple of the groups, x.size(1) = ", g.G);
  g.C = GC / g.G;
  TORCH_CHECK(g.kh >= 1 && g.kw >= 1 && g.kh * g.kw <= kMaxTaps, op,
              ": kernel size must be at least 1x1 and at most ", kMaxTaps, " taps, got ", kernel);
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(g.ph >= 0 && g.pw >= 0 && g.ph < g.kh && g.pw < g.kw, op,
              ": padding must be >= 0 and smaller than the kernel, got ", padding);
  g.Ho = (g.H + 2 * g.ph - g.kh) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.kw) / g.sw + 1;
  TORCH_CHECK(g.H + 2 * g.ph >= g.kh && g.W + 2 * g.pw >= g.kw, op, ": the padded input ",
              x.sizes(), " is smaller than the kernel ", kernel);
  return g;
}

// grad_w (G*C, 1, kh, kw) and grad_b (G*C,) from per-group sums acc (G, T + 1, C): per tap,
// then the bias.
template <typename T>
void write_filter_sums(const double* acc, const Geometry& g, T* wp, T* bp) {
  const int64_t T_ = g.kh * g.kw;
  for (int64_t gr = 0; gr < g.G; ++gr) {
    const double* ag = acc + gr * (T_ + 1) * g.C;
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t t = 0; t < T_; ++t)
        wp[(gr * g.C + c) * T_ + t] = static_cast<T>(ag[t * g.C + c]);
      bp[gr * g.C + c] = static_cast<T>(ag[T_ * g.C + c]);
    }
  }
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ",
              x.scalar_type(), " like x, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
              " like x, got ", t.device());
}

at::Tensor conv1ch_cpu(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding) {
  const char* op = "conv1ch";
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1, op,
              ": weight must be (groups*C, 1, kh, kw), got ", weight.sizes());
  check_like(op, "weight", weight, x);
  const Geometry g = check_geometry(op, x, weight.size(0), weight.sizes().slice(2), stride,
                                    padding);
  const int64_t GC = g.G * g.C, T_ = g.kh * g.kw;
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == GC, op, ": bias must be (", GC,
                ",) = (groups*C,), got ", bias->sizes());
    check_like(op, "bias", *bias, x);
  }
  // (G, taps, C): each group's filters as rows of C channels, per tap
  const at::Tensor wt = weight.reshape({g.G, g.C, T_}).transpose(1, 2).contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({g.N, GC, g.Ho, g.Wo},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1ch", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = wt.const_data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t lo, int64_t hi) {
      Taps taps;
      scalar_t v[kMaxTaps];
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t n = row / g.Ho, i = row % g.Ho;
        for (int64_t j = 0; j < g.Wo; ++j) {
          taps.build(i * g.sh - g.ph, j * g.sw - g.pw, g.H, g.W, g.kh, g.kw);
          scalar_t* yj = yp + (row * g.Wo + j) * GC;
          for (int64_t gr = 0; gr < g.G; ++gr) {
            const scalar_t* plane = xp + (n * g.G + gr) * g.H * g.W;
            for (int q = 0; q < taps.n; ++q) v[q] = plane[taps.offset[q]];
            conv_point(v, taps.index, taps.n, wp + gr * T_ * g.C,
                       bp == nullptr ? nullptr : bp + gr * g.C, g.C, yj + gr * g.C);
          }
        }
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> conv1ch_weight_grad_cpu(const at::Tensor& grad_y,
                                                           const at::Tensor& x,
                                                           at::IntArrayRef kernel_size,
                                                           at::IntArrayRef stride,
                                                           at::IntArrayRef padding) {
  const char* op = "conv1ch_weight_grad";
  TORCH_CHECK(grad_y.dim() == 4, op, ": grad_y must be 4-d (N, groups*C, Ho, Wo), got ",
              grad_y.sizes());
  check_like(op, "grad_y", grad_y, x);
  const Geometry g = check_geometry(op, x, grad_y.size(1), kernel_size, stride, padding);
  TORCH_CHECK(grad_y.size(0) == g.N && grad_y.size(2) == g.Ho && grad_y.size(3) == g.Wo, op,
              ": grad_y must be (", g.N, ", ", g.G * g.C, ", ", g.Ho, ", ", g.Wo,
              ") for x ", x.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": grad_y must be channels-last contiguous, got strides ", grad_y.strides());
  const int64_t GC = g.G * g.C, T_ = g.kh * g.kw;
  const int64_t tile = g.G * (T_ + 1) * g.C;  // per group: taps x C filter sums, then C bias sums
  at::Tensor grad_w = at::empty({GC, 1, g.kh, g.kw}, x.options());
  at::Tensor grad_b = at::empty({GC}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1ch_weight_grad", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    const int nthreads = at::get_num_threads();
    std::vector<double> acc(static_cast<size_t>(nthreads) * tile, 0.0);
    at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t lo, int64_t hi) {
      double* mine = acc.data() + static_cast<size_t>(at::get_thread_num()) * tile;
      std::vector<scalar_t> part(tile);
      Taps taps;
      scalar_t v[kMaxTaps];
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t n = row / g.Ho, i = row % g.Ho;
        std::fill(part.begin(), part.end(), scalar_t(0));
        for (int64_t j = 0; j < g.Wo; ++j) {
          taps.build(i * g.sh - g.ph, j * g.sw - g.pw, g.H, g.W, g.kh, g.kw);
          const scalar_t* gj = gp + (row * g.Wo + j) * GC;
          for (int64_t gr = 0; gr < g.G; ++gr) {
            const scalar_t* plane = xp + (n * g.G + gr) * g.H * g.W;
            for (int q = 0; q < taps.n; ++q) v[q] = plane[taps.offset[q]];
            scalar_t* pg = part.data() + gr * (T_ + 1) * g.C;
            wgrad_point(v, taps.index, taps.n, gj + gr * g.C, g.C, pg, pg + T_ * g.C);
          }
        }
        for (int64_t k = 0; k < tile; ++k) mine[k] += static_cast<double>(part[k]);
      }
    });
    for (int t = 1; t < nthreads; ++t)
      for (int64_t k = 0; k < tile; ++k) acc[k] += acc[static_cast<size_t>(t) * tile + k];
    write_filter_sums(acc.data(), g, grad_w.data_ptr<scalar_t>(), grad_b.data_ptr<scalar_t>());
  });
  return {grad_w, grad_b};
}


// ==== conv1ch -> batch norm -> ReLU -> 2x2 max-pool ====

// The tap sums of one image from its patch columns Q (T x n, Q[t][p] = tap t of patch p):
// s1[t] += sum_p Q[t][p] and s2[t*T + u] += sum_p Q[t][p] Q[u][p] for t <= u, in T, added in
// double.
template <typename T>
IMAML_INLINE void image_moments_impl(const T* __restrict__ Q, const T* __restrict__ ones,
                                     int64_t T_, int64_t n, double* __restrict__ s1,
                                     double* __restrict__ s2) {
  for (int64_t t = 0; t < T_; ++t) {
    const T* a = Q + t * n;
    s1[t] += static_cast<double>(simd::dot_impl(a, ones, n));
    for (int64_t u = t; u < T_; ++u) s2[t * T_ + u] += static_cast<double>(simd::dot_impl(a, Q + u * n, n));
  }
}

IMAML_SIMD void image_moments(const float* Q, const float* ones, int64_t T_, int64_t n,
                              double* s1, double* s2) {
  image_moments_impl(Q, ones, T_, n, s1, s2);
}
IMAML_SIMD void image_moments(const double* Q, const double* ones, int64_t T_, int64_t n,
                              double* s1, double* s2) {
  image_moments_impl(Q, ones, T_, n, s1, s2);
}

// moments (G, T + T*T) in double: per group the patch mean m (T), then the covariance S (T x T,
// row-major), over the N*Ho*Wo output positions. Patch values are shifted by c_g, the group's
// pixel mean, first (the zero padding becomes -c_g), so that the second moments are centred
// sums without cancellation; S does not depend on the shift and m = m' + c_g. Each image is
// copied into a padded, shifted plane and its patch columns (T x Ho*Wo); every tap pair is then
// one contiguous dot product. Threads take images.
template <typename T>
void patch_moments(const T* xp, const Geometry& g, double* mom) {
  const int64_t T_ = g.kh * g.kw, stride = T_ + T_ * T_, R = g.N * g.Ho * g.Wo;
  const int64_t Hq = g.H + 2 * g.ph, Wq = g.W + 2 * g.pw, HW = g.H * g.W;
  const int nthreads = at::get_num_threads();
  std::vector<double> shift(g.G, 0.0);
  at::parallel_for(0, g.G, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t gr = lo; gr < hi; ++gr) {
      double sum = 0.0;
      for (int64_t n = 0; n < g.N; ++n) {
        const T* plane = xp + (n * g.G + gr) * HW;
        for (int64_t k = 0; k < HW; ++k) sum += static_cast<double>(plane[k]);
      }
      shift[gr] = sum / static_cast<double>(g.N * HW);
    }
  });
  std::vector<double> acc(static_cast<size_t>(nthreads) * g.G * stride, 0.0);
  at::parallel_for(0, g.N * g.G, 1, [&](int64_t lo, int64_t hi) {
    double* mine = acc.data() + static_cast<size_t>(at::get_thread_num()) * g.G * stride;
    const int64_t P = g.Ho * g.Wo;
    std::vector<T> q(Hq * Wq), Q(T_ * P), ones(P, T(1));
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t gr = item % g.G;
      const T c = static_cast<T>(shift[gr]);
      const T* plane = xp + item * HW;
      std::fill(q.begin(), q.end(), -c);
      for (int64_t y = 0; y < g.H; ++y)
        for (int64_t x = 0; x < g.W; ++x) q[(y + g.ph) * Wq + x + g.pw] = plane[y * g.W + x] - c;
      for (int64_t t = 0; t < T_; ++t) {  // the patch columns (one input channel's im2col)
        const T* src = q.data() + (t / g.kw) * Wq + t % g.kw;
        T* dst = Q.data() + t * P;
        for (int64_t i = 0; i < g.Ho; ++i)
          for (int64_t j = 0; j < g.Wo; ++j) dst[i * g.Wo + j] = src[i * g.sh * Wq + j * g.sw];
      }
      double* a = mine + gr * stride;
      image_moments(Q.data(), ones.data(), T_, P, a, a + T_);
    }
  });
  for (int th = 1; th < nthreads; ++th)
    for (int64_t k = 0; k < g.G * stride; ++k)
      acc[k] += acc[static_cast<size_t>(th) * g.G * stride + k];
  for (int64_t gr = 0; gr < g.G; ++gr) {
    const double* a = acc.data() + gr * stride;
    double* m = mom + gr * stride;
    for (int64_t t = 0; t < T_; ++t) m[t] = a[t] / R;  // the shifted mean m'
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t u = t; u < T_; ++u)
        m[T_ + t * T_ + u] = m[T_ + u * T_ + t] = a[T_ + t * T_ + u] / R - m[t] * m[u];
    for (int64_t t = 0; t < T_; ++t) m[t] += shift[gr];
  }
}

// acc[t][c] += v[c] P[idx[c]][t] and accb[c] += v[c] for one vector of L channels at c, with P
// the four window patches (4 x T) of one pooled position of one group.
template <typename T>
IMAML_INLINE void add_selected(const simd::vec_t<T>& v, const uint8_t* __restrict__ idx,
                               const T* __restrict__ P, int64_t T_, int64_t C, int64_t c,
                               T* __restrict__ acc, T* __restrict__ accb) {
  using simd::vec_t;
  using simd::vload;
  using simd::vstore;
  constexpr int L = simd::kVec<T>;
  vec_t<T> k;
  for (int l = 0; l < L; ++l) k[l] = static_cast<T>(idx[c + l]);
  const vec_t<T> v0 = k == T(0) ? v : vec_t<T>{}, v1 = k == T(1) ? v : vec_t<T>{};
  const vec_t<T> v2 = k == T(2) ? v : vec_t<T>{}, v3 = k == T(3) ? v : vec_t<T>{};
  vstore(accb + c, vload(accb + c) + v);
  const T* P1 = P + T_;
  const T* P2 = P + 2 * T_;
  const T* P3 = P + 3 * T_;
  for (int64_t t = 0; t < T_; ++t) {
    T* at = acc + t * C + c;
    vstore(at, vload(at) + v0 * P[t] + v1 * P1[t] + v2 * P2[t] + v3 * P3[t]);
  }
}

template <typename T>
IMAML_INLINE void add_selected_one(T v, uint8_t idx, const T* __restrict__ P, int64_t T_,
                                   int64_t C, int64_t c, T* __restrict__ acc,
                                   T* __restrict__ accb) {
  const T* Pk = P + idx * T_;
  accb[c] += v;
  for (int64_t t = 0; t < T_; ++t) acc[t * C + c] += v * Pk[t];
}

// The sparse part of the fused block's convolution-weight gradient at one pooled position of
// one group: v = a dz (dz = g where the block's ReLU passes) with the arg-max's patch.
template <typename T>
IMAML_INLINE void sparse_conv_grad_impl(const T* __restrict__ g, const T* __restrict__ hsel,
                                        const uint8_t* __restrict__ idx,
                                        const T* __restrict__ a, const T* __restrict__ b,
                                        const T* __restrict__ P, int64_t T_, int64_t C,
                                        T* __restrict__ acc, T* __restrict__ accb) {
  using simd::vec_t;
  using simd::vload;
  constexpr int L = simd::kVec<T>;
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    const vec_t<T> ac = vload(a + c);
    const vec_t<T> z = ac * vload(hsel + c) + vload(b + c);
    add_selected<T>(z > T(0) ? ac * vload(g + c) : vec_t<T>{}, idx, P, T_, C, c, acc, accb);
  }
  for (; c < C; ++c) {
    const T z = a[c] * hsel[c] + b[c];
    add_selected_one(z > T(0) ? a[c] * g[c] : T(0), idx[c], P, T_, C, c, acc, accb);
  }
}

IMAML_SIMD void sparse_conv_grad(const float* g, const float* hsel, const uint8_t* idx,
                                 const float* a, const float* b, const float* P, int64_t T_,
                                 int64_t C, float* acc, float* accb) {
  sparse_conv_grad_impl(g, hsel, idx, a, b, P, T_, C, acc, accb);
}
IMAML_SIMD void sparse_conv_grad(const double* g, const double* hsel, const uint8_t* idx,
                                 const double* a, const double* b, const double* P, int64_t T_,
                                 int64_t C, double* acc, double* accb) {
  sparse_conv_grad_impl(g, hsel, idx, a, b, P, T_, C, acc, accb);
}

// The weight gradient of conv1ch_select at one pooled position of one group: v = gu.
template <typename T>
IMAML_INLINE void select_grad_impl(const T* __restrict__ gu, const uint8_t* __restrict__ idx,
                                   const T* __restrict__ P, int64_t T_, int64_t C,
                                   T* __restrict__ acc, T* __restrict__ accb) {
  constexpr int L = simd::kVec<T>;
  int64_t c = 0;
  for (; c + L <= C; c += L) add_selected<T>(simd::vload(gu + c), idx, P, T_, C, c, acc, accb);
  for (; c < C; ++c) add_selected_one(gu[c], idx[c], P, T_, C, c, acc, accb);
}

IMAML_SIMD void select_grad(const float* gu, const uint8_t* idx, const float* P, int64_t T_,
                            int64_t C, float* acc, float* accb) {
  select_grad_impl(gu, idx, P, T_, C, acc, accb);
}
IMAML_SIMD void select_grad(const double* gu, const uint8_t* idx, const double* P, int64_t T_,
                            int64_t C, double* acc, double* accb) {
  select_grad_impl(gu, idx, P, T_, C, acc, accb);
}

// The zero-padded images of one sample, all groups (G x Hq x Wq), and the offset of each tap
// from a patch's corner: patches are then read without bounds checks.
template <typename T>
struct PaddedPlanes {
  int64_t n = -1, Hq = 0, Wq = 0;
  std::vector<T> q;
  std::vector<int64_t> off;
  explicit PaddedPlanes(const Geometry& g)
      : Hq(g.H + 2 * g.ph), Wq(g.W + 2 * g.pw), q(g.G * Hq * Wq), off(g.kh * g.kw) {
    for (int64_t t = 0; t < g.kh * g.kw; ++t) off[t] = (t / g.kw) * Wq + t % g.kw;
  }
  void load(const T* xp, const Geometry& g, int64_t n_) {
    if (n_ == n) return;
    n = n_;
    std::fill(q.begin(), q.end(), T(0));
    for (int64_t gr = 0; gr < g.G; ++gr) {
      const T* plane = xp + (n * g.G + gr) * g.H * g.W;
      T* dst = q.data() + gr * Hq * Wq + g.ph * Wq + g.pw;
      for (int64_t y = 0; y < g.H; ++y)
        std::copy(plane + y * g.W, plane + (y + 1) * g.W, dst + y * Wq);
    }
  }
};

// The four window patches of groups g0 <= gr < g1 at pooled position (yo, xo) of the loaded
// sample: P ((g1 - g0) x 4 x T), zeros in the padding.
template <typename T>
void window_patches(const PaddedPlanes<T>& pp, const Geometry& g, int64_t yo, int64_t xo,
                    int64_t g0, int64_t g1, T* P) {
  const int64_t T_ = g.kh * g.kw;
  const int64_t* off = pp.off.data();
  for (int k = 0; k < 4; ++k) {
    const int64_t i = 2 * yo + k / 2, j = 2 * xo + k % 2;
    const T* corner = pp.q.data() + i * g.sh * pp.Wq + j * g.sw;
    for (int64_t gr = g0; gr < g1; ++gr) {
      const T* base = corner + gr * pp.Hq * pp.Wq;
      T* dst = P + ((gr - g0) * 4 + k) * T_;
      for (int64_t t = 0; t < T_; ++t) dst[t] = base[off[t]];
    }
  }
}

// The per-group sums (G, T + 1, C) in double of fn(P, o, gr, tile) over the pooled positions:
// fn adds the position's contributions for group gr to tile (T + 1 rows of C: per tap, then
// the bias) given P, the four window patches of the group (4 x T), and o, the position's offset
// in a pooled channels-last tensor. Threads take pooled row bands; each sums a band in T, then
// into its own double accumulator; the accumulators are added in thread order.
template <typename T, typename Fn>
std::vector<double> window_patch_sums(const T* xp, const Geometry& g, Fn fn) {
  const int64_t T_ = g.kh * g.kw, GC = g.G * g.C, Hp = g.Ho / 2, Wp = g.Wo / 2;
  const int64_t tile = g.G * (T_ + 1) * g.C;
  const int nthreads = at::get_num_threads();
  std::vector<double> acc(static_cast<size_t>(nthreads) * tile, 0.0);
  at::parallel_for(0, g.N * Hp, 1, [&](int64_t lo, int64_t hi) {
    double* mine = acc.data() + static_cast<size_t>(at::get_thread_num()) * tile;
    std::vector<T> part(tile);
    std::vector<T> P(4 * T_);
    PaddedPlanes<T> pp(g);
    for (int64_t band = lo; band < hi; ++band) {
      const int64_t n = band / Hp, yo = band % Hp;
      pp.load(xp, g, n);
      std::fill(part.begin(), part.end(), T(0));
      // group by group, so that one group's tile stays in the L1 cache along the band
      for (int64_t gr = 0; gr < g.G; ++gr) {
        for (int64_t xo = 0; xo < Wp; ++xo) {
          window_patches(pp, g, yo, xo, gr, gr + 1, P.data());
          fn(P.data(), (band * Wp + xo) * GC, gr, part.data() + gr * (T_ + 1) * g.C);
        }
      }
      for (int64_t k = 0; k < tile; ++k) mine[k] += static_cast<double>(part[k]);
    }
  });
  for (int th = 1; th < nthreads; ++th)
    for (int64_t k = 0; k < tile; ++k) acc[k] += acc[static_cast<size_t>(th) * tile + k];
  acc.resize(tile);
  return acc;
}

// The convolution of one group at the four positions of a pooling window: out_k[c] = b[c] +
// sum_t P_k[t] wt[t * C + c], P: the four full patches (4 x T, zeros in the padding). Two
// channel vectors of four positions at a time: eight independent multiply-add chains, each
// weight vector loaded once for the four positions.
template <typename T>
IMAML_INLINE void conv_window_impl(const T* __restrict__ P, int64_t T_, const T* __restrict__ wt,
                                   const T* __restrict__ b, int64_t C, T* __restrict__ out,
                                   int64_t out_stride) {
  using simd::vec_t;
  using simd::vload;
  using simd::vstore;
  constexpr int L = simd::kVec<T>;
  const T* P1 = P + T_;
  const T* P2 = P + 2 * T_;
  const T* P3 = P + 3 * T_;
  int64_t c = 0;
  for (; c + 2 * L <= C; c += 2 * L) {
    const vec_t<T> b0 = b == nullptr ? vec_t<T>{} : vload(b + c);
    const vec_t<T> b1 = b == nullptr ? vec_t<T>{} : vload(b + c + L);
    vec_t<T> a00 = b0, a01 = b1, a10 = b0, a11 = b1, a20 = b0, a21 = b1, a30 = b0, a31 = b1;
    for (int64_t t = 0; t < T_; ++t) {
      const vec_t<T> w0 = vload(wt + t * C + c), w1 = vload(wt + t * C + c + L);
      a00 += P[t] * w0;
      a01 += P[t] * w1;
      a10 += P1[t] * w0;
      a11 += P1[t] * w1;
      a20 += P2[t] * w0;
      a21 += P2[t] * w1;
      a30 += P3[t] * w0;
      a31 += P3[t] * w1;
    }
    vstore(out + c, a00);
    vstore(out + c + L, a01);
    vstore(out + out_stride + c, a10);
    vstore(out + out_stride + c + L, a11);
    vstore(out + 2 * out_stride + c, a20);
    vstore(out + 2 * out_stride + c + L, a21);
    vstore(out + 3 * out_stride + c, a30);
    vstore(out + 3 * out_stride + c + L, a31);
  }
  for (; c < C; ++c) {
    for (int k = 0; k < 4; ++k) {
      T a = b == nullptr ? T(0) : b[c];
      for (int64_t t = 0; t < T_; ++t) a += P[k * T_ + t] * wt[t * C + c];
      out[k * out_stride + c] = a;
    }
  }
}

IMAML_SIMD void conv_window(const float* P, int64_t T_, const float* wt, const float* b,
                            int64_t C, float* out, int64_t out_stride) {
  conv_window_impl(P, T_, wt, b, C, out, out_stride);
}
IMAML_SIMD void conv_window(const double* P, int64_t T_, const double* wt, const double* b,
                            int64_t C, double* out, int64_t out_stride) {
  conv_window_impl(P, T_, wt, b, C, out, out_stride);
}

// The convolution at the four positions of every 2x2 pooling window: fn(win, band, xo) with
// win (4 x G*C, window order) for pooled position (band = n * Hp + yo, xo). Threads take bands.
template <typename T, typename Fn>
void window_convs(const T* xp, const T* wt, const T* cb, const Geometry& g, Fn fn) {
  const int64_t T_ = g.kh * g.kw, GC = g.G * g.C, Hp = g.Ho / 2, Wp = g.Wo / 2;
  at::parallel_for(0, g.N * Hp, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> win(4 * GC);
    std::vector<T> P(4 * T_ * g.G);
    PaddedPlanes<T> pp(g);
    for (int64_t band = lo; band < hi; ++band) {
      const int64_t n = band / Hp, yo = band % Hp;
      pp.load(xp, g, n);
      for (int64_t xo = 0; xo < Wp; ++xo) {
        window_patches(pp, g, yo, xo, 0, g.G, P.data());
        for (int64_t gr = 0; gr < g.G; ++gr)
          conv_window(P.data() + gr * 4 * T_, T_, wt + gr * T_ * g.C,
                      cb == nullptr ? nullptr : cb + gr * g.C, g.C, win.data() + gr * g.C, GC);
        fn(win.data(), band, xo);
      }
    }
  });
}

Geometry check_fused_block(const char* op, const at::Tensor& x, const at::Tensor& conv_weight,
                           const at::Tensor& weight, const at::Tensor& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(1) == 1, op,
              ": conv_weight must be (groups*C, 1, kh, kw), got ", conv_weight.sizes());
  check_like(op, "conv_weight", conv_weight, x);
  const Geometry g = check_geometry(op, x, conv_weight.size(0), conv_weight.sizes().slice(2),
                                    stride, padding);
  const int64_t GC = g.G * g.C;
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"weight", weight},
                         std::pair<const char*, const at::Tensor&>{"bias", bias}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == GC, op, ": ", name, " must be (", GC,
                ",) = (groups*C,), got ", t.sizes());
    check_like(op, name, t, x);
  }
  TORCH_CHECK(g.Ho >= 2 && g.Wo >= 2, op, ": the convolution's output must be at least 2x2 for ",
              "2x2 max-pooling, got ", g.Ho, "x", g.Wo);
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv1ch_bn_relu_pool_cpu(const at::Tensor& x, const at::Tensor& conv_weight,
                         const c10::optional<at::Tensor>& conv_bias, const at::Tensor& weight,
                         const at::Tensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                         double eps) {
  const char* op = "conv1ch_bn_relu_pool";
  const Geometry g = check_fused_block(op, x, conv_weight, weight, bias, stride, padding);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  const int64_t GC = g.G * g.C, T_ = g.kh * g.kw, Hp = g.Ho / 2, Wp = g.Wo / 2;
  const bool has_cb = conv_bias.has_value() && conv_bias->defined();
  if (has_cb) {
    TORCH_CHECK(conv_bias->dim() == 1 && conv_bias->size(0) == GC, op, ": conv_bias must be (",
                GC, ",) = (groups*C,), got ", conv_bias->sizes());
    check_like(op, "conv_bias", *conv_bias, x);
  }
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty({g.N, GC, Hp, Wp}, x.options().memory_format(cl));
  at::Tensor hsel = at::empty({g.N, GC, Hp, Wp}, x.options().memory_format(cl));
  at::Tensor idx = at::empty({g.N, GC, Hp, Wp}, x.options().dtype(at::kByte).memory_format(cl));
  at::Tensor mean = at::empty({GC}, x.options());
  at::Tensor invstd = at::empty({GC}, x.options());
  at::Tensor moments = at::empty({g.G, T_ + T_ * T_}, x.options().dtype(at::kDouble));
  const at::Tensor wt = conv_weight.reshape({g.G, g.C, T_}).transpose(1, 2).contiguous();
  const at::Tensor w = conv_weight.reshape({GC, T_}).to(at::kDouble).contiguous();
  const at::Tensor cb = has_cb ? conv_bias->contiguous() : at::Tensor();
  const at::Tensor bw = weight.contiguous(), bb = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1ch_bn_relu_pool", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    double* mom = moments.data_ptr<double>();
    patch_moments(xp, g, mom);
    const double* wd = w.const_data_ptr<double>();
    const scalar_t* cbp = has_cb ? cb.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bwp = bw.const_data_ptr<scalar_t>();
    const scalar_t* bbp = bb.const_data_ptr<scalar_t>();
    scalar_t* mp = mean.data_ptr<scalar_t>();
    scalar_t* ip = invstd.data_ptr<scalar_t>();
    std::vector<scalar_t> a(GC), shift(GC);
    for (int64_t gr = 0; gr < g.G; ++gr) {
      const double* m = mom + gr * (T_ + T_ * T_);
      const double* S = m + T_;
      for (int64_t c = gr * g.C; c < (gr + 1) * g.C; ++c) {
        const double* wc = wd + c * T_;
        double mu = cbp == nullptr ? 0.0 : static_cast<double>(cbp[c]), var = 0.0;
        for (int64_t t = 0; t < T_; ++t) {
          mu += wc[t] * m[t];
          double sw = 0.0;
          for (int64_t u = 0; u < T_; ++u) sw += S[t * T_ + u] * wc[u];
          var += wc[t] * sw;
        }
        mp[c] = static_cast<scalar_t>(mu);
        ip[c] = static_cast<scalar_t>(1.0 / std::sqrt(std::max(var, 0.0) + eps));
        a[c] = bwp[c] * ip[c];
        shift[c] = bbp[c] - mp[c] * a[c];
      }
    }
    const scalar_t* wp = wt.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    scalar_t* sp = hsel.data_ptr<scalar_t>();
    uint8_t* xi = idx.data_ptr<uint8_t>();
    window_convs<scalar_t>(xp, wp, cbp, g, [&](const scalar_t* win, int64_t band, int64_t xo) {
      const int64_t o = (band * Wp + xo) * GC;
      pool_window(win, win + GC, win + 2 * GC, win + 3 * GC, GC, a.data(), shift.data(),
                  op_ + o, sp + o, xi + o);
    });
  });
  return {out, mean, invstd, hsel, idx, moments};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv1ch_bn_relu_pool_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& conv_weight,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& hsel, const at::Tensor& idx,
    const at::Tensor& moments, at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "conv1ch_bn_relu_pool_backward";
  const Geometry g = check_fused_block(op, x, conv_weight, weight, bias, stride, padding);
  const int64_t GC = g.G * g.C, T_ = g.kh * g.kw, Hp = g.Ho / 2, Wp = g.Wo / 2;
  const int64_t mstride = T_ + T_ * T_;
  const std::vector<int64_t> pooled{g.N, GC, Hp, Wp};
  check_saved_block(op, pooled, x.scalar_type(), grad_out, hsel, idx, mean, invstd);
  TORCH_CHECK(moments.dim() == 2 && moments.size(0) == g.G && moments.size(1) == mstride &&
                  moments.scalar_type() == at::kDouble && moments.is_contiguous(),
              op, ": moments must be (", g.G, ", ", mstride, ") float64 contiguous, got ",
              moments.sizes(), " of ", moments.scalar_type());
  at::Tensor grad_cw = at::empty({GC, 1, g.kh, g.kw}, x.options());
  at::Tensor grad_cb = at::empty({GC}, x.options());
  at::Tensor grad_w = at::empty({GC}, x.options());
  at::Tensor grad_b = at::empty({GC}, x.options());
  const at::Tensor bw = weight.contiguous(), bb = bias.contiguous();
  const at::Tensor m = mean.contiguous(), is = invstd.contiguous();
  const at::Tensor w = conv_weight.reshape({GC, T_}).to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1ch_bn_relu_pool", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* sp = hsel.const_data_ptr<scalar_t>();
    const uint8_t* xi = idx.const_data_ptr<uint8_t>();
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const scalar_t* ip = is.const_data_ptr<scalar_t>();
    const double* mom = moments.const_data_ptr<double>();
    const double* wd = w.const_data_ptr<double>();
    // the batch-norm sums over the pooled positions (as bn_relu_pool_backward)
    BlockGradSums<scalar_t> sums(gp, sp, g.N * Hp * Wp, GC, bw.const_data_ptr<scalar_t>(),
                                 bb.const_data_ptr<scalar_t>(), mp, ip);
    const std::vector<scalar_t>& a = sums.a;
    const std::vector<scalar_t>& shift = sums.shift;
    const ThreadAcc& s1 = sums.s1;
    const ThreadAcc& s2 = sums.s2;
    // the sparse part: a dz at each window's arg-max, with that position's patch
    const std::vector<double> acc = window_patch_sums<scalar_t>(
        xp, g, [&](const scalar_t* P, int64_t o, int64_t gr, scalar_t* pg) {
          const int64_t c0 = gr * g.C;
          sparse_conv_grad(gp + o + c0, sp + o + c0, xi + o + c0, a.data() + c0,
                           shift.data() + c0, P, T_, g.C, pg, pg + T_ * g.C);
        });
    // the dense part in closed form: sum_pos (k1 + k2 (h - mean)) p = R (k1 m + k2 S w_c)
    scalar_t* gcw = grad_cw.data_ptr<scalar_t>();
    scalar_t* gcb = grad_cb.data_ptr<scalar_t>();
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    scalar_t* gb = grad_b.data_ptr<scalar_t>();
    for (int64_t gr = 0; gr < g.G; ++gr) {
      const double* mg = mom + gr * mstride;
      const double* S = mg + T_;
      const double* ag = acc.data() + gr * (T_ + 1) * g.C;
      for (int64_t cc = 0; cc < g.C; ++cc) {
        const int64_t c = gr * g.C + cc;
        const double ac = static_cast<double>(a[c]);
        const double rk1 = -ac * s1.buf[c];                                   // R k1
        const double rk2 = -ac * static_cast<double>(ip[c]) * s2.buf[c];      // R k2
        const double* wc = wd + c * T_;
        for (int64_t t = 0; t < T_; ++t) {
          double sw = 0.0;
          for (int64_t u = 0; u < T_; ++u) sw += S[t * T_ + u] * wc[u];
          gcw[c * T_ + t] = static_cast<scalar_t>(ag[t * g.C + cc] + rk1 * mg[t] + rk2 * sw);
        }
        gcb[c] = static_cast<scalar_t>(ag[T_ * g.C + cc] + rk1);
        gb[c] = static_cast<scalar_t>(s1.buf[c]);
        gw[c] = static_cast<scalar_t>(s2.buf[c]);
      }
    }
  });
  return {grad_cw, grad_cb, grad_w, grad_b};
}


// u[c] = win[idx[c] * stride + c]: each channel's value at its window position (idx 0..3).
// Returns whether some idx is out of range (such a channel gets position 3).
template <typename T>
IMAML_INLINE bool select_window_impl(const T* __restrict__ win, int64_t stride,
                                     const uint8_t* __restrict__ idx, T* __restrict__ u) {
  uint8_t top = 0;
  for (int64_t c = 0; c < stride; ++c) top = idx[c] > top ? idx[c] : top;
  using simd::vec_t;
  using simd::vload;
  constexpr int L = simd::kVec<T>;
  int64_t c = 0;
  for (; c + L <= stride; c += L) {
    vec_t<T> k;
    for (int l = 0; l < L; ++l) k[l] = static_cast<T>(idx[c + l]);
    const vec_t<T> w0 = vload(win + c), w1 = vload(win + stride + c);
    const vec_t<T> w2 = vload(win + 2 * stride + c), w3 = vload(win + 3 * stride + c);
    simd::vstore(u + c, k == T(0) ? w0 : (k == T(1) ? w1 : (k == T(2) ? w2 : w3)));
  }
  for (; c < stride; ++c) u[c] = win[std::min<int64_t>(idx[c], 3) * stride + c];
  return top > 3;
}

IMAML_SIMD bool select_window(const float* win, int64_t stride, const uint8_t* idx, float* u) {
  return select_window_impl(win, stride, idx, u);
}
IMAML_SIMD bool select_window(const double* win, int64_t stride, const uint8_t* idx, double* u) {
  return select_window_impl(win, stride, idx, u);
}

// ==== the convolution at each pooling window's selected position ====

void check_selection(const char* op, const char* name, const at::Tensor& t, const Geometry& g,
                     at::ScalarType dtype) {
  const std::vector<int64_t> pooled{g.N, g.G * g.C, g.Ho / 2, g.Wo / 2};
  TORCH_CHECK(g.Ho >= 2 && g.Wo >= 2, op, ": the convolution's output must be at least 2x2 for ",
              "2x2 windows, got ", g.Ho, "x", g.Wo);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(pooled), op, ": ", name, " must be ",
              at::IntArrayRef(pooled), " (one entry per 2x2 window), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": ", name,
              " must be channels-last contiguous, got strides ", t.strides());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
}

at::Tensor conv1ch_select_cpu(const at::Tensor& x, const at::Tensor& conv_weight,
                              const c10::optional<at::Tensor>& conv_bias, const at::Tensor& idx,
                              at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "conv1ch_select";
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(1) == 1, op,
              ": conv_weight must be (groups*C, 1, kh, kw), got ", conv_weight.sizes());
  check_like(op, "conv_weight", conv_weight, x);
  const Geometry g = check_geometry(op, x, conv_weight.size(0), conv_weight.sizes().slice(2),
                                    stride, padding);
  check_selection(op, "idx", idx, g, at::kByte);
  const int64_t GC = g.G * g.C, T_ = g.kh * g.kw, Hp = g.Ho / 2, Wp = g.Wo / 2;
  const bool has_cb = conv_bias.has_value() && conv_bias->defined();
  if (has_cb) {
    TORCH_CHECK(conv_bias->dim() == 1 && conv_bias->size(0) == GC, op, ": conv_bias must be (",
                GC, ",) = (groups*C,), got ", conv_bias->sizes());
    check_like(op, "conv_bias", *conv_bias, x);
  }
  const at::Tensor wt = conv_weight.reshape({g.G, g.C, T_}).transpose(1, 2).contiguous();
  const at::Tensor cb = has_cb ? conv_bias->contiguous() : at::Tensor();
  at::Tensor u = at::empty({g.N, GC, Hp, Wp},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  std::atomic<int> bad{0};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1ch_select", [&] {
    const uint8_t* xi = idx.const_data_ptr<uint8_t>();
    scalar_t* up = u.data_ptr<scalar_t>();
    window_convs<scalar_t>(x.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(),
                           has_cb ? cb.const_data_ptr<scalar_t>() : nullptr, g,
                           [&](const scalar_t* win, int64_t band, int64_t xo) {
                             const int64_t o = (band * Wp + xo) * GC;
                             if (select_window(win, GC, xi + o, up + o)) bad = 1;
                           });
  });
  TORCH_CHECK(bad.load() == 0, op, ": idx must be in 0..3 (the position in a 2x2 window)");
  return u;
}

std::tuple<at::Tensor, at::Tensor> conv1ch_select_weight_grad_cpu(
    const at::Tensor& grad_u, const at::Tensor& x, const at::Tensor& idx,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "conv1ch_select_weight_grad";
  TORCH_CHECK(grad_u.dim() == 4, op, ": grad_u must be 4-d (N, groups*C, Ho/2, Wo/2), got ",
              grad_u.sizes());
  check_like(op, "grad_u", grad_u, x);
  const Geometry g = check_geometry(op, x, grad_u.size(1), kernel_size, stride, padding);
  check_selection(op, "grad_u", grad_u, g, x.scalar_type());
  check_selection(op, "idx", idx, g, at::kByte);
  check_window_idx(op, idx);
  const int64_t GC = g.G * g.C, T_ = g.kh * g.kw;
  at::Tensor grad_w = at::empty({GC, 1, g.kh, g.kw}, x.options());
  at::Tensor grad_b = at::empty({GC}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1ch_select_weight_grad", [&] {
    const scalar_t* gp = grad_u.const_data_ptr<scalar_t>();
    const uint8_t* xi = idx.const_data_ptr<uint8_t>();
    const std::vector<double> acc = window_patch_sums<scalar_t>(
        x.const_data_ptr<scalar_t>(), g,
        [&](const scalar_t* P, int64_t o, int64_t gr, scalar_t* pg) {
          const int64_t c0 = gr * g.C;
          select_grad(gp + o + c0, xi + o + c0, P, T_, g.C, pg, pg + T_ * g.C);
        });
    write_filter_sums(acc.data(), g, grad_w.data_ptr<scalar_t>(), grad_b.data_ptr<scalar_t>());
  });
  return {grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CPU, m) {
  m.impl("bn_relu_pool", &bn_relu_pool_cpu);
  m.impl("bn_relu_pool_backward", &bn_relu_pool_backward_cpu);
  m.impl("conv1ch", &conv1ch_cpu);
  m.impl("conv1ch_weight_grad", &conv1ch_weight_grad_cpu);
  m.impl("conv1ch_bn_relu_pool", &conv1ch_bn_relu_pool_cpu);
  m.impl("conv1ch_bn_relu_pool_backward", &conv1ch_bn_relu_pool_backward_cpu);
  m.impl("conv1ch_select", &conv1ch_select_cpu);
  m.impl("conv1ch_select_weight_grad", &conv1ch_select_weight_grad_cpu);
}

}  // namespace imaml_ext

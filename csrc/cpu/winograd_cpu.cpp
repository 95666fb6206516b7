// CPU kernels of the 3x3 convolution (stride 1, padding 1, groups) by Winograd's minimal
// filtering F(2x2, 3x3) (Lavin & Gray, "Fast algorithms for convolutional neural networks",
// 2016): each 2x2 output tile is Y = A^T [(G g G^T) (.) (B^T d B)] A for the 4x4 input tile d
// around it, so the 36 multiply-adds per output channel, input channel and tile of the direct
// convolution become 16, as 16 independent (tiles x Ci) by (Ci x Co) matrix products. Schemas in
// csrc/module.cpp; the reference twin is ATen's convolution (imaml_ext.reference.conv3x3).
//
// Why: on the CPU the conv net's layers 2-4 (64 -> 64 channels, 3x3) are about two thirds of a
// 20-way 5-shot gradient, and oneDNN's direct convolution already runs near the cores' FMA peak
// there; fewer multiplies are the remaining lever. Measured on the 2-core Xeon (float32, 2
// threads, best of 20): 100 images of 14x14, forward 2.75 ms against oneDNN's 4.03, weight
// gradient 3.43 against 4.49; 7x7 even; 3x3 slower (imaml_ext.hvp.WINOGRAD_MIN_SIZE).
//
// Layout: channels-last (N, H, W, C in memory) in and out. Work items are (group, block of
// kTileBlock tiles of the flattened (image, tile row, tile column) grid), group-major, through
// at::parallel_for; a block's transformed inputs V (tiles, 16, Ci) and products M (tiles, 16,
// Co), rows padded by one vector (scratch_stride), stay in the thread's L2, each product's
// filter matrix U[xi] (Ci, Co) in L1.
//
// Numerics: B and A hold 0 and +-1, G holds 0, +-1/2 and 1, so the transforms add and subtract;
// the error against the direct convolution is a small multiple of float32's (tests bound it
// against the float64 twin).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "simd_clones.h"
#include "vec64.h"

namespace imaml_ext {
namespace wino {  // named: GCC's target_clones (IMAML_SIMD) want external linkage

using simd::kVec;
using simd::vec_t;
using simd::vload;
using simd::vstore;

constexpr int64_t kTileBlock = 48;  // tiles per block: V and M of 64 channels, 192 KB each

struct WinoGeometry {
  int64_t N, H, W, G, Ci, Co, TH, TW;
  int64_t tiles() const { return N * TH * TW; }
};

// U[gr][xi][ci][0..Co) = (G w G^T)[xi] for the filters of group gr and input channel ci, from
// wt (G, Ci, 9, Co): the filters' taps with the output channels contiguous, so that the
// transform runs over vectors of output channels (G holds 0, +-1/2 and 1: exact scalings).
template <typename T>
IMAML_INLINE void transform_filters_impl(const T* __restrict__ wt, const WinoGeometry& g,
                                         int64_t gr, int64_t ci, T* __restrict__ U) {
  constexpr int L = kVec<T>;
  const T h = T(0.5);
  const T* f = wt + (gr * g.Ci + ci) * 9 * g.Co;
  for (int64_t co = 0; co < g.Co; co += L) {
    vec_t<T> w[3][3];
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 3; ++b) w[a][b] = vload(f + (a * 3 + b) * g.Co + co);
    vec_t<T> t[4][3];  // G w
    for (int b = 0; b < 3; ++b) {
      t[0][b] = w[0][b];
      t[1][b] = h * (w[0][b] + w[1][b] + w[2][b]);
      t[2][b] = h * (w[0][b] - w[1][b] + w[2][b]);
      t[3][b] = w[2][b];
    }
    for (int i = 0; i < 4; ++i) {  // (G w) G^T
      T* u = U + ((gr * 16 + i * 4) * g.Ci + ci) * g.Co + co;
      const int64_t s = g.Ci * g.Co;
      vstore(u, t[i][0]);
      vstore(u + s, h * (t[i][0] + t[i][1] + t[i][2]));
      vstore(u + 2 * s, h * (t[i][0] - t[i][1] + t[i][2]));
      vstore(u + 3 * s, t[i][2]);
    }
  }
}

// V[xi][0..Ci) = (B^T d B)[xi] for tile t's 4x4 input d of group gr, zero outside the map (x
// channels-last); the tiles inside the map (most of them) load without bounds checks.
template <typename T>
IMAML_INLINE void input_transform(const T* __restrict__ x, const WinoGeometry& g, int64_t gr,
                                  int64_t t, T* __restrict__ V) {
  constexpr int L = kVec<T>;
  const int64_t n = t / (g.TH * g.TW), ty = (t / g.TW) % g.TH, tx = t % g.TW;
  const int64_t y0 = 2 * ty - 1, x0 = 2 * tx - 1, C = g.G * g.Ci;
  const T* base = x + n * g.H * g.W * C + gr * g.Ci;
  const bool inside = y0 >= 0 && y0 + 4 <= g.H && x0 >= 0 && x0 + 4 <= g.W;
  for (int64_t ci = 0; ci < g.Ci; ci += L) {
    vec_t<T> d[4][4];
    if (inside) {
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) d[i][j] = vload(base + ((y0 + i) * g.W + x0 + j) * C + ci);
    } else {
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          const int64_t yy = y0 + i, xx = x0 + j;
          d[i][j] = (yy >= 0 && yy < g.H && xx >= 0 && xx < g.W)
                        ? vload(base + (yy * g.W + xx) * C + ci)
                        : vec_t<T>{};
        }
    }
    vec_t<T> b[4][4];  // B^T d
    for (int j = 0; j < 4; ++j) {
      b[0][j] = d[0][j] - d[2][j];
      b[1][j] = d[1][j] + d[2][j];
      b[2][j] = d[2][j] - d[1][j];
      b[3][j] = d[1][j] - d[3][j];
    }
    for (int i = 0; i < 4; ++i) {
      T* v = V + (i * 4) * g.Ci + ci;
      vstore(v, b[i][0] - b[i][2]);
      vstore(v + g.Ci, b[i][1] + b[i][2]);
      vstore(v + 2 * g.Ci, b[i][2] - b[i][1]);
      vstore(v + 3 * g.Ci, b[i][1] - b[i][3]);
    }
  }
}

// M (rows, Co) = V (rows, Ci) U (Ci, Co), row strides vs and ms, rows a multiple of RT, Co a
// multiple of L: RT rows by CV vectors of accumulators, then single vectors for the remaining
// columns.
template <int RT, int CV, typename T>
IMAML_INLINE void gemm_block(const T* __restrict__ V, const T* __restrict__ U, T* __restrict__ M,
                             int64_t rows, int64_t Ci, int64_t Co, int64_t vs, int64_t ms) {
  constexpr int L = kVec<T>;
  for (int64_t r0 = 0; r0 < rows; r0 += RT) {
    int64_t c0 = 0;
    for (; c0 + CV * L <= Co; c0 += CV * L) {
      vec_t<T> acc[RT][CV];
      for (int r = 0; r < RT; ++r)
        for (int c = 0; c < CV; ++c) acc[r][c] = vec_t<T>{};
      for (int64_t ci = 0; ci < Ci; ++ci) {
        vec_t<T> u[CV];
        for (int c = 0; c < CV; ++c) u[c] = vload(U + ci * Co + c0 + c * L);
        for (int r = 0; r < RT; ++r) {
          const T s = V[(r0 + r) * vs + ci];
          for (int c = 0; c < CV; ++c) acc[r][c] += s * u[c];
        }
      }
      for (int r = 0; r < RT; ++r)
        for (int c = 0; c < CV; ++c) vstore(M + (r0 + r) * ms + c0 + c * L, acc[r][c]);
    }
    for (; c0 < Co; c0 += L) {
      vec_t<T> acc[RT];
      for (int r = 0; r < RT; ++r) acc[r] = vec_t<T>{};
      for (int64_t ci = 0; ci < Ci; ++ci) {
        const vec_t<T> u = vload(U + ci * Co + c0);
        for (int r = 0; r < RT; ++r) acc[r] += V[(r0 + r) * vs + ci] * u;
      }
      for (int r = 0; r < RT; ++r) vstore(M + (r0 + r) * ms + c0, acc[r]);
    }
  }
}

// y at tile t (2x2 outputs, clipped to the map) = A^T m A + bias, from M[xi][0..Co) of the tile.
template <typename T>
IMAML_INLINE void output_transform(const T* __restrict__ M, const T* __restrict__ bias,
                                   const WinoGeometry& g, int64_t gr, int64_t t,
                                   T* __restrict__ y) {
  constexpr int L = kVec<T>;
  const int64_t n = t / (g.TH * g.TW), ty = (t / g.TW) % g.TH, tx = t % g.TW;
  const int64_t C = g.G * g.Co, s = g.Co;
  T* base = y + n * g.H * g.W * C + gr * g.Co;
  for (int64_t co = 0; co < g.Co; co += L) {
    const T* m = M + co;
    vec_t<T> a[2][4];  // A^T m
    for (int j = 0; j < 4; ++j) {
      const vec_t<T> m0 = vload(m + j * s), m1 = vload(m + (4 + j) * s),
                     m2 = vload(m + (8 + j) * s), m3 = vload(m + (12 + j) * s);
      a[0][j] = m0 + m1 + m2;
      a[1][j] = m1 - m2 - m3;
    }
    const vec_t<T> b = bias == nullptr ? vec_t<T>{} : vload(bias + gr * g.Co + co);
    for (int i = 0; i < 2; ++i) {
      const int64_t yy = 2 * ty + i;
      if (yy >= g.H) break;
      const vec_t<T> o0 = a[i][0] + a[i][1] + a[i][2] + b;
      const vec_t<T> o1 = a[i][1] - a[i][2] - a[i][3] + b;
      vstore(base + (yy * g.W + 2 * tx) * C + co, o0);
      if (2 * tx + 1 < g.W) vstore(base + (yy * g.W + 2 * tx + 1) * C + co, o1);
    }
  }
}

// Row strides of the per-tile scratch V (16 Ci) and M (16 Co), padded by one vector: rows of
// exactly 4 KB would map a register tile's rows to the same L1 sets.
inline int64_t scratch_stride(int64_t c, int64_t L) { return 16 * c + L; }

// Tiles [t0, t1) of group gr: transform, 16 products, inverse transform. V, M: scratch of
// rows * scratch_stride(Ci or Co) with rows = (t1 - t0) rounded up to a multiple of RT.
template <int RT, int CV, typename T>
IMAML_INLINE void forward_tiles(const T* xp, const T* U, const T* bias, T* y, const WinoGeometry& g,
                                int64_t gr, int64_t t0, int64_t t1, T* V, T* M) {
  constexpr int L = kVec<T>;
  const int64_t nt = t1 - t0, rows = (nt + RT - 1) / RT * RT;
  const int64_t vs = scratch_stride(g.Ci, L), ms = scratch_stride(g.Co, L);
  for (int64_t r = 0; r < nt; ++r) input_transform(xp, g, gr, t0 + r, V + r * vs);
  std::fill(V + nt * vs, V + rows * vs, T(0));
  const T* Ug = U + gr * 16 * g.Ci * g.Co;
  for (int xi = 0; xi < 16; ++xi)
    gemm_block<RT, CV>(V + xi * g.Ci, Ug + xi * g.Ci * g.Co, M + xi * g.Co, rows, g.Ci, g.Co, vs,
                       ms);
  for (int64_t r = 0; r < nt; ++r) output_transform(M + r * ms, bias, g, gr, t0 + r, y);
}

// ---- the weight gradient: dU[xi] = sum over tiles of V[xi]^T dM[xi], dW = G^T dU G ----------
//
// With Y = A^T [U (.) V] A per tile, dL/dU = sum_t (A dY_t A^T) (.) V_t elementwise, and the
// filters' gradient is G^T (dL/dU) G: the same tiles and input transform as the forward, one
// (Ci x tiles) by (tiles x Co) product per xi accumulated over the tiles, then the transform.

// dM[xi][0..Co) = (A dy A^T)[xi] for tile t's 2x2 output gradient dy of group gr (zero outside).
template <typename T>
IMAML_INLINE void grad_output_transform(const T* __restrict__ gy, const WinoGeometry& g,
                                        int64_t gr, int64_t t, T* __restrict__ dM) {
  constexpr int L = kVec<T>;
  const int64_t n = t / (g.TH * g.TW), ty = (t / g.TW) % g.TH, tx = t % g.TW;
  const int64_t C = g.G * g.Co;
  const T* base = gy + n * g.H * g.W * C + gr * g.Co;
  const bool r1 = 2 * ty + 1 < g.H, c1 = 2 * tx + 1 < g.W;
  for (int64_t co = 0; co < g.Co; co += L) {
    const T* p = base + (2 * ty * g.W + 2 * tx) * C + co;
    const vec_t<T> z{};
    const vec_t<T> d00 = vload(p), d01 = c1 ? vload(p + C) : z;
    const vec_t<T> d10 = r1 ? vload(p + g.W * C) : z, d11 = r1 && c1 ? vload(p + (g.W + 1) * C) : z;
    // tmp = A dy (4 x 2), A = [[1, 0], [1, 1], [1, -1], [0, -1]]
    const vec_t<T> tmp[4][2] = {{d00, d01}, {d00 + d10, d01 + d11}, {d00 - d10, d01 - d11},
                                {-d10, -d11}};
    for (int i = 0; i < 4; ++i) {  // (A dy) A^T
      T* m = dM + (i * 4) * g.Co + co;
      vstore(m, tmp[i][0]);
      vstore(m + g.Co, tmp[i][0] + tmp[i][1]);
      vstore(m + 2 * g.Co, tmp[i][0] - tmp[i][1]);
      vstore(m + 3 * g.Co, -tmp[i][1]);
    }
  }
}

// dU (Ci, Co) += V^T dM over `rows` tiles (row strides vs, ms): RT input channels by CV vectors
// of output channels in registers, the tiles streamed; Ci a multiple of RT, Co of L.
template <int RT, int CV, typename T>
IMAML_INLINE void gemm_tn_block(const T* __restrict__ V, const T* __restrict__ dM,
                                T* __restrict__ dU, int64_t rows, int64_t Ci, int64_t Co,
                                int64_t vs, int64_t ms) {
  constexpr int L = kVec<T>;
  for (int64_t c0i = 0; c0i < Ci; c0i += RT) {
    int64_t c0 = 0;
    for (; c0 + CV * L <= Co; c0 += CV * L) {
      vec_t<T> acc[RT][CV];
      for (int k = 0; k < RT; ++k)
        for (int c = 0; c < CV; ++c) acc[k][c] = vload(dU + (c0i + k) * Co + c0 + c * L);
      for (int64_t r = 0; r < rows; ++r) {
        vec_t<T> m[CV];
        for (int c = 0; c < CV; ++c) m[c] = vload(dM + r * ms + c0 + c * L);
        for (int k = 0; k < RT; ++k) {
          const T v = V[r * vs + c0i + k];
          for (int c = 0; c < CV; ++c) acc[k][c] += v * m[c];
        }
      }
      for (int k = 0; k < RT; ++k)
        for (int c = 0; c < CV; ++c) vstore(dU + (c0i + k) * Co + c0 + c * L, acc[k][c]);
    }
    for (; c0 < Co; c0 += L) {
      vec_t<T> acc[RT];
      for (int k = 0; k < RT; ++k) acc[k] = vload(dU + (c0i + k) * Co + c0);
      for (int64_t r = 0; r < rows; ++r) {
        const vec_t<T> m = vload(dM + r * ms + c0);
        for (int k = 0; k < RT; ++k) acc[k] += V[r * vs + c0i + k] * m;
      }
      for (int k = 0; k < RT; ++k) vstore(dU + (c0i + k) * Co + c0, acc[k]);
    }
  }
}

// dU[gr] (16, Ci, Co) += the tiles [t0, t1) of group gr. V, dM: scratch of (t1 - t0) rows.
template <int RT, int CV, typename T>
IMAML_INLINE void weight_grad_tiles(const T* x, const T* gy, const WinoGeometry& g, int64_t gr,
                                    int64_t t0, int64_t t1, T* V, T* dM, T* dU) {
  constexpr int L = kVec<T>;
  const int64_t nt = t1 - t0;
  const int64_t vs = scratch_stride(g.Ci, L), ms = scratch_stride(g.Co, L);
  for (int64_t r = 0; r < nt; ++r) {
    input_transform(x, g, gr, t0 + r, V + r * vs);
    grad_output_transform(gy, g, gr, t0 + r, dM + r * ms);
  }
  for (int xi = 0; xi < 16; ++xi)
    gemm_tn_block<RT, CV>(V + xi * g.Ci, dM + xi * g.Co, dU + xi * g.Ci * g.Co, nt, g.Ci, g.Co,
                          vs, ms);
}

// gwt[gr][ci][0..9)[co] = (G^T dU G) for group gr and input channel ci, from dU (G, 16, Ci, Co)
// (vectors over output channels; the caller permutes gwt (G, Ci, 9, Co) to the weight's layout).
template <typename T>
IMAML_INLINE void filter_grad_transform_impl(const T* __restrict__ dU, const WinoGeometry& g,
                                             int64_t gr, int64_t ci, T* __restrict__ gwt) {
  constexpr int L = kVec<T>;
  const T h = T(0.5);
  const int64_t s = g.Ci * g.Co;
  for (int64_t co = 0; co < g.Co; co += L) {
    const T* u = dU + (gr * 16 * g.Ci + ci) * g.Co + co;
    vec_t<T> t[4][3];  // dU G, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    for (int i = 0; i < 4; ++i) {
      const vec_t<T> u0 = vload(u + (i * 4) * s), u1 = vload(u + (i * 4 + 1) * s),
                     u2 = vload(u + (i * 4 + 2) * s), u3 = vload(u + (i * 4 + 3) * s);
      t[i][0] = u0 + h * (u1 + u2);
      t[i][1] = h * (u1 - u2);
      t[i][2] = h * (u1 + u2) + u3;
    }
    T* w = gwt + (gr * g.Ci + ci) * 9 * g.Co + co;
    for (int b = 0; b < 3; ++b) {  // G^T (dU G)
      vstore(w + b * g.Co, t[0][b] + h * (t[1][b] + t[2][b]));
      vstore(w + (3 + b) * g.Co, h * (t[1][b] - t[2][b]));
      vstore(w + (6 + b) * g.Co, h * (t[1][b] + t[2][b]) + t[3][b]);
    }
  }
}

#define IMAML_DEFINE_WINO(T)                                                                   \
  IMAML_SIMD void wino_transform_filters(const T* wt, const WinoGeometry& g, int64_t gr,       \
                                         int64_t ci, T* U) {                                   \
    transform_filters_impl(wt, g, gr, ci, U);                                                  \
  }                                                                                            \
  IMAML_SIMD void wino_forward_tiles(const T* x, const T* U, const T* bias, T* y,              \
                                     const WinoGeometry& g, int64_t gr, int64_t t0, int64_t t1, \
                                     T* V, T* M, bool wide) {                                  \
    if (wide)                                                                                  \
      forward_tiles<6, 4>(x, U, bias, y, g, gr, t0, t1, V, M);                                 \
    else                                                                                       \
      forward_tiles<4, 1>(x, U, bias, y, g, gr, t0, t1, V, M);                                 \
  }                                                                                            \
  IMAML_SIMD void wino_weight_grad_tiles(const T* x, const T* gy, const WinoGeometry& g,      \
                                         int64_t gr, int64_t t0, int64_t t1, T* V, T* dM,      \
                                         T* dU, bool wide) {                                   \
    if (wide)                                                                                  \
      weight_grad_tiles<4, 4>(x, gy, g, gr, t0, t1, V, dM, dU);                                \
    else                                                                                       \
      weight_grad_tiles<4, 1>(x, gy, g, gr, t0, t1, V, dM, dU);                                \
  }                                                                                            \
  IMAML_SIMD void wino_filter_grad_transform(const T* dU, const WinoGeometry& g, int64_t gr,   \
                                             int64_t ci, T* gwt) {                             \
    filter_grad_transform_impl(dU, g, gr, ci, gwt);                                            \
  }
IMAML_DEFINE_WINO(float)
IMAML_DEFINE_WINO(double)
#undef IMAML_DEFINE_WINO

// Register tiles of 6 rows by 4 vectors need 32 vector registers: AVX-512's zmm file; with AVX2
// (16 ymm, a 64-byte vector being two) 4 rows by 1 vector. IMAML_WINOGRAD_NARROW=1 forces the
// narrow tiles (read once per process), so that the tests run them on an AVX-512 machine too.
bool wide_registers() {
  static const bool wide = [] {
    const char* narrow = std::getenv("IMAML_WINOGRAD_NARROW");
    if (narrow != nullptr && narrow[0] == '1') return false;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    return static_cast<bool>(__builtin_cpu_supports("avx512f"));
#else
    return false;
#endif
  }();
  return wide;
}

// The geometry of a convolution of x (N, groups*Ci, H, W) to groups*Co output channels, after
// checking x and the channel counts.
WinoGeometry conv3x3_geometry(const char* op, const at::Tensor& x, int64_t groups, int64_t Ci,
                              int64_t Co_total) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-d (N, C, H, W), got ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                    ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be >= 1, got ", groups);
  TORCH_CHECK_VALUE(x.size(1) == groups * Ci, op, ": x has ", x.size(1),
                    " channels, weight expects groups*Ci = ", groups, "*", Ci);
  TORCH_CHECK_VALUE(Co_total % groups == 0, op, ": the ", Co_total,
                    " output channels are not a multiple of groups = ", groups);
  const int64_t L = 64 / x.element_size();
  WinoGeometry g{x.size(0), x.size(2), x.size(3), groups, Ci, Co_total / groups,
                 (x.size(2) + 1) / 2, (x.size(3) + 1) / 2};
  TORCH_CHECK_VALUE(g.Ci % L == 0 && g.Co % L == 0, op, ": channels per group must be multiples "
                    "of ", L, " (one 64-byte vector), got Ci = ", g.Ci, ", Co = ", g.Co);
  return g;
}

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, int64_t groups) {
  const char* op = "conv3x3_winograd";
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3, op,
                    ": weight must be (groups*Co, Ci, 3, 3), got ", weight.sizes());
  const WinoGeometry g = conv3x3_geometry(op, x_in, groups, weight.size(1), weight.size(0));
  TORCH_CHECK_VALUE(weight.scalar_type() == x_in.scalar_type() &&
                        weight.device() == x_in.device(),
                    op, ": weight must have x's dtype and device (", x_in.scalar_type(), ", ",
                    x_in.device(), "), got ", weight.scalar_type(), ", ", weight.device());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.G * g.Co &&
                          bias->scalar_type() == x_in.scalar_type(),
                      op, ": bias must be (", g.G * g.Co, ",) of x's dtype, got ",
                      bias->sizes(), " ", bias->scalar_type());
  const auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  // (G, Ci, 9, Co): output channels contiguous for the vectorised filter transform
  const auto wt = weight.reshape({g.G, g.Co, g.Ci, 9}).permute({0, 2, 3, 1}).contiguous();
  const auto b = has_bias ? bias->contiguous() : at::Tensor();
  auto y = at::empty({g.N, g.G * g.Co, g.H, g.W},
                     x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto U = at::empty({g.G, 16, g.Ci, g.Co}, x.options());
  const bool wide = wide_registers();
  const int64_t RT = wide ? 6 : 4;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv3x3_winograd", [&] {
    at::parallel_for(0, g.G * g.Ci, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k)
        wino_transform_filters(wt.const_data_ptr<scalar_t>(), g, k / g.Ci, k % g.Ci,
                               U.data_ptr<scalar_t>());
    });
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* Up = U.const_data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    // work items (group, block of tiles), group-major: a thread's consecutive items share the
    // group's filters U[gr] (16 Ci Co values) in its L2
    const int64_t blocks = (g.tiles() + kTileBlock - 1) / kTileBlock;
    at::parallel_for(0, g.G * blocks, 1, [&](int64_t lo, int64_t hi) {
      const int64_t rows = (kTileBlock + RT - 1) / RT * RT, L = kVec<scalar_t>;
      std::vector<scalar_t> V(rows * scratch_stride(g.Ci, L)), M(rows * scratch_stride(g.Co, L));
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t gr = item / blocks, t0 = item % blocks * kTileBlock;
        const int64_t t1 = std::min(g.tiles(), t0 + kTileBlock);
        wino_forward_tiles(xp, Up, bp, yp, g, gr, t0, t1, V.data(), M.data(), wide);
      }
    });
  });
  return y;
}

at::Tensor conv3x3_winograd_weight_grad_cpu(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                            int64_t groups) {
  const char* op = "conv3x3_winograd_weight_grad";
  TORCH_CHECK_VALUE(grad_y_in.dim() == 4 && x_in.dim() == 4 && grad_y_in.size(0) == x_in.size(0) &&
                        grad_y_in.size(2) == x_in.size(2) && grad_y_in.size(3) == x_in.size(3),
                    op, ": grad_y must be (N, groups*Co, H, W) with x's N, H, W ", x_in.sizes(),
                    ", got ", grad_y_in.sizes());
  TORCH_CHECK_VALUE(groups >= 1 && grad_y_in.size(1) % groups == 0 && x_in.size(1) % groups == 0,
                    op, ": groups = ", groups, " must divide both channel counts, got x ",
                    x_in.sizes(), ", grad_y ", grad_y_in.sizes());
  TORCH_CHECK_VALUE(grad_y_in.scalar_type() == x_in.scalar_type() &&
                        grad_y_in.device() == x_in.device(),
                    op, ": grad_y must have x's dtype and device (", x_in.scalar_type(), ", ",
                    x_in.device(), "), got ", grad_y_in.scalar_type(), ", ", grad_y_in.device());
  const WinoGeometry g = conv3x3_geometry(op, x_in, groups, x_in.size(1) / groups,
                                          grad_y_in.size(1));
  const auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto gy = grad_y_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int nthreads = at::get_num_threads();
  // groups to threads when there are enough of them (each group's dU accumulated by one
  // thread), otherwise blocks of tiles with one dU of all groups per thread, added up after
  const bool by_group = g.G >= nthreads;
  const int64_t parts = by_group ? 1 : nthreads;
  auto dU = at::zeros({parts, g.G, 16, g.Ci, g.Co}, x.options());
  auto gwt = at::empty({g.G, g.Ci, 9, g.Co}, x.options());
  const bool wide = wide_registers();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv3x3_winograd_weight_grad", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    scalar_t* dUp = dU.data_ptr<scalar_t>();
    const int64_t blocks = (g.tiles() + kTileBlock - 1) / kTileBlock, L = kVec<scalar_t>;
    const int64_t per_part = g.G * 16 * g.Ci * g.Co;
    // items (group, block of tiles), group-major; by_group: whole groups per thread, so that no
    // two threads add into the same dU
    const int64_t units = by_group ? g.G : g.G * blocks, per_unit = by_group ? blocks : 1;
    at::parallel_for(0, units, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> V(kTileBlock * scratch_stride(g.Ci, L)),
          dM(kTileBlock * scratch_stride(g.Co, L));
      scalar_t* mine = dUp + (by_group ? 0 : at::get_thread_num() * per_part);
      for (int64_t item = lo * per_unit; item < hi * per_unit; ++item) {
        const int64_t gr = item / blocks, t0 = item % blocks * kTileBlock;
        const int64_t t1 = std::min(g.tiles(), t0 + kTileBlock);
        wino_weight_grad_tiles(xp, gp, g, gr, t0, t1, V.data(), dM.data(),
                               mine + gr * 16 * g.Ci * g.Co, wide);
      }
    });
    at::Tensor total = parts == 1 ? dU[0] : dU.sum(0);
    const scalar_t* tp = total.const_data_ptr<scalar_t>();
    at::parallel_for(0, g.G * g.Ci, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k)
        wino_filter_grad_transform(tp, g, k / g.Ci, k % g.Ci, gwt.data_ptr<scalar_t>());
    });
  });
  return gwt.permute({0, 3, 1, 2}).reshape({g.G * g.Co, g.Ci, 3, 3});
}

}  // namespace wino

TORCH_LIBRARY_IMPL(imaml_ext, CPU, m) {
  m.impl("conv3x3_winograd", &wino::conv3x3_winograd_cpu);
  m.impl("conv3x3_winograd_weight_grad", &wino::conv3x3_winograd_weight_grad_cpu);
}

}  // namespace imaml_ext

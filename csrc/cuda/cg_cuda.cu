// CUDA kernels of the CG ops (schemas in csrc/module.cpp, arithmetic in csrc/cg_math.h).
//
// Thread mapping: system b is split into `chunks` contiguous pieces; block (c, b) owns piece c.
// One CG iteration is three launches, because each of the two reductions (p.Ap, then r.r) must
// be complete before its value is used everywhere in the system:
//   1. cg_dot_kernel:       partial p.Ap per block
//   2. cg_update_xr_kernel: every block sums the partials, takes alpha, updates x and r of its
//                           piece, writes a partial r.r; block 0 saves the old r.r
//   3. cg_update_p_kernel:  every block sums the partials, takes beta, updates p; block 0 stores
//                           r.r, status and the iteration count
// cg_step's affine form (shift p + scale Ap for A p) is read inside launches 1 and 2, and a
// step-by-step solve's set-up and finish are ops of their own (cg_begin, cg_end), so that a
// solve over a callable operator costs its products plus one op per iteration and two in all.
// Partials are summed in a fixed order (no atomics), so results are deterministic. Stopped
// systems (status != running) return at once, which is the per-system early stop. Nothing is
// read back to the host: the whole-loop solvers queue max_iter iterations of launches, or run
// all of them inside one launch (cg_fused_cuda.cu) when solve.cuh's use_fused() says so.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cuda/barrier>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../cg_math.h"
#include "../ops.h"
#include "common.cuh"
#include "solve.cuh"

namespace imaml_ext {
namespace {

using cuda::block_sum;
using cuda::kBlockSize;
using cuda::kWarpSize;
using cuda::kWarpsPerBlock;

struct Chunking {
  int64_t P;
  int64_t chunk_len;
  int chunks;
  __device__ int64_t begin() const { return blockIdx.x * chunk_len; }
  __device__ int64_t end() const {
    const int64_t e = begin() + chunk_len;
    return e < P ? e : P;
  }
};

inline Chunking make_chunking(int64_t P) {
  const int chunks = cuda::chunks_for(P);
  return {P, (P + chunks - 1) / chunks, chunks};
}

// Whether system b is still running, as one value for the whole block: read once and shared.
// In cg_update_xr / cg_update_p block 0 of the system may write status[b] during the same
// launch, so warps that each read it could disagree, and some would leave while the rest wait
// at block_sum's barriers (partial sums from the warps that left: a wrong alpha applied to a
// system that had just stopped). Every thread must call it (one barrier).
__device__ __forceinline__ bool block_sees_running(const int32_t* status, int64_t b) {
  __shared__ bool running;
  if (threadIdx.x == 0) running = status[b] == kRunning;
  __syncthreads();
  return running;
}

// Sum of the `chunks` partials of system b, in a fixed order; valid in every thread.
template <typename acc_t>
__device__ acc_t sum_partials(const acc_t* partial, int64_t b, int chunks) {
  acc_t v = threadIdx.x < chunks ? partial[b * chunks + threadIdx.x] : acc_t(0);
  return block_sum(v);
}

// The step's operator value (cg_math.h cg_affine): shift p + scale Ap, or Ap itself.
template <typename acc_t>
struct Affine {
  acc_t shift, scale;
  bool on;
  template <typename scalar_t>
  __device__ acc_t operator()(scalar_t p, scalar_t ap) const {
    return cg_affine<acc_t>(static_cast<acc_t>(p), static_cast<acc_t>(ap), shift, scale, on);
  }
};

template <typename scalar_t, typename acc_t>
__global__ void cg_dot_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ ap,
                              const int32_t* __restrict__ status, acc_t* __restrict__ partial,
                              Chunking ch, Affine<acc_t> op) {
  const int64_t b = blockIdx.y;
  if (status[b] != kRunning) return;
  const scalar_t* pb = p + b * ch.P;
  const scalar_t* ab = ap + b * ch.P;
  acc_t s = 0;
  for (int64_t i = ch.begin() + threadIdx.x; i < ch.end(); i += kBlockSize)
    s += static_cast<acc_t>(pb[i]) * op(pb[i], ab[i]);
  s = block_sum(s);
  if (threadIdx.x == 0) partial[b * ch.chunks + blockIdx.x] = s;
}

template <typename scalar_t, typename acc_t>
__global__ void cg_update_xr_kernel(scalar_t* __restrict__ x, scalar_t* __restrict__ r,
                                    const scalar_t* __restrict__ p,
                                    const scalar_t* __restrict__ ap, const scalar_t* __restrict__ rs,
                                    scalar_t* __restrict__ rs_prev, int32_t* __restrict__ status,
                                    const acc_t* __restrict__ pap_partial,
                                    acc_t* __restrict__ rs_partial, Chunking ch,
                                    Affine<acc_t> op) {
  const int64_t b = blockIdx.y;
  if (!block_sees_running(status, b)) return;
  const acc_t pAp = sum_partials(pap_partial, b, ch.chunks);
  int32_t st = kRunning;
  const acc_t rs_old = static_cast<acc_t>(rs[b]);
  const acc_t alpha = cg_alpha<acc_t>(rs_old, pAp, &st);
  if (st != kRunning) {
    // Every block of the system reaches the same decision; block 0 records it.
    if (blockIdx.x == 0 && threadIdx.x == 0) status[b] = st;
    return;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) rs_prev[b] = rs[b];
  scalar_t* xb = x + b * ch.P;
  scalar_t* rb = r + b * ch.P;
  const scalar_t* pb = p + b * ch.P;
  const scalar_t* ab = ap + b * ch.P;
  acc_t s = 0;
  for (int64_t i = ch.begin() + threadIdx.x; i < ch.end(); i += kBlockSize) {
    s += cg_update_xr<scalar_t, acc_t>(xb + i, rb + i, pb[i],
                                       static_cast<scalar_t>(op(pb[i], ab[i])), alpha);
  }
  s = block_sum(s);
  if (threadIdx.x == 0) rs_partial[b * ch.chunks + blockIdx.x] = s;
}

template <typename scalar_t, typename acc_t>
__global__ void cg_update_p_kernel(scalar_t* __restrict__ p, const scalar_t* __restrict__ r,
                                   scalar_t* __restrict__ rs, const scalar_t* __restrict__ rs_prev,
                                   const scalar_t* __restrict__ bnorm2,
                                   int32_t* __restrict__ status, int32_t* __restrict__ iters,
                                   const acc_t* __restrict__ rs_partial, double rtol, double atol,
                                   Chunking ch) {
  const int64_t b = blockIdx.y;
  // Block 0 may already have stored this iteration's status: a stopped system needs no new p.
  if (!block_sees_running(status, b)) return;
  const acc_t rs_new = sum_partials(rs_partial, b, ch.chunks);
  const acc_t tol2 = cg_tol2<acc_t>(static_cast<acc_t>(bnorm2[b]), rtol, atol);
  int32_t st = kRunning;
  const acc_t beta = cg_beta<acc_t>(rs_new, static_cast<acc_t>(rs_prev[b]), tol2, &st);
  if (st == kRunning) {
    scalar_t* pb = p + b * ch.P;
    const scalar_t* rb = r + b * ch.P;
    for (int64_t i = ch.begin() + threadIdx.x; i < ch.end(); i += kBlockSize)
      cg_update_p<scalar_t, acc_t>(pb + i, rb[i], beta);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    rs[b] = static_cast<scalar_t>(rs_new);
    iters[b] += 1;
    status[b] = st;
  }
}

}  // namespace

// Queues one CG iteration (three launches) on the current stream (declared in solve.cuh).
void cuda::launch_cg_step(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p,
                    const at::Tensor& Ap, const at::Tensor& rs, const at::Tensor& bnorm2,
                    const at::Tensor& status, const at::Tensor& iters, double rtol, double atol,
                    double shift, double scale) {
  const int64_t B = x.size(0), P = x.size(1);
  if (B == 0 || P == 0) return;
  if (B > kMaxSystemsPerRun) {  // row views of the same buffers, one run at a time
    for_system_runs(B, [&](int64_t s, int64_t n) {
      launch_cg_step(x.narrow(0, s, n), r.narrow(0, s, n), p.narrow(0, s, n), Ap.narrow(0, s, n),
                     rs.narrow(0, s, n), bnorm2.narrow(0, s, n), status.narrow(0, s, n),
                     iters.narrow(0, s, n), rtol, atol, shift, scale);
    });
    return;
  }
  const Chunking ch = make_chunking(P);
  const dim3 grid(ch.chunks, B);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto work = at::empty({2 * B * ch.chunks}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    auto rs_prev = at::empty_like(rs);
    acc_t* pap_partial = work.data_ptr<acc_t>();
    acc_t* rs_partial = pap_partial + B * ch.chunks;
    const Affine<acc_t> op{static_cast<acc_t>(shift), static_cast<acc_t>(scale),
                           !(shift == 0.0 && scale == 1.0)};
    cg_dot_kernel<scalar_t, acc_t><<<grid, kBlockSize, 0, stream>>>(
        p.data_ptr<scalar_t>(), Ap.data_ptr<scalar_t>(), status.data_ptr<int32_t>(), pap_partial,
        ch, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cg_update_xr_kernel<scalar_t, acc_t><<<grid, kBlockSize, 0, stream>>>(
        x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
        Ap.data_ptr<scalar_t>(), rs.data_ptr<scalar_t>(), rs_prev.data_ptr<scalar_t>(),
        status.data_ptr<int32_t>(), pap_partial, rs_partial, ch, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cg_update_p_kernel<scalar_t, acc_t><<<grid, kBlockSize, 0, stream>>>(
        p.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), rs.data_ptr<scalar_t>(),
        rs_prev.data_ptr<scalar_t>(), bnorm2.data_ptr<scalar_t>(), status.data_ptr<int32_t>(),
        iters.data_ptr<int32_t>(), rs_partial, rtol, atol, ch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

namespace {

void cg_step_cuda(at::Tensor x, at::Tensor r, at::Tensor p, const at::Tensor& Ap_in, at::Tensor rs,
                  const at::Tensor& bnorm2_in, at::Tensor status, at::Tensor iters, double rtol,
                  double atol, double shift, double scale) {
  check_cg_state("cg_step", x, r, p, Ap_in, rs, bnorm2_in, status, iters, rtol, atol);
  check_affine("cg_step", shift, scale);
  c10::cuda::OptionalCUDAGuard guard(x.device());
  cuda::launch_cg_step(x, r, p, Ap_in.contiguous(), rs, bnorm2_in.contiguous(), status, iters, rtol,
                 atol, shift, scale);
}

// ---- a step-by-step solve's set-up and finish (cg_begin, cg_end) -----------------------------
// cg_begin is three launches over the same (chunks, B) grid as a step: the blocks' partial
// max|b|, then every block sums them (fixed order) into the system's scale and writes its piece
// of x = 0, r = p = b / s with a partial r.r, then one block per system sums those into rs,
// bnorm2 and the status. Without rescale the first launch is skipped (s = 1).

template <typename scalar_t>
__global__ void cg_begin_max_kernel(const scalar_t* __restrict__ b, scalar_t* __restrict__ partial,
                                    Chunking ch) {
  const int64_t sys = blockIdx.y;
  const scalar_t* bs = b + sys * ch.P;
  scalar_t m = 0;
  for (int64_t i = ch.begin() + threadIdx.x; i < ch.end(); i += kBlockSize) {
    const scalar_t a = ::fabs(bs[i]);
    m = cg_isfinite(a) ? ::fmax(m, a) : scalar_t(INFINITY);  // NaN/Inf: scale 1 (cg_rhs_scale)
  }
  m = cuda::block_max(m);
  if (threadIdx.x == 0) partial[sys * ch.chunks + blockIdx.x] = m;
}

template <typename scalar_t, typename acc_t>
__global__ void cg_begin_write_kernel(const scalar_t* __restrict__ b, scalar_t* __restrict__ x,
                                      scalar_t* __restrict__ r, scalar_t* __restrict__ p,
                                      scalar_t* __restrict__ scale,
                                      const scalar_t* __restrict__ max_partial,
                                      acc_t* __restrict__ rs_partial, Chunking ch) {
  const int64_t sys = blockIdx.y;
  scalar_t s = 1;
  if (max_partial != nullptr) {
    const scalar_t m = threadIdx.x < ch.chunks ? max_partial[sys * ch.chunks + threadIdx.x]
                                               : scalar_t(0);
    s = cg_rhs_scale<scalar_t>(cuda::block_max(m));
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) scale[sys] = s;
  const int64_t off = sys * ch.P;
  acc_t rr = 0;
  for (int64_t i = ch.begin() + threadIdx.x; i < ch.end(); i += kBlockSize) {
    const scalar_t v = b[off + i] / s;
    x[off + i] = scalar_t(0);
    r[off + i] = v;
    p[off + i] = v;
    rr += static_cast<acc_t>(v) * static_cast<acc_t>(v);
  }
  rr = block_sum(rr);
  if (threadIdx.x == 0) rs_partial[sys * ch.chunks + blockIdx.x] = rr;
}

template <typename scalar_t, typename acc_t>
__global__ void cg_begin_status_kernel(scalar_t* __restrict__ rs, scalar_t* __restrict__ bnorm2,
                                       int32_t* __restrict__ status, int32_t* __restrict__ iters,
                                       const acc_t* __restrict__ rs_partial, int chunks,
                                       double rtol, double atol) {
  const int64_t sys = blockIdx.x;
  const acc_t rr = sum_partials(rs_partial, sys, chunks);
  if (threadIdx.x != 0) return;
  rs[sys] = static_cast<scalar_t>(rr);
  bnorm2[sys] = static_cast<scalar_t>(rr);
  const acc_t stored = static_cast<acc_t>(static_cast<scalar_t>(rr));
  status[sys] = cg_initial_status<acc_t>(stored, cg_tol2<acc_t>(stored, rtol, atol));
  iters[sys] = 0;
}

BeginResult cg_begin_cuda(const at::Tensor& b_in, double rtol, double atol, bool rescale) {
  check_cg_begin("cg_begin", b_in, rtol, atol, rescale);
  if (b_in.size(0) > cuda::kMaxSystemsPerRun)
    return cuda::cat_system_runs<BeginResult>(b_in.size(0), [&](int64_t s, int64_t n) {
      return cg_begin_cuda(b_in.narrow(0, s, n), rtol, atol, rescale);
    });
  c10::cuda::OptionalCUDAGuard guard(b_in.device());
  const auto b = b_in.contiguous();
  const int64_t B = b.size(0), P = b.size(1);
  auto out = empty_cg_begin(b);
  // (named references, not a structured binding: the kernels' lambdas capture them)
  at::Tensor &x = std::get<0>(out), &r = std::get<1>(out), &p = std::get<2>(out);
  at::Tensor &rs = std::get<3>(out), &bnorm2 = std::get<4>(out), &status = std::get<5>(out);
  at::Tensor &iters = std::get<6>(out), &s = std::get<7>(out);
  if (B == 0) return out;
  const Chunking ch = make_chunking(P);
  const dim3 grid(ch.chunks, B);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "cg_begin_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto max_partial = rescale ? at::empty({B * ch.chunks}, b.options()) : at::Tensor();
    auto rs_partial = at::empty({B * ch.chunks},
                                b.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (rescale) {
      cg_begin_max_kernel<scalar_t><<<grid, kBlockSize, 0, stream>>>(
          b.data_ptr<scalar_t>(), max_partial.data_ptr<scalar_t>(), ch);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    cg_begin_write_kernel<scalar_t, acc_t><<<grid, kBlockSize, 0, stream>>>(
        b.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
        p.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
        rescale ? max_partial.data_ptr<scalar_t>() : nullptr, rs_partial.data_ptr<acc_t>(), ch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cg_begin_status_kernel<scalar_t, acc_t><<<B, kBlockSize, 0, stream>>>(
        rs.data_ptr<scalar_t>(), bnorm2.data_ptr<scalar_t>(), status.data_ptr<int32_t>(),
        iters.data_ptr<int32_t>(), rs_partial.data_ptr<acc_t>(), ch.chunks, rtol, atol);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// cg_end: one launch; block 0 of each system also writes its residual norm.
template <typename scalar_t>
__global__ void cg_end_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ rs,
                              const int32_t* __restrict__ status,
                              const int32_t* __restrict__ iters,
                              const scalar_t* __restrict__ scale,
                              const scalar_t* __restrict__ fallback, scalar_t* __restrict__ out,
                              scalar_t* __restrict__ rnorm, Chunking ch) {
  const int64_t sys = blockIdx.y;
  const scalar_t s = scale[sys];
  if (blockIdx.x == 0 && threadIdx.x == 0) rnorm[sys] = ::sqrt(rs[sys]) * s;
  const bool fall = fallback != nullptr && status[sys] == kNegativeCurvature && iters[sys] == 0;
  const int64_t off = sys * ch.P;
  for (int64_t i = ch.begin() + threadIdx.x; i < ch.end(); i += kBlockSize)
    out[off + i] = fall ? fallback[off + i] : x[off + i] * s;
}

std::tuple<at::Tensor, at::Tensor> cg_end_cuda(const at::Tensor& x_in, const at::Tensor& rs_in,
                                               const at::Tensor& status_in,
                                               const at::Tensor& iters_in,
                                               const at::Tensor& scale_in,
                                               const std::optional<at::Tensor>& fallback_in) {
  const EndArgs args = prepare_cg_end(x_in, rs_in, status_in, iters_in, scale_in, fallback_in);
  const at::Tensor &x = args.x, &rs = args.rs, &status = args.status, &iters = args.iters;
  const at::Tensor &sc = args.scale, &fallback = args.fallback;
  if (x.size(0) > cuda::kMaxSystemsPerRun)
    return cuda::cat_system_runs<std::tuple<at::Tensor, at::Tensor>>(
        x.size(0), [&](int64_t s, int64_t n) {
          return cg_end_cuda(x.narrow(0, s, n), rs.narrow(0, s, n), status.narrow(0, s, n),
                             iters.narrow(0, s, n), sc.narrow(0, s, n),
                             fallback.defined() ? std::optional<at::Tensor>(fallback.narrow(0, s, n))
                                                : std::nullopt);
        });
  c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const int64_t B = x.size(0), P = x.size(1);
  auto out = at::empty_like(x);
  auto rnorm = at::empty_like(rs);
  if (B == 0) return {out, rnorm};
  const Chunking ch = make_chunking(P);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_end_cuda", [&] {
    cg_end_kernel<scalar_t><<<dim3(ch.chunks, B), kBlockSize, 0,
                              at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), rs.data_ptr<scalar_t>(), status.data_ptr<int32_t>(),
        iters.data_ptr<int32_t>(), sc.data_ptr<scalar_t>(),
        fallback.defined() ? fallback.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
        rnorm.data_ptr<scalar_t>(), ch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, rnorm};
}

// ---- operators ------------------------------------------------------------------------------

// out[b] = A[b] v[b] for running systems: one warp per row, lanes stride the columns.
template <typename scalar_t, typename acc_t>
__global__ void dense_matvec_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ v,
                                    scalar_t* __restrict__ out, const int32_t* __restrict__ status,
                                    int64_t P) {
  const int64_t b = blockIdx.y;
  if (status != nullptr && status[b] != kRunning) return;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= P) return;
  const scalar_t* a = A + (b * P + row) * P;
  const scalar_t* vb = v + b * P;
  acc_t s = 0;
  for (int64_t j = lane; j < P; j += kWarpSize) s += static_cast<acc_t>(a[j]) * static_cast<acc_t>(vb[j]);
  s = cuda::warp_sum(s);
  if (lane == 0) out[b * P + row] = static_cast<scalar_t>(s);
}

// out[b] = shift v[b] + scale X[b]^T (X[b] v[b]) in one launch and one pass over X from memory.
// Block (k, b) takes a chunk of system b's rows in sub-tiles of 8 rows: a warp per row takes
// t_i = X_i . v (16-byte loads, four in flight per lane, when kVec) into shared memory; then a
// thread per column adds t_i X_ij over the sub-tile (re-reading its 8 rows, just fetched, from
// L1/L2: block_tile_xt) into the block's column sums in shared memory, each column owned by one
// thread (no atomics). Sub-tiles keep the rows in flight across the GPU (blocks x 8 rows) small
// enough for L2 to hold them until their re-read; whole-chunk tiles did not, and X then crossed
// DRAM twice. The block adds its column sums into acc[b] with one global atomic per column, and
// the last block of system b to finish writes out[b] and zeroes acc[b] (last_block_epilogue).
// Sync points: after zeroing, twice per sub-tile, in the epilogue. acc (B, d) and counter (B,)
// are zero on entry and on exit. Dynamic shared memory: d + kWarpsPerBlock + 4 acc_t (the 4:
// ptxas may widen the unrolled reads of t past its end). With kStep (v = cg.p, status =
// cg.status), the last block of system b then runs b's CG step on out[b] (block_cg_step): the
// whole iteration in this one launch. v and status are then not __restrict__ (the step writes
// them through cg); the default kernels keep the qualifier (their loads of v stay read-only
// path loads, as measured on the H100).
template <typename scalar_t, typename acc_t, bool kVec, bool kStep>
__global__ void __launch_bounds__(kBlockSize)
    xtxv_kernel(const scalar_t* __restrict__ X, cuda::in_ptr<scalar_t, !kStep> v,
                scalar_t* __restrict__ out, acc_t* __restrict__ acc,
                unsigned int* __restrict__ counter, cuda::in_ptr<int32_t, !kStep> status, int64_t n,
                int64_t d, int64_t rows_per_block, double shift, double scale,
                cuda::CgStepArgs<scalar_t> cg) {
  extern __shared__ __align__(16) unsigned char xtxv_smem[];
  acc_t* sacc = reinterpret_cast<acc_t*>(xtxv_smem);
  acc_t* t = sacc + d;
  const int64_t b = blockIdx.y;
  if (status != nullptr && status[b] != kRunning) return;
  for (int64_t j = threadIdx.x; j < d; j += kBlockSize) sacc[j] = 0;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const scalar_t* vb = v + b * d;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t R = (row0 + rows_per_block < n ? row0 + rows_per_block : n) - row0;
  const scalar_t* X0 = X + (b * n + row0) * d;
  for (int64_t s0 = 0; s0 < R; s0 += kWarpsPerBlock) {
    const int64_t Rs = s0 + kWarpsPerBlock < R ? kWarpsPerBlock : R - s0;
    if (warp < Rs) {
      const acc_t ti = cuda::warp_row_dot<scalar_t, acc_t, kVec>(X0 + (s0 + warp) * d, vb, d);
      if (lane == 0) t[warp] = ti;
    }
    __syncthreads();  // t complete (and, the first time, sacc zeroed)
    cuda::block_tile_xt<scalar_t, acc_t, kVec>(X0 + s0 * d, t, Rs, d,
                                               [&](int64_t j, acc_t s) { sacc[j] += s; });
    __syncthreads();  // t is rewritten by the next sub-tile
  }
  acc_t* accb = acc + b * d;
  for (int64_t j = threadIdx.x; j < d; j += kBlockSize) atomicAdd(accb + j, sacc[j]);
  scalar_t* ob = out + b * d;
  [[maybe_unused]] const bool last = cuda::last_block_epilogue(accb, counter + b, gridDim.x, d, [&](int64_t j, acc_t a) {
    ob[j] = static_cast<scalar_t>(lstsq_combine<acc_t>(static_cast<acc_t>(vb[j]), a, shift, scale));
  });
  if constexpr (kStep) {
    if (last) cuda::block_cg_step<scalar_t, acc_t>(cg, b, ob, d);
  }
}

// The pieces xtxv_tiles_kernel and xtxv_bulk_kernel share. Thread t holds, in registers, the
// 16-byte column groups q = t + g kBlockSize (g < G) of v (vr) and of its block's column sums
// (cs), and a tile's R rows of X at those groups (xr).
template <typename scalar_t, typename acc_t, int G>
struct TileRegs {
  using Vec = cuda::Vec16<scalar_t>;
  using vec_t = typename Vec::type;
  static constexpr int L = Vec::kN;
  static constexpr int R = 16 / G;
  vec_t vr[G];
  acc_t cs[G][L];

  __device__ __forceinline__ void start(const scalar_t* v, int64_t nv) {
    const vec_t* v4 = reinterpret_cast<const vec_t*>(v);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int64_t q = threadIdx.x + g * kBlockSize;
      vr[g] = q < nv ? v4[q] : vec_t{};
#pragma unroll
      for (int e = 0; e < L; ++e) cs[g][e] = acc_t(0);
    }
  }

  // xr = rows r0.. of the tile whose row r starts at rows[r * nv] (vectors), zero past n
  __device__ __forceinline__ static void load(vec_t (&xr)[R][G], const vec_t* rows, int64_t r0,
                                              int64_t n, int64_t nv) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const int64_t q = threadIdx.x + g * kBlockSize;
        xr[r][g] = (r0 + r < n && q < nv) ? rows[r * nv + q] : vec_t{};
      }
    }
  }

  // Each warp's share of the tile's R row dot products with v, into partial[warp][.]
  __device__ __forceinline__ void dots(const vec_t (&xr)[R][G], acc_t (*partial)[R]) const {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    acc_t t[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      acc_t s = 0;
#pragma unroll
      for (int g = 0; g < G; ++g) s += Vec::dot(xr[r][g], vr[g]);
      t[r] = cuda::warp_allsum(s);
    }
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) partial[warp][r] = t[r];
    }
  }

  // After a barrier: the warps' partials summed in a fixed order, times the rows, into cs
  __device__ __forceinline__ void accumulate(const vec_t (&xr)[R][G], const acc_t (*partial)[R]) {
    acc_t t[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      acc_t s = 0;
#pragma unroll
      for (int w = 0; w < kWarpsPerBlock; ++w) s += partial[w][r];
      t[r] = s;
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int r = 0; r < R; ++r) Vec::fma(cs[g], t[r], xr[r][g]);
    }
  }

  // The block's column sums into system b's accumulator (16-byte vector atomics on sm_90); the
  // last block of the system writes out[b] = shift v + scale acc and, with kStep, runs its CG step.
  template <bool kStep>
  __device__ __forceinline__ void finish(acc_t* acc, unsigned int* counter, scalar_t* out,
                                         const scalar_t* v, int64_t b, int64_t d, double shift,
                                         double scale, const cuda::CgStepArgs<scalar_t>& cg) {
    const int64_t nv = d / L;
    acc_t* accb = acc + b * d;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int64_t q = threadIdx.x + g * kBlockSize;
      if (q >= nv) continue;
      bool added = false;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      if constexpr (std::is_same_v<acc_t, float> && L == 4) {
        atomicAdd(reinterpret_cast<float4*>(accb) + q,
                  make_float4(cs[g][0], cs[g][1], cs[g][2], cs[g][3]));
        added = true;
      }
#endif
      if (!added) {
#pragma unroll
        for (int e = 0; e < L; ++e) atomicAdd(accb + q * L + e, cs[g][e]);
      }
    }
    scalar_t* ob = out + b * d;
    const scalar_t* vb = v + b * d;
    [[maybe_unused]] const bool last = cuda::last_block_epilogue(accb, counter + b, gridDim.x, d, [&](int64_t j, acc_t a) {
      ob[j] = static_cast<scalar_t>(lstsq_combine<acc_t>(static_cast<acc_t>(vb[j]), a, shift, scale));
    });
    if constexpr (kStep) {
      if (last) cuda::block_cg_step<scalar_t, acc_t>(cg, b, ob, d);
    }
  }
};

// The same product with each row of X read from memory once and never re-read (the default in
// the CG loop since the H100 run of 2026-11-28; IMAML_CUDA_XTXV). Thread t keeps, in registers,
// the 16-byte column groups q = t + g kBlockSize (g < G) of v and of its block's column sums
// (TileRegs). A tile of R rows is
// loaded into registers (R x G independent 16-byte loads in flight per thread); its R dot products
// are reduced over the block (warp butterflies, then the warps' partials summed in a fixed order
// through shared memory, double-buffered: one barrier per tile); the column sums then take
// t_i X_ij from the same registers, so nothing is re-read from L1/L2 and no shared-memory column
// sums are needed. Blocks stride over their system's tiles (a persistent grid: at most the
// resident blocks, two per SM, over all systems, in one wave (persistent_blocks_per_system), so
// the global atomics at the end are few: blocks x d per system, as
// 16-byte vector atomics on sm_90), and the last block of a system writes out[b]
// (last_block_epilogue). R x G = 16 vectors of X per thread (64 registers). Requires 16-byte
// access (can_vec16) and d / L <= G kBlockSize.
// kStep: as in xtxv_kernel, the last block of a system runs its CG step.
// prefetch (IMAML_CUDA_XTXV=prefetch, opt-in until timed on a GPU): once a tile's loads are
// issued, the block asks L2 for its next tile (prefetch.global.L2, one per 128-byte line), so
// that HBM streams that tile while the block waits on this one and reduces it, and the next
// tile's loads then find it in L2. The tiles in flight (resident blocks x R rows x d, 17 MB for
// 264 blocks of 64 KB) fit the 50 MB L2 of an H100 / H200.
template <typename scalar_t, typename acc_t, int G, bool kStep>
__global__ void __launch_bounds__(kBlockSize, 2)
    xtxv_tiles_kernel(const scalar_t* __restrict__ X, cuda::in_ptr<scalar_t, !kStep> v,
                      scalar_t* __restrict__ out, acc_t* __restrict__ acc,
                      unsigned int* __restrict__ counter, cuda::in_ptr<int32_t, !kStep> status,
                      int64_t n, int64_t d, double shift, double scale,
                      cuda::CgStepArgs<scalar_t> cg, bool prefetch) {
  using Regs = TileRegs<scalar_t, acc_t, G>;
  using vec_t = typename Regs::vec_t;
  constexpr int R = Regs::R;
  __shared__ acc_t partial[2][kWarpsPerBlock][R];
  const int64_t b = blockIdx.y;
  if (status != nullptr && status[b] != kRunning) return;
  const int64_t nv = d / Regs::L;
  const vec_t* X4 = reinterpret_cast<const vec_t*>(X + b * n * d);
  Regs regs;
  regs.start(v + b * d, nv);
  const int64_t tiles = (n + R - 1) / R;
  int slot = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, slot ^= 1) {
    vec_t xr[R][G];
    Regs::load(xr, X4 + tile * R * nv, tile * R, n, nv);
    if (prefetch) {
      const int64_t next = tile + gridDim.x;
      if (next < tiles) {
        // the next tile's rows are contiguous in X: R x d elements, fewer in the last tile
        // from the 128-byte line holding its first byte (X is only 16-byte aligned) through the
        // line holding its last
        const char* first = reinterpret_cast<const char*>(X4 + next * R * nv);
        const char* end = first + std::min<int64_t>(R, n - next * R) * d *
                                      static_cast<int64_t>(sizeof(scalar_t));
        const char* line0 = reinterpret_cast<const char*>(
            reinterpret_cast<uintptr_t>(first) & ~uintptr_t(127));
        for (const char* a = line0 + threadIdx.x * int64_t(128); a < end;
             a += kBlockSize * int64_t(128))
          asm volatile("prefetch.global.L2 [%0];" ::"l"(a));
      }
    }
    regs.dots(xr, partial[slot]);
    // The other slot is written by the next tile, so a fast warp cannot overwrite partials a slow
    // one is still reading: reaching the tile after next takes the next tile's barrier.
    __syncthreads();
    regs.accumulate(xr, partial[slot]);
  }
  regs.template finish<kStep>(acc, counter, out, v, b, d, shift, scale, cg);
}

// The register-tiled product fed by the copy engine (Hopper's bulk copies; opt-in,
// IMAML_CUDA_XTXV=bulk, until timed on a GPU). On the H100 the register-tiled kernel reached 66%
// and 46% of the copy bandwidth at (32, 500, 2000) and (1, 4000, 4000): each thread's loads are
// in flight only until the tile's reduction, and two blocks per SM keep about 128 KB requested.
// Here one thread per block hands whole tiles (R consecutive rows, contiguous in X) to the copy
// engine, `stages` tiles ahead, into a ring of shared-memory stages, each completing on its own
// mbarrier (transaction bytes); the threads read their 16-byte column groups of the tile from
// shared memory into the same registers as xtxv_tiles_kernel and do the same arithmetic (dot
// products, block reduction, column sums, atomics, last block's epilogue and CG step). One block
// per SM (the ring takes up to 192 KB). Phases: tile k uses stage k % stages; thread 0 registers
// its bytes (expect_tx) and issues its copy once every thread has passed the wait of tile
// k - stages (the stage's previous phase) and read that tile (the barrier after the reads), and
// before its own arrival on tile k's phase, so that phase cannot complete before the bytes land.
template <typename scalar_t, typename acc_t, int G, bool kStep>
__global__ void __launch_bounds__(kBlockSize, 1)
    xtxv_bulk_kernel(const scalar_t* __restrict__ X, cuda::in_ptr<scalar_t, !kStep> v,
                     scalar_t* __restrict__ out, acc_t* __restrict__ acc,
                     unsigned int* __restrict__ counter, cuda::in_ptr<int32_t, !kStep> status,
                     int64_t n, int64_t d, double shift, double scale,
                     cuda::CgStepArgs<scalar_t> cg, int stages, int64_t stage_stride) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using barrier = ::cuda::barrier<::cuda::thread_scope_block>;
  using Regs = TileRegs<scalar_t, acc_t, G>;
  using vec_t = typename Regs::vec_t;
  constexpr int R = Regs::R;
  constexpr int kMaxStages = 4;
#pragma nv_diag_suppress static_var_with_dynamic_init
  __shared__ barrier bar[kMaxStages];
  __shared__ acc_t partial[kWarpsPerBlock][R];
  extern __shared__ __align__(128) unsigned char ring[];
  const int64_t b = blockIdx.y;
  if (status != nullptr && status[b] != kRunning) return;
  const int64_t nv = d / Regs::L;
  const int64_t tiles = (n + R - 1) / R;
  const scalar_t* Xb = X + b * n * d;
  auto issue = [&](int64_t tile) {  // thread 0: tile's rows into its stage
    const int s = static_cast<int>(((tile - blockIdx.x) / gridDim.x) % stages);
    const int64_t rows = std::min<int64_t>(R, n - tile * R);
    const auto bytes = static_cast<uint32_t>(rows * d * static_cast<int64_t>(sizeof(scalar_t)));
    ::cuda::device::barrier_expect_tx(bar[s], bytes);
    ::cuda::device::memcpy_async_tx(reinterpret_cast<scalar_t*>(ring + s * stage_stride),
                                    Xb + tile * R * d, ::cuda::aligned_size_t<16>(bytes), bar[s]);
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) init(&bar[s], blockDim.x);
    ::cuda::device::experimental::fence_proxy_async_shared_cta();  // the barriers, to the engine
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 0; k < stages; ++k) {
      const int64_t tile = blockIdx.x + k * static_cast<int64_t>(gridDim.x);
      if (tile < tiles) issue(tile);
    }
  }
  Regs regs;
  regs.start(v + b * d, nv);
  int64_t k = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++k) {
    const int s = static_cast<int>(k % stages);
    barrier::arrival_token token = bar[s].arrive();
    bar[s].wait(std::move(token));
    vec_t xr[R][G];
    Regs::load(xr, reinterpret_cast<const vec_t*>(ring + s * stage_stride), tile * R, n, nv);
    regs.dots(xr, partial);
    // Every thread has read the stage (into xr) and written its partials: the stage can take
    // tile k + stages. Nobody writes partial again before every thread has arrived at the next
    // tile's barrier, i.e. has read these.
    __syncthreads();
    if (threadIdx.x == 0) {
      const int64_t next = tile + stages * static_cast<int64_t>(gridDim.x);
      if (next < tiles) {
        ::cuda::device::experimental::fence_proxy_async_shared_cta();
        issue(next);
      }
    }
    regs.accumulate(xr, partial);
  }
  regs.template finish<kStep>(acc, counter, out, v, b, d, shift, scale, cg);
#else
  __trap();  // launched only on sm_90 and later (LstsqApply checks the device)
#endif
}

// Whether this build holds xtxv_bulk_kernel's sm_90 body: on a card of compute capability 9.x a
// build for an older architecture only (its PTX JIT-compiled there) has the trapping stub, so
// "bulk" then runs as "tiles". The PTX version of the code the device would run, asked once.
template <typename scalar_t, typename acc_t>
bool bulk_kernel_built_for_sm90() {
  static const bool ok = [] {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, xtxv_bulk_kernel<scalar_t, acc_t, 1, false>) != cudaSuccess) {
      (void)cudaGetLastError();  // not left for the next launch check to report as its own
      return false;
    }
    return attr.ptxVersion >= 90;
  }();
  return ok;
}

// f(std::integral_constant<int, G>, std::bool_constant<step>) for the register kernels' column
// groups per thread, G in {1, 2, 4}, and whether they run the CG step in their epilogue.
template <typename F>
void with_groups_and_step(int G, bool step, F&& f) {
  auto by_step = [&](auto g) {
    if (step) f(g, std::true_type{});
    else f(g, std::false_type{});
  };
  if (G == 1) by_step(std::integral_constant<int, 1>{});
  else if (G == 2) by_step(std::integral_constant<int, 2>{});
  else by_step(std::integral_constant<int, 4>{});
}

// Which least-squares product kernel LstsqApply runs, IMAML_CUDA_XTXV: "tiles" (xtxv_tiles_kernel
// where it applies), "rows" (xtxv_kernel), or unset / "auto": tiles inside the multi-launch CG
// loop, and for a lone product (lstsq_apply) when X is larger than the L2 cache. Measured on an
// H100 (2026-11-28, bench_kernels): in the CG loop tiles were 1.28x, 1.28x and 1.36x faster at
// (32, 50, 200), (32, 500, 2000) and (1, 4000, 4000) with the step epilogue; a lone product was
// 1.44x and 1.15x faster at the two sizes above L2 (122 and 61 MiB) and 1.46x slower at 1.3 MB,
// where X stays in L2 and the row kernel's re-reads of it are cheap.
// "bulk" (opt-in): xtxv_bulk_kernel where it applies (sm_90 and later), else as "tiles".
// "prefetch" (opt-in): xtxv_tiles_kernel prefetching each block's next tile into L2.
enum class XtxvKernel { kAuto, kTiles, kBulk, kRows, kPrefetch };  // IMAML_CUDA_XTXV's values
inline XtxvKernel xtxv_kernel_choice() {
  return static_cast<XtxvKernel>(
      cuda::env_choice("IMAML_CUDA_XTXV", {"auto", "tiles", "bulk", "rows", "prefetch"}));
}

// Whether the multi-launch least-squares loop runs each CG step as its product kernel's
// epilogue (one launch per iteration instead of four), IMAML_CUDA_CG_STEP: unset / "epilogue"
// (the default since the H100 run of 2026-11-28: a solve 1.05x-1.41x faster with the row
// kernel, 1.16x-1.91x with tiles, at the three bench_kernels sizes) or "separate" (the step as
// its own launches).
inline bool step_epilogue_requested() {
  return cuda::env_choice("IMAML_CUDA_CG_STEP", {"epilogue", "separate"}) == 0;
}

struct DenseApply {
  at::Tensor A;
  void operator()(const at::Tensor& v, at::Tensor& out, const int32_t* status) const {
    const int64_t B = v.size(0), P = v.size(1);
    if (B == 0 || P == 0) return;
    const dim3 grid((P + kWarpsPerBlock - 1) / kWarpsPerBlock, B);
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "dense_matvec_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      dense_matvec_kernel<scalar_t, acc_t><<<grid, kBlockSize, 0, at::cuda::getCurrentCUDAStream()>>>(
          A.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), status, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

// shift v + scale X^T X v for the multi-launch loop and lstsq_apply: one xtxv_kernel launch per
// product. acc and counter are made zero once and left zero by every launch.
// The least-squares product kernels add each block's column sums with float atomics, in no
// fixed order, when a system has several blocks (one block, or the two-bmm route, is
// deterministic): under torch.use_deterministic_algorithms(True) that raises (or warns), as
// ATen's own such ops do.
inline void alert_atomics(const dim3& grid) {
  if (grid.x > 1)
    at::globalContext().alertNotDeterministic(
        "imaml_ext least-squares product X^T X v on CUDA (float atomics across blocks; "
        "use_ext=False runs the PyTorch twin)");
}

struct LstsqApply {
  at::Tensor X;
  double shift, scale;
  at::Tensor acc, counter;
  XtxvKernel kernel;  // kRows, kTiles, kBulk or kPrefetch (see xtxv_kernel_choice)
  // in_cg_loop: the products of a multi-launch CG solve (else a lone product, lstsq_apply)
  LstsqApply(at::Tensor X_, double shift_, double scale_, bool in_cg_loop)
      : X(std::move(X_)), shift(shift_), scale(scale_), kernel(xtxv_kernel_choice()) {
    if (kernel == XtxvKernel::kAuto) {
      kernel = in_cg_loop || X.numel() * static_cast<int64_t>(X.element_size()) >
                                 at::cuda::getCurrentDeviceProperties()->l2CacheSize
                   ? XtxvKernel::kTiles
                   : XtxvKernel::kRows;
    }
    const int64_t B = X.size(0), d = X.size(2);
    acc = at::zeros({B, d}, X.options().dtype(X.scalar_type() == at::kDouble ? at::kDouble
                                                                             : at::kFloat));
    counter = at::zeros({B}, X.options().dtype(at::kInt));
  }
  void operator()(const at::Tensor& v, at::Tensor& out, const int32_t* status) const {
    run(v, out, status, nullptr);
  }

  // One CG iteration: A p into Ap and the step, in the product's launch with
  // IMAML_CUDA_CG_STEP=epilogue (where the product is a kernel of ours), else as two ops.
  void iterate(const at::Tensor& p, at::Tensor& Ap, const at::Tensor& x, const at::Tensor& r,
               const at::Tensor& rs, const at::Tensor& bnorm2, const at::Tensor& status,
               const at::Tensor& iters, double rtol, double atol) const {
    const auto* st = static_cast<const int32_t*>(status.data_ptr());
    const bool stepped = step_epilogue_requested()
                             ? run(p, Ap, st, &status, {&x, &r, &rs, &bnorm2, &iters}, rtol, atol)
                             : run(p, Ap, st, nullptr);
    if (!stepped) cuda::launch_cg_step(x, r, p, Ap, rs, bnorm2, status, iters, rtol, atol);
  }

 private:
  struct StepTensors {
    const at::Tensor *x, *r, *rs, *bnorm2, *iters;
  };

  // Queues out = A v. With `step_status` (the CG's status, whose data `status` is), the kernels
  // also run the CG step in their epilogue and this returns true; it returns false, having
  // queued only the product, where the product is not one of our kernels (then the caller
  // queues the step).
  bool run(const at::Tensor& v, at::Tensor& out, const int32_t* status,
           const at::Tensor* step_status, StepTensors st = {}, double rtol = 0.0,
           double atol = 0.0) const {
    const int64_t B = X.size(0), n = X.size(1), d = X.size(2);
    if (B == 0 || d == 0) return false;
    auto stream = at::cuda::getCurrentCUDAStream();
    bool stepped = false;
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "lstsq_apply_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      cuda::CgStepArgs<scalar_t> cg{};
      if (step_status != nullptr) {
        cg = {st.x->data_ptr<scalar_t>(), st.r->data_ptr<scalar_t>(),
              v.data_ptr<scalar_t>(), st.rs->data_ptr<scalar_t>(),
              st.bnorm2->data_ptr<scalar_t>(), step_status->data_ptr<int32_t>(),
              st.iters->data_ptr<int32_t>(), rtol, atol};
      }
      const size_t smem = static_cast<size_t>(d + kWarpsPerBlock + 4) * sizeof(acc_t);
      if (smem > cuda::max_dynamic_smem() || n == 0) {
        // d too large for the column sums in shared memory: two batched products (two passes
        // over X).
        auto xv = at::bmm(X, v.unsqueeze(-1));
        auto xtxv = at::bmm(X.transpose(1, 2), xv).squeeze(-1);
        auto prod = at::add(at::mul(v, shift), xtxv, scale);
        if (status == nullptr) {
          out.copy_(prod);
          return;
        }
        // As the kernels: a system the mask does not mark running keeps its out (the set-up's
        // zeros where x0 = 0, so a non-finite X is met at the first iteration's product, as in
        // the kernels and the CPU solvers, not in r0). Read on the device: no host sync.
        // target_device: no pointer query (cudaPointerGetAttributes) per product
        auto running = at::for_blob(const_cast<int32_t*>(status), {B})
                           .options(X.options().dtype(at::kInt))
                           .target_device(X.device())
                           .make_tensor()
                           .eq(static_cast<int32_t>(kRunning))
                           .unsqueeze(-1);
        out.copy_(at::where(running, prod, out));
        return;
      }
      stepped = step_status != nullptr;
      if (kernel != XtxvKernel::kRows && cuda::can_vec16<scalar_t>(X.data_ptr(), v.data_ptr(), d)) {
        const int64_t nv = d / cuda::Vec16<scalar_t>::kN;
        const int G = nv <= kBlockSize ? 1 : nv <= 2 * kBlockSize ? 2 : nv <= 4 * kBlockSize ? 4 : 0;
        const auto* prop = at::cuda::getCurrentDeviceProperties();
        // xtxv_bulk_kernel: a ring of 2 or 3 stages of R rows each, one block per SM
        const int64_t stride = (static_cast<int64_t>(16 / std::max(G, 1)) * d *
                                    static_cast<int64_t>(sizeof(scalar_t)) + 127) / 128 * 128;
        const int64_t room = static_cast<int64_t>(prop->sharedMemPerBlockOptin) - 4096;
        const int stages = static_cast<int>(std::min<int64_t>(3, std::max<int64_t>(room, 0) / stride));
        if (kernel == XtxvKernel::kBulk && G > 0 && prop->major >= 9 && stages >= 2 &&
            bulk_kernel_built_for_sm90<scalar_t, acc_t>()) {
          const int64_t R = 16 / G, tiles = (n + R - 1) / R;
          const size_t ring = static_cast<size_t>(stages * stride);
          auto launch = [&](auto kernel_fn) {
            cuda::allow_smem(kernel_fn, ring);
            // one wave over all systems (the ring keeps about one block per SM)
            const dim3 grid(static_cast<unsigned>(persistent_blocks_per_system(
                                cuda::resident_blocks(kernel_fn, ring), B, tiles)),
                            B);
            alert_atomics(grid);
            kernel_fn<<<grid, kBlockSize, ring, stream>>>(
                X.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                acc.data_ptr<acc_t>(), reinterpret_cast<unsigned int*>(counter.data_ptr<int32_t>()),
                status, n, d, shift, scale, cg, stages, stride);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          };
          with_groups_and_step(G, stepped, [&](auto g, auto step) {
            launch(xtxv_bulk_kernel<scalar_t, acc_t, decltype(g)::value, decltype(step)::value>);
          });
          return;
        }
        if (G > 0) {
          const int64_t R = 16 / G, tiles = (n + R - 1) / R;
          const bool prefetch = kernel == XtxvKernel::kPrefetch;
          auto launch = [&](auto kernel_fn) {
            // one wave over all systems (two blocks per SM by __launch_bounds__ and registers)
            const dim3 grid(static_cast<unsigned>(persistent_blocks_per_system(
                                cuda::resident_blocks(kernel_fn, 0), B, tiles)),
                            B);
            alert_atomics(grid);
            kernel_fn<<<grid, kBlockSize, 0, stream>>>(
                X.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                acc.data_ptr<acc_t>(), reinterpret_cast<unsigned int*>(counter.data_ptr<int32_t>()),
                status, n, d, shift, scale, cg, prefetch);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          };
          with_groups_and_step(G, stepped, [&](auto g, auto step) {
            launch(xtxv_tiles_kernel<scalar_t, acc_t, decltype(g)::value, decltype(step)::value>);
          });
          return;
        }
      }
      // About four blocks per SM over all systems, each with 16 to 64 rows (its column sums'
      // zeroing and global atomics are amortised over them).
      const int64_t rows_per_block = cuda::rows_per_block_for(B, n, 2 * kWarpsPerBlock);
      const dim3 grid((n + rows_per_block - 1) / rows_per_block, B);
      auto launch = [&](auto kernel) {
        cuda::allow_smem(kernel, smem);
        alert_atomics(grid);
        kernel<<<grid, kBlockSize, smem, stream>>>(
            X.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
            acc.data_ptr<acc_t>(), reinterpret_cast<unsigned int*>(counter.data_ptr<int32_t>()),
            status, n, d, rows_per_block, shift, scale, cg);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      const bool vec = cuda::can_vec16<scalar_t>(X.data_ptr(), v.data_ptr(), d);
      if (stepped)
        vec ? launch(xtxv_kernel<scalar_t, acc_t, true, true>)
            : launch(xtxv_kernel<scalar_t, acc_t, false, true>);
      else
        vec ? launch(xtxv_kernel<scalar_t, acc_t, true, false>)
            : launch(xtxv_kernel<scalar_t, acc_t, false, false>);
    });
    return stepped;
  }
};

SolveResult cg_solve_dense_cuda(const at::Tensor& A, const at::Tensor& b, const at::Tensor& x0,
                                int64_t max_iter, double rtol, double atol) {
  check_solve_args("cg_solve_dense", b, x0, max_iter, rtol, atol);
  TORCH_CHECK_VALUE(A.dim() == 3 && A.size(0) == b.size(0) && A.size(1) == b.size(1) &&
                  A.size(2) == b.size(1),
              "cg_solve_dense: A must be (", b.size(0), ", ", b.size(1), ", ", b.size(1),
              ") to match b ", b.sizes(), ", got ", A.sizes());
  TORCH_CHECK_VALUE(A.scalar_type() == b.scalar_type() && A.device() == b.device(),
              "cg_solve_dense: A must have b's dtype and device (", b.scalar_type(), ", ",
              b.device(), "), got ", A.scalar_type(), ", ", A.device());
  if (b.size(0) > cuda::kMaxSystemsPerRun)
    return cuda::cat_system_runs<SolveResult>(b.size(0), [&](int64_t s, int64_t n) {
      return cg_solve_dense_cuda(A.narrow(0, s, n), b.narrow(0, s, n), x0.narrow(0, s, n),
                                 max_iter, rtol, atol);
    });
  c10::cuda::OptionalCUDAGuard guard(b.device());
  SolveResult out;
  if (cuda::fused_cg_dense(A, b, x0, max_iter, rtol, atol, &out)) return out;
  return cuda::solve_cuda(DenseApply{A.contiguous()}, b, x0, max_iter, rtol, atol);
}

SolveResult cg_solve_lstsq_cuda(const at::Tensor& X, const at::Tensor& b, const at::Tensor& x0,
                                double shift, double scale, int64_t max_iter, double rtol,
                                double atol) {
  check_solve_args("cg_solve_lstsq", b, x0, max_iter, rtol, atol);
  check_lstsq_operator("cg_solve_lstsq", X, b, "b", shift, scale);
  if (b.size(0) > cuda::kMaxSystemsPerRun)
    return cuda::cat_system_runs<SolveResult>(b.size(0), [&](int64_t s, int64_t n) {
      return cg_solve_lstsq_cuda(X.narrow(0, s, n), b.narrow(0, s, n), x0.narrow(0, s, n), shift,
                                 scale, max_iter, rtol, atol);
    });
  c10::cuda::OptionalCUDAGuard guard(b.device());
  SolveResult out;
  if (cuda::fused_cg_lstsq(X, b, x0, shift, scale, max_iter, rtol, atol, &out)) return out;
  return cuda::solve_cuda(LstsqApply(X.contiguous(), shift, scale, true), b, x0, max_iter, rtol, atol);
}

at::Tensor lstsq_apply_cuda(const at::Tensor& X, const at::Tensor& v, double shift, double scale) {
  check_lstsq_operator("lstsq_apply", X, v, "v", shift, scale);
  if (v.size(0) > cuda::kMaxSystemsPerRun)
    return std::get<0>(cuda::cat_system_runs<std::tuple<at::Tensor>>(
        v.size(0), [&](int64_t s, int64_t n) {
          return std::make_tuple(lstsq_apply_cuda(X.narrow(0, s, n), v.narrow(0, s, n), shift, scale));
        }));
  c10::cuda::OptionalCUDAGuard guard(v.device());
  auto vc = v.contiguous();
  auto out = at::empty_like(vc);
  LstsqApply(X.contiguous(), shift, scale, false)(vc, out, nullptr);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CUDA, m) {
  m.impl("cg_step", &cg_step_cuda);
  m.impl("cg_begin", &cg_begin_cuda);
  m.impl("cg_end", &cg_end_cuda);
  m.impl("cg_solve_dense", &cg_solve_dense_cuda);
  m.impl("cg_solve_lstsq", &cg_solve_lstsq_cuda);
  m.impl("lstsq_apply", &lstsq_apply_cuda);
}

}  // namespace imaml_ext

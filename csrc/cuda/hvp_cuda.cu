// CUDA kernels of the softmax-head ops (schemas in csrc/module.cpp, arithmetic in
// csrc/hvp_math.h): softmax_head_hvp and the whole-loop cg_solve_softmax_head.
//
// Thread mapping, per tile of T samples of one system (T <= 64):
//   1. one warp per sample: the c dot products z_k = V_k . f_i + vb_k (and the logits
//      W_k . f_i + bias_k when the probabilities are not precomputed) with lanes striding the
//      features and a butterfly sum; then the classes spread over the lanes for the softmax and
//      u_i = p_i (z_i - p_i . z_i) (warp max/sum), stored in the tile's U (T x c);
//   2. after a barrier, one thread per entry (k, j) of the (c x f) result sums U[i, k] F[i, j]
//      over the tile's samples (re-reading the tile of F from L1/L2), and one per class sums
//      U[i, k]. No atomics inside the block: shared-memory atomics on the same entries from
//      every sample serialise, which made a per-sample outer-product update 2-3x slower.
// The tile's sums go to global memory with one atomic per entry (multi-block kernel), or straight
// into the block's own accumulator (single-launch solver).
//
// Launch shapes:
//   softmax_head_hvp_kernel: blocks over (sample chunks, systems); the last block of each system
//     to finish writes shift v + scale/n acc (solve.cuh's last_block_epilogue), so a product is
//     one launch. The standalone op computes the probabilities in step 1; the multi-launch solver
//     reads them from a buffer made once by head_probs_kernel.
//   cg_fused_softmax_head_kernel: one block per system, all CG iterations inside (solve.cuh's
//     block_cg); probabilities computed once at its start into a global buffer.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#include <torch/types.h>

#include <limits>

#include "../cg_math.h"
#include "../hvp_math.h"
#include "../ops.h"
#include "common.cuh"
#include "solve.cuh"

namespace imaml_ext {
namespace {

using cuda::kBlockSize;
using cuda::kWarpSize;
using cuda::kWarpsPerBlock;

// ---- one warp, one sample ----------------------------------------------------------------------

// s_z[k] = V_k . f_i + vb_k (kZ) and s_l[k] = W_k . f_i + bias_k (kLogits) for k < c, sharing each
// load of f_i. V and vb may be written by the calling kernel (the CG direction): plain pointers.
template <typename scalar_t, typename acc_t, bool kZ, bool kLogits>
__device__ void warp_sample_dots(const scalar_t* __restrict__ fi, int64_t f, int64_t c,
                                 const scalar_t* __restrict__ W,
                                 const scalar_t* __restrict__ bias, const scalar_t* V,
                                 const scalar_t* vb, acc_t* s_l, acc_t* s_z) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t k = 0; k < c; ++k) {
    acc_t tl = 0, tz = 0;
    for (int64_t j = lane; j < f; j += kWarpSize) {
      const acc_t x = static_cast<acc_t>(fi[j]);
      if constexpr (kLogits) tl += static_cast<acc_t>(W[k * f + j]) * x;
      if constexpr (kZ) tz += static_cast<acc_t>(V[k * f + j]) * x;
    }
    if constexpr (kLogits) tl = cuda::warp_allsum(tl);
    if constexpr (kZ) tz = cuda::warp_allsum(tz);
    if (lane == 0) {
      if constexpr (kLogits) s_l[k] = tl + static_cast<acc_t>(bias[k]);
      if constexpr (kZ) s_z[k] = tz + static_cast<acc_t>(vb[k]);
    }
  }
  __syncwarp();
}

// Softmax of the warp's s_l[0, c) in place; lane t owns classes t, t + 32, ... (so no barrier
// between the passes), the max and the sum are warp-wide.
template <typename acc_t>
__device__ void warp_softmax(acc_t* s_l, int64_t c) {
  const int lane = threadIdx.x % kWarpSize;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = lane; k < c; k += kWarpSize) m = s_l[k] > m ? s_l[k] : m;
  m = cuda::warp_allmax(m);
  acc_t s = 0;
  for (int64_t k = lane; k < c; k += kWarpSize) {
    const acc_t e = softmax_term(s_l[k], m);
    s_l[k] = e;
    s += e;
  }
  const acc_t inv = acc_t(1) / cuda::warp_allsum(s);
  for (int64_t k = lane; k < c; k += kWarpSize) s_l[k] *= inv;
  __syncwarp();
}

// z <- u = p (z - p.z) for one sample's c classes; lane t owns classes t, t + 32, ...
template <typename acc_t>
__device__ void warp_sample_u(const acc_t* p, acc_t* z, int64_t c) {
  const int lane = threadIdx.x % kWarpSize;
  acc_t pz = 0;
  for (int64_t k = lane; k < c; k += kWarpSize) pz += p[k] * z[k];
  pz = cuda::warp_allsum(pz);
  for (int64_t k = lane; k < c; k += kWarpSize) z[k] = softmax_head_u(p[k], z[k], pz);
  // Other lanes read u next (the tile's second half), or rewrite this scratch (the next sample).
  __syncwarp();
}

// Phase 1 of a tile: U[i] = u of sample i0 + i for i < T, one warp per sample. Fs: the system's
// features; kProbs: p from probs (the system's (n, c)), else from W, bias through s_l (this
// warp's c-entry scratch).
template <typename scalar_t, typename acc_t, bool kProbs>
__device__ void tile_u(const scalar_t* __restrict__ Fs, int64_t i0, int64_t T, int64_t f,
                       int64_t c, const scalar_t* __restrict__ W,
                       const scalar_t* __restrict__ bias, const acc_t* probs, const scalar_t* V,
                       const scalar_t* vb, acc_t* U, acc_t* s_l) {
  const int warp = threadIdx.x / kWarpSize;
  for (int64_t i = warp; i < T; i += kWarpsPerBlock) {
    const scalar_t* fi = Fs + (i0 + i) * f;
    acc_t* u = U + i * c;
    if constexpr (kProbs) {
      warp_sample_dots<scalar_t, acc_t, true, false>(fi, f, c, nullptr, nullptr, V, vb, nullptr,
                                                     u);
      warp_sample_u(probs + (i0 + i) * c, u, c);
    } else {
      warp_sample_dots<scalar_t, acc_t, true, true>(fi, f, c, W, bias, V, vb, s_l, u);
      warp_softmax(s_l, c);
      warp_sample_u(s_l, u, c);
    }
  }
}

// Phase 2 of a tile (after a barrier): store(e, sum_i U[i, k] F[i0 + i, j]) for e = k f + j < cf,
// and store(cf + k, sum_i U[i, k]) for k < c. One thread per entry; every thread of the block.
template <typename scalar_t, typename acc_t, typename Store>
__device__ void tile_sums(const scalar_t* __restrict__ Fs, int64_t i0, int64_t T, int64_t f,
                          int64_t c, const acc_t* U, Store store) {
  const int64_t cf = c * f;
  const scalar_t* F0 = Fs + i0 * f;
  for (int64_t e = threadIdx.x; e < cf; e += kBlockSize) {
    const int64_t k = e / f, j = e - k * f;
    acc_t s = 0;
#pragma unroll 4
    for (int64_t i = 0; i < T; ++i) s += U[i * c + k] * static_cast<acc_t>(F0[i * f + j]);
    store(e, s);
  }
  for (int64_t k = threadIdx.x; k < c; k += kBlockSize) {
    acc_t s = 0;
    for (int64_t i = 0; i < T; ++i) s += U[i * c + k];
    store(cf + k, s);
  }
}

// probs_i = softmax(W f_i + bias), through the warp's scratch s_l (c entries).
template <typename scalar_t, typename acc_t>
__device__ void warp_sample_probs(const scalar_t* __restrict__ fi, int64_t f, int64_t c,
                                  const scalar_t* __restrict__ W,
                                  const scalar_t* __restrict__ bias, acc_t* s_l, acc_t* probs_i) {
  warp_sample_dots<scalar_t, acc_t, false, true>(fi, f, c, W, bias, nullptr, nullptr, s_l,
                                                 nullptr);
  warp_softmax(s_l, c);
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t k = lane; k < c; k += kWarpSize) probs_i[k] = s_l[k];
  __syncwarp();
}

// ---- the multi-block kernels -------------------------------------------------------------------

struct HeadLayout {
  int64_t n, f, c;
};

// out[b] = shift v[b] + factor * sum_i (u_i f_i^T, u_i) for running systems, in one launch:
// block (k, b) sums its tile of samples (tile_u, tile_sums) into acc[b] (global, zero on entry
// and exit) with one atomic per entry, and the last block of system b to finish writes out[b]
// (last_block_epilogue). Block scratch, (samples_per_block + 8) x c acc_t: the tile's U, then
// each warp's c logits; in dynamic shared memory, or at `scratch` (global, per block) when it
// does not fit. kProbs: p_i read from probs (B, n, c); else computed from W, bias on the pass.
// The direction and the output of system b are given as a (c x f) part and a (c) part with their
// own row strides, so both the op's (V, vb) pairs and the solver's flat [W, bias] vectors fit.
template <typename scalar_t, typename acc_t, bool kProbs>
__global__ void __launch_bounds__(kBlockSize)
    softmax_head_hvp_kernel(const scalar_t* __restrict__ F, const scalar_t* __restrict__ W,
                            const scalar_t* __restrict__ bias, const acc_t* __restrict__ probs,
                            const scalar_t* __restrict__ V, int64_t V_stride,
                            const scalar_t* __restrict__ vb, int64_t vb_stride, scalar_t* outW,
                            int64_t outW_stride, scalar_t* outb, int64_t outb_stride,
                            acc_t* __restrict__ acc, unsigned int* __restrict__ counter,
                            acc_t* __restrict__ scratch, const int32_t* __restrict__ status,
                            HeadLayout L, int64_t samples_per_block, double shift,
                            double factor) {
  extern __shared__ __align__(16) unsigned char hvp_smem[];
  const int64_t b = blockIdx.y;
  if (status != nullptr && status[b] != kRunning) return;
  const int64_t n = L.n, f = L.f, c = L.c, P = c * (f + 1), cf = c * f;
  const int warp = threadIdx.x / kWarpSize;
  acc_t* U = reinterpret_cast<acc_t*>(hvp_smem);
  if (scratch != nullptr) {
    const int64_t blk = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
    U = scratch + blk * (samples_per_block + kWarpsPerBlock) * c;
  }
  acc_t* s_l = U + (samples_per_block + warp) * c;
  const scalar_t* Fs = F + b * n * f;
  const scalar_t* Vb = V + b * V_stride;
  const scalar_t* vbb = vb + b * vb_stride;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * samples_per_block;
  const int64_t T = (i0 + samples_per_block < n ? i0 + samples_per_block : n) - i0;
  tile_u<scalar_t, acc_t, kProbs>(Fs, i0, T, f, c, kProbs ? nullptr : W + b * cf,
                                  kProbs ? nullptr : bias + b * c,
                                  kProbs ? probs + b * n * c : nullptr, Vb, vbb, U, s_l);
  __syncthreads();
  acc_t* accb = acc + b * P;
  tile_sums(Fs, i0, T, f, c, U, [&](int64_t e, acc_t s) { atomicAdd(accb + e, s); });
  const acc_t sh = static_cast<acc_t>(shift), g = static_cast<acc_t>(factor);
  scalar_t* oW = outW + b * outW_stride;
  scalar_t* ob = outb + b * outb_stride;
  cuda::last_block_epilogue(accb, counter + b, gridDim.x, P, [&](int64_t j, acc_t s) {
    if (j < cf)
      oW[j] = static_cast<scalar_t>(sh * static_cast<acc_t>(Vb[j]) + g * s);
    else
      ob[j - cf] = static_cast<scalar_t>(sh * static_cast<acc_t>(vbb[j - cf]) + g * s);
  });
}

// probs[b, i] = softmax(W[b] f_i + bias[b]); warps over samples, grid (sample chunks, B).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockSize)
    head_probs_kernel(const scalar_t* __restrict__ F, const scalar_t* __restrict__ W,
                      const scalar_t* __restrict__ bias, acc_t* __restrict__ probs,
                      acc_t* __restrict__ scratch, int64_t n, int64_t f, int64_t c,
                      int64_t samples_per_block) {
  extern __shared__ __align__(16) unsigned char probs_smem[];
  const int64_t b = blockIdx.y;
  const int warp = threadIdx.x / kWarpSize;
  acc_t* scr;
  if (scratch == nullptr) {
    scr = reinterpret_cast<acc_t*>(probs_smem) + warp * c;
  } else {
    const int64_t blk = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
    scr = scratch + (blk * kWarpsPerBlock + warp) * c;
  }
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * samples_per_block;
  const int64_t i1 = i0 + samples_per_block < n ? i0 + samples_per_block : n;
  for (int64_t i = i0 + warp; i < i1; i += kWarpsPerBlock)
    warp_sample_probs(F + (b * n + i) * f, f, c, W + b * c * f, bias + b * c, scr,
                      probs + (b * n + i) * c);
}

// ---- the single-launch solver -----------------------------------------------------------------

// Samples per tile in the single-launch solver.
constexpr int64_t kFusedTile = 32;

template <typename scalar_t, typename acc_t>
struct SoftmaxHeadBlockOp {
  const scalar_t* __restrict__ F;  // (n, f) of this system
  const acc_t* probs;              // (n, c) of this system, written by this block at its start
  int64_t n, f, c;
  double shift, factor;
  acc_t* U;  // kFusedTile x c, shared memory
  __device__ void accumulate(const scalar_t* v, acc_t* acc) const {
    for (int64_t i0 = 0; i0 < n; i0 += kFusedTile) {
      const int64_t T = i0 + kFusedTile < n ? kFusedTile : n - i0;
      tile_u<scalar_t, acc_t, true>(F, i0, T, f, c, nullptr, nullptr, probs, v, v + c * f, U,
                                    nullptr);
      __syncthreads();
      // The block owns the system: each entry's sum is added by its one thread, no atomics.
      tile_sums(F, i0, T, f, c, U, [&](int64_t e, acc_t s) { acc[e] += s; });
      __syncthreads();  // the next tile rewrites U
    }
  }
  __device__ acc_t combine(acc_t v, acc_t a) const {
    return static_cast<acc_t>(shift) * v + static_cast<acc_t>(factor) * a;
  }
};

// One block per system (blockIdx.x). Dynamic shared memory: [accumulator (P)][U (kFusedTile x c)]
// [each warp's scratch (8 x c)].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockSize)
    cg_fused_softmax_head_kernel(const scalar_t* __restrict__ F, const scalar_t* __restrict__ W,
                                 const scalar_t* __restrict__ bias, acc_t* probs,
                                 const scalar_t* b, scalar_t* x, scalar_t* r, scalar_t* p,
                                 int64_t n, int64_t f, int64_t c, double shift, double factor,
                                 int64_t max_iter, double rtol, double atol, int32_t* iters,
                                 scalar_t* rnorm, int32_t* status) {
  extern __shared__ __align__(16) unsigned char fused_head_smem[];
  const int64_t s = blockIdx.x;
  const int64_t P = c * (f + 1);
  acc_t* acc = reinterpret_cast<acc_t*>(fused_head_smem);
  acc_t* U = acc + P;
  acc_t* scratch = U + kFusedTile * c;
  const int warp = threadIdx.x / kWarpSize;
  const scalar_t* Fs = F + s * n * f;
  acc_t* ps = probs + s * n * c;
  for (int64_t i = warp; i < n; i += kWarpsPerBlock)
    warp_sample_probs(Fs + i * f, f, c, W + s * c * f, bias + s * c, scratch + warp * c,
                      ps + i * c);
  __syncthreads();  // every warp reads every sample's probabilities from here on
  const SoftmaxHeadBlockOp<scalar_t, acc_t> op{Fs, ps, n, f, c, shift, factor, U};
  cuda::block_cg<scalar_t, acc_t>(op, b + s * P, x + s * P, r + s * P, p + s * P, acc, P,
                                  max_iter, rtol, atol, iters + s, rnorm + s, status + s);
}

// ---- host side ------------------------------------------------------------------------------

size_t acc_size_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
}

at::ScalarType acc_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Where a direction or an output of B systems lives: a (c x f) part and a (c) part, each with its
// own row stride (the op's (V, vb) pairs, or parts of the solver's flat [W, bias] vectors).
template <typename T>
struct HeadVec {
  T* W;
  int64_t W_stride;
  T* b;
  int64_t b_stride;
};

// Queues out = shift v + factor sum_i (u_i f_i^T, u_i) for every running system, one launch.
// probs: (B, n, c) acc_t, or undefined to compute them from W and bias on the pass (W and bias
// are not read when probs is given). acc (B, P) and counter (B,) int32 are zero on entry and
// are left zero.
void launch_head_apply(const at::Tensor& F, int64_t c, const at::Tensor& W,
                       const at::Tensor& bias, const at::Tensor& probs,
                       HeadVec<const void> v, HeadVec<void> out, const at::Tensor& acc,
                       const at::Tensor& counter, const int32_t* status, double shift,
                       double factor) {
  const int64_t B = F.size(0), n = F.size(1), f = F.size(2);
  const int64_t P = c * (f + 1);
  if (B == 0 || P == 0) return;
  const size_t as = acc_size_of(F);
  // n == 0 still takes one block per system: it writes out = shift v.
  const int64_t spb = cuda::rows_per_block_for(B, n, 2 * kWarpsPerBlock);
  const dim3 grid(n > 0 ? (n + spb - 1) / spb : 1, B);
  // Several blocks of a system add their sums with float atomics, in no fixed order: under
  // torch.use_deterministic_algorithms(True) this raises (or warns), as ATen's own such ops do.
  if (grid.x > 1)
    at::globalContext().alertNotDeterministic(
        "imaml_ext softmax-head Hessian product on CUDA (float atomics across blocks; "
        "use_ext=False runs the PyTorch twin)");
  // + 4: ptxas may widen unrolled reads of U past its end.
  const size_t scr_bytes = static_cast<size_t>((spb + kWarpsPerBlock) * c + 4) * as;
  const bool shared_scr = scr_bytes <= cuda::max_dynamic_smem();
  const size_t smem = shared_scr ? scr_bytes : 0;
  at::Tensor scratch;
  if (!shared_scr)
    scratch = at::empty({static_cast<int64_t>(grid.x) * B * (spb + kWarpsPerBlock) * c + 4},
                        F.options().dtype(acc_type_of(F)));
  const HeadLayout L{n, f, c};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "softmax_head_hvp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* scr = shared_scr ? nullptr : scratch.data_ptr<acc_t>();
    auto launch = [&](auto kernel, const scalar_t* Wp, const scalar_t* bp, const acc_t* pp) {
      cuda::allow_smem(kernel, smem);
      kernel<<<grid, kBlockSize, smem, stream>>>(
          F.data_ptr<scalar_t>(), Wp, bp, pp, static_cast<const scalar_t*>(v.W), v.W_stride,
          static_cast<const scalar_t*>(v.b), v.b_stride, static_cast<scalar_t*>(out.W),
          out.W_stride, static_cast<scalar_t*>(out.b), out.b_stride, acc.data_ptr<acc_t>(),
          reinterpret_cast<unsigned int*>(counter.data_ptr<int32_t>()), scr, status, L, spb,
          shift, factor);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (probs.defined())
      launch(softmax_head_hvp_kernel<scalar_t, acc_t, true>, nullptr, nullptr,
             probs.data_ptr<acc_t>());
    else
      launch(softmax_head_hvp_kernel<scalar_t, acc_t, false>, W.data_ptr<scalar_t>(),
             bias.data_ptr<scalar_t>(), nullptr);
  });
}

std::tuple<at::Tensor, at::Tensor> softmax_head_hvp_cuda(const at::Tensor& F_in,
                                                         const at::Tensor& W_in,
                                                         const at::Tensor& bias_in,
                                                         const at::Tensor& V_in,
                                                         const at::Tensor& vb_in, double shift,
                                                         double scale) {
  check_softmax_head("softmax_head_hvp", F_in, W_in, bias_in, shift, scale);
  check_softmax_head_direction("softmax_head_hvp", W_in, bias_in, V_in, vb_in);
  if (F_in.size(0) > cuda::kMaxSystemsPerRun)
    return cuda::cat_system_runs<std::tuple<at::Tensor, at::Tensor>>(
        F_in.size(0), [&](int64_t s, int64_t n) {
          return softmax_head_hvp_cuda(F_in.narrow(0, s, n), W_in.narrow(0, s, n),
                                       bias_in.narrow(0, s, n), V_in.narrow(0, s, n),
                                       vb_in.narrow(0, s, n), shift, scale);
        });
  c10::cuda::OptionalCUDAGuard guard(F_in.device());
  const auto F = F_in.contiguous(), W = W_in.contiguous(), bias = bias_in.contiguous();
  const auto V = V_in.contiguous(), vb = vb_in.contiguous();
  const int64_t B = F.size(0), n = F.size(1), f = F.size(2), c = W.size(1);
  const int64_t P = c * (f + 1);
  auto outW = at::empty(V.sizes(), V.options());
  auto outb = at::empty(vb.sizes(), vb.options());
  auto acc = at::zeros({B, P}, F.options().dtype(acc_type_of(F)));
  auto counter = at::zeros({B}, F.options().dtype(at::kInt));
  launch_head_apply(F, c, W, bias, at::Tensor(), {V.data_ptr(), c * f, vb.data_ptr(), c},
                    {outW.data_ptr(), c * f, outb.data_ptr(), c}, acc, counter, nullptr, shift,
                    softmax_head_factor(scale, n));
  return {outW, outb};
}

// The solver's operator for the multi-launch loop, over the flat [W, bias] layout: one launch
// per product.
struct SoftmaxHeadApply {
  at::Tensor F, probs;
  int64_t c;
  double shift, factor;
  at::Tensor acc, counter;  // zero between products
  void operator()(const at::Tensor& v, at::Tensor& out, const int32_t* status) const {
    const int64_t P = v.size(1), cf = P - c;
    auto* vp = static_cast<char*>(v.data_ptr());
    auto* op = static_cast<char*>(out.data_ptr());
    const int64_t es = v.element_size();
    launch_head_apply(F, c, at::Tensor(), at::Tensor(), probs, {vp, P, vp + cf * es, P},
                      {op, P, op + cf * es, P}, acc, counter, status, shift, factor);
  }
};

SolveResult cg_solve_softmax_head_cuda(const at::Tensor& F_in, const at::Tensor& W_in,
                                       const at::Tensor& bias_in, const at::Tensor& b_in,
                                       const at::Tensor& x0, double shift, double scale,
                                       int64_t max_iter, double rtol, double atol) {
  const char* op = "cg_solve_softmax_head";
  check_solve_args(op, b_in, x0, max_iter, rtol, atol);
  check_softmax_head(op, F_in, W_in, bias_in, shift, scale);
  check_softmax_head_flat(op, "b", W_in, b_in);
  if (b_in.size(0) > cuda::kMaxSystemsPerRun)
    return cuda::cat_system_runs<SolveResult>(b_in.size(0), [&](int64_t s, int64_t n) {
      return cg_solve_softmax_head_cuda(F_in.narrow(0, s, n), W_in.narrow(0, s, n),
                                        bias_in.narrow(0, s, n), b_in.narrow(0, s, n),
                                        x0.narrow(0, s, n), shift, scale, max_iter, rtol, atol);
    });
  c10::cuda::OptionalCUDAGuard guard(b_in.device());
  const auto F = F_in.contiguous(), W = W_in.contiguous(), bias = bias_in.contiguous();
  const int64_t B = F.size(0), n = F.size(1), f = F.size(2), c = W.size(1);
  const int64_t P = c * (f + 1);
  const double factor = softmax_head_factor(scale, n);
  auto probs = at::empty({B, n, c}, F.options().dtype(acc_type_of(F)));
  const size_t as = acc_size_of(F);
  const size_t smem = static_cast<size_t>(P + (kFusedTile + kWarpsPerBlock) * c + 4) * as;
  auto stream = at::cuda::getCurrentCUDAStream();
  // Work per iteration: a dot product and an axpy of length f per class and sample, plus the
  // per-class warp reductions (about 64 lanes' worth of work each).
  if (B > 0 && cuda::use_fused(B, n * c * (f + 64), smem)) {
    const auto b = b_in.contiguous();
    auto x = x0.contiguous().clone();
    auto r = at::empty_like(b), p = at::empty_like(b);
    auto iters = at::zeros({B}, b.options().dtype(at::kInt));
    auto status = at::zeros({B}, b.options().dtype(at::kInt));
    auto rnorm = at::empty({B}, b.options());
    AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "cg_fused_softmax_head_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto kernel = cg_fused_softmax_head_kernel<scalar_t, acc_t>;
      cuda::allow_smem(kernel, smem);
      kernel<<<static_cast<unsigned>(B), kBlockSize, smem, stream>>>(
          F.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
          probs.data_ptr<acc_t>(), b.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
          r.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), n, f, c, shift, factor, max_iter, rtol,
          atol, iters.data_ptr<int32_t>(), rnorm.data_ptr<scalar_t>(),
          status.data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {x, iters, rnorm, status};
  }
  if (B > 0 && n > 0 && c > 0) {
    const size_t scr_bytes = static_cast<size_t>(kWarpsPerBlock) * c * as;
    const bool shared_scr = scr_bytes <= cuda::max_dynamic_smem();
    const int64_t spb = cuda::rows_per_block_for(B, n, 2 * kWarpsPerBlock);
    const dim3 grid((n + spb - 1) / spb, B);
    at::Tensor scratch;
    if (!shared_scr)
      scratch = at::empty({static_cast<int64_t>(grid.x) * B * kWarpsPerBlock * c},
                          F.options().dtype(acc_type_of(F)));
    AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "softmax_head_probs_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto kernel = head_probs_kernel<scalar_t, acc_t>;
      const size_t smem_p = shared_scr ? scr_bytes : 0;
      cuda::allow_smem(kernel, smem_p);
      kernel<<<grid, kBlockSize, smem_p, stream>>>(
          F.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
          probs.data_ptr<acc_t>(), shared_scr ? nullptr : scratch.data_ptr<acc_t>(), n, f, c,
          spb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto acc = at::zeros({B, P}, F.options().dtype(acc_type_of(F)));
  auto counter = at::zeros({B}, F.options().dtype(at::kInt));
  return cuda::solve_cuda(SoftmaxHeadApply{F, probs, c, shift, factor, acc, counter}, b_in, x0,
                          max_iter, rtol, atol);
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CUDA, m) {
  m.impl("softmax_head_hvp", &softmax_head_hvp_cuda);
  m.impl("cg_solve_softmax_head", &cg_solve_softmax_head_cuda);
}

}  // namespace imaml_ext

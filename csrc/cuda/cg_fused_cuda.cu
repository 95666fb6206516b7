// Single-launch whole-loop CG for the dense and least-squares operators: one block per system
// runs every iteration (solve.cuh's block_cg), so a solve is one launch instead of max_iter x 5,
// and the per-iteration reductions never leave the SM. cg_cuda.cu calls these first and falls
// back to its multi-launch loop when use_fused() declines (few systems with large operators,
// where one block per system would leave most of the GPU idle).
//
// Operators (thread mapping; the CG steps are block_cg's):
//   dense:  warp w takes rows w, w + 8, ...: acc[row] = A[row] . v (16-byte loads when aligned).
//   lstsq:  warp w takes rows w, w + 8, ... of X: t_i = X[i] . v into shared memory; then thread
//           j sums t_i X[i, j] over the rows into acc[j] (block_tile_xt: no atomics; X is
//           re-read from L1/L2).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/types.h>

#include "../cg_math.h"
#include "../ops.h"
#include "common.cuh"
#include "solve.cuh"

namespace imaml_ext {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t, bool kVec>
struct DenseBlockOp {
  const scalar_t* __restrict__ A;  // (P, P) of this system, read-only
  int64_t P;
  __device__ void accumulate(const scalar_t* v, acc_t* acc) const {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    for (int64_t i = warp; i < P; i += kWarpsPerBlock) {
      const acc_t t = warp_row_dot<scalar_t, acc_t, kVec>(A + i * P, v, P);
      if (lane == 0) acc[i] = t;
    }
  }
  __device__ acc_t combine(acc_t, acc_t a) const { return a; }
};

template <typename scalar_t, typename acc_t, bool kVec>
struct LstsqBlockOp {
  const scalar_t* __restrict__ X;  // (n, d) of this system, read-only
  int64_t n, d;
  double shift, scale;
  acc_t* t;  // (n) shared memory: the rows' dot products
  __device__ void accumulate(const scalar_t* v, acc_t* acc) const {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    for (int64_t i = warp; i < n; i += kWarpsPerBlock) {
      const acc_t ti = warp_row_dot<scalar_t, acc_t, kVec>(X + i * d, v, d);
      if (lane == 0) t[i] = ti;
    }
    __syncthreads();
    // The block owns the system: each column's sum goes straight to its entry, no atomics.
    block_tile_xt<scalar_t, acc_t, kVec>(X, t, n, d, [&](int64_t j, acc_t s) { acc[j] = s; });
  }
  __device__ acc_t combine(acc_t v, acc_t a) const { return lstsq_combine<acc_t>(v, a, shift, scale); }
};

// One block per system (blockIdx.x); dynamic shared memory: the accumulator, P acc_t (and for
// least squares the rows' dot products, n acc_t).
template <typename scalar_t, typename acc_t, bool kVec>
__global__ void __launch_bounds__(kBlockSize)
    cg_fused_dense_kernel(const scalar_t* __restrict__ A, const scalar_t* b, scalar_t* x,
                          scalar_t* r, scalar_t* p, int64_t P, int64_t max_iter, double rtol,
                          double atol, int32_t* iters, scalar_t* rnorm, int32_t* status) {
  extern __shared__ __align__(16) unsigned char fused_smem[];
  acc_t* acc = reinterpret_cast<acc_t*>(fused_smem);
  const int64_t s = blockIdx.x;
  const DenseBlockOp<scalar_t, acc_t, kVec> op{A + s * P * P, P};
  block_cg<scalar_t, acc_t>(op, b + s * P, x + s * P, r + s * P, p + s * P, acc, P, max_iter,
                            rtol, atol, iters + s, rnorm + s, status + s);
}

template <typename scalar_t, typename acc_t, bool kVec>
__global__ void __launch_bounds__(kBlockSize)
    cg_fused_lstsq_kernel(const scalar_t* __restrict__ X, const scalar_t* b, scalar_t* x,
                          scalar_t* r, scalar_t* p, int64_t n, int64_t d, double shift,
                          double scale, int64_t max_iter, double rtol, double atol,
                          int32_t* iters, scalar_t* rnorm, int32_t* status) {
  extern __shared__ __align__(16) unsigned char fused_smem[];
  acc_t* acc = reinterpret_cast<acc_t*>(fused_smem);
  const int64_t s = blockIdx.x;
  const LstsqBlockOp<scalar_t, acc_t, kVec> op{X + s * n * d, n, d, shift, scale, acc + d};
  block_cg<scalar_t, acc_t>(op, b + s * d, x + s * d, r + s * d, p + s * d, acc, d, max_iter,
                            rtol, atol, iters + s, rnorm + s, status + s);
}

// The buffers of a fused solve: x (from x0), r, p (B, P); iters, status (B,) int32; rnorm (B,).
struct FusedBuffers {
  at::Tensor b, x, r, p, iters, rnorm, status;
  explicit FusedBuffers(const at::Tensor& b_in, const at::Tensor& x0)
      : b(b_in.contiguous()), x(x0.contiguous().clone()) {
    const int64_t B = b.size(0);
    r = at::empty_like(b);
    p = at::empty_like(b);
    iters = at::zeros({B}, b.options().dtype(at::kInt));
    status = at::zeros({B}, b.options().dtype(at::kInt));
    rnorm = at::empty({B}, b.options());
  }
  SolveResult result() const { return {x, iters, rnorm, status}; }
};

}  // namespace

bool fused_cg_dense(const at::Tensor& A_in, const at::Tensor& b_in, const at::Tensor& x0,
                    int64_t max_iter, double rtol, double atol, SolveResult* out) {
  const int64_t B = b_in.size(0), P = b_in.size(1);
  const size_t acc_size = b_in.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t smem = static_cast<size_t>(P) * acc_size;
  if (B == 0 || !use_fused(B, P * P, smem))
    return false;
  const auto A = A_in.contiguous();
  FusedBuffers buf(b_in, x0);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(b_in.scalar_type(), "cg_fused_dense_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      allow_smem(kernel, smem);
      kernel<<<static_cast<unsigned>(B), kBlockSize, smem, stream>>>(
          A.data_ptr<scalar_t>(), buf.b.data_ptr<scalar_t>(), buf.x.data_ptr<scalar_t>(),
          buf.r.data_ptr<scalar_t>(), buf.p.data_ptr<scalar_t>(), P, max_iter, rtol, atol,
          buf.iters.data_ptr<int32_t>(), buf.rnorm.data_ptr<scalar_t>(),
          buf.status.data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // p is the vector the rows are dotted with; its slices are aligned like A's rows.
    if (can_vec16<scalar_t>(A.data_ptr(), buf.p.data_ptr(), P) &&
        can_vec16<scalar_t>(A.data_ptr(), buf.x.data_ptr(), P))
      launch(cg_fused_dense_kernel<scalar_t, acc_t, true>);
    else
      launch(cg_fused_dense_kernel<scalar_t, acc_t, false>);
  });
  *out = buf.result();
  return true;
}

bool fused_cg_lstsq(const at::Tensor& X_in, const at::Tensor& b_in, const at::Tensor& x0,
                    double shift, double scale, int64_t max_iter, double rtol, double atol,
                    SolveResult* out) {
  const int64_t B = X_in.size(0), n = X_in.size(1), d = X_in.size(2);
  const size_t acc_size = b_in.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  // + 4: ptxas may widen the unrolled reads of the dot products past their end.
  const size_t smem = static_cast<size_t>(d + n + 4) * acc_size;
  if (B == 0 || !use_fused(B, 2 * n * d, smem))
    return false;
  const auto X = X_in.contiguous();
  FusedBuffers buf(b_in, x0);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(b_in.scalar_type(), "cg_fused_lstsq_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      allow_smem(kernel, smem);
      kernel<<<static_cast<unsigned>(B), kBlockSize, smem, stream>>>(
          X.data_ptr<scalar_t>(), buf.b.data_ptr<scalar_t>(), buf.x.data_ptr<scalar_t>(),
          buf.r.data_ptr<scalar_t>(), buf.p.data_ptr<scalar_t>(), n, d, shift, scale, max_iter,
          rtol, atol, buf.iters.data_ptr<int32_t>(), buf.rnorm.data_ptr<scalar_t>(),
          buf.status.data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (can_vec16<scalar_t>(X.data_ptr(), buf.p.data_ptr(), d) &&
        can_vec16<scalar_t>(X.data_ptr(), buf.x.data_ptr(), d))
      launch(cg_fused_lstsq_kernel<scalar_t, acc_t, true>);
    else
      launch(cg_fused_lstsq_kernel<scalar_t, acc_t, false>);
  });
  *out = buf.result();
  return true;
}

}  // namespace cuda
}  // namespace imaml_ext

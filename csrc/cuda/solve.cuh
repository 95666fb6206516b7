// The whole-loop CG machinery of the CUDA solvers, shared by cg_cuda.cu (dense, least squares),
// cg_fused_cuda.cu (their single-launch kernels) and hvp_cuda.cu (the softmax head).
//
// Two ways to run the whole loop, both with per-system early stop and no host read-back:
// - solve_cuda: a fixed sequence of launches, max_iter x (operator, three cg_step launches).
//   Every launch spreads each system over many blocks, so it fills the GPU when B is small and
//   the per-system data is large.
// - block_cg inside a single launch, one block per system: all iterations in the block, the
//   operator's accumulator in shared memory, the reductions with block_sum. No launch gaps and
//   no partial-sum round trips through global memory, so it wins when there are enough systems
//   to fill the GPU or when each system is small (then a launch costs more than its work).
// use_fused() picks between them; IMAML_CG_FUSED=0/1 forces one (tests run both).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/types.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>

#include "../cg_math.h"
#include "../launch_math.h"
#include "../ops.h"
#include "common.cuh"

namespace imaml_ext {
namespace cuda {

// ---- the multi-launch loop --------------------------------------------------------------------

// Queues one CG iteration (three launches) on the current stream; defined in cg_cuda.cu.
void launch_cg_step(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p,
                    const at::Tensor& Ap, const at::Tensor& rs, const at::Tensor& bnorm2,
                    const at::Tensor& status, const at::Tensor& iters, double rtol, double atol,
                    double shift = 0.0, double scale = 1.0);

// The whole loop as a fixed sequence of launches: init with ATen ops, then max_iter times
// (operator, three CG launches). `apply(v, out, status)` queues out = A v, skipping systems whose
// status is not running when status is not null. No value returns to the host until the caller
// reads the result.
// Whether an operator runs whole iterations itself: apply.iterate(p, Ap, x, r, rs, bnorm2,
// status, iters, rtol, atol) queues A p and the CG step (e.g. the step as the product's epilogue).
template <typename T, typename = void>
struct has_iterate : std::false_type {};
template <typename T>
struct has_iterate<T, std::void_t<decltype(&T::iterate)>> : std::true_type {};

template <typename Apply>
SolveResult solve_cuda(const Apply& apply, const at::Tensor& b_in, const at::Tensor& x0,
                       int64_t max_iter, double rtol, double atol) {
  const auto b = b_in.contiguous();
  const int64_t B = b.size(0);
  auto x = x0.contiguous().clone();
  // A x0 only for the systems whose x0 is not all zero (r0 = b for the rest, as in the CPU
  // solvers): `apply` skips the systems this mask does not mark running, and their Ap stays 0.
  // An operator with a non-finite entry is then flagged at the first product instead, with the
  // same status and iteration count. Decided on the device: no host read-back.
  auto Ap = at::zeros_like(b);
  const auto needs_product = at::where((x != 0).any(-1), int64_t(kRunning), int64_t(kConverged))
                                 .to(at::kInt)
                                 .contiguous();
  apply(x, Ap, static_cast<const int32_t*>(needs_product.data_ptr()));
  auto r = (b - Ap).contiguous();
  auto p = r.clone();
  auto rs = (r * r).sum(-1).contiguous();
  auto bnorm2 = (b * b).sum(-1).contiguous();
  // cg_tol2's rounding (rtol and atol cast to the solve's type, then squared; a NaN first term
  // gives atol^2), not clamp_min's: a residual on the threshold gets the kernels' status
  const bool single = b.scalar_type() == at::kFloat;
  const double rt2 = single ? static_cast<double>(static_cast<float>(rtol) * static_cast<float>(rtol))
                            : rtol * rtol;
  const double at2 = single ? static_cast<double>(static_cast<float>(atol) * static_cast<float>(atol))
                            : atol * atol;
  auto t1 = bnorm2 * rt2;
  auto tol2 = at::where(t1 > at2, t1, at::full_like(t1, at2));
  auto finite = at::isfinite(rs) & at::isfinite(tol2);
  auto status = at::where(finite, at::where(rs <= tol2, int64_t(kConverged), int64_t(kRunning)),
                          int64_t(kNonFinite))
                    .to(at::kInt)
                    .contiguous();
  auto iters = at::zeros({B}, b.options().dtype(at::kInt));
  const int32_t* status_ptr = static_cast<const int32_t*>(status.data_ptr());
  for (int64_t k = 0; k < max_iter; ++k) {
    if constexpr (has_iterate<Apply>::value) {
      apply.iterate(p, Ap, x, r, rs, bnorm2, status, iters, rtol, atol);
    } else {
      apply(p, Ap, status_ptr);
      launch_cg_step(x, r, p, Ap, rs, bnorm2, status, iters, rtol, atol);
    }
  }
  return {x, iters, rs.sqrt(), status};
}

// ---- 16-byte vector loads ---------------------------------------------------------------------

template <typename scalar_t>
struct Vec16;
template <>
struct Vec16<float> {
  using type = float4;
  static constexpr int kN = 4;
  __device__ static float dot(const float4& a, const float4& b) {
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
  }
  __device__ static void fma(float* s, float t, const float4& x) {
    s[0] += t * x.x;
    s[1] += t * x.y;
    s[2] += t * x.z;
    s[3] += t * x.w;
  }
};
template <>
struct Vec16<double> {
  using type = double2;
  static constexpr int kN = 2;
  __device__ static double dot(const double2& a, const double2& b) { return a.x * b.x + a.y * b.y; }
  __device__ static void fma(double* s, double t, const double2& x) {
    s[0] += t * x.x;
    s[1] += t * x.y;
  }
};

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Whether rows of length d starting at `base` (and the vector at `v`) can be read as 16-byte
// vectors: every row start is then 16-byte aligned too.
template <typename scalar_t>
bool can_vec16(const void* base, const void* v, int64_t d) {
  return d % Vec16<scalar_t>::kN == 0 && aligned16(base) && aligned16(v);
}

// Sum over the warp, valid in every lane (butterfly).
template <typename T>
__device__ __forceinline__ T warp_allsum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_allmax(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

// row . v for one warp, valid in every lane. With kVec the row and v are read as 16-byte vectors
// (the caller checked can_vec16), four in flight per lane.
template <typename scalar_t, typename acc_t, bool kVec>
__device__ __forceinline__ acc_t warp_row_dot(const scalar_t* __restrict__ row,
                                              const scalar_t* v, int64_t d) {
  const int lane = threadIdx.x % kWarpSize;
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  if constexpr (kVec) {
    using V = Vec16<scalar_t>;
    using vec_t = typename V::type;
    const vec_t* r4 = reinterpret_cast<const vec_t*>(row);
    const vec_t* v4 = reinterpret_cast<const vec_t*>(v);
    const int64_t nv = d / V::kN;
    int64_t q = lane;
    for (; q + 3 * kWarpSize < nv; q += 4 * kWarpSize) {
      const vec_t a0 = r4[q], a1 = r4[q + kWarpSize], a2 = r4[q + 2 * kWarpSize],
                  a3 = r4[q + 3 * kWarpSize];
      s0 += V::dot(a0, v4[q]);
      s1 += V::dot(a1, v4[q + kWarpSize]);
      s2 += V::dot(a2, v4[q + 2 * kWarpSize]);
      s3 += V::dot(a3, v4[q + 3 * kWarpSize]);
    }
    for (; q < nv; q += kWarpSize) s0 += V::dot(r4[q], v4[q]);
  } else {
    for (int64_t j = lane; j < d; j += kWarpSize)
      s0 += static_cast<acc_t>(row[j]) * static_cast<acc_t>(v[j]);
  }
  return warp_allsum((s0 + s1) + (s2 + s3));
}

// store(j, sum_{i < R} t[i] X[i, j]) for every column j of the row-major R x d tile X: thread per
// column (per 16-byte column group with kVec), the rows' loads independent of each other. With
// the t[i] = X[i] . v of the same tile this is the second half of X^T X v without any atomics
// inside the block: X is re-read (from L1/L2, just loaded) instead of accumulating the rows' axpys
// into shared memory, whose atomics serialise. Called by every thread of the block.
template <typename scalar_t, typename acc_t, bool kVec, typename Store>
__device__ __forceinline__ void block_tile_xt(const scalar_t* __restrict__ X, const acc_t* t,
                                              int64_t R, int64_t d, Store store) {
  if constexpr (kVec) {
    using V = Vec16<scalar_t>;
    using vec_t = typename V::type;
    const vec_t* X4 = reinterpret_cast<const vec_t*>(X);
    const int64_t nv = d / V::kN;
    for (int64_t q = threadIdx.x; q < nv; q += kBlockSize) {
      acc_t s[V::kN] = {};
#pragma unroll 4
      for (int64_t i = 0; i < R; ++i) V::fma(s, t[i], X4[i * nv + q]);
#pragma unroll
      for (int e = 0; e < V::kN; ++e) store(q * V::kN + e, s[e]);
    }
  } else {
    for (int64_t j = threadIdx.x; j < d; j += kBlockSize) {
      acc_t s = 0;
#pragma unroll 4
      for (int64_t i = 0; i < R; ++i) s += t[i] * static_cast<acc_t>(X[i * d + j]);
      store(j, s);
    }
  }
}

// Reads *p and leaves 0 there, in one L2 atomic: the accumulators that other blocks add to with
// atomics are read this way, never through the (incoherent) L1.
__device__ __forceinline__ float atomic_take(float* p) { return atomicExch(p, 0.0f); }
__device__ __forceinline__ double atomic_take(double* p) {
  return __longlong_as_double(
      static_cast<long long>(atomicExch(reinterpret_cast<unsigned long long*>(p), 0ull)));
}

// The end of a kernel in which `nblocks` blocks add a system's product into its global
// accumulator acc (P entries) with atomics: the last of those blocks to finish takes every
// entry (leaving acc zeroed for the next product) and calls store(j, acc_j). So the product's
// epilogue needs no second launch and the accumulator no memset. The counter (0 on entry) is
// reset for the next launch. Every thread of the block must call it, after its atomics.
// Returns whether this block was the last (the same in every thread of the block).
template <typename acc_t, typename Store>
__device__ bool last_block_epilogue(acc_t* acc, unsigned int* counter, unsigned int nblocks,
                                    int64_t P, Store store) {
  __shared__ bool is_last;
  __threadfence();  // this thread's atomics are visible device-wide before the block counts
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(counter, 1u) == nblocks - 1;
  __syncthreads();
  if (!is_last) return false;
  __threadfence();
  for (int64_t j = threadIdx.x; j < P; j += kBlockSize) store(j, atomic_take(acc + j));
  if (threadIdx.x == 0) *counter = 0u;
  return true;
}

// ---- the CG step as a product kernel's epilogue ------------------------------------------------

// A kernel's read-only input pointer, __restrict__ unless the kernel also writes that memory
// through another pointer (the step epilogue writes p and status, which the product reads).
template <typename T, bool kRestrict>
using in_ptr = std::conditional_t<kRestrict, const T* __restrict__, const T*>;

// What one system's CG step reads and writes, for a product kernel whose last block per system
// (last_block_epilogue) also runs that system's step (block_cg_step): one launch per iteration
// instead of the product's and cg_step's four. All (B, P) or (B,), contiguous.
template <typename scalar_t>
struct CgStepArgs {
  scalar_t* x;
  scalar_t* r;
  scalar_t* p;
  scalar_t* rs;
  const scalar_t* bnorm2;
  int32_t* status;
  int32_t* iters;
  double rtol, atol;
};

// One CG iteration of system b by one block, given its product ap = A p (written by this block's
// threads with the stride j = threadIdx.x + k kBlockSize used here, so each thread reads back its
// own writes), with the three cg_step kernels' decisions (cg_math.h). status[b] is kRunning on
// entry (the product kernels return at once for stopped systems). Every thread of the block
// calls it: its branches depend on block_sum results, the same in every thread. The block's
// own reads of p in the product are over: every other block of system b finished before this,
// the last one, started its epilogue.
template <typename scalar_t, typename acc_t>
__device__ void block_cg_step(CgStepArgs<scalar_t> cg, int64_t b, const scalar_t* ap,
                              int64_t P) {
  scalar_t* x = cg.x + b * P;
  scalar_t* r = cg.r + b * P;
  scalar_t* p = cg.p + b * P;
  acc_t pap = 0;
  for (int64_t j = threadIdx.x; j < P; j += kBlockSize)
    pap += static_cast<acc_t>(p[j]) * static_cast<acc_t>(ap[j]);
  int32_t st = kRunning;
  const acc_t rs_old = static_cast<acc_t>(cg.rs[b]);
  const acc_t alpha = cg_alpha<acc_t>(rs_old, block_sum(pap), &st);
  if (st != kRunning) {
    if (threadIdx.x == 0) cg.status[b] = st;
    return;
  }
  acc_t rr = 0;
  for (int64_t j = threadIdx.x; j < P; j += kBlockSize)
    rr += cg_update_xr<scalar_t, acc_t>(x + j, r + j, p[j], ap[j], alpha);
  const acc_t rs_new = block_sum(rr);
  const acc_t tol2 = cg_tol2<acc_t>(static_cast<acc_t>(cg.bnorm2[b]), cg.rtol, cg.atol);
  const acc_t beta = cg_beta<acc_t>(rs_new, rs_old, tol2, &st);
  if (st == kRunning)
    for (int64_t j = threadIdx.x; j < P; j += kBlockSize) cg_update_p<scalar_t, acc_t>(p + j, r[j], beta);
  if (threadIdx.x == 0) {
    cg.rs[b] = static_cast<scalar_t>(rs_new);
    cg.iters[b] += 1;
    cg.status[b] = st;
  }
}

// ---- the single-launch loop: one block of kBlockSize threads per system --------------------

// Thread t owns entries j = t, t + kBlockSize, ... of every vector of its system, so the
// elementwise steps need no barrier; only the operator (which reads all of v) and the
// reductions (block_sum) synchronise.
//
// An operator for block_cg is a struct with
//   __device__ void accumulate(const scalar_t* v, acc_t* acc) const;  // acc (zeroed) += H v
//   __device__ acc_t combine(acc_t v_j, acc_t acc_j) const;           // (A v)_j
// accumulate is called by every thread of the block with the same arguments, so it may
// synchronise the block (__syncthreads) in control flow that is uniform over the block.
//
// Memory: b, x, r, p are this system's slices in global memory, written only by this block
// (__syncthreads orders them within the block); they are read through plain pointers, never
// __restrict__ or __ldg, since the read-only cache is not coherent with this kernel's writes.

// acc[j] = (A v)_j - combine's input - for every j; valid for the owner of j on return.
template <typename scalar_t, typename acc_t, typename Op>
__device__ __forceinline__ void block_apply(const Op& op, const scalar_t* v, acc_t* acc,
                                            int64_t P) {
  for (int64_t j = threadIdx.x; j < P; j += kBlockSize) acc[j] = acc_t(0);
  // Orders the zeroing, and the owners' last writes of v, before any thread's accumulate.
  __syncthreads();
  op.accumulate(v, acc);
  __syncthreads();
}

// All iterations of one system, with the decisions of cg_math.h (the CPU kernels' decisions).
template <typename scalar_t, typename acc_t, typename Op>
__device__ void block_cg(const Op& op, const scalar_t* b, scalar_t* x, scalar_t* r, scalar_t* p,
                         acc_t* acc, int64_t P, int64_t max_iter, double rtol, double atol,
                         int32_t* iters_out, scalar_t* rnorm_out, int32_t* status_out) {
  // r0 = b - A x0, p0 = r0; no product when x0 = 0 (the usual start: r0 = b, as in the CPU
  // solvers). The count is a block_sum, the same in every thread, so the branch around
  // block_apply's barriers is uniform over the block.
  acc_t nonzero = 0;
  for (int64_t j = threadIdx.x; j < P; j += kBlockSize) nonzero += x[j] != scalar_t(0) ? 1 : 0;
  if (block_sum(nonzero) != acc_t(0)) {
    block_apply<scalar_t, acc_t>(op, x, acc, P);
  } else {
    for (int64_t j = threadIdx.x; j < P; j += kBlockSize) acc[j] = acc_t(0);  // owner-only
  }
  acc_t rr = 0, bb = 0;
  for (int64_t j = threadIdx.x; j < P; j += kBlockSize) {
    const scalar_t bj = b[j];
    const scalar_t apj = static_cast<scalar_t>(op.combine(static_cast<acc_t>(x[j]), acc[j]));
    const scalar_t rj = bj - apj;
    r[j] = rj;
    p[j] = rj;
    rr += static_cast<acc_t>(rj) * static_cast<acc_t>(rj);
    bb += static_cast<acc_t>(bj) * static_cast<acc_t>(bj);
  }
  acc_t rs = block_sum(rr);
  const acc_t tol2 = cg_tol2<acc_t>(block_sum(bb), rtol, atol);
  int32_t st = cg_initial_status(rs, tol2);
  int32_t it = 0;
  // st is computed from block_sum results that every thread holds, so the loop and its breaks
  // are uniform over the block, as the __syncthreads inside require.
  for (int64_t k = 0; k < max_iter && st == kRunning; ++k) {
    block_apply<scalar_t, acc_t>(op, p, acc, P);
    acc_t pap = 0;
    for (int64_t j = threadIdx.x; j < P; j += kBlockSize) {
      const scalar_t pj = p[j];
      const scalar_t apj = static_cast<scalar_t>(op.combine(static_cast<acc_t>(pj), acc[j]));
      acc[j] = static_cast<acc_t>(apj);  // owner-only: kept for the x/r update below
      pap += static_cast<acc_t>(pj) * static_cast<acc_t>(apj);
    }
    const acc_t alpha = cg_alpha<acc_t>(rs, block_sum(pap), &st);
    if (st != kRunning) break;
    acc_t rr_new = 0;
    for (int64_t j = threadIdx.x; j < P; j += kBlockSize)
      rr_new += cg_update_xr<scalar_t, acc_t>(x + j, r + j, p[j], static_cast<scalar_t>(acc[j]),
                                              alpha);
    const acc_t rs_new = block_sum(rr_new);
    ++it;
    const acc_t beta = cg_beta<acc_t>(rs_new, rs, tol2, &st);
    if (st == kRunning)
      for (int64_t j = threadIdx.x; j < P; j += kBlockSize) cg_update_p<scalar_t, acc_t>(p + j, r[j], beta);
    rs = rs_new;
  }
  if (threadIdx.x == 0) {
    *iters_out = it;
    *rnorm_out = static_cast<scalar_t>(::sqrt(rs));
    *status_out = st;
  }
}

// ---- choosing the path --------------------------------------------------------------------

// One block per system runs its iterations at the pace of one SM's memory-level parallelism
// (8 warps), so it wins only where launches dominate: per-system work per iteration up to about
// this many multiply-adds (measured on an H100: least squares 32 x (50 x 200) and dense
// 32 x 200^2 ran 4.4x and 2.5x faster in one launch; a softmax head 32 x (100 x 64 x 20) ran
// 2.4x slower, 32 x (25 x 800 x 5) the same), or when so many systems queue up that every SM
// holds several blocks.
constexpr int64_t kFusedSmallWork = int64_t(128) << 10;
constexpr int64_t kFusedBlocksPerSm = 4;

// Static shared memory (block_sum's arrays, a few hundred bytes at most) that the kernels whose
// route is chosen against max_dynamic_smem() may hold beside their dynamic part. allow_smem
// checks each kernel's own (the bulk product's, up to 1152 bytes, sizes its ring from the
// opt-in most less 4 KB).
constexpr size_t kStaticSmemReserve = 1024;

// The index in `values` of the environment variable `name`'s value: 0 (the default) when it is
// unset or empty; any other value is an error naming the variable and the values it takes.
inline int env_choice(const char* name, std::initializer_list<const char*> values) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return 0;
  int i = 0;
  for (const char* v : values) {
    if (std::strcmp(e, v) == 0) return i;
    ++i;
  }
  std::string all;
  for (const char* v : values) all += (all.empty() ? "" : ", ") + std::string(v);
  TORCH_CHECK_VALUE(false, name, " must be one of ", all, " (or unset), got '", e, "'");
  return 0;
}

// -1: choose (use_fused), 0: the launch sequence, 1: one launch (IMAML_CG_FUSED=auto|0|1)
inline int fused_mode() { return env_choice("IMAML_CG_FUSED", {"auto", "0", "1"}) - 1; }

inline size_t max_dynamic_smem() {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  return prop->sharedMemPerBlockOptin > kStaticSmemReserve
             ? prop->sharedMemPerBlockOptin - kStaticSmemReserve
             : 0;
}

// Whether the single-launch kernel should run B systems whose operator costs `work_per_system`
// multiply-adds (or the like) per iteration and needs `smem` bytes of dynamic shared memory.
inline bool use_fused(int64_t B, int64_t work_per_system, size_t smem) {
  if (smem > max_dynamic_smem()) return false;
  const int mode = fused_mode();
  if (mode >= 0) return mode == 1;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return work_per_system <= kFusedSmallWork || B >= kFusedBlocksPerSm * sms;
}

// Raises a kernel's dynamic shared-memory limit when `smem` bytes do not fit under the default
// (48 KB for dynamic and static shared memory together): to the device's opt-in most less the
// kernel's own static shared memory (its __shared__ arrays; CUDA refuses a limit that leaves no
// room for them), once per kernel and device, and never lowers it. (Setting it to each launch's
// own size let two host threads launching one kernel with different sizes lower it under each
// other, and a launch then failed.) A size that cannot fit is an error naming the sizes, not a
// failed launch. Host queries only: also safe while a CUDA graph is being captured.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t smem) {
  struct Limit {
    size_t static_bytes;
    bool raised;
  };
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, Limit> limits;
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel),
                                  static_cast<int>(c10::cuda::current_device()));
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  std::lock_guard<std::mutex> lock(mu);
  auto it = limits.find(key);
  if (it == limits.end()) {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    it = limits.emplace(key, Limit{attr.sharedSizeBytes, false}).first;
  }
  Limit& limit = it->second;
  const size_t need = smem + limit.static_bytes;
  TORCH_CHECK(need <= prop->sharedMemPerBlockOptin, "imaml_ext: a kernel needs ", smem,
              " bytes of dynamic shared memory beside its ", limit.static_bytes,
              " static ones; the device allows ", prop->sharedMemPerBlockOptin, " per block");
  if (need <= prop->sharedMemPerBlock || limit.raised) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
      static_cast<int>(prop->sharedMemPerBlockOptin - limit.static_bytes)));
  limit.raised = true;
}

// Blocks of `kernel` (kBlockSize threads, `dyn_smem` bytes of dynamic shared memory, its limit
// already raised by allow_smem) that the current device holds resident at once: the occupancy
// calculator's blocks per SM (registers, shared memory, __launch_bounds__) times the SMs. Asked
// once per kernel, size and device, then cached: it is a host query, never a device read or a
// stream operation, so it is also safe while a CUDA graph is being captured.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, size_t dyn_smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, size_t, int>, int64_t> cache;
  const int device = c10::cuda::current_device();
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), dyn_smem, device);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlockSize,
                                                               dyn_smem));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t resident = std::max<int64_t>(per_sm, 1) * sms;
  cache.emplace(key, resident);
  return resident;
}

// Chunks of one system's rows so that all systems together make about kWaves blocks per SM
// (about 32 warps, enough loads in flight to cover the memory latency), each with at least
// min_rows rows (its accumulator's zeroing and flush are amortised over them).
// Rows (samples) of one block's tile at most: its per-row values stay in shared memory.
constexpr int64_t kMaxTileRows = 64;

inline int64_t rows_per_block_for(int64_t B, int64_t n, int64_t min_rows) {
  constexpr int64_t kWaves = 4;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t chunks = (kWaves * sms + B - 1) / (B > 0 ? B : 1);
  const int64_t max_chunks = (n + min_rows - 1) / min_rows;
  if (chunks > max_chunks) chunks = max_chunks;
  if (chunks < 1) chunks = 1;
  const int64_t rows = (n + chunks - 1) / chunks;
  return rows < 1 ? 1 : (rows > kMaxTileRows ? kMaxTileRows : rows);
}

// ---- the single-launch solvers (cg_fused_cuda.cu) ------------------------------------------

// Each returns false, having done nothing, when use_fused() declines the problem.
bool fused_cg_dense(const at::Tensor& A, const at::Tensor& b, const at::Tensor& x0,
                    int64_t max_iter, double rtol, double atol, SolveResult* out);
bool fused_cg_lstsq(const at::Tensor& X, const at::Tensor& b, const at::Tensor& x0, double shift,
                    double scale, int64_t max_iter, double rtol, double atol, SolveResult* out);

}  // namespace cuda
}  // namespace imaml_ext

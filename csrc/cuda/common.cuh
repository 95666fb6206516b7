// Block sizes, warp/block reductions and launch helpers shared by the CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

namespace imaml_ext {
namespace cuda {

constexpr int kBlockSize = 256;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kBlockSize / kWarpSize;
// At most this many blocks share one system in the chunked kernels; their partial sums are then
// combined by a single block-wide reduction (one partial per thread).
constexpr int kMaxChunks = kBlockSize;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; the result is valid in every thread. Contains two __syncthreads, so every
// thread of the block must call it.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_partials[kWarpsPerBlock];
  __shared__ T total;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < kWarpsPerBlock ? warp_partials[lane] : T(0);
    w = warp_sum(w);
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

// Maximum over the block (values >= 0, or +Inf); valid in every thread. Every thread must call
// it (two __syncthreads), as block_sum.
template <typename T>
__device__ __forceinline__ T block_max(T v) {
  __shared__ T warp_partials[kWarpsPerBlock];
  __shared__ T total;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v = ::fmax(v, __shfl_down_sync(0xffffffffu, v, offset));
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < kWarpsPerBlock ? warp_partials[lane] : T(0);
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
      w = ::fmax(w, __shfl_down_sync(0xffffffffu, w, offset));
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

// The chunked kernels put the systems on gridDim.y, which stops at 65535. An op given more
// systems runs them in consecutive runs of at most that many (row views; every run's launches
// queued on the same stream, so no host synchronisation), as the CPU kernels take any count.
constexpr int64_t kMaxSystemsPerRun = 65535;

// Calls f(start, count) for each run of systems in [0, B).
template <typename F>
void for_system_runs(int64_t B, F&& f) {
  for (int64_t start = 0; start < B; start += kMaxSystemsPerRun)
    f(start, std::min(kMaxSystemsPerRun, B - start));
}

// For an op returning a tuple of per-system tensors (systems on dim 0): f(start, count) returns
// the run's tuple; the runs' tensors are concatenated in order.
template <typename Tuple, typename F>
Tuple cat_system_runs(int64_t B, F&& f) {
  constexpr size_t N = std::tuple_size<Tuple>::value;
  std::array<std::vector<at::Tensor>, N> parts;
  for_system_runs(B, [&](int64_t start, int64_t count) {
    Tuple r = f(start, count);
    std::apply([&](auto&... t) {
      size_t i = 0;
      ((parts[i++].push_back(t)), ...);
    }, r);
  });
  Tuple out;
  std::apply([&](auto&... t) {
    size_t i = 0;
    ((t = at::cat(parts[i++])), ...);
  }, out);
  return out;
}

inline int chunks_for(int64_t P) {
  const int64_t per_block = static_cast<int64_t>(kBlockSize) * 8;
  int64_t c = (P + per_block - 1) / per_block;
  if (c < 1) c = 1;
  if (c > kMaxChunks) c = kMaxChunks;
  return static_cast<int>(c);
}

}  // namespace cuda
}  // namespace imaml_ext

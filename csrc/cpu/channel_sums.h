// Per-channel sums over channels-last rows, shared by the CPU block kernels (blocks_cpu.cpp,
// pooled_bn_cpu.cpp): per-thread accumulator rows, and the statistics pass of batch norm.
#pragma once

#include <cstdint>
#include <vector>

namespace imaml_ext {
namespace cpu {

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

// acc[c] += sum over `rows` channels-last rows (C values each) of h[c] (center == nullptr) or
// of (h[c] - center[c])^2; vectorised (AVX-512 / AVX2 / baseline clones), defined in
// blocks_cpu.cpp.
void stats_rows(const float* h, int64_t rows, int64_t C, const float* center, double* acc);
void stats_rows(const double* h, int64_t rows, int64_t C, const double* center, double* acc);

}  // namespace cpu
}  // namespace imaml_ext

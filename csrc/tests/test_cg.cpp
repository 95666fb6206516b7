// C++ tests of the CG core, run by ctest: the shared per-system arithmetic (cg_math.h) and the
// CPU kernels reached through the dispatcher, against ATen's dense solver.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "cg_math.h"
#include "launch_math.h"
#include "cpu/simd.h"

namespace {

int g_passed = 0, g_failed = 0;

void expect(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

using Solve = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Solve solve_dense(const at::Tensor& A, const at::Tensor& b, int64_t max_iter, double rtol) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("imaml_ext::cg_solve_dense", "")
                       .typed<Solve(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    int64_t, double, double)>();
  return op.call(A, b, at::zeros_like(b), max_iter, rtol, 0.0);
}

Solve solve_lstsq(const at::Tensor& X, const at::Tensor& b, double shift, double scale,
                  int64_t max_iter, double rtol) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("imaml_ext::cg_solve_lstsq", "")
                       .typed<Solve(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    double, double, int64_t, double, double)>();
  return op.call(X, b, at::zeros_like(b), shift, scale, max_iter, rtol, 0.0);
}

at::Tensor spd(int64_t B, int64_t P) {
  auto M = at::randn({B, P, P}, at::kDouble);
  return at::matmul(M, M.transpose(1, 2)) / P + at::eye(P, at::kDouble);
}

void test_math() {
  using namespace imaml_ext;
  int32_t st = kRunning;
  expect(cg_alpha<double>(2.0, 4.0, &st) == 0.5 && st == kRunning, "alpha = rs / pAp");
  st = kRunning;
  cg_alpha<double>(1.0, -1e-3, &st);
  expect(st == kNegativeCurvature, "pAp < 0 flags negative curvature");
  st = kRunning;
  cg_alpha<double>(1.0, NAN, &st);
  expect(st == kNonFinite, "NaN pAp flags non-finite");
  st = kRunning;
  cg_beta<double>(1e-20, 1.0, 1e-18, &st);
  expect(st == kConverged, "rs below tol^2 converges");
  expect(cg_tol2<double>(4.0, 0.5, 0.1) == 1.0, "tol2 = max(rtol^2 ||b||^2, atol^2)");
  expect(cg_initial_status<double>(0.0, 0.0) == kConverged, "zero residual starts converged");
}

void test_dense() {
  at::manual_seed(0);
  for (int64_t P : {1, 7, 40}) {
    auto A = spd(3, P);
    auto b = at::randn({3, P}, at::kDouble);
    auto [x, iters, rnorm, status] = solve_dense(A, b, 10 * P, 1e-12);
    auto want = at::linalg_solve(A, b);
    expect(at::allclose(x, want, 1e-8, 1e-10), "dense CG matches linalg_solve, P=" + std::to_string(P));
    expect(status.eq(imaml_ext::kConverged).all().item<bool>(), "dense CG converges");
  }
}

void test_lstsq() {
  at::manual_seed(1);
  const int64_t B = 2, n = 30, d = 17;
  auto X = at::randn({B, n, d}, at::kDouble);
  auto b = at::randn({B, d}, at::kDouble);
  const double lam = 0.5;
  auto [x, iters, rnorm, status] = solve_lstsq(X, b, 1.0, 1.0 / (n * lam), 200, 1e-12);
  auto A = at::eye(d, at::kDouble) + at::matmul(X.transpose(1, 2), X) / (n * lam);
  expect(at::allclose(x, at::linalg_solve(A, b), 1e-8, 1e-10), "lstsq CG matches linalg_solve");
}

void test_errors() {
  bool threw = false;
  try {
    solve_dense(spd(2, 3), at::randn({2, 4}, at::kDouble), 5, 1e-6);
  } catch (const c10::ValueError& e) {
    threw = std::string(e.what()).find("cg_solve_dense: A must be (2, 4, 4)") != std::string::npos;
  }
  expect(threw, "shape mismatch raises ValueError naming A");
  threw = false;
  try {
    solve_dense(spd(1, 3), at::randn({1, 3}, at::kDouble), 0, 1e-6);
  } catch (const c10::ValueError& e) {
    threw = std::string(e.what()).find("max_iter must be >= 1") != std::string::npos;
  }
  expect(threw, "max_iter < 1 raises ValueError");
}

// The CPU least-squares product's rows per block: two where only two keep the re-read rows in
// L1, else eight; the blocks change the speed and the last bits, not the accuracy.
void test_xtxv_block_rows() {
  using imaml_ext::simd::xtxv_block_rows;
  const int64_t l1 = 48 * 1024;  // an AMD EPYC's (and recent Xeons') L1d
  expect(xtxv_block_rows(2000, 4, l1) == 2, "d = 2000 float, 48 KB: two rows (6 x 8 KB fit)");
  expect(xtxv_block_rows(500, 4, l1) == 8, "d = 500 float: eight rows fit (36 KB)");
  expect(xtxv_block_rows(200, 4, l1) == 8, "d = 200: eight");
  expect(xtxv_block_rows(1000, 4, l1) == 4, "d = 1000 float: four rows (40 KB)");
  expect(xtxv_block_rows(4000, 4, l1) == 8, "d = 4000: none fits L1, eight (from L2 anyway)");
  expect(xtxv_block_rows(2000, 8, l1) == 8, "d = 2000 double: none fits, eight");
  expect(xtxv_block_rows(2000, 4, 32 * 1024) == 8, "32 KB L1: d = 2000 does not fit, eight");
  expect(imaml_ext::simd::l1d_bytes() > 0, "an L1d size");
  // the product, forward and reverse, whatever the block: X^T X v of 37 rows (a tail for every
  // R) through the public kernel against double, for d whose blocks are 8, 4 and 2 on a 48 KB
  // L1 (on a 32 KB one: 8, 2 and 8)
  for (int64_t d : {64, 1000, 2000, 5000})
    for (bool reverse : {false, true}) {
      auto X = at::randn({37, d}, at::kFloat), v = at::randn({d}, at::kFloat);
      auto acc = at::zeros({d}, at::kFloat);
      imaml_ext::simd::xtxv_rows(X.data_ptr<float>(), d, 0, 37, v.data_ptr<float>(),
                                 acc.data_ptr<float>(), reverse);
      auto want = at::mv(X.t().to(at::kDouble), at::mv(X.to(at::kDouble), v.to(at::kDouble)));
      expect(at::allclose(acc.to(at::kDouble), want, 1e-4, 1e-3),
             "xtxv_rows d=" + std::to_string(d) + (reverse ? " reverse" : ""));
    }
}

// The persistent grid of the register-tiled least-squares kernels: one wave, evened out.
void test_persistent_grid() {
  using imaml_ext::persistent_blocks_per_system;
  // 132 SMs x 2 resident: at B = 32 and 63 tiles a system (n = 500 rows, 8-row tiles) ceil(264 /
  // 32) = 9 blocks a system made 288 > 264 blocks, a second wave; 8 fit.
  expect(persistent_blocks_per_system(264, 32, 63) == 8, "B=32: 8 blocks a system (256 <= 264)");
  // B = 1, 1000 tiles: 264 fit, at most 4 tiles a block either way, and 250 blocks suffice.
  expect(persistent_blocks_per_system(264, 1, 1000) == 250, "B=1: 250 blocks of 4 tiles");
  expect(persistent_blocks_per_system(132, 32, 63) == 4, "one block per SM (bulk ring): 4 a system");
  expect(persistent_blocks_per_system(264, 1000, 7) == 1, "B > resident: one block a system");
  expect(persistent_blocks_per_system(264, 2, 3) == 3, "at most one block a tile");
  expect(persistent_blocks_per_system(264, 4, 0) == 1, "no rows: one block");
  expect(persistent_blocks_per_system(0, 4, 10) == 1, "no occupancy answer: one block");
  // Over a grid of shapes: one wave whenever B fits, no more blocks than tiles, and the largest
  // number of tiles a block takes is what the one-wave maximum gives.
  bool ok = true;
  for (int64_t resident : {132, 264, 396, 1})
    for (int64_t B : {1, 2, 3, 7, 32, 33, 131, 132, 133, 264, 1000})
      for (int64_t tiles : {1, 2, 5, 63, 64, 250, 1000, 1250}) {
        const int64_t blocks = persistent_blocks_per_system(resident, B, tiles);
        const int64_t most = std::max<int64_t>(1, std::min<int64_t>(tiles, resident / B));
        const int64_t per_block = (tiles + blocks - 1) / blocks;
        ok = ok && blocks >= 1 && blocks <= tiles && blocks <= most &&
             (B > resident || blocks * B <= resident) &&
             per_block == (tiles + most - 1) / most;
      }
  expect(ok, "one wave, at most a block a tile, the one-wave maximum of tiles a block");
}

}  // namespace

int main() {
  test_persistent_grid();
  test_xtxv_block_rows();
  test_math();
  test_dense();
  test_lstsq();
  test_errors();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

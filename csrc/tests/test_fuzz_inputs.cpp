// Odd sizes and bad inputs through the dispatcher, run by ctest (and under ASan/UBSan by
// `make sanitize`): every op at sizes around the SIMD widths (0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17,
// 31, 33, 64, 65), both dtypes, misaligned and non-contiguous inputs, against ATen-only
// formulas; then wrong dtypes, ranks, batch sizes, layouts, tolerances and an undefined tensor,
// each of which must throw (c10::ValueError naming the op and the argument where it is a user
// error), never crash. Kept to well under a second without sanitizers.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

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

using T = at::Tensor;
using CT = const at::Tensor&;
using Solve = std::tuple<T, T, T, T>;

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// The typed signature is the CPU kernel's own (mutated tensors by value), as the dispatcher
// checks it against the registration.
void cg_step(T x, T r, T p, CT Ap, T rs, CT bn, T st, T it, double rtol, double atol,
             double shift = 0.0, double scale = 1.0) {
  static auto h = op("imaml_ext::cg_step")
                      .typed<void(T, T, T, CT, T, CT, T, T, double, double, double, double)>();
  h.call(x, r, p, Ap, rs, bn, st, it, rtol, atol, shift, scale);
}
using Begin = std::tuple<T, T, T, T, T, T, T, T>;
Begin cg_begin(CT b, double rtol, double atol, bool rescale) {
  static auto h = op("imaml_ext::cg_begin").typed<Begin(CT, double, double, bool)>();
  return h.call(b, rtol, atol, rescale);
}
std::tuple<T, T> cg_end(CT x, CT rs, CT st, CT it, CT scale, const std::optional<T>& fallback) {
  static auto h = op("imaml_ext::cg_end")
                      .typed<std::tuple<T, T>(CT, CT, CT, CT, CT, const std::optional<T>&)>();
  return h.call(x, rs, st, it, scale, fallback);
}
Solve solve_dense(CT A, CT b, CT x0, int64_t max_iter, double rtol, double atol) {
  static auto h = op("imaml_ext::cg_solve_dense")
                      .typed<Solve(CT, CT, CT, int64_t, double, double)>();
  return h.call(A, b, x0, max_iter, rtol, atol);
}
Solve solve_lstsq(CT X, CT b, CT x0, double shift, double scale, int64_t max_iter, double rtol,
                  double atol) {
  static auto h = op("imaml_ext::cg_solve_lstsq")
                      .typed<Solve(CT, CT, CT, double, double, int64_t, double, double)>();
  return h.call(X, b, x0, shift, scale, max_iter, rtol, atol);
}
T lstsq_apply(CT X, CT v, double shift, double scale) {
  static auto h = op("imaml_ext::lstsq_apply").typed<T(CT, CT, double, double)>();
  return h.call(X, v, shift, scale);
}
std::tuple<T, T> softmax_hvp(CT F, CT W, CT bias, CT V, CT vb, double shift, double scale) {
  static auto h = op("imaml_ext::softmax_head_hvp")
                      .typed<std::tuple<T, T>(CT, CT, CT, CT, CT, double, double)>();
  return h.call(F, W, bias, V, vb, shift, scale);
}
Solve solve_softmax(CT F, CT W, CT bias, CT b, CT x0, double shift, double scale,
                    int64_t max_iter, double rtol, double atol) {
  static auto h =
      op("imaml_ext::cg_solve_softmax_head")
          .typed<Solve(CT, CT, CT, CT, CT, double, double, int64_t, double, double)>();
  return h.call(F, W, bias, b, x0, shift, scale, max_iter, rtol, atol);
}

bool has_softmax() {
  return c10::Dispatcher::singleton().findSchema({"imaml_ext::softmax_head_hvp", ""}).has_value();
}

// The same values in a buffer that starts one element past an aligned address (contiguous, but
// misaligned for vector loads).
T misaligned(const T& t) {
  auto buf = at::empty({t.numel() + 1}, t.options());
  auto out = buf.narrow(0, 1, t.numel()).view(t.sizes());
  out.copy_(t);
  return out;
}

// The same values with column-major strides in the last two dimensions.
T transposed(const T& t) {
  if (t.dim() < 2) return t;
  return t.transpose(-1, -2).contiguous().transpose(-1, -2);
}

T spd(int64_t B, int64_t P, at::ScalarType dt) {
  auto M = at::randn({B, P, P}, at::kDouble);
  return (at::matmul(M, M.transpose(1, 2)) / std::max<int64_t>(P, 1) +
          at::eye(P, at::kDouble))
      .to(dt);
}

bool close(const T& got, const T& want, at::ScalarType dt) {
  if (got.sizes() != want.sizes()) return false;
  if (got.numel() == 0) return true;
  const double tol = dt == at::kFloat ? 2e-4 : 1e-10;
  auto g = got.to(at::kDouble), w = want.to(at::kDouble);
  const double scale = std::max(1.0, w.abs().max().item<double>());
  return (g - w).abs().max().item<double>() <= tol * scale;
}

std::string tag(const char* what, at::ScalarType dt, int64_t B, int64_t P) {
  return std::string(what) + " " + c10::toString(dt) + " B=" + std::to_string(B) +
         " P=" + std::to_string(P);
}

const std::vector<int64_t> kSizes = {0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 64, 65};
const std::vector<int64_t> kBatches = {0, 1, 2, 5};

// ---- odd sizes, layouts and alignments: values against ATen-only formulas ------------------

void test_lstsq_apply_sizes() {
  for (auto dt : {at::kFloat, at::kDouble})
    for (int64_t B : kBatches)
      for (int64_t d : kSizes) {
        const int64_t n = (d * 7 + 3) % 19;  // 0 included (d = 0: n = 3; d = 8: n = 2)
        auto X = at::randn({B, n, d}, at::kDouble).to(dt);
        auto v = at::randn({B, d}, at::kDouble).to(dt);
        auto want = 0.3 * v.to(at::kDouble) +
                    0.7 * at::bmm(X.to(at::kDouble).transpose(1, 2),
                                  at::bmm(X.to(at::kDouble), v.to(at::kDouble).unsqueeze(-1)))
                              .squeeze(-1);
        expect(close(lstsq_apply(X, v, 0.3, 0.7), want, dt), tag("lstsq_apply", dt, B, d));
        expect(close(lstsq_apply(misaligned(X), misaligned(v), 0.3, 0.7), want, dt),
               tag("lstsq_apply misaligned", dt, B, d));
        expect(close(lstsq_apply(transposed(X), v, 0.3, 0.7), want, dt),
               tag("lstsq_apply transposed X", dt, B, d));
      }
}

void test_solvers_sizes() {
  for (auto dt : {at::kFloat, at::kDouble})
    for (int64_t B : {0, 1, 3})
      for (int64_t P : {0, 1, 3, 4, 5, 8, 9, 16, 17, 33}) {
        const double rtol = dt == at::kFloat ? 1e-6 : 1e-12;
        auto A = spd(B, P, dt);
        auto b = at::randn({B, P}, at::kDouble).to(dt);
        auto want = at::linalg_solve(A.to(at::kDouble), b.to(at::kDouble));
        for (int layout = 0; layout < 3; ++layout) {
          T A_ = layout == 1 ? misaligned(A) : layout == 2 ? transposed(A) : A;
          T b_ = layout == 1 ? misaligned(b) : b;
          auto [x, iters, rnorm, status] =
              solve_dense(A_, b_, at::zeros_like(b), 10 * P + 20, rtol, 0.0);
          expect(close(x, want, dt) && x.sizes() == b.sizes() && iters.size(0) == B,
                 tag("cg_solve_dense", dt, B, P) + " layout " + std::to_string(layout));
          expect(status.numel() == 0 || status.le(1).all().item<bool>(),
                 tag("cg_solve_dense status", dt, B, P));
        }
        const int64_t n = (P * 5 + 1) % 13;
        auto X = at::randn({B, n, P}, at::kDouble).to(dt);
        const double shift = 1.0, scale = 1.0 / std::max<int64_t>(n, 1);
        auto M = shift * at::eye(P, at::kDouble) +
                 scale * at::bmm(X.to(at::kDouble).transpose(1, 2), X.to(at::kDouble));
        auto want_l = at::linalg_solve(M, b.to(at::kDouble));
        auto res = solve_lstsq(misaligned(X), b, at::zeros_like(b), shift, scale, 10 * P + 20,
                               rtol, 0.0);
        expect(close(std::get<0>(res), want_l, dt), tag("cg_solve_lstsq misaligned", dt, B, P));
        res = solve_lstsq(transposed(X), misaligned(b), at::zeros_like(b), shift, scale,
                          10 * P + 20, rtol, 0.0);
        expect(close(std::get<0>(res), want_l, dt), tag("cg_solve_lstsq transposed", dt, B, P));
      }
}

// One CG iteration in ATen ops: the decisions of csrc/cg_math.h.
void cg_step_aten(T& x, T& r, T& p, const T& Ap, T& rs, const T& bn, T& status, T& iters,
                  double rtol, double atol) {
  auto tol2 = at::clamp_min(bn * (rtol * rtol), atol * atol);
  auto running = status.eq(0);
  auto pAp = (p * Ap).sum(-1);
  auto finite = at::isfinite(pAp);
  auto bad1 = running & finite.logical_not();
  auto neg = running & finite & pAp.le(0);
  auto go = running & finite & pAp.gt(0);
  auto alpha = at::where(go, rs / at::where(go, pAp, at::ones_like(pAp)), at::zeros_like(pAp));
  auto g = go.unsqueeze(-1);
  x = at::where(g, x + alpha.unsqueeze(-1) * p, x);
  r = at::where(g, r - alpha.unsqueeze(-1) * Ap, r);
  auto rs_new = at::where(go, (r * r).sum(-1), rs);
  iters = iters + go.to(iters.scalar_type());
  auto bad2 = go & at::isfinite(rs_new).logical_not();
  auto conv = go & at::isfinite(rs_new) & rs_new.le(tol2);
  auto cont = go & bad2.logical_not() & conv.logical_not();
  auto beta = at::where(cont, rs_new / at::where(cont, rs, at::ones_like(rs)), at::zeros_like(rs));
  p = at::where(cont.unsqueeze(-1), r + beta.unsqueeze(-1) * p, p);
  status = at::where(bad1 | bad2, 3, at::where(neg, 2, at::where(conv, 1, status)))
               .to(status.scalar_type());
  rs = rs_new;
}

void test_cg_step_sizes() {
  for (auto dt : {at::kFloat, at::kDouble})
    for (int64_t B : kBatches)
      for (int64_t P : kSizes) {
        auto A = spd(B, P, at::kDouble);
        if (B > 1) A[1] = -A[1];  // negative curvature in system 1
        auto x = at::randn({B, P}, at::kDouble), r = at::randn({B, P}, at::kDouble);
        auto p = at::randn({B, P}, at::kDouble);
        auto Ap = at::bmm(A, p.unsqueeze(-1)).squeeze(-1);
        if (B > 2 && P > 0) Ap[2][0] = NAN;  // non-finite in system 2
        auto rs = (r * r).sum(-1), bn = rs * 4;
        auto status = at::zeros({B}, at::kInt), iters = at::zeros({B}, at::kInt);
        if (B > 3) status[3] = 1;  // already converged: untouched
        // the kernel, in dt, on misaligned buffers
        auto kx = misaligned(x.to(dt)), kr = misaligned(r.to(dt)), kp = misaligned(p.to(dt));
        auto krs = misaligned(rs.to(dt)), kst = status.clone(), kit = iters.clone();
        cg_step(kx, kr, kp, transposed(Ap.to(dt).unsqueeze(0)).squeeze(0), krs, bn.to(dt), kst,
                kit, 1e-6, 0.0);
        // ATen, in dt from the same rounded values
        auto ax = x.to(dt), ar = r.to(dt), ap = p.to(dt), ars = rs.to(dt);
        auto ast = status.clone(), ait = iters.clone();
        cg_step_aten(ax, ar, ap, Ap.to(dt), ars, bn.to(dt), ast, ait, 1e-6, 0.0);
        const auto t = tag("cg_step", dt, B, P);
        expect(at::equal(kst, ast) && at::equal(kit, ait), t + " status/iters");
        expect(close(kx, ax, dt) && close(kr, ar, dt) && close(kp, ap, dt), t + " x/r/p");
      }
}

// The affine step (shift p + scale Ap folded in) against ATen's step on that product, and
// cg_begin / cg_end against ATen, over the same sizes, on misaligned and transposed inputs.
void test_cg_begin_end_affine_sizes() {
  for (auto dt : {at::kFloat, at::kDouble})
    for (int64_t B : kBatches)
      for (int64_t P : kSizes) {
        const auto t = tag("cg_begin", dt, B, P);
        auto b = at::randn({B, P}, at::kDouble) * 1e3;
        if (B > 1 && P > 0) b[1][P - 1] = NAN;
        if (B > 2) b[2].zero_();
        auto bd = b.to(dt);
        auto [x, r, p, rs, bn, st, it, s] = cg_begin(transposed(bd.unsqueeze(0)).squeeze(0),
                                                      1e-6, 0.0, true);
        // s: a power of two with max|b| / s in [1, 2) (1 for the NaN and zero rows)
        auto amax = B > 0 && P > 0 ? bd.abs().amax(1).to(at::kDouble)
                                   : at::zeros({B}, at::kDouble);
        auto ratio = amax / s.to(at::kDouble);
        auto fin = at::isfinite(amax) & amax.gt(0);
        expect(at::equal(at::where(fin, ratio.ge(1) & ratio.lt(2), s.eq(1)),
                         at::ones({B}, at::kBool)), t + " scale");
        auto want_r = bd / s.unsqueeze(1);
        expect(at::equal(r.nan_to_num(7), want_r.nan_to_num(7)) && at::equal(p.nan_to_num(7),
               want_r.nan_to_num(7)), t + " r/p");
        expect(at::equal(x, at::zeros_like(bd)) && at::equal(it, at::zeros({B}, at::kInt)),
               t + " x/iters");
        auto want_rs = (want_r * want_r).sum(-1);
        expect(close(rs.nan_to_num(7), want_rs.nan_to_num(7), dt) && at::equal(
               rs.nan_to_num(7), bn.nan_to_num(7)), t + " rs");
        auto want_st = at::where(at::isfinite(want_rs), at::where(want_rs.le(want_rs * 1e-12), 1,
                                 0), 3).to(at::kInt);
        expect(at::equal(st, want_st), t + " status");
        // cg_end: x s, sqrt(rs) s, and the fallback rows (negative curvature after 0 steps)
        auto xe = at::randn({B, P}, at::kDouble).to(dt);
        auto st2 = at::randint(0, 4, {B}, at::kInt), it2 = at::randint(0, 2, {B}, at::kInt);
        auto fb = at::randn({B, P}, at::kDouble).to(dt);
        auto [out, rn] = cg_end(misaligned(xe), rs.abs().nan_to_num(1), st2, it2, s,
                                transposed(fb.unsqueeze(0)).squeeze(0));
        auto fall = (st2.eq(2) & it2.eq(0)).unsqueeze(1);
        expect(at::equal(out, at::where(fall, fb, xe * s.unsqueeze(1))), tag("cg_end", dt, B, P));
        // against a correctly rounded square root (float: rounded from double's, which is
        // exact to well past float's half ulp): ATen's float sqrt is not bit-exact on every host
        // (it failed this test on an AMD EPYC, not on a Xeon), std::sqrt is
        auto want_rn = rs.abs().nan_to_num(1).to(at::kDouble).sqrt().to(dt) * s;
        expect(at::equal(rn, want_rn), tag("cg_end rnorm", dt, B, P));
        // the affine step
        auto A = spd(B, P, at::kDouble);
        auto x0 = at::randn({B, P}, at::kDouble), r0 = at::randn({B, P}, at::kDouble);
        auto p0 = at::randn({B, P}, at::kDouble);
        auto Mp = at::bmm(A, p0.unsqueeze(-1)).squeeze(-1);
        auto rs0 = (r0 * r0).sum(-1), bn0 = rs0 * 4;
        auto kx = misaligned(x0.to(dt)), kr = misaligned(r0.to(dt)), kp = misaligned(p0.to(dt));
        // (a copy: rs0.to(kDouble) would be rs0 itself, which the kernel writes)
        auto krs = misaligned(rs0.to(dt)), kst = at::zeros({B}, at::kInt);
        auto kit = at::zeros({B}, at::kInt);
        cg_step(kx, kr, kp, transposed(Mp.to(dt).unsqueeze(0)).squeeze(0), krs, bn0.to(dt), kst,
                kit, 1e-6, 0.0, 1.5, 0.25);
        auto ax = x0.to(dt), ar = r0.to(dt), ap = p0.to(dt), ars = rs0.to(dt);
        auto ast = at::zeros({B}, at::kInt), ait = at::zeros({B}, at::kInt);
        cg_step_aten(ax, ar, ap, 1.5 * p0.to(dt) + 0.25 * Mp.to(dt), ars, bn0.to(dt), ast, ait,
                     1e-6, 0.0);
        const auto ta = tag("cg_step affine", dt, B, P);
        expect(at::equal(kst, ast) && at::equal(kit, ait), ta + " status/iters");
        expect(close(kx, ax, dt) && close(kr, ar, dt) && close(kp, ap, dt), ta + " x/r/p");
      }
}

// ---- the softmax head ----------------------------------------------------------------------

std::tuple<T, T> softmax_hvp_aten(const T& F, const T& W, const T& bias, const T& V, const T& vb,
                                  double shift, double scale) {
  auto probs = at::softmax(at::baddbmm(bias.unsqueeze(1), F, W.transpose(1, 2)), -1);
  auto z = at::baddbmm(vb.unsqueeze(1), F, V.transpose(1, 2));
  auto u = probs * (z - (probs * z).sum(-1, true));
  const double factor = F.size(1) > 0 ? scale / F.size(1) : 0.0;
  return {shift * V + factor * at::bmm(u.transpose(1, 2), F), shift * vb + factor * u.sum(1)};
}

void test_softmax_sizes() {
  if (!has_softmax()) {
    std::printf("softmax-head ops not registered: skipped\n");
    return;
  }
  for (auto dt : {at::kFloat, at::kDouble})
    for (int64_t B : {0, 1, 3})
      for (int64_t f : {0, 1, 3, 8, 9, 17})
        for (int64_t c : {1, 2, 5, 9}) {
          const int64_t n = (f * 3 + c) % 11;
          auto F = at::randn({B, n, f}, at::kDouble), W = at::randn({B, c, f}, at::kDouble);
          auto bias = at::randn({B, c}, at::kDouble), V = at::randn({B, c, f}, at::kDouble);
          auto vb = at::randn({B, c}, at::kDouble);
          auto [wV, wb] = softmax_hvp_aten(F, W, bias, V, vb, 0.5, 1.5);
          auto [gV, gb] = softmax_hvp(misaligned(F.to(dt)), transposed(W.to(dt)),
                                      misaligned(bias.to(dt)), transposed(V.to(dt)), vb.to(dt),
                                      0.5, 1.5);
          const auto t = tag("softmax_head_hvp", dt, B, f) + " c=" + std::to_string(c);
          expect(close(gV, wV, dt) && close(gb, wb, dt), t);
          // (I + H) x = b for the head, against the dense Hessian built column by column.
          const int64_t P = c * (f + 1);
          if (B == 0 || P > 30) continue;
          auto Hcols = at::empty({B, P, P}, at::kDouble);
          for (int64_t j = 0; j < P; ++j) {
            auto e = at::zeros({B, P}, at::kDouble);
            e.select(1, j).fill_(1.0);
            auto [hV, hb] = softmax_hvp_aten(F, W, bias, e.narrow(1, 0, c * f).view({B, c, f}),
                                             e.narrow(1, c * f, c), 1.0, 1.0);
            Hcols.select(2, j).copy_(at::cat({hV.reshape({B, c * f}), hb}, 1));
          }
          auto b = at::randn({B, P}, at::kDouble);
          auto want = at::linalg_solve(Hcols, b);
          auto res = solve_softmax(F.to(dt), W.to(dt), bias.to(dt), misaligned(b.to(dt)),
                                   at::zeros({B, P}, dt), 1.0, 1.0, 10 * P + 20,
                                   dt == at::kFloat ? 1e-6 : 1e-12, 0.0);
          expect(close(std::get<0>(res), want, dt), t + " cg_solve_softmax_head");
        }
}

// ---- bad inputs: a clear error, never a crash ----------------------------------------------

void expect_value_error(const std::function<void()>& fn, const std::string& needle,
                        const std::string& what) {
  std::string got = "no exception";
  bool ok = false;
  try {
    fn();
  } catch (const c10::ValueError& e) {
    got = e.what_without_backtrace();
    ok = got.find(needle) != std::string::npos;
  } catch (const std::exception& e) {
    got = std::string("not a ValueError: ") + e.what();
  }
  expect(ok, what + ": expected ValueError with '" + needle + "', got: " + got.substr(0, 200));
}

void expect_throws(const std::function<void()>& fn, const std::string& what) {
  bool threw = false;
  try {
    fn();
  } catch (const std::exception&) {
    threw = true;
  }
  expect(threw, what + ": expected an exception");
}

void test_bad_inputs() {
  const int64_t B = 3, P = 5, n = 4;
  auto d = at::kDouble;
  auto x = at::zeros({B, P}, d), r = at::ones({B, P}, d), p = at::ones({B, P}, d);
  auto Ap = at::ones({B, P}, d), rs = at::full({B}, 5.0, d), bn = at::ones({B}, d);
  auto st = at::zeros({B}, at::kInt), it = at::zeros({B}, at::kInt);
  auto step = [&](T x_, T r_, T p_, T Ap_, T rs_, T bn_, T st_, T it_, double rtol = 1e-6,
                  double atol = 0.0) {
    return [=] { cg_step(x_, r_, p_, Ap_, rs_, bn_, st_, it_, rtol, atol); };
  };
  expect_value_error(step(x.to(at::kInt), r, p, Ap, rs, bn, st, it), "cg_step: x must be float32",
                     "cg_step int x");
  expect_value_error(step(x.to(at::kHalf), r, p, Ap, rs, bn, st, it), "cg_step: x must be float32",
                     "cg_step half x");
  expect_value_error(step(x.view({B * P}), r, p, Ap, rs, bn, st, it), "cg_step: x must be (B, P)",
                     "cg_step 1-d x");
  expect_value_error(step(x, r.narrow(1, 0, P - 1), p, Ap, rs, bn, st, it), "cg_step: r must be",
                     "cg_step short r");
  expect_value_error(step(x, r, p, Ap.to(at::kFloat), rs, bn, st, it), "cg_step: Ap must have dtype",
                     "cg_step float Ap");
  expect_value_error(step(x, r, p, Ap, rs.narrow(0, 0, B - 1), bn, st, it), "cg_step: rs must be",
                     "cg_step short rs");
  expect_value_error(step(x, r, p, Ap, rs, bn, st.to(at::kLong), it), "cg_step: status must be int32",
                     "cg_step int64 status");
  expect_value_error(step(x, r, p, Ap, rs, bn, st, it.narrow(0, 0, 1)), "cg_step: iters must be",
                     "cg_step short iters");
  expect_value_error([&] { cg_step(x, r, p, Ap, rs, bn, st, it, 1e-6, 0.0, NAN, 1.0); },
                     "cg_step: shift and scale must be finite", "cg_step nan shift");
  expect_value_error([&] { cg_begin(x.view({B * P}), 1e-6, 0.0, true); },
                     "cg_begin: b must be (B, P)", "cg_begin 1-d b");
  expect_value_error([&] { cg_begin(x, 1e-6, -1.0, true); }, "cg_begin: atol must be finite",
                     "cg_begin negative atol");
  expect_value_error([&] { cg_end(x, rs, st, it, bn.to(at::kFloat), std::nullopt); },
                     "cg_end: scale must have dtype", "cg_end float scale");
  expect_value_error([&] { cg_end(x, rs, st.to(at::kLong), it, bn, std::nullopt); },
                     "cg_end: status must be int32", "cg_end int64 status");
  expect_value_error([&] { cg_end(x, rs, st, it, bn, r.narrow(1, 0, 2)); },
                     "cg_end: fallback must be", "cg_end short fallback");
  expect_value_error(step(at::zeros({P, B}, d).t(), r, p, Ap, rs, bn, st, it),
                     "cg_step: x is written in place and must be contiguous",
                     "cg_step transposed x");
  expect_value_error(step(x, r, p, Ap, at::zeros({1}, d).expand({B}), bn, st, it),
                     "cg_step: rs is written in place and must be contiguous",
                     "cg_step expanded rs");
  expect_value_error(step(x, r, p, Ap, rs, bn, st, it, -1.0), "cg_step: rtol must be finite",
                     "cg_step negative rtol");
  expect_value_error(step(x, r, p, Ap, rs, bn, st, it, 1e-6, NAN), "cg_step: atol must be finite",
                     "cg_step NaN atol");
  // aliased in-place buffers: the kernels write through restrict pointers, so a clear error
  expect_value_error([&] { cg_step(x, x, x, Ap, rs, bn, st.clone(), it.clone(), 1e-6, 0.0); },
                     "cg_step: x and r must be separate buffers", "cg_step x, r, p aliased");
  // p and Ap may be one buffer (an operator that returns its input)
  cg_step(x, r, p, p, rs, bn, st.clone(), it.clone(), 1e-6, 0.0);
  expect(true, "cg_step with Ap = p runs");

  auto A = spd(B, P, d);
  auto b = at::randn({B, P}, d);
  expect_value_error([&] { solve_dense(A, b, at::zeros_like(b), 0, 1e-6, 0.0); },
                     "cg_solve_dense: max_iter must be >= 1", "dense max_iter 0");
  expect_value_error([&] { solve_dense(A, b, at::zeros_like(b), -7, 1e-6, 0.0); },
                     "cg_solve_dense: max_iter must be >= 1", "dense max_iter < 0");
  expect_value_error([&] { solve_dense(A.narrow(1, 0, P - 1), b, at::zeros_like(b), 5, 1e-6, 0.0); },
                     "cg_solve_dense: A must be", "dense non-square A");
  expect_value_error([&] { solve_dense(A[0], b, at::zeros_like(b), 5, 1e-6, 0.0); },
                     "cg_solve_dense: A must be", "dense 2-d A");
  expect_value_error([&] { solve_dense(A.to(at::kFloat), b, at::zeros_like(b), 5, 1e-6, 0.0); },
                     "cg_solve_dense: A must have b's dtype", "dense float A");
  expect_value_error([&] { solve_dense(A, b.to(at::kInt), at::zeros_like(b), 5, 1e-6, 0.0); },
                     "cg_solve_dense: b must be float32", "dense int b");
  expect_value_error([&] { solve_dense(A, b, at::zeros({B, P + 1}, d), 5, 1e-6, 0.0); },
                     "cg_solve_dense: x0 must be", "dense x0 shape");
  expect_value_error([&] { solve_dense(A, b, at::zeros({B, P}, at::kFloat), 5, 1e-6, 0.0); },
                     "cg_solve_dense: x0 must have dtype", "dense x0 dtype");
  expect_value_error([&] { solve_dense(A, b, at::zeros_like(b), 5, INFINITY, 0.0); },
                     "cg_solve_dense: rtol must be finite", "dense inf rtol");

  auto X = at::randn({B, n, P}, d);
  expect_value_error([&] { solve_lstsq(X, b, at::zeros_like(b), NAN, 1.0, 5, 1e-6, 0.0); },
                     "cg_solve_lstsq: shift and scale must be finite", "lstsq NaN shift");
  expect_value_error([&] { solve_lstsq(X.narrow(0, 0, 2), b, at::zeros_like(b), 1.0, 1.0, 5, 1e-6, 0.0); },
                     "cg_solve_lstsq: b must be (2, ", "lstsq batch mismatch");
  expect_value_error([&] { solve_lstsq(X[0], b, at::zeros_like(b), 1.0, 1.0, 5, 1e-6, 0.0); },
                     "cg_solve_lstsq: X must be (B, n, d)", "lstsq 2-d X");
  expect_value_error([&] { lstsq_apply(X, b.narrow(1, 0, P - 1), 0.0, 1.0); },
                     "lstsq_apply: v must be (", "lstsq_apply short v");
  expect_value_error([&] { lstsq_apply(X, b.to(at::kFloat), 0.0, 1.0); },
                     "lstsq_apply: v must have dtype Double like X, got Float",
                     "lstsq_apply v dtype");
  expect_value_error([&] { lstsq_apply(X.to(at::kHalf), b, 0.0, 1.0); },
                     "lstsq_apply: X must be float32", "lstsq_apply half X");
  expect_value_error([&] { lstsq_apply(X, b, 0.0, -INFINITY); },
                     "lstsq_apply: shift and scale must be finite", "lstsq_apply inf scale");

  // An undefined tensor (C++ callers only; Python cannot pass one): an error, not a crash.
  expect_throws([&] { lstsq_apply(X, T(), 0.0, 1.0); }, "lstsq_apply undefined v");
  expect_throws([&] { solve_dense(A, b, T(), 5, 1e-6, 0.0); }, "cg_solve_dense undefined x0");
  expect_throws([&] { cg_step(x, r, p, T(), rs, bn, st, it, 1e-6, 0.0); }, "cg_step undefined Ap");

  if (!has_softmax()) return;
  const int64_t c = 3, f = 2;
  auto F = at::randn({B, n, f}, d), W = at::randn({B, c, f}, d), bias = at::randn({B, c}, d);
  expect_value_error([&] { softmax_hvp(F, W, bias, W.narrow(2, 0, 1), bias, 1.0, 1.0); },
                     "softmax_head_hvp: V must be", "softmax V shape");
  expect_value_error([&] { softmax_hvp(F, W, bias, W, bias.to(at::kFloat), 1.0, 1.0); },
                     "softmax_head_hvp: vb must have dtype", "softmax vb dtype");
  expect_value_error([&] { softmax_hvp(F, W.narrow(2, 0, 1), bias, W, bias, 1.0, 1.0); },
                     "softmax_head_hvp: W must be", "softmax W vs F");
  expect_value_error([&] { softmax_hvp(F, W, bias.narrow(1, 0, 1), W, bias, 1.0, 1.0); },
                     "softmax_head_hvp: bias must be", "softmax bias shape");
  expect_value_error([&] { softmax_hvp(F.to(at::kInt), W, bias, W, bias, 1.0, 1.0); },
                     "softmax_head_hvp: F must be float32", "softmax int F");
  auto bs = at::randn({B, c * (f + 1)}, d);
  expect_value_error([&] { solve_softmax(F, W, bias, bs.narrow(1, 0, c * f), at::zeros({B, c * f}, d),
                                         1.0, 1.0, 5, 1e-6, 0.0); },
                     "cg_solve_softmax_head: b must be", "softmax solve b layout");
  expect_value_error([&] { solve_softmax(F, W, bias, bs, at::zeros_like(bs), 1.0, NAN, 5, 1e-6, 0.0); },
                     "cg_solve_softmax_head: shift and scale must be finite", "softmax solve NaN scale");
  expect_throws([&] { softmax_hvp(F, W, T(), W, bias, 1.0, 1.0); }, "softmax undefined bias");
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (auto [name, fn] : {std::pair<const char*, void (*)()>{"lstsq_apply", test_lstsq_apply_sizes},
                          {"solvers", test_solvers_sizes},
                          {"cg_step", test_cg_step_sizes},
                          {"cg_begin/end", test_cg_begin_end_affine_sizes},
                          {"softmax head", test_softmax_sizes},
                          {"bad inputs", test_bad_inputs}}) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    std::printf("%-13s %.2f s\n", name, dt.count());
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

// Argument checks shared by every backend of the CG ops. Messages name the op, the argument,
// what was expected and what came, so Python users see the same text from CPU and CUDA.
#include "ops.h"

#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <initializer_list>
#include <iterator>
#include <utility>
#include <string>
#include <vector>

namespace imaml_ext {
namespace {

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

void check_same(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " like ",
              ref_name, ", got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ",
              ref.scalar_type(), " like ", ref_name, ", got ", t.scalar_type());
}

void check_tolerances(const char* op, double rtol, double atol) {
  TORCH_CHECK_VALUE(std::isfinite(rtol) && rtol >= 0, op, ": rtol must be finite and >= 0, got ", rtol);
  TORCH_CHECK_VALUE(std::isfinite(atol) && atol >= 0, op, ": atol must be finite and >= 0, got ", atol);
}

// status and iters of B systems: (B,) int32 on x's device, B = x.size(0).
void check_status_and_iters(const char* op, const at::Tensor& status, const at::Tensor& iters,
                            const at::Tensor& x) {
  const auto B = x.size(0);
  for (auto [name, t] :
       {std::pair<const char*, const at::Tensor&>{"status", status}, {"iters", iters}}) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
                      t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
                      ", got ", t.device());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, op, ": ", name, " must be (", B, ",), got ",
                      t.sizes());
  }
}

}  // namespace

BeginResult empty_cg_begin(const at::Tensor& b) {
  const int64_t B = b.size(0);
  const auto i32 = b.options().dtype(at::kInt);
  return {at::empty_like(b), at::empty_like(b), at::empty_like(b), at::empty({B}, b.options()),
          at::empty({B}, b.options()), at::empty({B}, i32), at::empty({B}, i32),
          at::empty({B}, b.options())};
}

EndArgs prepare_cg_end(const at::Tensor& x, const at::Tensor& rs, const at::Tensor& status,
                       const at::Tensor& iters, const at::Tensor& scale,
                       const std::optional<at::Tensor>& fallback) {
  check_cg_end("cg_end", x, rs, status, iters, scale, fallback);
  return {x.contiguous(),      rs.contiguous(),    status.contiguous(),
          iters.contiguous(),  scale.contiguous(),
          fallback.has_value() ? fallback->contiguous() : at::Tensor()};
}

void check_cg_state(const char* op, const at::Tensor& x, const at::Tensor& r, const at::Tensor& p,
                    const at::Tensor& Ap, const at::Tensor& rs, const at::Tensor& bnorm2,
                    const at::Tensor& status, const at::Tensor& iters, double rtol, double atol) {
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be (B, P), got ", x.sizes());
  const auto B = x.size(0);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"r", r}, {"p", p}, {"Ap", Ap}}) {
    check_same(op, name, t, "x", x);
    TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " must be ", x.sizes(), " like x, got ",
                t.sizes());
  }
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"rs", rs}, {"bnorm2", bnorm2}}) {
    check_same(op, name, t, "x", x);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, op, ": ", name, " must be (", B, ",), got ",
                t.sizes());
  }
  check_status_and_iters(op, status, iters, x);
  // The mutated buffers are written in place, so they cannot be silently copied.
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"x", x}, {"r", r}, {"p", p},
                         {"rs", rs}, {"status", status}, {"iters", iters}}) {
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " is written in place and must be contiguous");
  }
  // ... and through restrict pointers: no two may share memory (Ap is read after x and r are
  // written), except p and Ap, both only read while the other is written (an operator may
  // return its input: linalg.cg passes A(p) on uncopied)
  const std::pair<const char*, const at::Tensor*> bufs[] = {
      {"x", &x}, {"r", &r}, {"p", &p}, {"Ap", &Ap}, {"rs", &rs}, {"bnorm2", &bnorm2}};
  for (size_t i = 0; i < std::size(bufs); ++i) {
    for (size_t j = i + 1; j < std::size(bufs); ++j) {
      const at::Tensor &a = *bufs[i].second, &b = *bufs[j].second;
      if (bufs[i].second == &p && bufs[j].second == &Ap) continue;
      const auto st = at::get_overlap_status(a, b);
      // TooHard: a strided view; shared storage is then taken as overlap
      const bool shared = st == at::MemOverlapStatus::Full || st == at::MemOverlapStatus::Partial ||
                          (st == at::MemOverlapStatus::TooHard && a.has_storage() &&
                           b.has_storage() && a.storage().is_alias_of(b.storage()));
      TORCH_CHECK_VALUE(!shared, op, ": ", bufs[i].first, " and ", bufs[j].first,
                        " must be separate buffers (they share memory)");
    }
  }
  check_tolerances(op, rtol, atol);
}

void check_affine(const char* op, double shift, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(shift) && std::isfinite(scale), op,
                    ": shift and scale must be finite, got ", shift, " and ", scale);
}

void check_cg_begin(const char* op, const at::Tensor& b, double rtol, double atol, bool rescale) {
  check_float(op, "b", b);
  TORCH_CHECK_VALUE(b.dim() == 2, op, ": b must be (B, P), got ", b.sizes());
  check_tolerances(op, rtol, atol);
  // the tolerance would be compared with the residual of b / s, not of b
  TORCH_CHECK_VALUE(!(rescale && atol > 0), op, ": rescale needs atol = 0 (atol is absolute in ",
                    "b's units, the rescaled residual is not), got atol ", atol);
}

void check_cg_end(const char* op, const at::Tensor& x, const at::Tensor& rs,
                  const at::Tensor& status, const at::Tensor& iters, const at::Tensor& scale,
                  const std::optional<at::Tensor>& fallback) {
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be (B, P), got ", x.sizes());
  const auto B = x.size(0);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"rs", rs}, {"scale", scale}}) {
    check_same(op, name, t, "x", x);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, op, ": ", name, " must be (", B, ",), got ",
                      t.sizes());
  }
  check_status_and_iters(op, status, iters, x);
  if (fallback.has_value()) {
    check_same(op, "fallback", *fallback, "x", x);
    TORCH_CHECK_VALUE(fallback->sizes() == x.sizes(), op, ": fallback must be ", x.sizes(),
                      " like x, got ", fallback->sizes());
  }
}

void check_solve_args(const char* op, const at::Tensor& b, const at::Tensor& x0, int64_t max_iter,
                      double rtol, double atol) {
  check_float(op, "b", b);
  TORCH_CHECK_VALUE(b.dim() == 2, op, ": b must be (B, P), got ", b.sizes());
  check_same(op, "x0", x0, "b", b);
  TORCH_CHECK_VALUE(x0.sizes() == b.sizes(), op, ": x0 must be ", b.sizes(), " like b, got ",
              x0.sizes());
  TORCH_CHECK_VALUE(max_iter >= 1, op, ": max_iter must be >= 1, got ", max_iter);
  check_tolerances(op, rtol, atol);
}

void check_lstsq_operator(const char* op, const at::Tensor& X, const at::Tensor& v,
                          const char* v_name, double shift, double scale) {
  check_float(op, "X", X);
  TORCH_CHECK_VALUE(X.dim() == 3, op, ": X must be (B, n, d), got ", X.sizes());
  // A solve's X is checked against b (checked first, with x0); a product's v against X.
  if (std::string(v_name) == "b") check_same(op, "X", X, "b", v);
  else check_same(op, v_name, v, "X", X);
  TORCH_CHECK_VALUE(v.dim() == 2 && v.size(0) == X.size(0) && v.size(1) == X.size(2), op, ": ",
              v_name, " must be (", X.size(0), ", ", X.size(2), ") to match X ", X.sizes(),
              ", got ", v.sizes());
  TORCH_CHECK_VALUE(std::isfinite(shift) && std::isfinite(scale), op,
              ": shift and scale must be finite, got ", shift, " and ", scale);
}

void check_softmax_head(const char* op, const at::Tensor& F, const at::Tensor& W,
                        const at::Tensor& bias, double shift, double scale) {
  check_float(op, "F", F);
  TORCH_CHECK_VALUE(F.dim() == 3, op, ": F must be (B, n, f), got ", F.sizes());
  const auto B = F.size(0), f = F.size(2);
  check_same(op, "W", W, "F", F);
  TORCH_CHECK_VALUE(W.dim() == 3 && W.size(0) == B && W.size(2) == f, op, ": W must be (", B,
                    ", c, ", f, ") to match F ", F.sizes(), ", got ", W.sizes());
  check_same(op, "bias", bias, "F", F);
  TORCH_CHECK_VALUE(bias.dim() == 2 && bias.size(0) == B && bias.size(1) == W.size(1), op,
                    ": bias must be (", B, ", ", W.size(1), ") to match W ", W.sizes(), ", got ",
                    bias.sizes());
  TORCH_CHECK_VALUE(std::isfinite(shift) && std::isfinite(scale), op,
                    ": shift and scale must be finite, got ", shift, " and ", scale);
}

void check_softmax_head_direction(const char* op, const at::Tensor& W, const at::Tensor& bias,
                                  const at::Tensor& V, const at::Tensor& vb) {
  check_same(op, "V", V, "W", W);
  TORCH_CHECK_VALUE(V.sizes() == W.sizes(), op, ": V must be ", W.sizes(), " like W, got ",
                    V.sizes());
  check_same(op, "vb", vb, "bias", bias);
  TORCH_CHECK_VALUE(vb.sizes() == bias.sizes(), op, ": vb must be ", bias.sizes(),
                    " like bias, got ", vb.sizes());
}

void check_softmax_head_flat(const char* op, const char* name, const at::Tensor& W,
                             const at::Tensor& v) {
  check_same(op, name, v, "W", W);
  const auto B = W.size(0), c = W.size(1), f = W.size(2);
  TORCH_CHECK_VALUE(v.dim() == 2 && v.size(0) == B && v.size(1) == c * (f + 1), op, ": ", name,
                    " must be (", B, ", ", c * (f + 1), ") = (B, c*(f+1)) for W ", W.sizes(),
                    " (layout: W row-major, then bias), got ", v.sizes());
}

// ATen's max-pooling output size (pooling_output_shape).
static int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil) {
  const int64_t span = in + 2 * p - d * (k - 1) - 1 + (ceil ? s - 1 : 0);
  int64_t out = (span >= 0 ? span / s : -((-span + s - 1) / s)) + 1;
  if (ceil && (out - 1) * s >= in + p) --out;
  return out;
}

// h of the pooled block's ops: 4-d float, dense NCHW or channels-last; returns whether it is
// taken as channels-last (NCHW when both hold).
static bool check_pooled_bn_map_input(const char* op, const at::Tensor& h) {
  check_float(op, "h", h);
  TORCH_CHECK_VALUE(h.dim() == 4, op, ": h must be 4-d (N, C, H, W), got shape ", h.sizes());
  const bool nchw = h.is_contiguous();
  const bool cl = !nchw && h.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK_VALUE(nchw || cl, op, ": h must be dense NCHW or channels-last, got strides ",
                    h.strides());
  return cl;
}

static PooledBnGeometry check_pooled_bn(
    const char* op, const at::Tensor& h, const at::Tensor& idx,
    std::initializer_list<std::pair<const char*, const at::Tensor*>> pooled,
    std::initializer_list<std::pair<const char*, const at::Tensor*>> channel,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool ceil_mode) {
  const bool cl = check_pooled_bn_map_input(op, h);
  const bool nchw = !cl;
  for (auto [name, a] : {std::pair<const char*, at::IntArrayRef>{"kernel_size", kernel_size},
                         {"stride", stride}, {"padding", padding}, {"dilation", dilation}}) {
    TORCH_CHECK_VALUE(a.size() == 2, op, ": ", name, " must have 2 entries, got ", a);
    const int64_t lo = std::string(name) == "padding" ? 0 : 1;
    TORCH_CHECK_VALUE(a[0] >= lo && a[1] >= lo, op, ": ", name, " must be >= ", lo, ", got ", a);
  }
  for (int i = 0; i < 2; ++i)
    TORCH_CHECK_VALUE(stride[i] >= dilation[i] * (kernel_size[i] - 1) + 1, op,
                      ": the pooling windows must be disjoint (stride >= dilation * "
                      "(kernel_size - 1) + 1), got kernel_size ", kernel_size, ", stride ",
                      stride, ", dilation ", dilation);
  const int64_t N = h.size(0), C = h.size(1), H = h.size(2), W = h.size(3);
  const int64_t Ho = pooled_size(H, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode);
  const int64_t Wo = pooled_size(W, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode);
  const std::vector<int64_t> shape{N, C, Ho, Wo};
  auto layout_ok = [&](const at::Tensor& t) {
    return nchw ? t.is_contiguous() : t.is_contiguous(at::MemoryFormat::ChannelsLast);
  };
  const char* layout = nchw ? "NCHW" : "channels-last";
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong && idx.device() == h.device(), op,
                    ": idx must be int64 on ", h.device(), ", got ", idx.scalar_type(), " on ",
                    idx.device());
  for (const auto& [name, t] : pooled) {
    if (!t->defined()) continue;
    if (t != &idx) check_same(op, name, *t, "h", h);
  }
  std::vector<std::pair<const char*, const at::Tensor*>> maps{{"idx", &idx}};
  maps.insert(maps.end(), pooled.begin(), pooled.end());
  for (const auto& [name, t] : maps) {
    if (!t->defined()) continue;
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(shape), op, ": ", name, " must be ",
                      at::IntArrayRef(shape), " (h ", h.sizes(), " pooled), got ", t->sizes());
    TORCH_CHECK_VALUE(layout_ok(*t), op, ": ", name, " must be dense ", layout, " like h");
  }
  for (const auto& [name, t] : channel) {
    if (!t->defined()) continue;
    check_same(op, name, *t, "h", h);
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C && t->is_contiguous(), op, ": ", name,
                      " must be a contiguous (", C, ",) = (C,) tensor, got ", t->sizes());
  }
  return {N, C, H * W, Ho * Wo, cl};
}

static void check_pooled_bn_map(const char* op, const char* name, const at::Tensor& t,
                         const at::Tensor& h) {
  if (!t.defined()) return;
  check_same(op, name, t, "h", h);
  TORCH_CHECK_VALUE(t.sizes() == h.sizes(), op, ": ", name, " must be ", h.sizes(),
                    " like h, got ", t.sizes());
  const bool ok = h.is_contiguous() ? t.is_contiguous()
                                    : t.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must be dense in h's layout (",
                    h.is_contiguous() ? "NCHW" : "channels-last", ")");
}

static void check_pooled_bn_coef(const char* op, const at::Tensor& coef, const at::Tensor& h) {
  check_same(op, "coef", coef, "h", h);
  const int64_t C = h.dim() == 4 ? h.size(1) : -1;
  TORCH_CHECK_VALUE(coef.dim() == 3 && coef.size(0) == 6 && coef.size(1) == 5 &&
                        coef.size(2) == C && coef.is_contiguous(),
                    op, ": coef must be a contiguous (6, 5, ", C, ") tensor, got ", coef.sizes());
}

static at::MemoryFormat format_of(const PooledBnGeometry& g) {
  return g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

PooledBnForward pooled_bn_forward_setup(const at::Tensor& h, const at::Tensor& weight,
                                        const at::Tensor& bias, double eps,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  const char* op = "pooled_bn_forward";
  const bool cl = check_pooled_bn_map_input(op, h);
  const int64_t N = h.size(0), C = h.size(1);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"weight", weight},
                         {"bias", bias}}) {
    check_same(op, name, t, "h", h);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C && t.is_contiguous(), op, ": ", name,
                      " must be a contiguous (", C, ",) = (C,) tensor, got ", t.sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ",
                    eps);
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && stride.size() == 2 && kernel_size[0] >= 1 &&
                        kernel_size[1] >= 1 && stride[0] >= kernel_size[0] &&
                        stride[1] >= kernel_size[1],
                    op, ": kernel_size must be >= 1 and stride >= kernel_size (disjoint "
                    "windows), got kernel_size ", kernel_size, ", stride ", stride);
  PooledBnForward f;
  f.H = h.size(2), f.W = h.size(3), f.kH = kernel_size[0], f.kW = kernel_size[1];
  f.sH = stride[0], f.sW = stride[1];
  TORCH_CHECK_VALUE(N >= 1 && f.H >= f.kH && f.W >= f.kW, op,
                    ": h must have a sample and a map of at least the kernel ", kernel_size,
                    ", got shape ", h.sizes());
  const int64_t Ho = (f.H - f.kH) / f.sH + 1;
  f.Wo = (f.W - f.kW) / f.sW + 1;
  f.g = {N, C, f.H * f.W, Ho * f.Wo, cl};
  const auto fmt = format_of(f.g);
  const std::vector<int64_t> pooled{N, C, Ho, f.Wo};
  f.y = at::empty(pooled, h.options().memory_format(fmt));
  f.xhat = at::empty(pooled, h.options().memory_format(fmt));
  f.idx = at::empty(pooled, h.options().dtype(at::kLong).memory_format(fmt));
  for (at::Tensor* t : {&f.mean, &f.r, &f.rw, &f.kb, &f.kg}) *t = at::empty({C}, h.options());
  return f;
}

PooledBnBackward pooled_bn_backward_setup(
    const at::Tensor& gy, const at::Tensor& y, const at::Tensor& xhat, const at::Tensor& h,
    const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& rw, const at::Tensor& kb,
    const at::Tensor& kg, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  const PooledBnGeometry g = check_pooled_bn(
      "pooled_bn_backward", h, idx, {{"gy", &gy}, {"y", &y}, {"xhat", &xhat}},
      {{"mean", &mean}, {"rw", &rw}, {"kb", &kb}, {"kg", &kg}}, kernel_size, stride, padding,
      dilation, ceil_mode);
  return {g, at::empty_like(h, h.options(), format_of(g)), at::empty({g.C}, h.options()),
          at::empty({g.C}, h.options()), at::empty_like(gy, gy.options(), format_of(g))};
}

PooledBnDouble pooled_bn_double_backward_setup(
    const std::optional<at::Tensor>& ch, const std::optional<at::Tensor>& cw,
    const std::optional<at::Tensor>& cb, const at::Tensor& gu, const at::Tensor& h,
    const at::Tensor& xhat, const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& y,
    const at::Tensor& rw, const at::Tensor& coef, const at::Tensor& a2,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool ceil_mode, bool need_gy, bool need_h) {
  const char* op = "pooled_bn_double_backward";
  PooledBnDouble d;
  d.ch = ch.value_or(at::Tensor());
  d.cw = cw.value_or(at::Tensor());
  d.cb = cb.value_or(at::Tensor());
  d.g = check_pooled_bn(op, h, idx, {{"gu", &gu}, {"xhat", &xhat}, {"y", &y}},
                        {{"mean", &mean}, {"rw", &rw}, {"a2", &a2}, {"cw", &d.cw}, {"cb", &d.cb}},
                        kernel_size, stride, padding, dilation, ceil_mode);
  check_pooled_bn_map(op, "ch", d.ch, h);
  check_pooled_bn_coef(op, coef, h);
  d.gu = gu, d.h = h, d.xhat = xhat, d.idx = idx, d.mean = mean, d.y = y, d.rw = rw;
  d.coef = coef, d.a2 = a2, d.need_gy = need_gy, d.need_h = need_h;
  d.d_gy = need_gy ? at::empty_like(gu, gu.options(), format_of(d.g)) : gu.new_empty({0});
  d.d_h = need_h ? at::empty_like(h, h.options(), format_of(d.g)) : h.new_empty({0});
  d.d_w = at::empty({d.g.C}, h.options());
  return d;
}

int64_t check_pooled_bn_coefficients(const at::Tensor& r, const at::Tensor& w,
                                     const at::Tensor& rw, const at::Tensor& kb,
                                     const at::Tensor& kg, const at::Tensor& gb,
                                     const at::Tensor& gw, int64_t n) {
  const char* op = "pooled_bn_coefficients";
  check_float(op, "r", r);
  TORCH_CHECK_VALUE(r.dim() == 1 && r.is_contiguous(), op,
                    ": r must be a contiguous (C,) tensor, got ", r.sizes());
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"w", w}, {"rw", rw},
                         {"kb", kb}, {"kg", kg}, {"gb", gb}, {"gw", gw}}) {
    check_same(op, name, t, "r", r);
    TORCH_CHECK_VALUE(t.sizes() == r.sizes() && t.is_contiguous(), op, ": ", name,
                      " must be a contiguous ", r.sizes(), " tensor like r, got ", t.sizes());
  }
  TORCH_CHECK_VALUE(n >= 1, op, ": n must be >= 1, got ", n);
  return r.size(0);
}

}  // namespace imaml_ext

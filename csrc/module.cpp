// The extension module: the op schemas (one TORCH_LIBRARY block for the whole package) and a
// pybind11 module that reports what was built. Kernels register themselves per backend in
// csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cu; the dispatcher picks the backend.
//
// The pybind11 part is compiled only inside the Python extension (setup.py defines
// TORCH_EXTENSION_NAME); CMakeLists.txt builds the same file into a plain C++ library for the
// ctest executables, which need the schemas but no Python.
#include <torch/library.h>

#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>
#endif

#ifndef IMAML_TORCH_VERSION
#define IMAML_TORCH_VERSION "unknown"
#endif
#ifndef IMAML_CUDA_ARCHS
#define IMAML_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(imaml_ext, m) {
  // One fused CG iteration for B independent systems, in place (see csrc/cg_math.h).
  // x, r, p, Ap: (B, P) float32/float64, Ap = A p for the current p; rs: (B,) r.r, updated;
  // bnorm2: (B,) ||b||^2 for the relative tolerance; status, iters: (B,) int32, updated.
  // Systems whose status is not 0 (running) are left untouched. With shift, scale other than
  // (0, 1) the operator is affine: the step uses shift p + scale Ap for A p (cg_math.h
  // cg_affine). Not differentiable.
  m.def(
      "cg_step(Tensor(a!) x, Tensor(b!) r, Tensor(c!) p, Tensor Ap, Tensor(d!) rs, "
      "Tensor bnorm2, Tensor(e!) status, Tensor(f!) iters, float rtol, float atol, "
      "float shift=0., float scale=1.) -> ()");
  // The state of B CG solves from x0 = 0 in one op (a solve's set-up is otherwise a dozen small
  // ops, each a launch on a GPU). b: (B, P) float32/float64. With rescale each system is divided
  // by the power of two s of cg_math.h cg_rhs_scale (else s = 1). Returns x = 0, r = p = b / s
  // (B, P), rs = bnorm2 = ||b / s||^2 (B,), status (B,) int32 (converged, running or
  // non-finite), iters = 0 (B,) int32, s (B,). Not differentiable.
  m.def(
      "cg_begin(Tensor b, float rtol, float atol, bool rescale) -> (Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The end of such a solve: x s (B, P) and the residual norm sqrt(rs) s (B,); with a fallback
  // (B, P), a system that met negative curvature before its first step (status 2, iters 0)
  // returns its fallback row instead. Not differentiable.
  m.def(
      "cg_end(Tensor x, Tensor rs, Tensor status, Tensor iters, Tensor scale, Tensor? fallback) "
      "-> (Tensor, Tensor)");
  // Whole-loop CG on a batch of dense symmetric matrices. A: (B, P, P); b, x0: (B, P).
  // Returns x (B, P), iters (B,) int32, residual norm (B,) (the recursive ||r||), status (B,)
  // int32. Not differentiable.
  m.def(
      "cg_solve_dense(Tensor A, Tensor b, Tensor x0, int max_iter, float rtol, float atol) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Whole-loop CG on A v = shift v + scale X^T (X v), X: (B, n, d), never forming X^T X;
  // b, x0: (B, d). Same returns as cg_solve_dense. Not differentiable.
  m.def(
      "cg_solve_lstsq(Tensor X, Tensor b, Tensor x0, float shift, float scale, int max_iter, "
      "float rtol, float atol) -> (Tensor, Tensor, Tensor, Tensor)");
  // The operator of cg_solve_lstsq alone: shift v + scale X^T (X v), X: (B, n, d), v: (B, d).
  // With shift = 0, scale = 1/n it is the least-squares Hessian-vector product. Not
  // differentiable.
  m.def("lstsq_apply(Tensor X, Tensor v, float shift, float scale) -> Tensor");
  // The Hessian of the mean softmax cross-entropy of a linear head (logits W f + bias) with
  // respect to (W, bias), applied to a direction (V, vb) in one pass over the features; labels
  // are not needed (csrc/hvp_math.h). F: (B, n, f); W, V: (B, c, f); bias, vb: (B, c). Returns
  // (shift V + scale HV (B, c, f), shift vb + scale Hvb (B, c)). Not differentiable.
  m.def(
      "softmax_head_hvp(Tensor F, Tensor W, Tensor bias, Tensor V, Tensor vb, float shift, "
      "float scale) -> (Tensor, Tensor)");
  // Whole-loop CG on v -> shift v + scale H v, H the softmax head's Hessian at (W, bias) over the
  // features F: (B, n, f); W: (B, c, f); bias: (B, c). b, x0: (B, c*(f+1)), flat layout
  // [W row-major, then bias]. Same returns as cg_solve_dense. Not differentiable.
  m.def(
      "cg_solve_softmax_head(Tensor F, Tensor W, Tensor bias, Tensor b, Tensor x0, float shift, "
      "float scale, int max_iter, float rtol, float atol) -> (Tensor, Tensor, Tensor, Tensor)");
  // The conv net's block relu(max_pool2d(batch_norm(h), 2)) with batch statistics, fused
  // (csrc/cpu/blocks_cpu.cpp). h: (N, C, H, W) channels-last; weight, bias: (C,). Returns
  // (out (N, C, H/2, W/2), mean (C,), invstd (C,), hsel: h at each window's arg-max, idx: the
  // arg-max as uint8 0..3), the last three pooled-size and channels-last. CPU only.
  m.def("bn_relu_pool(Tensor h, Tensor weight, Tensor bias, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Its backward: (grad_h, grad_weight, grad_bias) from grad_out and the forward's saved
  // outputs. Not differentiable (the block is first-order only).
  m.def("bn_relu_pool_backward(Tensor grad_out, Tensor h, Tensor weight, Tensor bias, "
        "Tensor mean, Tensor invstd, Tensor hsel, Tensor idx) -> (Tensor, Tensor, Tensor)");
  // The derivatives of the pooled batch-norm block in the HVP layout (imaml_ext.hvp.
  // _PooledBatchNorm; arithmetic in csrc/pooled_bn_math.h; twins in imaml_ext.reference).
  // h: (N, C, H, W) dense NCHW or channels-last; idx: int64 arg-max positions (flat per H*W
  // plane) of the max-pooling with the given geometry, whose windows must be disjoint; the other
  // map-sized tensors pooled-size and in h's layout, the per-channel ones (C,). CPU and CUDA.
  // Not differentiable. pooled_bn_backward -> (gh like h, gw (C,), gb (C,), gu pooled).
  // The block's forward (relu(w xhat + b), xhat the batch-normalised map at the arg-max of
  // max-pooling s h, s = sign(w) with flip, else 1) for windows inside the map (no padding,
  // dilation 1, floor mode, stride >= kernel) -> (y, xhat, idx (int64) pooled in h's layout,
  // mean, r = 1 / sqrt(var + eps), rw = r w, kb = -rw / n, kg = kb r, each (C,)).
  m.def("pooled_bn_forward(Tensor h, Tensor weight, Tensor bias, float eps, int[2] kernel_size, "
        "int[2] stride, bool flip) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("pooled_bn_backward(Tensor gy, Tensor y, Tensor xhat, Tensor h, Tensor idx, "
        "Tensor mean, Tensor rw, Tensor kb, Tensor kg, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, bool ceil_mode) -> (Tensor, Tensor, Tensor, Tensor)");
  // The per-channel factor table of that product (coef (6, 5, C), a2 (C,)) from the point's
  // r, w, rw, kb, kg, gb, gw (each (C,)) and n, the values per channel of the pre-pool map.
  m.def("pooled_bn_coefficients(Tensor r, Tensor w, Tensor rw, Tensor kb, Tensor kg, "
        "Tensor gb, Tensor gw, int n) -> (Tensor, Tensor)");
  // Its vector-Jacobian product for cotangents (ch, cw, cb) (None: zero) -> (d_gy pooled,
  // d_h like h, d_w (C,)); d_gy / d_h are empty unless need_gy / need_h. coef: (6, 5, C).
  m.def("pooled_bn_double_backward(Tensor? ch, Tensor? cw, Tensor? cb, Tensor gu, Tensor h, "
        "Tensor xhat, Tensor idx, Tensor mean, Tensor y, Tensor rw, Tensor coef, Tensor a2, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode, "
        "bool need_gy, bool need_h) -> (Tensor, Tensor, Tensor)");
  // Grouped 2-d convolution with one input channel per group (the conv net's first layer with
  // the tasks folded into channels; csrc/cpu/blocks_cpu.cpp). x: (N, G, H, W) contiguous;
  // weight: (G*C, 1, kh, kw); bias: (G*C,) or None; zero padding, dilation 1. Returns
  // (N, G*C, Ho, Wo) channels-last. CPU only.
  m.def("conv1ch(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding) -> Tensor");
  // Its weight and bias gradients from grad_y (N, G*C, Ho, Wo) channels-last: linear in grad_y,
  // so imaml_ext.ops differentiates it with conv1ch itself.
  m.def("conv1ch_weight_grad(Tensor grad_y, Tensor x, int[2] kernel_size, int[2] stride, "
        "int[2] padding) -> (Tensor, Tensor)");
  // relu(max_pool2d(batch_norm(conv1ch(x)), 2)) fused (csrc/cpu/blocks_cpu.cpp): the batch
  // statistics in closed form from the patch moments of x, the convolution evaluated only in the
  // pooling windows. conv_weight: (G*C, 1, kh, kw); conv_bias: (G*C,) or None; weight, bias:
  // (G*C,) batch-norm affine. Returns (out, mean, invstd, hsel, idx) as bn_relu_pool does (hsel:
  // the convolution's value at each window's arg-max) and the patch moments (G, T + T*T) float64,
  // T = kh*kw, for the backward. CPU only.
  m.def("conv1ch_bn_relu_pool(Tensor x, Tensor conv_weight, Tensor? conv_bias, Tensor weight, "
        "Tensor bias, int[2] stride, int[2] padding, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Its backward: (grad_conv_weight, grad_conv_bias, grad_weight, grad_bias) from grad_out and
  // the forward's saved outputs. Not differentiable (first-order only).
  m.def("conv1ch_bn_relu_pool_backward(Tensor grad_out, Tensor x, Tensor conv_weight, "
        "Tensor weight, Tensor bias, Tensor mean, Tensor invstd, Tensor hsel, Tensor idx, "
        "Tensor moments, int[2] stride, int[2] padding) -> (Tensor, Tensor, Tensor, Tensor)");
  // conv1ch evaluated at one position of each 2x2 window of its output: u[n, c, yo, xo] = the
  // convolution at (2 yo + idx / 2, 2 xo + idx % 2), idx (N, G*C, Ho/2, Wo/2) uint8 0..3
  // channels-last (the arg-max of conv1ch_bn_relu_pool). Linear in (conv_weight, conv_bias):
  // with its weight gradient below, the layer's second-order path (imaml_ext.ops). CPU only.
  m.def("conv1ch_select(Tensor x, Tensor conv_weight, Tensor? conv_bias, Tensor idx, "
        "int[2] stride, int[2] padding) -> Tensor");
  m.def("conv1ch_select_weight_grad(Tensor grad_u, Tensor x, Tensor idx, int[2] kernel_size, "
        "int[2] stride, int[2] padding) -> (Tensor, Tensor)");
  // 3x3 convolution, stride 1, padding 1, by Winograd's F(2x2, 3x3) (csrc/cpu/winograd_cpu.cpp).
  // x: (N, groups*Ci, H, W); weight: (groups*Co, Ci, 3, 3); bias: (groups*Co,) or None; Ci and
  // Co multiples of one 64-byte vector (16 float32, 8 float64). Returns (N, groups*Co, H, W)
  // channels-last. CPU only.
  m.def("conv3x3_winograd(Tensor x, Tensor weight, Tensor? bias, int groups) -> Tensor");
  // Its weight gradient (groups*Co, Ci, 3, 3) from grad_y (N, groups*Co, H, W) and x, by the same
  // transforms. The input gradient is conv3x3_winograd of grad_y with the filters flipped and
  // their channel axes swapped (imaml_ext.ops); the bias gradient is grad_y's sum.
  m.def("conv3x3_winograd_weight_grad(Tensor grad_y, Tensor x, int groups) -> Tensor");
}

#ifdef TORCH_EXTENSION_NAME
namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef IMAML_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(IMAML_CUDA_ARCHS);
  info["torch_version"] = std::string(IMAML_TORCH_VERSION);
  // at::parallel_for spreads the CPU kernels' systems over torch's threads only when the
  // extension is compiled with OpenMP (setup.py adds -fopenmp); otherwise they run serially.
#ifdef _OPENMP
  info["cpu_parallel"] = std::string("openmp");
#else
  info["cpu_parallel"] = std::string("serial");
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  // The same tests, in the same order, as the resolver of the IMAML_SIMD kernels
  // (csrc/cpu/simd_clones.h: target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")).
#if defined(IMAML_NO_CLONES)
  info["cpu_simd"] = std::string("baseline");
#else
  info["cpu_simd"] = std::string(__builtin_cpu_supports("x86-64-v4")   ? "avx512 (x86-64-v4)"
                                 : __builtin_cpu_supports("x86-64-v3") ? "avx2+fma (x86-64-v3)"
                                                                       : "baseline");
#endif
#else
  info["cpu_simd"] = std::string("baseline");
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "imaml_ext C++/CUDA core: batched conjugate gradients and fused HVPs";
  m.def("build_info", &build_info, "What this extension was built with.");
}
#endif  // TORCH_EXTENSION_NAME

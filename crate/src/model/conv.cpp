// A convolution's weight gradient on the CPU as matrix products, for channels-last float
// batches, and the convolution that uses it (libtorch's forward and input gradient).
//
// dW[o, i, kh, kw] = sum over (n, oy, ox) of dy[n, o, oy, ox] * x[n, i, oy*s+kh-p, ox*s+kw-p] is
// one matrix product, dy^T [c_out, rows] x cols [rows, k*k*c_in], where a row of cols holds
// the k*k*c_in input values under one output position (im2col). In channels-last memory a row of
// cols is k runs of k*c_in contiguous floats (one per kernel row), and dy is already the
// [rows, c_out] matrix. The rows are taken in chunks of about kChunkBytes of cols (filled on
// libtorch's threads), each chunk's product added to dW by libtorch's matrix product (MKL's
// sgemm, on libtorch's threads), so the buffer stays in the cache and its size is bounded.
//
// Why: libtorch's (oneDNN's) weight gradient for channels-last batches is a direct kernel that
// ran at about half the speed of its own forward on the same layer (AVX2, AMD EPYC Zen 3: 136 ms
// against 60 for ResNet-18's 64-channel 3x3 layer at 56x56, batch 32), while the same sums as
// matrix products run near the forward's speed. The model times both on each shape before it
// uses this one (conv.rs). Exceptions come back as text (guard.h).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "../guard.h"
#include "../parallel.h"

#include <algorithm>
#include <cstring>

namespace {

// About this many bytes of im2col rows a chunk.
constexpr int64_t kChunkBytes = 2 << 20;

struct Geometry {
  int64_t n, h, w, c, oh, ow, k, s, p;
};

// Rows [r0, r1) of the flattened (n, oy, ox) output positions into `cols` ([r1 - r0, k*k*c]).
void fill_rows(const float* x, float* cols, int64_t r0, int64_t r1, int64_t rbase,
               const Geometry& g) {
  const int64_t kc = g.k * g.c, row_len = g.k * kc, plane = g.oh * g.ow;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / plane, oy = (r % plane) / g.ow, ox = r % g.ow;
    float* dst = cols + (r - rbase) * row_len;
    const int64_t ix0 = ox * g.s - g.p;
    const int64_t lo = std::max<int64_t>(0, -ix0), hi = std::min<int64_t>(g.k, g.w - ix0);
    for (int64_t kh = 0; kh < g.k; ++kh) {
      float* d = dst + kh * kc;
      const int64_t iy = oy * g.s + kh - g.p;
      if (iy < 0 || iy >= g.h || hi <= lo) {
        std::memset(d, 0, kc * sizeof(float));
        continue;
      }
      if (lo > 0) std::memset(d, 0, lo * g.c * sizeof(float));
      std::memcpy(d + lo * g.c, x + ((n * g.h + iy) * g.w + ix0 + lo) * g.c,
                  (hi - lo) * g.c * sizeof(float));
      if (hi < g.k) std::memset(d + hi * g.c, 0, (g.k - hi) * g.c * sizeof(float));
    }
  }
}

// dW ([c_out, c_in, k, k], channels-last) of a convolution without bias or dilation, groups 1,
// stride s, padding p, for x [n, c_in, h, w] and dy [n, c_out, oh, ow], both channels-last.
at::Tensor weight_grad_gemm(const at::Tensor& x_in, const at::Tensor& dy_in, int64_t k,
                            int64_t s, int64_t p) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(cl), dy = dy_in.contiguous(cl);
  const Geometry g{x.size(0), x.size(2), x.size(3), x.size(1),
                   dy.size(2), dy.size(3), k, s, p};
  const int64_t c_out = dy.size(1), rows = g.n * g.oh * g.ow, row_len = k * k * g.c;
  TORCH_CHECK(g.oh == (g.h + 2 * p - k) / s + 1 && g.ow == (g.w + 2 * p - k) / s + 1,
              "d2l conv weight gradient: output ", dy.sizes(), " does not match input ",
              x.sizes(), " with k=", k, " s=", s, " p=", p);
  // [rows, c_out]: dy's channels-last memory as a matrix.
  const at::Tensor dy2 = dy.permute({0, 2, 3, 1}).reshape({rows, c_out});
  at::Tensor dw = at::zeros({c_out, row_len}, x.options());
  const int64_t chunk =
      std::max<int64_t>(1, std::min<int64_t>(rows, kChunkBytes / (row_len * sizeof(float))));
  at::Tensor cols = at::empty({chunk, row_len}, x.options());
  const float* xd = x.const_data_ptr<float>();
  float* cd = cols.data_ptr<float>();
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t m = std::min(chunk, rows - r0);
    d2l::parallel(m, std::max<int64_t>(1, 4096 / row_len), [&](int64_t b, int64_t e) {
      fill_rows(xd, cd, r0 + b, r0 + e, r0, g);
    });
    dw.addmm_(dy2.narrow(0, r0, m).t(), cols.narrow(0, 0, m));
  }
  // [c_out, k, k, c_in] -> [c_out, c_in, k, k] with channels-last strides.
  return dw.view({c_out, k, k, g.c}).permute({0, 3, 1, 2});
}

at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& w, int64_t s, int64_t p) {
  return at::convolution(x, w, c10::nullopt, {s, s}, {p, p}, {1, 1}, false, {0, 0}, 1);
}

struct Conv2dGemmWeightGrad : public torch::autograd::Function<Conv2dGemmWeightGrad> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w, int64_t s, int64_t p) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["s"] = s;
    ctx->saved_data["p"] = p;
    return conv_forward(x, w, s, p);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1];
    const int64_t s = ctx->saved_data["s"].toInt(), p = ctx->saved_data["p"].toInt();
    const at::Tensor dy = grads[0].contiguous(x.suggest_memory_format());
    at::Tensor dx, dw;
    if (ctx->needs_input_grad(0)) {
      dx = std::get<0>(at::convolution_backward(dy, x, w, c10::nullopt, {s, s}, {p, p}, {1, 1},
                                                false, {0, 0}, 1, {true, false, false}));
    }
    if (ctx->needs_input_grad(1)) dw = weight_grad_gemm(x, dy, w.size(2), s, p);
    return {dx, dw, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// `*out` = conv2d(x, w, stride s, padding p) by libtorch, recorded for autograd (when grad mode
// is on and x or w needs a gradient) with the weight gradient as matrix products. x: a float CPU
// tensor [n, c_in, h, w]; w: float [c_out, c_in, k, k] (the caller checks). 0, or 1 with the
// error in `err`.
int d2l_conv2d_gemm_wgrad(const at::Tensor* x, const at::Tensor* w, int64_t s, int64_t p,
                          at::Tensor** out, char* err, size_t len) {
  return d2l::guarded(err, len, [&] {
    at::Tensor y;
    if (at::GradMode::is_enabled() && (x->requires_grad() || w->requires_grad())) {
      y = Conv2dGemmWeightGrad::apply(*x, *w, s, p);
    } else {
      y = conv_forward(*x, *w, s, p);
    }
    *out = new at::Tensor(std::move(y));
  });
}

// `*out` = the weight gradient of conv2d(x, w, stride s, padding p) for the output gradient dy:
// by matrix products (`gemm` != 0) or by libtorch's `convolution_backward`, for timing the two
// (conv.rs). Shapes as in d2l_conv2d_gemm_wgrad, dy [n, c_out, oh, ow]. 0, or 1 with the error
// in `err`.
int d2l_conv2d_weight_grad(const at::Tensor* x, const at::Tensor* dy, const at::Tensor* w,
                           int64_t s, int64_t p, int gemm, at::Tensor** out, char* err,
                           size_t len) {
  return d2l::guarded(err, len, [&] {
    at::NoGradGuard no_grad;
    at::Tensor dw;
    if (gemm != 0) {
      dw = weight_grad_gemm(*x, *dy, w->size(2), s, p);
    } else {
      dw = std::get<1>(at::convolution_backward(
          dy->contiguous(x->suggest_memory_format()), *x, *w, c10::nullopt, {s, s}, {p, p},
          {1, 1}, false, {0, 0}, 1, {false, true, false}));
    }
    *out = new at::Tensor(std::move(dw));
  });
}

}  // extern "C"

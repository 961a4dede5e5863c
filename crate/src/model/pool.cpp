// ResNet's max pooling on the CPU for NCHW float batches, with libtorch's results to the bit.
//
// libtorch's NCHW kernel (`cpu_max_pool`) visits the k*k window of every output one value at a
// time; at 64 px crops it took 7 ms of a 125 ms ResNet-18 training step on an AMD EPYC, at
// 224 px 100 ms. This one takes the same maxima in two passes over each image, a row pass (the
// largest of each row's k columns) and a column pass (the largest of k row results, contiguous in
// memory), both as branch-free selects that the compiler vectorises, on libtorch's own threads.
//
// Same values and indices as libtorch's kernel: each window's first maximum in row-major order
// (a later value replaces the kept one only when it is larger), NaN as the largest (every NaN
// replaces the kept value, so the last NaN wins), the index of the window's first valid position
// when every value is -inf. The backward is libtorch's own `max_pool2d_with_indices_backward`,
// so gradients are PyTorch's. Exceptions come back as text (guard.h).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "../guard.h"
#include "../parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Geometry {
  int64_t planes, h, w, oh, ow, k, s, p;
};

// Row pass of one input row: for each output column ox, the row's maximum over the window's
// columns ox * s - p + j (j in increasing order, so the first maximum stays) in `v`, its column in
// `c` (`v` starts at -inf, `c` at the window's first valid column). `S`: the stride when known
// at compile time (ResNet's 2), so that the strided loads vectorise; 0 reads `s_rt`.
template <int S>
inline void row_pass(const float* __restrict row, float* __restrict v, int32_t* __restrict c,
                     const Geometry& g) {
  const int64_t s = S > 0 ? S : g.s;
  for (int64_t j = 0; j < g.k; ++j) {
    // Outputs whose column ox * s - p + j lies in [0, w).
    const int64_t lo = j >= g.p ? 0 : (g.p - j + s - 1) / s;
    const int64_t last = g.w - 1 + g.p - j;
    const int64_t hi = last < 0 ? -1 : std::min<int64_t>(g.ow - 1, last / s);
    const float* __restrict r = row + (j - g.p);
    for (int64_t ox = lo; ox <= hi; ++ox) {
      const float val = r[ox * s];
      const float cur = v[ox];
      const bool take = (val > cur) | (val != val);
      v[ox] = take ? val : cur;
      c[ox] = take ? static_cast<int32_t>(ox * s + j - g.p) : c[ox];
    }
  }
}

// Column pass step: row result `v`, `c` (of input row `y`, `base` = y * w) against the kept `m`,
// `mi`.
inline void col_step(const float* __restrict v, const int32_t* __restrict c, float* __restrict m,
                     int64_t* __restrict mi, int64_t ow, int64_t base) {
  for (int64_t ox = 0; ox < ow; ++ox) {
    const float val = v[ox];
    const float cur = m[ox];
    const bool take = (val > cur) | (val != val);
    m[ox] = take ? val : cur;
    mi[ox] = take ? base + c[ox] : mi[ox];
  }
}

// One image plane: `in` [h, w] -> `out`, `idx` [oh, ow]. `rv`, `ri`: [h, ow] scratch. Branch-free
// selects over contiguous outputs (the compiler vectorises them; a branch a value would
// mispredict on half of random data); compiled for AVX-512, AVX2 and the baseline, the loader
// picking one for the CPU (the results are the same: only comparisons and copies).
__attribute__((target_clones("avx512f", "avx2", "default"))) void pool_plane(
    const Geometry& g, const float* in, float* out, int64_t* idx, float* rv, int32_t* ri) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t y = 0; y < g.h; ++y) {
    float* v = rv + y * g.ow;
    int32_t* c = ri + y * g.ow;
    for (int64_t ox = 0; ox < g.ow; ++ox) {
      v[ox] = neg_inf;
      c[ox] = static_cast<int32_t>(std::max<int64_t>(ox * g.s - g.p, 0));
    }
    if (g.s == 2) {
      row_pass<2>(in + y * g.w, v, c, g);
    } else {
      row_pass<0>(in + y * g.w, v, c, g);
    }
  }
  // Column pass: for each output row, the first row (top to bottom) holding the window's maximum,
  // written straight into the output.
  for (int64_t oy = 0; oy < g.oh; ++oy) {
    const int64_t y0 = std::max<int64_t>(oy * g.s - g.p, 0);
    const int64_t y1 = std::min<int64_t>(oy * g.s - g.p + g.k, g.h);
    float* m = out + oy * g.ow;
    int64_t* mi = idx + oy * g.ow;
    for (int64_t ox = 0; ox < g.ow; ++ox) {
      m[ox] = neg_inf;
      mi[ox] = y0 * g.w + ri[y0 * g.ow + ox];
    }
    for (int64_t y = y0; y < y1; ++y) {
      col_step(rv + y * g.ow, ri + y * g.ow, m, mi, g.ow, y * g.w);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> pool_forward(const at::Tensor& x, int64_t k, int64_t s,
                                                int64_t p) {
  const auto n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const Geometry g{n * c, h, w, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1, k, s, p};
  auto out = at::empty({n, c, g.oh, g.ow}, x.options());
  auto idx = at::empty({n, c, g.oh, g.ow}, x.options().dtype(at::kLong));
  const float* in = x.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  int64_t* id = idx.data_ptr<int64_t>();
  // About 32k window values a task, as libtorch's grain for element-wise work.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.oh * g.ow * k * k));
  d2l::parallel(g.planes, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> rv(g.h * g.ow);
    std::vector<int32_t> ri(g.h * g.ow);
    for (int64_t i = begin; i < end; ++i) {
      pool_plane(g, in + i * g.h * g.w, o + i * g.oh * g.ow, id + i * g.oh * g.ow, rv.data(),
                 ri.data());
    }
  });
  return {out, idx};
}

struct MaxPool2d : public torch::autograd::Function<MaxPool2d> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t k,
                            int64_t s, int64_t p) {
    auto [out, idx] = pool_forward(x, k, s, p);
    ctx->save_for_backward({x, idx});
    ctx->saved_data["k"] = k;
    ctx->saved_data["s"] = s;
    ctx->saved_data["p"] = p;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const int64_t k = ctx->saved_data["k"].toInt(), s = ctx->saved_data["s"].toInt(),
                  p = ctx->saved_data["p"].toInt();
    auto gx = at::max_pool2d_with_indices_backward(grads[0], saved[0], {k, k}, {s, s}, {p, p},
                                                   {1, 1}, false, saved[1]);
    return {gx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// `*out` = max_pool2d(x, k, stride s, padding p) as a new tensor (the caller frees it), recorded
// for autograd when x needs a gradient. x: a contiguous NCHW float CPU tensor with
// 0 <= p <= k / 2 and k <= h + 2p, w + 2p (the caller checks). 0, or 1 with the error in `err`.
int d2l_max_pool2d(const at::Tensor* x, int64_t k, int64_t s, int64_t p, at::Tensor** out,
                   char* err, size_t len) {
  return d2l::guarded(err, len, [&] {
    at::Tensor y;
    if (at::GradMode::is_enabled() && x->requires_grad()) {
      y = MaxPool2d::apply(*x, k, s, p);
    } else {
      y = std::get<0>(pool_forward(*x, k, s, p));
    }
    *out = new at::Tensor(std::move(y));
  });
}

}  // extern "C"

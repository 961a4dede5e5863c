// ResNet's BatchNorm on the CPU for NCHW float batches, with what follows it in a block (the
// residual addition, the ReLU) in the same passes over memory, forward and backward.
//
// libtorch's NCHW training kernel (`batch_norm_cpu_collect_stats_contiguous_impl`) sums each
// channel one value at a time into one double, twice (the mean, then the squared deviations): a
// chain of dependent additions, about 4 cycles a value. Here the same two sums (in double, the
// deviations from the mean rounded to float first, as libtorch computes them) are split over
// independent partial sums that vectorise; only the order of the double additions differs. Then
// one pass writes `relu(x * alpha + beta + identity)` where libtorch makes three (BatchNorm, the
// in-place addition, the in-place ReLU). mean, invstd, alpha, beta and the running statistics
// are computed with libtorch's formulas and types (`batch_norm_cpu_update_stats_template`,
// `batch_norm_cpu_collect_linear_and_constant_terms`).
//
// The backward is libtorch's `batch_norm_cpu_backward_contiguous_impl` (training) with ReLU's
// `threshold_backward` folded into its two passes: the same float terms and double sums, the same
// formulas for dx, grad_weight and grad_bias; libtorch's loops over planes of a few values (2x2 at
// 64 px crops) cost more than the arithmetic. The masked gradient is written out only when the
// identity needs it. Exceptions come back as text (guard.h).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "../guard.h"
#include "../parallel.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace {

// Helpers of the target_clones functions below: inlined, so that each clone compiles them for its
// own instruction set.
#define D2L_INLINE __attribute__((always_inline)) inline

constexpr int kLanes = 16;

// One channel's sums over `planes` planes of `hw` values, `stride` apart: the mean (the double
// sum over the count, rounded to float, as libtorch's `scalar_t mean = sum / N`) and the sum of
// squared deviations (each `(x - mean) * (x - mean)` in float, added in double).
__attribute__((target_clones("avx512f", "avx2", "default"))) void channel_stats(
    const float* x, int64_t planes, int64_t stride, int64_t hw, float* mean_out,
    float* var_sum_out) {
  double acc[kLanes] = {};
  for (int64_t p = 0; p < planes; ++p) {
    const float* __restrict row = x + p * stride;
    int64_t i = 0;
    for (; i + kLanes <= hw; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(row[i + l]);
    }
    for (int l = 0; i < hw; ++i, ++l) acc[l] += static_cast<double>(row[i]);
  }
  double sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  const float mean = static_cast<float>(sum / static_cast<double>(planes * hw));
  double dev[kLanes] = {};
  for (int64_t p = 0; p < planes; ++p) {
    const float* __restrict row = x + p * stride;
    int64_t i = 0;
    for (; i + kLanes <= hw; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float d = row[i + l] - mean;
        dev[l] += static_cast<double>(d * d);
      }
    }
    for (int l = 0; i < hw; ++i, ++l) {
      const float d = row[i] - mean;
      dev[l] += static_cast<double>(d * d);
    }
  }
  double var_sum = 0;
  for (int l = 0; l < kLanes; ++l) var_sum += dev[l];
  *mean_out = mean;
  *var_sum_out = static_cast<float>(var_sum);
}

// One plane: out = x * alpha + beta (+ identity) (then max with 0, NaN kept as ReLU keeps it).
template <bool kIdentity, bool kRelu>
D2L_INLINE void transform_plane(const float* __restrict x, const float* __restrict id,
                                float* __restrict out, int64_t hw, float alpha, float beta) {
  for (int64_t i = 0; i < hw; ++i) {
    float v = x[i] * alpha + beta;
    if (kIdentity) v = v + id[i];
    if (kRelu) v = v < 0.0f ? 0.0f : v;
    out[i] = v;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void transform_planes(
    const float* x, const float* id, float* out, int64_t begin, int64_t end, int64_t c,
    int64_t hw, const float* alpha, const float* beta, bool relu) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t ch = p % c, off = p * hw;
    if (id != nullptr) {
      if (relu) {
        transform_plane<true, true>(x + off, id + off, out + off, hw, alpha[ch], beta[ch]);
      } else {
        transform_plane<true, false>(x + off, id + off, out + off, hw, alpha[ch], beta[ch]);
      }
    } else if (relu) {
      transform_plane<false, true>(x + off, nullptr, out + off, hw, alpha[ch], beta[ch]);
    } else {
      transform_plane<false, false>(x + off, nullptr, out + off, hw, alpha[ch], beta[ch]);
    }
  }
}

// relu(x * alpha + beta + identity) into a new tensor, over libtorch's threads.
at::Tensor transform(const at::Tensor& x, const at::Tensor& identity, const at::Tensor& alpha,
                     const at::Tensor& beta, bool relu) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.numel() / std::max<int64_t>(1, n * c);
  auto out = at::empty_like(x);
  const float* xd = x.const_data_ptr<float>();
  const float* idd = identity.defined() ? identity.const_data_ptr<float>() : nullptr;
  float* od = out.data_ptr<float>();
  const float* a = alpha.const_data_ptr<float>();
  const float* b = beta.const_data_ptr<float>();
  // About 32k values a task, as libtorch's grain for element-wise work.
  d2l::parallel(n * c, 32768 / std::max<int64_t>(1, hw), [&](int64_t begin, int64_t end) {
    transform_planes(xd, idd, od, begin, end, c, hw, a, b, relu);
  });
  return out;
}

struct Stats {
  at::Tensor save_mean, var_sum, save_invstd, alpha, beta;
  int64_t count;
};

// Training: the batch's statistics, alpha and beta.
Stats train_stats(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  double eps) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.numel() / (n * c);
  const int64_t count = n * hw;
  auto opts = x.options();
  auto mean = at::empty({c}, opts), var_sum = at::empty({c}, opts);
  const float* xd = x.const_data_ptr<float>();
  float* md = mean.data_ptr<float>();
  float* vd = var_sum.data_ptr<float>();
  d2l::parallel(c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      channel_stats(xd + ch * hw, n, c * hw, hw, md + ch, vd + ch);
    }
  });
  Stats s{mean, var_sum, at::empty({c}, opts), at::empty({c}, opts), at::empty({c}, opts), count};
  float* invstd = s.save_invstd.data_ptr<float>();
  float* alpha = s.alpha.data_ptr<float>();
  float* beta = s.beta.data_ptr<float>();
  const float* w = weight.defined() ? weight.const_data_ptr<float>() : nullptr;
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  for (int64_t ch = 0; ch < c; ++ch) {
    // libtorch: VarTransform<double>{}(var_sum / n, eps) = 1 / std::sqrt(var + eps), the
    // division in float.
    const float var = vd[ch] / count;
    invstd[ch] = static_cast<float>(1 / std::sqrt(static_cast<double>(var) + eps));
    const float wv = w != nullptr ? w[ch] : 1.0f, bv = b != nullptr ? b[ch] : 0.0f;
    alpha[ch] = invstd[ch] * wv;
    beta[ch] = bv - md[ch] * alpha[ch];
  }
  return s;
}

// Evaluation: alpha and beta from the running statistics, as libtorch forms them
// (`batch_norm_cpu_collect_linear_and_constant_terms`: invstd = 1 / std::sqrt(running_var +
// eps), in float).
std::pair<at::Tensor, at::Tensor> eval_terms(const at::Tensor& running_mean,
                                             const at::Tensor& running_var,
                                             const at::Tensor& weight, const at::Tensor& bias,
                                             double eps) {
  const int64_t c = running_mean.size(0);
  auto alpha = at::empty({c}, running_mean.options());
  auto beta = at::empty({c}, running_mean.options());
  float* a = alpha.data_ptr<float>();
  float* be = beta.data_ptr<float>();
  const float* rm = running_mean.const_data_ptr<float>();
  const float* rv = running_var.const_data_ptr<float>();
  const float* w = weight.defined() ? weight.const_data_ptr<float>() : nullptr;
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  for (int64_t ch = 0; ch < c; ++ch) {
    const float invstd = 1 / std::sqrt(rv[ch] + static_cast<float>(eps));
    const float wv = w != nullptr ? w[ch] : 1.0f, bv = b != nullptr ? b[ch] : 0.0f;
    a[ch] = invstd * wv;
    be[ch] = bv - rm[ch] * a[ch];
  }
  return {alpha, beta};
}

// The running statistics, in place, as libtorch updates them (float momentum; the unbiased
// variance's division in float, the sum in double). Last, once the output exists, so that a
// failure leaves them as they were.
void update_running(const Stats& s, const at::Tensor& running_mean, const at::Tensor& running_var,
                    double momentum) {
  const float* md = s.save_mean.const_data_ptr<float>();
  const float* vd = s.var_sum.const_data_ptr<float>();
  float* rm = running_mean.defined() ? running_mean.data_ptr<float>() : nullptr;
  float* rv = running_var.defined() ? running_var.data_ptr<float>() : nullptr;
  const float m = static_cast<float>(momentum);
  for (int64_t ch = 0; ch < s.save_mean.size(0); ++ch) {
    if (rm != nullptr) rm[ch] = m * md[ch] + (1 - m) * rm[ch];
    if (rv != nullptr) {
      const double unbiased = vd[ch] / (s.count - 1);
      rv[ch] = static_cast<float>(m * unbiased + (1 - m) * rv[ch]);
    }
  }
}

// GCC's vector types, 8 floats and 8 doubles, loaded and stored unaligned: the backward loops
// below mix a mask, float products and double sums, which the auto-vectoriser leaves scalar.
typedef float f8 __attribute__((vector_size(32)));
typedef float f8u __attribute__((vector_size(32), aligned(4)));
typedef double d8 __attribute__((vector_size(64)));
D2L_INLINE f8 load8(const float* p) { return *reinterpret_cast<const f8u*>(p); }
D2L_INLINE void store8(float* p, f8 v) { *reinterpret_cast<f8u*>(p) = v; }
D2L_INLINE d8 wide(f8 v) { return __builtin_convertvector(v, d8); }

// The gradient reaching BatchNorm's output: ReLU's `threshold_backward` (0 where the saved
// output is <= 0; NaN passes, as in libtorch), or the incoming one.
template <bool kRelu>
D2L_INLINE float masked(float g, float y) {
  return kRelu ? (y <= 0.0f ? 0.0f : g) : g;
}
template <bool kRelu>
D2L_INLINE f8 masked8(const float* g, const float* y) {
  const f8 gv = load8(g);
  if (!kRelu) return gv;
  const f8 zero = {};
  return load8(y) <= zero ? zero : gv;
}

// One channel's backward over `planes` planes of `hw` values, `stride` apart, as libtorch's
// `batch_norm_cpu_backward_contiguous_impl` computes it (training): the sums of dy and of
// (x - mean) * dy (float terms, double sums), then dx = (dy - sum / N - (x - mean) * k) * invstd
// * w with k = dotp * invstd * invstd / N, grad_weight = dotp * invstd, grad_bias = sum. dy is
// the ReLU-masked gradient; with `gid`, it is also written there (the identity's gradient).
template <bool kRelu>
D2L_INLINE void channel_backward(const float* x, const float* g, const float* y, float* gid,
                                 float* dx, int64_t planes, int64_t stride, int64_t hw,
                                 float mean, float invstd, float w, float* gw, float* gb) {
  d8 s0 = {}, s1 = {}, p0 = {}, p1 = {};
  double sum = 0, dotp = 0;
  const f8 mean8 = f8{} + mean;
  for (int64_t p = 0; p < planes; ++p) {
    const int64_t off = p * stride;
    const float* xr = x + off;
    const float* gr = g + off;
    const float* yr = kRelu ? y + off : nullptr;
    float* o = gid != nullptr ? gid + off : nullptr;
    int64_t i = 0;
    for (; i + 16 <= hw; i += 16) {
      const f8 d0 = masked8<kRelu>(gr + i, kRelu ? yr + i : nullptr);
      const f8 d1 = masked8<kRelu>(gr + i + 8, kRelu ? yr + i + 8 : nullptr);
      s0 += wide(d0);
      s1 += wide(d1);
      p0 += wide((load8(xr + i) - mean8) * d0);
      p1 += wide((load8(xr + i + 8) - mean8) * d1);
      if (o != nullptr) {
        store8(o + i, d0);
        store8(o + i + 8, d1);
      }
    }
    for (; i < hw; ++i) {
      const float d = masked<kRelu>(gr[i], kRelu ? yr[i] : 0.0f);
      sum += static_cast<double>(d);
      dotp += static_cast<double>((xr[i] - mean) * d);
      if (o != nullptr) o[i] = d;
    }
  }
  for (int l = 0; l < 8; ++l) {
    sum += s0[l] + s1[l];
    dotp += p0[l] + p1[l];
  }
  const int64_t n = planes * hw;
  if (gw != nullptr) *gw = static_cast<float>(dotp * invstd);
  if (gb != nullptr) *gb = static_cast<float>(sum);
  if (dx == nullptr) return;
  const float k = static_cast<float>(dotp) * invstd * invstd / n;
  const float grad_mean = static_cast<float>(sum / n);
  const f8 k8 = f8{} + k, gm8 = f8{} + grad_mean, is8 = f8{} + invstd, w8 = f8{} + w;
  for (int64_t p = 0; p < planes; ++p) {
    const int64_t off = p * stride;
    const float* xr = x + off;
    const float* gr = g + off;
    const float* yr = kRelu ? y + off : nullptr;
    float* o = dx + off;
    int64_t i = 0;
    for (; i + 8 <= hw; i += 8) {
      const f8 d = masked8<kRelu>(gr + i, kRelu ? yr + i : nullptr);
      const f8 c = (load8(xr + i) - mean8) * k8;
      store8(o + i, (d - gm8 - c) * is8 * w8);
    }
    for (; i < hw; ++i) {
      const float d = masked<kRelu>(gr[i], kRelu ? yr[i] : 0.0f);
      const float c = (xr[i] - mean) * k;
      o[i] = (d - grad_mean - c) * invstd * w;
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void channels_backward(
    const float* x, const float* g, const float* y, float* gid, float* dx, int64_t begin,
    int64_t end, int64_t n, int64_t c, int64_t hw, const float* mean, const float* invstd,
    const float* w, float* gw, float* gb) {
  for (int64_t ch = begin; ch < end; ++ch) {
    const int64_t off = ch * hw;
    float* gid_c = gid != nullptr ? gid + off : nullptr;
    float* dx_c = dx != nullptr ? dx + off : nullptr;
    float* gw_c = gw != nullptr ? gw + ch : nullptr;
    float* gb_c = gb != nullptr ? gb + ch : nullptr;
    const float wv = w != nullptr ? w[ch] : 1.0f;
    if (y != nullptr) {
      channel_backward<true>(x + off, g + off, y + off, gid_c, dx_c, n, c * hw, hw, mean[ch],
                             invstd[ch], wv, gw_c, gb_c);
    } else {
      channel_backward<false>(x + off, g + off, nullptr, gid_c, dx_c, n, c * hw, hw, mean[ch],
                              invstd[ch], wv, gw_c, gb_c);
    }
  }
}

struct Grads {
  at::Tensor x, weight, bias, identity;
};

// The backward of relu?(batch_norm(x) + identity?) in training, one parallel pass per channel
// (libtorch's threads; each channel's values are read twice, the second time from cache).
Grads backward_train(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& y,
                     bool want_x, bool want_w, bool want_b, bool want_id) {
  const at::Tensor g = grad.contiguous();
  const int64_t n = x.size(0), c = x.size(1), hw = x.numel() / (n * c);
  Grads out;
  if (want_x) out.x = at::empty_like(x);
  if (want_id) out.identity = at::empty_like(x);
  auto params = x.options();
  // libtorch's backward computes both and hands back those asked for.
  if (want_w) out.weight = at::empty({c}, params);
  if (want_b) out.bias = at::empty({c}, params);
  const float* xd = x.const_data_ptr<float>();
  const float* gd = g.const_data_ptr<float>();
  const float* yd = y.defined() ? y.const_data_ptr<float>() : nullptr;
  float* gid = want_id ? out.identity.data_ptr<float>() : nullptr;
  float* dx = want_x ? out.x.data_ptr<float>() : nullptr;
  float* gw = want_w ? out.weight.data_ptr<float>() : nullptr;
  float* gb = want_b ? out.bias.data_ptr<float>() : nullptr;
  const float* w = weight.defined() ? weight.const_data_ptr<float>() : nullptr;
  const float* md = mean.const_data_ptr<float>();
  const float* sd = invstd.const_data_ptr<float>();
  d2l::parallel(c, 1, [&](int64_t begin, int64_t end) {
    channels_backward(xd, gd, yd, gid, dx, begin, end, n, c, hw, md, sd, w, gw, gb);
  });
  return out;
}

struct BatchNormAct : public torch::autograd::Function<BatchNormAct> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& identity, bool has_identity,
                            const at::Tensor& running_mean, const at::Tensor& running_var,
                            double momentum, double eps, bool relu) {
    Stats s = train_stats(x, weight, bias, eps);
    auto y = transform(x, has_identity ? identity : at::Tensor(), s.alpha, s.beta, relu);
    update_running(s, running_mean, running_var, momentum);
    // The output is saved only for the ReLU's backward (libtorch's ReluBackward saves it too).
    ctx->save_for_backward({x, weight, s.save_mean, s.save_invstd, relu ? y : at::Tensor()});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["identity"] = has_identity;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const bool to_identity =
        ctx->saved_data["identity"].toBool() && ctx->needs_input_grad(3);
    Grads d = backward_train(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                             ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                             ctx->needs_input_grad(2), to_identity);
    return {d.x,          d.weight,     d.bias,       d.identity,   at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor opt(const at::Tensor* t) { return t != nullptr ? *t : at::Tensor(); }

}  // namespace

extern "C" {

// `*out` = relu?(batch_norm(x) + identity?) as a new tensor (the caller frees it). `train`:
// the batch's statistics (recorded for autograd when an input needs a gradient and grad mode is
// on; the running statistics are updated in place), else the running ones (without autograd
// only). x, identity: contiguous NCHW float CPU tensors
// of one shape with more than one value a channel when training; weight, bias, running_mean,
// running_var: contiguous float [C] (identity may be null; weight and bias too without
// autograd) (the caller checks). 0; 1 with the error in `err`;
// 2 (nothing done) in evaluation when autograd would record: the caller takes libtorch's ops.
int d2l_batch_norm_act(const at::Tensor* x, const at::Tensor* weight, const at::Tensor* bias,
                       const at::Tensor* identity, const at::Tensor* running_mean,
                       const at::Tensor* running_var, int train, double momentum, double eps,
                       int relu, at::Tensor** out, char* err, size_t len) {
  int rc = 0;
  const int failed = d2l::guarded(err, len, [&] {
    at::Tensor y;
    const at::Tensor w = opt(weight), b = opt(bias), id = opt(identity), rm = opt(running_mean),
                     rv = opt(running_var);
    const bool needs_grad = x->requires_grad() || (w.defined() && w.requires_grad()) ||
                            (b.defined() && b.requires_grad()) ||
                            (id.defined() && id.requires_grad());
    if (train) {
      if (at::GradMode::is_enabled() && needs_grad) {
        // Autograd's record of a custom function's inputs reads each one's device: no
        // undefined tensor among them (an empty one stands for a missing identity; weight and
        // bias are there, the caller checks).
        const at::Tensor id_arg = id.defined() ? id : at::empty({0}, x->options());
        y = BatchNormAct::apply(*x, w, b, id_arg, id.defined(), rm, rv, momentum, eps,
                                relu != 0);
      } else {
        at::NoGradGuard no_grad;
        Stats s = train_stats(*x, w, b, eps);
        y = transform(*x, id, s.alpha, s.beta, relu != 0);
        update_running(s, rm, rv, momentum);
      }
    } else if (at::GradMode::is_enabled() && needs_grad) {
      rc = 2;
    } else {
      auto [alpha, beta] = eval_terms(rm, rv, w, b, eps);
      y = transform(*x, id, alpha, beta, relu != 0);
    }
    if (rc == 0) *out = new at::Tensor(std::move(y));
  });
  return failed != 0 ? 1 : rc;
}

}  // extern "C"

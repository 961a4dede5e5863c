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
#include <vector>

namespace {

// Helpers of the target_clones functions below: inlined, so that each clone compiles them for its
// own instruction set.
#define D2L_INLINE __attribute__((always_inline)) inline

// Whether x (4-d) is laid out channels-last (and not also contiguous in NCHW, as a batch with
// one value a channel is): the kernels below take NCHW and channels-last.
bool channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

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

// Channels-last batches: x is `rows` = n*h*w rows of `c` values, one a channel, so every loop
// below runs along a row, over the channels (vectorised), with one partial sum a channel and a
// block of rows. The blocks are fixed by the shape alone (not by the number of threads), and
// their partial sums are added in block order: the results do not depend on the threads.

// Rows a block: at least 64, and at most 512 blocks.
int64_t cl_block_rows(int64_t rows) { return std::max<int64_t>(64, (rows + 511) / 512); }

// acc[ch] += x[r][ch] over the block's rows, in double.
__attribute__((target_clones("avx512f", "avx2", "default"))) void cl_sum_rows(
    const float* __restrict x, int64_t rows, int64_t c, double* __restrict acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict row = x + r * c;
    for (int64_t ch = 0; ch < c; ++ch) acc[ch] += static_cast<double>(row[ch]);
  }
}

// acc[ch] += (x[r][ch] - mean[ch])^2 over the block's rows, each square in float (libtorch's
// term), added in double.
__attribute__((target_clones("avx512f", "avx2", "default"))) void cl_dev_rows(
    const float* __restrict x, int64_t rows, int64_t c, const float* __restrict mean,
    double* __restrict acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict row = x + r * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const float d = row[ch] - mean[ch];
      acc[ch] += static_cast<double>(d * d);
    }
  }
}

// Runs `block(first_row, rows, partial)` for every block of rows, in parallel, each into its own
// `c * parts` doubles (zeroed), then adds the blocks' partials in block order into `total`.
template <typename F>
void cl_block_sums(int64_t rows, int64_t c, int64_t parts, double* total, const F& block) {
  const int64_t per = cl_block_rows(rows);
  const int64_t blocks = (rows + per - 1) / per;
  std::vector<double> partial(static_cast<size_t>(blocks * c * parts), 0.0);
  d2l::parallel(blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * per;
      block(first, std::min(per, rows - first), partial.data() + b * c * parts);
    }
  });
  std::fill(total, total + c * parts, 0.0);
  for (int64_t b = 0; b < blocks; ++b) {
    const double* p = partial.data() + b * c * parts;
    for (int64_t i = 0; i < c * parts; ++i) total[i] += p[i];
  }
}

// The mean and the sum of squared deviations of each channel, as `channel_stats` computes them.
void cl_stats(const float* x, int64_t rows, int64_t c, float* mean, float* var_sum) {
  std::vector<double> total(static_cast<size_t>(c));
  cl_block_sums(rows, c, 1, total.data(), [&](int64_t first, int64_t n, double* acc) {
    cl_sum_rows(x + first * c, n, c, acc);
  });
  for (int64_t ch = 0; ch < c; ++ch) mean[ch] = static_cast<float>(total[ch] / rows);
  cl_block_sums(rows, c, 1, total.data(), [&](int64_t first, int64_t n, double* acc) {
    cl_dev_rows(x + first * c, n, c, mean, acc);
  });
  for (int64_t ch = 0; ch < c; ++ch) var_sum[ch] = static_cast<float>(total[ch]);
}

// out = relu?(x * alpha + beta + identity?) over rows of `c` channels.
template <bool kIdentity, bool kRelu>
D2L_INLINE void cl_transform(const float* __restrict x, const float* __restrict id,
                             float* __restrict out, int64_t rows, int64_t c,
                             const float* __restrict alpha, const float* __restrict beta) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t off = r * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      float v = x[off + ch] * alpha[ch] + beta[ch];
      if (kIdentity) v = v + id[off + ch];
      if (kRelu) v = v < 0.0f ? 0.0f : v;
      out[off + ch] = v;
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void cl_transform_rows(
    const float* x, const float* id, float* out, int64_t rows, int64_t c, const float* alpha,
    const float* beta, bool relu) {
  if (id != nullptr) {
    if (relu) {
      cl_transform<true, true>(x, id, out, rows, c, alpha, beta);
    } else {
      cl_transform<true, false>(x, id, out, rows, c, alpha, beta);
    }
  } else if (relu) {
    cl_transform<false, true>(x, nullptr, out, rows, c, alpha, beta);
  } else {
    cl_transform<false, false>(x, nullptr, out, rows, c, alpha, beta);
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
  if (channels_last(x)) {
    const int64_t rows = n * hw;
    // About 32k values a task.
    d2l::parallel(rows, 32768 / std::max<int64_t>(1, c), [&](int64_t begin, int64_t end) {
      cl_transform_rows(xd + begin * c, idd != nullptr ? idd + begin * c : nullptr,
                        od + begin * c, end - begin, c, a, b, relu);
    });
    return out;
  }
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
  if (channels_last(x)) {
    cl_stats(xd, n * hw, c, md, vd);
  } else {
    d2l::parallel(c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        channel_stats(xd + ch * hw, n, c * hw, hw, md + ch, vd + ch);
      }
    });
  }
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

// Channels-last backward, pass 1 over a block of rows: acc[ch] += dy and acc[c + ch] +=
// (x - mean) * dy (float terms, double sums, as `channel_backward`), dy written to `gid` with
// kGid. Eight channels at a time down the block's rows, the sums in registers (GCC's vector
// types: the auto-vectoriser leaves the mask's select scalar).
template <bool kRelu, bool kGid>
D2L_INLINE void cl_backward_sums(const float* x, const float* g, const float* y, float* gid,
                                 int64_t rows, int64_t c, const float* mean, double* acc) {
  int64_t ch = 0;
  for (; ch + 8 <= c; ch += 8) {
    d8 sum = {}, dotp = {};
    const f8 m = load8(mean + ch);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t off = r * c + ch;
      const f8 d = masked8<kRelu>(g + off, kRelu ? y + off : nullptr);
      sum += wide(d);
      dotp += wide((load8(x + off) - m) * d);
      if (kGid) store8(gid + off, d);
    }
    for (int l = 0; l < 8; ++l) {
      acc[ch + l] += sum[l];
      acc[c + ch + l] += dotp[l];
    }
  }
  for (; ch < c; ++ch) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t off = r * c + ch;
      const float d = masked<kRelu>(g[off], kRelu ? y[off] : 0.0f);
      acc[ch] += static_cast<double>(d);
      acc[c + ch] += static_cast<double>((x[off] - mean[ch]) * d);
      if (kGid) gid[off] = d;
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void cl_backward_sums_rows(
    const float* x, const float* g, const float* y, float* gid, int64_t rows, int64_t c,
    const float* mean, double* acc) {
  if (y != nullptr) {
    if (gid != nullptr) {
      cl_backward_sums<true, true>(x, g, y, gid, rows, c, mean, acc);
    } else {
      cl_backward_sums<true, false>(x, g, y, nullptr, rows, c, mean, acc);
    }
  } else if (gid != nullptr) {
    cl_backward_sums<false, true>(x, g, nullptr, gid, rows, c, mean, acc);
  } else {
    cl_backward_sums<false, false>(x, g, nullptr, nullptr, rows, c, mean, acc);
  }
}

// Pass 2: dx = (dy - grad_mean - (x - mean) * k) * invstd * w, per channel as in
// `channel_backward`.
template <bool kRelu>
D2L_INLINE void cl_backward_dx(const float* x, const float* g, const float* y, float* dx,
                               int64_t rows, int64_t c, const float* mean, const float* k,
                               const float* grad_mean, const float* invstd, const float* w) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = r * c;
    int64_t ch = 0;
    for (; ch + 8 <= c; ch += 8) {
      const int64_t off = row + ch;
      const f8 d = masked8<kRelu>(g + off, kRelu ? y + off : nullptr);
      const f8 t = (load8(x + off) - load8(mean + ch)) * load8(k + ch);
      store8(dx + off, (d - load8(grad_mean + ch) - t) * load8(invstd + ch) * load8(w + ch));
    }
    for (; ch < c; ++ch) {
      const int64_t off = row + ch;
      const float d = masked<kRelu>(g[off], kRelu ? y[off] : 0.0f);
      const float t = (x[off] - mean[ch]) * k[ch];
      dx[off] = (d - grad_mean[ch] - t) * invstd[ch] * w[ch];
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void cl_backward_dx_rows(
    const float* x, const float* g, const float* y, float* dx, int64_t rows, int64_t c,
    const float* mean, const float* k, const float* grad_mean, const float* invstd,
    const float* w) {
  if (y != nullptr) {
    cl_backward_dx<true>(x, g, y, dx, rows, c, mean, k, grad_mean, invstd, w);
  } else {
    cl_backward_dx<false>(x, g, nullptr, dx, rows, c, mean, k, grad_mean, invstd, w);
  }
}

// The channels-last backward: the sums of every channel over blocks of rows (in block order),
// then dx over rows, both on libtorch's threads.
void cl_backward(const float* xd, const float* gd, const float* yd, float* gid, float* dx,
                 int64_t rows, int64_t c, const float* md, const float* sd, const float* w,
                 float* gw, float* gb) {
  std::vector<double> total(static_cast<size_t>(2 * c));
  cl_block_sums(rows, c, 2, total.data(), [&](int64_t first, int64_t n, double* acc) {
    cl_backward_sums_rows(xd + first * c, gd + first * c, yd != nullptr ? yd + first * c : nullptr,
                          gid != nullptr ? gid + first * c : nullptr, n, c, md, acc);
  });
  std::vector<float> k(static_cast<size_t>(c)), grad_mean(static_cast<size_t>(c)),
      wv(static_cast<size_t>(c));
  for (int64_t ch = 0; ch < c; ++ch) {
    const double sum = total[ch], dotp = total[c + ch];
    if (gw != nullptr) gw[ch] = static_cast<float>(dotp * sd[ch]);
    if (gb != nullptr) gb[ch] = static_cast<float>(sum);
    k[ch] = static_cast<float>(dotp) * sd[ch] * sd[ch] / rows;
    grad_mean[ch] = static_cast<float>(sum / rows);
    wv[ch] = w != nullptr ? w[ch] : 1.0f;
  }
  if (dx == nullptr) return;
  d2l::parallel(rows, 32768 / std::max<int64_t>(1, c), [&](int64_t begin, int64_t end) {
    cl_backward_dx_rows(xd + begin * c, gd + begin * c, yd != nullptr ? yd + begin * c : nullptr,
                        dx + begin * c, end - begin, c, md, k.data(), grad_mean.data(), sd,
                        wv.data());
  });
}

struct Grads {
  at::Tensor x, weight, bias, identity;
};

// The backward of relu?(batch_norm(x) + identity?) in training, one parallel pass per channel
// (libtorch's threads; each channel's values are read twice, the second time from cache).
Grads backward_train(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& y,
                     bool want_x, bool want_w, bool want_b, bool want_id) {
  const bool cl = channels_last(x);
  const at::Tensor g = cl ? grad.contiguous(at::MemoryFormat::ChannelsLast) : grad.contiguous();
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
  if (cl) {
    cl_backward(xd, gd, yd, gid, dx, n * hw, c, md, sd, w, gw, gb);
    return out;
  }
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
// only). x, identity: float CPU tensors of one shape, both contiguous NCHW or both
// channels-last, with more than one value a channel when training; weight, bias, running_mean,
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

// A 3x3 convolution (stride 1, padding 1, no bias, groups 1) on the CPU by Winograd's minimal
// filtering F(m x m, 3 x 3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016), forward and backward, for float batches.
//
// The output is cut into m x m tiles; tile p's (m+2) x (m+2) input patch d becomes
// V = B^T d B, each filter g becomes U = G g G^T, and the tile's output is A^T (sum over input
// channels of U * V, elementwise) A. For each of the (m+2)^2 positions xi of the transformed tile
// the sum over channels is one matrix product, V[xi] ([tiles, c_in]) x U[xi] ([c_in, c_out]):
// (m+2)^2 products where the direct convolution does 9 m^2, 2.25x fewer multiplications for
// m = 2, 4x for m = 4. The backward is the same algebra read backwards: the input gradient is
// the same convolution of the output gradient with the flipped, transposed filters; the weight
// gradient is dU[xi] = V[xi]^T x dM[xi] with dM = A dY A^T the output gradient's tiles, and
// dW = G^T dU G. The products run as one batched matrix product (libtorch's `bmm`: MKL's sgemm
// on its threads); the transforms here, on libtorch's threads, a tile at a time, kLanes channels
// at a time (contiguous in channels-last memory, so the compiler vectorises them).
//
// The transformed tensors are (m+2)^2 / m^2 times the input (4x for m = 2, 2.25x for m = 4) and
// live for one call; the backward transforms the saved input again rather than keeping V.
// Rounding: the transforms add up to (m+2)^2 terms with coefficients up to 8 (m = 4) before the
// products, so results differ from the direct sum by a few float roundings more than direct
// convolution's (the tests bound it against float64). Exceptions come back as text (guard.h).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "../guard.h"
#include "../parallel.h"

#include <algorithm>
#include <cstring>

namespace {

// Channels transformed together: a tile's arrays stay in L1 and the lane loops vectorise.
constexpr int kLanes = 16;

// Copies nl <= kLanes floats; a full set of lanes is a fixed-size copy the compiler inlines.
inline void copy_lanes(float* dst, const float* src, int64_t nl) {
  if (nl == kLanes) {
    std::memcpy(dst, src, kLanes * sizeof(float));
  } else {
    std::memcpy(dst, src, nl * sizeof(float));
  }
}

// Copies nl lanes and zeroes the rest of dst's kLanes.
inline void load_lanes(float* dst, const float* src, int64_t nl) {
  if (nl == kLanes) {
    std::memcpy(dst, src, kLanes * sizeof(float));
  } else {
    std::memcpy(dst, src, nl * sizeof(float));
    std::fill(dst + nl, dst + kLanes, 0.0f);
  }
}

// The transform matrices of F(2x2, 3x3) and F(4x4, 3x3) (Lavin and Gray's).
struct F2 {
  static constexpr int M = 2, T = 4;
  static constexpr float BT[T][T] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float G[T][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  static constexpr float AT[M][T] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

struct F4 {
  static constexpr int M = 4, T = 6;
  static constexpr float BT[T][T] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0},
                                     {0, 4, -4, -1, 1, 0}, {0, -2, -1, 2, 1, 0},
                                     {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr float G[T][3] = {{1.0f / 4, 0, 0},
                                    {-1.0f / 6, -1.0f / 6, -1.0f / 6},
                                    {-1.0f / 6, 1.0f / 6, -1.0f / 6},
                                    {1.0f / 24, 1.0f / 12, 1.0f / 6},
                                    {1.0f / 24, -1.0f / 12, 1.0f / 6},
                                    {0, 0, 1}};
  static constexpr float AT[M][T] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};

// out[i][j] = sum over a, b of L[i][a] in[a][b] L[j][b], lane by lane: in is [A][A][kLanes],
// out [R][R][kLanes]. L is one of the constant matrices above, so after unrolling the zero
// coefficients drop out and the ones become plain additions.
template <int R, int A>
inline void sandwich(const float (&L)[R][A], const float* in, float* out) {
  float t[R][A][kLanes];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 8
    for (int b = 0; b < A; ++b) {
      float acc[kLanes] = {};
#pragma GCC unroll 8
      for (int a = 0; a < A; ++a) {
        const float f = L[i][a];
        if (f == 0) continue;
        for (int l = 0; l < kLanes; ++l) acc[l] += f * in[(a * A + b) * kLanes + l];
      }
      std::memcpy(t[i][b], acc, sizeof acc);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      float acc[kLanes] = {};
#pragma GCC unroll 8
      for (int b = 0; b < A; ++b) {
        const float f = L[j][b];
        if (f == 0) continue;
        for (int l = 0; l < kLanes; ++l) acc[l] += f * t[i][b][l];
      }
      std::memcpy(out + (i * R + j) * kLanes, acc, sizeof acc);
    }
  }
}

// The transposed sandwich: out[a][b] = sum over i, j of L[i][a] in[i][j] L[j][b], in [R][R],
// out [A][A] (the adjoint of `sandwich`, for the output gradient and the weight gradient).
template <int R, int A>
inline void sandwich_t(const float (&L)[R][A], const float* in, float* out) {
  float t[A][R][kLanes];
#pragma GCC unroll 8
  for (int a = 0; a < A; ++a) {
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      float acc[kLanes] = {};
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const float f = L[i][a];
        if (f == 0) continue;
        for (int l = 0; l < kLanes; ++l) acc[l] += f * in[(i * R + j) * kLanes + l];
      }
      std::memcpy(t[a][j], acc, sizeof acc);
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < A; ++a) {
#pragma GCC unroll 8
    for (int b = 0; b < A; ++b) {
      float acc[kLanes] = {};
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) {
        const float f = L[j][b];
        if (f == 0) continue;
        for (int l = 0; l < kLanes; ++l) acc[l] += f * t[a][j][l];
      }
      std::memcpy(out + (a * A + b) * kLanes, acc, sizeof acc);
    }
  }
}

// Sizes of one call: an NHWC batch [n][h][w][c] and its tile grid.
struct Grid {
  int64_t n, h, w, th, tw;
  int64_t tiles() const { return n * th * tw; }
};

template <class F>
Grid grid_of(int64_t n, int64_t h, int64_t w) {
  return {n, h, w, (h + F::M - 1) / F::M, (w + F::M - 1) / F::M};
}

// Tiles a task: enough work to amortise a task, few enough to spread over the threads.
constexpr int64_t kGrain = 8;

// V[xi][p][c] = (B^T d B)[xi] for each tile p of x (NHWC, c channels), d being the
// (m+2) x (m+2) patch at (ty*m - 1, tx*m - 1), zero outside x (the padding).
template <class F>
void input_transform(const float* x, int64_t c, const Grid& g, float* v) {
  constexpr int T = F::T;
  const int64_t tiles = g.tiles();
  d2l::parallel(tiles, kGrain, [&](int64_t p0, int64_t p1) {
    alignas(64) float d[T * T * kLanes], out[T * T * kLanes];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / (g.th * g.tw), ty = p / g.tw % g.th, tx = p % g.tw;
      const int64_t y0 = ty * F::M - 1, x0 = tx * F::M - 1;
      for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
        const int64_t nl = std::min<int64_t>(kLanes, c - c0);
        for (int i = 0; i < T; ++i) {
          for (int j = 0; j < T; ++j) {
            float* dst = d + (i * T + j) * kLanes;
            const int64_t yy = y0 + i, xx = x0 + j;
            if (yy < 0 || yy >= g.h || xx < 0 || xx >= g.w) {
              std::fill(dst, dst + kLanes, 0.0f);
              continue;
            }
            load_lanes(dst, x + ((b * g.h + yy) * g.w + xx) * c + c0, nl);
          }
        }
        sandwich<T, T>(F::BT, d, out);
        for (int xi = 0; xi < T * T; ++xi) {
          copy_lanes(v + (xi * tiles + p) * c + c0, out + xi * kLanes, nl);
        }
      }
    }
  });
}

// y (NHWC, k channels) = A^T m A for each tile, m[xi] = prod[xi][p]; positions past the output's
// edge are dropped.
template <class F>
void output_transform(const float* prod, int64_t k, const Grid& g, float* y) {
  constexpr int T = F::T, M = F::M;
  const int64_t tiles = g.tiles();
  d2l::parallel(tiles, kGrain, [&](int64_t p0, int64_t p1) {
    alignas(64) float m[T * T * kLanes], out[M * M * kLanes];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / (g.th * g.tw), ty = p / g.tw % g.th, tx = p % g.tw;
      for (int64_t k0 = 0; k0 < k; k0 += kLanes) {
        const int64_t nl = std::min<int64_t>(kLanes, k - k0);
        for (int xi = 0; xi < T * T; ++xi) {
          float* dst = m + xi * kLanes;
          load_lanes(dst, prod + (xi * tiles + p) * k + k0, nl);
        }
        sandwich<M, T>(F::AT, m, out);
        for (int i = 0; i < M; ++i) {
          const int64_t yy = ty * M + i;
          if (yy >= g.h) break;
          for (int j = 0; j < M; ++j) {
            const int64_t xx = tx * M + j;
            if (xx >= g.w) break;
            copy_lanes(y + ((b * g.h + yy) * g.w + xx) * k + k0, out + (i * M + j) * kLanes, nl);
          }
        }
      }
    }
  });
}

// dm[xi][p] = (A dY A^T)[xi] for each tile p of the output gradient dy (NHWC, k channels), zero
// past its edge: the adjoint of `output_transform`.
template <class F>
void output_grad_transform(const float* dy, int64_t k, const Grid& g, float* dm) {
  constexpr int T = F::T, M = F::M;
  const int64_t tiles = g.tiles();
  d2l::parallel(tiles, kGrain, [&](int64_t p0, int64_t p1) {
    alignas(64) float d[M * M * kLanes], out[T * T * kLanes];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / (g.th * g.tw), ty = p / g.tw % g.th, tx = p % g.tw;
      for (int64_t k0 = 0; k0 < k; k0 += kLanes) {
        const int64_t nl = std::min<int64_t>(kLanes, k - k0);
        for (int i = 0; i < M; ++i) {
          for (int j = 0; j < M; ++j) {
            float* dst = d + (i * M + j) * kLanes;
            const int64_t yy = ty * M + i, xx = tx * M + j;
            if (yy >= g.h || xx >= g.w) {
              std::fill(dst, dst + kLanes, 0.0f);
              continue;
            }
            load_lanes(dst, dy + ((b * g.h + yy) * g.w + xx) * k + k0, nl);
          }
        }
        sandwich_t<M, T>(F::AT, d, out);
        for (int xi = 0; xi < T * T; ++xi) {
          copy_lanes(dm + (xi * tiles + p) * k + k0, out + xi * kLanes, nl);
        }
      }
    }
  });
}

// U[xi][c][k] = (G g G^T)[xi] for each filter g = w[k][c] (w [k][c][3][3], any strides).
template <class F>
at::Tensor weight_transform(const at::Tensor& w) {
  constexpr int T = F::T;
  const int64_t k = w.size(0), c = w.size(1);
  // [c][3][3][k]: the lanes (over k) contiguous.
  const at::Tensor wt = w.permute({1, 2, 3, 0}).contiguous();
  at::Tensor u = at::empty({T * T, c, k}, w.options());
  const float* wd = wt.const_data_ptr<float>();
  float* ud = u.data_ptr<float>();
  d2l::parallel(c, 1, [&](int64_t c0, int64_t c1) {
    alignas(64) float g[9 * kLanes], out[T * T * kLanes];
    for (int64_t ci = c0; ci < c1; ++ci) {
      for (int64_t k0 = 0; k0 < k; k0 += kLanes) {
        const int64_t nl = std::min<int64_t>(kLanes, k - k0);
        for (int e = 0; e < 9; ++e) load_lanes(g + e * kLanes, wd + (ci * 9 + e) * k + k0, nl);
        // G is [T][3]: the patch is 3 x 3.
        sandwich<T, 3>(F::G, g, out);
        for (int xi = 0; xi < T * T; ++xi) {
          copy_lanes(ud + (xi * c + ci) * k + k0, out + xi * kLanes, nl);
        }
      }
    }
  });
  return u;
}

// dW[k][c] = G^T dU[.][c][k] G, as [k][c][3][3] (contiguous): the adjoint of `weight_transform`.
template <class F>
at::Tensor weight_grad_transform(const at::Tensor& du, int64_t k, int64_t c) {
  constexpr int T = F::T;
  // [c][3][3][k], permuted at the end.
  at::Tensor dw = at::empty({c, 3, 3, k}, du.options());
  const float* dud = du.const_data_ptr<float>();
  float* dwd = dw.data_ptr<float>();
  d2l::parallel(c, 1, [&](int64_t c0, int64_t c1) {
    alignas(64) float m[T * T * kLanes], out[9 * kLanes];
    for (int64_t ci = c0; ci < c1; ++ci) {
      for (int64_t k0 = 0; k0 < k; k0 += kLanes) {
        const int64_t nl = std::min<int64_t>(kLanes, k - k0);
        for (int xi = 0; xi < T * T; ++xi) {
          load_lanes(m + xi * kLanes, dud + (xi * c + ci) * k + k0, nl);
        }
        sandwich_t<T, 3>(F::G, m, out);
        for (int e = 0; e < 9; ++e) copy_lanes(dwd + (ci * 9 + e) * k + k0, out + e * kLanes, nl);
      }
    }
  });
  return dw.permute({3, 0, 1, 2}).contiguous();
}

void check_args(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "d2l winograd conv: the input must be a 4-d float CPU tensor, got ", x.sizes(), " ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kFloat && w.size(2) == 3 &&
                  w.size(3) == 3 && w.size(1) == x.size(1),
              "d2l winograd conv: the weight must be float [c_out, ", x.size(1),
              ", 3, 3], got ", w.sizes(), " ", w.scalar_type());
}

// conv2d(x, w, stride 1, padding 1), channels-last, no autograd.
template <class F>
at::Tensor winograd_forward(const at::Tensor& x_in, const at::Tensor& w) {
  constexpr int T = F::T;
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t c = x.size(1), k = w.size(0);
  const Grid g = grid_of<F>(x.size(0), x.size(2), x.size(3));
  at::Tensor v = at::empty({T * T, g.tiles(), c}, x.options());
  input_transform<F>(x.const_data_ptr<float>(), c, g, v.data_ptr<float>());
  const at::Tensor prod = at::bmm(v, weight_transform<F>(w));  // [T*T, tiles, k]
  v.reset();
  at::Tensor y = at::empty({g.n, k, g.h, g.w},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  output_transform<F>(prod.const_data_ptr<float>(), k, g, y.data_ptr<float>());
  return y;
}

// The weight gradient for input x and output gradient dy (both channels-last).
template <class F>
at::Tensor weight_grad(const at::Tensor& x, const at::Tensor& dy) {
  constexpr int T = F::T;
  const int64_t c = x.size(1), k = dy.size(1);
  const Grid g = grid_of<F>(x.size(0), x.size(2), x.size(3));
  at::Tensor v = at::empty({T * T, g.tiles(), c}, x.options());
  input_transform<F>(x.const_data_ptr<float>(), c, g, v.data_ptr<float>());
  at::Tensor dm = at::empty({T * T, g.tiles(), k}, x.options());
  output_grad_transform<F>(dy.const_data_ptr<float>(), k, g, dm.data_ptr<float>());
  const at::Tensor du = at::bmm(v.transpose(1, 2), dm);  // [T*T, c, k]
  v.reset();
  dm.reset();
  return weight_grad_transform<F>(du.contiguous(), k, c);
}

template <class F>
struct Winograd : public torch::autograd::Function<Winograd<F>> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w) {
    ctx->save_for_backward({x, w});
    return winograd_forward<F>(x, w).contiguous(x.suggest_memory_format());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x_in = saved[0], &w = saved[1];
    const auto cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor dy = grads[0].contiguous(cl);
    at::Tensor dx, dw;
    if (ctx->needs_input_grad(0)) {
      // The same convolution of dy with the filters flipped and in and out swapped.
      dx = winograd_forward<F>(dy, w.flip({2, 3}).transpose(0, 1))
               .contiguous(x_in.suggest_memory_format());
    }
    if (ctx->needs_input_grad(1)) {
      dw = weight_grad<F>(x_in.contiguous(cl), dy).contiguous(w.suggest_memory_format());
    }
    return {dx, dw};
  }
};

}  // namespace

extern "C" {

// `*out` = conv2d(x, w, stride 1, padding 1) by Winograd's F(m x m, 3 x 3), m = 2 or 4,
// recorded for autograd (its backward the same way) when grad mode is on and x or w needs a
// gradient. x: a float CPU tensor [n, c_in, h, w]; w: float [c_out, c_in, 3, 3]. The output has
// x's memory format. 0, or 1 with the error in `err`.
int d2l_conv2d_winograd(const at::Tensor* x, const at::Tensor* w, int64_t m, at::Tensor** out,
                        char* err, size_t len) {
  return d2l::guarded(err, len, [&] {
    check_args(*x, *w);
    TORCH_CHECK(m == 2 || m == 4, "d2l winograd conv: tile size m must be 2 or 4, got ", m);
    const bool record =
        at::GradMode::is_enabled() && (x->requires_grad() || w->requires_grad());
    at::Tensor y;
    if (m == 2) {
      y = record ? Winograd<F2>::apply(*x, *w)
                 : winograd_forward<F2>(*x, *w).contiguous(x->suggest_memory_format());
    } else {
      y = record ? Winograd<F4>::apply(*x, *w)
                 : winograd_forward<F4>(*x, *w).contiguous(x->suggest_memory_format());
    }
    *out = new at::Tensor(std::move(y));
  });
}

}  // extern "C"

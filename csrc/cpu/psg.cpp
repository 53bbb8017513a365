// CPU kernel of pyeff::psg_exact_entries (schema in ../psg.cpp): single entries of a convolution's
// weight gradient, read straight from the NCHW input and output gradient (no im2col). The entries of
// one output channel are computed together (the unit of parallel work). Each entry accumulates a
// row of OW partial sums (element-wise multiply-adds, which vectorise without reordering a
// reduction) over the samples and output rows, then adds the row up in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"

namespace pyeff {
namespace {

struct Geometry {
  int64_t N, C, H, W, K, OH, OW, Cg, Kg, KH, KW, sh, sw, ph, pw, dh, dw;
};

// [lo, hi) of output positions o whose input position o*s - p + t*d lies in [0, in)
inline void valid_range(int64_t in, int64_t out, int64_t s, int64_t p, int64_t t, int64_t d, int64_t* lo,
                        int64_t* hi) {
  const int64_t off = t * d - p;  // input position of o = 0
  int64_t a = off >= 0 ? 0 : (-off + s - 1) / s;
  int64_t b = off > in - 1 ? 0 : (in - 1 - off) / s + 1;
  *lo = std::min(a, out);
  *hi = std::min(std::max(b, *lo), out);
}

// The taps of one output channel k's listed entries: for each, its input channel, its valid output
// rows [ohl, ohh) and columns [owl, owh) and the input offset of output (0, 0).
struct Taps {
  int64_t count;
  const int64_t *c, *ohl, *ohh, *owl, *owh, *xoff;
};

// acc[t * OW + ow] += grad_out[n, k, oh, ow] * x[n, c_t, tap t's input position] over n and oh. One
// call per output channel, so that the loops stay inside one (vectorised, per-CPU cloned) function;
// samples outermost, so that grad_out's plane stays in L1 and x's sample (all channels) in L2 while
// every tap of the row reads them.
template <typename scalar_t>
inline void row_sums_impl(const Geometry& G, const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                          int64_t k, const Taps& T, scalar_t* __restrict__ acc) {
  const int64_t plane_out = G.OH * G.OW, plane_in = G.H * G.W;
  for (int64_t n = 0; n < G.N; ++n) {
    const scalar_t* __restrict__ gp = g + (n * G.K + k) * plane_out;
    const scalar_t* __restrict__ xn = x + n * G.C * plane_in;
    for (int64_t t = 0; t < T.count; ++t) {
      const int64_t lo = T.owl[t], width = T.owh[t] - T.owl[t];
      const scalar_t* __restrict__ xp = xn + T.c[t] * plane_in + T.xoff[t] + lo * G.sw;
      scalar_t* __restrict__ row = acc + t * G.OW + lo;
      for (int64_t oh = T.ohl[t]; oh < T.ohh[t]; ++oh) {
        const scalar_t* __restrict__ gr = gp + oh * G.OW + lo;
        const scalar_t* __restrict__ xr = xp + oh * G.sh * G.W;
        if (G.sw == 1) {
          for (int64_t i = 0; i < width; ++i) row[i] += gr[i] * xr[i];
        } else {
          for (int64_t i = 0; i < width; ++i) row[i] += gr[i] * xr[i * G.sw];
        }
      }
    }
  }
}

PYEFF_CLONES void row_sums(const Geometry& G, const float* x, const float* g, int64_t k, const Taps& T, float* acc) {
  row_sums_impl(G, x, g, k, T, acc);
}

void row_sums(const Geometry& G, const double* x, const double* g, int64_t k, const Taps& T, double* acc) {
  row_sums_impl(G, x, g, k, T, acc);
}

// The entries index[b..e) all belong to one output channel (a row of the weight gradient).
template <typename scalar_t>
void row_entries(const Geometry& G, const scalar_t* x, const scalar_t* g, const int64_t* index, int64_t b, int64_t e,
                 scalar_t* out, std::vector<scalar_t>& acc) {
  const int64_t taps = G.KH * G.KW;
  const int64_t k = index[b] / (G.Cg * taps);
  const int64_t count = e - b;
  acc.assign(static_cast<size_t>(count * G.OW), scalar_t(0));
  std::vector<int64_t> c(count), ohl(count), ohh(count), owl(count), owh(count), xoff(count);
  for (int64_t t = 0; t < count; ++t) {
    const int64_t tap = index[b + t] % taps, i = tap / G.KW, j = tap % G.KW;
    c[t] = (k / G.Kg) * G.Cg + (index[b + t] / taps) % G.Cg;
    valid_range(G.H, G.OH, G.sh, G.ph, i, G.dh, &ohl[t], &ohh[t]);
    valid_range(G.W, G.OW, G.sw, G.pw, j, G.dw, &owl[t], &owh[t]);
    xoff[t] = (i * G.dh - G.ph) * G.W + (j * G.dw - G.pw);  // input offset of output (0, 0)
  }
  Taps T{count, c.data(), ohl.data(), ohh.data(), owl.data(), owh.data(), xoff.data()};
  row_sums(G, x, g, k, T, acc.data());
  for (int64_t t = 0; t < count; ++t) {
    double s = 0;  // float lanes for float32 (N * OH terms each), added up in double
    for (int64_t o = 0; o < G.OW; ++o) s += static_cast<double>(acc[t * G.OW + o]);
    out[b + t] = static_cast<scalar_t>(s);
  }
}

at::Tensor psg_exact_entries_cpu(const at::Tensor& x_in, const at::Tensor& g_in, const at::Tensor& index_in,
                                 at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x_in.dim() == 4 && g_in.dim() == 4, "pyeff::psg_exact_entries: x and grad_out must be 4-D");
  TORCH_CHECK(x_in.scalar_type() == g_in.scalar_type(), "pyeff::psg_exact_entries: x and grad_out dtypes differ");
  TORCH_CHECK(index_in.scalar_type() == at::kLong && index_in.dim() == 1,
              "pyeff::psg_exact_entries: index must be a 1-D int64 tensor");
  TORCH_CHECK(weight_shape.size() == 4 && groups >= 1, "pyeff::psg_exact_entries: bad weight_shape / groups");
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous(), index = index_in.contiguous();
  Geometry G{x.size(0), x.size(1), x.size(2), x.size(3), g.size(1), g.size(2), g.size(3), weight_shape[1],
             weight_shape[0] / groups, weight_shape[2], weight_shape[3], stride[0], stride[1], padding[0],
             padding[1], dilation[0], dilation[1]};
  TORCH_CHECK(g.size(0) == G.N && G.K == weight_shape[0] && G.C == G.Cg * groups && G.K % groups == 0,
              "pyeff::psg_exact_entries: x, grad_out and weight_shape disagree");
  TORCH_CHECK(G.OH == conv_out_size(G.H, G.KH, G.sh, G.ph, G.dh) && G.OW == conv_out_size(G.W, G.KW, G.sw, G.pw, G.dw),
              "pyeff::psg_exact_entries: grad_out's plane is not the convolution's output plane");
  const int64_t E = index.numel();
  at::Tensor out = at::empty({E}, x.options());
  if (E == 0) return out;
  const int64_t* idx = index.data_ptr<int64_t>();
  const int64_t taps = G.KH * G.KW, total = G.K * G.Cg * taps;
  TORCH_CHECK(idx[0] >= 0 && idx[E - 1] < total, "pyeff::psg_exact_entries: index out of range [0, ", total, ")");
  // runs of entries sharing an output channel: the unit of work
  const int64_t row = G.Cg * taps;
  std::vector<int64_t> starts{0};
  for (int64_t e = 1; e < E; ++e) {
    TORCH_CHECK(idx[e] > idx[e - 1], "pyeff::psg_exact_entries: index must be strictly ascending");
    if (idx[e] / row != idx[e - 1] / row) starts.push_back(e);
  }
  starts.push_back(E);
  const int64_t runs = static_cast<int64_t>(starts.size()) - 1;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "psg_exact_entries_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, runs, 1, [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> acc;
      for (int64_t r = r0; r < r1; ++r) row_entries<scalar_t>(G, xp, gp, idx, starts[r], starts[r + 1], op, acc);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) { m.impl("psg_exact_entries", &psg_exact_entries_cpu); }

}  // namespace pyeff

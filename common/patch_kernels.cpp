// CPU kernels of PCKA's patch rows (common/patch_kernels.py builds and loads them; its docstring says why).
//
// rows_forward: bilinear resize (align_corners=False) of each (image, channel) map and its cut into
// patch rows, in one pass over the map; rows_backward: its adjoint. One map per task, on torch's own
// thread pool (at::parallel_for), with a patch row of work buffers in cache.
//
// Rows (k, n_pad, B * p * p): one per patch, row-major over the grid as patchify; within a row, image
// by image, each patch's pixels column by column (patchify: row by row). Rows n to n_pad are zeros.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace {

// The resize of one axis: output i blends inputs index0[i] and index1[i] with weights weight0[i]
// and weight1[i] (resize_coefficients in patch_kernels.py).
template <typename T>
struct Axis {
  const int64_t* index0;
  const int64_t* index1;
  const T* weight0;
  const T* weight1;
  int64_t size;  // resized
};

template <typename T>
Axis<T> axis(const torch::Tensor& index0, const torch::Tensor& index1, const torch::Tensor& weight0,
             const torch::Tensor& weight1) {
  return {index0.data_ptr<int64_t>(), index1.data_ptr<int64_t>(), weight0.data_ptr<T>(), weight1.data_ptr<T>(),
          index0.size(0)};
}

// out = a0 * (src0 - o) + a1 * (src1 - o): one resized line. The offset leaves before any rounding, so
// that a constant map gives exact zeros.
template <typename T>
inline void blend(T* __restrict out, const T* src0, const T* src1, T a0, T a1, T o, int64_t length) {
  for (int64_t i = 0; i < length; ++i) out[i] = a0 * (src0[i] - o) + a1 * (src1[i] - o);
}

// One map (H x W, minus the offset o) into image b's share of its channel's rows. lines (p x W): p
// rows resized along H; columns (W x p): the same transposed, so that the W pass reads and writes
// whole columns of a patch.
template <typename T>
inline void forward_map(const T* __restrict map, T o, int64_t width, Axis<T> h, Axis<T> w, int64_t p, int64_t b,
                        int64_t batch, int64_t n_pad, T* __restrict rows, T* __restrict lines,
                        T* __restrict columns) {
  const int64_t grid_w = w.size / p, n = (h.size / p) * grid_w, d = batch * p * p;
  for (int64_t gy = 0; gy < h.size / p; ++gy) {
    for (int64_t i = 0; i < p; ++i) {
      const int64_t y = gy * p + i;
      blend(lines + i * width, map + h.index0[y] * width, map + h.index1[y] * width, h.weight0[y], h.weight1[y], o,
            width);
    }
    for (int64_t x = 0; x < width; ++x)
      for (int64_t i = 0; i < p; ++i) columns[x * p + i] = lines[i * width + x];
    for (int64_t gx = 0; gx < grid_w; ++gx) {
      T* __restrict row = rows + (gy * grid_w + gx) * d + b * p * p;
      for (int64_t j = 0; j < p; ++j) {
        const int64_t x = gx * p + j;
        blend(row + j * p, columns + w.index0[x] * p, columns + w.index1[x] * p, w.weight0[x], w.weight1[x], T(0), p);
      }
    }
  }
  for (int64_t r = n; r < n_pad; ++r)
    for (int64_t e = 0; e < p * p; ++e) rows[r * d + b * p * p + e] = 0;
}

// dst0 += a0 * src, then dst1 += a1 * src: the adjoint of one resized line. Two loops, since at the
// map's edge both weights go to the same source line (dst0 == dst1).
template <typename T>
inline void add_weighted(T* dst0, T* dst1, T a0, T a1, const T* __restrict src, int64_t length) {
  for (int64_t i = 0; i < length; ++i) dst0[i] += a0 * src[i];
  for (int64_t i = 0; i < length; ++i) dst1[i] += a1 * src[i];
}

// The adjoint of forward_map (without the offset: see patch_cka's backward), overwriting grad (H x W).
template <typename T>
inline void backward_map(const T* __restrict rows, int64_t height, int64_t width, Axis<T> h, Axis<T> w, int64_t p,
                         int64_t b, int64_t batch, T* __restrict grad, T* __restrict lines, T* __restrict columns) {
  const int64_t grid_w = w.size / p, d = batch * p * p;
  for (int64_t e = 0; e < height * width; ++e) grad[e] = 0;
  for (int64_t gy = 0; gy < h.size / p; ++gy) {
    for (int64_t e = 0; e < width * p; ++e) columns[e] = 0;
    for (int64_t gx = 0; gx < grid_w; ++gx) {
      const T* __restrict row = rows + (gy * grid_w + gx) * d + b * p * p;
      for (int64_t j = 0; j < p; ++j) {
        const int64_t x = gx * p + j;
        add_weighted(columns + w.index0[x] * p, columns + w.index1[x] * p, w.weight0[x], w.weight1[x], row + j * p, p);
      }
    }
    for (int64_t i = 0; i < p; ++i)
      for (int64_t x = 0; x < width; ++x) lines[i * width + x] = columns[x * p + i];
    for (int64_t i = 0; i < p; ++i) {
      const int64_t y = gy * p + i;
      add_weighted(grad + h.index0[y] * width, grad + h.index1[y] * width, h.weight0[y], h.weight1[y],
                   lines + i * width, width);
    }
  }
}

// The per-map functions compiled for each of these instruction sets, the best picked at load time:
// a build is correct on any x86-64 node of a cluster that shares it, and vectorised on each.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define RCKA_TARGETS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // GCC 11 can't dispatch on x86-64-v*
#define RCKA_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RCKA_TARGETS
#endif

#define RCKA_MAP_FUNCTIONS(T)                                                                                     \
  RCKA_TARGETS void forward_map_##T(const T* map, T o, int64_t width, Axis<T> h, Axis<T> w, int64_t p, int64_t b, \
                                    int64_t batch, int64_t n_pad, T* rows, T* lines, T* columns) {               \
    forward_map<T>(map, o, width, h, w, p, b, batch, n_pad, rows, lines, columns);                                \
  }                                                                                                               \
  RCKA_TARGETS void backward_map_##T(const T* rows, int64_t height, int64_t width, Axis<T> h, Axis<T> w,          \
                                     int64_t p, int64_t b, int64_t batch, T* grad, T* lines, T* columns) {        \
    backward_map<T>(rows, height, width, h, w, p, b, batch, grad, lines, columns);                                \
  }
RCKA_MAP_FUNCTIONS(float)
RCKA_MAP_FUNCTIONS(double)

void forward_map_of(const float* m, float o, int64_t wd, Axis<float> h, Axis<float> w, int64_t p, int64_t b,
                    int64_t batch, int64_t n_pad, float* rows, float* lines, float* columns) {
  forward_map_float(m, o, wd, h, w, p, b, batch, n_pad, rows, lines, columns);
}
void forward_map_of(const double* m, double o, int64_t wd, Axis<double> h, Axis<double> w, int64_t p, int64_t b,
                    int64_t batch, int64_t n_pad, double* rows, double* lines, double* columns) {
  forward_map_double(m, o, wd, h, w, p, b, batch, n_pad, rows, lines, columns);
}
void backward_map_of(const float* rows, int64_t ht, int64_t wd, Axis<float> h, Axis<float> w, int64_t p, int64_t b,
                     int64_t batch, float* grad, float* lines, float* columns) {
  backward_map_float(rows, ht, wd, h, w, p, b, batch, grad, lines, columns);
}
void backward_map_of(const double* rows, int64_t ht, int64_t wd, Axis<double> h, Axis<double> w, int64_t p,
                     int64_t b, int64_t batch, double* grad, double* lines, double* columns) {
  backward_map_double(rows, ht, wd, h, w, p, b, batch, grad, lines, columns);
}

void check_axis(const std::vector<torch::Tensor>& coefficients, int64_t size_in, int64_t p, torch::ScalarType dtype,
                const char* name) {
  TORCH_CHECK(coefficients.size() == 4, name, ": expected 4 coefficient tensors");
  const int64_t size = coefficients[0].size(0);
  TORCH_CHECK(size % p == 0 && size >= size_in, name, ": resized size ", size, " is not a multiple of ", p,
              " at least ", size_in);
  for (int k = 0; k < 4; ++k) {
    const auto& t = coefficients[k];
    TORCH_CHECK(t.dim() == 1 && t.size(0) == size && t.is_contiguous() && t.device().is_cpu(), name,
                ": coefficients must be contiguous CPU vectors of one length");
    TORCH_CHECK(t.scalar_type() == (k < 2 ? torch::kInt64 : dtype), name, ": wrong coefficient dtype");
  }
  for (int k = 0; k < 2; ++k) {  // a few hundred entries: a plain loop, not two torch reductions
    const int64_t* index = coefficients[k].data_ptr<int64_t>();
    for (int64_t i = 0; i < size; ++i)
      TORCH_CHECK(index[i] >= 0 && index[i] < size_in, name, ": source index ", index[i], " is outside the map");
  }
}

}  // namespace

// rows (k, n_pad, B * p * p) <- channels c_start .. c_start + k of feat (B, C, H, W) minus offset (B, C).
void rows_forward(const torch::Tensor& feat, int64_t c_start, const torch::Tensor& offset,
                  const std::vector<torch::Tensor>& along_h, const std::vector<torch::Tensor>& along_w, int64_t p,
                  torch::Tensor rows) {
  TORCH_CHECK(p > 0, "p: the patch size must be positive, got ", p);
  TORCH_CHECK(feat.dim() == 4 && feat.is_contiguous() && feat.device().is_cpu(), "feat: a contiguous CPU (B, C, H, W)");
  const int64_t batch = feat.size(0), channels = feat.size(1), height = feat.size(2), width = feat.size(3);
  const int64_t k = rows.size(0), n_pad = rows.size(1);
  check_axis(along_h, height, p, feat.scalar_type(), "along_h");
  check_axis(along_w, width, p, feat.scalar_type(), "along_w");
  const int64_t n = (along_h[0].size(0) / p) * (along_w[0].size(0) / p);
  TORCH_CHECK(offset.sizes() == torch::IntArrayRef({batch, channels}) && offset.is_contiguous() &&
                  offset.device().is_cpu() && offset.scalar_type() == feat.scalar_type(),
              "offset: a contiguous CPU (B, C) of feat's dtype");
  TORCH_CHECK(rows.dim() == 3 && rows.is_contiguous() && rows.device().is_cpu() &&
                  rows.scalar_type() == feat.scalar_type() && n_pad >= n && rows.size(2) == batch * p * p,
              "rows: a contiguous CPU (k, n_pad >= n, B * p * p) of feat's dtype");
  TORCH_CHECK(c_start >= 0 && c_start + k <= channels, "channels c_start .. c_start + k are outside feat");
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "rows_forward", [&] {
    const Axis<scalar_t> h = axis<scalar_t>(along_h[0], along_h[1], along_h[2], along_h[3]);
    const Axis<scalar_t> w = axis<scalar_t>(along_w[0], along_w[1], along_w[2], along_w[3]);
    const scalar_t* maps = feat.data_ptr<scalar_t>();
    const scalar_t* offsets = offset.data_ptr<scalar_t>();
    scalar_t* out = rows.data_ptr<scalar_t>();
    // Tasks channel-major, as the Gram matmuls split the channels among threads.
    at::parallel_for(0, k * batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> lines(p * width), columns(width * p);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / batch, b = task % batch, map = b * channels + c_start + c;
        forward_map_of(maps + map * height * width, offsets[map], width, h, w, p, b, batch, n_pad,
                       out + c * n_pad * batch * p * p, lines.data(), columns.data());
      }
    });
  });
}

// Channels c_start .. c_start + k of grad_in (B, C, H, W) <- rows_forward's adjoint of grad_rows (k, n, B p p).
void rows_backward(const torch::Tensor& grad_rows, const std::vector<torch::Tensor>& along_h,
                   const std::vector<torch::Tensor>& along_w, int64_t p, torch::Tensor grad_in, int64_t c_start) {
  TORCH_CHECK(p > 0, "p: the patch size must be positive, got ", p);
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.is_contiguous() && grad_in.device().is_cpu(),
              "grad_in: a contiguous CPU (B, C, H, W)");
  const int64_t batch = grad_in.size(0), channels = grad_in.size(1), height = grad_in.size(2), width = grad_in.size(3);
  const int64_t k = grad_rows.size(0);
  check_axis(along_h, height, p, grad_in.scalar_type(), "along_h");
  check_axis(along_w, width, p, grad_in.scalar_type(), "along_w");
  const int64_t n = (along_h[0].size(0) / p) * (along_w[0].size(0) / p);
  TORCH_CHECK(grad_rows.dim() == 3 && grad_rows.is_contiguous() && grad_rows.device().is_cpu() &&
                  grad_rows.scalar_type() == grad_in.scalar_type() && grad_rows.size(1) == n &&
                  grad_rows.size(2) == batch * p * p,
              "grad_rows: a contiguous CPU (k, n, B * p * p) of grad_in's dtype");
  TORCH_CHECK(c_start >= 0 && c_start + k <= channels, "channels c_start .. c_start + k are outside grad_in");
  AT_DISPATCH_FLOATING_TYPES(grad_in.scalar_type(), "rows_backward", [&] {
    const Axis<scalar_t> h = axis<scalar_t>(along_h[0], along_h[1], along_h[2], along_h[3]);
    const Axis<scalar_t> w = axis<scalar_t>(along_w[0], along_w[1], along_w[2], along_w[3]);
    const scalar_t* rows = grad_rows.data_ptr<scalar_t>();
    scalar_t* grads = grad_in.data_ptr<scalar_t>();
    at::parallel_for(0, k * batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> lines(p * width), columns(width * p);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / batch, b = task % batch;
        backward_map_of(rows + c * n * batch * p * p, height, width, h, w, p, b, batch,
                        grads + (b * channels + c_start + c) * height * width, lines.data(), columns.data());
      }
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Milliseconds of work on plain arrays: other Python threads (data loading) may run meanwhile.
  m.def("rows_forward", &rows_forward, "Patch rows of resized maps (see patch_kernels.py)",
        py::call_guard<py::gil_scoped_release>());
  m.def("rows_backward", &rows_backward, "The adjoint of rows_forward", py::call_guard<py::gil_scoped_release>());
}

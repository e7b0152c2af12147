// The decode path's small ops on the CPU, fused (node/engine/models/decode_ops.py): at one
// position a step PyTorch's float32 RMSNorm is five kernels (pow, mean, add, rsqrt, mul),
// 37 us a call on the default model's rows against 3 us for this loop. Sums keep W
// independent lanes so the compiler vectorises them for the CPU at hand (-march=native)
// without reordering any single sum.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int W = 16;  // lanes: a 512-bit vector of floats, two 256-bit ones

// sum over i < n of a[i]^2, in W lanes then added up.
inline float sum_of_squares(const float* a, int64_t n) {
  float lanes[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int j = 0; j < W; ++j) lanes[j] += a[i + j] * a[i + j];
  float s = 0;
  for (int j = 0; j < W; ++j) s += lanes[j];
  for (; i < n; ++i) s += a[i] * a[i];
  return s;
}

// y = x / sqrt(mean(x^2) + eps) * w over each row of x [..., D] (float32, contiguous).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat &&
                  w.scalar_type() == at::kFloat && x.is_contiguous() && w.is_contiguous() &&
                  x.dim() >= 1 && x.size(-1) == w.numel(),
              "rms_norm takes contiguous float32 x [..., D] and w [D] on the CPU");
  const int64_t d = w.numel(), rows = d ? x.numel() / d : 0;
  at::Tensor y = x.new_empty(x.sizes());
  const float *px = x.data_ptr<float>(), *pw = w.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = px + r * d;
      const float scale = 1.0f / std::sqrt(sum_of_squares(a, d) / float(d) + float(eps));
      for (int64_t i = 0; i < d; ++i) py[r * d + i] = a[i] * scale * pw[i];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(ringinfer_decode, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &rms_norm);
}

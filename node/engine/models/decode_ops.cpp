// The decode path's small ops on the CPU, fused (node/engine/models/decode_ops.py): at one
// position a step PyTorch's float32 RMSNorm is five kernels (pow, mean, add, rsqrt, mul),
// 37 us a call on the default model's rows against 3 us for this loop. Sums keep W
// independent lanes so the compiler vectorises them for the CPU at hand (-march=native)
// without reordering any single sum.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

// A quantized linear layer's product as node/engine/models/quantized.py computes it, in one
// call instead of five from Python (reshape, cast, kernel, cut, cast): x's rows in
// bfloat16 into PyTorch's int4 (`group` > 0) or int8 kernel, the output rows cut to
// `out_features` (the int4 kernel takes them padded) and cast back to x's dtype. The same
// ATen calls, so the same numbers; at one position a step the calls cost more than the
// reshapes and casts themselves.
at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& codes,
                            const at::Tensor& scales, int64_t group, int64_t out_features) {
  const at::Tensor rows = x.reshape({-1, x.size(-1)}).to(at::kBFloat16);
  at::Tensor y = group > 0 ? at::_weight_int4pack_mm_for_cpu(rows, codes, group, scales)
                           : at::_weight_int8pack_mm(rows, codes, scales);
  if (y.size(1) != out_features) y = y.narrow(1, 0, out_features);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out_features;
  return y.to(x.scalar_type()).reshape(shape);
}

// RoPE as llama.py's `rotate`, x*cos + roll(x, D/2)*signed_sin over heads [..., D], in one
// pass for float32 x with cos and sin [T, D] broadcast over x's heads (x [B, H, T, D],
// contiguous in T and D). Products and the sum rounded one by one, as PyTorch's three ops
// round them (no fused multiply-add: this file's flags keep the compiler from contracting).
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous() && x.stride(3) == 1 &&
                  (x.stride(2) == x.size(3) || x.size(2) == 1) && cos.size(0) == x.size(2) &&
                  cos.size(1) == x.size(3) && sin.sizes() == cos.sizes() && x.size(3) % 2 == 0,
              "rope takes float32 x [B, H, T, D] and contiguous cos, sin [T, D] on the CPU");
  const int64_t b = x.size(0), h = x.size(1), t = x.size(2), d = x.size(3), half = d / 2;
  at::Tensor y = at::empty({b, h, t, d}, x.options());
  const float *px = x.data_ptr<float>(), *pc = cos.data_ptr<float>(), *ps = sin.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const int64_t sb = x.stride(0), sh = x.stride(1);
  at::parallel_for(0, b * h, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* head = px + (i / h) * sb + (i % h) * sh;
      float* out = py + i * t * d;
      for (int64_t p = 0; p < t; ++p) {
        const float *a = head + p * d, *c = pc + p * d, *s = ps + p * d;
        float* o = out + p * d;
        for (int64_t j = 0; j < d; ++j) {
          const float straight = a[j] * c[j];
          const float turned = a[j < half ? j + half : j - half] * s[j];
          o[j] = straight + turned;
        }
      }
    }
  });
  return y;
}


// What a quantized Linear computes (QuantizedLinear.forward): the product, then its bias.
at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                  int64_t group, int64_t out_features, const c10::optional<at::Tensor>& bias) {
  at::Tensor y = quantized_linear(x, codes, scales, group, out_features);
  return bias.has_value() ? at::add(y, *bias) : y;
}

// cache[0, :, at] = rows[0, :, row] for float32 heads [1, H, *, D] (D contiguous): a
// copy of H rows of D floats, without a copy_'s dispatch (~4 us) for each cache and layer.
void write_position(const at::Tensor& cache, int64_t at, const at::Tensor& rows, int64_t row) {
  TORCH_CHECK(cache.device().is_cpu() && rows.device().is_cpu() &&
                  cache.scalar_type() == at::kFloat && rows.scalar_type() == at::kFloat &&
                  cache.dim() == 4 && rows.dim() == 4 && cache.size(0) == 1 &&
                  cache.size(1) == rows.size(1) && cache.size(3) == rows.size(3) &&
                  cache.stride(3) == 1 && rows.stride(3) == 1 && at >= 0 &&
                  at < cache.size(2) && row >= 0 && row < rows.size(2),
              "write_position takes float32 heads [1, H, *, D] and positions within them");
  const int64_t heads = cache.size(1), d = cache.size(3);
  float* dst = cache.data_ptr<float>() + at * cache.stride(2);
  const float* src = rows.data_ptr<float>() + row * rows.stride(2);
  for (int64_t h = 0; h < heads; ++h)
    std::memcpy(dst + h * cache.stride(1), src + h * rows.stride(1), d * sizeof(float));
}

// One dense Llama-family layer (llama.py's Block) at one new position for each of B requests,
// in one call: x [1, B, D] float32, request i's position positions[i], its keys and values
// [1, Hkv, capacity, hd] (its cache's buffers for this layer), written there in place. The
// same ATen calls and fused ops, on the same views, as the Python path makes: so the same
// numbers, without ~25 calls' worth of Python a layer (a third of a small model's decode
// step). Projections in order qkv, o, gate_up, down; q_norm and k_norm for Qwen3.
at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& attn_norm,
                        const at::Tensor& mlp_norm, double eps, at::TensorList codes,
                        at::TensorList scales, at::IntArrayRef groups, at::IntArrayRef outs,
                        const c10::List<c10::optional<at::Tensor>>& biases,
                        const c10::optional<at::Tensor>& q_norm,
                        const c10::optional<at::Tensor>& k_norm, int64_t n_heads,
                        int64_t n_kv_heads, const at::Tensor& cos, const at::Tensor& sin,
                        at::TensorList keys, at::TensorList values, at::IntArrayRef positions) {
  const int64_t b = x.size(1), parts = positions.size();
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1 && b == parts && codes.size() == 4 &&
                  scales.size() == 4 && groups.size() == 4 && outs.size() == 4 &&
                  biases.size() == 4 && keys.size() == size_t(parts) &&
                  values.size() == size_t(parts),
              "decode_layer takes x [1, B, D], four projections and B caches' buffers");
  auto project = [&](const at::Tensor& in, int i) {
    return linear(in, codes[i], scales[i], groups[i], outs[i], biases.get(i));
  };
  const int64_t hd = cos.size(1), qk_heads = n_heads + n_kv_heads;
  at::Tensor heads =
      project(rms_norm(x, attn_norm, eps), 0).view({1, b, -1, hd}).transpose(1, 2);
  at::Tensor qk = heads.narrow(1, 0, qk_heads);
  if (q_norm.has_value()) {
    qk = at::cat({rms_norm(qk.narrow(1, 0, n_heads).contiguous(), *q_norm, eps),
                  rms_norm(qk.narrow(1, n_heads, n_kv_heads).contiguous(), *k_norm, eps)},
                 1);
  }
  qk = rope(qk.contiguous(), cos, sin);
  const at::Tensor q = qk.narrow(1, 0, n_heads), k = qk.narrow(1, n_heads, n_kv_heads);
  const at::Tensor v = heads.narrow(1, qk_heads, n_kv_heads);
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < parts; ++i) {  // Step.attend: each request over its own cache
    const int64_t p = positions[i];
    write_position(keys[i], p, k, i);
    write_position(values[i], p, v, i);
    out.push_back(at::scaled_dot_product_attention(
        q.narrow(2, i, 1), keys[i].narrow(2, 0, p + 1), values[i].narrow(2, 0, p + 1),
        c10::nullopt, 0.0, false, c10::nullopt, true));
  }
  at::Tensor attended = parts == 1 ? out[0] : at::cat(out, 2);
  at::Tensor h = at::add(x, project(attended.transpose(1, 2).reshape({1, b, -1}), 1));
  std::vector<at::Tensor> gate_up = project(rms_norm(h, mlp_norm, eps), 2).chunk(2, -1);
  return at::add(h, project(at::mul(at::silu(gate_up[0]), gate_up[1]), 3));
}
}  // namespace

TORCH_LIBRARY(ringinfer_decode, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &rms_norm);
  m.def("quantized_linear(Tensor x, Tensor codes, Tensor scales, int group, int out_features)"
        " -> Tensor", &quantized_linear);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", &rope);
  m.def("decode_layer(Tensor x, Tensor attn_norm, Tensor mlp_norm, float eps, Tensor[] codes,"
        " Tensor[] scales, int[] groups, int[] outs, Tensor?[] biases, Tensor? q_norm,"
        " Tensor? k_norm, int n_heads, int n_kv_heads, Tensor cos, Tensor sin, Tensor[] keys,"
        " Tensor[] values, int[] positions) -> Tensor", &decode_layer);
}

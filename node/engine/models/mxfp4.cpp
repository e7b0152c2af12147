// MXFP4 matmul on the CPU straight from the codes (node/engine/models/mxfp4.py): y = x W^T + b
// without ever materialising W. Each 32-input block's 16 possible values (llama.cpp's
// kvalues times the block's scale 2^(e-128)) fill one table, and every weight is a lookup in
// it: exactly the float Mxfp4Tensor.dequantize gives, so only the order of summation differs
// from the reference. Compiled at first use for the running CPU (-march=native): AVX-512,
// AVX2 with FMA, or plain loops the compiler vectorises, whichever the target has.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr int BLOCK = 32;
alignas(64) constexpr float KVALUES[16] = {0, 1, 2, 3, 4, 6, 8, 12,
                                           0, -1, -2, -3, -4, -6, -8, -12};

// 2^(e-128) exactly for every e, subnormal below e = 2 (llama.cpp's GGML_E8M0_TO_FP32_HALF).
struct Scales {
  float of[256];
  Scales() {
    for (uint32_t e = 0; e < 256; ++e) {
      const uint32_t bits = e < 2 ? 0x00200000u << e : (e - 1) << 23;
      std::memcpy(&of[e], &bits, sizeof(float));
    }
  }
};
const Scales SCALES;
inline float scale_of(uint8_t e) { return SCALES.of[e]; }

#if defined(__AVX512F__)
constexpr const char* ISA = "avx512";
constexpr int W = 16;    // floats a vector
constexpr int ACCS = 16; // accumulators a tile keeps in registers (of 32)
using Vec = __m512;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Vec a) { _mm512_storeu_ps(p, a); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum(Vec a) { return _mm512_reduce_add_ps(a); }
// A block's 32 weights: the 16-entry table permuted by each nibble (the permute reads a
// lane's low 4 bits only, so the low nibbles need no mask).
inline void decode(const uint8_t* q, uint8_t e, Vec* w) {
  const Vec table = _mm512_mul_ps(_mm512_load_ps(KVALUES), _mm512_set1_ps(scale_of(e)));
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  w[0] = _mm512_permutexvar_ps(bytes, table);                         // inputs 0..15
  w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);  // inputs 16..31
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* ISA = "avx2";
constexpr int W = 8;
constexpr int ACCS = 8;  // of 16 registers
using Vec = __m256;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Vec a) { _mm256_storeu_ps(p, a); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float sum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
// The permute reads a lane's low 3 bits: the table's first 8 entries give the magnitude.
// The sign is the nibble's top bit, moved to bit 31 by a shift that also puts its low 3 bits
// in 28..30; the table holds its entries with those bits flipped beforehand, so one xor
// restores the magnitude and applies the sign (code 8, e2m1's -0, gives -0.0: a zero).
inline void decode(const uint8_t* q, uint8_t e, Vec* w) {
  const __m256i flips = _mm256_slli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), 28);
  const Vec table = _mm256_xor_ps(
      _mm256_mul_ps(_mm256_load_ps(KVALUES), _mm256_set1_ps(scale_of(e))),
      _mm256_castsi256_ps(flips));
  for (int half = 0; half < 2; ++half) {  // bytes 0..7, 8..15
    const __m256i bytes =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * half)));
    for (int high = 0; high < 2; ++high) {  // low nibbles: inputs 0..15; high: 16..31
      const __m256i nibble = high ? _mm256_srli_epi32(bytes, 4) : bytes;
      w[2 * high + half] = _mm256_xor_ps(_mm256_permutevar8x32_ps(table, nibble),
                                         _mm256_castsi256_ps(_mm256_slli_epi32(nibble, 28)));
    }
  }
}
#else
constexpr const char* ISA = "generic";
constexpr int W = 8;  // lanes the compiler may vectorise (NEON, SSE)
constexpr int ACCS = 8;
struct Vec {
  float v[W];
};
inline Vec zero() { return Vec{}; }
inline Vec load(const float* p) {
  Vec a;
  std::memcpy(a.v, p, sizeof a.v);
  return a;
}
inline void store(float* p, Vec a) { std::memcpy(p, a.v, sizeof a.v); }
inline Vec fma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline float sum(Vec a) {
  float s = 0;
  for (float f : a.v) s += f;
  return s;
}
inline void decode(const uint8_t* q, uint8_t e, Vec* w) {
  const float s = scale_of(e);
  for (int i = 0; i < 16; ++i) {
    w[i / W].v[i % W] = KVALUES[q[i] & 15] * s;
    w[(16 + i) / W].v[i % W] = KVALUES[q[i] >> 4] * s;
  }
}
#endif

constexpr int VECS = BLOCK / W;  // vectors a block
constexpr int MAX_MR = 4;        // input rows a tile takes (8 x 2 tiles were 30% slower)
constexpr int64_t ROW_CHUNK = 64; // output rows whose codes stay in cache across x's tiles

struct Problem {
  const float* x;  // [M, K]
  const uint8_t* codes;  // [N, K/32, 16]
  const uint8_t* exponents;  // [N, K/32]
  const float* bias;  // [N] or null
  float* y;  // [M, N]
  int64_t m, n, k;
};

// NR output rows times MR input rows from m0: each block is decoded once for the MR rows,
// each x vector loaded once for the NR rows, NR * MR independent sums in registers.
template <int NR, int MR>
void tile(const Problem& p, int64_t m0, int64_t n0) {
  const int64_t blocks = p.k / BLOCK;
  const float* x = p.x + m0 * p.k;
  Vec acc[NR][MR];
  for (auto& row : acc)
    for (auto& a : row) a = zero();
  for (int64_t b = 0; b < blocks; ++b) {
    Vec w[NR][VECS];
    for (int i = 0; i < NR; ++i) {
      const int64_t at = (n0 + i) * blocks + b;
      decode(p.codes + at * (BLOCK / 2), p.exponents[at], w[i]);
    }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < VECS; ++j) {
        const Vec xv = load(x + m * p.k + b * BLOCK + j * W);
        for (int i = 0; i < NR; ++i) acc[i][m] = fma(w[i][j], xv, acc[i][m]);
      }
  }
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MR; ++m)
      p.y[(m0 + m) * p.n + n0 + i] = sum(acc[i][m]) + (p.bias ? p.bias[n0 + i] : 0.0f);
}

template <int MR>
void rows(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NR = std::max(1, std::min(4, ACCS / MR));
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile<NR, MR>(p, m0, n);
  for (; n < n1; ++n) tile<1, MR>(p, m0, n);
}

using Rows = void (*)(const Problem&, int64_t, int64_t, int64_t);
constexpr Rows ROWS[MAX_MR] = {rows<1>, rows<2>, rows<3>, rows<4>};

void check(const at::Tensor& codes, const at::Tensor& exponents) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 3 &&
                  codes.size(2) == BLOCK / 2 && codes.is_contiguous(),
              "MXFP4 codes must be contiguous CPU uint8 [N, K/32, 16]");
  TORCH_CHECK(exponents.scalar_type() == at::kByte && exponents.is_contiguous() &&
                  exponents.sizes() == codes.sizes().slice(0, 2),
              "MXFP4 exponents must be contiguous uint8 [N, K/32]");
}

// y = x W^T + b for x [M, K] (any float dtype; computed in float32, returned in x's).
at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& exponents,
                  const std::optional<at::Tensor>& bias) {
  check(codes, exponents);
  const int64_t n = codes.size(0), k = codes.size(1) * BLOCK;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [M, ", k, "]");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || b.numel() == n, "bias must have ", n, " values");
  at::Tensor y = xf.new_empty({x.size(0), n});
  const Problem p{xf.data_ptr<float>(), codes.data_ptr<uint8_t>(), exponents.data_ptr<uint8_t>(),
                  b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(),
                  x.size(0), n, k};
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t c = n0; c < n1; c += ROW_CHUNK)
      for (int64_t m0 = 0; m0 < p.m; m0 += MAX_MR)
        ROWS[std::min<int64_t>(MAX_MR, p.m - m0) - 1](p, m0, c, std::min(c + ROW_CHUNK, n1));
  });
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

// A block's weights as float32, or as bfloat16: the top half of each float, which is exact
// (a weight has at most 4 significant bits, so the bottom half is zero).
template <typename T>
void store_block(const uint8_t* q, uint8_t e, T* out) {
  Vec v[VECS];
  decode(q, e, v);
  if constexpr (std::is_same_v<T, float>) {
    for (int j = 0; j < VECS; ++j) store(out + j * W, v[j]);
  } else {
    alignas(64) float f[BLOCK];
    for (int j = 0; j < VECS; ++j) store(f + j * W, v[j]);
    uint32_t bits[BLOCK];
    std::memcpy(bits, f, sizeof bits);
    for (int i = 0; i < BLOCK; ++i) out[i] = uint16_t(bits[i] >> 16);
  }
}

// The weights of codes [N, K/32, 16] into out, float32 or bfloat16 [N, K]: tiles for a GEMM.
void dequantize(const at::Tensor& codes, const at::Tensor& exponents, at::Tensor out) {
  check(codes, exponents);
  const int64_t n = codes.size(0), blocks = codes.size(1);
  TORCH_CHECK((out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) &&
                  out.is_contiguous() && out.dim() == 2 && out.size(0) == n &&
                  out.size(1) == blocks * BLOCK,
              "out must be contiguous float32 or bfloat16 [", n, ", ", blocks * BLOCK, "]");
  const uint8_t* q = codes.data_ptr<uint8_t>();
  const uint8_t* e = exponents.data_ptr<uint8_t>();
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  at::parallel_for(0, n * blocks, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (bf16)
        store_block(q + b * (BLOCK / 2), e[b],
                    reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + b * BLOCK);
      else
        store_block(q + b * (BLOCK / 2), e[b], out.data_ptr<float>() + b * BLOCK);
    }
  });
}

std::string isa() { return ISA; }

}  // namespace

TORCH_LIBRARY(ringinfer_mxfp4, m) {
  m.def("linear(Tensor x, Tensor codes, Tensor exponents, Tensor? bias) -> Tensor", &linear);
  m.def("dequantize(Tensor codes, Tensor exponents, Tensor(a!) out) -> ()", &dequantize);
  m.def("isa() -> str", &isa);
}

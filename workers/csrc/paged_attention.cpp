// Decode attention that reads K/V where they lie in the paged pool, through each sequence's block
// table. The pool is [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]: one block holds
// every layer's K and V, so one block is one contiguous transfer descriptor (workers/pool.py).
//
// Per (sequence, kv head): scores of the group's query heads against every context token, a
// softmax, then the weighted sum of V. Three passes over a score buffer keep the inner loops
// simple enough for the compiler to vectorize; each K and V row is read exactly once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <type_traits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <vector>

namespace {

#ifdef __AVX512F__
// e^x for x <= 0: 2^(x log2 e) split into 2^n * 2^f, 2^f by its Taylor polynomial on [-0.5, 0.5]
// (relative error ~2e-7, float's own), 2^n by scalef. glibc's vector expf needs -ffast-math.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

inline void softmax_rows(float* scores, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * n;
    float mx = std::numeric_limits<float>::lowest(), sum = 0.f;
    for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t]);
    int64_t t = 0;
#ifdef __AVX512F__
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512 vsum = _mm512_setzero_ps();
    for (; t + 16 <= n; t += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), vmx));
      _mm512_storeu_ps(s + t, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    sum = _mm512_reduce_add_ps(vsum);
#endif
    for (; t < n; ++t) sum += (s[t] = std::exp(s[t] - mx));
    const float inv = 1.f / sum;
    for (t = 0; t < n; ++t) s[t] *= inv;
  }
}

// One (sequence, kv head): the group's queries against the sequence's context, read block by
// block where it lies. `dot` and `axpy` are the only per-token work; the AVX-512 specialization
// below keeps the group's queries and accumulators in registers.
template <typename T>
struct HeadTask {
  const float* q;         // [group, dim], already scaled
  const T* kv;            // the pool
  const int64_t* table;   // this sequence's blocks
  int64_t ctx, block_size, block_stride, k_offset, v_offset, token_stride, group, dim;
  float* scores;          // [group, ctx]
  float* out;             // [group, dim]
};

template <typename T>
void attend_generic(const HeadTask<T>& w) {
  const int64_t ctx = w.ctx, dim = w.dim, group = w.group;
  for (int64_t blk = 0, t = 0; t < ctx; ++blk) {  // pass 1: scores
    const T* k = w.kv + w.table[blk] * w.block_stride + w.k_offset;
    for (int64_t o = 0; o < w.block_size && t < ctx; ++o, ++t, k += w.token_stride)
      for (int64_t g = 0; g < group; ++g) {
        float sum = 0.f;
        for (int64_t d = 0; d < dim; ++d) sum += w.q[g * dim + d] * static_cast<float>(k[d]);
        w.scores[g * ctx + t] = sum;
      }
  }
  softmax_rows(w.scores, group, ctx);
  std::fill(w.out, w.out + group * dim, 0.f);
  for (int64_t blk = 0, t = 0; t < ctx; ++blk) {  // pass 3: weighted sum of V
    const T* v = w.kv + w.table[blk] * w.block_stride + w.v_offset;
    for (int64_t o = 0; o < w.block_size && t < ctx; ++o, ++t, v += w.token_stride)
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d) w.out[g * dim + d] += w.scores[g * ctx + t] * static_cast<float>(v[d]);
  }
}

#ifdef __AVX512F__
// fp32, dim = 16 * CH, group = G: per token, CH loads of K, G*CH FMAs and G horizontal sums;
// per token of V, CH loads and G*CH FMAs into register accumulators.
template <int CH, int G>
void attend_avx512(const HeadTask<float>& w) {
  const int64_t ctx = w.ctx;
  __m512 q[G][CH];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CH; ++c) q[g][c] = _mm512_loadu_ps(w.q + g * 16 * CH + 16 * c);
  for (int64_t blk = 0, t = 0; t < ctx; ++blk) {
    const float* k = w.kv + w.table[blk] * w.block_stride + w.k_offset;
    for (int64_t o = 0; o < w.block_size && t < ctx; ++o, ++t, k += w.token_stride) {
      __m512 kr[CH];
      for (int c = 0; c < CH; ++c) kr[c] = _mm512_loadu_ps(k + 16 * c);
      for (int g = 0; g < G; ++g) {
        __m512 acc = _mm512_mul_ps(q[g][0], kr[0]);
        for (int c = 1; c < CH; ++c) acc = _mm512_fmadd_ps(q[g][c], kr[c], acc);
        w.scores[g * ctx + t] = _mm512_reduce_add_ps(acc);
      }
    }
  }
  softmax_rows(w.scores, G, ctx);
  __m512 acc[G][CH];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CH; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t blk = 0, t = 0; t < ctx; ++blk) {
    const float* v = w.kv + w.table[blk] * w.block_stride + w.v_offset;
    for (int64_t o = 0; o < w.block_size && t < ctx; ++o, ++t, v += w.token_stride) {
      __m512 vr[CH];
      for (int c = 0; c < CH; ++c) vr[c] = _mm512_loadu_ps(v + 16 * c);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(w.scores[g * ctx + t]);
        for (int c = 0; c < CH; ++c) acc[g][c] = _mm512_fmadd_ps(p, vr[c], acc[g][c]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CH; ++c) _mm512_storeu_ps(w.out + g * 16 * CH + 16 * c, acc[g][c]);
}

template <int CH>
bool attend_fast_group(const HeadTask<float>& w) {
  switch (w.group) {
    case 1: attend_avx512<CH, 1>(w); return true;
    case 2: attend_avx512<CH, 2>(w); return true;
    case 3: attend_avx512<CH, 3>(w); return true;
    case 4: attend_avx512<CH, 4>(w); return true;
    case 5: attend_avx512<CH, 5>(w); return true;
    case 6: attend_avx512<CH, 6>(w); return true;
    case 7: attend_avx512<CH, 7>(w); return true;
    case 8: attend_avx512<CH, 8>(w); return true;
    default: return false;
  }
}
#endif

template <typename T>
void attend(const HeadTask<T>& w) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    if (w.dim == 64 && attend_fast_group<4>(w)) return;
    if (w.dim == 128 && attend_fast_group<8>(w)) return;
  }
#endif
  attend_generic(w);
}

template <typename T>
void decode_kernel(const T* q, const T* kv, const int64_t* tables, const int64_t* ctx_lens, T* out, int64_t batch,
                   int64_t max_blocks, int64_t num_layers, int64_t layer, int64_t block_size, int64_t q_heads,
                   int64_t kv_heads, int64_t dim, float scale) {
  const int64_t group = q_heads / kv_heads;
  const int64_t token_stride = kv_heads * dim;            // next token in a block
  const int64_t half_stride = block_size * token_stride;  // K -> V of the same layer
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, h = item % kv_heads;
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
          qf[g * dim + d] = static_cast<float>(q[(b * q_heads + h * group + g) * dim + d]) * scale;
      scores.resize(group * ctx_lens[b]);
      const int64_t k_offset = layer * 2 * half_stride + h * dim;
      attend(HeadTask<T>{qf.data(), kv, tables + b * max_blocks, ctx_lens[b], block_size, num_layers * 2 * half_stride,
                         k_offset, k_offset + half_stride, token_stride, group, dim, scores.data(), acc.data()});
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
          out[(b * q_heads + h * group + g) * dim + d] = static_cast<T>(acc[g * dim + d]);
    }
  });
}

}  // namespace

// q: [batch, q_heads, dim]; kv: the whole pool; block_tables: [batch, max_blocks] int64;
// context_lens: [batch] int64 (tokens to attend to, the new one included). Returns [batch, q_heads, dim].
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor kv, int64_t layer, at::Tensor block_tables,
                                     at::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 6, "q must be [batch, heads, dim] and kv the 6-d pool");
  TORCH_CHECK(q.is_contiguous() && kv.is_contiguous(), "q and kv must be contiguous");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type(), "q and kv must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "tables and lengths are int64");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = at::empty_like(q);
  const int64_t batch = q.size(0), q_heads = q.size(1), dim = q.size(2);
  const int64_t num_layers = kv.size(1), block_size = kv.size(3), kv_heads = kv.size(4);
  TORCH_CHECK(kv.size(5) == dim && q_heads % kv_heads == 0, "head shapes do not match the pool");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(), tables.data_ptr<int64_t>(),
                            lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), batch, tables.size(1), num_layers,
                            layer, block_size, q_heads, kv_heads, dim, static_cast<float>(scale));
  });
  return out;
}

TORCH_LIBRARY(agentkv, m) {
  m.def("paged_decode_attention(Tensor q, Tensor kv, int layer, Tensor block_tables, Tensor context_lens, float scale) -> Tensor");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, TORCH_FN(paged_decode_attention));
}

// blade::flash_attention's fused CPU kernel for bf16 on AVX512-BF16: scores, softmax and output per tile of queries,
// never leaving the core's cache. Built and loaded by attention_native.py (plain g++, C ABI, OpenMP shared with torch).
//
// Per (batch, query head, tile of TILE_ROWS queries), one OpenMP task:
//   S = scale·Q·Kᵀ (+ mask)                   vdpbf16ps: bf16 pairs, fp32 accumulation; only the keys the tile's last
//                                           row may see under causal (top-left aligned, query i sees keys 0..i)
//   P = softmax(S) per row in fp32, rounded to bf16 (as PyTorch's bf16 softmax output)
//   O = P·V                                  vdpbf16ps again, fp32 accumulation, rounded to bf16 into [B, Sq, Hq, Dv]
// K and V are first repacked once per key head into the pair layouts vdpbf16ps reads (K: [D/2][keys] pairs of
// dimensions, V: [keys/2][Dv'] pairs of keys, Dv' = Dv rounded up to 16 with zero columns, so that a value dim off a
// multiple of 16 (MobileViT's 36 and 60) runs the same 16-wide steps and stores only its own lanes), into a buffer of
// the calling thread. The mask (additive fp32, or bool) is
// read in place with its broadcast strides. A row with no key left (every key it may see is masked: -inf or False)
// gives zeros, decided from the mask and the triangle alone, as the op's spec says.
#include <immintrin.h>

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

namespace {

using bf16 = uint16_t;
constexpr int TILE_ROWS = 32;
constexpr int KEY_ALIGN = 32;  // keys are padded to this (the score kernel's widest step)
constexpr float NEG_INF = -__builtin_inff();

inline int32_t load_pair(const bf16* p) {
  int32_t x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// e^x for x <= 0 (and -inf -> 0, NaN -> NaN): 2^(x·log2 e) as 2^n · p(f), p a degree-6 Taylor polynomial of 2^f on
// |f| <= 1/2 (relative error about 2e-7, below bf16's rounding by far).
inline __m512 exp_nonpositive(__m512 x) {
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  // below 2^-100 the result is taken as 0 (far under bf16's rounding; and neither it nor its share of the row's sum
  // is a denormal, which some CPUs assist slowly); NaN stays NaN
  const __mmask16 normal = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-100.0f), _CMP_NLT_UQ);
  t = _mm512_max_ps(_mm512_set1_ps(-100.0f), t);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));  // f·ln 2
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n));
}

inline __mmask16 lanes_below(int64_t n) {
  return n <= 0 ? 0 : n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1u);
}

// S[r][j0 .. j0 + 16·NV) = scale · q_r · k_j for R query rows; kpairs points at key j0 of dimension pair 0.
template <int R, int NV>
inline void score_block(const bf16* const* q_rows, const int32_t* kpairs, int64_t key_stride, int64_t dim_pairs,
                        float* const* s_rows, int64_t j0, float scale) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t p = 0; p < dim_pairs; ++p) {
    __m512i keys[NV];
    for (int n = 0; n < NV; ++n) keys[n] = _mm512_loadu_si512(kpairs + p * key_stride + 16 * n);
    for (int r = 0; r < R; ++r) {
      const __m512i qp = _mm512_set1_epi32(load_pair(q_rows[r] + 2 * p));
      for (int n = 0; n < NV; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], (__m512bh)qp, (__m512bh)keys[n]);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NV; ++n) _mm512_storeu_ps(s_rows[r] + j0 + 16 * n, _mm512_mul_ps(acc[r][n], s));
}

template <int R>
void score_rows(const bf16* const* q_rows, const int32_t* kpairs, int64_t key_stride, int64_t dim_pairs,
                float* const* s_rows, int64_t keys, float scale) {
  int64_t j = 0;
  for (; j + 32 <= keys; j += 32) score_block<R, 2>(q_rows, kpairs + j, key_stride, dim_pairs, s_rows, j, scale);
  for (; j < keys; j += 16) score_block<R, 1>(q_rows, kpairs + j, key_stride, dim_pairs, s_rows, j, scale);
}

// O[r][e0 .. e0 + 16·NV) = Σ_j P[r][j] · V[j][e] over key pairs [0, key_pairs); written as bf16 (zeros for dead rows),
// only the columns below v_dim (V's packed rows are v_pad wide).
template <int R, int NV>
inline void output_block(const bf16* const* p_rows, const int32_t* vpairs, int64_t v_pad, int64_t v_dim,
                         int64_t key_pairs, bf16* const* o_rows, const bool* dead, int64_t e0) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t jp = 0; jp < key_pairs; ++jp) {
    __m512i vals[NV];
    for (int n = 0; n < NV; ++n) vals[n] = _mm512_loadu_si512(vpairs + jp * v_pad + e0 + 16 * n);
    for (int r = 0; r < R; ++r) {
      const __m512i pp = _mm512_set1_epi32(load_pair(p_rows[r] + 2 * jp));
      for (int n = 0; n < NV; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], (__m512bh)pp, (__m512bh)vals[n]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NV; ++n) {
      const __m512 o = dead[r] ? _mm512_setzero_ps() : acc[r][n];
      _mm256_mask_storeu_epi16(o_rows[r] + e0 + 16 * n, lanes_below(v_dim - e0 - 16 * n), to_bf16(o));
    }
}

template <int R>
void output_rows(const bf16* const* p_rows, const int32_t* vpairs, int64_t v_pad, int64_t v_dim, int64_t key_pairs,
                 bf16* const* o_rows, const bool* dead) {
  int64_t e = 0;
  for (; e + 64 <= v_pad; e += 64) output_block<R, 4>(p_rows, vpairs, v_pad, v_dim, key_pairs, o_rows, dead, e);
  for (; e < v_pad; e += 16) output_block<R, 1>(p_rows, vpairs, v_pad, v_dim, key_pairs, o_rows, dead, e);
}

// Row groups of up to 8 (scores) and 4 (outputs): the accumulators fill the 32 zmm registers without spilling.
void scores(const bf16* const* q_rows, int rows, const int32_t* kpairs, int64_t key_stride, int64_t dim_pairs,
            float* const* s_rows, int64_t keys, float scale) {
  int r = 0;
  for (; r + 8 <= rows; r += 8) score_rows<8>(q_rows + r, kpairs, key_stride, dim_pairs, s_rows + r, keys, scale);
  for (; r + 4 <= rows; r += 4) score_rows<4>(q_rows + r, kpairs, key_stride, dim_pairs, s_rows + r, keys, scale);
  for (; r < rows; ++r) score_rows<1>(q_rows + r, kpairs, key_stride, dim_pairs, s_rows + r, keys, scale);
}

void outputs(const bf16* const* p_rows, int rows, const int32_t* vpairs, int64_t v_pad, int64_t v_dim,
             int64_t key_pairs, bf16* const* o_rows, const bool* dead) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) output_rows<4>(p_rows + r, vpairs, v_pad, v_dim, key_pairs, o_rows + r, dead + r);
  for (; r < rows; ++r) output_rows<1>(p_rows + r, vpairs, v_pad, v_dim, key_pairs, o_rows + r, dead + r);
}

enum MaskKind { NO_MASK = 0, ADDITIVE = 1, BOOLEAN = 2 };

// One row: the mask and the row's key limit applied to S, softmax, P (bf16) written up to padded_keys (zeros past
// the limit). A row the mask leaves no key it may see is dead: P zeros, and true is returned; that is decided from the
// mask alone, so a NaN or inf score behind the mask never makes a dead row NaN.
bool softmax_row(float* s, bf16* p, int64_t limit, int64_t padded_keys, MaskKind kind, const void* mask_row) {
  const __m512 neg_inf = _mm512_set1_ps(NEG_INF);
  __m512 top = neg_inf;
  __mmask16 open = 0;
  for (int64_t j = 0; j < limit; j += 16) {
    const __mmask16 m = lanes_below(limit - j);
    __m512 x = _mm512_maskz_loadu_ps(m, s + j);
    __mmask16 keep = m;
    if (kind == ADDITIVE) {
      const __m512 b = _mm512_maskz_loadu_ps(m, static_cast<const float*>(mask_row) + j);
      keep = m & ~_mm512_cmp_ps_mask(b, neg_inf, _CMP_EQ_OQ);
      x = _mm512_add_ps(x, b);
    } else if (kind == BOOLEAN) {
      const __m128i allowed = _mm_maskz_loadu_epi8(m, static_cast<const uint8_t*>(mask_row) + j);
      keep = m & _mm_test_epi8_mask(allowed, allowed);
    }
    open |= keep;
    x = _mm512_mask_blend_ps(keep, neg_inf, x);  // masked keys are -inf whatever their score is
    _mm512_mask_storeu_ps(s + j, m, x);
    top = _mm512_max_ps(top, x);
  }
  if (open == 0) {
    std::memset(p, 0, padded_keys * sizeof(bf16));
    return true;
  }
  const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < limit; j += 16) {
    const __mmask16 m = lanes_below(limit - j);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), row_max));
    _mm512_mask_storeu_ps(s + j, m, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  int64_t j = 0;
  for (; j < limit; j += 16) {
    const __mmask16 m = lanes_below(limit - j);
    const __m512 probs = _mm512_maskz_mov_ps(m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), inverse));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), to_bf16(probs));  // zeros past the limit
  }
  for (; j < padded_keys; j += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), _mm256_setzero_si256());
  return false;
}

// K [keys, D] (row stride k_row) as int32 pairs [D/2][padded_keys]; V [keys, Dv] as int32 pairs [padded/2][v_pad],
// zeros past the keys and past Dv.
void pack_head(const bf16* k, int64_t k_row, const bf16* v, int64_t v_row, int64_t keys, int64_t padded_keys,
               int64_t dim, int64_t v_dim, int64_t v_pad, int32_t* kpairs, int32_t* vpairs) {
  const int64_t dim_pairs = dim / 2;
  for (int64_t j = 0; j < padded_keys; ++j)
    for (int64_t p = 0; p < dim_pairs; ++p)
      kpairs[p * padded_keys + j] = j < keys ? load_pair(k + j * k_row + 2 * p) : 0;
  bf16* out = reinterpret_cast<bf16*>(vpairs);
  for (int64_t jp = 0; jp < padded_keys / 2; ++jp)
    for (int64_t e = 0; e < v_pad; ++e) {
      const int64_t j = 2 * jp;
      out[2 * (jp * v_pad + e)] = j < keys && e < v_dim ? v[j * v_row + e] : 0;
      out[2 * (jp * v_pad + e) + 1] = j + 1 < keys && e < v_dim ? v[(j + 1) * v_row + e] : 0;
    }
}

}  // namespace

extern "C" {

// out: [B, Sq, Hq, Dv] contiguous. Strides are in elements; the last dimension of q, k, v and the mask must be
// contiguous. mask: null, fp32 additive (mask_kind 1) or bool as bytes (2, nonzero keeps the key), broadcast to
// [B, Hq, Sq, keys] by its strides (0 where it broadcasts). Returns 0, or 1 for arguments this kernel does not take
// (odd D, no value dim, no keys, query heads not a multiple of key heads, an unknown mask kind), or 2 when
// its buffers cannot be allocated. num_threads: the OpenMP team (torch's intra-op count; 0: OpenMP's default).
int blade_attention_bf16(const bf16* q, int64_t q_sb, int64_t q_sh, int64_t q_ss,
                         const bf16* k, int64_t k_sb, int64_t k_sh, int64_t k_ss,
                         const bf16* v, int64_t v_sb, int64_t v_sh, int64_t v_ss,
                         const void* mask, int mask_kind, int64_t m_sb, int64_t m_sh, int64_t m_sq, bf16* out,
                         int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t q_len, int64_t keys, int64_t dim,
                         int64_t v_dim, float scale, int causal, int num_threads) {
  if (dim < 2 || dim % 2 != 0 || v_dim < 1 || keys < 1 || kv_heads < 1 || q_heads % kv_heads != 0) return 1;
  if (mask_kind < NO_MASK || mask_kind > BOOLEAN || (mask == nullptr) != (mask_kind == NO_MASK)) return 1;
  const MaskKind kind = static_cast<MaskKind>(mask_kind);
  const int64_t mask_item = kind == ADDITIVE ? sizeof(float) : 1;
  const int64_t padded = (keys + KEY_ALIGN - 1) / KEY_ALIGN * KEY_ALIGN;
  const int64_t v_pad = (v_dim + 15) / 16 * 16;
  const int64_t head_elems = padded * (dim + v_pad) / 2, group = q_heads / kv_heads;
  const int64_t tiles = (q_len + TILE_ROWS - 1) / TILE_ROWS, units = batch * q_heads * tiles;
  // Buffers of the calling thread (concurrent calls never share them), kept across calls (no page faults on fresh
  // memory each call) unless huge; allocated here, outside the parallel region, where a failure can be reported.
  static thread_local std::vector<int32_t> packed;
  static thread_local std::vector<float> scores_buf;
  static thread_local std::vector<bf16> probs_buf;
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const size_t strip = static_cast<size_t>(TILE_ROWS) * padded;
  try {  // each sized on its own: a failure part-way leaves no buffer smaller than the next call believes
    const size_t packed_elems = static_cast<size_t>(batch * kv_heads * head_elems);
    if (packed.size() < packed_elems) packed.resize(packed_elems);
    if (scores_buf.size() < strip * threads) scores_buf.resize(strip * threads);
    if (probs_buf.size() < strip * threads) probs_buf.resize(strip * threads);
  } catch (const std::exception&) {
    return 2;
  }
  // the region's threads see their own thread_local objects: they get the caller's buffers as plain pointers
  int32_t* const scratch = packed.data();
  float* const scores_base = scores_buf.data();
  bf16* const probs_base = probs_buf.data();
#pragma omp parallel num_threads(threads)
  {
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < kv_heads; ++h) {
        int32_t* kp = scratch + (b * kv_heads + h) * head_elems;
        pack_head(k + b * k_sb + h * k_sh, k_ss, v + b * v_sb + h * v_sh, v_ss, keys, padded, dim, v_dim, v_pad,
                  kp, kp + padded * dim / 2);
      }
    float* const s_buf = scores_base + strip * omp_get_thread_num();
    bf16* const p_buf = probs_base + strip * omp_get_thread_num();
    // the last tiles see the most keys under causal: hand them out first
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t tile = tiles - 1 - u / (batch * q_heads), bh = u % (batch * q_heads);
      const int64_t b = bh / q_heads, h = bh % q_heads, kv = h / group;
      const int64_t i0 = tile * TILE_ROWS, rows = q_len - i0 < TILE_ROWS ? q_len - i0 : TILE_ROWS;
      const int64_t seen = causal ? (i0 + rows < keys ? i0 + rows : keys) : keys;  // keys the tile's last row sees
      const int64_t seen_padded = (seen + 15) / 16 * 16;
      const int32_t* kp = scratch + (b * kv_heads + kv) * head_elems;
      const int32_t* vp = kp + padded * dim / 2;
      const bf16* q_rows[TILE_ROWS];
      float* s_rows[TILE_ROWS];
      bf16* p_rows[TILE_ROWS];
      bf16* o_rows[TILE_ROWS];
      bool dead[TILE_ROWS];
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        q_rows[r] = q + b * q_sb + h * q_sh + i * q_ss;
        s_rows[r] = s_buf + r * padded;
        p_rows[r] = p_buf + r * padded;
        o_rows[r] = out + ((b * q_len + i) * q_heads + h) * v_dim;
      }
      scores(q_rows, static_cast<int>(rows), kp, padded, dim / 2, s_rows, seen_padded, scale);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r, limit = causal ? (i + 1 < keys ? i + 1 : keys) : keys;
        const void* mask_row = kind == NO_MASK ? nullptr
            : static_cast<const char*>(mask) + (b * m_sb + h * m_sh + i * m_sq) * mask_item;
        dead[r] = softmax_row(s_rows[r], p_rows[r], limit, seen_padded, kind, mask_row);
      }
      outputs(p_rows, static_cast<int>(rows), vp, v_pad, v_dim, seen_padded / 2, o_rows, dead);
    }
  }
  constexpr size_t KEEP_BYTES = size_t(256) << 20;  // a larger call's buffers are given back, not kept for good
  if (packed.capacity() * sizeof(int32_t) + scores_buf.capacity() * (sizeof(float) + sizeof(bf16)) > KEEP_BYTES) {
    std::vector<int32_t>().swap(packed);
    std::vector<float>().swap(scores_buf);
    std::vector<bf16>().swap(probs_buf);
  }
  return 0;
}

}  // extern "C"

// blade's decode attention on CPU: one query per (batch, head) against a key/value cache, reading only the keys
// the bool mask lets it see (a decode step's filled slots), in fp32 or bf16 storage with fp32 math.
// q [B, Hq, 1, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] by strides (last dim contiguous); mask bool [B, Hq, 1, Sk]
// by strides (0 where broadcast) or null; out [B, 1, Hq, Dv] contiguous, q's dtype. Query head h reads key head
// h / (Hq / Hkv). A row with no visible key gives zeros. One OpenMP task per (batch, head).
#include <immintrin.h>
#include <omp.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
    uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
inline void store(float* p, float x) { *p = x; }
inline void store(uint16_t* p, float x) {  // round to nearest even, as torch's cast
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x7fffffu)) {
        *p = static_cast<uint16_t>((bits >> 16) | 0x40);
        return;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    *p = static_cast<uint16_t>(bits >> 16);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename T>
float dot(const float* q, const T* k, int64_t d) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; i < d; ++i) s += q[i] * to_float(k[i]);
    return s;
}

// Keys ahead of the one being scored whose K and V rows are prefetched: in a decode step the KV cache is out of the
// CPU caches (the weights streamed through them) and one head's rows are a row of all heads apart, so each row was
// a miss waited for (GPT-2 base: 110 us a call in the step at ~90 keys, 38 us with the cache warm). 16 ahead saved
// 0.36 ms of a 21.5 ms step, 8 ahead 0.26 ms (alternating steps, one process).
constexpr int64_t AHEAD = 16;

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
    const char* p = reinterpret_cast<const char*>(row);
    for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

template <typename T>
void run(const T* q, const int64_t qs[2], const T* k, const int64_t ks[3], const T* v, const int64_t vs[3],
         const bool* mask, const int64_t ms[3], T* out, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t keys,
         int64_t d, int64_t dv, float scale, int threads) {
    const int64_t group = q_heads / kv_heads;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> scores(keys), qf(d), acc(dv);
        std::vector<int64_t> seen(keys);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < batch * q_heads; ++task) {
            const int64_t b = task / q_heads, h = task % q_heads, g = h / group;
            const T* qrow = q + b * qs[0] + h * qs[1];
            for (int64_t i = 0; i < d; ++i) qf[i] = to_float(qrow[i]) * scale;
            const bool* mrow = mask ? mask + b * ms[0] + h * ms[1] : nullptr;
            int64_t n = 0;
            float top = -INFINITY;
            const T* kbase = k + b * ks[0] + g * ks[1];
            const T* vbase = v + b * vs[0] + g * vs[1];
            for (int64_t j = 0; j < AHEAD && j < keys; ++j) {
                if (!mrow || mrow[j * ms[2]]) {
                    prefetch_row(kbase + j * ks[2], d);
                    prefetch_row(vbase + j * vs[2], dv);
                }
            }
            for (int64_t j = 0; j < keys; ++j) {
                const int64_t next = j + AHEAD;
                if (next < keys && (!mrow || mrow[next * ms[2]])) {
                    prefetch_row(kbase + next * ks[2], d);
                    prefetch_row(vbase + next * vs[2], dv);  // read after the scores: in L1/L2 by then
                }
                if (mrow && !mrow[j * ms[2]]) continue;
                const float s = dot(qf.data(), k + b * ks[0] + g * ks[1] + j * ks[2], d);
                scores[n] = s;
                seen[n++] = j;
                top = s > top ? s : top;
            }
            T* orow = out + (b * q_heads + h) * dv;
            if (n == 0 || top == -INFINITY) {
                for (int64_t i = 0; i < dv; ++i) store(orow + i, 0.0f);
                continue;
            }
            float total = 0.0f;
            for (int64_t t = 0; t < n; ++t) total += (scores[t] = std::exp(scores[t] - top));
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t t = 0; t < n; ++t) {
                const float p = scores[t] / total;
                const T* vrow = v + b * vs[0] + g * vs[1] + seen[t] * vs[2];
                int64_t i = 0;
                const __m512 pv = _mm512_set1_ps(p);
                for (; i + 16 <= dv; i += 16)
                    _mm512_storeu_ps(acc.data() + i, _mm512_fmadd_ps(pv, load16(vrow + i), _mm512_loadu_ps(acc.data() + i)));
                for (; i < dv; ++i) acc[i] += p * to_float(vrow[i]);
            }
            for (int64_t i = 0; i < dv; ++i) store(orow + i, acc[i]);
        }
    }
}

}  // namespace

// dtype: 0 fp32, 1 bf16. Strides in elements: q (batch, head), k and v (batch, head, key), mask (batch, head, key;
// 0 where broadcast). Returns 0, or 1 for an unknown dtype.
extern "C" int blade_decode_attention(const void* q, int64_t qs0, int64_t qs1, const void* k, int64_t ks0,
                                      int64_t ks1, int64_t ks2, const void* v, int64_t vs0, int64_t vs1, int64_t vs2,
                                      const bool* mask, int64_t ms0, int64_t ms1, int64_t ms2, void* out,
                                      int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t keys, int64_t d,
                                      int64_t dv, float scale, int dtype, int threads) {
    const int64_t qs[2] = {qs0, qs1}, ks[3] = {ks0, ks1, ks2}, vs[3] = {vs0, vs1, vs2}, ms[3] = {ms0, ms1, ms2};
    if (dtype == 0) {
        run(static_cast<const float*>(q), qs, static_cast<const float*>(k), ks, static_cast<const float*>(v), vs,
            mask, ms, static_cast<float*>(out), batch, q_heads, kv_heads, keys, d, dv, scale, threads);
        return 0;
    }
    if (dtype == 1) {
        run(static_cast<const uint16_t*>(q), qs, static_cast<const uint16_t*>(k), ks, static_cast<const uint16_t*>(v),
            vs, mask, ms, static_cast<uint16_t*>(out), batch, q_heads, kv_heads, keys, d, dv, scale, threads);
        return 0;
    }
    return 1;
}

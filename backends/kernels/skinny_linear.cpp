// blade's skinny linear for decoding on CPU: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for m < 8 rows, with W
// stored fp32, bf16 or int8 (one fp32 scale per row n), or packed int4 with a scale per group (the _q4 entry point).
// time is reading W once from memory, so the kernel streams each W row once and reuses it for all m rows of x
// (which stay in L1/L2), split over OpenMP threads by rows. 1..4 rows of x (a decode step at batch 1..4) read the
// W rows one after another, one sequential stream (run_seq: 1.03-1.47x interleaving 3-8 W rows a block, over GPT-2
// base's weights, fp32, bf16 and int8, paired through skinny_native); 5..8 rows of x interleave 3-4 W rows a block.
// Products and sums are fp32 (a bf16 or int8 weight widens exactly to fp32); int8 rows are scaled after the sum.
// bf16 x with a bf16 weight (weight kind 3, a bf16 model's decode step) takes vdpbf16ps on CPUs with AVX512-BF16:
// 32 weights a load and one instruction, not a widening per 16, which left the bf16 kernel at ~42 GB/s of weight
// against ~53 for this path (a 250 MB GPT-2 base weight set, one row). Its products are exact in fp32, as widened.
#include <immintrin.h>
#include <omp.h>
#include <cstdint>
#include <cstring>

namespace {

// W rows per block for 5..8 rows of x: that many weight streams in flight and rows * M
// accumulators, kept within the 32 zmm registers
constexpr int rows_for(int m) { return m <= 2 ? 8 : (m <= 5 ? 4 : 3); }

template <typename W>
inline __m512 widen(const W* p);

template <>
inline __m512 widen<float>(const float* p) { return _mm512_loadu_ps(p); }

template <>
inline __m512 widen<uint16_t>(const uint16_t* p) {  // bf16: the upper half of an fp32
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <>
inline __m512 widen<int8_t>(const int8_t* p) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

template <typename W>
inline float widen_one(const W* p);
template <> inline float widen_one<float>(const float* p) { return *p; }
template <> inline float widen_one<uint16_t>(const uint16_t* p) {
    uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
template <> inline float widen_one<int8_t>(const int8_t* p) { return static_cast<float>(*p); }

// Rows n0 .. n0+R-1 of W against all M rows of x.
template <typename W, int M, int R>
inline void block(const float* x, int64_t x_stride, const W* w, int64_t k, int64_t n0, float* acc_out) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
        __m512 wv[R];
        for (int r = 0; r < R; ++r) wv[r] = widen<W>(w + (n0 + r) * k + j);
        for (int m = 0; m < M; ++m) {
            __m512 xv = _mm512_loadu_ps(x + m * x_stride + j);
            for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) {
            float s = _mm512_reduce_add_ps(acc[r][m]);
            for (int64_t t = j; t < k; ++t) s += widen_one<W>(w + (n0 + r) * k + t) * x[m * x_stride + t];
            acc_out[r * M + m] = s;
        }
}

template <typename W, int M>
void run(const float* x, int64_t x_stride, const W* w, const float* scale, const float* bias, float* y,
         int64_t y_stride, int64_t n, int64_t k, int threads) {
    constexpr int ROWS = rows_for(M);
    const int64_t blocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n0 = b * ROWS;
        float out[ROWS * M];
        int rows;
        if (n0 + ROWS <= n) {
            block<W, M, ROWS>(x, x_stride, w, k, n0, out);
            rows = ROWS;
        } else {
            rows = static_cast<int>(n - n0);
            for (int r = 0; r < rows; ++r) block<W, M, 1>(x, x_stride, w, k, n0 + r, out + r * M);
        }
        for (int r = 0; r < rows; ++r) {
            const float s = scale ? scale[n0 + r] : 1.0f;
            const float add = bias ? bias[n0 + r] : 0.0f;
            for (int m = 0; m < M; ++m) y[m * y_stride + n0 + r] = out[r * M + m] * s + add;
        }
    }
}

// 1..4 rows of x: each W row as one sequential stream (the rows one after another), U chunks of 16 in flight on
// their own accumulators per row of x. Paired against the interleaved blocks over GPT-2 base's weights: fp32
// 1.20 / 1.10 / 1.27 / 1.12x at 1 / 2 / 3 / 4 rows, int8 1.15 / 1.35 / 1.31 / 1.03x; from 5 rows int8 is 0.76-0.82x
// this way (the interleaved blocks reuse each x load for 3-4 W rows), so 5..8 rows stay interleaved.
template <typename W, int M>
void run_seq(const float* x, int64_t x_stride, const W* w, const float* scale, const float* bias, float* y,
             int64_t y_stride, int64_t n, int64_t k, int threads) {
    constexpr int U = M <= 2 ? 4 : 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < n; ++r) {
        const W* row = w + r * k;
        __m512 acc[M][U];
        for (int m = 0; m < M; ++m)
            for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 * U <= k; j += 16 * U)
            for (int u = 0; u < U; ++u) {
                const __m512 wv = widen<W>(row + j + 16 * u);
                for (int m = 0; m < M; ++m)
                    acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * x_stride + j + 16 * u), acc[m][u]);
            }
        for (; j + 16 <= k; j += 16) {
            const __m512 wv = widen<W>(row + j);
            for (int m = 0; m < M; ++m)
                acc[m][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * x_stride + j), acc[m][0]);
        }
        for (int m = 0; m < M; ++m) {
            __m512 total = acc[m][0];
            for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[m][u]);
            float sum = _mm512_reduce_add_ps(total);
            for (int64_t t = j; t < k; ++t) sum += widen_one<W>(row + t) * x[m * x_stride + t];
            y[m * y_stride + r] = sum * (scale ? scale[r] : 1.0f) + (bias ? bias[r] : 0.0f);
        }
    }
}

template <typename W>
int dispatch(int64_t m, const float* x, int64_t xs, const W* w, const float* scale, const float* bias, float* y,
             int64_t ys, int64_t n, int64_t k, int threads) {
    switch (m) {
        case 1: run_seq<W, 1>(x, xs, w, scale, bias, y, ys, n, k, threads); return 0;
        case 2: run_seq<W, 2>(x, xs, w, scale, bias, y, ys, n, k, threads); return 0;
        case 3: run_seq<W, 3>(x, xs, w, scale, bias, y, ys, n, k, threads); return 0;
        case 4: run_seq<W, 4>(x, xs, w, scale, bias, y, ys, n, k, threads); return 0;
        case 5: run<W, 5>(x, xs, w, scale, bias, y, ys, n, k, threads); return 0;
        case 6: run<W, 6>(x, xs, w, scale, bias, y, ys, n, k, threads); return 0;
        case 7: run<W, 7>(x, xs, w, scale, bias, y, ys, n, k, threads); return 0;
        case 8: run<W, 8>(x, xs, w, scale, bias, y, ys, n, k, threads); return 0;
        default: return 1;
    }
}

// bf16 round to nearest even, as torch converts (a NaN stays a NaN).
inline uint16_t to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// Weight kind 3: x, bias and y bf16. Rows n0 .. n0+R-1 of W against all M rows of x, 32 weights a step: lane i of
// vdpbf16ps adds w[2i] x[2i] + w[2i+1] x[2i+1], so contiguous rows of W and x pair up as they are stored.
template <int M, int R>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
inline void block_bf16(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t k, int64_t n0,
                       float* acc_out) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= k; j += 32) {
        __m512bh wv[R];
        for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + (n0 + r) * k + j);
        for (int m = 0; m < M; ++m) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * x_stride + j);
            for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) {
            float s = _mm512_reduce_add_ps(acc[r][m]);
            for (int64_t t = j; t < k; ++t)
                s += widen_one<uint16_t>(w + (n0 + r) * k + t) * widen_one<uint16_t>(x + m * x_stride + t);
            acc_out[r * M + m] = s;
        }
}

template <int M>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void run_bf16(const uint16_t* x, int64_t x_stride, const uint16_t* w, const uint16_t* bias, uint16_t* y,
              int64_t y_stride, int64_t n, int64_t k, int threads) {
    constexpr int ROWS = rows_for(M);
    const int64_t blocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n0 = b * ROWS;
        float out[ROWS * M];
        int rows;
        if (n0 + ROWS <= n) {
            block_bf16<M, ROWS>(x, x_stride, w, k, n0, out);
            rows = ROWS;
        } else {
            rows = static_cast<int>(n - n0);
            for (int r = 0; r < rows; ++r) block_bf16<M, 1>(x, x_stride, w, k, n0 + r, out + r * M);
        }
        for (int r = 0; r < rows; ++r) {
            const float add = bias ? widen_one<uint16_t>(bias + n0 + r) : 0.0f;
            for (int m = 0; m < M; ++m) y[m * y_stride + n0 + r] = to_bf16(out[r * M + m] + add);
        }
    }
}

// Weight kind 3, 1..4 rows of x: each W row as one sequential stream, U chunks of 32 in flight per row of x (as
// run_seq, which it repeats because the AVX512-BF16 intrinsics need this target attribute on every function).
// Paired against run_bf16's interleaved blocks over GPT-2 base's weights: 1.20 / 1.16 / 1.20 / 1.47x at 1..4 rows.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void run_bf16_seq(const uint16_t* x, int64_t x_stride, const uint16_t* w, const uint16_t* bias, uint16_t* y,
                  int64_t y_stride, int64_t n, int64_t k, int threads) {
    constexpr int U = M <= 2 ? 4 : 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < n; ++r) {
        const uint16_t* row = w + r * k;
        __m512 acc[M][U];
        for (int m = 0; m < M; ++m)
            for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 32 * U <= k; j += 32 * U)
            for (int u = 0; u < U; ++u) {
                const __m512bh wv = (__m512bh)_mm512_loadu_si512(row + j + 32 * u);
                for (int m = 0; m < M; ++m)
                    acc[m][u] = _mm512_dpbf16_ps(acc[m][u], wv,
                                                 (__m512bh)_mm512_loadu_si512(x + m * x_stride + j + 32 * u));
            }
        for (; j + 32 <= k; j += 32) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(row + j);
            for (int m = 0; m < M; ++m)
                acc[m][0] = _mm512_dpbf16_ps(acc[m][0], wv, (__m512bh)_mm512_loadu_si512(x + m * x_stride + j));
        }
        const float add = bias ? widen_one<uint16_t>(bias + r) : 0.0f;
        for (int m = 0; m < M; ++m) {
            __m512 total = acc[m][0];
            for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[m][u]);
            float sum = _mm512_reduce_add_ps(total);
            for (int64_t t = j; t < k; ++t)
                sum += widen_one<uint16_t>(row + t) * widen_one<uint16_t>(x + m * x_stride + t);
            y[m * y_stride + r] = to_bf16(sum + add);
        }
    }
}

int dispatch_bf16(int64_t m, const uint16_t* x, int64_t xs, const uint16_t* w, const uint16_t* bias, uint16_t* y,
                  int64_t ys, int64_t n, int64_t k, int threads) {
    switch (m) {
        case 1: run_bf16_seq<1>(x, xs, w, bias, y, ys, n, k, threads); return 0;
        case 2: run_bf16_seq<2>(x, xs, w, bias, y, ys, n, k, threads); return 0;
        case 3: run_bf16_seq<3>(x, xs, w, bias, y, ys, n, k, threads); return 0;
        case 4: run_bf16_seq<4>(x, xs, w, bias, y, ys, n, k, threads); return 0;
        case 5: run_bf16<5>(x, xs, w, bias, y, ys, n, k, threads); return 0;
        case 6: run_bf16<6>(x, xs, w, bias, y, ys, n, k, threads); return 0;
        case 7: run_bf16<7>(x, xs, w, bias, y, ys, n, k, threads); return 0;
        case 8: run_bf16<8>(x, xs, w, bias, y, ys, n, k, threads); return 0;
        default: return 1;
    }
}

// int4 (blade::q4linear): each W row k / 2 bytes, a scale per `group` weights. A 16-byte chunk holds 32 weights:
// low nibbles are weights 0..15, high nibbles 16..31, each stored as q + 8. A group's 16 possible weights,
// (nibble - 8) * scale, are one zmm table; vpermps looks each nibble up in it (it reads the low 4 bits of a lane, so
// the high nibble needs only a shift), which gives the dequantized fp32 weights in 2 instructions per 16 where
// masking, widening and converting took 3-4. The weights are exactly the reference's dequantized ones
// (blade.ops.quantized.dequantize_int4). Over a Llama-134M weight set (64 MB, through q4linear, paired against the
// masked kernel with 1-4 W rows interleaved a block): 1.58x at one row of x, 1.46 / 1.17 / 1.07x at 2 / 3 / 4 rows,
// 1.27x at eight.
//
// Each W row is read as one sequential stream (the rows one after another), U chunks of 32 in flight on their own
// accumulators per row of x: interleaving 4-8 W rows measured 1.1-1.3x slower at one row of x (an int4 row is only
// 6-16 cache lines, too short a stream each for the prefetcher), and from 5 rows of x one chunk a step already
// keeps 10-16 fused multiply-adds in flight.
// CHUNKS_A_GROUP: a group's chunks of 32 (0: `group` / 32 at run time, a division a chunk). out[m] for row m of x.
template <int M, int CHUNKS_A_GROUP>
inline void row_q4(const float* x, int64_t x_stride, const uint8_t* w, const float* scale, int64_t k, int64_t group,
                   float* out) {
    const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    constexpr int U = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
    __m512 acc[M][U];
    for (int m = 0; m < M; ++m)
        for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
    const int64_t chunks = k / 32;
    auto step = [&](int64_t c, int u) {
        const int64_t g = CHUNKS_A_GROUP ? c / CHUNKS_A_GROUP : c * 32 / group;
        const __m512 table = _mm512_mul_ps(levels, _mm512_set1_ps(scale[g]));
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * 16)));
        const __m512 lo = _mm512_permutexvar_ps(b, table), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
        for (int m = 0; m < M; ++m) {
            acc[m][u] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + m * x_stride + c * 32), acc[m][u]);
            acc[m][u] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + m * x_stride + c * 32 + 16), acc[m][u]);
        }
    };
    int64_t c = 0;
    for (; c + U <= chunks; c += U)
        for (int u = 0; u < U; ++u) step(c + u, u);
    for (; c < chunks; ++c) step(c, 0);
    for (int m = 0; m < M; ++m) {
        __m512 total = acc[m][0];
        for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[m][u]);
        out[m] = _mm512_reduce_add_ps(total);
    }
}

template <int M>
void run_q4(const float* x, int64_t x_stride, const uint8_t* w, const float* scale, const float* bias, float* y,
            int64_t y_stride, int64_t n, int64_t k, int64_t group, int threads) {
    const int64_t groups = k / group;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < n; ++r) {
        const uint8_t* row = w + r * (k / 2);
        const float* row_scale = scale + r * groups;
        float out[M];
        if (group == 32) row_q4<M, 1>(x, x_stride, row, row_scale, k, group, out);
        else if (group == 128) row_q4<M, 4>(x, x_stride, row, row_scale, k, group, out);
        else row_q4<M, 0>(x, x_stride, row, row_scale, k, group, out);
        for (int m = 0; m < M; ++m) y[m * y_stride + r] = out[m] + (bias ? bias[r] : 0.0f);
    }
}

}  // namespace

// blade::q4linear over m >= 1 rows of x [m, k] (rows x_stride apart), 8 at a time: w [n, k / 2] packed, scale
// [n, k / group]. group must be a multiple of 32 dividing k. Returns 0, or 1 when m is below 1, 3 for a bad group.
extern "C" int blade_skinny_linear_q4(const float* x, int64_t m, int64_t x_stride, const uint8_t* w,
                                      const float* scale, const float* bias, float* y, int64_t y_stride, int64_t n,
                                      int64_t k, int64_t group, int threads) {
    if (group <= 0 || group % 32 || k % group) return 3;
    if (m > 8) {  // a short prompt's prefill: each block of 8 rows reads the weight once (see skinny_native.py)
        for (int64_t first = 0; first < m; first += 8) {
            const int code = blade_skinny_linear_q4(x + first * x_stride, m - first < 8 ? m - first : 8, x_stride, w,
                                                    scale, bias, y + first * y_stride, y_stride, n, k, group, threads);
            if (code != 0) return code;
        }
        return 0;
    }
    switch (m) {
        case 1: run_q4<1>(x, x_stride, w, scale, bias, y, y_stride, n, k, group, threads); return 0;
        case 2: run_q4<2>(x, x_stride, w, scale, bias, y, y_stride, n, k, group, threads); return 0;
        case 3: run_q4<3>(x, x_stride, w, scale, bias, y, y_stride, n, k, group, threads); return 0;
        case 4: run_q4<4>(x, x_stride, w, scale, bias, y, y_stride, n, k, group, threads); return 0;
        case 5: run_q4<5>(x, x_stride, w, scale, bias, y, y_stride, n, k, group, threads); return 0;
        case 6: run_q4<6>(x, x_stride, w, scale, bias, y, y_stride, n, k, group, threads); return 0;
        case 7: run_q4<7>(x, x_stride, w, scale, bias, y, y_stride, n, k, group, threads); return 0;
        case 8: run_q4<8>(x, x_stride, w, scale, bias, y, y_stride, n, k, group, threads); return 0;
        default: return 1;
    }
}

// weight_kind: 0 fp32, 1 bf16, 2 int8 (scale required), all with fp32 x, bias and y; 3 bf16 with bf16 x, bias and y
// (AVX512-BF16 only: the caller checks the CPU). x [m, k] rows x_stride apart, y [m, n] rows y_stride apart; m >= 1
// rows, 8 at a time. Returns 0, or 1 when m is below 1, 2 for an unknown weight kind.
extern "C" int blade_skinny_linear(const float* x, int64_t m, int64_t x_stride, const void* w, int weight_kind,
                                   const float* scale, const float* bias, float* y, int64_t y_stride, int64_t n,
                                   int64_t k, int threads) {
    if (m > 8) {
        const int64_t item = weight_kind == 3 ? 2 : 4;  // bytes of an element of x and y
        const char* xb = static_cast<const char*>(static_cast<const void*>(x));
        char* yb = static_cast<char*>(static_cast<void*>(y));
        for (int64_t first = 0; first < m; first += 8) {
            const int code = blade_skinny_linear(
                reinterpret_cast<const float*>(xb + first * x_stride * item), m - first < 8 ? m - first : 8,
                x_stride, w, weight_kind, scale, bias, reinterpret_cast<float*>(yb + first * y_stride * item),
                y_stride, n, k, threads);
            if (code != 0) return code;
        }
        return 0;
    }
    switch (weight_kind) {
        case 0: return dispatch(m, x, x_stride, static_cast<const float*>(w), scale, bias, y, y_stride, n, k, threads);
        case 1: return dispatch(m, x, x_stride, static_cast<const uint16_t*>(w), scale, bias, y, y_stride, n, k,
                                threads);
        case 2: return dispatch(m, x, x_stride, static_cast<const int8_t*>(w), scale, bias, y, y_stride, n, k,
                                threads);
        case 3: return dispatch_bf16(m, reinterpret_cast<const uint16_t*>(x), x_stride,
                                     static_cast<const uint16_t*>(w), reinterpret_cast<const uint16_t*>(bias),
                                     reinterpret_cast<uint16_t*>(y), y_stride, n, k, threads);
        default: return 2;
    }
}

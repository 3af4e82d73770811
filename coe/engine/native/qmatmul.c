/* Few-row products with block-quantized weights, for the engine's CPU decode steps.
 *
 * y[M, N] = x[M, K] @ W^T where W [N, K] is stored in GGUF's blocks of 32 along K:
 *   Q4_1: w = d * q + m, q in 0..15 (16 bytes of nibbles: byte j holds elements j and j + 16)
 *   Q8_0: w = d * q,     q in -128..127
 * with d and m kept as float32 (widened exactly from the file's float16).
 *
 * Why hand-written (see coe/engine/quantized.py): torch has no CPU kernel for these formats that is
 * fast on AVX2 (its int4 kernel takes ~10x the float32 GEMV's time here), and a decode step on
 * a 2-core CPU is bound by reading weights: Q4_1 reads 0.75 bytes per weight against float32's 4.
 *
 * Exactness: the GGUF dequantizer that built the float32 checkpoint forms each weight as
 * fl(fl(q * d) + m). Here a Q4_1 weight is fma(q, d, m) = fl(q * d + m), the same value: d is a
 * float16 (11 significant bits) and q < 16 (4 bits), so q * d has at most 15 significant bits
 * and is exact in float32; the single rounding of the sum is then the only one either way. A
 * Q8_0 weight, q * d (at most 19 bits), is exact too. So the weights are bit for bit the
 * float32 model's (coe.engine.quantized checks every matrix against them when attaching), and
 * only the order of the dot products' additions differs from a float32 GEMM.
 */
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>
#include "lora_shrink.h"  /* kernels/native: the LoRA shrink, shared with kernels' C backend */

#define QK 32
#define MAX_ROWS 8
#define NBLK 8        /* outputs per block of the fused LoRA expand (one AVX vector) */
#define MAX_FUSED 16  /* rows a fused call may have (the engine's BLOCK_MAX_ROWS) */

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* Zero the NA accumulators of each of MT rows. */
static inline __attribute__((always_inline)) void acc_zero(__m256 acc[][4], const int MT, const int NA)
{
#pragma GCC unroll 8
    for (int r = 0; r < MT; r++)
#pragma GCC unroll 4
        for (int a = 0; a < NA; a++) acc[r][a] = _mm256_setzero_ps();
}

/* acc[r] += (w0..w3) . x[r, 0:32] for MT rows of x (row stride ldx): one block of 32 weights. */
static inline __attribute__((always_inline)) void block_fma(__m256 acc[][4], __m256 w0, __m256 w1, __m256 w2, __m256 w3,
                                                            const float *xb, long ldx, const int MT, const int NA)
{
#pragma GCC unroll 8
    for (int r = 0; r < MT; r++) {
        const float *xr = xb + r * ldx;
        acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[r][0]);
        acc[r][1 % NA] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[r][1 % NA]);
        acc[r][2 % NA] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[r][2 % NA]);
        acc[r][3 % NA] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[r][3 % NA]);
    }
}

/* y[r, n] = the sum of row r's accumulators (+ ex[r * NBLK], the row's LoRA delta, when ex is
 * not NULL: added once, after the base sum). */
static inline __attribute__((always_inline)) void acc_store(__m256 acc[][4], float *y, long ldy, long n,
                                                            const float *ex, const int MT, const int NA)
{
#pragma GCC unroll 8
    for (int r = 0; r < MT; r++) {
        __m256 a = acc[r][0];
        if (NA > 1) a = _mm256_add_ps(a, acc[r][1]);
        if (NA > 2) a = _mm256_add_ps(a, _mm256_add_ps(acc[r][2], acc[r][3]));
        y[r * ldy + n] = ex ? hsum(a) + ex[r * NBLK] : hsum(a);
    }
}

/* One output element per row of the tile, for MT rows of x (MT a compile-time constant after
 * inlining, so acc[] stays in registers). */
static inline __attribute__((always_inline)) void q41_row(
    const uint8_t *qs, const float *dm, const float *x, long ldx, float *y, long ldy,
    long n, long nb, const float *ex, const int MT)
{
    /* NA independent accumulators per row: one chain of FMAs per row would wait on the FMA
     * latency (4 dependent FMAs a block); few rows leave registers for more chains. */
    const int NA = MT <= 2 ? 4 : (MT <= 4 ? 2 : 1);
    __m256 acc[MAX_ROWS][4];
    acc_zero(acc, MT, NA);
    const __m128i mask = _mm_set1_epi8(0x0F);
#pragma GCC unroll 2
    for (long b = 0; b < nb; b++) {
        const __m256 d = _mm256_broadcast_ss(dm + 2 * b), m = _mm256_broadcast_ss(dm + 2 * b + 1);
        const __m128i raw = _mm_loadu_si128((const __m128i *)(qs + 16 * b));
        const __m128i lo = _mm_and_si128(raw, mask);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        const __m256 w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d, m);
        const __m256 w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), d, m);
        const __m256 w2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d, m);
        const __m256 w3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), d, m);
        block_fma(acc, w0, w1, w2, w3, x + QK * b, ldx, MT, NA);
    }
    acc_store(acc, y, ldy, n, ex, MT, NA);
}

static inline __attribute__((always_inline)) void q80_row(
    const int8_t *qs, const float *dd, const float *x, long ldx, float *y, long ldy,
    long n, long nb, const int MT)
{
    /* NA independent accumulators per row: one chain of FMAs per row would wait on the FMA
     * latency (4 dependent FMAs a block); few rows leave registers for more chains. */
    const int NA = MT <= 2 ? 4 : (MT <= 4 ? 2 : 1);
    __m256 acc[MAX_ROWS][4];
    acc_zero(acc, MT, NA);
    for (long b = 0; b < nb; b++) {
        const __m256 d = _mm256_broadcast_ss(dd + b);
        const int8_t *q = qs + QK * b;
        const __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q))), d);
        const __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)))), d);
        const __m256 w2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16)))), d);
        const __m256 w3 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 24)))), d);
        block_fma(acc, w0, w1, w2, w3, x + QK * b, ldx, MT, NA);
    }
    acc_store(acc, y, ldy, n, NULL, MT, NA);
}

#define TILE_CASES(FN, ...) \
    switch (mt) { \
    case 1: FN(__VA_ARGS__, 1); break; case 2: FN(__VA_ARGS__, 2); break; \
    case 3: FN(__VA_ARGS__, 3); break; case 4: FN(__VA_ARGS__, 4); break; \
    case 5: FN(__VA_ARGS__, 5); break; case 6: FN(__VA_ARGS__, 6); break; \
    case 7: FN(__VA_ARGS__, 7); break; default: FN(__VA_ARGS__, 8); break; }

/* A stacked projection's LoRA for the fused kernel: A [S, nR, K] (scale folded in) and B as
 * panels [S, N/8, R, 8] (B^T cut into blocks of 8 outputs, each block's R x 8 values
 * contiguous), slices ending at bounds[1..n] (multiples of 8, checked by the caller). */
typedef struct {
    const float *A, *P;
    int64_t R, n;
    int64_t bounds[9];
} lora_rows;

/* ex[t, 0:8] = h[t, slice i] @ B^T[slot(t), :, n0:n0+8] for the block of outputs starting at n0
 * (zero for rows without a slot): each active slot's 512-byte panel is read once for up to 4 of
 * its tokens at a time, one FMA per token per rank (per-output dot products over the rank,
 * tried first, took ~6x the instructions per FMA and ~12% of a 16-row call). */
static inline void lora_expand_block(const lora_rows *lr, const lora_step *sp, long nR, long N, long M, long blk, long i,
                                     float *ex)
{
    const long R = lr->R;
    for (long t = 0; t < M * NBLK; t++) ex[t] = 0.0f;
    for (long u = 0; u < sp->U; u++) {
        const long s = sp->seg_slot[u];
        const float *panel = lr->P + ((s * (N / NBLK) + blk) * R) * NBLK;
        const long q0 = sp->seg_start[u], q1 = q0 + sp->seg_count[u];
        for (long q = q0; q < q1; q += 4) {
            const int nt = q1 - q < 4 ? (int)(q1 - q) : 4;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            const float *ht[4];
            for (int g = 0; g < nt; g++) ht[g] = sp->h + (long)sp->order[q + g] * nR + i * R;
            for (long r = 0; r < R; r++) {
                const __m256 bv = _mm256_loadu_ps(panel + r * NBLK);
                for (int g = 0; g < nt; g++) acc[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(ht[g] + r), bv, acc[g]);
            }
            for (int g = 0; g < nt; g++) _mm256_storeu_ps(ex + (long)sp->order[q + g] * NBLK, acc[g]);
        }
    }
}

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ W^T (+ each row's LoRA when lr is not
 * NULL; then M <= MAX_FUSED and N a multiple of 8), W in Q4_1: qs [N, K/2], dm [N, K/32, 2].
 * One OpenMP region: the LoRA shrink of every active slot (h), then blocks of 8 outputs: the
 * block's LoRA expand for every row (ex), then each output's base dot products for all row
 * tiles (a weight row is read from memory once per step), the expand added after the base sum
 * (a zero B adds exactly nothing). */
void coe_q41_matmul_lora(const float *x, long ldx, const uint8_t *qs, const float *dm, float *y, long ldy,
                         long M, long N, long K, int nthreads, const lora_rows *lr, const lora_step *sp)
{
    const long nb = K / QK;
    const long nR = lr ? lr->R * lr->n : 0;
#pragma omp parallel num_threads(nthreads)
    {
        float ex[MAX_FUSED * NBLK];
        if (lr) lora_shrink_for(lr->A, nR, K, x, ldx, sp);  /* ends with a barrier: h is complete */
#pragma omp for schedule(static)
        for (long blk = 0; blk < (N + NBLK - 1) / NBLK; blk++) {
            const long n0 = blk * NBLK, n1 = n0 + NBLK < N ? n0 + NBLK : N;
            if (lr) {
                long i = 0;
                while (n0 >= lr->bounds[i + 1]) i++;
                lora_expand_block(lr, sp, nR, N, M, blk, i, ex);
            }
            for (long n = n0; n < n1; n++) {
                for (long r0 = 0; r0 < M; r0 += MAX_ROWS) {
                    const long mt = M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS;
                    TILE_CASES(q41_row, qs + n * (K / 2), dm + n * 2 * nb, x + r0 * ldx, ldx, y + r0 * ldy, ldy, n, nb,
                               lr ? ex + r0 * NBLK + (n - n0) : NULL)
                }
            }
        }
    }
}

void coe_q41_matmul(const float *x, long ldx, const uint8_t *qs, const float *dm, float *y, long ldy,
                    long M, long N, long K, int nthreads)
{
    coe_q41_matmul_lora(x, ldx, qs, dm, y, ldy, M, N, K, nthreads, NULL, NULL);
}

/* The same for Q8_0 (no LoRA): qs [N, K] int8, d [N, K/32]. */
void coe_q80_matmul(const float *x, long ldx, const int8_t *qs, const float *d, float *y, long ldy,
                    long M, long N, long K, int nthreads)
{
    const long nb = K / QK;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long n = 0; n < N; n++) {
        for (long r0 = 0; r0 < M; r0 += MAX_ROWS) {
            const long mt = M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS;
            TILE_CASES(q80_row, qs + n * K, d + n * nb, x + r0 * ldx, ldx, y + r0 * ldy, ldy, n, nb)
        }
    }
}

int coe_native_abi(void) { return 3; }

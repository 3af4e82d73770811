/* Shared by kernels/native/lora.c and coe/engine/native/qmatmul.c (which fuses a LoRA into
 * its block-quantized projection): one step's tokens grouped by slot, and the LoRA shrink. */
#ifndef COE_LORA_SHRINK_H
#define COE_LORA_SHRINK_H
#include <immintrin.h>
#include <stdint.h>

typedef struct {            /* one step's tokens grouped by slot (cached per step) */
    int64_t T, U;
    const int32_t *order;   /* [T] token ids grouped by slot */
    const int32_t *seg_slot, *seg_start, *seg_count;  /* [U] each active slot and its range in order */
    float *h;               /* scratch [T, >= n*R] */
    int64_t nthreads;
    const int32_t *row_slot;  /* [T] each token's slot, -1 for none */
} lora_step;

#define TT 4                /* tokens per register tile */

/* out_j[i] = A row j . x_i for NJ rows of A (a[0..NJ-1]) and NT tokens: NJ * NT accumulators
 * over k (8 where the tile allows), each row of A loaded once per 8 columns for all tokens and
 * each token's x once for all rows (a 2 x 4 tile needs 6 loads per 8 FMAs; one row against 4
 * tokens needed 10). Every (token, row) dot product sums k in the same order, one accumulator
 * over blocks of 8 then the 8 lanes and the tail, whatever the tile: a token's h does not
 * depend on which other tokens share its step. */
static inline __attribute__((always_inline)) void dots_tile(const float *const *a, const float *const *xs, long k,
                                                            float out[][TT], const int NJ, const int NT) {
    __m256 acc[4][TT];
    for (int j = 0; j < NJ; j++)
        for (int i = 0; i < NT; i++) acc[j][i] = _mm256_setzero_ps();
    long c = 0;
    for (; c + 8 <= k; c += 8) {
        __m256 av[4];
        for (int j = 0; j < NJ; j++) av[j] = _mm256_loadu_ps(a[j] + c);
        for (int i = 0; i < NT; i++) {
            const __m256 xv = _mm256_loadu_ps(xs[i] + c);
            for (int j = 0; j < NJ; j++) acc[j][i] = _mm256_fmadd_ps(av[j], xv, acc[j][i]);
        }
    }
    for (int j = 0; j < NJ; j++)
        for (int i = 0; i < NT; i++) {
            __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc[j][i]), _mm256_extractf128_ps(acc[j][i], 1));
            lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
            lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
            float r = _mm_cvtss_f32(lo);
            for (long q = c; q < k; q++) r += a[j][q] * xs[i][q];
            out[j][i] = r;
        }
}

/* The tile sizes as compile-time constants in each copy, so the accumulators stay in
 * registers (with run-time counts GCC kept them in memory: ~10x slower): nj rows (1, 2 or 4;
 * 4 only with nt <= 2) by nt tokens. */
static void dots(const float *const *a, int nj, const float *const *xs, int nt, long k, float out[][TT]) {
#define DOTS_NT(NJ) switch (nt) { \
    case 4: dots_tile(a, xs, k, out, NJ, 4); break; case 3: dots_tile(a, xs, k, out, NJ, 3); break; \
    case 2: dots_tile(a, xs, k, out, NJ, 2); break; default: dots_tile(a, xs, k, out, NJ, 1); break; }
    if (nj == 4) {
        if (nt == 2) dots_tile(a, xs, k, out, 4, 2); else dots_tile(a, xs, k, out, 4, 1);
    } else if (nj == 2) { DOTS_NT(2) } else { DOTS_NT(1) }
#undef DOTS_NT
}

#define SHRINK_ROWS 4       /* rows of A per shrink task */

/* h[t, j] = A[slot(t), j, :] . x[t] for the shrink's tasks k0..k1 of this thread, a task being
 * (active slot u, SHRINK_ROWS rows of A from jq): task = u * ceil(nR / SHRINK_ROWS) + jq. Groups
 * of up to 4 tokens take the rows two at a time, groups of 1-2 all four at once. */
static inline void lora_shrink_range(const float *A, long nR, long d_in, const float *x, long ldx, const lora_step *sp,
                                     long k0, long k1)
{
    const int32_t *order = sp->order, *seg_slot = sp->seg_slot, *seg_start = sp->seg_start, *seg_count = sp->seg_count;
    float *h = sp->h;
    const long np = (nR + SHRINK_ROWS - 1) / SHRINK_ROWS;
    for (long task = k0; task < k1; task++) {
        const long u = task / np, j0 = SHRINK_ROWS * (task % np);
        const long rows = nR - j0 < SHRINK_ROWS ? nR - j0 : SHRINK_ROWS;
        const float *a0 = A + ((long)seg_slot[u] * nR + j0) * d_in;
        const long q0 = seg_start[u], q1 = q0 + seg_count[u];
        for (long q = q0; q < q1; q += TT) {
            const int nt = q1 - q < TT ? (int)(q1 - q) : TT;
            const float *xs[TT];
            for (int i = 0; i < nt; i++) xs[i] = x + (long)order[q + i] * ldx;
            for (long j = 0; j < rows;) {
                const int nj = nt <= 2 && rows - j == 4 ? 4 : (rows - j >= 2 ? 2 : 1);
                const float *a[4] = {a0 + j * d_in, a0 + (j + 1) * d_in, a0 + (j + 2) * d_in, a0 + (j + 3) * d_in};
                float out[4][TT];
                dots(a, nj, xs, nt, d_in, out);
                for (int i = 0; i < nt; i++)
                    for (int jj = 0; jj < nj; jj++) h[(long)order[q + i] * nR + j0 + j + jj] = out[jj][i];
                j += nj;
            }
        }
    }
}

/* How many shrink tasks a step has (see lora_shrink_range). */
static inline long lora_shrink_tasks(long nR, const lora_step *sp) { return sp->U * ((nR + SHRINK_ROWS - 1) / SHRINK_ROWS); }

/* All of the shrink's tasks as an orphaned `omp for`, to call inside a parallel region (it
 * ends with the loop's barrier, so h is complete when it returns). */
static inline void lora_shrink_for(const float *A, long nR, long d_in, const float *x, long ldx, const lora_step *sp)
{
#pragma omp for schedule(static)
    for (long task = 0; task < lora_shrink_tasks(nR, sp); task++) lora_shrink_range(A, nR, d_in, x, ldx, sp, task, task + 1);
}

#endif

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

/* acc[i] += a . x_i over k for up to TT tokens; returns through out[]. */
static inline __attribute__((always_inline)) void dots_n(const float *a, const float *const *xs, const int nt, long k, float *out) {
    __m256 acc[TT][2];
    for (int i = 0; i < TT; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    long j = 0;
    for (; j + 16 <= k; j += 16) {
        const __m256 a0 = _mm256_loadu_ps(a + j), a1 = _mm256_loadu_ps(a + j + 8);
        for (int i = 0; i < nt; i++) {
            acc[i][0] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(xs[i] + j), acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(xs[i] + j + 8), acc[i][1]);
        }
    }
    for (; j + 8 <= k; j += 8) {
        const __m256 a0 = _mm256_loadu_ps(a + j);
        for (int i = 0; i < nt; i++) acc[i][0] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(xs[i] + j), acc[i][0]);
    }
    for (int i = 0; i < nt; i++) {
        __m256 s = _mm256_add_ps(acc[i][0], acc[i][1]);
        __m128 lo = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
        lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
        float r = _mm_cvtss_f32(lo);
        for (long q = j; q < k; q++) r += a[q] * xs[i][q];
        out[i] = r;
    }
}

/* The token count as a compile-time constant in each copy, so the accumulators stay in
 * registers (with a run-time count GCC kept them in memory: ~10x slower). */
static void dots(const float *a, const float *const *xs, int nt, long k, float *out) {
    switch (nt) {
    case 4: dots_n(a, xs, 4, k, out); break;
    case 3: dots_n(a, xs, 3, k, out); break;
    case 2: dots_n(a, xs, 2, k, out); break;
    default: dots_n(a, xs, 1, k, out); break;
    }
}

/* h[t, j] = A[slot(t), j, :] . x[t] for every token with a slot and j < nR: an orphaned
 * `omp for` over (slot, row of A) tasks, to call inside a parallel region (it ends with the
 * loop's barrier, so h is complete when it returns). */
static inline void lora_shrink_for(const float *A, long nR, long d_in, const float *x, long ldx, const lora_step *sp)
{
    const int32_t *order = sp->order, *seg_slot = sp->seg_slot, *seg_start = sp->seg_start, *seg_count = sp->seg_count;
    float *h = sp->h;
#pragma omp for schedule(static)
    for (long task = 0; task < sp->U * nR; task++) {
        const long u = task / nR, j = task % nR;
        const float *a = A + ((long)seg_slot[u] * nR + j) * d_in;
        const long q0 = seg_start[u], q1 = q0 + seg_count[u];
        for (long q = q0; q < q1; q += TT) {
            const int nt = q1 - q < TT ? (int)(q1 - q) : TT;
            const float *xs[TT];
            float out[TT] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int i = 0; i < nt; i++) xs[i] = x + (long)order[q + i] * ldx;
            dots(a, xs, nt, d_in, out);
            for (int i = 0; i < nt; i++) h[(long)order[q + i] * nR + j] = out[i];
        }
    }
}

#endif

/* Multi-LoRA shrink + expand for few-token steps on a CPU (AVX2 + FMA + OpenMP).
 *
 * For each token t with slot s = slot(t) >= 0 and each packed slice i (columns off_i..off_i+d_i):
 *   h[t, i*R:(i+1)*R] = A[s, i*R:(i+1)*R, :] @ x[t]
 *   y[t, off_i:off_i+d_i] += scale(i, s) * Bt[s, :, off_i:off_i+d_i]^T @ h[t, i*R:(i+1)*R]
 * with A [S, n*R, d_in] and Bt [S, R, d_out] contiguous, x and y rows strided (unit columns).
 *
 * Tokens come grouped by slot (from the step's LoRAMeta): each active slot's A rows and B
 * columns are read from memory once for all of its tokens, and no gathered copy of A or B is
 * ever made (the torch backend's gathers copy each token's A and B). Both phases split their
 * work over (slot, row of A) and (slot, block of 64 columns) tasks in one OpenMP region, so one
 * adapter or eight, both cores stream weights. A zero B adds exactly +0.0 (y unchanged).
 *
 * Why hand-written: see kernels/native_ops.py.
 */
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>


typedef struct {            /* one stacked projection's LoRA weights (cached per stack by native_ops.py) */
    int64_t S, R, n, d_in, d_out;
    int64_t slices[8];      /* output slice widths, n of them */
    const float *A;         /* [S, n*R, d_in] */
    const float *Bt;        /* [S, R, d_out] */
    const float *scale;     /* [n, S] or NULL (then every scale is alpha) */
    float alpha;
} lora_stack;

typedef struct {            /* one step's tokens grouped by slot (cached per step) */
    int64_t T, U;
    const int32_t *order;   /* [T] token ids grouped by slot */
    const int32_t *seg_slot, *seg_start, *seg_count;  /* [U] each active slot and its range in order */
    float *h;               /* scratch [T, >= n*R] */
    int64_t nthreads;
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

static inline __attribute__((always_inline)) void expand_n(const float *b, long d_out, long R, float hs[][64],
                                                           float *const *yt, long c0, long c1, const int nt) {
    long col = c0;
    for (; col + 8 <= c1; col += 8) {
        __m256 acc[TT];
        for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
        for (long r = 0; r < R; r++) {
            const __m256 bv = _mm256_loadu_ps(b + r * d_out + col);
            for (int t = 0; t < nt; t++) acc[t] = _mm256_fmadd_ps(_mm256_broadcast_ss(&hs[t][r]), bv, acc[t]);
        }
        for (int t = 0; t < nt; t++)
            _mm256_storeu_ps(yt[t] + col, _mm256_add_ps(_mm256_loadu_ps(yt[t] + col), acc[t]));
    }
    for (; col < c1; col++) {
        for (int t = 0; t < nt; t++) {
            float acc = 0.0f;
            for (long r = 0; r < R; r++) acc += hs[t][r] * b[r * d_out + col];
            yt[t][col] += acc;
        }
    }
}

static void expand(const float *b, long d_out, long R, float hs[][64], float *const *yt, long c0, long c1, int nt) {
    switch (nt) {
    case 4: expand_n(b, d_out, R, hs, yt, c0, c1, 4); break;
    case 3: expand_n(b, d_out, R, hs, yt, c0, c1, 3); break;
    case 2: expand_n(b, d_out, R, hs, yt, c0, c1, 2); break;
    default: expand_n(b, d_out, R, hs, yt, c0, c1, 1); break;
    }
}

void coe_lora_add(const lora_stack *st, const lora_step *sp, float *y, long ldy, const float *x, long ldx)
{
    const long R = st->R, n = st->n, nR = n * R, d_in = st->d_in, d_out = st->d_out, S = st->S, U = sp->U;
    const int32_t *order = sp->order, *seg_slot = sp->seg_slot, *seg_start = sp->seg_start, *seg_count = sp->seg_count;
    float *h = sp->h;
    /* Expand tasks: (slot, slice, column block). Each block spans whole stretches of B's R rows:
     * with blocks of a few hundred bytes (tried: 64 columns) the 16 row streams of a task never
     * train the hardware prefetcher and the expand runs at a fraction of memory bandwidth. So a
     * slice is split only as much as needed to give every thread work. */
    const long per = U >= sp->nthreads ? 1 : (sp->nthreads + U - 1) / U;   /* blocks per slice */
    const long chunks = n * per;
#pragma omp parallel num_threads((int)sp->nthreads)
    {
#pragma omp for schedule(static)
        for (long task = 0; task < U * nR; task++) {
            const long u = task / nR, j = task % nR;
            const float *a = st->A + ((long)seg_slot[u] * nR + j) * d_in;
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
        /* implicit barrier: every h is written before any expand reads it */
#pragma omp for schedule(static)
        for (long task = 0; task < U * chunks; task++) {
            const long u = task / chunks, i = (task % chunks) / per, c = task % per;
            long off = 0;
            for (long k = 0; k < i; k++) off += st->slices[k];
            const long width = ((st->slices[i] + per - 1) / per + 7) / 8 * 8;
            const long s = seg_slot[u];
            const long c0 = off + c * width;
            if (c0 >= off + st->slices[i]) continue;
            const long c1 = (c0 + width < off + st->slices[i]) ? c0 + width : off + st->slices[i];
            const float sc = st->scale ? st->scale[i * S + s] * st->alpha : st->alpha;
            const float *b = st->Bt + s * R * d_out;
            const long q0 = seg_start[u], q1 = q0 + seg_count[u];
            for (long q = q0; q < q1; q += TT) {
                const int nt = q1 - q < TT ? (int)(q1 - q) : TT;
                float hs[TT][64];
                float *yt[TT];
                for (int t = 0; t < nt; t++) {
                    const long tok = order[q + t];
                    const float *ht = h + tok * nR + i * R;
                    for (long r = 0; r < R; r++) hs[t][r] = sc == 1.0f ? ht[r] : ht[r] * sc;
                    yt[t] = y + tok * ldy;
                }
                expand(b, d_out, R, hs, yt, c0, c1, nt);
            }
        }
    }
}

int coe_lora_abi(void) { return 2; }

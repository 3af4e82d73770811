/* Multi-LoRA shrink + expand for few-token steps on a CPU (AVX2 + FMA + OpenMP; AVX-512 where the
 * CPU has it, see kernels.native).
 *
 * For each token t with slot s = slot(t) >= 0 and each packed slice i (columns off_i..off_i+d_i):
 *   h[t, i*R:(i+1)*R] = A[s, i*R:(i+1)*R, :] @ x[t]
 *   y[t, off_i:off_i+d_i] += scale(i, s) * Bt[s, :, off_i:off_i+d_i]^T @ h[t, i*R:(i+1)*R]
 * with A [S, n*R, d_in] and Bt [S, R, d_out] contiguous, x and y rows strided (unit columns).
 *
 * Tokens come grouped by slot (from the step's LoRAMeta): each active slot's A rows and B
 * columns are read from memory once for all of its tokens, and no gathered copy of A or B is
 * ever made (the torch backend's gathers copy each token's A and B). Both phases split their
 * work over (slot, row of A) and (slot, slice, column block) tasks in one OpenMP region, so one
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

#include "lora_shrink.h"

/* yt[t][col..] += hs[t] . b[:, col..] for nt tokens over columns c0..c1: register tiles of nt
 * tokens x 2 vectors of 8 columns (2 * nt independent FMA chains; one vector at a time left the
 * FMAs waiting on each other), each output summing the rank in order, so a token's result is
 * the same in any tile. */
static inline __attribute__((always_inline)) void expand_n(const float *b, long d_out, long R, float hs[][64],
                                                           float *const *yt, long c0, long c1, const int nt) {
    long col = c0;
#ifdef __AVX512F__
    /* with AVX-512 (see kernels.native): 2 vectors of 16 columns, the same FMAs per output */
    for (; col + 32 <= c1; col += 32) {
        __m512 acc[TT][2];
        for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
        for (long r = 0; r < R; r++) {
            const __m512 b0 = _mm512_loadu_ps(b + r * d_out + col), b1 = _mm512_loadu_ps(b + r * d_out + col + 16);
            for (int t = 0; t < nt; t++) {
                const __m512 hv = _mm512_set1_ps(hs[t][r]);
                acc[t][0] = _mm512_fmadd_ps(hv, b0, acc[t][0]);
                acc[t][1] = _mm512_fmadd_ps(hv, b1, acc[t][1]);
            }
        }
        for (int t = 0; t < nt; t++) {
            _mm512_storeu_ps(yt[t] + col, _mm512_add_ps(_mm512_loadu_ps(yt[t] + col), acc[t][0]));
            _mm512_storeu_ps(yt[t] + col + 16, _mm512_add_ps(_mm512_loadu_ps(yt[t] + col + 16), acc[t][1]));
        }
    }
#endif
    for (; col + 16 <= c1; col += 16) {
        __m256 acc[TT][2];
        for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        for (long r = 0; r < R; r++) {
            const __m256 b0 = _mm256_loadu_ps(b + r * d_out + col), b1 = _mm256_loadu_ps(b + r * d_out + col + 8);
            for (int t = 0; t < nt; t++) {
                const __m256 hv = _mm256_broadcast_ss(&hs[t][r]);
                acc[t][0] = _mm256_fmadd_ps(hv, b0, acc[t][0]);
                acc[t][1] = _mm256_fmadd_ps(hv, b1, acc[t][1]);
            }
        }
        for (int t = 0; t < nt; t++) {
            _mm256_storeu_ps(yt[t] + col, _mm256_add_ps(_mm256_loadu_ps(yt[t] + col), acc[t][0]));
            _mm256_storeu_ps(yt[t] + col + 8, _mm256_add_ps(_mm256_loadu_ps(yt[t] + col + 8), acc[t][1]));
        }
    }
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

/* Expand task: y[tokens of active slot u, c0..c1) += scale_i * h[., slice i] @ B[slot, c0..c1) for
 * every slice i that columns c0..c1 of the concatenated slices overlap. */
static inline void expand_task(const lora_stack *st, const lora_step *sp, long u, long c0, long c1, float *y, long ldy)
{
    const long R = st->R, nR = st->n * R, d_out = st->d_out, s = sp->seg_slot[u];
    const float *b = st->Bt + s * R * d_out;
    const long q0 = sp->seg_start[u], q1 = q0 + sp->seg_count[u];
    long off = 0;
    for (long i = 0; i < st->n; off += st->slices[i], i++) {
        const long lo = c0 > off ? c0 : off, hi = c1 < off + st->slices[i] ? c1 : off + st->slices[i];
        if (lo >= hi) continue;
        const float sc = st->scale ? st->scale[i * st->S + s] * st->alpha : st->alpha;
        for (long q = q0; q < q1; q += TT) {
            const int nt = q1 - q < TT ? (int)(q1 - q) : TT;
            float hs[TT][64];
            float *yt[TT];
            for (int t = 0; t < nt; t++) {
                const long tok = sp->order[q + t];
                const float *ht = sp->h + tok * nR + i * R;
                for (long r = 0; r < R; r++) hs[t][r] = sc == 1.0f ? ht[r] : ht[r] * sc;
                yt[t] = y + tok * ldy;
            }
            expand(b, d_out, R, hs, yt, lo, hi, nt);
        }
    }
}

void coe_lora_add(const lora_stack *st, const lora_step *sp, float *y, long ldy, const float *x, long ldx)
{
    const long nR = st->n * st->R, d_in = st->d_in, U = sp->U;
    /* Expand tasks: (slot, range of columns), P equal ranges of all the slices' columns (side by
     * side) for each slot: as many as give every thread work (P = 1 from nthreads slots on).
     * Each range spans whole stretches of B's R rows: with blocks of a few hundred bytes (tried:
     * 64 columns) the 16 row streams of a task never train the hardware prefetcher and the
     * expand runs at a fraction of memory bandwidth; with blocks of 128 columns for a 512-token
     * prompt (B in L1 for all its tokens) the y rows' short strided runs made it ~1.5x slower.
     * Ranges across the slices rather than slices cut in P: for q/k/v (576, 192, 192) on one
     * slot, halves of each slice left one thread 672 columns and the other 288. Measured (2-core
     * AVX-512 EPYC, one slot, SmolLM2's four projections, oneDNN GEMM + this call, 30 distinct
     * weights each, both builds interleaved, median of 30 paired rounds): 512 tokens +0.961 ->
     * +0.850 ms a layer over the GEMMs; 76 tokens unchanged (+0.165 / +0.159). */
    const long P = U >= sp->nthreads ? 1 : (sp->nthreads + U - 1) / U;
    const long width = ((st->d_out + P - 1) / P + 7) / 8 * 8;
#pragma omp parallel num_threads((int)sp->nthreads)
    {
        lora_shrink_for(st->A, nR, d_in, x, ldx, sp);  /* ends with a barrier: h is complete */
#pragma omp for schedule(static)
        for (long task = 0; task < U * P; task++) {
            const long c0 = (task % P) * width, c1 = c0 + width < st->d_out ? c0 + width : st->d_out;
            expand_task(st, sp, task / P, c0, c1, y, ldy);
        }
    }
}

int coe_lora_abi(void) { return 3; }

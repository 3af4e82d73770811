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
#include <math.h>  /* fmaf */

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
 * the same in any tile, and in any column range: the scalar tail takes the same FMA chain
 * (fmaf), not a multiply then an add (which differed in the last bit from the vector lanes, so
 * the columns a range's tail covered depended on how the columns were cut). */
static inline __attribute__((always_inline)) void expand_n(const float *b, long d_out, long R, float hs[][64],
                                                           float *const *yt, const float *const *rt, long c0, long c1,
                                                           const int nt) {
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
        for (int t = 0; t < nt; t++)
            for (int v = 0; v < 2; v++) {
                __m512 o = _mm512_add_ps(_mm512_loadu_ps(yt[t] + col + 16 * v), acc[t][v]);
                if (rt) o = _mm512_add_ps(_mm512_loadu_ps(rt[t] + col + 16 * v), o);
                _mm512_storeu_ps(yt[t] + col + 16 * v, o);
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
        for (int t = 0; t < nt; t++)
            for (int v = 0; v < 2; v++) {
                __m256 o = _mm256_add_ps(_mm256_loadu_ps(yt[t] + col + 8 * v), acc[t][v]);
                if (rt) o = _mm256_add_ps(_mm256_loadu_ps(rt[t] + col + 8 * v), o);
                _mm256_storeu_ps(yt[t] + col + 8 * v, o);
            }
    }
    for (; col + 8 <= c1; col += 8) {
        __m256 acc[TT];
        for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
        for (long r = 0; r < R; r++) {
            const __m256 bv = _mm256_loadu_ps(b + r * d_out + col);
            for (int t = 0; t < nt; t++) acc[t] = _mm256_fmadd_ps(_mm256_broadcast_ss(&hs[t][r]), bv, acc[t]);
        }
        for (int t = 0; t < nt; t++) {
            __m256 o = _mm256_add_ps(_mm256_loadu_ps(yt[t] + col), acc[t]);
            if (rt) o = _mm256_add_ps(_mm256_loadu_ps(rt[t] + col), o);
            _mm256_storeu_ps(yt[t] + col, o);
        }
    }
    for (; col < c1; col++) {
        for (int t = 0; t < nt; t++) {
            float acc = 0.0f;
            for (long r = 0; r < R; r++) acc = fmaf(hs[t][r], b[r * d_out + col], acc);  /* as the vector lanes: one FMA chain */
            yt[t][col] = rt ? rt[t][col] + (yt[t][col] + acc) : yt[t][col] + acc;
        }
    }
}

static void expand(const float *b, long d_out, long R, float hs[][64], float *const *yt, const float *const *rt,
                   long c0, long c1, int nt) {
    switch (nt) {
    case 4: expand_n(b, d_out, R, hs, yt, rt, c0, c1, 4); break;
    case 3: expand_n(b, d_out, R, hs, yt, rt, c0, c1, 3); break;
    case 2: expand_n(b, d_out, R, hs, yt, rt, c0, c1, 2); break;
    default: expand_n(b, d_out, R, hs, yt, rt, c0, c1, 1); break;
    }
}

/* Slice i's scaling for slot s (the per-slot table, if any, times alpha). */
static inline float slice_scale(const lora_stack *st, long i, long s)
{
    return st->scale ? st->scale[i * st->S + s] * st->alpha : st->alpha;
}

/* out[r] = h[r] * sc for a token's R shrink values of one slice (h itself where sc is 1). */
static inline void scaled_h(const float *h, long R, float sc, float *out)
{
    for (long r = 0; r < R; r++) out[r] = sc == 1.0f ? h[r] : h[r] * sc;
}

/* Expand task: y[tokens order[q0..q1) of active slot u, c0..c1) += scale_i * h[., slice i] @
 * B[slot, c0..c1) for every slice i that columns c0..c1 of the concatenated slices overlap;
 * with res (not NULL), y = res + (y + that) instead: a residual add in the same pass. */
static inline void expand_task(const lora_stack *st, const lora_step *sp, long u, long q0, long q1, long c0, long c1,
                               float *y, long ldy, const float *res, long ldr)
{
    const long R = st->R, nR = st->n * R, d_out = st->d_out, s = sp->seg_slot[u];
    const float *b = st->Bt + s * R * d_out;
    long off = 0;
    for (long i = 0; i < st->n; off += st->slices[i], i++) {
        const long lo = c0 > off ? c0 : off, hi = c1 < off + st->slices[i] ? c1 : off + st->slices[i];
        if (lo >= hi) continue;
        const float sc = slice_scale(st, i, s);
        for (long q = q0; q < q1; q += TT) {
            const int nt = q1 - q < TT ? (int)(q1 - q) : TT;
            float hs[TT][64];
            float *yt[TT];
            const float *rt[TT];
            for (int t = 0; t < nt; t++) {
                const long tok = sp->order[q + t];
                scaled_h(sp->h + tok * nR + i * R, R, sc, hs[t]);
                yt[t] = y + tok * ldy;
                rt[t] = res ? res + tok * ldr : NULL;
            }
            expand(b, d_out, R, hs, yt, res ? rt : NULL, lo, hi, nt);
        }
    }
}

/* Tile k of the step's tiles of up to TT tokens of one slot, counted over the slots in order:
 * its slot's index in *u, its first position in order in *q0; returns its number of tokens. */
static inline int slot_tile(const lora_step *sp, long k, long *u, long *q0)
{
    *u = slot_of_tile(sp, TT, &k);
    *q0 = sp->seg_start[*u] + k * TT;
    const long left = sp->seg_start[*u] + sp->seg_count[*u] - *q0;
    return left < TT ? (int)left : TT;
}

typedef struct {            /* a rotation to apply to rows as their expand finishes (coe_rope_lora) */
    const float *cos_t, *sin_t;  /* [T, D] */
    float *qk;
    long ldq, nqk, D;
} rope_args;

static inline void rope_row(const float *y, const float *c, const float *sn, float *out, long nqk, long D);

/* The step's row tiles (slot, TT tokens, whole rows) as an orphaned `omp for`, handed out as
 * they come: each tile's expand (with res: y = res + (y + delta) in the same store), then, with
 * rp, the rotation of its rows while they are in L1. */
static inline void expand_row_tiles_for(const lora_stack *st, const lora_step *sp, float *y, long ldy,
                                        const float *res, long ldr, const rope_args *rp)
{
#pragma omp for schedule(dynamic, 1)
    for (long k = 0; k < lora_shrink_token_tasks(sp, TT); k++) {
        long u, q0;
        const int nt = slot_tile(sp, k, &u, &q0);
        expand_task(st, sp, u, q0, q0 + nt, 0, st->d_out, y, ldy, res, ldr);
        for (int i = 0; rp && i < nt; i++) {
            const long t = sp->order[q0 + i];
            rope_row(y + t * ldy, rp->cos_t + t * rp->D, rp->sin_t + t * rp->D, rp->qk + t * rp->ldq, rp->nqk, rp->D);
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
     * +0.850 ms a layer over the GEMMs; 76 tokens unchanged (+0.165 / +0.159).
     * Steps where a slot has more than SHRINK_TOKENS tokens (prompts) take row tiles instead:
     * (slot, TT tokens) tasks, each over its tokens' whole rows (columns 0..d_out), handed out as
     * they come like the SwiGLU's. In a real prompt step y has just been written by the base
     * GEMM and is no longer in L1/L2: a thread then streams its rows end to end (one run of
     * d_out floats per token) instead of re-entering every row at its own range's offset; B
     * (r x d_out, 36-61 KB for SmolLM2) is read from L2 for each tile. Measured in the engine's
     * real prompt steps (16 prompts x 32 tokens, SmolLM2, r=16 all-linear, 2-core AVX-512 EPYC,
     * the builds alternating step by step, paired medians of the step over the base's): one
     * adapter +62 / +71 / +62 ms -> +38 / +41 / +41 (12, 12, 24 rounds); 8 adapters (64 tokens
     * each) +74 -> +65 (10 rounds). Every output is the same FMA chain over the rank in either
     * task shape (the scalar tail too, see expand_n), so the results are bit for bit the same. */
    const long P = U >= sp->nthreads ? 1 : (sp->nthreads + U - 1) / U;
    const long width = ((st->d_out + P - 1) / P + 7) / 8 * 8;
    const int tiles = lora_most_tokens(sp) > SHRINK_TOKENS;
#pragma omp parallel num_threads((int)sp->nthreads)
    {
        lora_shrink_for(st->A, nR, d_in, x, ldx, sp);  /* ends with a barrier: h is complete */
        if (tiles)
            expand_row_tiles_for(st, sp, y, ldy, NULL, 0, NULL);
        else
#pragma omp for schedule(static)
        for (long task = 0; task < U * P; task++) {
            const long c0 = (task % P) * width, c1 = c0 + width < st->d_out ? c0 + width : st->d_out;
            const long u = task / P;
            expand_task(st, sp, u, sp->seg_start[u], sp->seg_start[u] + sp->seg_count[u], c0, c1, y, ldy, NULL, 0);
        }
    }
}

/* ---------------------------------------------------------------- SwiGLU with gate/up's LoRA
 *
 * act[t, c] = silu(g) * u, g = gu[t, c] + dg, u = gu[t, I + c] + du, where (dg, du) is token t's
 * gate/up LoRA delta (zero for a token without a slot, or when st is NULL): the expand of the
 * stacked gate/up projection done where its sums are used, instead of adding it into gu (a
 * read and a write of gu, 6 MB for a 512-token prompt of SmolLM2) and then reading gu again for
 * the activation. Every delta is summed exactly as coe_lora_add sums it (the rank in order, one
 * chain, then added to gu), so act is what coe_lora_add followed by the activation gives,
 * rounded once more only where the activation's exp differs from torch's.
 * silu(g) = g / (1 + exp(-g)), as torch forms it, with exp from Cephes' single-precision
 * polynomial (within ~2 ulp of expf; torch uses Sleef's, within 1). */
#ifdef __AVX512F__
typedef __m512 vf;
#define VW 16
#define V_LOAD _mm512_loadu_ps
#define V_STORE _mm512_storeu_ps
#define V_SET1 _mm512_set1_ps
#define V_ADD _mm512_add_ps
#define V_MUL _mm512_mul_ps
#define V_DIV _mm512_div_ps
#define V_FMA _mm512_fmadd_ps
#define V_MIN _mm512_min_ps
#define V_MAX _mm512_max_ps
#define V_ZERO _mm512_setzero_ps
#define V_FIRST _mm512_cvtss_f32
static inline vf v_round(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf v_pow2(vf y, vf n) { return _mm512_scalef_ps(y, n); }
#else
typedef __m256 vf;
#define VW 8
#define V_LOAD _mm256_loadu_ps
#define V_STORE _mm256_storeu_ps
#define V_SET1 _mm256_set1_ps
#define V_ADD _mm256_add_ps
#define V_MUL _mm256_mul_ps
#define V_DIV _mm256_div_ps
#define V_FMA _mm256_fmadd_ps
#define V_MIN _mm256_min_ps
#define V_MAX _mm256_max_ps
#define V_ZERO _mm256_setzero_ps
#define V_FIRST _mm256_cvtss_f32
static inline vf v_round(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf v_pow2(vf y, vf n) {  /* y * 2^n for integral n in [-127, 127] */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

static inline vf v_exp(vf x)
{
    x = V_MIN(V_MAX(x, V_SET1(-87.3365478515625f)), V_SET1(88.3762626647949f));
    const vf n = v_round(V_MUL(x, V_SET1(1.44269504088896341f)));
    x = V_FMA(n, V_SET1(-0.693359375f), x);
    x = V_FMA(n, V_SET1(2.12194440e-4f), x);
    vf p = V_SET1(1.9875691500E-4f);
    p = V_FMA(p, x, V_SET1(1.3981999507E-3f));
    p = V_FMA(p, x, V_SET1(8.3334519073E-3f));
    p = V_FMA(p, x, V_SET1(4.1665795894E-2f));
    p = V_FMA(p, x, V_SET1(1.6666665459E-1f));
    p = V_FMA(p, x, V_SET1(5.0000001201E-1f));
    p = V_FMA(p, V_MUL(x, x), V_ADD(x, V_SET1(1.0f)));
    return v_pow2(p, n);
}

static inline vf v_swiglu(vf g, vf u)
{
    const vf e = v_exp(V_MUL(g, V_SET1(-1.0f)));
    return V_MUL(V_DIV(g, V_ADD(V_SET1(1.0f), e)), u);
}

static inline float s_swiglu(float g, float u)  /* the scalar tail, with the same exp */
{
    return g / (1.0f + V_FIRST(v_exp(V_SET1(-g)))) * u;
}

/* One token's row without a LoRA. */
static inline void swiglu_row(const float *g, const float *u, float *a, long I)
{
    long c = 0;
    for (; c + VW <= I; c += VW) V_STORE(a + c, v_swiglu(V_LOAD(g + c), V_LOAD(u + c)));
    for (; c < I; c++) a[c] = s_swiglu(g[c], u[c]);
}

/* nt tokens of one slot (gate/up B rows b, stride d_out; up's columns start at I), columns
 * c0..c1: register tiles of nt tokens x NV vectors of gate and of up columns. */
static inline __attribute__((always_inline)) long swiglu_lora_cols(const float *b, long d_out, long I, long R,
                                                                   float hg[][64], float hu[][64],
                                                                   const float *const *gt, float *const *at,
                                                                   long c, long c1, const int nt, const int NV)
{
    for (; c + NV * VW <= c1; c += NV * VW) {
        vf ag[TT][2], au[TT][2];
        for (int t = 0; t < nt; t++)
            for (int v = 0; v < NV; v++) ag[t][v] = au[t][v] = V_ZERO();
        for (long r = 0; r < R; r++) {
            vf bg[2], bu[2];
            for (int v = 0; v < NV; v++) {
                bg[v] = V_LOAD(b + r * d_out + c + v * VW);
                bu[v] = V_LOAD(b + r * d_out + I + c + v * VW);
            }
            for (int t = 0; t < nt; t++) {
                const vf xg = V_SET1(hg[t][r]), xu = V_SET1(hu[t][r]);
                for (int v = 0; v < NV; v++) {
                    ag[t][v] = V_FMA(xg, bg[v], ag[t][v]);
                    au[t][v] = V_FMA(xu, bu[v], au[t][v]);
                }
            }
        }
        for (int t = 0; t < nt; t++)
            for (int v = 0; v < NV; v++) {
                const long cc = c + v * VW;
                V_STORE(at[t] + cc, v_swiglu(V_ADD(V_LOAD(gt[t] + cc), ag[t][v]), V_ADD(V_LOAD(gt[t] + I + cc), au[t][v])));
            }
    }
    return c;
}

static inline __attribute__((always_inline)) void swiglu_lora_tile(const float *b, long d_out, long I, long R,
                                                                   float hg[][64], float hu[][64],
                                                                   const float *const *gt, float *const *at, const int nt)
{
#ifdef __AVX512F__
    long c = swiglu_lora_cols(b, d_out, I, R, hg, hu, gt, at, 0, I, nt, 2);
#else
    long c = swiglu_lora_cols(b, d_out, I, R, hg, hu, gt, at, 0, I, nt, 1);
#endif
    c = swiglu_lora_cols(b, d_out, I, R, hg, hu, gt, at, c, I, nt, 1);
    for (; c < I; c++)
        for (int t = 0; t < nt; t++) {
            float dg = 0.0f, du = 0.0f;
            for (long r = 0; r < R; r++) {
                dg = fmaf(hg[t][r], b[r * d_out + c], dg);
                du = fmaf(hu[t][r], b[r * d_out + I + c], du);
            }
            at[t][c] = s_swiglu(gt[t][c] + dg, gt[t][I + c] + du);
        }
}

/* act [T, I] (row stride lda) from gu [T, 2I] (row stride ldg); st/sp the gate/up stack (two
 * slices of I) and the step, or NULL for no LoRA; x [T, d_in] the projection's input (for the
 * shrink). */
void coe_swiglu_lora(const float *gu, long ldg, long T, long I, float *act, long lda,
                     const lora_stack *st, const lora_step *sp, const float *x, long ldx, int nthreads)
{
    const int lora = st != NULL && sp != NULL && sp->U > 0;
    const long R = lora ? st->R : 0, nR = 2 * R;
    const long tiles = lora ? lora_shrink_token_tasks(sp, TT) : 0;  /* tiles of up to TT tokens of one slot */
#pragma omp parallel num_threads(lora ? (int)sp->nthreads : nthreads)
    {
        if (lora) lora_shrink_for(st->A, nR, st->d_in, x, ldx, sp);  /* ends with a barrier: h is complete */
#pragma omp for schedule(static) nowait
        for (long t = 0; t < T; t++)  /* tokens without a slot */
            if (!lora || sp->row_slot[t] < 0) swiglu_row(gu + t * ldg, gu + t * ldg + I, act + t * lda, I);
        if (lora) {
#pragma omp for schedule(dynamic, 1)
            for (long k = 0; k < tiles; k++) {
                long u, q0;
                const int nt = slot_tile(sp, k, &u, &q0);
                const long s = sp->seg_slot[u];
                const float sg = slice_scale(st, 0, s), su = slice_scale(st, 1, s);
                float hg[TT][64], hu[TT][64];
                const float *gt[TT];
                float *at[TT];
                for (int i = 0; i < nt; i++) {
                    const long tok = sp->order[q0 + i];
                    scaled_h(sp->h + tok * nR, R, sg, hg[i]);
                    scaled_h(sp->h + tok * nR + R, R, su, hu[i]);
                    gt[i] = gu + tok * ldg;
                    at[i] = act + tok * lda;
                }
                const float *b = st->Bt + s * R * st->d_out;
                switch (nt) {
                case 4: swiglu_lora_tile(b, st->d_out, I, R, hg, hu, gt, at, 4); break;
                case 3: swiglu_lora_tile(b, st->d_out, I, R, hg, hu, gt, at, 3); break;
                case 2: swiglu_lora_tile(b, st->d_out, I, R, hg, hu, gt, at, 2); break;
                default: swiglu_lora_tile(b, st->d_out, I, R, hg, hu, gt, at, 1); break;
                }
            }
        }
    }
}

/* y = res + (y + delta): coe_lora_add and then the residual add (res + y, as torch's `x + o`
 * rounds it) in one pass over y, for a projection whose output only feeds the residual stream
 * (o and down). Rows without a slot get res + y. Every task is a row tile over whole rows
 * (slot, TT tokens), as coe_lora_add's prompt steps use, whatever the step's size.
 * Why: in a prompt step coe_lora_add's expand reads and writes y (just written by the base GEMM,
 * out of L1/L2), and the residual add then reads it again; here the expand's store is the
 * residual add's. The results are bit for bit those of coe_lora_add then res + y. */
void coe_lora_add_residual(const lora_stack *st, const lora_step *sp, float *y, long ldy, const float *x, long ldx,
                           const float *res, long ldr)
{
    const long nR = st->n * st->R, d_in = st->d_in, T = sp->T, d_out = st->d_out;
#pragma omp parallel num_threads((int)sp->nthreads)
    {
        lora_shrink_for(st->A, nR, d_in, x, ldx, sp);  /* ends with a barrier: h is complete */
#pragma omp for schedule(static) nowait
        for (long t = 0; t < T; t++) {  /* tokens without a slot: the residual add alone */
            if (sp->row_slot[t] >= 0) continue;
            float *yr = y + t * ldy;
            const float *rr = res + t * ldr;
            long c = 0;
            for (; c + VW <= d_out; c += VW) V_STORE(yr + c, V_ADD(V_LOAD(rr + c), V_LOAD(yr + c)));
            for (; c < d_out; c++) yr[c] = rr[c] + yr[c];
        }
        expand_row_tiles_for(st, sp, y, ldy, res, ldr, NULL);
    }
}

/* ---------------------------------------------------------------- RoPE (with q/k/v's LoRA)
 *
 * qk[t, j*D + d] = y[t, j*D + d] * cos[t, d] + y[t, j*D + partner(d)] * sin[t, d] for the nqk
 * heads of q and k at the start of each row of y (the stacked q/k/v output), partner(d) = d +
 * D/2 for d < D/2 else d - D/2, and sin's first half negated (the engine's rope_sin): transformers'
 * q * cos + rotate_half(q) * sin, rounded as torch rounds it (two products, then their sum; kept
 * apart from an FMA by v_opaque). With st/sp (not NULL), y first gets each token's q/k/v LoRA
 * delta as coe_lora_add adds it (bit for bit), in row tiles (slot, TT tokens) that then rotate
 * the same rows while they are in L1: v keeps its delta in y, q and k go to qk.
 * Why: in torch the rotation is four passes over q/k (roll, two products, a sum) and three
 * temporaries, and with a LoRA the expand a read and a write of y before them (y has just been
 * written by the base GEMM and is out of L1/L2 in a prompt step); a decode step paid the four
 * ops' dispatch 30 times. */
/* x, hidden from the compiler's contraction of a product and a sum into one FMA */
#ifdef __AVX512F__
static inline vf v_opaque(vf v) { __asm__("" : "+v"(v)); return v; }
#else
static inline vf v_opaque(vf v) { __asm__("" : "+x"(v)); return v; }
#endif
static inline float s_opaque(float v) { __asm__("" : "+x"(v)); return v; }

/* One token's rotation: vectors of VW where they divide D/2 (SmolLM2's D/2 = 32), else scalars. */
static inline void rope_row(const float *y, const float *c, const float *sn, float *out, long nqk, long D)
{
    const long half = D / 2;
    for (long j = 0; j < nqk; j++) {
        const float *yh = y + j * D;
        float *oh = out + j * D;
        long d = 0;
        if (half % VW == 0)
            for (; d < D; d += VW) {
                const long pd = d < half ? d + half : d - half;
                const vf a = v_opaque(V_MUL(V_LOAD(yh + d), V_LOAD(c + d)));
                const vf b = v_opaque(V_MUL(V_LOAD(yh + pd), V_LOAD(sn + d)));
                V_STORE(oh + d, V_ADD(a, b));
            }
        for (; d < D; d++) {
            const long pd = d < half ? d + half : d - half;
            oh[d] = s_opaque(yh[d] * c[d]) + s_opaque(yh[pd] * sn[d]);
        }
    }
}

/* qk [T, nqk*D] (row stride ldq) from y [T, >= nqk*D] (row stride ldy), cos/sin [T, D] (the
 * step's rows of the tables); st/sp/x: the q/k/v LoRA and its input, or NULL. */
void coe_rope_lora(float *y, long ldy, long T, long nqk, long D, const float *cos_t, const float *sin_t, float *qk,
                   long ldq, const lora_stack *st, const lora_step *sp, const float *x, long ldx, int nthreads)
{
    const int lora = st != NULL && sp != NULL && sp->U > 0;
    const rope_args rp = {cos_t, sin_t, qk, ldq, nqk, D};
    /* a decode step's rotation (16 rows of SmolLM2: 12K products) is done before a second
     * thread would be awake: one thread below 64K products */
    const int nth = lora ? (int)sp->nthreads : (T * nqk * D >= 65536 ? nthreads : 1);
#pragma omp parallel num_threads(nth)
    {
        if (lora) lora_shrink_for(st->A, st->n * st->R, st->d_in, x, ldx, sp);  /* ends with a barrier */
#pragma omp for schedule(static) nowait
        for (long t = 0; t < T; t++)
            if (!lora || sp->row_slot[t] < 0) rope_row(y + t * ldy, cos_t + t * D, sin_t + t * D, qk + t * ldq, nqk, D);
        if (lora) expand_row_tiles_for(st, sp, y, ldy, NULL, 0, &rp);
    }
}

int coe_lora_abi(void) { return 6; }

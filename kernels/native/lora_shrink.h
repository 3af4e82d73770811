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
#ifdef __AVX512F__
#define NJ4_MAX_NT 4        /* 4 rows of A by up to 4 tokens: 16 of the 32 vector registers */
#else
#define NJ4_MAX_NT 2        /* 4 rows by 2 tokens: 8 of the 16 */
#endif

/* Element c of a row of A: float32, or float16 widened exactly (HALF, a compile-time constant
 * after inlining; the engine's fused block kernel keeps a float16 copy of A, see qmatmul.c). */
static inline __attribute__((always_inline)) __m256 a_load8(const void *a, long c, const int HALF) {
    return HALF ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)a + c)))
                : _mm256_loadu_ps((const float *)a + c);
}

static inline __attribute__((always_inline)) float a_at(const void *a, long c, const int HALF) {
    return HALF ? _cvtsh_ss(((const uint16_t *)a)[c]) : ((const float *)a)[c];
}

/* out_j[i] = A row j . x_i for NJ rows of A (a[0..NJ-1]) and NT tokens: NJ * NT accumulators
 * over k (8 where the tile allows), each row of A loaded once per 8 columns for all tokens and
 * each token's x once for all rows (a 2 x 4 tile needs 6 loads per 8 FMAs; one row against 4
 * tokens needed 10). Every (token, row) dot product sums k in the same order, one accumulator
 * over blocks of 8 then the 8 lanes and the tail, whatever the tile: a token's h does not
 * depend on which other tokens share its step. */
#ifdef __AVX512F__
/* The same with 16-float vectors (a build for AVX-512 CPUs, see kernels.native): blocks of 16,
 * the 16 lanes summed by _mm512_reduce_add_ps, then the tail; again one order for every tile. */
static inline __attribute__((always_inline)) __m512 a_load16(const void *a, long c, const int HALF) {
    return HALF ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)a + c)))
                : _mm512_loadu_ps((const float *)a + c);
}

/* The 16 sums of a 4 x 4 tile's accumulators (acc[j][i]) at once: red[4 i + j] is exactly
 * _mm512_reduce_add_ps(acc[j][i]), the same pairs added in the same tree (lanes l + l+8, then
 * l + l+4, l + l+2, l + l+1), but each level adds two accumulators' lanes in one vector: 15 adds
 * and 30 shuffles for the tile where 16 separate reductions take 64 adds and as many
 * extract/shuffle steps. */
static inline __attribute__((always_inline)) void reduce_tile16(__m512 acc[4][TT], float red[16]) {
    __m512 w[8], z[4], v[2];
    for (int m = 0; m < 8; m++) {  /* level 1: accumulators 2m, 2m+1 (a = 4 j + i) */
        const __m512 p = acc[(2 * m) / 4][(2 * m) % 4], q = acc[(2 * m + 1) / 4][(2 * m + 1) % 4];
        w[m] = _mm512_add_ps(_mm512_shuffle_f32x4(p, q, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(p, q, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    for (int n = 0; n < 4; n++)  /* level 2: quarter c of z[n] holds accumulator 4n + c */
        z[n] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * n], w[2 * n + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(w[2 * n], w[2 * n + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int p = 0; p < 2; p++)  /* level 3: quarter c of v[p] holds accumulators 8p + c, 8p + 4 + c */
        v[p] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * p], z[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(z[2 * p], z[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* level 4: lane 4c + j holds accumulator 4j + c, i.e. row j against token c */
    _mm512_storeu_ps(red, _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(3, 1, 3, 1))));
}

#ifdef __AVX512BF16__
/* x rounded to bfloat16 (nearest even, finite x), as the vector conversions round it. */
static inline float bf16_round(float x) {
    union { float f; uint32_t u; } v = {x};
    v.u = (v.u + 0x7FFFu + ((v.u >> 16) & 1u)) & 0xFFFF0000u;
    return v.f;
}
#endif

/* A's element times x's in the tail of a dot product: A float32 or float16 (a_at) times x, or, in
 * bfloat16 (HALF 2), A's bfloat16 value times x rounded to bfloat16, as the vector lanes form them. */
static inline __attribute__((always_inline)) float tail_product(const void *a, long c, float x, const int HALF) {
#ifdef __AVX512BF16__
    if (HALF == 2) {
        union { uint32_t u; float f; } v = {(uint32_t)((const uint16_t *)a)[c] << 16};
        return v.f * bf16_round(x);
    }
#endif
    return a_at(a, c, HALF) * x;
}

/* HALF: A in float32 (0), float16 (1), or bfloat16 (2, AVX512-BF16 builds). In bfloat16 each x
 * is rounded to bfloat16 (nearest even) as it is loaded and vdpbf16ps adds the products of 32
 * (A, x) pairs into the 16 float32 lanes, twice an FMA's multiply-adds per instruction and no
 * widening of A: the fused block kernel's opt-in low-precision LoRA (LORA_BF16 in
 * coe/engine/native/qmatmul.c). The lanes and the tail are summed alike in every format. */
static inline __attribute__((always_inline)) void dots_tile(const void *const *a, const float *const *xs, long k,
                                                            float out[][TT], const int NJ, const int NT, const int HALF) {
    __m512 acc[4][TT];
    for (int j = 0; j < NJ; j++)
        for (int i = 0; i < NT; i++) acc[j][i] = _mm512_setzero_ps();
    long c = 0;
#ifdef __AVX512BF16__
    for (; HALF == 2 && c + 32 <= k; c += 32) {
        __m512bh av[4];
        for (int j = 0; j < NJ; j++) av[j] = (__m512bh)_mm512_loadu_si512((const uint16_t *)a[j] + c);
        for (int i = 0; i < NT; i++) {
            const __m512bh xv = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xs[i] + c + 16), _mm512_loadu_ps(xs[i] + c));
            for (int j = 0; j < NJ; j++) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], av[j], xv);
        }
    }
#endif
    for (; HALF != 2 && c + 16 <= k; c += 16) {
        __m512 av[4];
        for (int j = 0; j < NJ; j++) av[j] = a_load16(a[j], c, HALF);
        for (int i = 0; i < NT; i++) {
            const __m512 xv = _mm512_loadu_ps(xs[i] + c);
            for (int j = 0; j < NJ; j++) acc[j][i] = _mm512_fmadd_ps(av[j], xv, acc[j][i]);
        }
    }
    float red[16];
    if (NJ == 4 && NT == 4) reduce_tile16(acc, red);
    for (int j = 0; j < NJ; j++)
        for (int i = 0; i < NT; i++) {
            float r = NJ == 4 && NT == 4 ? red[4 * i + j] : _mm512_reduce_add_ps(acc[j][i]);
            for (long q = c; q < k; q++) r += tail_product(a[j], q, xs[i][q], HALF);
            out[j][i] = r;
        }
}
#else
static inline __attribute__((always_inline)) void dots_tile(const void *const *a, const float *const *xs, long k,
                                                            float out[][TT], const int NJ, const int NT, const int HALF) {
    __m256 acc[4][TT];
    for (int j = 0; j < NJ; j++)
        for (int i = 0; i < NT; i++) acc[j][i] = _mm256_setzero_ps();
    long c = 0;
    for (; c + 8 <= k; c += 8) {
        __m256 av[4];
        for (int j = 0; j < NJ; j++) av[j] = a_load8(a[j], c, HALF);
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
            for (long q = c; q < k; q++) r += a_at(a[j], q, HALF) * xs[i][q];
            out[j][i] = r;
        }
}
#endif

/* The tile sizes as compile-time constants in each copy, so the accumulators stay in
 * registers (with run-time counts GCC kept them in memory: ~10x slower): nj rows (1, 2 or 4;
 * 4 only with nt <= NJ4_MAX_NT) by nt tokens. */
static inline __attribute__((always_inline)) void dots_t(const void *const *a, int nj, const float *const *xs, int nt, long k,
                                                         float out[][TT], const int HALF) {
#define DOTS_NT(NJ) switch (nt) { \
    case 4: dots_tile(a, xs, k, out, NJ, 4, HALF); break; case 3: dots_tile(a, xs, k, out, NJ, 3, HALF); break; \
    case 2: dots_tile(a, xs, k, out, NJ, 2, HALF); break; default: dots_tile(a, xs, k, out, NJ, 1, HALF); break; }
    if (nj == 4) {
#ifdef __AVX512F__
        DOTS_NT(4)
#else
        if (nt == 2) dots_tile(a, xs, k, out, 4, 2, HALF); else dots_tile(a, xs, k, out, 4, 1, HALF);
#endif
    } else if (nj == 2) { DOTS_NT(2) } else { DOTS_NT(1) }
#undef DOTS_NT
}

static void dots(const void *const *a, int nj, const float *const *xs, int nt, long k, float out[][TT]) {
    dots_t(a, nj, xs, nt, k, out, 0);
}

static void dots_half(const void *const *a, int nj, const float *const *xs, int nt, long k, float out[][TT]) {
    dots_t(a, nj, xs, nt, k, out, 1);
}

#ifdef __AVX512BF16__
static void dots_bf16(const void *const *a, int nj, const float *const *xs, int nt, long k, float out[][TT]) {
    dots_t(a, nj, xs, nt, k, out, 2);
}
#endif

#define SHRINK_ROWS 4       /* rows of A per shrink task */

/* h[t, j0 + j] = A rows j0.. of one slot (a0 points at row j0) . x[t] for rows j < rows and the
 * tokens order[q0..q1): tiles of up to 4 tokens, against the rows two at a time, or four at
 * once for tiles of up to NJ4_MAX_NT tokens. A is float32, or float16 when ``half`` is 1 (then
 * every product uses A's value widened exactly), or bfloat16 when it is 2 (see dots_tile). */
static inline __attribute__((always_inline)) void shrink_block(const char *a0, long j0, long rows, long nR, long d_in,
                                                              const float *x, long ldx,
                                                              const lora_step *sp, long q0, long q1, int half)
{
    const long esize = half ? 2 : 4;
    for (long q = q0; q < q1; q += TT) {
        const int nt = q1 - q < TT ? (int)(q1 - q) : TT;
        const float *xs[TT];
        for (int i = 0; i < nt; i++) xs[i] = x + (long)sp->order[q + i] * ldx;
        for (long j = 0; j < rows;) {
            const int nj = nt <= NJ4_MAX_NT && rows - j >= 4 ? 4 : (rows - j >= 2 ? 2 : 1);
            const void *a[4] = {a0 + j * d_in * esize, a0 + (j + 1) * d_in * esize, a0 + (j + 2) * d_in * esize,
                                a0 + (j + 3) * d_in * esize};
            float out[4][TT];
#ifdef __AVX512BF16__
            if (half == 2) dots_bf16(a, nj, xs, nt, d_in, out); else
#endif
            if (half) dots_half(a, nj, xs, nt, d_in, out); else dots(a, nj, xs, nt, d_in, out);
            for (int i = 0; i < nt; i++)
                for (int jj = 0; jj < nj; jj++) sp->h[(long)sp->order[q + i] * nR + j0 + j + jj] = out[jj][i];
            j += nj;
        }
    }
}

/* Shrink task `task`, (active slot u, SHRINK_ROWS rows of A from jq): task = u * ceil(nR /
 * SHRINK_ROWS) + jq, against all of u's tokens (parts 1), or the first (part 0) or second
 * (part 1) half of them (parts 2, cut at a whole token tile). */
static inline void lora_shrink_task(const void *A, long nR, long d_in, const float *x, long ldx, const lora_step *sp,
                                    long task, int part, int parts, int half)
{
    const long np = (nR + SHRINK_ROWS - 1) / SHRINK_ROWS;
    const long u = task / np, j0 = SHRINK_ROWS * (task % np);
    const long rows = nR - j0 < SHRINK_ROWS ? nR - j0 : SHRINK_ROWS;
    const char *a0 = (const char *)A + ((long)sp->seg_slot[u] * nR + j0) * d_in * (half ? 2 : 4);
    long q0 = sp->seg_start[u], q1 = q0 + sp->seg_count[u];
    if (parts == 2) {
        long qm = q0 + (sp->seg_count[u] / 2 + TT - 1) / TT * TT;
        qm = qm < q1 ? qm : q1;
        if (part) q0 = qm; else q1 = qm;
    }
    shrink_block(a0, j0, rows, nR, d_in, x, ldx, sp, q0, q1, half);
}

/* How many shrink tasks a step has (see lora_shrink_task). */
static inline long lora_shrink_tasks(long nR, const lora_step *sp) { return sp->U * ((nR + SHRINK_ROWS - 1) / SHRINK_ROWS); }

/* The shrink for steps with many tokens on a slot (prompts): tasks of tb tokens (at most
 * SHRINK_TOKENS, fewer when that leaves a thread idle) of one slot against all nR rows of its
 * A, tiles of up to 4 tokens (x in L1) against the rows (A, tens of KB, from L2). The (slot,
 * rows) tasks above would read every token's x again for each task: for a 512-token prompt, the
 * step's x (1.2-3 MB) ~4-12 times from L3.
 * The same dots_tile sums, so h is bit for bit the same either way. Measured (2-core AVX-512
 * EPYC, one slot, 512 tokens, r=16, C LoRA per call over SmolLM2's four projections, median of
 * 7 x 10 calls): 0.715 ms a layer -> 0.634 (qkv 0.200 -> 0.167, down 0.157 -> 0.128). */
#define SHRINK_TOKENS 32

/* Which active slot's tiles of tb tokens hold tile number *k (counted over the slots in
 * order): returns the slot's index u and leaves in *k the tile's number within that slot. */
static inline long slot_of_tile(const lora_step *sp, long tb, long *k)
{
    long u = 0;
    for (;; u++) {
        const long nb = (sp->seg_count[u] + tb - 1) / tb;
        if (*k < nb) return u;
        *k -= nb;
    }
}

/* The most tokens any active slot of the step has. */
static inline long lora_most_tokens(const lora_step *sp)
{
    long most = 0;
    for (long u = 0; u < sp->U; u++) most = sp->seg_count[u] > most ? sp->seg_count[u] : most;
    return most;
}

static inline long lora_shrink_token_tasks(const lora_step *sp, long tb)
{
    long n = 0;
    for (long u = 0; u < sp->U; u++) n += (sp->seg_count[u] + tb - 1) / tb;
    return n;
}

static inline void lora_shrink_tokens(const void *A, long nR, long d_in, const float *x, long ldx, const lora_step *sp,
                                      long task, long tb, int half)
{
    const long u = slot_of_tile(sp, tb, &task);  /* the task's slot and its block of tokens */
    const char *a0 = (const char *)A + (long)sp->seg_slot[u] * nR * d_in * (half ? 2 : 4);
    const long q0 = sp->seg_start[u] + task * tb, qe = sp->seg_start[u] + sp->seg_count[u];
    shrink_block(a0, 0, nR, nR, d_in, x, ldx, sp, q0, q0 + tb < qe ? q0 + tb : qe, half);
}

/* All of the shrink's tasks as an orphaned `omp for`, to call inside a parallel region (it
 * ends with the loop's barrier, so h is complete when it returns): token tasks when a slot
 * has more than SHRINK_TOKENS tokens, else (slot, rows) tasks. */
static inline void lora_shrink_for(const float *A, long nR, long d_in, const float *x, long ldx, const lora_step *sp)
{
    const long most = lora_most_tokens(sp);
    if (most > SHRINK_TOKENS) {
        long tb = (most + 4 * sp->nthreads - 1) / (4 * sp->nthreads);  /* >= 4 tasks a thread for the largest slot */
        tb = tb < 8 ? 8 : (tb > SHRINK_TOKENS ? SHRINK_TOKENS : (tb + TT - 1) / TT * TT);
#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < lora_shrink_token_tasks(sp, tb); task++) lora_shrink_tokens(A, nR, d_in, x, ldx, sp, task, tb, 0);
        return;
    }
#pragma omp for schedule(static)
    for (long task = 0; task < lora_shrink_tasks(nR, sp); task++) lora_shrink_task(A, nR, d_in, x, ldx, sp, task, 0, 1, 0);
}

#endif

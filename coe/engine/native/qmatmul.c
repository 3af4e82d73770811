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
 * AVX-512: where the CPU has it, kernels.native builds this file with -mavx512f/bw/vl/dq, and the
 * #ifdef __AVX512F__ paths take 16-float vectors: q41_row16 / q80_row16 (two weight vectors a
 * block), expand_tile16 (pairs of 8-output panels) and the shrink's dots_tile (lora_shrink.h).
 * Measured on a 2-core AVX-512 EPYC (COE_NATIVE_ISA=avx2 vs avx512, python -m coe.engine.bench
 * --kernel --rounds 20, 120 calls of SmolLM2's shapes on 16 rows, two runs each): base 24.6 / 24.3
 * ms -> 17.7 / 17.1; one adapter 25.5 / 23.2 -> 17.5 / 16.6; eight adapters 24.3 / 24.1 -> 18.3 /
 * 17.5. COE_NATIVE_ISA=avx2 builds the AVX2 paths on any CPU. With 32 vector registers the
 * AVX-512 build also takes wider LoRA tiles: the expand then 4 tokens x 4 pairs of blocks (now
 * wider, see lora_expand_blocks), the shrink 4 rows of A x 4 tokens (NJ4_MAX_NT). Real 16-row decode steps,
 * both builds in one process, 60 paired rounds, two runs: one adapter +0.99 / +0.96 ms over the
 * base -> +0.89 / +0.89; eight adapters +2.71 / +2.63 -> +2.52 / +2.50 (same sums per output).
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
#ifdef __AVX512F__
#define TTE 8         /* tokens per tile of the fused LoRA expand (see lora_expand_blocks) */
#else
#define TTE TT
#endif
/* Each thread prefetches the weight row (its quants and scales) this many outputs ahead of the
 * one it computes: into L2 (T1) on Intel CPUs, non-temporally (NTA: weights are read once a
 * step) on AMD CPUs (cpu_amd, below), as measured on each.
 * On the 2-core AMD EPYC (real 16-row decode steps of SmolLM2, interleaved with the build without
 * the prefetch, 40 rounds each, 3 runs): the base step 2.6 ms faster (~4.5%; 2.6 / 2.6 / 2.6); a
 * 1-row step unchanged (+0.3 ms, noise). A T0 hint or 32 rows ahead did no better there.
 * On a 2-core Intel Xeon VM (AMX/AVX-512, 2 MB L2 a core, ~21 GB/s from memory), NTA left the
 * steps bound by memory latency: an NTA prefetch holds one of L1's few miss buffers until its
 * line arrives, a T1 prefetch is handed to L2, which keeps more misses in flight (and T1 lines
 * may stay in L3 for the next step). There, the 120 block-kernel calls of a step plus the Q8_0
 * head (random weights of SmolLM2's shapes, builds interleaved, each timed after a pass of its
 * own, 20 rounds): 1 row 11.94 ms with NTA -> 4.77 with T1 (4.76 with T1 32 rows ahead); 16 rows
 * 27.59 -> 22.32 (22.78). Real decode steps of the engine, the two builds alternating step by
 * step, 60 rounds: 16 rows on the base 41.76 -> 35.69 ms, on one adapter 42.75 -> 37.52, over
 * eight 45.82 -> 39.94; 1 row 14.54 -> 10.60, with an adapter 16.08 -> 10.91. The LoRA's share
 * of the 16-row kernel calls grew (one adapter +0.88 -> +1.47 ms over the base's calls), not in
 * the setup above (no KV cache or attention between the calls): presumably the T1 lines, which
 * pass through L3, now push the adapter's A and B out of it between steps, where NTA left them.
 * The same weights, so results are unchanged. */
#define W_AHEAD 16

/* Whether the CPU is AMD's (the prefetch hints above and in pf_list), set once when the library
 * is loaded. */
static int cpu_amd;
__attribute__((constructor)) static void detect_cpu(void)
{
    __builtin_cpu_init();
    cpu_amd = __builtin_cpu_is("amd") ? 1 : 0;
}

/* Prefetches as volatile asm: GCC 12 deleted loops of _mm_prefetch (no side effects to it) when
 * they stood in both branches of an if on a run-time hint, so that the weights were not
 * prefetched at all (found by counting the prefetch instructions in the built library). */
static inline __attribute__((always_inline)) void pf_t0(const void *p) { __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)p)); }
static inline __attribute__((always_inline)) void pf_t1(const void *p) { __asm__ volatile("prefetcht1 %0" : : "m"(*(const char *)p)); }
static inline __attribute__((always_inline)) void pf_nta(const void *p) { __asm__ volatile("prefetchnta %0" : : "m"(*(const char *)p)); }

/* The cache lines of [p, p + bytes), prefetched into L2 (l2) or non-temporally. */
static inline void pf_span(const void *p, long bytes, int l2)
{
    for (long o = 0; o < bytes; o += 64) {
        if (l2) pf_t1((const char *)p + o);
        else pf_nta((const char *)p + o);
    }
}

/* One weight row's quants (qbytes) and scales (sbytes), prefetched (see W_AHEAD). */
static inline void prefetch_row(const void *q, long qbytes, const void *s, long sbytes)
{
    pf_span(q, qbytes, !cpu_amd);
    pf_span(s, sbytes, !cpu_amd);
}

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

/* y[r, n] = the sum of row r's accumulators. */
static inline __attribute__((always_inline)) void acc_store(__m256 acc[][4], float *y, long ldy, long n,
                                                            const int MT, const int NA)
{
#pragma GCC unroll 8
    for (int r = 0; r < MT; r++) {
        __m256 a = acc[r][0];
        if (NA > 1) a = _mm256_add_ps(a, acc[r][1]);
        if (NA > 2) a = _mm256_add_ps(a, _mm256_add_ps(acc[r][2], acc[r][3]));
        y[r * ldy + n] = hsum(a);
    }
}

/* One output element per row of the tile, for MT rows of x (MT a compile-time constant after
 * inlining, so acc[] stays in registers). */
static inline __attribute__((always_inline)) void q41_row(
    const uint8_t *qs, const float *dm, const float *x, long ldx, float *y, long ldy,
    long n, long nb, const int MT)
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
    acc_store(acc, y, ldy, n, MT, NA);
}

#ifdef __AVX512F__
/* The same with 16-float vectors (built where the CPU has AVX-512, see kernels.native): two
 * weight vectors a block (Q4_1 when KIND is 0, Q8_0 when 1: a compile-time constant after
 * inlining), and blocks taken in pairs so that a row's NA accumulators (1, 2 or 4) are
 * compile-time indices: block 2i feeds acc 0 and 1, block 2i+1 acc 2 and 3 (mod NA). A row's
 * sum still does not depend on the other rows of the tile, only on MT (as above). */
static inline __attribute__((always_inline)) void block16(const void *qs, const float *sc, long b, const float *x, long ldx,
                                                          __m512 acc[][4], const int MT, const int NA, const int A0,
                                                          const int A1, const int KIND)
{
    __m512 w0, w1;
    if (KIND == 0) {  /* Q4_1: d * q + m, low nibbles elements 0-15, high nibbles 16-31 */
        const __m512 d = _mm512_set1_ps(sc[2 * b]), m = _mm512_set1_ps(sc[2 * b + 1]);
        const __m128i mask = _mm_set1_epi8(0x0F);
        const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint8_t *)qs + 16 * b));
        w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask))), d, m);
        w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask))), d, m);
    } else {  /* Q8_0: d * q */
        const __m512 d = _mm512_set1_ps(sc[b]);
        const int8_t *q = (const int8_t *)qs + QK * b;
        w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), d);
        w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), d);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MT; r++) {
        const float *xr = x + r * ldx + QK * b;
        acc[r][A0 % NA] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[r][A0 % NA]);
        acc[r][A1 % NA] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[r][A1 % NA]);
    }
}

static inline __attribute__((always_inline)) void row16(const void *qs, const float *sc, const float *x, long ldx, float *y,
                                                        long ldy, long n, long nb, const int MT, const int KIND)
{
    const int NA = MT <= 2 ? 4 : (MT <= 8 ? 2 : 1);
    __m512 acc[MAX_ROWS][4];
#pragma GCC unroll 8
    for (int r = 0; r < MT; r++)
#pragma GCC unroll 4
        for (int a = 0; a < NA; a++) acc[r][a] = _mm512_setzero_ps();
    long b = 0;
    for (; b + 2 <= nb; b += 2) {
        block16(qs, sc, b, x, ldx, acc, MT, NA, 0, 1, KIND);
        block16(qs, sc, b + 1, x, ldx, acc, MT, NA, 2, 3, KIND);
    }
    if (b < nb) block16(qs, sc, b, x, ldx, acc, MT, NA, 0, 1, KIND);
#pragma GCC unroll 8
    for (int r = 0; r < MT; r++) {
        __m512 a = acc[r][0];
        if (NA > 1) a = _mm512_add_ps(a, acc[r][1]);
        if (NA > 2) a = _mm512_add_ps(a, _mm512_add_ps(acc[r][2], acc[r][3]));
        y[r * ldy + n] = _mm512_reduce_add_ps(a);
    }
}

static inline __attribute__((always_inline)) void q41_row16(const uint8_t *qs, const float *dm, const float *x, long ldx,
                                                            float *y, long ldy, long n, long nb, const int MT)
{
    row16(qs, dm, x, ldx, y, ldy, n, nb, MT, 0);
}

static inline __attribute__((always_inline)) void q80_row16(const int8_t *qs, const float *dd, const float *x, long ldx,
                                                            float *y, long ldy, long n, long nb, const int MT)
{
    row16(qs, dd, x, ldx, y, ldy, n, nb, MT, 1);
}
#define Q41_ROW q41_row16
#else
#define Q41_ROW q41_row
#endif

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
    acc_store(acc, y, ldy, n, MT, NA);
}

#ifdef __AVX512F__
#define Q80_ROW q80_row16
#else
#define Q80_ROW q80_row
#endif

#define TILE_CASES(FN, ...) \
    switch (mt) { \
    case 1: FN(__VA_ARGS__, 1); break; case 2: FN(__VA_ARGS__, 2); break; \
    case 3: FN(__VA_ARGS__, 3); break; case 4: FN(__VA_ARGS__, 4); break; \
    case 5: FN(__VA_ARGS__, 5); break; case 6: FN(__VA_ARGS__, 6); break; \
    case 7: FN(__VA_ARGS__, 7); break; default: FN(__VA_ARGS__, 8); break; }

/* A stacked projection's LoRA for the fused kernel: A [S, nR, K] (scale folded in) and B as
 * panels [S, ceil(N/16), R, 16]: B^T cut into blocks of 8 outputs, blocks 2p and 2p + 1 side by
 * side in pair p (row r of the pair: block 2p's 8 values, then block 2p + 1's; an odd last
 * block's partner is zero padding, never read), both float16, widened exactly to float32 as
 * they are read; slices ending at bounds[1..n] (multiples of 8, checked by the caller). A
 * block's row is 16 bytes at a stride of 32 (block_panel); a pair's row is one 32-byte load,
 * widened to one 16-float vector (expand_tile16).
 * Why float16: a step over 8 adapters reads every adapter's A and B (157 MB a step for SmolLM2 at
 * r=16 in float32), and the expand waited on B's reads. Measured (python -m coe.engine.bench
 * --kernel's setup, 16 rows, 40 interleaved rounds, the 2-core EPYC): 8 adapters +5.06 ms over
 * the base with float32 panels, +3.55 with float16; one adapter unchanged (+1.25 / +1.37). The
 * rounding of B to float16 (relative 2^-11) moved those outputs by at most 1.2e-5 (|y| ~ 5).
 * A in float16 as well: see coe.engine.model.LoRAStack. */
typedef struct {
    const uint16_t *A;
    const uint16_t *P;
    int64_t R, n;
    int64_t bounds[9];
    int64_t bf16;  /* A and the panels in bfloat16 (see LORA_BF16 below), else float16 */
} lora_rows;

#define PSTRIDE (2 * NBLK)  /* float16 values from one row of a block's panel to the next */

/* Slot s's panels among lr's (N outputs: ceil(N/16) pairs of R rows). */
static inline const uint16_t *slot_panels(const lora_rows *lr, long s, long N)
{
    return lr->P + s * ((N / NBLK + 1) / 2) * lr->R * PSTRIDE;
}

/* Block g's panel (its row 0) among a slot's panels pb: the second block of a pair starts 8
 * values into each row of float16 panels, 16 into each (two rank steps') row of bfloat16 ones
 * (bf, see LORA_BF16). */
static inline const uint16_t *block_panel(const uint16_t *pb, long g, long R, int bf)
{
    return pb + (g / 2) * R * PSTRIDE + (g % 2) * (bf ? 2 : 1) * NBLK;
}

/* y[t, 8c:8c+8] += h_t . panel_c for NT tokens of one slot and NB blocks of 8 outputs: a
 * register tile of NT x NB accumulators (8 when it can: independent FMA chains hide the FMA
 * latency), each summing the rank in order (one chain), so a token's output does not depend on
 * the tile it was computed in (alone or in a batch), and a zero panel adds exactly +0.0. Per
 * rank step: NB panel loads and NT broadcasts for NT * NB FMAs. */
static inline __attribute__((always_inline)) void expand_tile(const uint16_t *const *panel, const float *const *ht, long R,
                                                              float *const *yt, const int NT, const int NB)
{
    __m256 acc[TT][4];
    for (int g = 0; g < NT; g++)
        for (int c = 0; c < NB; c++) acc[g][c] = _mm256_setzero_ps();
    for (long r = 0; r < R; r++) {
        __m256 bv[4];
        for (int c = 0; c < NB; c++) bv[c] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(panel[c] + r * PSTRIDE)));
        for (int g = 0; g < NT; g++) {
            const __m256 hv = _mm256_broadcast_ss(ht[g] + r);
            for (int c = 0; c < NB; c++) acc[g][c] = _mm256_fmadd_ps(hv, bv[c], acc[g][c]);
        }
    }
    for (int g = 0; g < NT; g++)
        for (int c = 0; c < NB; c++)
            _mm256_storeu_ps(yt[g] + c * NBLK, _mm256_add_ps(_mm256_loadu_ps(yt[g] + c * NBLK), acc[g][c]));
}

#ifdef __AVX512F__
#define EXPAND_PAIRS 6  /* the most pairs of blocks in one expand_tile16 */
/* expand_tile with 16-float vectors: NP pairs of blocks (pair[p]: a pair's panels, see
 * lora_rows), each pair's row one vector. Every output still sums the rank in order in one
 * chain, the same FMAs as expand_tile's, so results do not depend on which tile (or which of
 * the two) computed them. */
static inline __attribute__((always_inline)) void expand_tile16(const uint16_t *const *pair, const float *const *ht, long R,
                                                                float *const *yt, const int NT, const int NP)
{
    __m512 acc[TTE][EXPAND_PAIRS];
    for (int g = 0; g < NT; g++)
        for (int p = 0; p < NP; p++) acc[g][p] = _mm512_setzero_ps();
    for (long r = 0; r < R; r++) {
        __m512 bv[EXPAND_PAIRS];
        for (int p = 0; p < NP; p++) bv[p] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(pair[p] + r * PSTRIDE)));
        for (int g = 0; g < NT; g++) {
            const __m512 hv = _mm512_set1_ps(ht[g][r]);
            for (int p = 0; p < NP; p++) acc[g][p] = _mm512_fmadd_ps(hv, bv[p], acc[g][p]);
        }
    }
    for (int g = 0; g < NT; g++)
        for (int p = 0; p < NP; p++)
            _mm512_storeu_ps(yt[g] + p * 2 * NBLK, _mm512_add_ps(_mm512_loadu_ps(yt[g] + p * 2 * NBLK), acc[g][p]));
}
#endif

#ifdef __AVX512BF16__
/* LORA_BF16: the opt-in bfloat16 LoRA of AVX512-BF16 CPUs (lr->bf16; coe.engine.model.LoRAStack
 * says when the engine takes it). A is bfloat16 [S, nR, K] and each pair's panel holds R/2 rows
 * of 32 values: row k is output o's (B[o, 2k], B[o, 2k + 1]) for the pair's 16 outputs in order
 * (block 2p's 8, then block 2p + 1's), so that one vdpbf16ps adds two rank steps of 16 outputs:
 * [S, ceil(N/16), R/2, 16, 2], the float16 panels' size (R even). h is rounded to bfloat16 as
 * the expand reads it, x as the shrink reads it (dots_tile in kernels/native/lora_shrink.h).
 * Each output sums its rank pairs in order in one chain whatever its tile, as the float16 path
 * does.
 * Why: vdpbf16ps does 32 multiply-adds where an FMA does 16, and needs no widening of A or B.
 * The price is precision: x, A, h and B rounded to 8 significant bits (relative 2^-9). */
#define LORA_BF16 1

/* h of NT tokens (ht[g], R values) as bfloat16 pairs: hp[g * R2 + k] holds (h[2k], h[2k + 1]). */
static inline void h_pairs(const float *const *ht, long R, int nt, uint32_t *hp)
{
    const long R2 = R / 2;
    for (int g = 0; g < nt; g++)
        for (long c = 0; c < R; c += 16) {
            const __mmask16 m = R - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (R - c)) - 1);
            const __m256bh b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, ht[g] + c));
            _mm256_mask_storeu_epi16((uint16_t *)(hp + g * R2) + c, m, (__m256i)b);
        }
}

/* expand_tile16 in bfloat16: NP pairs' panels (pair[p]) against NT tokens' h pairs. */
static inline __attribute__((always_inline)) void expand_tile16_bf(const uint16_t *const *pair, const uint32_t *hp, long R2,
                                                                   float *const *yt, const int NT, const int NP)
{
    __m512 acc[TTE][EXPAND_PAIRS];
    for (int g = 0; g < NT; g++)
        for (int p = 0; p < NP; p++) acc[g][p] = _mm512_setzero_ps();
    for (long k = 0; k < R2; k++) {
        __m512bh bv[EXPAND_PAIRS];
        for (int p = 0; p < NP; p++) bv[p] = (__m512bh)_mm512_loadu_si512(pair[p] + k * 2 * PSTRIDE);
        for (int g = 0; g < NT; g++) {
            const __m512bh hv = (__m512bh)_mm512_set1_epi32((int)hp[g * R2 + k]);
            for (int p = 0; p < NP; p++) acc[g][p] = _mm512_dpbf16_ps(acc[g][p], hv, bv[p]);
        }
    }
    for (int g = 0; g < NT; g++)
        for (int p = 0; p < NP; p++)
            _mm512_storeu_ps(yt[g] + p * 2 * NBLK, _mm512_add_ps(_mm512_loadu_ps(yt[g] + p * 2 * NBLK), acc[g][p]));
}

/* expand_tile in bfloat16: NB single blocks (panel[c], block_panel) with 8-float vectors. */
static inline __attribute__((always_inline)) void expand_tile_bf(const uint16_t *const *panel, const uint32_t *hp, long R2,
                                                                 float *const *yt, const int NT, const int NB)
{
    __m256 acc[TT][4];
    for (int g = 0; g < NT; g++)
        for (int c = 0; c < NB; c++) acc[g][c] = _mm256_setzero_ps();
    for (long k = 0; k < R2; k++) {
        __m256bh bv[4];
        for (int c = 0; c < NB; c++) bv[c] = (__m256bh)_mm256_loadu_si256((const __m256i *)(panel[c] + k * 2 * PSTRIDE));
        for (int g = 0; g < NT; g++) {
            const __m256bh hv = (__m256bh)_mm256_set1_epi32((int)hp[g * R2 + k]);
            for (int c = 0; c < NB; c++) acc[g][c] = _mm256_dpbf16_ps(acc[g][c], hv, bv[c]);
        }
    }
    for (int g = 0; g < NT; g++)
        for (int c = 0; c < NB; c++)
            _mm256_storeu_ps(yt[g] + c * NBLK, _mm256_add_ps(_mm256_loadu_ps(yt[g] + c * NBLK), acc[g][c]));
}
#endif

/* One tile of single blocks (expand_tile), or its bfloat16 twin where hp (the tile's h pairs) is set. */
static inline __attribute__((always_inline)) void block_tile(const uint16_t *const *panel, const float *const *ht,
                                                             const uint32_t *hp, long R, float *const *yt, const int NT,
                                                             const int NB)
{
#ifdef LORA_BF16
    if (hp) {
        expand_tile_bf(panel, hp, R / 2, yt, NT, NB);
        return;
    }
#endif
    expand_tile(panel, ht, R, yt, NT, NB);
}

#ifdef __AVX512F__
/* One tile of pairs (expand_tile16), or its bfloat16 twin where hp is set. */
static inline __attribute__((always_inline)) void pair_tile(const uint16_t *const *pair, const float *const *ht,
                                                            const uint32_t *hp, long R, float *const *yt, const int NT,
                                                            const int NP)
{
#ifdef LORA_BF16
    if (hp) {
        expand_tile16_bf(pair, hp, R / 2, yt, NT, NP);
        return;
    }
#endif
    expand_tile16(pair, ht, R, yt, NT, NP);
}
#endif

/* Blocks c0..c1 (of the call's, from block blk) for a tile of nt tokens with 8-float vectors
 * (the bfloat16 panels' tiles where hp, the tile's h pairs, is not NULL):
 * 4, 2 or 1 blocks at a time, tokens 4 at a time. */
static inline void expand_blocks8(const uint16_t *pb, long R, long blk, int c0, int c1, const float *const *ht, float *const *yt,
                                  int nt, const uint32_t *hp)
{
    for (int c = c0; c < c1;) {
        const int nb = nt <= 2 && c1 - c >= 4 ? 4 : (c1 - c >= 2 ? 2 : 1);
        const uint16_t *pc[4];
        for (int k = 0; k < nb; k++) pc[k] = block_panel(pb, blk + c + k, R, hp != NULL);
        for (int g0 = 0; g0 < nt; g0 += TT) {
            const int mt = nt - g0 < TT ? nt - g0 : TT;
            float *yc[TT];
            for (int g = 0; g < mt; g++) yc[g] = yt[g0 + g] + c * NBLK;
            const float *const *hc = ht + g0;
            const uint32_t *hq = hp ? hp + g0 * (R / 2) : NULL;
#define EXPAND_NT(NB) switch (mt) { \
            case 4: block_tile(pc, hc, hq, R, yc, 4, NB); break; case 3: block_tile(pc, hc, hq, R, yc, 3, NB); break; \
            case 2: block_tile(pc, hc, hq, R, yc, 2, NB); break; default: block_tile(pc, hc, hq, R, yc, 1, NB); break; }
            if (nb == 4) { EXPAND_NT(4) } else if (nb == 2) { EXPAND_NT(2) } else { EXPAND_NT(1) }
#undef EXPAND_NT
        }
        c += nb;
    }
}

/* The LoRA delta of every row with a slot, added to y[:, 8 blk : 8 (blk + nblk)] for nblk (at
 * most EXPAND_BLOCKS) blocks of slice i: tiles of up to 4 tokens x 2 blocks, or 2 tokens x 4
 * blocks; with AVX-512, tiles of up to TTE (8) tokens of a slot against up to 3 pairs of blocks
 * (5-8 tokens) or 6 (1-4 tokens), at most 24 accumulators; a block before the first whole pair
 * (blk odd) and one left after the last go 4 tokens at a time with 8-float vectors. Every
 * output sums the rank in one chain whatever its tile, so results are bit for bit those of
 * 4-token tiles.
 * Why 8 tokens: each B panel row is loaded and widened once per token tile, so a one-adapter
 * 16-token step widened B 4 times with 4-token tiles, 2 times now. Measured on the 2-core Intel
 * Xeon VM (real 16-row decode steps, both builds alternating step by step, two runs of 50 and 60
 * rounds): the block-kernel calls' LoRA cost over the base's, one adapter +1.34 / +1.38 ms with
 * 4-token tiles, +1.20 / +1.24 with 8; over eight adapters (2 tokens a slot, the same tiles)
 * +3.35 / +3.27 against +3.28 / +3.35. Alone (one thread, a [16, 3072] call with its data in
 * cache), 4-token tiles ran at 46 GMAC/s, 8-token tiles at 49.
 * Why pairs side by side in the panels, and 3 or 6 of them a tile: a pair's row is then one
 * 32-byte load and one widening, not two 16-byte loads joined, and each broadcast h value
 * feeds 3 (or 6) FMAs, not 2 (or 4). Measured alone (one thread, one slot, data in L1/L2, the
 * 2-core AVX-512 EPYC, whose FMA peak there is 58.7 GMAC/s a core): 16 tokens x 1536 outputs
 * 42.9 -> 49.8 GMAC/s (73% -> 85% of the peak), 2 tokens 32.0 -> 38.0, 1 token 26.7 -> 28.2;
 * with the pairs side by side but 2 (or 4) a tile, 16 tokens 44.9. In real 16-row decode steps
 * the expand gains less, its panels coming from L2 rather than L1 (rdtsc inside the calls,
 * summed over both threads, both builds alternating step by step, 30 rounds): one adapter
 * 4.94 -> 4.69 M cycles a step, eight adapters 4.27 -> 3.64 M. */
#ifdef __AVX512F__
#define EXPAND_BLOCKS (2 * EXPAND_PAIRS)
#else
#define EXPAND_BLOCKS 4
#endif
static inline void lora_expand_blocks(const lora_rows *lr, const lora_step *sp, long nR, long N, long blk, int nblk,
                                      long i, float *y, long ldy)
{
    const long R = lr->R, n0 = blk * NBLK;
    for (long u = 0; u < sp->U; u++) {
        const uint16_t *pb = slot_panels(lr, sp->seg_slot[u], N);
        const long q0 = sp->seg_start[u], q1 = q0 + sp->seg_count[u];
        for (long q = q0; q < q1; q += TTE) {
            const int nt = q1 - q < TTE ? (int)(q1 - q) : TTE;
            const float *ht[TTE];
            float *yt[TTE];
            for (int g = 0; g < nt; g++) {
                ht[g] = sp->h + (long)sp->order[q + g] * nR + i * R;
                yt[g] = y + (long)sp->order[q + g] * ldy + n0;
            }
            int c = 0;
            const uint32_t *hp = NULL;  /* the tile's h as bfloat16 pairs, in the bfloat16 LoRA */
#ifdef LORA_BF16
            uint32_t hbuf[lr->bf16 ? TTE * (R / 2) : 1];
            if (lr->bf16) {
                h_pairs(ht, R, nt, hbuf);
                hp = hbuf;
            }
#endif
#ifdef __AVX512F__
            if (blk % 2) {  /* the second block of a pair: alone */
                expand_blocks8(pb, R, blk, 0, 1, ht, yt, nt, hp);
                c = 1;
            }
            const int npmax = nt > 4 ? 3 : EXPAND_PAIRS;  /* at most 24 accumulators */
            while (nblk - c >= 2) {  /* whole pairs: block blk + c is even */
                const int np = (nblk - c) / 2 < npmax ? (nblk - c) / 2 : npmax;
                const uint16_t *pc[EXPAND_PAIRS];
                for (int k = 0; k < np; k++) pc[k] = block_panel(pb, blk + c + 2 * k, R, 0);  /* even: a pair's start */
                float *yc[TTE];
                for (int g = 0; g < nt; g++) yc[g] = yt[g] + c * NBLK;
#define EXPAND16_NT(NP) switch (nt) { \
                case 4: pair_tile(pc, ht, hp, R, yc, 4, NP); break; case 3: pair_tile(pc, ht, hp, R, yc, 3, NP); break; \
                case 2: pair_tile(pc, ht, hp, R, yc, 2, NP); break; default: pair_tile(pc, ht, hp, R, yc, 1, NP); break; }
#define EXPAND16_WIDE(NP) switch (nt) { \
                case 8: pair_tile(pc, ht, hp, R, yc, 8, NP); break; case 7: pair_tile(pc, ht, hp, R, yc, 7, NP); break; \
                case 6: pair_tile(pc, ht, hp, R, yc, 6, NP); break; default: pair_tile(pc, ht, hp, R, yc, 5, NP); break; }
                if (nt > 4) { if (np == 3) { EXPAND16_WIDE(3) } else if (np == 2) { EXPAND16_WIDE(2) } else { EXPAND16_WIDE(1) } }
                else if (np == 6) { EXPAND16_NT(6) } else if (np == 5) { EXPAND16_NT(5) } else if (np == 4) { EXPAND16_NT(4) }
                else if (np == 3) { EXPAND16_NT(3) } else if (np == 2) { EXPAND16_NT(2) } else { EXPAND16_NT(1) }
#undef EXPAND16_NT
#undef EXPAND16_WIDE
                c += 2 * np;
            }
#endif
            expand_blocks8(pb, R, blk, c, nblk, ht, yt, nt, hp);  /* what is left */
        }
    }
}

/* [lo, hi) of n items for thread t of nt: contiguous, sizes differing by at most one. */
static inline void split(long n, int t, int nt, long *lo, long *hi)
{
    const long q = n / nt, r = n % nt;
    *lo = t * q + (t < r ? t : r);
    *hi = *lo + q + (t < r);
}

/* Memory a thread reads later in the call (its share of the LoRA's A rows and B panels),
 * prefetched a few cache lines per output and row tile while it computes the base outputs: the
 * base loop is bound by arithmetic and leaves the memory bus idle, while eight adapters' A and B
 * (78 MB a step for SmolLM2 at r=16 in float16, more than the base's blocks) would otherwise be
 * read in stalls.
 * Spread over every row tile (a 16-row step has two), not only the first: half as many lines at
 * a time. Measured on a 2-core Intel Xeon VM (AMX/AVX-512, 2 MB L2 a core; kernel_times' setup
 * with the builds interleaved, 30 rounds; LoRA cost over the base in ms a step): eight adapters
 * +5.72 with the first tile only -> +5.03 over every tile (T0 hint both); one adapter +1.83 ->
 * +1.71 (noise).
 * The hint: into L2 (T1) on Intel CPUs, where the same setup gave eight adapters +5.03
 * with T0 -> +4.45 with T1 (L1 is 48 KB; a call's share is up to ~540 KB); real 16-row decode
 * steps, both builds alternating step by step, 80 rounds: eight adapters -1.19 ms a step
 * (paired median), one adapter +0.30 against the base's -0.21 (noise). On AMD CPUs into L1
 * (T0): Zen 4 and later drop some T1/T2 prefetches, and with 8 adapters on a 2-core EPYC T0 cost
 * 0.7-3.0 ms less a step than T1 (an earlier version of that setup, 40 rounds, 4 runs). With
 * one slot as well: real 16-row decode steps, the two builds alternating step by step (40
 * rounds, each build's base and one-adapter step, twice with the order swapped), one adapter's
 * step 0.37 / 0.29 ms faster with T0 (paired medians), the base's unchanged (+0.01 / +0.08);
 * single-row steps (60 rounds, twice) 0.58 / 0.50 ms faster (one adapter's cost over the base
 * 0.90 -> 0.40 and 1.07 -> 0.64 ms a step). Timed inside the kernel calls (rdtsc), the shrink
 * and expand then cost what they do with the adapter's data already in cache. */
#define PF_MAX (2 * MAX_FUSED + 2)
typedef struct {
    const char *p[PF_MAX];
    long n[PF_MAX];
    int k, i;
    long off;
} pf_list;

static inline void pf_add(pf_list *l, const void *p, long bytes)
{
    if (bytes > 0 && l->k < PF_MAX) { l->p[l->k] = (const char *)p; l->n[l->k] = bytes; l->k++; }
}

static inline void pf_some(pf_list *l, long lines, int l1)
{
    while (lines > 0 && l->i < l->k) {
        if (l->off >= l->n[l->i]) { l->i++; l->off = 0; continue; }
        if (l1) pf_t0(l->p[l->i] + l->off);
        else pf_t1(l->p[l->i] + l->off);
        l->off += 64;
        lines--;
    }
}

/* The fused kernel's shrink: lora_shrink_task's (slot, SHRINK_ROWS rows of A) tasks split into
 * one contiguous range per thread (split), the range whose A rows the thread prefetched into its
 * own L2 during its base loop. Each range is consumed through its own counter (a cache line of
 * its own): the owner takes it first, in order, and a thread whose range is done goes on to
 * take what is left of the others', so a thread that started late (or was descheduled) is
 * still helped. The last STEAL_TAIL tasks of each range are cut in two halves of the tokens
 * (unit j of a range: fused_shrink_unit), so the threads reach the barrier after the shrink at
 * most half a task apart. Every (token, row) dot product is the same computation whichever
 * thread takes it.
 * Why not one counter shared by all the tasks (before): a thread then took whichever task came
 * next, mostly rows prefetched into the other core's L2, and every take moved the counter's
 * line between the cores. Measured with the engine's own decode-step calls replayed (16 rows,
 * the 121 block-kernel calls of a step recorded from real steps, the builds interleaved round
 * by round, 100 rounds, 3 runs, 2-core AVX-512 EPYC), the LoRA's cost over the same build's
 * base, ms a step: one adapter +1.36 / +0.82 / +0.91 with the shared counter, +1.13 / +0.72 /
 * +0.73 with these ranges; eight adapters +3.24 / +2.35 / +2.32 against +2.72 / +2.14 / +2.11. */
#define STEAL_TAIL 2
static inline long steal_tail(long tasks) { return tasks < STEAL_TAIL ? tasks : STEAL_TAIL; }

/* Unit j of the range of `tasks` tasks from k0: a whole task, or half of one of the last few. */
static inline void fused_shrink_unit(const uint16_t *A, long nR, long K, const float *x, long ldx, const lora_step *sp,
                                     long k0, long tasks, long j, int fmt)
{
    const long first = tasks - steal_tail(tasks);  /* the first task cut in halves */
    if (j < first)
        lora_shrink_task(A, nR, K, x, ldx, sp, k0 + j, 0, 1, fmt);
    else
        lora_shrink_task(A, nR, K, x, ldx, sp, k0 + first + (j - first) / 2, (int)((j - first) % 2), 2, fmt);
}

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ W^T (+ each row's LoRA when lr is not
 * NULL; then M <= MAX_FUSED and N a multiple of 8), W in Q4_1: qs [N, K/2], dm [N, K/32, 2].
 * One OpenMP region, each thread on its own contiguous blocks of 8 outputs:
 *   1. the base dot products of its blocks for all row tiles (a weight row is read from memory
 *      once per step), prefetching the A rows and B panels it needs next;
 *   2. shrink tasks h = A x (SHRINK_ROWS rows of A of one active slot each): its own range of
 *      them, then any left in the other threads' ranges (see fused_shrink_unit); a barrier (h
 *      complete);
 *   3. the expand of its blocks (up to EXPAND_BLOCKS at a time), added to y after the base sum (a zero B adds exactly nothing).
 * A row's LoRA delta does not depend on which rows share the call (the same alone), and a
 * shrink task's result does not depend on the thread that takes it. The base dot product's
 * number of partial sums does depend on the row tile's size (NA in q41_row), so a row's base
 * part may differ in its last bits between a batch and alone (within float32 rounding).
 * Why a thread may take over the others' shrink tasks: the threads can finish their base blocks
 * tens of microseconds apart (one woken late, or descheduled), and with fixed halves of the
 * shrink the first to finish waited at the barrier. Measured when bench --kernel still built its
 * data on the caller's thread, so that every call began with futex wake-ups (16 rows, 120 calls,
 * interleaved, 6 runs on the 2-core EPYC): one adapter +2.05 ms over the base with fixed halves,
 * -0.45 ms with tasks taken as they come.
 * Why the shrink comes after the base loop, not first: tried with the shrink at the region's
 * start, each call prefetching the next call's A rows during its base loop, and a counter of
 * finished shrink units in place of the barrier (real 16-row decode steps, one adapter, rdtsc
 * summed over both threads): the wait went from 0.74 to 0.01 M cycles a step, but the shrink
 * took 4.39 M instead of 3.05 (its A rows no longer in cache after the ops between two calls),
 * and the steps were no faster (+0.36 / -0.04 ms, two runs of 40 rounds).
 * Nor does a thread that finishes early take over the expand of blocks whose base sums the other
 * has finished (a counter of finished shrink units and one of each thread's finished blocks in
 * place of the barrier): tried, the wait went from 1.15 to 0.19 M cycles a step, but the steps
 * were slower, 0.43 / 0.46 ms with one adapter and 0.62 / 0.38 ms on the base (two runs of 50
 * rounds, the order swapped); the base's steps differ only by a per-block store behind `if (lr)`,
 * so presumably by the code the compiler made of the base loop. */
void coe_q41_matmul_lora(const float *x, long ldx, const uint8_t *qs, const float *dm, float *y, long ldy,
                         long M, long N, long K, int nthreads, const lora_rows *lr, const lora_step *sp)
{
    const long nb = K / QK;
    const long nR = lr ? lr->R * lr->n : 0;
    const long nblk = (N + NBLK - 1) / NBLK;
    const long ntasks = lr ? lora_shrink_tasks(nR, sp) : 0;  /* the shrink's (see fused_shrink_unit) */
    const int nc = nthreads > 0 ? nthreads : 1;
    long next_unit[nc][8] __attribute__((aligned(64)));  /* each thread's range: its next shrink unit (a line each) */
    for (int i = 0; i < nc; i++) next_unit[i][0] = 0;
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long b0, b1, k0 = 0, k1 = 0, per = 0;
        int pf_l1 = 0;  /* prefetch into L1 or L2 (see pf_list) */
        split(nblk, t, nt, &b0, &b1);
        pf_list pf = {.k = 0, .i = 0, .off = 0};
        if (lr) {
            const long np = (nR + SHRINK_ROWS - 1) / SHRINK_ROWS;
            split(ntasks, t, nt, &k0, &k1);
            for (long u = k0 / np; u < sp->U && u * np < k1; u++) {  /* A rows of tasks k0..k1, per slot */
                const long j0 = SHRINK_ROWS * (k0 > u * np ? k0 - u * np : 0);
                const long j1 = k1 < (u + 1) * np ? SHRINK_ROWS * (k1 - u * np) : nR;
                pf_add(&pf, lr->A + ((long)sp->seg_slot[u] * nR + j0) * K, (j1 - j0) * K * 2);
            }
            for (long u = 0; u < sp->U; u++)  /* B panels of blocks b0..b1 (their pairs), per slot */
                pf_add(&pf, block_panel(slot_panels(lr, sp->seg_slot[u], N), b0 & ~1L, lr->R, 0),
                       ((b1 + 1) / 2 - b0 / 2) * lr->R * PSTRIDE * 2);
            long lines = 0;
            for (int j = 0; j < pf.k; j++) lines += (pf.n[j] + 63) / 64;
            const long points = (b1 - b0) * NBLK * ((M + MAX_ROWS - 1) / MAX_ROWS);  /* (output, row tile) pairs */
            per = points ? (lines + points - 1) / points : 0;  /* lines per output and row tile */
            pf_l1 = cpu_amd;
        }
        /* Row tiles outside the block's outputs: a tile's x (8 rows of 576 floats: 18 KB) stays in
         * L1 for the block's 8 weight rows, which the next tile reads again from L1. With the
         * tiles inside (every output against 16 rows of x, 36 KB), x came from L2 for every
         * output. Measured as for W_AHEAD (the 2-core EPYC): a 16-row step 6.8 ms (~13%) faster;
         * 1 and 8 rows (one tile) unchanged. Each output is the same call either way, so results
         * are unchanged. */
        for (long blk = b0; blk < b1; blk++) {
            const long n0 = blk * NBLK, n1 = n0 + NBLK < N ? n0 + NBLK : N;
            for (long r0 = 0; r0 < M; r0 += MAX_ROWS) {
                const long mt = M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS;
                for (long n = n0; n < n1; n++) {
                    if (r0 == 0) {
                        if (per) pf_some(&pf, per, pf_l1);  /* spread over every (output, row tile) */
                        if (n + W_AHEAD < b1 * NBLK && n + W_AHEAD < N)  /* see W_AHEAD */
                            prefetch_row(qs + (n + W_AHEAD) * (K / 2), K / 2, dm + (n + W_AHEAD) * 2 * nb, 8 * nb);
                    } else if (per) {
                        pf_some(&pf, per, pf_l1);
                    }
                    TILE_CASES(Q41_ROW, qs + n * (K / 2), dm + n * 2 * nb, x + r0 * ldx, ldx, y + r0 * ldy, ldy, n, nb)
                }
            }
        }
        if (lr) {
            for (int v = 0; v < nt; v++) {  /* its own range k0..k1 (prefetched above) first */
                const int o = (t + v) % nt;
                long a0, a1;
                split(ntasks, o, nt, &a0, &a1);
                const long units = a1 - a0 + steal_tail(a1 - a0);
                for (long j; (j = __atomic_fetch_add(&next_unit[o][0], 1, __ATOMIC_RELAXED)) < units;)
                    fused_shrink_unit(lr->A, nR, K, x, ldx, sp, a0, a1 - a0, j, lr->bf16 ? 2 : 1);
            }
#pragma omp barrier
            long i = 0;
            for (long blk = b0; blk < b1;) {
                while (blk * NBLK >= lr->bounds[i + 1]) i++;
                long end = lr->bounds[i + 1] / NBLK;  /* up to EXPAND_BLOCKS blocks, within the slice */
                if (end > b1) end = b1;
                const int nblk4 = end - blk < EXPAND_BLOCKS ? (int)(end - blk) : EXPAND_BLOCKS;
                lora_expand_blocks(lr, sp, nR, N, blk, nblk4, i, y, ldy);
                blk += nblk4;
            }
        }
    }
}

void coe_q41_matmul(const float *x, long ldx, const uint8_t *qs, const float *dm, float *y, long ldy,
                    long M, long N, long K, int nthreads)
{
    coe_q41_matmul_lora(x, ldx, qs, dm, y, ldy, M, N, K, nthreads, NULL, NULL);
}

/* The same for Q8_0 (no LoRA): qs [N, K] int8, d [N, K/32]. Each thread takes a contiguous range
 * of outputs and prefetches its weight rows W_AHEAD outputs ahead as the Q4_1 kernel does:
 * SmolLM2's Q8_0 output head (49152 x 576, 30 MB) is read once a decode step. Measured with
 * the NTA hint (real 16-row decode steps of the engine, both builds interleaved step by step,
 * 100 rounds, the 2-core AVX-512 EPYC): the base decode step 1.11 ms (~5%) faster, with one
 * adapter 1.16, over eight 1.13. */
void coe_q80_matmul(const float *x, long ldx, const int8_t *qs, const float *d, float *y, long ldy,
                    long M, long N, long K, int nthreads)
{
    const long nb = K / QK;
#pragma omp parallel num_threads(nthreads)
    {
        long n0, n1;
        split(N, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
        for (long n = n0; n < n1; n++) {
            if (n + W_AHEAD < n1) prefetch_row(qs + (n + W_AHEAD) * K, K, d + (n + W_AHEAD) * nb, 4 * nb);
            for (long r0 = 0; r0 < M; r0 += MAX_ROWS) {
                const long mt = M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS;
                TILE_CASES(Q80_ROW, qs + n * K, d + n * nb, x + r0 * ldx, ldx, y + r0 * ldy, ldy, n, nb)
            }
        }
    }
}

int coe_native_abi(void) { return 7; }

/* Whether this build has the bfloat16 LoRA (LORA_BF16: built with -mavx512bf16). */
int coe_native_lora_bf16(void)
{
#ifdef LORA_BF16
    return 1;
#else
    return 0;
#endif
}

/*
 * Multi-LoRA on the CPU: kernels.add_lora in one call per layer and projection group.
 *
 * Semantics (those of kernels.add_lora):
 *     y[t, o_i:o_{i+1}] += scale[s] * (x[t] @ A[s, i, :rank[s]].T) @ B[s, o_i:o_{i+1}, :rank[s]].T
 * for every token t with slot s = slot[t] >= 0; base-only tokens are not visited.
 *
 * Arguments: y [T, N] (row stride ldy, updated in place), x [T, H] (row stride ldx), and two
 * structs that stay the same across calls: the weights of one layer and group (struct
 * lora_weights) and the segments of one step (struct lora_segments). Strides are in elements;
 * the last dimension of x, y and A is contiguous.
 *
 * Work: each segment is cut into blocks of up to TB tokens (or, with AMX, tiles of 16 consecutive
 * rows for segments of AMX_MIN_SEGMENT+ tokens); a block reads its slot's A and B rows for all of
 * its tokens together, up to the slot's rank, with fp32 accumulation and one rounding when y is
 * written back. Only the slots in use are read and
 * no other slot's weights are multiplied: a decode step of 32 tokens on 16 adapters reads every
 * adapter once and does 32 tokens' worth of rank-r work, where a dense formulation does 32 x 16.
 * Blocks are spread over the OpenMP runtime torch itself loaded (libgomp.so.1), so the kernel
 * shares torch's threads instead of starting a second pool. The AVX512-BF16 and AMX paths (like
 * the instructions they use) treat bf16 subnormals as zero; the portable path rounds as torch does.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TB 8               /* tokens per block */
#define CH 512             /* output columns per expand chunk (portable path) */
#define AMX_MIN_SEGMENT 32 /* shorter segments stay off AMX tiles (their panels would not pay off) */

typedef uint16_t bf16;

struct lora_weights {
    const void *A;                /* [S, n, R, H], strides (a_s, a_i, a_j, 1) */
    int64_t a_s, a_i, a_j;
    const void *B;                /* [S, N, R], strides (b_s, b_c, b_j): the engine stores B as [S, R, N]  */
    int64_t b_s, b_c, b_j;        /* (b_c == 1) so that the expand runs along contiguous output columns */
    const float *scales;          /* [S] */
    const int32_t *ranks;         /* [S], each <= R */
    const int64_t *offsets;       /* [n + 1], from 0 to N: the slices' output columns */
    int64_t S, n, H, R;
};

struct lora_segments {            /* kernels.meta.LoraMeta: the step's tokens grouped by slot */
    const int32_t *sorted_tokens; /* [T] */
    const int32_t *seg_slots;     /* [G], -1 = base only (skipped) */
    const int32_t *seg_starts;    /* [G + 1] */
    int64_t nseg;
    int64_t nthreads;             /* OpenMP threads to use */
};

/* The slot's rank, clamped to [0, R]. */
static inline int slot_rank(const struct lora_weights *w, int s) {
    return w->ranks[s] < 0 ? 0 : w->ranks[s] > w->R ? (int)w->R : w->ranks[s];
}

static inline float bf16_to_f32(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u); /* NaN stays a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float f32_same(float v) { return v; }

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define HAVE_AVX512_BF16 1

/* Lane k (< 4) of the result: the sum of a_k's 16 lanes. */
static inline __m128 hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    /* per 128-bit lane: [a0 a1 a0 a1] and [a2 a3 a2 a3] partial sums, then [a0 a1 a2 a3] */
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* bf16 block with AVX512-BF16: the shrink multiplies bf16 pairs straight from memory into fp32
 * (vdpbf16ps, no conversion pass) in tiles of 4 A rows x 4 tokens, the expand widens each B row chunk once for all tokens of
 * the block and keeps their accumulators in registers. While it reads its slot's A and B it
 * prefetches the same lines of the thread's next slot (A_next, B_next; NULL for none): the
 * weights come from memory, not cache, and a decode step is a chain of small per-slot reads.
 * Same contract as lora_block_bf16 otherwise. */
static inline __attribute__((always_inline)) void lora_block_bf16_avx512_nt(
    bf16 *y, int64_t ldy, const bf16 *x, int64_t ldx, const bf16 *A, int64_t a_i, int64_t a_j, const bf16 *B,
    int64_t b_c, int64_t b_j, float scale, int r, const int32_t *tokens, const int nt, const int64_t *offsets, int n,
    int64_t H, float *z, const bf16 *A_next, const bf16 *B_next, int r_next) {
    if (r == 0) return; /* nothing to add: leave y exactly as it is */
    const bf16 *xs[TB];
    for (int b = 0; b < nt; b++) xs[b] = x + (int64_t)tokens[b] * ldx;
    /* shrink in tiles of 4 A rows x up to 4 tokens: each loaded chunk feeds 4 dot products */
    for (int i = 0; i < n; i++) {
        for (int j0 = 0; j0 < r; j0 += 4) {
            const bf16 *ar[4], *an[4];
            for (int q = 0; q < 4; q++) {
                int j = j0 + q < r ? j0 + q : r - 1; /* past the rank: re-read the last row, result dropped */
                ar[q] = A + i * a_i + j * a_j;
                an[q] = A_next && j0 + q < r_next ? A_next + i * a_i + (j0 + q) * a_j : NULL;
            }
            for (int b0 = 0; b0 < nt; b0 += 4) {
                const int P = nt - b0 < 4 ? nt - b0 : 4;
                __m512 acc[4][4];
                for (int p = 0; p < P; p++)
                    for (int q = 0; q < 4; q++) acc[p][q] = _mm512_setzero_ps();
                for (int64_t h = 0; h < H; h += 32) {
                    __mmask32 m = H - h >= 32 ? 0xffffffffu : (__mmask32)((1u << (H - h)) - 1u);
                    __m512i a[4];
                    for (int q = 0; q < 4; q++) {
                        if (b0 == 0 && an[q]) _mm_prefetch((const char *)(an[q] + h), _MM_HINT_T0);
                        a[q] = _mm512_maskz_loadu_epi16(m, ar[q] + h);
                    }
                    for (int p = 0; p < P; p++) {
                        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, xs[b0 + p] + h);
                        for (int q = 0; q < 4; q++) acc[p][q] = _mm512_dpbf16_ps(acc[p][q], xv, (__m512bh)a[q]);
                    }
                }
                for (int p = 0; p < P; p++) {
                    float sums[4];
                    _mm_storeu_ps(sums, _mm_mul_ps(hsum4(acc[p][0], acc[p][1], acc[p][2], acc[p][3]), _mm_set1_ps(scale)));
                    for (int q = 0; q < 4 && j0 + q < r; q++) z[((b0 + p) * n + i) * r + j0 + q] = sums[q];
                }
            }
        }
    }
    /* expand: 16 output columns at a time, one widened B row chunk for all the block's tokens,
     * their accumulators in registers. (Pairs of rank rows through vdpbf16ps measured slower:
     * the interleaving shuffles cost more than the FMAs they save.) */
    for (int i = 0; i < n; i++) {
        for (int64_t c = offsets[i]; c < offsets[i + 1]; c += 16) {
            int64_t w = offsets[i + 1] - c;
            __mmask16 m = w >= 16 ? 0xffff : (__mmask16)((1u << w) - 1u);
            __m512 acc[TB];
            for (int b = 0; b < nt; b++) {
                __m256i yv = _mm256_maskz_loadu_epi16(m, y + (int64_t)tokens[b] * ldy + c);
                acc[b] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(yv), 16));
            }
            for (int j = 0; j < r; j++) {
                __m256i bv16;
                if (b_c == 1) {
                    if (B_next && j < r_next && ((c - offsets[i]) & 31) == 0)
                        _mm_prefetch((const char *)(B_next + c + j * b_j), _MM_HINT_T0);
                    bv16 = _mm256_maskz_loadu_epi16(m, B + c + j * b_j);
                } else {
                    uint16_t tmp[16] = {0};
                    for (int64_t q = 0; q < (w < 16 ? w : 16); q++) tmp[q] = B[(c + q) * b_c + j * b_j];
                    bv16 = _mm256_loadu_si256((const __m256i *)tmp);
                }
                __m512 bv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bv16), 16));
                for (int b = 0; b < nt; b++) acc[b] = _mm512_fmadd_ps(_mm512_set1_ps(z[(b * n + i) * r + j]), bv, acc[b]);
            }
            for (int b = 0; b < nt; b++)
                _mm256_mask_storeu_epi16(y + (int64_t)tokens[b] * ldy + c, m, (__m256i)_mm512_cvtneps_pbh(acc[b]));
        }
    }
}

/* nt as a constant in every call (the switch), so that the per-token loops unroll and the
 * accumulators stay in registers. */
static void lora_block_bf16_avx512(bf16 *y, int64_t ldy, const bf16 *x, int64_t ldx, const bf16 *A, int64_t a_i,
                                   int64_t a_j, const bf16 *B, int64_t b_c, int64_t b_j, float scale, int r,
                                   const int32_t *tokens, int nt, const int64_t *offsets, int n, int64_t H, float *z,
                                   const bf16 *A_next, const bf16 *B_next, int r_next) {
#define CASE(k)                                                                                                  \
    case k:                                                                                                      \
        lora_block_bf16_avx512_nt(y, ldy, x, ldx, A, a_i, a_j, B, b_c, b_j, scale, r, tokens, k, offsets, n, H, z, \
                                  A_next, B_next, r_next);                                                       \
        break;
    switch (nt) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
    }
#undef CASE
}
#endif

#if defined(HAVE_AVX512_BF16) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1

/* Long segments (prefill chunks) on AMX tiles, 16 tokens at a time. Per thread and slot the
 * slot's A and B are first laid out as AMX B-operand tiles ("panels": bf16 pairs along the
 * reduction, zero past the rank and past each slice's end); per 16-token tile then
 *   shrink  z[tok, j] = x[tok, :] . A[j, :]          x rows loaded as tiles in place
 *   expand  y[tok, c] += bf16(z[tok, :]) . B[c, :]   z rounded to bf16 as a bf16 GEMM rounds its
 *                                                    input; added to y in fp32, one rounding
 * Needs H % 32 == 0, B stored along the columns (b_c == 1), and 16 consecutive token rows. */

static int amx_state = -1; /* -1: not asked yet, 0: refused by the kernel, 1: usable */

static int amx_usable(const struct lora_weights *w) {
    if (amx_state < 0) /* Linux lends AMX's tile data state per process, on request */
        amx_state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return amx_state == 1 && w->H > 0 && w->H % 32 == 0 && w->b_c == 1;
}

struct amx_tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static void amx_begin(void) { /* tmm0: C, tmm1: A, tmm2: B; each 16 rows of 64 bytes */
    struct amx_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 3; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

static int64_t amx_col_groups(const int64_t *offsets, int n) {
    int64_t groups = 0;
    for (int i = 0; i < n; i++) groups += (offsets[i + 1] - offsets[i] + 15) / 16;
    return groups;
}

/* One thread's scratch, in one 64-byte aligned allocation (`base`, to free): the slot's A and B
 * panels, z of one tile (fp32, then bf16, rank padded to 32) and one C tile. */
struct amx_scratch {
    char *base;
    uint32_t *apanel, *bpanel;
    float *zf, *cbuf;
    bf16 *zb;
};

static int amx_scratch_alloc(const struct lora_weights *w, struct amx_scratch *sc) {
    int64_t a_bytes = w->n * ((w->R + 15) / 16) * (w->H / 32) * 1024;
    int64_t b_bytes = amx_col_groups(w->offsets, (int)w->n) * ((w->R + 31) / 32) * 1024;
    int64_t rp = (w->R + 31) / 32 * 32;
    int64_t bytes = a_bytes + b_bytes + 16 * rp * 4 + 16 * rp * 2 + 1024;
    sc->base = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!sc->base) return 0;
    sc->apanel = (uint32_t *)sc->base;
    sc->bpanel = (uint32_t *)(sc->base + a_bytes);
    sc->zf = (float *)(sc->base + a_bytes + b_bytes);
    sc->zb = (bf16 *)(sc->zf + 16 * rp);
    sc->cbuf = (float *)(sc->zb + 16 * rp);
    return 1;
}

/* A panel [i][j-group][k-chunk]: 16 pair-rows x 16 j of (A[j, 32c + 2p], A[j, 32c + 2p + 1]).
 * B panel [column group][rank chunk]: 16 pair-rows x 16 c of (B[c, 32q + 2p], B[c, 32q + 2p + 1]). */
static void amx_panels(uint32_t *apanel, uint32_t *bpanel, const bf16 *A, int64_t a_i, int64_t a_j, const bf16 *B,
                       int64_t b_j, int r, const int64_t *offsets, int n, int64_t H) {
    int jg = (r + 15) / 16, kc = (int)(H / 32), kk = (r + 31) / 32;
    for (int i = 0; i < n; i++)
        for (int g = 0; g < jg; g++)
            for (int jj = 0; jj < 16; jj++) {
                int j = g * 16 + jj;
                const uint32_t *ar = (const uint32_t *)(A + i * a_i + j * a_j); /* bf16 pairs */
                for (int c = 0; c < kc; c++) {
                    uint32_t *t = apanel + (((int64_t)i * jg + g) * kc + c) * 256;
                    for (int p = 0; p < 16; p++) t[p * 16 + jj] = j < r ? ar[c * 16 + p] : 0;
                }
            }
    int64_t group = 0;
    for (int i = 0; i < n; i++)
        for (int64_t c0 = offsets[i]; c0 < offsets[i + 1]; c0 += 16, group++)
            for (int q = 0; q < kk; q++) {
                uint32_t *t = bpanel + (group * kk + q) * 256;
                for (int p = 0; p < 16; p++) {
                    int j = q * 32 + 2 * p;
                    for (int cc = 0; cc < 16; cc++) {
                        int64_t c = c0 + cc;
                        uint32_t lo = c < offsets[i + 1] && j < r ? B[j * b_j + c] : 0;
                        uint32_t hi = c < offsets[i + 1] && j + 1 < r ? B[(j + 1) * b_j + c] : 0;
                        t[p * 16 + cc] = lo | hi << 16;
                    }
                }
            }
}

/* One tile of 16 consecutive token rows (x0 and y0 point at the first one). */
static void amx_tile16(bf16 *y0, int64_t ldy, const bf16 *x0, int64_t ldx, const uint32_t *apanel,
                       const uint32_t *bpanel, float scale, int r, const int64_t *offsets, int n, int64_t H,
                       float *zf, bf16 *zb, float *cbuf) {
    int jg = (r + 15) / 16, kc = (int)(H / 32), kk = (r + 31) / 32, rp = kk * 32;
    int64_t group = 0;
    for (int i = 0; i < n; i++) {
        for (int g = 0; g < jg; g++) { /* zf[tok][16g .. 16g + 15] */
            _tile_zero(0);
            for (int c = 0; c < kc; c++) {
                _tile_loadd(1, x0 + c * 32, ldx * 2);
                _tile_loadd(2, apanel + (((int64_t)i * jg + g) * kc + c) * 256, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, zf + g * 16, rp * 4);
        }
        for (int tok = 0; tok < 16; tok++) /* zb[q][tok][32]: bf16(scale * z), zero past the rank */
            for (int j = 0; j < rp; j += 16) {
                __mmask16 m = r - j >= 16 ? 0xffff : r - j > 0 ? (__mmask16)((1u << (r - j)) - 1u) : 0;
                __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, zf + tok * rp + j), _mm512_set1_ps(scale));
                _mm256_storeu_si256((__m256i *)(zb + ((j / 32) * 16 + tok) * 32 + j % 32), (__m256i)_mm512_cvtneps_pbh(v));
            }
        for (int64_t c0 = offsets[i]; c0 < offsets[i + 1]; c0 += 16, group++) {
            _tile_zero(0);
            for (int q = 0; q < kk; q++) {
                _tile_loadd(1, zb + q * 512, 64);
                _tile_loadd(2, bpanel + (group * kk + q) * 256, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, cbuf, 64); /* cbuf[tok][cc] */
            int64_t wdt = offsets[i + 1] - c0;
            __mmask16 m = wdt >= 16 ? 0xffff : (__mmask16)((1u << wdt) - 1u);
            for (int tok = 0; tok < 16; tok++) {
                bf16 *yr = y0 + tok * ldy + c0;
                __m512 yv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, yr)), 16));
                yv = _mm512_add_ps(yv, _mm512_loadu_ps(cbuf + tok * 16));
                _mm256_mask_storeu_epi16(yr, m, (__m256i)_mm512_cvtneps_pbh(yv));
            }
        }
    }
}
#endif

/* lora_cpu_impl.h is the kernel, written once over ELEM (storage type), LOAD/STORE (to and
 * from fp32) and SUFFIX, with FAST_BLOCK (when defined) replacing its portable block; it is
 * included once per element type. */
/* What this build does on this CPU: bit 0 the AVX512-BF16 bf16 path, bit 1 AMX tiles for long
 * segments (built for them, and the kernel lent the tile state to this process). */
int openlora_kernel_features(void) {
    int f = 0;
#ifdef HAVE_AVX512_BF16
    f |= 1;
#endif
#ifdef HAVE_AMX
    struct lora_weights probe;
    memset(&probe, 0, sizeof probe);
    probe.H = 32;
    probe.b_c = 1;
    if (amx_usable(&probe)) f |= 2;
#endif
    return f;
}

#define ELEM bf16
#define LOAD bf16_to_f32
#define STORE f32_to_bf16
#define SUFFIX bf16
#ifdef HAVE_AVX512_BF16
#define FAST_BLOCK lora_block_bf16_avx512
#endif
#ifdef HAVE_AMX
#define TILE16 1
#endif
#include "lora_cpu_impl.h"
#undef FAST_BLOCK
#undef TILE16
#undef ELEM
#undef LOAD
#undef STORE
#undef SUFFIX

#define ELEM float
#define LOAD f32_same
#define STORE f32_same
#define SUFFIX f32
#include "lora_cpu_impl.h"

/* The add_lora kernel for one element type; included by lora_cpu.c (see there). */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUFFIX)

/* One block: nt (<= TB) tokens of one slot. xf [TB, H], row [max(H, CH)], z [TB, n, r], acc [TB, CH]
 * are the calling thread's scratch. */
static void FN(lora_block)(ELEM *y, int64_t ldy, const ELEM *x, int64_t ldx, const ELEM *A, int64_t a_i,
                           int64_t a_j, const ELEM *B, int64_t b_c, int64_t b_j, float scale, int r,
                           const int32_t *tokens, int nt, const int64_t *offsets, int n, int64_t H, float *xf,
                           float *row, float *z, float *acc) {
    if (r == 0) return;
    for (int b = 0; b < nt; b++) {
        const ELEM *xr = x + (int64_t)tokens[b] * ldx;
        float *xb = xf + (int64_t)b * H;
        for (int64_t h = 0; h < H; h++) xb[h] = LOAD(xr[h]);
    }
    /* shrink: z[b, i, j] = scale * (x[b] . A[i, j]) */
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < r; j++) {
            const ELEM *ar = A + i * a_i + j * a_j;
            for (int64_t h = 0; h < H; h++) row[h] = LOAD(ar[h]);
            for (int b = 0; b < nt; b++) {
                const float *xb = xf + (int64_t)b * H;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t h = 0; h < H; h++) s += xb[h] * row[h];
                z[(b * n + i) * r + j] = s * scale;
            }
        }
    }
    /* expand: y[b, c] += sum_j z[b, i, j] * B[c, j] over slice i's columns, CH at a time */
    for (int i = 0; i < n; i++) {
        for (int64_t c0 = offsets[i]; c0 < offsets[i + 1]; c0 += CH) {
            int64_t w = offsets[i + 1] - c0 < CH ? offsets[i + 1] - c0 : CH;
            for (int b = 0; b < nt; b++) {
                const ELEM *yr = y + (int64_t)tokens[b] * ldy + c0;
                for (int64_t c = 0; c < w; c++) acc[b * CH + c] = LOAD(yr[c]);
            }
            for (int j = 0; j < r; j++) {
                const ELEM *br = B + c0 * b_c + j * b_j;
                if (b_c == 1) {
                    for (int64_t c = 0; c < w; c++) row[c] = LOAD(br[c]);
                } else {
                    for (int64_t c = 0; c < w; c++) row[c] = LOAD(br[c * b_c]);
                }
                for (int b = 0; b < nt; b++) {
                    float zj = z[(b * n + i) * r + j];
                    float *ab = acc + b * CH;
#pragma omp simd
                    for (int64_t c = 0; c < w; c++) ab[c] += zj * row[c];
                }
            }
            for (int b = 0; b < nt; b++) {
                ELEM *yr = y + (int64_t)tokens[b] * ldy + c0;
                for (int64_t c = 0; c < w; c++) yr[c] = STORE(acc[b * CH + c]);
            }
        }
    }
}

/* Work items, in segment order: (segment, first position in sorted_tokens, kind), kind 0 a block
 * of up to TB tokens, kind 1 (with TILE16) 16 consecutive token rows on AMX tiles, for segments
 * of at least AMX_MIN_SEGMENT tokens. Returns the count; fills `items` unless NULL. */
static int64_t FN(plan_items)(const struct lora_segments *sg, int tiles, int64_t *items) {
    int64_t k = 0;
    for (int64_t g = 0; g < sg->nseg; g++) {
        if (sg->seg_slots[g] < 0) continue;
        int64_t start = sg->seg_starts[g], end = sg->seg_starts[g + 1];
        int long_segment = tiles && end - start >= AMX_MIN_SEGMENT;
        for (int64_t p = start; p < end; k++) {
            int tile = long_segment && end - p >= 16;
            for (int q = 1; tile && q < 16; q++) /* 16 consecutive rows, in order */
                tile = sg->sorted_tokens[p + q] == sg->sorted_tokens[p] + q;
            if (items) {
                items[3 * k] = g;
                items[3 * k + 1] = p;
                items[3 * k + 2] = tile;
            }
            p += tile ? 16 : TB;
        }
    }
    return k;
}

/* Returns 0; -1 when scratch memory could not be allocated (y is then partly updated); -2 when a
 * segment names a slot outside [0, S) (nothing is written). Ranks are clamped to [0, R]. */
int FN(openlora_add_lora)(void *y_, int64_t ldy, const void *x_, int64_t ldx, const struct lora_weights *w,
                          const struct lora_segments *sg) {
    ELEM *y = (ELEM *)y_;
    const ELEM *x = (const ELEM *)x_, *A = (const ELEM *)w->A, *B = (const ELEM *)w->B;
    const int32_t *seg_slots = sg->seg_slots, *seg_starts = sg->seg_starts;
    int64_t n = w->n, H = w->H, R = w->R;
    for (int64_t g = 0; g < sg->nseg; g++)
        if (seg_slots[g] >= w->S) return -2;
#ifdef TILE16
    const int tiles = amx_usable(w);
#else
    const int tiles = 0;
#endif
    int64_t nitems = FN(plan_items)(sg, tiles, NULL);
    if (nitems == 0) return 0;
    int64_t *items = malloc(sizeof(int64_t) * 3 * nitems);
    if (!items) return -1;
    FN(plan_items)(sg, tiles, items);
    int64_t wide = H > CH ? H : CH;
    int failed = 0;
    int nthreads = sg->nthreads > nitems ? (int)nitems : (int)sg->nthreads;
    if (nthreads < 1) nthreads = 1;
    /* Each thread takes a contiguous run of items (consecutive slots), so it knows which slot
     * comes next and can prefetch it, and builds a slot's AMX panels once for its tiles. */
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        int64_t q0 = nitems * tid / nth, q1 = nitems * (tid + 1) / nth;
        float *buf = malloc(sizeof(float) * (TB * H + wide + 16 * n * R + TB * CH));
        int ok = buf != NULL;
#ifdef TILE16
        struct amx_scratch amx = {0};
        int panel_slot = -1;
#endif
        for (int64_t q = q0; q < q1 && ok; q++) {
            int64_t g = items[3 * q], p = items[3 * q + 1];
            int s = seg_slots[g];
            int r = slot_rank(w, s);
            float *xf = buf, *row = xf + TB * H, *z = row + wide, *acc = z + 16 * n * R;
#ifdef TILE16
            if (items[3 * q + 2]) {
                if (r == 0) continue;
                if (!amx.base) {
                    if (!amx_scratch_alloc(w, &amx)) {
                        ok = 0;
                        break;
                    }
                    amx_begin();
                }
                if (panel_slot != s) {
                    amx_panels(amx.apanel, amx.bpanel, (const bf16 *)(A + s * w->a_s), w->a_i, w->a_j,
                               (const bf16 *)(B + s * w->b_s), w->b_j, r, w->offsets, (int)n, H);
                    panel_slot = s;
                }
                int64_t tok0 = sg->sorted_tokens[p];
                amx_tile16((bf16 *)(y + tok0 * ldy), ldy, (const bf16 *)(x + tok0 * ldx), ldx, amx.apanel,
                           amx.bpanel, w->scales[s], r, w->offsets, (int)n, H, amx.zf, amx.zb, amx.cbuf);
                continue;
            }
#endif
            int64_t end = seg_starts[g + 1] < p + TB ? seg_starts[g + 1] : p + TB;
#ifdef FAST_BLOCK
            int s_next = q + 1 < q1 ? seg_slots[items[3 * (q + 1)]] : s;
            int r_next = slot_rank(w, s_next);
            FAST_BLOCK(y, ldy, x, ldx, A + s * w->a_s, w->a_i, w->a_j, B + s * w->b_s, w->b_c, w->b_j, w->scales[s], r,
                       sg->sorted_tokens + p, (int)(end - p), w->offsets, (int)n, H, z,
                       s_next != s ? A + s_next * w->a_s : NULL, s_next != s ? B + s_next * w->b_s : NULL, r_next);
#else
            FN(lora_block)(y, ldy, x, ldx, A + s * w->a_s, w->a_i, w->a_j, B + s * w->b_s, w->b_c, w->b_j,
                           w->scales[s], r, sg->sorted_tokens + p, (int)(end - p), w->offsets, (int)n, H, xf, row, z,
                           acc);
#endif
        }
#ifdef TILE16
        if (amx.base) _tile_release();
        free(amx.base);
#endif
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        free(buf);
    }
    free(items);
    return failed ? -1 : 0;
}

#undef FN
#undef CAT
#undef CAT_

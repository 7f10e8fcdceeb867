/*
 * prefetchd CLAHE kernel for uint16 images with a configurable number of bins.
 *
 * Built as the extension module `prefetchd.preprocess._clahe` (the module itself is empty) and called
 * through ctypes, which releases the GIL, so Python threads split the work (tiles for the tables, rows for
 * the interpolation). Every output pixel is computed by the same arithmetic whatever the split, so the
 * result does not depend on the number of threads.
 *
 * Semantics (see docs/clahe.md): bin centres at b * 65535 / (bins - 1); a pixel counts in the bin of its
 * nearest centre; clipping and redistribution exactly as OpenCV's CLAHE (with histSize = bins); table
 * value of bin b = saturate(round(float(cdf[b]) * float(65535 / tile_area))); a pixel between centres
 * b0 and b0 + 1 maps to T[b0] + f * (T[b0 + 1] - T[b0]); bilinear interpolation between the four tile
 * mappings with OpenCV's float arithmetic. With bins = 65536 every pixel sits on a centre (f = 0) and the
 * result is OpenCV's uint16 CLAHE bit for bit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
#define NOCONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NOCONTRACT
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
static inline int round_even(float x) { return _mm_cvtss_si32(_mm_set_ss(x)); }
#else
static inline int round_even(float x) { return (int)lrintf(x); }
#endif

static inline uint16_t sat_u16(float x) {
    int v = round_even(x);
    return (uint16_t)(v < 0 ? 0 : (v > 65535 ? 65535 : v));
}

#define EXPORT __attribute__((visibility("default")))

/* AVX2 and baseline clones of the auto-vectorised passes (-DPREFETCHD_NO_CLONES: baseline only, which is what
 * a CPU without AVX2 runs; the tests build it so) */
#ifdef PREFETCHD_NO_CLONES
#define CLONES
#else
#define CLONES __attribute__((target_clones("avx2","default")))
#endif

/* AVX2 code paths: compiled for x86 with GCC-compatible compilers, chosen at run time (__builtin_cpu_supports) */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(PREFETCHD_NO_AVX2)
#include <immintrin.h>
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif

/* bumped when an exported signature changes; clahe.py checks it (NATIVE_ABI) */
EXPORT int prefetchd_clahe_abi(void) { return 3; }

#define CHUNK 256

/* Software prefetch of the row `PF_ROWS` below, for the loops that walk a tile (or a region of the
 * interpolation) row by row: those rows are a few hundred bytes, a whole image row apart, and the hardware
 * prefetchers do not keep up (histograms of an image that is not in cache run up to ~1.8x faster with it).
 * A prefetch never faults. */
#ifndef PF_ROWS
#define PF_ROWS 4
#endif
static inline void prefetch_row(const uint16_t *p, int n) {
    const char *c = (const char *)(const void *)p;
    for (int k = 0; k < 2 * n; k += 64) __builtin_prefetch(c + k);
    __builtin_prefetch(c + 2 * (ptrdiff_t)n - 1);
}

/* the same for a row about to be written */
static inline void prefetch_row_w(uint16_t *p, int n) {
    char *c = (char *)(void *)p;
    for (int k = 0; k < 2 * n; k += 64) __builtin_prefetch(c + k, 1);
    __builtin_prefetch(c + 2 * (ptrdiff_t)n - 1, 1);
}

/* nearest bin centre: round(v * (bins - 1) / 65535); never a tie since 65535 is odd */
CLONES
static void nearest_pass(const uint16_t *restrict s, int n, uint32_t bm1, uint32_t *restrict nb) {
    for (int i = 0; i < n; ++i) nb[i] = ((uint32_t)s[i] * bm1 + 32767u) / 65535u;
}

/*
 * Tables for tiles t0 <= t < t1 (row-major over the tile grid).
 * src: the (padded) image, `stride` elements per row; tiles are th x tw.
 * hist: scratch of 4 * `bins` int32. lut16: [tiles][bins] uint16. lutf (may be NULL): [tiles][bins][2] float
 * (value, next value - value) for the interpolating kernel.
 */
EXPORT NOCONTRACT void prefetchd_clahe_luts(const uint16_t *src, ptrdiff_t stride, int th, int tw, int tiles_x,
                                            int t0, int t1, int bins, int clip, float lut_scale, int32_t *hist,
                                            uint16_t *lut16, float *lutf) {
    const uint32_t bm1 = (uint32_t)(bins - 1);
    for (int t = t0; t < t1; ++t) {
        const int ty = t / tiles_x, tx = t % tiles_x;
        memset(hist, 0, sizeof(int32_t) * (size_t)bins * 4);
        for (int y = 0; y < th; ++y) {
            const uint16_t *row = src + (ptrdiff_t)(ty * th + y) * stride + (ptrdiff_t)tx * tw;
            if (bins == 65536) {
                for (int x = 0; x < tw; ++x) hist[row[x]]++;
            } else {
                for (int x0 = 0; x0 < tw; x0 += CHUNK) {
                    const int n = tw - x0 < CHUNK ? tw - x0 : CHUNK;
                    uint32_t nb[CHUNK];
                    nearest_pass(row + x0, n, bm1, nb);
                    int i = 0;
                    for (; i + 4 <= n; i += 4) {   /* four sub-histograms: flat regions do not serialise */
                        hist[nb[i]]++;
                        hist[bins + nb[i + 1]]++;
                        hist[2 * bins + nb[i + 2]]++;
                        hist[3 * bins + nb[i + 3]]++;
                    }
                    for (; i < n; ++i) hist[nb[i]]++;
                }
            }
        }
        for (int i = 0; i < bins; ++i) hist[i] += hist[bins + i] + hist[2 * bins + i] + hist[3 * bins + i];
        if (clip > 0) {
            int64_t clipped = 0;
            for (int i = 0; i < bins; ++i) {
                if (hist[i] > clip) {
                    clipped += hist[i] - clip;
                    hist[i] = clip;
                }
            }
            const int redist = (int)(clipped / bins);
            int residual = (int)(clipped - (int64_t)redist * bins);
            for (int i = 0; i < bins; ++i) hist[i] += redist;
            if (residual != 0) {
                int step = bins / residual;
                if (step < 1) step = 1;
                for (int i = 0; i < bins && residual > 0; i += step, residual--) hist[i]++;
            }
        }
        uint16_t *L = lut16 + (size_t)t * bins;
        int sum = 0;
        for (int i = 0; i < bins; ++i) {
            sum += hist[i];
            L[i] = sat_u16((float)sum * lut_scale);
        }
        if (lutf) {
            float *F = lutf + (size_t)t * bins * 2;
            for (int i = 0; i < bins - 1; ++i) {
                F[2 * i] = (float)L[i];
                F[2 * i + 1] = (float)L[i + 1] - (float)L[i];
            }
            F[2 * (bins - 1)] = (float)L[bins - 1];
            F[2 * (bins - 1) + 1] = 0.0f;
        }
    }
}

/* Blend the two tile rows per image row when that costs less than the two lookups it saves per pixel.
 * The numpy and torch implementations use the same rule (and so the same float arithmetic). */
EXPORT int prefetchd_clahe_preblend(int W, int tiles_x, int bins) {
    return (int64_t)tiles_x * bins <= 4 * (int64_t)W;
}


CLONES static NOCONTRACT void bin_pass(const uint16_t *restrict s, int n, uint32_t bm1, float inv_65535,
                                uint32_t *restrict kb, float *restrict fb) {
    for (int i = 0; i < n; ++i) {
        const uint32_t num = (uint32_t)s[i] * bm1;
        const uint32_t b0 = num / 65535u;
        fb[i] = (float)(int32_t)(num - b0 * 65535u) * inv_65535;
        kb[i] = b0 * 2;
    }
}

CLONES static NOCONTRACT void blend_pass(const float *restrict m1, const float *restrict m2, const float *restrict w1,
                                  const float *restrict w2, int n, uint16_t *restrict d) {
    for (int i = 0; i < n; ++i) {
        float r = m1[i] * w1[i] + m2[i] * w2[i];
        r = r < 0.0f ? 0.0f : (r > 65535.0f ? 65535.0f : r);
        d[i] = (uint16_t)(int32_t)__builtin_rintf(r);
    }
}

/* OpenCV's per-column tile indices and weights. */
static NOCONTRACT int column_weights(int W, int tw, int tiles_x, int **ind1, int **ind2, float **xa, float **xa1) {
    *ind1 = (int *)malloc(sizeof(int) * (size_t)W);
    *ind2 = (int *)malloc(sizeof(int) * (size_t)W);
    *xa = (float *)malloc(sizeof(float) * (size_t)W);
    *xa1 = (float *)malloc(sizeof(float) * (size_t)W);
    if (!*ind1 || !*ind2 || !*xa || !*xa1) return -1;
    const float inv_tw = 1.0f / (float)tw;
    for (int x = 0; x < W; ++x) {
        const float txf = (float)x * inv_tw - 0.5f;
        int tx1 = (int)floorf(txf);
        int tx2 = tx1 + 1;
        (*xa)[x] = txf - (float)tx1;
        (*xa1)[x] = 1.0f - (*xa)[x];
        if (tx1 < 0) tx1 = 0;
        if (tx2 > tiles_x - 1) tx2 = tiles_x - 1;
        (*ind1)[x] = tx1;
        (*ind2)[x] = tx2;
    }
    return 0;
}

/*
 * Interpolate rows y0 <= y < y1 of the (unpadded) image src (W columns) into dst.
 * bins == 65536 uses lut16 directly (OpenCV's formula, bit-exact); other bins use lutf.
 */
EXPORT NOCONTRACT int prefetchd_clahe_interp(const uint16_t *src, ptrdiff_t sstride, uint16_t *dst, ptrdiff_t dstride,
                                             int y0, int y1, int W, int th, int tw, int tiles_x, int tiles_y,
                                             int bins, const uint16_t *lut16, const float *lutf) {
    int *ind1 = NULL, *ind2 = NULL;
    float *xa = NULL, *xa1 = NULL;
    if (column_weights(W, tw, tiles_x, &ind1, &ind2, &xa, &xa1) != 0) {
        free(ind1); free(ind2); free(xa); free(xa1);
        return -1;
    }
    const float inv_th = 1.0f / (float)th;
    const uint32_t bm1 = (uint32_t)(bins - 1);
    const float inv_65535 = 1.0f / 65535.0f;
    float *rowbuf = NULL;
    if (bins != 65536 && prefetchd_clahe_preblend(W, tiles_x, bins)) {
        rowbuf = (float *)malloc(sizeof(float) * (size_t)tiles_x * bins * 2);
        if (!rowbuf) {
            free(ind1); free(ind2); free(xa); free(xa1);
            return -1;
        }
    }
    for (int y = y0; y < y1; ++y) {
        const float tyf = (float)y * inv_th - 0.5f;
        int ty1 = (int)floorf(tyf);
        int ty2 = ty1 + 1;
        const float ya = tyf - (float)ty1, ya1 = 1.0f - ya;
        if (ty1 < 0) ty1 = 0;
        if (ty2 > tiles_y - 1) ty2 = tiles_y - 1;
        const uint16_t *s = src + (ptrdiff_t)y * sstride;
        uint16_t *d = dst + (ptrdiff_t)y * dstride;
        if (bins == 65536) {
            const uint16_t *P1 = lut16 + (size_t)ty1 * tiles_x * 65536;
            const uint16_t *P2 = lut16 + (size_t)ty2 * tiles_x * 65536;
            for (int x = 0; x < W; ++x) {
                const int v = s[x];
                const size_t i1 = (size_t)ind1[x] * 65536 + v, i2 = (size_t)ind2[x] * 65536 + v;
                const float res = ((float)P1[i1] * xa1[x] + (float)P1[i2] * xa[x]) * ya1 +
                                  ((float)P2[i1] * xa1[x] + (float)P2[i2] * xa[x]) * ya;
                d[x] = sat_u16(res);
            }
        } else if (rowbuf) {
            /* blend the two tile rows first (one table per tile column), then two lookups per pixel */
            const size_t tstride = (size_t)bins * 2;
            const float *P1 = lutf + (size_t)ty1 * tiles_x * tstride;
            const float *P2 = lutf + (size_t)ty2 * tiles_x * tstride;
            const size_t n = (size_t)tiles_x * tstride;
            for (size_t i = 0; i < n; ++i) rowbuf[i] = P1[i] * ya1 + P2[i] * ya;
            /* three passes per chunk so that the arithmetic passes vectorise: bin and fraction, lookups,
             * blend and round */
            for (int x0 = 0; x0 < W; x0 += CHUNK) {
                const int n = W - x0 < CHUNK ? W - x0 : CHUNK;
                uint32_t kb[CHUNK];
                float fb[CHUNK], m1b[CHUNK], m2b[CHUNK];
                bin_pass(s + x0, n, bm1, inv_65535, kb, fb);
                for (int i = 0; i < n; ++i) {
                    const float *A = rowbuf + (size_t)ind1[x0 + i] * tstride + kb[i];
                    const float *B = rowbuf + (size_t)ind2[x0 + i] * tstride + kb[i];
                    m1b[i] = A[0] + fb[i] * A[1];
                    m2b[i] = B[0] + fb[i] * B[1];
                }
                blend_pass(m1b, m2b, xa1 + x0, xa + x0, n, d + x0);
            }
        } else {
            const size_t tstride = (size_t)bins * 2;
            const float *P1 = lutf + (size_t)ty1 * tiles_x * tstride;
            const float *P2 = lutf + (size_t)ty2 * tiles_x * tstride;
            /* walk the row in runs where the pair of tile columns is constant */
            int x = 0;
            while (x < W) {
                const int a = ind1[x], b = ind2[x];
                int xe = x + 1;
                while (xe < W && ind1[xe] == a && ind2[xe] == b) ++xe;
                const float *A1 = P1 + (size_t)a * tstride, *B1 = P1 + (size_t)b * tstride;
                const float *A2 = P2 + (size_t)a * tstride, *B2 = P2 + (size_t)b * tstride;
                for (; x < xe; ++x) {
                    const uint32_t num = (uint32_t)s[x] * bm1;
                    const uint32_t b0 = num / 65535u;
                    const float f = (float)(num - b0 * 65535u) * inv_65535;
                    const size_t k = (size_t)b0 * 2;
                    const float m11 = A1[k] + f * A1[k + 1];
                    const float m12 = B1[k] + f * B1[k + 1];
                    const float m21 = A2[k] + f * A2[k + 1];
                    const float m22 = B2[k] + f * B2[k + 1];
                    const float res = (m11 * xa1[x] + m12 * xa[x]) * ya1 + (m21 * xa1[x] + m22 * xa[x]) * ya;
                    d[x] = sat_u16(res);
                }
            }
        }
    }
    free(rowbuf);
    free(ind1); free(ind2); free(xa); free(xa1);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * OpenCV-compatible mode (bins = 65536), restricted to the values that are read.
 *
 * A tile's histogram is zero outside [tile_min, tile_max]. After clipping, OpenCV adds `redist = excess / 65536`
 * to every bin and one count to bins k * step (k < residual, step = 65536 / residual), so for every value v
 *     cdf(v) = H(v) + (v + 1) * redist + min(residual, v / step + 1)      (H: prefix of the clipped histogram)
 * which is exact integer arithmetic; the table entry is then the same float32 expression as OpenCV's,
 * saturate(round(float(cdf) * float(65535 / area))). The interpolation reads a tile's table only at values of
 * pixels whose bilinear neighbourhood contains the tile; those pixels lie in the tiles around it, so the table
 * is only built (and stored) for [lo, hi] = [min, max] over those tiles. Table t lives at lut[base[t] + v].
 * ------------------------------------------------------------------------------------------------------- */

/* OpenCV's per-row tile indices and weights (the same arithmetic as the per-column ones). */
static inline NOCONTRACT void row_tiles(int y, float inv_th, int tiles_y, int *ty1, int *ty2, float *ya, float *ya1) {
    const float tyf = (float)y * inv_th - 0.5f;
    int a = (int)floorf(tyf);
    int b = a + 1;
    *ya = tyf - (float)a;
    *ya1 = 1.0f - *ya;
    if (a < 0) a = 0;
    if (b > tiles_y - 1) b = tiles_y - 1;
    *ty1 = a;
    *ty2 = b;
}

CLONES
static void minmax_pass(const uint16_t *restrict s, int n, uint16_t *mn, uint16_t *mx) {
    uint16_t a = *mn, b = *mx;
    for (int i = 0; i < n; ++i) {
        a = s[i] < a ? s[i] : a;
        b = s[i] > b ? s[i] : b;
    }
    *mn = a;
    *mx = b;
}

#if HAVE_AVX2
/* [min, max] of tiles tx0 <= tx < tx1 of tile row ty (tw >= 16), walking whole image rows (sequential reads):
 * 16 values per step, a tile row's last step overlapping the previous one */
__attribute__((target("avx2"))) static void minmax_tiles_avx2(const uint16_t *src, ptrdiff_t stride, int th, int tw,
                                                              int ty, int tx0, int tx1, int32_t *mins,
                                                              int32_t *maxs) {
    enum { NT = 16 };                       /* tiles per sweep (accumulators on the stack) */
    for (int c0 = tx0; c0 < tx1; c0 += NT) {
        const int c1 = c0 + NT < tx1 ? c0 + NT : tx1;
        __m256i a[NT], b[NT];
        for (int j = 0; j < c1 - c0; ++j) {
            a[j] = _mm256_set1_epi16(-1);
            b[j] = _mm256_setzero_si256();
        }
        for (int y = 0; y < th; ++y) {
            const uint16_t *row = src + (ptrdiff_t)(ty * th + y) * stride;
            for (int j = 0; j < c1 - c0; ++j) {
                const uint16_t *seg = row + (ptrdiff_t)(c0 + j) * tw;
                __m256i lo = a[j], hi = b[j];
                int x = 0;
                for (; x + 16 <= tw; x += 16) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(seg + x));
                    lo = _mm256_min_epu16(lo, v);
                    hi = _mm256_max_epu16(hi, v);
                }
                if (x < tw) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(seg + tw - 16));
                    lo = _mm256_min_epu16(lo, v);
                    hi = _mm256_max_epu16(hi, v);
                }
                a[j] = lo;
                b[j] = hi;
            }
        }
        for (int j = 0; j < c1 - c0; ++j) {
            const __m128i a8 = _mm_min_epu16(_mm256_castsi256_si128(a[j]), _mm256_extracti128_si256(a[j], 1));
            const __m128i b8 = _mm_max_epu16(_mm256_castsi256_si128(b[j]), _mm256_extracti128_si256(b[j], 1));
            mins[c0 + j] = _mm_extract_epi16(_mm_minpos_epu16(a8), 0);                      /* SSE4.1 */
            maxs[c0 + j] = 65535 - _mm_extract_epi16(_mm_minpos_epu16(_mm_xor_si128(b8, _mm_set1_epi16(-1))), 0);
        }
    }
}
#endif

/* [min, max] of the (padded) image over tiles t0 <= t < t1. */
EXPORT void prefetchd_clahe_tile_minmax(const uint16_t *src, ptrdiff_t stride, int th, int tw, int tiles_x,
                                        int t0, int t1, int32_t *mins, int32_t *maxs) {
#if HAVE_AVX2
    if (tw >= 16 && __builtin_cpu_supports("avx2")) {
        for (int t = t0; t < t1;) {         /* the tiles of [t0, t1) in one tile row */
            const int ty = t / tiles_x, tx0 = t % tiles_x;
            const int tx1 = t1 - ty * tiles_x < tiles_x ? t1 - ty * tiles_x : tiles_x;
            minmax_tiles_avx2(src, stride, th, tw, ty, tx0, tx1, mins + ty * tiles_x, maxs + ty * tiles_x);
            t = ty * tiles_x + tx1;
        }
        return;
    }
#endif
    for (int t = t0; t < t1; ++t) {
        const int ty = t / tiles_x, tx = t % tiles_x;
        uint16_t mn = 65535, mx = 0;
        for (int y = 0; y < th; ++y) {
            const uint16_t *row = src + (ptrdiff_t)(ty * th + y) * stride + (ptrdiff_t)tx * tw;
            if (y + PF_ROWS < th) prefetch_row(row + PF_ROWS * stride, tw);
            minmax_pass(row, tw, &mn, &mx);
        }
        mins[t] = mn;
        maxs[t] = mx;
    }
}

/*
 * Value range [lo[t], hi[t]] read from each table by the interpolation of an H x W image (lo > hi: never
 * read), and its offset: table t is lut[base[t] + v]. Returns the number of entries, or -1 (no memory).
 */
EXPORT NOCONTRACT int64_t prefetchd_clahe_u16_ranges(int H, int W, int th, int tw, int tiles_x, int tiles_y,
                                                     const int32_t *mins, const int32_t *maxs, int32_t *lo,
                                                     int32_t *hi, int64_t *base) {
    int *ind1 = NULL, *ind2 = NULL;
    float *xa = NULL, *xa1 = NULL;
    int *cf = (int *)malloc(sizeof(int) * (size_t)tiles_x), *cl = (int *)malloc(sizeof(int) * (size_t)tiles_x);
    int *rf = (int *)malloc(sizeof(int) * (size_t)tiles_y), *rl = (int *)malloc(sizeof(int) * (size_t)tiles_y);
    int64_t total = -1;
    if (!cf || !cl || !rf || !rl || column_weights(W, tw, tiles_x, &ind1, &ind2, &xa, &xa1) != 0) goto done;
    /* first and last image column (row) whose interpolation reads tile column (row) j */
    for (int j = 0; j < tiles_x; ++j) { cf[j] = W; cl[j] = -1; }
    for (int j = 0; j < tiles_y; ++j) { rf[j] = H; rl[j] = -1; }
    for (int x = 0; x < W; ++x) {
        const int js[2] = {ind1[x], ind2[x]};
        for (int k = 0; k < 2; ++k) {
            if (x < cf[js[k]]) cf[js[k]] = x;
            if (x > cl[js[k]]) cl[js[k]] = x;
        }
    }
    const float inv_th = 1.0f / (float)th;
    for (int y = 0; y < H; ++y) {
        int a, b;
        float ya, ya1;
        row_tiles(y, inv_th, tiles_y, &a, &b, &ya, &ya1);
        const int js[2] = {a, b};
        for (int k = 0; k < 2; ++k) {
            if (y < rf[js[k]]) rf[js[k]] = y;
            if (y > rl[js[k]]) rl[js[k]] = y;
        }
    }
    total = 0;
    for (int i = 0; i < tiles_y; ++i) {
        for (int j = 0; j < tiles_x; ++j) {
            const int t = i * tiles_x + j;
            int l = 65536, h = -1;
            if (rl[i] >= 0 && cl[j] >= 0) {
                /* those pixels lie in the tiles (rows rf/th..rl/th, columns cf/tw..cl/tw) */
                for (int r = rf[i] / th; r <= rl[i] / th; ++r) {
                    for (int c = cf[j] / tw; c <= cl[j] / tw; ++c) {
                        if (mins[r * tiles_x + c] < l) l = mins[r * tiles_x + c];
                        if (maxs[r * tiles_x + c] > h) h = maxs[r * tiles_x + c];
                    }
                }
            }
            if (l > h) { l = 1; h = 0; }
            lo[t] = l;
            hi[t] = h;
            base[t] = total - l;
            total += h - l + 1;
        }
    }
done:
    free(cf); free(cl); free(rf); free(rl);
    free(ind1); free(ind2); free(xa); free(xa1);
    return total;
}

/* Sub-histograms for narrow tiles (flat regions do not serialise on one counter); one for wide ones. */
#ifndef SUB_SPAN
#define SUB_SPAN 4096
#endif

CLONES
static void merge_pass(int32_t *restrict h, const int32_t *restrict sub, int span) {
    for (int i = 0; i < span; ++i) h[i] += sub[i] + sub[span + i] + sub[2 * span + i];
}

CLONES
static void clip_pass(int32_t *restrict h, int span, int clip, int64_t *excess) {
    int64_t e = 0;
    for (int i = 0; i < span; ++i) {
        const int32_t over = h[i] > clip ? h[i] - clip : 0;
        e += over;
        h[i] -= over;
    }
    *excess = e;
}

/* saturate(round(float(c) * scale)), OpenCV's table entry */
static inline NOCONTRACT uint16_t table_entry(int32_t c, float scale) {
    float r = (float)c * scale;
    r = r < 0.0f ? 0.0f : (r > 65535.0f ? 65535.0f : r);
    return (uint16_t)(int32_t)__builtin_rintf(r);
}

/*
 * One tile's table over values l <= v <= l + n - 1 from its clipped histogram H (H[i]: count of value l + i,
 * zero outside the tile's values): L[i] = table_entry(cdf(l + i)) with
 *     cdf(v) = c0 + H[0] + ... + H[v - l] + (v + 1) * redist + min(residual, v / step + 1)
 * (c0: the clipped histogram below l; the last term counts the residual bumps at k * step, k < residual, and
 * is 0 when residual is 0).
 */
static NOCONTRACT void scan_table(const int32_t *H, int n, int l, int32_t c0, int redist, int residual, int step,
                                  float scale, uint16_t *L) {
    int32_t c = c0;
    int q = l / step, r = l % step;   /* v = q * step + r */
    for (int i = 0; i < n; ++i) {
        c += H[i];
        const int32_t b = q + 1 < residual ? q + 1 : residual;
        L[i] = table_entry(c + (l + i + 1) * redist + b, scale);
        if (++r == step) {
            r = 0;
            ++q;
        }
    }
}

#if HAVE_AVX2
/* the same, 8 values per step (in-register prefix sum; v / step and v % step kept per lane); the same float
 * operations: cvtps rounds to nearest even and packus saturates, as table_entry */
__attribute__((target("avx2"))) static NOCONTRACT void scan_table_avx2(const int32_t *H, int n, int l, int32_t c0,
                                                                       int redist, int residual, int step,
                                                                       float scale, uint16_t *L) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i v0 = _mm256_add_epi32(_mm256_set1_epi32(l), lane);
    int32_t qs[8], rs[8];
    for (int j = 0; j < 8; ++j) {
        qs[j] = (l + j) / step;
        rs[j] = (l + j) % step;
    }
    __m256i q = _mm256_loadu_si256((const __m256i *)qs), r = _mm256_loadu_si256((const __m256i *)rs);
    const __m256i dq = _mm256_set1_epi32(8 / step), dr = _mm256_set1_epi32(8 % step);
    const __m256i STEP = _mm256_set1_epi32(step), STEP1 = _mm256_set1_epi32(step - 1);
    const __m256i RES = _mm256_set1_epi32(residual), one = _mm256_set1_epi32(1);
    __m256i lin = _mm256_mullo_epi32(_mm256_add_epi32(v0, one), _mm256_set1_epi32(redist));   /* (v + 1) * redist */
    const __m256i dlin = _mm256_set1_epi32(8 * redist);
    __m256i carry = _mm256_set1_epi32(c0);
    const __m256i last = _mm256_set1_epi32(7);
    const __m256 S = _mm256_set1_ps(scale);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(H + i));
        x = _mm256_add_epi32(x, _mm256_slli_si256(x, 4));
        x = _mm256_add_epi32(x, _mm256_slli_si256(x, 8));
        x = _mm256_add_epi32(x, _mm256_shuffle_epi32(_mm256_permute2x128_si256(x, x, 0x08), 0xFF));
        const __m256i h = _mm256_add_epi32(x, carry);                   /* c0 + H[0] + ... + H[i + lane] */
        carry = _mm256_add_epi32(carry, _mm256_permutevar8x32_epi32(x, last));
        const __m256i b = _mm256_min_epi32(_mm256_add_epi32(q, one), RES);
        const __m256i cdf = _mm256_add_epi32(_mm256_add_epi32(h, lin), b);
        const __m256i e = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_cvtepi32_ps(cdf), S));
        _mm_storeu_si128((__m128i *)(L + i), _mm_packus_epi32(_mm256_castsi256_si128(e), _mm256_extracti128_si256(e, 1)));
        lin = _mm256_add_epi32(lin, dlin);
        q = _mm256_add_epi32(q, dq);
        r = _mm256_add_epi32(r, dr);
        const __m256i wrap = _mm256_cmpgt_epi32(r, STEP1);             /* r >= step: one more step */
        r = _mm256_sub_epi32(r, _mm256_and_si256(wrap, STEP));
        q = _mm256_sub_epi32(q, wrap);
    }
    if (i < n)
        scan_table(H + i, n - i, l + i, _mm256_cvtsi256_si32(carry), redist, residual, step, scale, L + i);
}
#endif

/*
 * Tables of tiles t0 <= t < t1 for bins = 65536 over [lo[t], hi[t]] only, into lut[base[t] + v].
 * mins/maxs: each tile's value range (prefetchd_clahe_tile_minmax). Returns 0, or -1 (no memory).
 */
EXPORT NOCONTRACT int prefetchd_clahe_luts_u16(const uint16_t *src, ptrdiff_t stride, int th, int tw, int tiles_x,
                                               int t0, int t1, int clip, float lut_scale, const int32_t *mins,
                                               const int32_t *maxs, const int32_t *lo, const int32_t *hi,
                                               const int64_t *base, uint16_t *lut) {
    /* the histogram of tile t covers [s, e] = [min(lo, min), max(hi, max)], zero outside the tile's values,
     * so that the table pass reads it over [lo, hi] directly; sub-histograms cover the tile's values */
    int maxspan = 1, maxlen = 1;
    for (int t = t0; t < t1; ++t) {
        if (lo[t] > hi[t]) continue;
        const int span = maxs[t] - mins[t] + 1;
        const int s = lo[t] < mins[t] ? lo[t] : mins[t], e = hi[t] > maxs[t] ? hi[t] : maxs[t];
        if (span <= SUB_SPAN && span > maxspan) maxspan = span;
        if (e - s + 1 > maxlen) maxlen = e - s + 1;
    }
    int32_t *buf = (int32_t *)malloc(sizeof(int32_t) * ((size_t)3 * maxspan + (size_t)maxlen));
    if (!buf) return -1;
    int32_t *hist = buf + (size_t)3 * maxspan;
#if HAVE_AVX2
    const int avx2 = __builtin_cpu_supports("avx2");
#endif
    for (int t = t0; t < t1; ++t) {
        const int l = lo[t], h = hi[t];
        if (l > h) continue;                    /* never read */
        const int ty = t / tiles_x, tx = t % tiles_x;
        const int tmin = mins[t], tmax = maxs[t], span = tmax - tmin + 1;
        const int s = l < tmin ? l : tmin, e = h > tmax ? h : tmax;
        memset(hist, 0, sizeof(int32_t) * (size_t)(e - s + 1));
        int32_t *h0 = hist + (tmin - s);        /* h0[v - tmin]: count of value v */
        if (span <= SUB_SPAN) {
            memset(buf, 0, sizeof(int32_t) * (size_t)3 * span);
            int32_t *h1 = buf, *h2 = buf + span, *h3 = buf + 2 * span;
            for (int y = 0; y < th; ++y) {
                const uint16_t *row = src + (ptrdiff_t)(ty * th + y) * stride + (ptrdiff_t)tx * tw;
                if (y + PF_ROWS < th) prefetch_row(row + PF_ROWS * stride, tw);
                int x = 0;
                for (; x + 4 <= tw; x += 4) {
                    h0[row[x] - tmin]++;
                    h1[row[x + 1] - tmin]++;
                    h2[row[x + 2] - tmin]++;
                    h3[row[x + 3] - tmin]++;
                }
                for (; x < tw; ++x) h0[row[x] - tmin]++;
            }
            merge_pass(h0, buf, span);
        } else {
            for (int y = 0; y < th; ++y) {
                const uint16_t *row = src + (ptrdiff_t)(ty * th + y) * stride + (ptrdiff_t)tx * tw;
                if (y + PF_ROWS < th) prefetch_row(row + PF_ROWS * stride, tw);
                int x = 0;
                for (; x + 4 <= tw; x += 4) {
                    h0[row[x] - tmin]++;
                    h0[row[x + 1] - tmin]++;
                    h0[row[x + 2] - tmin]++;
                    h0[row[x + 3] - tmin]++;
                }
                for (; x < tw; ++x) h0[row[x] - tmin]++;
            }
        }
        int64_t excess = 0;
        if (clip > 0) clip_pass(h0, span, clip, &excess);
        const int redist = (int)(excess >> 16), residual = (int)(excess & 65535);
        const int step = residual > 0 ? 65536 / residual : 65536;   /* >= 1 since residual < 65536 */
        int32_t c0 = 0;                                              /* clipped histogram below l */
        for (int i = 0; i < l - s; ++i) c0 += hist[i];
#if HAVE_AVX2
        if (avx2) {
            scan_table_avx2(hist + (l - s), h - l + 1, l, c0, redist, residual, step, lut_scale, lut + (base[t] + l));
            continue;
        }
#endif
        scan_table(hist + (l - s), h - l + 1, l, c0, redist, residual, step, lut_scale, lut + (base[t] + l));
    }
    free(buf);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * bins = 65536 interpolation. Rows are walked in bands reading the same pair of tile rows (ty1, ty2), and
 * each band in runs of columns reading the same pair of tile columns (a, b): such a region reads four fixed
 * tables T11, T12, T21, T22, at the values of its pixels, which lie in [vlo, vhi] = the value range of the
 * tiles it overlaps (every such value is inside each table's stored range). When that range is small next to
 * the region's pixel count, the region first interleaves the four tables into
 *     Q[v - vlo] = T11[v] | T12[v] << 16 | T21[v] << 32 | T22[v] << 48
 * so that a pixel costs one 64-bit load instead of four 16-bit ones (or, with AVX2, four 8-lane gathers per 8
 * pixels); otherwise it reads the four tables directly. Building Q streams 4 x range table entries, so it pays
 * unless the range is much larger than the pixel count (sparse, full-range regions of small tiles). All paths
 * do the same float operations in the same order (OpenCV's): top = T11 * xa1 + T12 * xa;
 * bot = T21 * xa1 + T22 * xa; res = top * ya1 + bot * ya; round to nearest even; saturate.
 * Q is used with AVX2 only: in scalar code, unpacking the 64-bit entry costs more than the three loads saved.
 * ------------------------------------------------------------------------------------------------------- */

/* interleave when range <= QTABLE_RATIO * pixels: on 1080 x 1080 full-range noise, Q still wins at 32 and
 * loses at ~60 range/pixel (measured on Zen 4); -DQTABLE_RATIO=0 never interleaves */
#ifndef QTABLE_RATIO
#define QTABLE_RATIO 48
#endif

#if HAVE_AVX2 && !defined(PREFETCHD_NO_GATHER)
#define HAVE_GATHER 1
/* 8 pixels of OpenCV's 16-bit interpolation with AVX2 gathers (same float operations, same order). */
__attribute__((target("avx2"))) static NOCONTRACT void interp_run_avx2(
        const uint16_t *s, uint16_t *d, int n, const uint16_t *lut, int32_t b11, int32_t b12, int32_t b21,
        int32_t b22, const float *xa, const float *xa1, float ya, float ya1) {
    const int *L = (const int *)(const void *)lut;
    const __m256i m16 = _mm256_set1_epi32(0xFFFF);
    const __m256i B11 = _mm256_set1_epi32(b11), B12 = _mm256_set1_epi32(b12);
    const __m256i B21 = _mm256_set1_epi32(b21), B22 = _mm256_set1_epi32(b22);
    const __m256 YA = _mm256_set1_ps(ya), YA1 = _mm256_set1_ps(ya1);
    int x = 0;
    for (; x + 8 <= n; x += 8) {
        const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + x)));
        const __m256 f11 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_i32gather_epi32(L, _mm256_add_epi32(v, B11), 2), m16));
        const __m256 f12 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_i32gather_epi32(L, _mm256_add_epi32(v, B12), 2), m16));
        const __m256 f21 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_i32gather_epi32(L, _mm256_add_epi32(v, B21), 2), m16));
        const __m256 f22 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_i32gather_epi32(L, _mm256_add_epi32(v, B22), 2), m16));
        const __m256 wa = _mm256_loadu_ps(xa + x), wa1 = _mm256_loadu_ps(xa1 + x);
        const __m256 top = _mm256_add_ps(_mm256_mul_ps(f11, wa1), _mm256_mul_ps(f12, wa));
        const __m256 bot = _mm256_add_ps(_mm256_mul_ps(f21, wa1), _mm256_mul_ps(f22, wa));
        const __m256 res = _mm256_add_ps(_mm256_mul_ps(top, YA1), _mm256_mul_ps(bot, YA));
        const __m256i r = _mm256_cvtps_epi32(res);                 /* round to nearest even, like cvtss2si */
        const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);   /* saturate to u16 */
        _mm_storeu_si128((__m128i *)(d + x), _mm256_castsi256_si128(p));
    }
    for (; x < n; ++x) {
        const int v = s[x];
        const float res = ((float)lut[b11 + v] * xa1[x] + (float)lut[b12 + v] * xa[x]) * ya1 +
                          ((float)lut[b21 + v] * xa1[x] + (float)lut[b22 + v] * xa[x]) * ya;
        d[x] = sat_u16(res);
    }
}

/* 8 pixels at s[0..8) with the interleaved table (Qp[v] = Q[v - vlo]): eight 64-bit loads (on Zen 4 faster
 * than two 4-lane 64-bit gathers, and not slowed by the gather microcode mitigations of recent Intel CPUs),
 * regrouped into T11, T12, T21, T22 of the 8 pixels in pixel order by in-lane shuffles; then OpenCV's float
 * operations in OpenCV's order. */
__attribute__((target("avx2"))) static inline NOCONTRACT void interp8_q_avx2(
        const uint16_t *s, uint16_t *d, const long long *Qp, const float *xa, const float *xa1, __m256 YA,
        __m256 YA1) {
    /* within a 128-bit lane (p, q) = (a0 b0 c0 d0, a1 b1 c1 d1) -> a0 a1 b0 b1 c0 c1 d0 d1 */
    const __m256i grp = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                                         0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
    const __m256i zero = _mm256_setzero_si256();
    const __m256i g0 = _mm256_shuffle_epi8(_mm256_set_epi64x(Qp[s[5]], Qp[s[4]], Qp[s[1]], Qp[s[0]]), grp);
    const __m256i g1 = _mm256_shuffle_epi8(_mm256_set_epi64x(Qp[s[7]], Qp[s[6]], Qp[s[3]], Qp[s[2]]), grp);
    const __m256i t1 = _mm256_unpacklo_epi32(g0, g1);   /* a0-3 b0-3 | a4-7 b4-7 (u16) */
    const __m256i t2 = _mm256_unpackhi_epi32(g0, g1);   /* c0-3 d0-3 | c4-7 d4-7 */
    const __m256 f11 = _mm256_cvtepi32_ps(_mm256_unpacklo_epi16(t1, zero));
    const __m256 f12 = _mm256_cvtepi32_ps(_mm256_unpackhi_epi16(t1, zero));
    const __m256 f21 = _mm256_cvtepi32_ps(_mm256_unpacklo_epi16(t2, zero));
    const __m256 f22 = _mm256_cvtepi32_ps(_mm256_unpackhi_epi16(t2, zero));
    const __m256 wa = _mm256_loadu_ps(xa), wa1 = _mm256_loadu_ps(xa1);
    const __m256 top = _mm256_add_ps(_mm256_mul_ps(f11, wa1), _mm256_mul_ps(f12, wa));
    const __m256 bot = _mm256_add_ps(_mm256_mul_ps(f21, wa1), _mm256_mul_ps(f22, wa));
    const __m256 res = _mm256_add_ps(_mm256_mul_ps(top, YA1), _mm256_mul_ps(bot, YA));
    const __m256i r = _mm256_cvtps_epi32(res);                 /* round to nearest even, like cvtss2si */
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);   /* saturate to u16 */
    _mm_storeu_si128((__m128i *)d, _mm256_castsi256_si128(p));
}

/* A run of n pixels with the interleaved table Q (see above). A run of 8 or more ends with its last 8 pixels,
 * recomputing (identically) some already written, instead of a scalar tail. */
__attribute__((target("avx2"))) static NOCONTRACT void interp_run_q_avx2(
        const uint16_t *s, uint16_t *d, int n, const uint64_t *Q, int vlo, const float *xa, const float *xa1,
        float ya, float ya1) {
    /* Qp[v] = Q[v - vlo] (the address arithmetic on integers: Qp itself may point before the buffer) */
    const long long *Qp = (const long long *)((uintptr_t)Q - (uintptr_t)vlo * sizeof(uint64_t));
    const __m256 YA = _mm256_set1_ps(ya), YA1 = _mm256_set1_ps(ya1);
    int x = 0;
    for (; x + 8 <= n; x += 8) interp8_q_avx2(s + x, d + x, Qp, xa + x, xa1 + x, YA, YA1);
    if (x < n && n >= 8) {
        interp8_q_avx2(s + n - 8, d + n - 8, Qp, xa + n - 8, xa1 + n - 8, YA, YA1);
        return;
    }
    for (; x < n; ++x) {
        const uint64_t q = Q[s[x] - vlo];
        const float res = ((float)(uint16_t)q * xa1[x] + (float)(uint16_t)(q >> 16) * xa[x]) * ya1 +
                          ((float)(uint16_t)(q >> 32) * xa1[x] + (float)(uint16_t)(q >> 48) * xa[x]) * ya;
        d[x] = sat_u16(res);
    }
}
#else
#define HAVE_GATHER 0
#endif

static NOCONTRACT void interp_run_scalar(const uint16_t *s, uint16_t *d, int n, const uint16_t *lut, int64_t b11,
                                         int64_t b12, int64_t b21, int64_t b22, const float *xa,
                                         const float *xa1, float ya, float ya1) {
    for (int x = 0; x < n; ++x) {
        const int v = s[x];
        const float res = ((float)lut[b11 + v] * xa1[x] + (float)lut[b12 + v] * xa[x]) * ya1 +
                          ((float)lut[b21 + v] * xa1[x] + (float)lut[b22 + v] * xa[x]) * ya;
        d[x] = sat_u16(res);
    }
}

#if HAVE_GATHER
/* Q[i] = t11[i] | t12[i] << 16 | t21[i] << 32 | t22[i] << 48 for i < n: 16 entries per step, in-lane unpacks */
__attribute__((target("avx2"))) static void interleave_pass_avx2(const uint16_t *t11, const uint16_t *t12,
                                                                 const uint16_t *t21, const uint16_t *t22, int n,
                                                                 uint64_t *Q) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(t11 + i)), b = _mm256_loadu_si256((const __m256i *)(t12 + i));
        const __m256i c = _mm256_loadu_si256((const __m256i *)(t21 + i)), d = _mm256_loadu_si256((const __m256i *)(t22 + i));
        const __m256i ab0 = _mm256_unpacklo_epi16(a, b), ab1 = _mm256_unpackhi_epi16(a, b);   /* 0-3 8-11 | 4-7 12-15 */
        const __m256i cd0 = _mm256_unpacklo_epi16(c, d), cd1 = _mm256_unpackhi_epi16(c, d);
        const __m256i q0 = _mm256_unpacklo_epi32(ab0, cd0), q1 = _mm256_unpackhi_epi32(ab0, cd0);   /* 0 1 | 8 9, 2 3 | 10 11 */
        const __m256i q2 = _mm256_unpacklo_epi32(ab1, cd1), q3 = _mm256_unpackhi_epi32(ab1, cd1);   /* 4 5 | 12 13, 6 7 | 14 15 */
        _mm256_storeu_si256((__m256i *)(Q + i), _mm256_permute2x128_si256(q0, q1, 0x20));
        _mm256_storeu_si256((__m256i *)(Q + i + 4), _mm256_permute2x128_si256(q2, q3, 0x20));
        _mm256_storeu_si256((__m256i *)(Q + i + 8), _mm256_permute2x128_si256(q0, q1, 0x31));
        _mm256_storeu_si256((__m256i *)(Q + i + 12), _mm256_permute2x128_si256(q2, q3, 0x31));
    }
    for (; i < n; ++i)
        Q[i] = (uint64_t)t11[i] | (uint64_t)t12[i] << 16 | (uint64_t)t21[i] << 32 | (uint64_t)t22[i] << 48;
}
#endif

/*
 * bins = 65536: interpolate rows y0 <= y < y1 with the restricted tables (lut, base from
 * prefetchd_clahe_u16_ranges / prefetchd_clahe_luts_u16); `lut` has at least one entry past its end (the
 * gathers read 32 bits). total: the number of table entries; mins/maxs: each tile's value range
 * (prefetchd_clahe_tile_minmax). Returns 0, or -1 (no memory).
 */
EXPORT NOCONTRACT int prefetchd_clahe_interp_u16(const uint16_t *src, ptrdiff_t sstride, uint16_t *dst,
                                                 ptrdiff_t dstride, int y0, int y1, int W, int th, int tw,
                                                 int tiles_x, int tiles_y, const uint16_t *lut,
                                                 const int64_t *base, int64_t total, const int32_t *mins,
                                                 const int32_t *maxs) {
    int *ind1 = NULL, *ind2 = NULL;
    float *xa = NULL, *xa1 = NULL;
    int *runs = (int *)malloc(sizeof(int) * 2 * ((size_t)W + 1));
    if (!runs || column_weights(W, tw, tiles_x, &ind1, &ind2, &xa, &xa1) != 0) {
        free(runs); free(ind1); free(ind2); free(xa); free(xa1);
        return -1;
    }
    /* runs of columns reading the same pair of tile columns */
    int nruns = 0;
    for (int x = 0; x < W;) {
        int xe = x + 1;
        while (xe < W && ind1[xe] == ind1[x] && ind2[xe] == ind2[x]) ++xe;
        runs[2 * nruns] = x;
        runs[2 * nruns + 1] = xe;
        ++nruns;
        x = xe;
    }
#if HAVE_GATHER
    const int avx2 = __builtin_cpu_supports("avx2");
    const int gather16 = avx2 && total + 65536 < (int64_t)INT32_MAX;   /* 32-bit gather offsets */
#else
    (void)total;
#endif
    uint64_t *Q = NULL;                 /* the region's interleaved table, qcap entries */
    int qcap = 0;
    /* bands of rows reading the same pair of tile rows, walked run by run, so that the tables of a region
     * stay in cache even when they span all 65,536 values */
    const float inv_th = 1.0f / (float)th;
    for (int yb = y0; yb < y1;) {
        int ty1, ty2, ye = yb + 1;
        float ya, ya1;
        row_tiles(yb, inv_th, tiles_y, &ty1, &ty2, &ya, &ya1);
        for (; ye < y1; ++ye) {
            int a, b;
            row_tiles(ye, inv_th, tiles_y, &a, &b, &ya, &ya1);
            if (a != ty1 || b != ty2) break;
        }
        const int64_t *R1 = base + (size_t)ty1 * tiles_x, *R2 = base + (size_t)ty2 * tiles_x;
        for (int r = 0; r < nruns; ++r) {
            const int x = runs[2 * r], n = runs[2 * r + 1] - x, a = ind1[x], b = ind2[x];
            int useq = 0, vlo = 0;
#if HAVE_GATHER
            /* the region's pixels lie in the tiles it overlaps */
            int vhi = -1;
            vlo = 65536;
            for (int i = yb / th; i <= (ye - 1) / th; ++i) {
                for (int j = x / tw; j <= (x + n - 1) / tw; ++j) {
                    if (mins[i * tiles_x + j] < vlo) vlo = mins[i * tiles_x + j];
                    if (maxs[i * tiles_x + j] > vhi) vhi = maxs[i * tiles_x + j];
                }
            }
            const int range = vhi - vlo + 1;
            useq = avx2 && range > 0 && (int64_t)range <= (int64_t)QTABLE_RATIO * n * (ye - yb);
            if (useq && range > qcap) {
                free(Q);
                qcap = range < 4096 ? 4096 : range;
                Q = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)qcap);
                if (!Q) {
                    free(runs); free(ind1); free(ind2); free(xa); free(xa1);
                    return -1;
                }
            }
            if (useq)
                interleave_pass_avx2(lut + (R1[a] + vlo), lut + (R1[b] + vlo), lut + (R2[a] + vlo), lut + (R2[b] + vlo),
                                     range, Q);
#else
            (void)mins; (void)maxs; (void)qcap;
#endif
            for (int y = yb; y < ye; ++y) {
                int t1, t2;
                row_tiles(y, inv_th, tiles_y, &t1, &t2, &ya, &ya1);
                const uint16_t *s = src + (ptrdiff_t)y * sstride + x;
                uint16_t *d = dst + (ptrdiff_t)y * dstride + x;
                if (y + PF_ROWS < ye) {
                    prefetch_row(s + PF_ROWS * sstride, n);
                    prefetch_row_w(d + PF_ROWS * dstride, n);
                }
#if HAVE_GATHER
                if (useq) {
                    interp_run_q_avx2(s, d, n, Q, vlo, xa + x, xa1 + x, ya, ya1);
                    continue;
                }
                if (gather16) {
                    interp_run_avx2(s, d, n, lut, (int32_t)R1[a], (int32_t)R1[b], (int32_t)R2[a], (int32_t)R2[b],
                                    xa + x, xa1 + x, ya, ya1);
                    continue;
                }
#endif
                (void)useq; (void)vlo;
                interp_run_scalar(s, d, n, lut, R1[a], R1[b], R2[a], R2[b], xa + x, xa1 + x, ya, ya1);
            }
        }
        yb = ye;
    }
    free(Q);
    free(runs);
    free(ind1); free(ind2); free(xa); free(xa1);
    return 0;
}

/* out[i] = lut[in[i]] over rows y0..y1 (robust rescale applied as a 65,536-entry table). */
EXPORT void prefetchd_lut_u16(const uint16_t *src, ptrdiff_t sstride, uint16_t *dst, ptrdiff_t dstride, int y0, int y1,
                              int W, const uint16_t *lut) {
    for (int y = y0; y < y1; ++y) {
        const uint16_t *s = src + (ptrdiff_t)y * sstride;
        uint16_t *d = dst + (ptrdiff_t)y * dstride;
        for (int x = 0; x < W; ++x) d[x] = lut[s[x]];
    }
}

/* Illumination correction of rows y0..y1: dst = clip(rint(float(src) / illum), 0, 65535), numpy's float32
 * arithmetic (IEEE division, round half to even) in one pass instead of five. The quotient is >= 0 (illumination
 * functions are checked > 0 and finite when loaded), so clipping before rounding is the same, and adding then
 * subtracting 2^23 rounds a value below 2^23 half to even (default rounding mode, fp-contract off). SSE2 by
 * hand: GCC does not vectorise the scalar loop (the division may trap). */
static inline uint16_t illum_one(uint16_t s, float il) {
    float q = (float)s / il;
    q = q < 65535.0f ? q : 65535.0f;
    return (uint16_t)(int)((q + 8388608.0f) - 8388608.0f);
}

static void illum_row(const uint16_t *restrict s, const float *restrict il, uint16_t *restrict d, int W,
                      int64_t *restrict hist) {
    int x = 0;
#if defined(__SSE2__)
    const __m128 top = _mm_set1_ps(65535.0f), magic = _mm_set1_ps(8388608.0f);
    const __m128i zero = _mm_setzero_si128(), bias = _mm_set1_epi32(32768), flip = _mm_set1_epi16((short)0x8000);
    for (; x + 8 <= W; x += 8) {
        __m128i v = _mm_loadu_si128((const __m128i *)(s + x));
        __m128 lo = _mm_cvtepi32_ps(_mm_unpacklo_epi16(v, zero));
        __m128 hi = _mm_cvtepi32_ps(_mm_unpackhi_epi16(v, zero));
        lo = _mm_min_ps(_mm_div_ps(lo, _mm_loadu_ps(il + x)), top);
        hi = _mm_min_ps(_mm_div_ps(hi, _mm_loadu_ps(il + x + 4)), top);
        lo = _mm_sub_ps(_mm_add_ps(lo, magic), magic);
        hi = _mm_sub_ps(_mm_add_ps(hi, magic), magic);
        __m128i a = _mm_sub_epi32(_mm_cvttps_epi32(lo), bias), b = _mm_sub_epi32(_mm_cvttps_epi32(hi), bias);
        _mm_storeu_si128((__m128i *)(d + x), _mm_xor_si128(_mm_packs_epi32(a, b), flip));
    }
#endif
    for (; x < W; ++x) d[x] = illum_one(s[x], il[x]);
    if (hist)
        for (x = 0; x < W; ++x) hist[d[x]]++;
}

/* hist (may be NULL): the 65,536-bin histogram of the result, accumulated while its rows are in cache (what
 * the robust rescale reads next). */
EXPORT void prefetchd_illum_u16(const uint16_t *src, ptrdiff_t sstride, const float *illum, ptrdiff_t istride,
                                uint16_t *dst, ptrdiff_t dstride, int y0, int y1, int W, int64_t *hist) {
    for (int y = y0; y < y1; ++y)
        illum_row(src + (ptrdiff_t)y * sstride, illum + (ptrdiff_t)y * istride, dst + (ptrdiff_t)y * dstride, W,
                  hist);
}

/* The robust rescale's table from a channel's 65,536-bin histogram, bit for bit what clahe.py's
 * percentiles_from_hist + rescale_lut compute (float64 percentiles with numpy's 'linear' definition, then the
 * float32 map of [lo, hi] to [0, 65535], rounded half to even, clipped); bounds gets (lo, hi). */
EXPORT void prefetchd_rescale_table(const int64_t *hist, double low, double high, uint16_t *lut, double *bounds) {
    int64_t n = 0;
    for (int i = 0; i < 65536; ++i) n += hist[i];
    double q[2] = {low, high};
    for (int j = 0; j < 2; ++j) {
        if (n == 0) { bounds[j] = 0.0; continue; }
        double rank = q[j] / 100.0 * (double)(n - 1);
        int64_t k0 = (int64_t)floor(rank);
        double frac = rank - (double)k0;
        int64_t k1 = k0 + 1 < n - 1 ? k0 + 1 : n - 1;
        int64_t c = 0, v0 = -1, v1 = -1;      /* first bins whose cumulative count exceeds k0, k1 */
        for (int i = 0; i < 65536 && v1 < 0; ++i) {
            c += hist[i];
            if (v0 < 0 && c > k0) v0 = i;
            if (c > k1) v1 = i;
        }
        bounds[j] = (double)v0 + frac * (double)(v1 - v0);
    }
    double span64 = bounds[1] - bounds[0];
    float span = (float)(span64 >= 1.0 ? span64 : 1.0);
    float lo = (float)bounds[0], scale = 65535.0f / span;
    for (int v = 0; v < 65536; ++v) {
        float r = ((float)v - lo) * scale;
        r = r > 0.0f ? r : 0.0f;
        r = r < 65535.0f ? r : 65535.0f;
        lut[v] = (uint16_t)(int)((r + 8388608.0f) - 8388608.0f);
    }
}

/* 65,536-bin histogram (int64 counts) of rows y0..y1, accumulated into hist. */
EXPORT void prefetchd_hist_u16(const uint16_t *src, ptrdiff_t sstride, int y0, int y1, int W, int64_t *hist) {
    for (int y = y0; y < y1; ++y) {
        const uint16_t *s = src + (ptrdiff_t)y * sstride;
        for (int x = 0; x < W; ++x) hist[s[x]]++;
    }
}

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_clahe",
    "prefetchd CLAHE kernel; the functions are C symbols called through ctypes (see clahe.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__clahe(void) { return PyModule_Create(&moduledef); }

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

EXPORT int prefetchd_clahe_abi(void) { return 1; }

#define CHUNK 256

/* nearest bin centre: round(v * (bins - 1) / 65535); never a tie since 65535 is odd */
__attribute__((target_clones("avx2","default")))
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


__attribute__((target_clones("avx2","default"))) static NOCONTRACT void bin_pass(const uint16_t *restrict s, int n, uint32_t bm1, float inv_65535,
                                uint32_t *restrict kb, float *restrict fb) {
    for (int i = 0; i < n; ++i) {
        const uint32_t num = (uint32_t)s[i] * bm1;
        const uint32_t b0 = num / 65535u;
        fb[i] = (float)(int32_t)(num - b0 * 65535u) * inv_65535;
        kb[i] = b0 * 2;
    }
}

__attribute__((target_clones("avx2","default"))) static NOCONTRACT void blend_pass(const float *restrict m1, const float *restrict m2, const float *restrict w1,
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
    int *ind1, *ind2;
    float *xa, *xa1;
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

__attribute__((target_clones("avx2","default")))
static void minmax_pass(const uint16_t *restrict s, int n, uint16_t *mn, uint16_t *mx) {
    uint16_t a = *mn, b = *mx;
    for (int i = 0; i < n; ++i) {
        a = s[i] < a ? s[i] : a;
        b = s[i] > b ? s[i] : b;
    }
    *mn = a;
    *mx = b;
}

/* [min, max] of the (padded) image over tiles t0 <= t < t1. */
EXPORT void prefetchd_clahe_tile_minmax(const uint16_t *src, ptrdiff_t stride, int th, int tw, int tiles_x,
                                        int t0, int t1, int32_t *mins, int32_t *maxs) {
    for (int t = t0; t < t1; ++t) {
        const int ty = t / tiles_x, tx = t % tiles_x;
        uint16_t mn = 65535, mx = 0;
        for (int y = 0; y < th; ++y)
            minmax_pass(src + (ptrdiff_t)(ty * th + y) * stride + (ptrdiff_t)tx * tw, tw, &mn, &mx);
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

__attribute__((target_clones("avx2","default")))
static void merge_pass(int32_t *restrict h, int span) {
    for (int i = 0; i < span; ++i) h[i] += h[span + i] + h[2 * span + i] + h[3 * span + i];
}

__attribute__((target_clones("avx2","default")))
static void clip_pass(int32_t *restrict h, int span, int clip, int64_t *excess) {
    int64_t e = 0;
    for (int i = 0; i < span; ++i) {
        const int32_t over = h[i] > clip ? h[i] - clip : 0;
        e += over;
        h[i] -= over;
    }
    *excess = e;
}

__attribute__((target_clones("avx2","default")))
static NOCONTRACT void table_pass(const int32_t *restrict c, int n, float scale, uint16_t *restrict L) {
    for (int i = 0; i < n; ++i) {
        float r = (float)c[i] * scale;
        r = r < 0.0f ? 0.0f : (r > 65535.0f ? 65535.0f : r);   /* = saturate(round(r)) */
        L[i] = (uint16_t)(int32_t)__builtin_rintf(r);
    }
}

/*
 * Tables of tiles t0 <= t < t1 for bins = 65536 over [lo[t], hi[t]] only, into lut[base[t] + v].
 * mins/maxs: each tile's value range (prefetchd_clahe_tile_minmax). Returns 0, or -1 (no memory).
 */
EXPORT NOCONTRACT int prefetchd_clahe_luts_u16(const uint16_t *src, ptrdiff_t stride, int th, int tw, int tiles_x,
                                               int t0, int t1, int clip, float lut_scale, const int32_t *mins,
                                               const int32_t *maxs, const int32_t *lo, const int32_t *hi,
                                               const int64_t *base, uint16_t *lut) {
    int maxspan = 1, maxlen = 1;
    for (int t = t0; t < t1; ++t) {
        if (lo[t] > hi[t]) continue;
        const int span = maxs[t] - mins[t] + 1;
        const int s = lo[t] < mins[t] ? lo[t] : mins[t];
        if (span > maxspan) maxspan = span;
        if (hi[t] - s + 1 > maxlen) maxlen = hi[t] - s + 1;
    }
    int32_t *hist = (int32_t *)malloc(sizeof(int32_t) * ((size_t)4 * maxspan + (size_t)maxlen));
    if (!hist) return -1;
    int32_t *acc = hist + (size_t)4 * maxspan;
    for (int t = t0; t < t1; ++t) {
        const int l = lo[t], h = hi[t];
        if (l > h) continue;                    /* never read */
        const int ty = t / tiles_x, tx = t % tiles_x;
        const int tmin = mins[t], tmax = maxs[t], span = tmax - tmin + 1;
        if (span <= SUB_SPAN) {
            memset(hist, 0, sizeof(int32_t) * (size_t)4 * span);
            int32_t *h0 = hist, *h1 = hist + span, *h2 = hist + 2 * span, *h3 = hist + 3 * span;
            for (int y = 0; y < th; ++y) {
                const uint16_t *row = src + (ptrdiff_t)(ty * th + y) * stride + (ptrdiff_t)tx * tw;
                int x = 0;
                for (; x + 4 <= tw; x += 4) {
                    h0[row[x] - tmin]++;
                    h1[row[x + 1] - tmin]++;
                    h2[row[x + 2] - tmin]++;
                    h3[row[x + 3] - tmin]++;
                }
                for (; x < tw; ++x) h0[row[x] - tmin]++;
            }
            merge_pass(hist, span);
        } else {
            memset(hist, 0, sizeof(int32_t) * (size_t)span);
            for (int y = 0; y < th; ++y) {
                const uint16_t *row = src + (ptrdiff_t)(ty * th + y) * stride + (ptrdiff_t)tx * tw;
                for (int x = 0; x < tw; ++x) hist[row[x] - tmin]++;
            }
        }
        int64_t excess = 0;
        if (clip > 0) clip_pass(hist, span, clip, &excess);
        const int redist = (int)(excess >> 16), residual = (int)(excess & 65535);
        const int step = residual > 0 ? 65536 / residual : 65536;   /* >= 1 since residual < 65536 */
        /* cdf over [s, h] with s <= tmin (so the histogram prefix below s is 0) */
        const int s = l < tmin ? l : tmin, n = h - s + 1;
        int64_t c = (int64_t)s * redist;
        if (residual > 0 && s > 0) {
            const int64_t r = (int64_t)(s - 1) / step + 1;
            c += r < residual ? r : residual;
        }
        /* three segments: below the tile's values, over them, above them */
        const int a0 = tmin - s, a1 = (tmax < h ? tmax : h) - s + 1;   /* histogram covers [a0, a1) */
        int i = 0;
        for (; i < a0 && i < n; ++i) acc[i] = (int32_t)(c += redist);
        for (; i < a1; ++i) acc[i] = (int32_t)(c += redist + hist[i - a0]);
        for (; i < n; ++i) acc[i] = (int32_t)(c += redist);
        if (residual > 0) {   /* bump k (at k * step) raises the cdf from there on */
            const int64_t k0 = ((int64_t)s + step - 1) / step;
            for (int64_t k = k0; k < residual && k * step <= h; ++k) {
                const int64_t j1 = k + 1 < residual && (k + 1) * step <= h ? (k + 1) * step - s : n;
                const int32_t add = (int32_t)(k - k0 + 1);
                for (int64_t j = k * step - s; j < j1; ++j) acc[j] += add;
            }
        }
        table_pass(acc + (l - s), h - l + 1, lut_scale, lut + (base[t] + l));
    }
    free(hist);
    return 0;
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(PREFETCHD_NO_GATHER)
#include <immintrin.h>
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

/*
 * bins = 65536: interpolate rows y0 <= y < y1 with the restricted tables (lut, base from
 * prefetchd_clahe_u16_ranges / prefetchd_clahe_luts_u16); `lut` has at least one entry past its end (the
 * gathers read 32 bits). total: the number of table entries. Returns 0, or -1 (no memory).
 */
EXPORT NOCONTRACT int prefetchd_clahe_interp_u16(const uint16_t *src, ptrdiff_t sstride, uint16_t *dst,
                                                 ptrdiff_t dstride, int y0, int y1, int W, int th, int tw,
                                                 int tiles_x, int tiles_y, const uint16_t *lut,
                                                 const int64_t *base, int64_t total) {
    int *ind1, *ind2;
    float *xa, *xa1;
    int *runs = (int *)malloc(sizeof(int) * 3 * ((size_t)W + 1));
    if (!runs || column_weights(W, tw, tiles_x, &ind1, &ind2, &xa, &xa1) != 0) {
        free(runs); free(ind1); free(ind2); free(xa); free(xa1);
        return -1;
    }
    /* runs of columns reading the same pair of tile columns */
    int nruns = 0;
    for (int x = 0; x < W;) {
        int xe = x + 1;
        while (xe < W && ind1[xe] == ind1[x] && ind2[xe] == ind2[x]) ++xe;
        runs[3 * nruns] = x;
        runs[3 * nruns + 1] = xe;
        runs[3 * nruns + 2] = nruns;
        ++nruns;
        x = xe;
    }
    int gather = 0;
#if HAVE_GATHER
    gather = __builtin_cpu_supports("avx2") && total + 65536 < (int64_t)INT32_MAX;
#endif
    /* bands of rows reading the same pair of tile rows, walked run by run, so that the four tables of a
     * run stay in cache even when they span all 65,536 values (the arithmetic per pixel is unchanged) */
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
            const int x = runs[3 * r], n = runs[3 * r + 1] - x, a = ind1[x], b = ind2[x];
            for (int y = yb; y < ye; ++y) {
                int t1, t2;
                row_tiles(y, inv_th, tiles_y, &t1, &t2, &ya, &ya1);
                const uint16_t *s = src + (ptrdiff_t)y * sstride + x;
                uint16_t *d = dst + (ptrdiff_t)y * dstride + x;
#if HAVE_GATHER
                if (gather) {
                    interp_run_avx2(s, d, n, lut, (int32_t)R1[a], (int32_t)R1[b], (int32_t)R2[a], (int32_t)R2[b],
                                    xa + x, xa1 + x, ya, ya1);
                    continue;
                }
#endif
                interp_run_scalar(s, d, n, lut, R1[a], R1[b], R2[a], R2[b], xa + x, xa1 + x, ya, ya1);
            }
        }
        yb = ye;
    }
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

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

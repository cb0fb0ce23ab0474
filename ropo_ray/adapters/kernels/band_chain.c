/* A chain of circulant band operators applied to the rows of a matrix, forward and backward.
 *
 * RoPO's rotation R = R_(b1) ... R_(bK) (ropo_ray/adapters/rotation.py) with "shift" or "none" mixing is a
 * product of K band matrices: factor k moves each coordinate only within its block of b_k consecutive
 * (circularly) coordinates, so x @ R_(bk) is
 *
 *     y[i] = sum_{o=-w..w} x[(i + o) mod d] * c[o + w, i],     w = b_k - 1,
 *
 * with c (tap-major, [2w + 1, d]) gathered from the factor's orthogonal blocks in Python. One row at a time
 * the whole chain runs inside the L1 cache: a row is read once and written once, where the block-matmul
 * form reads and writes the activation three times per factor plus its permutation copies.
 *
 * Rows may be float32 or bfloat16 (flag per tensor); arithmetic is float32. Threads: OpenMP over rows
 * (the same libgomp torch loads). Built and loaded by ropo_ray/adapters/native.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Floats per vector: one register of the widest vector unit the target has. A vector type wider than the
 * target's registers is legal C, but GCC then moves it through the stack: on an AVX2-only Zen 3, 16-float
 * vectors made the forward 2.4x and the backward 4.2x slower than 8-float ones (BENCHMARKS.md). */
#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4 /* SSE, NEON */
#endif
#define TA 4  /* rows per forward block: each coefficient vector is loaded once for TA rows */
typedef float vf __attribute__((vector_size(VL * sizeof(float))));

static inline vf ldu(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void stu(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline void load_row(const void *src, int bf16, int64_t t, int64_t d, float *dst) {
    if (bf16) {
        const uint16_t *h = (const uint16_t *)src + t * d;
        for (int64_t i = 0; i < d; i++) dst[i] = bf16_to_f32(h[i]);
    } else {
        memcpy(dst, (const float *)src + t * d, (size_t)d * sizeof(float));
    }
}

static inline void store_row(void *dst, int bf16, int64_t t, int64_t d, const float *src) {
    if (bf16) {
        uint16_t *h = (uint16_t *)dst + t * d;
        for (int64_t i = 0; i < d; i++) h[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)dst + t * d, src, (size_t)d * sizeof(float));
    }
}

/* Circular padding in place: buf holds the row at buf[W .. W + d); fill w cells on each side. */
static inline void wrap(float *buf, int64_t d, int w) {
    float *mid = buf + w;
    for (int j = 0; j < w; j++) {
        buf[j] = mid[d - w + j];
        mid[d + j] = mid[j];
    }
}

/* Copy nrows rows (stride d) into the padded buffer (stride pw) at offset w, circularly padded. */
static inline void pad_rows(float *dst, int64_t pw, const float *src, int64_t d, int w, int nrows) {
    for (int s = 0; s < nrows; s++) {
        memcpy(dst + s * pw + w, src + s * d, (size_t)d * sizeof(float));
        wrap(dst + s * pw, d, w);
    }
}

/* out[s][i] = sum_o in[s][i + o] c[o, i] for nrows <= TA rows (in padded by w, stride pw; out stride d). */
static void band_rows(const float *in, int64_t pw, float *out, const float *c, int64_t d, int w, int nrows) {
    const int taps = 2 * w + 1;
    int64_t i0 = 0;
    if (nrows == TA) {
        for (; i0 + VL <= d; i0 += VL) {
            vf a[TA];
            for (int s = 0; s < TA; s++) a[s] = (vf){0};
            for (int k = 0; k < taps; k++) {
                vf ck = ldu(c + (int64_t)k * d + i0);
                for (int s = 0; s < TA; s++) a[s] += ldu(in + s * pw + k + i0) * ck;
            }
            for (int s = 0; s < TA; s++) stu(out + s * d + i0, a[s]);
        }
    } else {
        for (; i0 + VL <= d; i0 += VL)
            for (int s = 0; s < nrows; s++) {
                vf a = {0};
                for (int k = 0; k < taps; k++) a += ldu(in + s * pw + k + i0) * ldu(c + (int64_t)k * d + i0);
                stu(out + s * d + i0, a);
            }
    }
    for (int s = 0; s < nrows; s++)
        for (int64_t i = i0; i < d; i++) {
            float a = 0.f;
            for (int k = 0; k < taps; k++) a += in[s * pw + i + k] * c[(int64_t)k * d + i];
            out[s * d + i] = a;
        }
}

/* acc[k, i] += sum_s h[s][i] * u[s][i + k] for nrows <= TA rows (u padded, stride pw; h stride d). */
static void band_outer(const float *u, int64_t pw, const float *h, float *acc, int64_t d, int w, int nrows) {
    const int taps = 2 * w + 1;
    int64_t i0 = 0;
    for (; i0 + VL <= d; i0 += VL) {
        vf hs[TA];
        for (int s = 0; s < nrows; s++) hs[s] = ldu(h + s * d + i0);
        for (int k = 0; k < taps; k++) {
            float *ak = acc + (int64_t)k * d + i0;
            vf a = ldu(ak);
            for (int s = 0; s < nrows; s++) a += hs[s] * ldu(u + s * pw + k + i0);
            stu(ak, a);
        }
    }
    for (int64_t i = i0; i < d; i++)
        for (int k = 0; k < taps; k++)
            for (int s = 0; s < nrows; s++) acc[(int64_t)k * d + i] += h[s * d + i] * u[s * pw + k + i];
}

static int max_width(const int *widths, int nf) {
    int w = 0;
    for (int f = 0; f < nf; f++) w = widths[f] > w ? widths[f] : w;
    return w;
}

/* y = x @ F_1 @ ... @ F_nf, each F_f a band of half-width widths[f] with coefficients at coef + off_f,
 * off_f = d * sum_{g < f} (2 widths[g] + 1). */
void chain_forward(const void *x, int x_bf16, void *y, int y_bf16, const float *coef, const int *widths, int nf,
                   int64_t rows, int64_t d, int threads) {
    const int wm = max_width(widths, nf);
    const int64_t pw = d + 2 * wm;
#pragma omp parallel num_threads(threads)
    {
        float *buf = (float *)malloc((size_t)TA * pw * sizeof(float));
        float *tmp = (float *)malloc((size_t)TA * d * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < rows; t0 += TA) {
            const int nr = rows - t0 < TA ? (int)(rows - t0) : TA;
            for (int s = 0; s < nr; s++) load_row(x, x_bf16, t0 + s, d, tmp + s * d);
            const float *c = coef;
            for (int f = 0; f < nf; f++) {
                const int w = widths[f];
                pad_rows(buf, pw, tmp, d, w, nr);
                band_rows(buf, pw, tmp, c, d, w, nr);
                c += (int64_t)(2 * w + 1) * d;
            }
            for (int s = 0; s < nr; s++) store_row(y, y_bf16, t0 + s, d, tmp + s * d);
        }
        free(buf);
        free(tmp);
    }
}

/* Backward of chain_forward. g = dL/dy. Writes gx = dL/dx and gcoef = dL/dcoef (same layout as coef).
 * Rows go TA at a time. coef_t holds each factor's transposed band: coef_t_f[k, j] = coef_f[2w - k, (j + k - w) mod d], so
 * h @ F_f^T is the same band product with coef_t_f. Inputs of every factor are recomputed, not saved. */
void chain_backward(const void *x, int x_bf16, const void *g, int g_bf16, void *gx, int gx_bf16, const float *coef,
                    const float *coef_t, float *gcoef, const int *widths, int nf, int64_t rows, int64_t d,
                    int threads) {
    const int wm = max_width(widths, nf);
    const int64_t pw = d + 2 * wm;
    int64_t ncoef = 0;
    for (int f = 0; f < nf; f++) ncoef += (int64_t)(2 * widths[f] + 1) * d;
    memset(gcoef, 0, (size_t)ncoef * sizeof(float));
#pragma omp parallel num_threads(threads)
    {
        float *u = (float *)malloc((size_t)nf * TA * pw * sizeof(float)); /* padded inputs of each factor */
        float *h = (float *)malloc((size_t)TA * pw * sizeof(float));      /* padded gradient at an output */
        float *tmp = (float *)malloc((size_t)TA * d * sizeof(float));
        float *acc = (float *)calloc((size_t)ncoef, sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < rows; t0 += TA) {
            const int nr = rows - t0 < TA ? (int)(rows - t0) : TA;
            for (int s = 0; s < nr; s++) load_row(x, x_bf16, t0 + s, d, tmp + s * d);
            const float *c = coef;
            for (int f = 0; f < nf; f++) {
                float *uf = u + (int64_t)f * TA * pw;
                pad_rows(uf, pw, tmp, d, widths[f], nr);
                if (f + 1 < nf) band_rows(uf, pw, tmp, c, d, widths[f], nr);
                c += (int64_t)(2 * widths[f] + 1) * d;
            }
            for (int s = 0; s < nr; s++) load_row(g, g_bf16, t0 + s, d, tmp + s * d);
            int64_t off = ncoef;
            for (int f = nf - 1; f >= 0; f--) {
                const int w = widths[f];
                off -= (int64_t)(2 * w + 1) * d;
                band_outer(u + (int64_t)f * TA * pw, pw, tmp, acc + off, d, w, nr); /* dL/dc[k, i] */
                pad_rows(h, pw, tmp, d, w, nr);
                band_rows(h, pw, tmp, coef_t + off, d, w, nr); /* gradient at the factor's input */
            }
            for (int s = 0; s < nr; s++) store_row(gx, gx_bf16, t0 + s, d, tmp + s * d);
        }
#pragma omp critical
        for (int64_t i = 0; i < ncoef; i++) gcoef[i] += acc[i];
        free(u);
        free(h);
        free(tmp);
        free(acc);
    }
}

/* Backward of the RoPO layer's output scale, out = s * u + b over rows [rows, n] (ropo_ray/adapters/fused.py):
 * gu = g * s (the gradient at the frozen matmul's output) and gs[i] = sum_t g[t, i] * u[t, i] (the gradient
 * of s), with u recovered from the saved output as (out - b) / s (every s[i] nonzero; b may be NULL).
 * One pass reads g and out once and writes gu once; composed from tensor ops this is three passes and two
 * fresh [rows, n] buffers. */
void scale_backward(const void *g, int g_bf16, const void *out, int out_bf16, const float *s, const float *b,
                    void *gu, int gu_bf16, float *gs, int64_t rows, int64_t n, int threads) {
    float *sum_gy = (float *)calloc((size_t)n, sizeof(float));
    float *sum_g = (float *)calloc((size_t)n, sizeof(float));
#pragma omp parallel num_threads(threads)
    {
        float *gr = (float *)malloc((size_t)n * sizeof(float));
        float *yr = (float *)malloc((size_t)n * sizeof(float));
        float *acc_gy = (float *)calloc((size_t)n, sizeof(float));
        float *acc_g = (float *)calloc((size_t)n, sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows; t++) {
            load_row(g, g_bf16, t, n, gr);
            load_row(out, out_bf16, t, n, yr);
            int64_t i = 0;
            for (; i + VL <= n; i += VL) {
                vf gv = ldu(gr + i);
                stu(acc_gy + i, ldu(acc_gy + i) + gv * ldu(yr + i));
                stu(acc_g + i, ldu(acc_g + i) + gv);
                stu(gr + i, gv * ldu(s + i));
            }
            for (; i < n; i++) {
                acc_gy[i] += gr[i] * yr[i];
                acc_g[i] += gr[i];
                gr[i] *= s[i];
            }
            store_row(gu, gu_bf16, t, n, gr);
        }
#pragma omp critical
        for (int64_t i = 0; i < n; i++) {
            sum_gy[i] += acc_gy[i];
            sum_g[i] += acc_g[i];
        }
        free(gr);
        free(yr);
        free(acc_gy);
        free(acc_g);
    }
    for (int64_t i = 0; i < n; i++) gs[i] = (sum_gy[i] - (b ? b[i] * sum_g[i] : 0.f)) / s[i];
    free(sum_gy);
    free(sum_g);
}

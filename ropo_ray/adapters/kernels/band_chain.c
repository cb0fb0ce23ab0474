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
 * The band spends 2b - 1 multiply-adds per coordinate on a block of b, b - 1 of them on zeros. When b divides
 * the vector length, a factor is applied in the lane form instead: the row is taken in the factor's frame
 * (stream position k is coordinate (offset + k) mod d, so its blocks are aligned to the vectors) and
 *
 *     y[k] = sum_{s=0..b-1} x[m_s(k)] * c[s, k],     m_s(k) = b * (k / b) + (k + s) mod b,
 *
 * a lane rotation inside each group of b lanes (one shuffle) and one multiply-add per term: b per coordinate,
 * the block product itself. c ([b, dp], dp = d rounded up to whole vectors) is gathered from the blocks in
 * Python like the band's; lanes past d read zeros and are never written back.
 *
 * Rows may be float32 or bfloat16 (flag per tensor); arithmetic is float32. Threads: OpenMP over rows
 * (the same libgomp torch loads). Built and loaded by ropo_ray/adapters/native.py.
 *
 * Also here, for the same layer: its output scale (scale_forward / scale_backward, used by fused.py) and the
 * coefficients c themselves, computed from the rotation's skew parameters by exact Cayley
 * (cayley_coefficients / cayley_coefficients_backward, used by coefficients.py).
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
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

/* The factor kinds of a chain: spec[3 f .. 3 f + 2] = (kind, size, offset). BAND: size = the half-width w;
 * LANE: size = the block size b (b divides VL), offset = the factor's shift. */
enum { BAND = 0, LANE = 1 };

int vector_lanes(void) { return VL; }

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

/* Copy nrows rows (stride rs) into the padded buffer (stride pw) at offset w, circularly padded. */
static inline void pad_rows(float *dst, int64_t pw, const float *src, int64_t rs, int64_t d, int w, int nrows) {
    for (int s = 0; s < nrows; s++) {
        memcpy(dst + s * pw + w, src + s * rs, (size_t)d * sizeof(float));
        wrap(dst + s * pw, d, w);
    }
}

/* out[s][i] = sum_o in[s][i + o] c[o, i] for nrows <= TA rows (in padded by w, stride pw; out stride rs). */
static void band_rows(const float *in, int64_t pw, float *out, int64_t rs, const float *c, int64_t d, int w,
                      int nrows) {
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
            for (int s = 0; s < TA; s++) stu(out + s * rs + i0, a[s]);
        }
    } else {
        for (; i0 + VL <= d; i0 += VL)
            for (int s = 0; s < nrows; s++) {
                vf a = {0};
                for (int k = 0; k < taps; k++) a += ldu(in + s * pw + k + i0) * ldu(c + (int64_t)k * d + i0);
                stu(out + s * rs + i0, a);
            }
    }
    for (int s = 0; s < nrows; s++)
        for (int64_t i = i0; i < d; i++) {
            float a = 0.f;
            for (int k = 0; k < taps; k++) a += in[s * pw + i + k] * c[(int64_t)k * d + i];
            out[s * rs + i] = a;
        }
}

/* acc[k, i] += sum_s h[s][i] * u[s][i + k] for nrows <= TA rows (u padded, stride pw; h stride rs). */
static void band_outer(const float *u, int64_t pw, const float *h, int64_t rs, float *acc, int64_t d, int w,
                       int nrows) {
    const int taps = 2 * w + 1;
    int64_t i0 = 0;
    for (; i0 + VL <= d; i0 += VL) {
        vf hs[TA];
        for (int s = 0; s < nrows; s++) hs[s] = ldu(h + s * rs + i0);
        for (int k = 0; k < taps; k++) {
            float *ak = acc + (int64_t)k * d + i0;
            vf a = ldu(ak);
            for (int s = 0; s < nrows; s++) a += hs[s] * ldu(u + s * pw + k + i0);
            stu(ak, a);
        }
    }
    for (int64_t i = i0; i < d; i++)
        for (int k = 0; k < taps; k++)
            for (int s = 0; s < nrows; s++) acc[(int64_t)k * d + i] += h[s * rs + i] * u[s * pw + k + i];
}

static int64_t padded(int64_t d) { return (d + VL - 1) / VL * VL; }

/* A call's scratch buffers, carved from one page-aligned block: buffer i (floats[i] floats) starts at 256-byte class
 * first_class + i (mod 16) of a page. The kernels load from one buffer at the offset they have just stored to in
 * another (a factor's input and output, the coefficients and their gradient), and on x86 a load whose address
 * agrees with a pending store's in its low 12 bits waits for that store (4K aliasing). Allocated one by one,
 * buffers of these sizes come page-aligned from jemalloc (the training workers' allocator), all in class 0:
 * chain_backward then took 1.6x as long as on glibc's malloc and 1.8x as long as carved (benchmarks/bench_kernel.py,
 * BENCHMARKS.md session 15). Returns the block (free it); bufs[i] receives buffer i. */
#define PAGE 4096
#define CLASSES 16
static void *carve(int n, const int64_t *floats, float **bufs, int first_class) {
    size_t at[n], end = 0;
    for (int i = 0; i < n; i++) {
        const size_t mod = (size_t)((first_class + i) % CLASSES) * (PAGE / CLASSES);
        end += (mod + PAGE - end % PAGE) % PAGE;
        at[i] = end;
        end += (size_t)floats[i] * sizeof(float);
    }
    char *block = (char *)aligned_alloc(PAGE, (end + PAGE - 1) / PAGE * PAGE);
    for (int i = 0; i < n; i++) bufs[i] = (float *)(block + at[i]);
    return block;
}

/* Coefficients of factor f: band [2w + 1, d], lane [b, dp]. */
static int64_t factor_coefs(const int *spec, int f, int64_t d) {
    return spec[3 * f] == LANE ? (int64_t)spec[3 * f + 1] * padded(d) : (int64_t)(2 * spec[3 * f + 1] + 1) * d;
}

static int max_band_width(const int *spec, int nf) {
    int w = 0;
    for (int f = 0; f < nf; f++)
        if (spec[3 * f] == BAND && spec[3 * f + 1] > w) w = spec[3 * f + 1];
    return w;
}

/* The shuffle of term s: lane i of a vector takes lane b * (i / b) + (i + s) mod b (b a power of two <= VL).
 * Called with constant b and s (unrolled loops), so the mask folds to a constant and the compiler picks the
 * cheapest shuffle instruction for it. */
static inline __attribute__((always_inline)) vi lane_mask(const int b, const int s) {
    vi lane;
#pragma GCC unroll 16
    for (int i = 0; i < VL; i++) lane[i] = i;
    return (lane & ~(b - 1)) | ((lane + s) & (b - 1));
}

/* Rows are kept with stride rs = dp + VL: coordinates [0, d), then room for a lane factor's frame. A lane
 * factor with shift `off` reads and writes its stream position k at row[off + k] (k < dp); row[d .. d + off)
 * holds coordinates [0, off) while it runs (wrap_in) and is copied back after (wrap_out). Past d + off the
 * row holds zeros or earlier factors' zero-coefficient outputs: finite values that only meet zero coefficients. */
static inline void wrap_in(float *rows, int64_t rs, int64_t d, int64_t off, int nrows) {
    for (int s = 0; s < nrows; s++) memcpy(rows + s * rs + d, rows + s * rs, (size_t)off * sizeof(float));
}

static inline void wrap_out(float *rows, int64_t rs, int64_t d, int64_t off, int nrows) {
    for (int s = 0; s < nrows; s++) memcpy(rows + s * rs, rows + s * rs + d, (size_t)off * sizeof(float));
}

/* On nrows rows (stride rs, from the stream's start): y[k] = sum_s x[m_s(k)] c[s, k], in place (y0 == x0) or
 * not. B is a compile-time constant at every call (LANE_CASES), so the term loop unrolls, the shuffle masks are
 * constants and the coefficients stay in registers. */
static inline __attribute__((always_inline)) void lane_rows_b(const float *x0, float *y0, int64_t rs, int64_t dp,
                                                             const float *c, int nrows, const int B) {
    for (int64_t k = 0; k < dp; k += VL) {
        vf cs[16];
#pragma GCC unroll 16
        for (int s = 0; s < B; s++) cs[s] = ldu(c + (int64_t)s * dp + k);
#pragma GCC unroll 4
        for (int r = 0; r < nrows; r++) {
            vf x = ldu(x0 + r * rs + k);
            vf a = x * cs[0];
#pragma GCC unroll 16
            for (int s = 1; s < B; s++) a += __builtin_shuffle(x, lane_mask(B, s)) * cs[s];
            stu(y0 + r * rs + k, a);
        }
    }
}

/* Backward on nrows rows of the factor's input u and output gradient h (stride rs, from the stream's start). In
 * place of h: the gradient at the factor's input, sum_s h[m_s(k)] ct[s, k] (ct: the transposed operator's
 * coefficients). Into acc: the coefficients' gradient in the transposed arrangement,
 * acc[s, k] += sum_r h[r][m_s(k)] u[r][k] = dL/dc[(b - s) mod b, m_s(k)], so that both sums use the same b - 1
 * shuffles of h (lane_grads_untransposed puts acc back in c's arrangement once per call). */
static inline __attribute__((always_inline)) void lane_back_b(const float *restrict u0, float *restrict h0,
                                                             int64_t rs, int64_t dp, const float *restrict ct,
                                                             float *restrict acc, int nrows, const int B) {
    for (int64_t k = 0; k < dp; k += VL) {
        vf hv[TA] = {(vf){0}}, uv[TA] = {(vf){0}}, gv[TA];
#pragma GCC unroll 4
        for (int r = 0; r < nrows; r++) {
            hv[r] = ldu(h0 + r * rs + k);
            uv[r] = ldu(u0 + r * rs + k);
        }
#pragma GCC unroll 16
        for (int s = 0; s < B; s++) {
            const vf cs = ldu(ct + (int64_t)s * dp + k);
            vf a = ldu(acc + (int64_t)s * dp + k);
#pragma GCC unroll 4
            for (int r = 0; r < nrows; r++) {
                const vf hs = s ? __builtin_shuffle(hv[r], lane_mask(B, s)) : hv[r];
                a += hs * uv[r];
                gv[r] = s ? gv[r] + hs * cs : hs * cs;
            }
            stu(acc + (int64_t)s * dp + k, a);
        }
#pragma GCC unroll 4
        for (int r = 0; r < nrows; r++) stu(h0 + r * rs + k, gv[r]);
    }
}

#if VL >= 16
#define LANE_CASES(CALL) CALL(2) CALL(4) CALL(8) CALL(16)
#elif VL >= 8
#define LANE_CASES(CALL) CALL(2) CALL(4) CALL(8)
#else
#define LANE_CASES(CALL) CALL(2) CALL(4)
#endif

/* One lane factor (spec sp) from nrows natural rows x (stride rs) into natural rows y (y == x: in place). */
static void lane_forward(float *x, float *y, int64_t rs, int64_t d, const float *c, const int *sp, int nrows) {
    const int64_t off = sp[2], dp = padded(d);
    wrap_in(x, rs, d, off, nrows);
    switch (sp[1]) {
#define FWD(B)                                                                                                         \
    case B: {                                                                                                          \
        if (nrows == TA) lane_rows_b(x + off, y + off, rs, dp, c, TA, B); /* a constant row count unrolls */         \
        else lane_rows_b(x + off, y + off, rs, dp, c, nrows, B);                                                       \
        break;                                                                                                         \
    }
        LANE_CASES(FWD)
#undef FWD
    default: abort(); /* Python asks for the lane form only for b dividing VL */
    }
    wrap_out(y, rs, d, off, nrows);
}

/* Backward of lane_forward: u (the factor's input rows, wrapped here) and h (the gradient at its output,
 * replaced by the gradient at its input), both natural rows of stride rs; acc: its coefficients' gradient. */
static void lane_backward(float *u, float *h, int64_t rs, int64_t d, const float *ct, float *acc, const int *sp,
                          int nrows) {
    const int64_t off = sp[2], dp = padded(d);
    wrap_in(u, rs, d, off, nrows);
    wrap_in(h, rs, d, off, nrows);
    switch (sp[1]) {
#define BWD(B)                                                                                                         \
    case B: {                                                                                                          \
        if (nrows == TA) lane_back_b(u + off, h + off, rs, dp, ct, acc, TA, B);                                      \
        else lane_back_b(u + off, h + off, rs, dp, ct, acc, nrows, B);                                                 \
        break;                                                                                                         \
    }
        LANE_CASES(BWD)
#undef BWD
    default: abort();
    }
    wrap_out(h, rs, d, off, nrows);
}

/* One factor on nr natural rows in tmp (stride rs), in place. buf: TA padded rows of stride pw (band form). */
static void factor_forward(float *tmp, int64_t rs, float *buf, int64_t pw, const float *c, const int *sp, int64_t d,
                           int nr) {
    if (sp[0] == LANE) {
        lane_forward(tmp, tmp, rs, d, c, sp, nr);
        return;
    }
    pad_rows(buf, pw, tmp, rs, d, sp[1], nr);
    band_rows(buf, pw, tmp, rs, c, d, sp[1], nr);
}

/* y = x @ F_1 @ ... @ F_nf; factor f's coefficients at coef + sum_{g < f} factor_coefs(g). */
void chain_forward(const void *x, int x_bf16, void *y, int y_bf16, const float *coef, const int *spec, int nf,
                   int64_t rows, int64_t d, int threads) {
    const int64_t pw = d + 2 * max_band_width(spec, nf), rs = padded(d) + VL;
#pragma omp parallel num_threads(threads)
    {
        float *bufs[2];
        void *block = carve(2, (const int64_t[]){TA * pw, TA * rs}, bufs, 1);
        float *buf = bufs[0], *tmp = bufs[1];
        memset(tmp, 0, (size_t)TA * rs * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < rows; t0 += TA) {
            const int nr = rows - t0 < TA ? (int)(rows - t0) : TA;
            for (int s = 0; s < nr; s++) load_row(x, x_bf16, t0 + s, d, tmp + s * rs);
            const float *c = coef;
            for (int f = 0; f < nf; f++) {
                factor_forward(tmp, rs, buf, pw, c, spec + 3 * f, d, nr);
                c += factor_coefs(spec, f, d);
            }
            for (int s = 0; s < nr; s++) store_row(y, y_bf16, t0 + s, d, tmp + s * rs);
        }
        free(block);
    }
}

/* Each factor's transposed operator in its own form: band ct[k, j] = c[2w - k, (j + k - w) mod d];
 * lane ct[s, k] = c[(b - s) mod b, m_s(k)]. */
static void transpose_coefs(const float *coef, float *ct, const int *spec, int nf, int64_t d) {
    const int64_t dp = padded(d);
    for (int f = 0; f < nf; f++) {
        const int *sp = spec + 3 * f;
        if (sp[0] == BAND) {
            const int w = sp[1];
            for (int k = 0; k < 2 * w + 1; k++)
                for (int64_t j = 0; j < d; j++)
                    ct[k * d + j] = coef[(int64_t)(2 * w - k) * d + ((j + k - w) % d + d) % d];
        } else {
            const int64_t b = sp[1];
            for (int64_t s = 0; s < b; s++)
                for (int64_t k = 0; k < dp; k++)
                    ct[s * dp + k] = coef[(b - s) % b * dp + ((k & ~(b - 1)) | ((k + s) & (b - 1)))];
        }
        const int64_t n = factor_coefs(spec, f, d);
        coef += n;
        ct += n;
    }
}

/* gcoef = grads, with each lane factor's part taken from the transposed arrangement lane_back_b accumulates
 * (dL/dc[s, k] = grads[(b - s) mod b, m_s(k)]: the same map as transpose_coefs). */
static void lane_grads_untransposed(const float *grads, float *gcoef, const int *spec, int nf, int64_t d) {
    const int64_t dp = padded(d);
    for (int f = 0; f < nf; f++) {
        const int *sp = spec + 3 * f;
        const int64_t n = factor_coefs(spec, f, d);
        if (sp[0] == BAND) {
            memcpy(gcoef, grads, (size_t)n * sizeof(float));
        } else {
            const int64_t b = sp[1];
            for (int64_t s = 0; s < b; s++)
                for (int64_t k = 0; k < dp; k++)
                    gcoef[s * dp + k] = grads[(b - s) % b * dp + ((k & ~(b - 1)) | ((k + s) & (b - 1)))];
        }
        grads += n;
        gcoef += n;
    }
}

/* Backward of chain_forward. g = dL/dy. Writes gx = dL/dx and gcoef = dL/dcoef (same layout as coef).
 * Rows go TA at a time, through each factor's transposed operator (transpose_coefs). The inputs of every
 * factor are recomputed, not saved: a band factor's padded (stride pw), a lane factor's as natural rows
 * (stride rs), written there by the factor before it (no copy). */
void chain_backward(const void *x, int x_bf16, const void *g, int g_bf16, void *gx, int gx_bf16, const float *coef,
                    float *gcoef, const int *spec, int nf, int64_t rows, int64_t d, int threads) {
    const int64_t pw = d + 2 * max_band_width(spec, nf), rs = padded(d) + VL, row = pw > rs ? pw : rs;
    int64_t ncoef = 0;
    for (int f = 0; f < nf; f++) ncoef += factor_coefs(spec, f, d);
    float *shared[2]; /* the coefficients' gradient (lane factors' in the transposed arrangement), coef transposed */
    void *shared_block = carve(2, (const int64_t[]){ncoef, ncoef}, shared, 0);
    float *grads = shared[0], *coef_t = shared[1];
    memset(grads, 0, (size_t)ncoef * sizeof(float));
    transpose_coefs(coef, coef_t, spec, nf, d);
#pragma omp parallel num_threads(threads)
    {
        /* bufs: each factor's input (nf), a band factor's padded gradient, tmp, this thread's coefficient gradient;
         * classes 2.. (coef_t, shared, is in class 1) */
        int64_t sizes[nf + 3];
        float *bufs[nf + 3];
        for (int f = 0; f < nf; f++) sizes[f] = TA * row;
        sizes[nf] = TA * pw;
        sizes[nf + 1] = TA * rs;
        sizes[nf + 2] = ncoef;
        void *block = carve(nf + 3, sizes, bufs, 2);
        float *h = bufs[nf], *tmp = bufs[nf + 1], *acc = bufs[nf + 2];
        for (int f = 0; f < nf; f++) memset(bufs[f], 0, (size_t)TA * row * sizeof(float));
        memset(tmp, 0, (size_t)TA * rs * sizeof(float));
        memset(acc, 0, (size_t)ncoef * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < rows; t0 += TA) {
            const int nr = rows - t0 < TA ? (int)(rows - t0) : TA;
            /* factor f's natural input: its saved rows when it is a lane factor, else tmp */
#define NATURAL_IN(f) (spec[3 * (f)] == LANE ? bufs[f] : tmp)
            float *in = NATURAL_IN(0);
            for (int s = 0; s < nr; s++) load_row(x, x_bf16, t0 + s, d, in + s * rs);
            const float *c = coef;
            for (int f = 0; f < nf; f++) {
                const int *sp = spec + 3 * f;
                float *uf = bufs[f], *next = f + 1 < nf ? NATURAL_IN(f + 1) : NULL;
                if (sp[0] == BAND) {
                    pad_rows(uf, pw, in, rs, d, sp[1], nr);
                    if (next) band_rows(uf, pw, next, rs, c, d, sp[1], nr);
                } else if (next) {
                    lane_forward(in, next, rs, d, c, sp, nr);
                }
                in = next;
                c += factor_coefs(spec, f, d);
            }
#undef NATURAL_IN
            for (int s = 0; s < nr; s++) load_row(g, g_bf16, t0 + s, d, tmp + s * rs);
            int64_t off = ncoef;
            for (int f = nf - 1; f >= 0; f--) {
                const int *sp = spec + 3 * f;
                float *uf = bufs[f];
                off -= factor_coefs(spec, f, d);
                if (sp[0] == BAND) {
                    band_outer(uf, pw, tmp, rs, acc + off, d, sp[1], nr); /* dL/dc[k, i] */
                    pad_rows(h, pw, tmp, rs, d, sp[1], nr);
                    band_rows(h, pw, tmp, rs, coef_t + off, d, sp[1], nr); /* gradient at the factor's input */
                } else {
                    lane_backward(uf, tmp, rs, d, coef_t + off, acc + off, sp, nr);
                }
            }
            for (int s = 0; s < nr; s++) store_row(gx, gx_bf16, t0 + s, d, tmp + s * rs);
        }
#pragma omp critical
        for (int64_t i = 0; i < ncoef; i++) grads[i] += acc[i];
        free(block);
    }
    lane_grads_untransposed(grads, gcoef, spec, nf, d);
    free(shared_block);
}

/* The RoPO layer's output scale in place over rows [rows, n] (ropo_ray/adapters/fused.py): u <- s * u + b (b may
 * be NULL), in float32 and rounded once. On bfloat16 rows torch's u.mul_(s) with a float32 s converts u to
 * float32 and back (two more passes over [rows, n]) and u.add_(b) makes a third pass. */
void scale_forward(void *u, int u_bf16, const float *s, const float *b, int64_t rows, int64_t n, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *r = (float *)malloc((size_t)n * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows; t++) {
            load_row(u, u_bf16, t, n, r);
            int64_t i = 0;
            if (b) {
                for (; i + VL <= n; i += VL) stu(r + i, ldu(r + i) * ldu(s + i) + ldu(b + i));
                for (; i < n; i++) r[i] = r[i] * s[i] + b[i];
            } else {
                for (; i + VL <= n; i += VL) stu(r + i, ldu(r + i) * ldu(s + i));
                for (; i < n; i++) r[i] *= s[i];
            }
            store_row(u, u_bf16, t, n, r);
        }
        free(r);
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

/* A factor's kernel coefficients for L layers, straight from its skew parameters (ropo_ray/adapters/coefficients.py;
 * the composed ops: cayley.py's exact Cayley, then rotation.py's band_coefficients).
 *
 * params [L, nb, p], p = b(b - 1)/2: block j of layer l has the skew S with S[r, c] = params[l, j, q] and
 * S[c, r] = -params[l, j, q] for the q-th pair r < c in row-major order (cayley.skew_from_params). Each block's
 * M = (I + S)^-1 by Gauss-Jordan elimination without pivoting (every pivot of I + S is >= 1: cayley.py), and
 * Q = 2 M - I = (I + S)^-1 (I - S). Coefficient t of layer l is mask[t] * Q_l.flat[index[t]] (Q_l [nb, b, b]),
 * written to out[l * ostride + t]; M is kept in msave [L, nb, b, b] for the backward. Threads over layers.
 * The block loops take b as a compile-time constant for the usual sizes (COEF_CASES), so they unroll. */
static inline __attribute__((always_inline)) void cayley_blocks_b(const float *params, int64_t nb, float *m,
                                                                   float *qs, float *work, const int b) {
    const int64_t p = (int64_t)b * (b - 1) / 2, bb = (int64_t)b * b;
    for (int64_t j = 0; j < nb; j++) {
        const float *q = params + j * p;
        for (int r = 0; r < b; r++)
            for (int c = 0; c < 2 * b; c++) work[r * 2 * b + c] = (c == r || c == r + b) ? 1.f : 0.f;
        int64_t at = 0;
        for (int r = 0; r < b; r++)
            for (int c = r + 1; c < b; c++, at++) {
                work[r * 2 * b + c] = q[at];
                work[c * 2 * b + r] = -q[at];
            }
        for (int k = 0; k < b; k++) { /* [I + S | I] -> [I | M] */
            float *pivot = work + k * 2 * b;
            const float inv = 1.f / pivot[k];
            for (int c = 0; c < 2 * b; c++) pivot[c] *= inv;
            for (int r = 0; r < b; r++) {
                if (r == k) continue;
                float *row = work + r * 2 * b;
                const float f = row[k];
                for (int c = 0; c < 2 * b; c++) row[c] -= f * pivot[c];
            }
        }
        for (int r = 0; r < b; r++)
            for (int c = 0; c < b; c++) {
                const float v = work[r * 2 * b + b + c];
                m[j * bb + r * b + c] = v;
                qs[j * bb + r * b + c] = 2.f * v - (r == c ? 1.f : 0.f);
            }
    }
}

/* dL/dparams of nb blocks from G = dL/dQ [nb, b, b] and M: dL/dS = -2 M^T G M^T, dL/dparams[q] = dS[r, c] - dS[c, r]. */
static inline __attribute__((always_inline)) void cayley_grads_b(const float *g, const float *m, int64_t nb,
                                                                  float *gparams, float *t1, const int b) {
    const int64_t p = (int64_t)b * (b - 1) / 2, bb = (int64_t)b * b;
    float *t2 = t1 + bb;
    for (int64_t j = 0; j < nb; j++) {
        const float *mj = m + j * bb, *gj = g + j * bb;
        for (int r = 0; r < b; r++) /* t1 = M^T G */
            for (int c = 0; c < b; c++) {
                float a = 0.f;
                for (int k = 0; k < b; k++) a += mj[k * b + r] * gj[k * b + c];
                t1[r * b + c] = a;
            }
        for (int r = 0; r < b; r++) /* t2 = -2 t1 M^T */
            for (int c = 0; c < b; c++) {
                float a = 0.f;
                for (int k = 0; k < b; k++) a += t1[r * b + k] * mj[c * b + k];
                t2[r * b + c] = -2.f * a;
            }
        float *gp = gparams + j * p;
        int64_t at = 0;
        for (int r = 0; r < b; r++)
            for (int c = r + 1; c < b; c++, at++) gp[at] = t2[r * b + c] - t2[c * b + r];
    }
}

#define COEF_CASES(CALL) CALL(2) CALL(4) CALL(8) CALL(16)

void cayley_coefficients(const float *params, int64_t layers, int64_t nb, int b, const int64_t *index,
                         const float *mask, int64_t nc, float *out, int64_t ostride, float *msave, int threads) {
    const int64_t p = (int64_t)b * (b - 1) / 2, bb = (int64_t)b * b;
#pragma omp parallel num_threads(threads)
    {
        float *work = (float *)malloc((size_t)(2 * bb + nb * bb) * sizeof(float)), *qs = work + 2 * bb; /* Q_l */
#pragma omp for schedule(static)
        for (int64_t l = 0; l < layers; l++) {
            float *m = msave + l * nb * bb;
            const float *q = params + l * nb * p;
            switch (b) {
#define BLOCKS(B)                                                                                                      \
    case B: cayley_blocks_b(q, nb, m, qs, work, B); break;
                COEF_CASES(BLOCKS)
#undef BLOCKS
            default: cayley_blocks_b(q, nb, m, qs, work, b);
            }
            float *o = out + l * ostride;
            for (int64_t t = 0; t < nc; t++) o[t] = mask[t] * qs[index[t]];
        }
        free(work);
    }
}

/* Backward of cayley_coefficients: gout (row l at gout + l * gstride, the layout's nc coefficients) -> gparams
 * [L, nb, p]. The coefficients' gradient gathers back into G = dL/dQ [nb, b, b] (index/mask transposed: a
 * scatter-add), then each block's parameters' gradient (cayley_grads_b; dQ = -2 M dS M). */
void cayley_coefficients_backward(const float *gout, int64_t gstride, const int64_t *index, const float *mask,
                                  int64_t nc, const float *msave, int64_t layers, int64_t nb, int b, float *gparams,
                                  int threads) {
    const int64_t p = (int64_t)b * (b - 1) / 2, bb = (int64_t)b * b;
#pragma omp parallel num_threads(threads)
    {
        float *g = (float *)malloc((size_t)(nb * bb) * sizeof(float));
        float *t = (float *)malloc((size_t)(2 * bb) * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t l = 0; l < layers; l++) {
            const float *go = gout + l * gstride, *m = msave + l * nb * bb;
            float *gp = gparams + l * nb * p;
            memset(g, 0, (size_t)(nb * bb) * sizeof(float));
            for (int64_t i = 0; i < nc; i++) g[index[i]] += mask[i] * go[i];
            switch (b) {
#define GRADS(B)                                                                                                       \
    case B: cayley_grads_b(g, m, nb, gp, t, B); break;
                COEF_CASES(GRADS)
#undef GRADS
            default: cayley_grads_b(g, m, nb, gp, t, b);
            }
        }
        free(g);
        free(t);
    }
}

/* How many of v[0 .. n) are zero (the fused layer asks of its scale before the forward: one call, no tensor ops). */
int64_t count_zeros(const float *v, int64_t n) {
    int64_t zeros = 0;
    for (int64_t i = 0; i < n; i++) zeros += v[i] == 0.f;
    return zeros;
}

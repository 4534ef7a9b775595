/* Fused float32 CPU kernels for training: RMSNorm, (weighted) SwiGLU and MLA's per-head q, k, v
 * assembly, forward and backward.
 *
 * Why: on the CPU these are memory-bound chains of 4-20 torch ops each (square, mean, rsqrt, products;
 * sigmoid, products; rotations, concatenations, padding; their gradients), every op a full pass over
 * the activations. Here each is one pass over its inputs. Loaded through ctypes by
 * dsv3/kernels/cpu_fused.py, which compiles this file once per machine; ctypes releases the GIL for the
 * call, so concurrent training passes overlap in these too.
 *
 * Every kernel is single-threaded and deterministic: a reduction always adds in the same order (16
 * partial sums per row, then the lanes in order). Rows are `stride` floats apart; within a row the
 * elements are contiguous. Plain C, no torch headers: the build takes about a second.
 */
#include <math.h>
#include <stddef.h>

#ifdef DSV3_VECTOR_EXPF
/* glibc's libmvec has vector versions of expf; declaring them lets the compiler vectorize the loops that
 * call it (glibc's own header declares them only under -ffast-math, which would also change the
 * process's denormal handling when the library loads). */
float expf(float) __attribute__((__simd__("notinbranch")));
#endif

#define LANES 16

/* sum of a[i] * b[i] over n, in LANES partial sums added in a fixed order */
static float dot(const float *restrict a, const float *restrict b, long n) {
    float acc[LANES] = {0};
    long i = 0;
    for (; i + LANES <= n; i += LANES) {
#pragma omp simd
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    }
    float total = 0.0f;
    for (int l = 0; l < LANES; l++) total += acc[l];
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps) per row; r saved for the backward */
void dsv3_rms_norm_forward(const float *x, long rows, long dim, long x_stride, const float *w, float eps,
                           float *y, float *r_out) {
    for (long row = 0; row < rows; row++) {
        const float *restrict xr = x + row * x_stride;
        float *restrict yr = y + row * dim;
        float r = 1.0f / sqrtf(dot(xr, xr, dim) / (float)dim + eps);
        r_out[row] = r;
#pragma omp simd
        for (long i = 0; i < dim; i++) yr[i] = w[i] * (xr[i] * r);
    }
}

/* dx = r * (g w) - x * r^3 * sum(g w x) / D  (when dx != NULL);
 * dw = sum over rows of g * x * r, written into dw[dim] (when dw != NULL) */
void dsv3_rms_norm_backward(const float *g, long g_stride, const float *x, long x_stride, long rows,
                            long dim, const float *w, const float *r, float *dx, float *dw) {
    if (dw != NULL) {
        for (long i = 0; i < dim; i++) dw[i] = 0.0f;
    }
    for (long row = 0; row < rows; row++) {
        const float *restrict gr = g + row * g_stride;
        const float *restrict xr = x + row * x_stride;
        const float rr = r[row];
        if (dx != NULL) {
            float acc[LANES] = {0};
            long i = 0;
            for (; i + LANES <= dim; i += LANES) {
#pragma omp simd
                for (int l = 0; l < LANES; l++) acc[l] += gr[i + l] * w[i + l] * xr[i + l];
            }
            float total = 0.0f;
            for (int l = 0; l < LANES; l++) total += acc[l];
            for (; i < dim; i++) total += gr[i] * w[i] * xr[i];
            const float coefficient = -total * rr * rr * rr / (float)dim;
            float *restrict dxr = dx + row * dim;
#pragma omp simd
            for (long j = 0; j < dim; j++) dxr[j] = rr * (gr[j] * w[j]) + xr[j] * coefficient;
        }
        if (dw != NULL) {
            float *restrict dwr = dw;
#pragma omp simd
            for (long j = 0; j < dim; j++) dwr[j] += gr[j] * xr[j] * rr;
        }
    }
}

static inline float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

/* h = w_row * silu(gate) * up (w_row = 1 when rw == NULL); h is [rows, width], contiguous */
void dsv3_swiglu_forward(const float *gate, const float *up, long in_stride, long rows, long width,
                         const float *rw, float *h) {
    for (long row = 0; row < rows; row++) {
        const float *restrict gr = gate + row * in_stride;
        const float *restrict ur = up + row * in_stride;
        float *restrict hr = h + row * width;
        const float scale = rw != NULL ? rw[row] : 1.0f;
#pragma omp simd
        for (long i = 0; i < width; i++) {
            const float v = gr[i];
            hr[i] = v * sigmoid(v) * ur[i] * scale;
        }
    }
}

/* Gradients of h = w_row * silu(gate) * up given dh [rows, width] (contiguous):
 * d gate, d up into rows `out_stride` apart; d w_row = sum(dh * silu(gate) * up) when drw != NULL. */
void dsv3_swiglu_backward(const float *dh, const float *gate, const float *up, long in_stride, long rows,
                          long width, const float *rw, float *dgate, float *dup, long out_stride,
                          float *drw) {
    for (long row = 0; row < rows; row++) {
        const float *restrict dhr = dh + row * width;
        const float *restrict gr = gate + row * in_stride;
        const float *restrict ur = up + row * in_stride;
        float *restrict dgr = dgate + row * out_stride;
        float *restrict dur = dup + row * out_stride;
        const float scale = rw != NULL ? rw[row] : 1.0f;
        float acc[LANES] = {0};
        long i = 0;
        for (; i + LANES <= width; i += LANES) {
#pragma omp simd
            for (int l = 0; l < LANES; l++) {
                const float v = gr[i + l], u = ur[i + l], d = dhr[i + l];
                const float s = sigmoid(v);
                const float silu = v * s;
                const float da = d * scale;
                dgr[i + l] = da * u * s * (1.0f + v * (1.0f - s));
                dur[i + l] = da * silu;
                acc[l] += d * silu * u;
            }
        }
        float total = 0.0f;
        for (int l = 0; l < LANES; l++) total += acc[l];
        for (; i < width; i++) {
            const float v = gr[i], u = ur[i], d = dhr[i];
            const float s = sigmoid(v);
            const float silu = v * s;
            const float da = d * scale;
            dgr[i] = da * u * s * (1.0f + v * (1.0f - s));
            dur[i] = da * silu;
            total += d * silu * u;
        }
        if (drw != NULL) drw[row] = total;
    }
}

/* MLA's per-head attention inputs, [B, H, T, Q] each (Q = U + R), from the projections' outputs:
 *   q_out[b,h,t] = [q_nope | rot(q_rope)]           from q   [B, T, H*Q]      (rows q_stride apart)
 *   k_out[b,h,t] = [k_nope | rot(rope_key)]         from kv  [B, T, H*(U+A)] (rows kv_stride apart)
 *                                                    and rope_key [B, T, R]  (rows rk_stride apart)
 *   v_out[b,h,t] = [v | 0 ... 0]                     v from kv, zero-padded to Q (one head width)
 * rot turns each interleaved pair (x0, x1) by the position's angle: (x0 c - x1 s, x0 s + x1 c), with
 * cos/sin [T, R/2]. */
void dsv3_mla_heads_forward(const float *q, long q_stride, const float *kv, long kv_stride,
                            const float *rope_key, long rk_stride, const float *cos_t, const float *sin_t,
                            long batch, long tokens, long heads, long nope, long rope, long vdim,
                            float *q_out, float *k_out, float *v_out) {
    const long width = nope + rope, half = rope / 2, kv_head = nope + vdim;
    for (long b = 0; b < batch; b++) {
        for (long t = 0; t < tokens; t++) {
            const long row = b * tokens + t;
            const float *restrict qr = q + row * q_stride;
            const float *restrict kvr = kv + row * kv_stride;
            const float *restrict rk = rope_key + row * rk_stride;
            const float *restrict c = cos_t + t * half;
            const float *restrict s = sin_t + t * half;
            for (long h = 0; h < heads; h++) {
                const long out = ((b * heads + h) * tokens + t) * width;
                float *restrict qo = q_out + out;
                float *restrict ko = k_out + out;
                float *restrict vo = v_out + out;
                const float *restrict qh = qr + h * width;
                const float *restrict kh = kvr + h * kv_head;
                for (long i = 0; i < nope; i++) qo[i] = qh[i];
                for (long i = 0; i < nope; i++) ko[i] = kh[i];
                for (long i = 0; i < half; i++) {
                    const float x0 = qh[nope + 2 * i], x1 = qh[nope + 2 * i + 1];
                    qo[nope + 2 * i] = x0 * c[i] - x1 * s[i];
                    qo[nope + 2 * i + 1] = x0 * s[i] + x1 * c[i];
                    const float y0 = rk[2 * i], y1 = rk[2 * i + 1];
                    ko[nope + 2 * i] = y0 * c[i] - y1 * s[i];
                    ko[nope + 2 * i + 1] = y0 * s[i] + y1 * c[i];
                }
                for (long i = 0; i < vdim; i++) vo[i] = kh[nope + i];
                for (long i = vdim; i < width; i++) vo[i] = 0.0f;
            }
        }
    }
}

/* The backward of dsv3_mla_heads_forward: from d q_out, d k_out, d v_out [B, H, T, Q] (contiguous) to
 * d q [B, T, H*Q], d kv [B, T, H*(U+A)] and d rope_key [B, T, R] (contiguous; the rope key's gradient
 * sums its heads in head order). The inverse rotation turns by minus the angle. */
void dsv3_mla_heads_backward(const float *dq_out, const float *dk_out, const float *dv_out,
                             const float *cos_t, const float *sin_t, long batch, long tokens, long heads,
                             long nope, long rope, long vdim, float *dq, float *dkv, float *drope_key) {
    const long width = nope + rope, half = rope / 2, kv_head = nope + vdim;
    for (long b = 0; b < batch; b++) {
        for (long t = 0; t < tokens; t++) {
            const long row = b * tokens + t;
            float *restrict dqr = dq + row * heads * width;
            float *restrict dkvr = dkv + row * heads * kv_head;
            float *restrict drk = drope_key + row * rope;
            const float *restrict c = cos_t + t * half;
            const float *restrict s = sin_t + t * half;
            for (long i = 0; i < rope; i++) drk[i] = 0.0f;
            for (long h = 0; h < heads; h++) {
                const long in = ((b * heads + h) * tokens + t) * width;
                const float *restrict gq = dq_out + in;
                const float *restrict gk = dk_out + in;
                const float *restrict gv = dv_out + in;
                float *restrict dqh = dqr + h * width;
                float *restrict dkh = dkvr + h * kv_head;
                for (long i = 0; i < nope; i++) dqh[i] = gq[i];
                for (long i = 0; i < nope; i++) dkh[i] = gk[i];
                for (long i = 0; i < vdim; i++) dkh[nope + i] = gv[i];
                for (long i = 0; i < half; i++) {
                    const float g0 = gq[nope + 2 * i], g1 = gq[nope + 2 * i + 1];
                    dqh[nope + 2 * i] = g0 * c[i] + g1 * s[i];
                    dqh[nope + 2 * i + 1] = g1 * c[i] - g0 * s[i];
                    const float k0 = gk[nope + 2 * i], k1 = gk[nope + 2 * i + 1];
                    drk[2 * i] += k0 * c[i] + k1 * s[i];
                    drk[2 * i + 1] += k1 * c[i] - k0 * s[i];
                }
            }
        }
    }
}

/* The MoE's permutation: out[i] = src[index[i] / divisor] (rows of `dim` floats; src rows `src_stride`
 * apart, out contiguous). With index = order and divisor = K it sends each (token, choice) row to its
 * place in expert order. */
void dsv3_gather_rows(const float *src, long src_stride, const long *index, long divisor, long rows,
                      long dim, float *out) {
    for (long i = 0; i < rows; i++) {
        const float *restrict s = src + (index[i] / divisor) * src_stride;
        float *restrict o = out + i * dim;
        for (long j = 0; j < dim; j++) o[j] = s[j];
    }
}

/* The un-permutation: out[t] = sum over k < K of src[inverse[t K + k]], added in choice order k (one
 * pass, every output row written once: no zero fill, no scatter). */
void dsv3_sum_rows(const float *src, const long *inverse, long tokens, long top_k, long dim, float *out) {
    for (long t = 0; t < tokens; t++) {
        float *restrict o = out + t * dim;
        const float *restrict first = src + inverse[t * top_k] * dim;
        for (long j = 0; j < dim; j++) o[j] = first[j];
        for (long k = 1; k < top_k; k++) {
            const float *restrict s = src + inverse[t * top_k + k] * dim;
            for (long j = 0; j < dim; j++) o[j] += s[j];
        }
    }
}

/* The CPU kernels of the fast path (reproduction/kernels.py builds this file with the system's
 * C compiler on first use and calls it through ctypes): §3.3's LRN, one pass each way
 * (reproduction/lrn.py), and §5's update in one pass (reproduction/optim.py).
 *
 *   b_i = a_i / d_i^β,   d_i = k + c·Σ_{j=i-lo}^{i+hi} a_j²,   lo = size/2, hi = (size-1)/2,
 *
 * the window clipped at the edges of the channel group that holds i (a tower, §3.2), c = α/size
 * as torch's F.local_response_norm. Backward, with the same windows:
 *
 *   ∂a_i = g_i·d_i^-β − 2βc·a_i·Σ_{j: i in window(j)} g_j·a_j·d_j^(-β-1).
 *
 * Why a kernel: torch builds the window sum as avg_pool3d over a padded copy of a², several
 * full-size temporaries each way, and has no bf16 kernel for it on the CPU. Here a pixel's C
 * channels are one row; a row is gathered once into fp32 buffers (fp32 accumulation for bf16
 * inputs), and the forward writes only b: the backward recomputes d from the row in cache
 * instead of reading a saved d (one tensor less of memory traffic and of memory each way).
 * Rows are split between threads (pthreads, not OpenMP: a second OpenMP runtime beside
 * torch's would leave threads spinning against torch's).
 *
 * Any strides: element (n, ch, p) sits at n·sn + ch·sc + p·sp, which covers NCHW, channels_last
 * and channel slices of either. channels_last (sc = 1) is the fast layout: contiguous rows.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1 };

typedef struct {
    const void *x, *g; void *out;
    int dtype; int64_t n, c, p;
    int64_t xs[3], gs[3], os[3];  /* strides (n, channel, pixel) in elements */
    int size, groups; float c_alpha, beta, k;
    int64_t row0, row1;           /* this thread's rows [row0, row1) of the n·p rows */
    int backward;
} Job;

static inline float load(const void *base, int dtype, int64_t i) {
    if (dtype == F32) return ((const float *)base)[i];
    uint32_t u = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f; memcpy(&f, &u, 4); return f;
}

static inline void store(void *base, int dtype, int64_t i, float f) {
    if (dtype == F32) { ((float *)base)[i] = f; return; }
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { ((uint16_t *)base)[i] = (uint16_t)((u >> 16) | 0x40); return; } /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);  /* round to nearest even, as torch's float -> bfloat16 */
    ((uint16_t *)base)[i] = (uint16_t)(u >> 16);
}

static void gather(float *dst, const void *base, int dtype, int64_t at, int64_t stride, int64_t c) {
    if (stride == 1 && dtype == F32) { memcpy(dst, (const float *)base + at, c * sizeof(float)); return; }
    if (stride == 1) {  /* bf16, contiguous: widen (vectorises) */
        const uint16_t *s = (const uint16_t *)base + at;
        uint32_t *d = (uint32_t *)dst;
        for (int64_t i = 0; i < c; i++) d[i] = (uint32_t)s[i] << 16;
        return;
    }
    for (int64_t i = 0; i < c; i++) dst[i] = load(base, dtype, at + i * stride);
}

static void scatter(void *base, int dtype, int64_t at, int64_t stride, const float *src, int64_t c) {
    if (stride == 1 && dtype == F32) { memcpy((float *)base + at, src, c * sizeof(float)); return; }
    for (int64_t i = 0; i < c; i++) store(base, dtype, at + i * stride, src[i]);
}

/* d^-β; β = 0.75 (the paper's and Caffe's) as two square roots, which vectorise. */
static inline float pow_neg(float d, float beta) {
    if (beta == 0.75f) { float r = 1.0f / sqrtf(d); return r * sqrtf(r); }
    return powf(d, -beta);
}

/* win[i] = Σ over i's window of v[j], within one group of m channels. v is padded: v[-lo..-1]
 * and v[m..m+hi-1] are zeros, so the inner loop has no edge tests. */
static void window_sum(float *win, const float *v, int64_t m, int lo, int hi) {
    for (int64_t i = 0; i < m; i++) win[i] = 0.0f;
    for (int o = -lo; o <= hi; o++) {
        const float *s = v + o;
        for (int64_t i = 0; i < m; i++) win[i] += s[i];
    }
}

static void *run(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t c = j->c, m = c / j->groups;
    const int lo = j->size / 2, hi = (j->size - 1) / 2, pad = lo > hi ? lo : hi;
    /* per row: a, g (backward), the padded squares or products, the window sums, d^-β */
    float *buf = (float *)malloc(sizeof(float) * (size_t)(6 * c + 2 * pad + 8));
    if (!buf) return (void *)1;
    float *a = buf, *g = a + c, *sq = g + c + pad, *win = sq + m + pad, *r = win + c, *res = r + c;
    for (int64_t row = j->row0; row < j->row1; row++) {
        const int64_t n = row / j->p, p = row % j->p;
        gather(a, j->x, j->dtype, n * j->xs[0] + p * j->xs[2], j->xs[1], c);
        if (j->backward) gather(g, j->g, j->dtype, n * j->gs[0] + p * j->gs[2], j->gs[1], c);
        for (int64_t base = 0; base < c; base += m) {  /* one group (tower) at a time */
            const float *ag = a + base;
            for (int i = 1; i <= pad; i++) sq[-i] = sq[m - 1 + i] = 0.0f;
            for (int64_t i = 0; i < m; i++) sq[i] = ag[i] * ag[i];
            window_sum(win, sq, m, lo, hi);
            for (int64_t i = 0; i < m; i++) r[base + i] = pow_neg(j->k + j->c_alpha * win[i], j->beta);
            if (!j->backward) {
                for (int64_t i = 0; i < m; i++) res[base + i] = ag[i] * r[base + i];
                continue;
            }
            /* t_j = g_j·a_j·d_j^(-β-1) = g_j·a_j·d_j^-β / d_j, summed over the windows that hold i:
             * j from i-hi to i+lo (the window mirrored). */
            const float *gg = g + base;
            for (int64_t i = 0; i < m; i++) {
                float d = j->k + j->c_alpha * win[i];
                sq[i] = gg[i] * ag[i] * r[base + i] / d;
            }
            window_sum(win, sq, m, hi, lo);
            const float two_beta_c = 2.0f * j->beta * j->c_alpha;
            for (int64_t i = 0; i < m; i++) res[base + i] = gg[i] * r[base + i] - two_beta_c * ag[i] * win[i];
        }
        scatter(j->out, j->dtype, n * j->os[0] + p * j->os[2], j->os[1], res, c);
    }
    free(buf);
    return (void *)0;
}

/* Forward (g = NULL, backward = 0) or backward. Returns 0, or 1 if memory ran out. */
int lrn(const void *x, const void *g, void *out, int dtype, int64_t n, int64_t c, int64_t p,
        const int64_t *xs, const int64_t *gs, const int64_t *os, int size, int groups,
        float c_alpha, float beta, float k, int backward, int threads) {
    const int64_t rows = n * p;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if ((int64_t)threads > rows / 64) threads = rows / 64 > 0 ? (int)(rows / 64) : 1;  /* tiny tensors: one thread */
    Job jobs[64];
    pthread_t ids[64];
    int started[64] = {0}, failed = 0;
    for (int t = 0; t < threads; t++) {
        Job *j = &jobs[t];
        j->x = x; j->g = g; j->out = out; j->dtype = dtype; j->n = n; j->c = c; j->p = p;
        for (int i = 0; i < 3; i++) { j->xs[i] = xs[i]; j->gs[i] = gs ? gs[i] : 0; j->os[i] = os[i]; }
        j->size = size; j->groups = groups; j->c_alpha = c_alpha; j->beta = beta; j->k = k;
        j->row0 = rows * t / threads; j->row1 = rows * (t + 1) / threads; j->backward = backward;
    }
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], NULL, run, &jobs[t]) == 0;
    for (int t = 1; t < threads; t++)
        if (!started[t]) failed |= run(&jobs[t]) != NULL;  /* no thread: do its rows here */
    failed |= run(&jobs[0]) != NULL;
    for (int t = 1; t < threads; t++) {
        void *status = NULL;
        if (started[t]) { pthread_join(ids[t], &status); failed |= status != NULL; }
    }
    return failed;
}

/* §5's update, v ← μ·v − wd·ε·w − ε·g ; w ← w + v, for one fp32 parameter in one pass (read
 * v, w, g; write v, w) instead of the four passes of the foreach form (optim.PaperSGD, the
 * reference). a = −wd·ε, b = −ε. Each element's arithmetic is in the reference's order
 * (μ·v first, then the decay, then the gradient), each product and sum rounded to fp32. */
typedef struct { float *w, *v; const float *g; int64_t n0, n1; float mu, a, b; } SgdJob;

static void *sgd_run(void *arg) {
    const SgdJob *j = (const SgdJob *)arg;
    float *w = j->w, *v = j->v;
    const float *g = j->g;
    const float mu = j->mu, a = j->a, b = j->b;
    for (int64_t i = j->n0; i < j->n1; i++) {
        float vi = v[i] * mu;
        vi = vi + a * w[i];
        vi = vi + b * g[i];
        v[i] = vi;
        w[i] = w[i] + vi;
    }
    return NULL;
}

void paper_sgd(float *w, float *v, const float *g, int64_t n, float mu, float a, float b, int threads) {
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if ((int64_t)threads > n / 65536) threads = n / 65536 > 0 ? (int)(n / 65536) : 1;
    SgdJob jobs[64];
    pthread_t ids[64];
    int started[64] = {0};
    for (int t = 0; t < threads; t++) {
        SgdJob s = {w, v, g, n * t / threads, n * (t + 1) / threads, mu, a, b};
        jobs[t] = s;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, sgd_run, &jobs[t]) == 0;
    for (int t = 1; t < threads; t++) if (!started[t]) sgd_run(&jobs[t]);
    sgd_run(&jobs[0]);
    for (int t = 1; t < threads; t++) if (started[t]) pthread_join(ids[t], NULL);
}

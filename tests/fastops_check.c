/*
 * fastops_check.c -- fastops.c's kernels against double-precision references,
 * in C alone: no Python, so it runs where only a C compiler does. CI builds it
 * for aarch64 and runs it under qemu-user (tests/test_fastops_arm.py), which
 * checks the portable kernels (the path Apple M-series and other ARM CPUs
 * take); on x86 it checks every ISA this CPU has (fo_set_isa), and
 * FO_PORTABLE_ONLY builds it with the portable kernels alone.
 *
 *   cc -O2 -std=gnu99 -ffp-contract=fast -fopenmp tests/fastops_check.c -lm -o check && ./check
 *
 * Exit status 0 when every check passes; otherwise each failure is printed.
 * Shapes cover 1, odd sizes, non-multiples of every SIMD width, both sides
 * of the small-M path (M <= 16) and the blocked GEMM, transposed operands,
 * accumulation and bias. fo_decode_token runs small random GPT-2s token by
 * token against a double-precision model with its own KV cache.
 */
#include "../fastops.c"

#include <stdio.h>

static int n_checks, n_failed;
static unsigned long long rng_state = 88172645463325252ULL;

static double urand(void) { /* xorshift64: uniform in [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 4503599627370496.0 - 1.0;
}

static float *frand(size_t n, double scale) {
    float *a = (float *)malloc(n * sizeof(float) + 64);
    for (size_t i = 0; i < n; i++) a[i] = (float)(urand() * scale);
    return a;
}

/* got vs ref: |got - ref| <= atol + rtol |ref| everywhere */
static void check(const char *what, const float *got, const double *ref, size_t n, double rtol,
                  double atol) {
    size_t bad = 0, worst = 0;
    double worst_err = -1.0;
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - ref[i]), lim = atol + rtol * fabs(ref[i]);
        if (!(err <= lim)) { /* NaN fails too */
            bad++;
            if (!(err <= worst_err)) { worst_err = err; worst = i; }
        }
    }
    n_checks++;
    if (bad) {
        n_failed++;
        printf("FAIL %s: %zu of %zu wrong, e.g. [%zu] = %.7g, expected %.7g\n", what, bad, n, worst,
               (double)got[worst], ref[worst]);
    }
}

static double ktol(int K) { return 4e-5 * (1.0 + sqrt((double)K)); }

/* ---- GEMM ---------------------------------------------------------------- */
static void check_gemm(int M, int N, int K, int ta, int tb, int accumulate, int use_bias) {
    /* A is M x K (stored K x M when ta), B is K x N (stored N x K when tb) */
    float *A = frand((size_t)M * K, 1.0), *B = frand((size_t)K * N, 1.0);
    float *C = frand((size_t)M * N, 1.0), *bias = frand(N, 1.0);
    double *ref = (double *)malloc(sizeof(double) * M * N);
    ptrdiff_t rsa = ta ? 1 : K, csa = ta ? M : 1, rsb = tb ? 1 : N, csb = tb ? K : 1;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = accumulate ? C[(size_t)i * N + j] : 0.0;
            for (int p = 0; p < K; p++) s += (double)A[i * rsa + p * csa] * B[p * rsb + j * csb];
            ref[(size_t)i * N + j] = s + (use_bias ? bias[j] : 0.0);
        }
    fo_sgemm(M, N, K, A, rsa, csa, B, rsb, csb, C, N, accumulate, use_bias ? bias : NULL);
    char what[160];
    snprintf(what, sizeof what, "sgemm[%s] M=%d N=%d K=%d%s%s%s%s", fo_isa(), M, N, K,
             ta ? " A^T" : "", tb ? " B^T" : "", accumulate ? " accumulate" : "",
             use_bias ? " bias" : "");
    check(what, C, ref, (size_t)M * N, 1e-4, ktol(K));
    free(A); free(B); free(C); free(bias); free(ref);
}

/* ---- the linear layer's backward: dx, dw and db (summed as dy is packed) -- */
static void check_linear_backward(int M, int K, int N) {
    float *x = frand((size_t)M * K, 1.0), *w = frand((size_t)K * N, 1.0), *dy = frand((size_t)M * N, 1.0);
    float *dx = frand((size_t)M * K, 1.0), *dw = frand((size_t)K * N, 1.0), *db = frand(N, 1.0);
    double *rx = (double *)calloc((size_t)M * K, sizeof(double));
    double *rw = (double *)calloc((size_t)K * N, sizeof(double)), *rb = (double *)calloc(N, sizeof(double));
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double g = dy[(size_t)i * N + j];
            rb[j] += g;
            for (int p = 0; p < K; p++) {
                rx[(size_t)i * K + p] += g * w[(size_t)p * N + j];
                rw[(size_t)p * N + j] += g * x[(size_t)i * K + p];
            }
        }
    fo_linear_backward(dy, x, w, dx, dw, db, M, K, N);
    char what[96];
    snprintf(what, sizeof what, "linear_backward[%s] M=%d K=%d N=%d: dx", fo_isa(), M, K, N);
    check(what, dx, rx, (size_t)M * K, 1e-4, ktol(N));
    snprintf(what, sizeof what, "linear_backward[%s] M=%d K=%d N=%d: dw", fo_isa(), M, K, N);
    check(what, dw, rw, (size_t)K * N, 1e-4, ktol(M));
    snprintf(what, sizeof what, "linear_backward[%s] M=%d K=%d N=%d: db", fo_isa(), M, K, N);
    check(what, db, rb, N, 1e-4, ktol(M));
    free(x); free(w); free(dy); free(dx); free(dw); free(db); free(rx); free(rw); free(rb);
}

/* ---- the token embedding's backward: add.at's sums, in its order ---------- */
static void check_embedding(int V, int C, int N) {
    float *dwte = frand((size_t)V * C, 1.0), *dx = frand((size_t)N * C, 1.0);
    int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * (N + 1));
    double *ref = (double *)malloc(sizeof(double) * V * C);
    float *seq = (float *)malloc(sizeof(float) * V * C + 64);
    for (int n = 0; n < N; n++) idx[n] = (int64_t)((urand() + 1.0) * 0.5 * V) % V;
    memcpy(seq, dwte, sizeof(float) * V * C);
    for (int n = 0; n < N; n++) /* float sums position after position: exact to the bit */
        for (int c = 0; c < C; c++) seq[(size_t)idx[n] * C + c] += dx[(size_t)n * C + c];
    for (size_t i = 0; i < (size_t)V * C; i++) ref[i] = seq[i];
    fo_embedding_backward(dwte, idx, dx, N, C);
    char what[96];
    snprintf(what, sizeof what, "embedding_backward[%s] V=%d C=%d N=%d", fo_isa(), V, C, N);
    check(what, dwte, ref, (size_t)V * C, 0.0, 0.0);
    free(dwte); free(dx); free(idx); free(ref); free(seq);
}

/* ---- attention ------------------------------------------------------------ */
static void check_attention(int BH, int T, int D) {
    size_t n = (size_t)BH * T * D;
    float *q = frand(n, 1.0), *k = frand(n, 1.0), *v = frand(n, 1.0), *dy = frand(n, 1.0);
    float *y = frand(n, 1.0), *lse = frand((size_t)BH * T, 1.0);
    float *dq = frand(n, 1.0), *dk = frand(n, 1.0), *dv = frand(n, 1.0);
    double *ry = (double *)calloc(n, sizeof(double)), *rdq = (double *)calloc(n, sizeof(double));
    double *rdk = (double *)calloc(n, sizeof(double)), *rdv = (double *)calloc(n, sizeof(double));
    double *p = (double *)malloc(sizeof(double) * T * T), *dp = (double *)malloc(sizeof(double) * T * T);
    double scale = 1.0 / sqrt((double)D);
    for (int h = 0; h < BH; h++) {
        size_t o = (size_t)h * T * D;
        for (int i = 0; i < T; i++) {
            double mx = -INFINITY, sum = 0.0;
            for (int j = 0; j <= i; j++) {
                double s = 0.0;
                for (int d = 0; d < D; d++) s += (double)q[o + i * D + d] * k[o + j * D + d];
                p[i * T + j] = s * scale;
                if (p[i * T + j] > mx) mx = p[i * T + j];
            }
            for (int j = 0; j <= i; j++) sum += (p[i * T + j] = exp(p[i * T + j] - mx));
            for (int j = 0; j <= i; j++) p[i * T + j] /= sum;
            for (int d = 0; d < D; d++) {
                double s = 0.0;
                for (int j = 0; j <= i; j++) s += p[i * T + j] * v[o + j * D + d];
                ry[o + i * D + d] = s;
            }
            double di = 0.0;
            for (int j = 0; j <= i; j++) {
                double s = 0.0;
                for (int d = 0; d < D; d++) s += (double)dy[o + i * D + d] * v[o + j * D + d];
                dp[i * T + j] = s;
                di += s * p[i * T + j];
            }
            for (int j = 0; j <= i; j++) {
                double ds = p[i * T + j] * (dp[i * T + j] - di) * scale;
                for (int d = 0; d < D; d++) {
                    rdq[o + i * D + d] += ds * k[o + j * D + d];
                    rdk[o + j * D + d] += ds * q[o + i * D + d];
                    rdv[o + j * D + d] += p[i * T + j] * dy[o + i * D + d];
                }
            }
        }
    }
    fo_attention_forward(q, k, v, y, lse, 1, BH, T, D, n, T * D, D, n, T * D, D);
    fo_attention_backward(dy, q, k, v, y, lse, dq, dk, dv, 1, BH, T, D, n, T * D, D, n, T * D, D);
    char what[120];
    /* generation: the last Tq queries against all T keys (a KV cache) are y's last rows */
    int Tq = T < 3 ? T : 3;
    float *yd = frand((size_t)BH * Tq * D, 1.0);
    double *rd = (double *)malloc(sizeof(double) * BH * Tq * D);
    for (int h = 0; h < BH; h++)
        for (int x = 0; x < Tq * D; x++) rd[(size_t)h * Tq * D + x] = ry[(size_t)h * T * D + (size_t)(T - Tq) * D + x];
    fo_attention_decode(q + (size_t)(T - Tq) * D, k, v, yd, 1, BH, Tq, T, D, n, T * D, D, n, T * D, D,
                        (ptrdiff_t)BH * Tq * D, Tq * D, D);
    snprintf(what, sizeof what, "attention decode[%s] BH=%d Tq=%d T=%d D=%d", fo_isa(), BH, Tq, T, D);
    check(what, yd, rd, (size_t)BH * Tq * D, 1e-4, ktol(D > T ? D : T));
    free(yd); free(rd);
    double tol = ktol(D > T ? D : T);
    snprintf(what, sizeof what, "attention[%s] BH=%d T=%d D=%d: y", fo_isa(), BH, T, D);
    check(what, y, ry, n, 1e-4, tol);
    snprintf(what, sizeof what, "attention[%s] BH=%d T=%d D=%d: dq", fo_isa(), BH, T, D);
    check(what, dq, rdq, n, 1e-4, tol);
    snprintf(what, sizeof what, "attention[%s] BH=%d T=%d D=%d: dk", fo_isa(), BH, T, D);
    check(what, dk, rdk, n, 1e-4, tol);
    snprintf(what, sizeof what, "attention[%s] BH=%d T=%d D=%d: dv", fo_isa(), BH, T, D);
    check(what, dv, rdv, n, 1e-4, tol);
    free(q); free(k); free(v); free(dy); free(y); free(lse); free(dq); free(dk); free(dv);
    free(ry); free(rdq); free(rdk); free(rdv); free(p); free(dp);
}

/* ---- GELU and LayerNorm --------------------------------------------------- */
static void check_gelu(long n, double scale) {
    float *x = frand(n, scale), *dy = frand(n, 1.0), *y = frand(n, 1.0), *dx = frand(n, 1.0);
    double *ry = (double *)malloc(sizeof(double) * n), *rdx = (double *)malloc(sizeof(double) * n);
    const double c = 0.7978845608028654, a = 0.044715;
    for (long i = 0; i < n; i++) {
        double v = x[i], t = tanh(c * (v + a * v * v * v));
        ry[i] = 0.5 * v * (1.0 + t);
        rdx[i] = dy[i] * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * c * (1.0 + 3.0 * a * v * v));
    }
    fo_gelu_forward(x, y, n);
    fo_gelu_backward(dy, x, dx, n);
    char what[96];
    snprintf(what, sizeof what, "gelu[%s] n=%ld scale=%g: y", fo_isa(), n, scale);
    check(what, y, ry, n, 1e-6, 1e-6);
    snprintf(what, sizeof what, "gelu[%s] n=%ld scale=%g: dx", fo_isa(), n, scale);
    check(what, dx, rdx, n, 1e-5, 2e-6);
    free(x); free(dy); free(y); free(dx); free(ry); free(rdx);
}

static void check_layernorm(int M, int C) {
    size_t n = (size_t)M * C;
    float *x = frand(n, 1.0), *w = frand(C, 1.0), *b = frand(C, 1.0), *dy = frand(n, 1.0);
    float *y = frand(n, 1.0), *mean = frand(M, 1.0), *rstd = frand(M, 1.0), *dx = frand(n, 1.0);
    float *dw = frand(C, 1.0), *db = frand(C, 1.0);
    double *ry = (double *)malloc(sizeof(double) * n), *rdx = (double *)malloc(sizeof(double) * n);
    double *rdw = (double *)calloc(C, sizeof(double)), *rdb = (double *)calloc(C, sizeof(double));
    for (int i = 0; i < M; i++) {
        const float *xr = x + (size_t)i * C, *g = dy + (size_t)i * C;
        double mu = 0.0, var = 0.0, m1 = 0.0, m2 = 0.0;
        for (int c = 0; c < C; c++) mu += xr[c];
        mu /= C;
        for (int c = 0; c < C; c++) var += (xr[c] - mu) * (xr[c] - mu);
        double r = 1.0 / sqrt(var / C + 1e-5);
        for (int c = 0; c < C; c++) {
            double xh = (xr[c] - mu) * r;
            ry[(size_t)i * C + c] = xh * w[c] + b[c];
            m1 += g[c] * w[c];
            m2 += g[c] * w[c] * xh;
            rdw[c] += g[c] * xh;
            rdb[c] += g[c];
        }
        for (int c = 0; c < C; c++) /* dx / rstd, as test_fastops.py compares it */
            rdx[(size_t)i * C + c] = g[c] * w[c] - m1 / C - (xr[c] - mu) * r * m2 / C;
    }
    fo_layernorm_forward(x, w, b, y, mean, rstd, M, C, 1e-5f);
    fo_layernorm_backward(dy, x, w, mean, rstd, dx, dw, db, M, C);
    for (int i = 0; i < M; i++)
        for (int c = 0; c < C; c++) dx[(size_t)i * C + c] /= rstd[i];
    char what[96];
    snprintf(what, sizeof what, "layernorm[%s] M=%d C=%d: y", fo_isa(), M, C);
    check(what, y, ry, n, 1e-4, ktol(C));
    snprintf(what, sizeof what, "layernorm[%s] M=%d C=%d: dx", fo_isa(), M, C);
    check(what, dx, rdx, n, 1e-4, ktol(C));
    snprintf(what, sizeof what, "layernorm[%s] M=%d C=%d: dw", fo_isa(), M, C);
    check(what, dw, rdw, C, 1e-4, ktol(M));
    snprintf(what, sizeof what, "layernorm[%s] M=%d C=%d: db", fo_isa(), M, C);
    check(what, db, rdb, C, 1e-4, ktol(M));
    free(x); free(w); free(b); free(dy); free(y); free(mean); free(rstd); free(dx); free(dw);
    free(db); free(ry); free(rdx); free(rdw); free(rdb);
}

/* ---- the optimizer --------------------------------------------------------- */
static void check_optimizer(int n, const long *size, float gscale) {
    float *p[8], *g[8], *m[8], *v[8];
    int decay[8];
    double sq = 0.0;
    for (int a = 0; a < n; a++) {
        p[a] = frand(size[a], 1.0); g[a] = frand(size[a], 3.0);
        m[a] = frand(size[a], 0.1); v[a] = frand(size[a], 0.1);
        for (long i = 0; i < size[a]; i++) { v[a][i] = fabsf(v[a][i]); sq += (double)g[a][i] * g[a][i]; }
        decay[a] = a % 2;
    }
    float got = (float)fo_sumsq(n, g, size);
    double want = sq;
    check("sumsq", &got, &want, 1, 1e-5, 0.0);
    const double lr = 1e-2, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
    const int t = 3;
    double c1 = 1.0 - pow(b1, t), c2 = 1.0 - pow(b2, t);
    double *rp[8], *rm[8], *rv[8];
    for (int a = 0; a < n; a++) {
        rp[a] = (double *)malloc(sizeof(double) * size[a]);
        rm[a] = (double *)malloc(sizeof(double) * size[a]);
        rv[a] = (double *)malloc(sizeof(double) * size[a]);
        for (long i = 0; i < size[a]; i++) {
            double gi = (double)g[a][i] * gscale;
            rm[a][i] = b1 * m[a][i] + (1 - b1) * gi;
            rv[a][i] = b2 * v[a][i] + (1 - b2) * gi * gi;
            double pi = decay[a] ? p[a][i] * (1 - lr * wd) : p[a][i];
            rp[a][i] = pi - lr / c1 * rm[a][i] / (sqrt(rv[a][i] / c2) + eps);
        }
    }
    fo_adamw(n, p, g, m, v, size, decay, (float)lr, (float)b1, (float)b2, (float)eps, (float)wd,
             (float)c1, (float)c2, gscale);
    for (int a = 0; a < n; a++) {
        char what[96];
        snprintf(what, sizeof what, "adamw[%s] array %d of %d (%ld): p", fo_isa(), a, n, size[a]);
        check(what, p[a], rp[a], size[a], 2e-5, 1e-6);
        snprintf(what, sizeof what, "adamw[%s] array %d of %d (%ld): m", fo_isa(), a, n, size[a]);
        check(what, m[a], rm[a], size[a], 2e-5, 1e-6);
        snprintf(what, sizeof what, "adamw[%s] array %d of %d (%ld): v", fo_isa(), a, n, size[a]);
        check(what, v[a], rv[a], size[a], 2e-5, 1e-6);
        free(p[a]); free(g[a]); free(m[a]); free(v[a]); free(rp[a]); free(rm[a]); free(rv[a]);
    }
}

/* ---- softmax with cross-entropy -------------------------------------------- */
static void check_cross_entropy(int M, int V, double scale) {
    float *x = frand((size_t)M * V, scale), *w = frand(M, 1.0), *loss = frand(M, 1.0);
    float *d = frand((size_t)M * V, 1.0);
    int64_t *t = (int64_t *)malloc(sizeof(int64_t) * M);
    double *rl = (double *)malloc(sizeof(double) * M), *rd = (double *)malloc(sizeof(double) * M * V);
    for (int r = 0; r < M; r++) {
        const float *xr = x + (size_t)r * V;
        t[r] = (int64_t)((urand() + 1.0) * 0.5 * V) % V;
        double mx = -INFINITY, sum = 0.0;
        for (int c = 0; c < V; c++) mx = xr[c] > mx ? xr[c] : mx;
        for (int c = 0; c < V; c++) sum += exp(xr[c] - mx);
        rl[r] = log(sum) - (xr[t[r]] - mx);
        for (int c = 0; c < V; c++)
            rd[(size_t)r * V + c] = (exp(xr[c] - mx) / sum - (c == t[r])) * w[r] * 0.25;
    }
    fo_cross_entropy(x, t, w, loss, d, 0.25f, M, V);
    char what[96];
    snprintf(what, sizeof what, "cross_entropy[%s] M=%d V=%d: loss", fo_isa(), M, V);
    check(what, loss, rl, M, 1e-5, 1e-5 * (1.0 + log((double)V)));
    snprintf(what, sizeof what, "cross_entropy[%s] M=%d V=%d: dlogits", fo_isa(), M, V);
    check(what, d, rd, (size_t)M * V, 1e-4, 1e-7);
    free(x); free(w); free(loss); free(d); free(t); free(rl); free(rd);
}

/* ---- generation: fo_decode_token against a model and KV cache in double --- */
static void ref_layernorm(const double *x, const float *w, const float *b, double *y, int C) {
    double mu = 0.0, var = 0.0;
    for (int c = 0; c < C; c++) mu += x[c];
    mu /= C;
    for (int c = 0; c < C; c++) var += (x[c] - mu) * (x[c] - mu);
    double r = 1.0 / sqrt(var / C + 1e-5);
    for (int c = 0; c < C; c++) y[c] = (x[c] - mu) * r * w[c] + b[c];
}

static void ref_linear(const double *x, const float *W, const float *bias, double *y, int K, int N) {
    for (int j = 0; j < N; j++) {
        double s = bias[j];
        for (int p = 0; p < K; p++) s += x[p] * W[(size_t)p * N + j];
        y[j] = s;
    }
}

/* decodes T tokens of each of B rows, one call a position, into caches of
 * cap >= T positions (L <= 2); the logits are checked after every call, the caches
 * (written at positions 0..T-1, garbage elsewhere that must stay) at the end */
static void check_decode_token(int L, int C, int H, int V, int B, int T, int cap) {
    int D = C / H;
    const int size[12] = {C, C, 3 * C * C, 3 * C, C * C, C, C, C, 4 * C * C, 4 * C, 4 * C * C, C};
    float *w[24], *k[2], *v[2], *wte = frand((size_t)V * C, 1.0), *wpe = frand((size_t)T * C, 0.3);
    float *lnf_w = frand(C, 0.2), *lnf_b = frand(C, 0.3), *logits = frand((size_t)B * V, 1.0);
    for (int i = 0; i < 12 * L; i++) {
        w[i] = frand(size[i % 12], 0.3);
        if (i % 12 == 0 || i % 12 == 6) /* LayerNorm weights near 1 */
            for (int c = 0; c < C; c++) w[i][c] += 1.0f;
    }
    for (int c = 0; c < C; c++) lnf_w[c] += 1.0f;
    size_t nkv = (size_t)B * H * cap * D;
    float *kc = frand(L * nkv, 1.0), *vc = frand(L * nkv, 1.0);
    double *rk = (double *)malloc(sizeof(double) * L * nkv), *rv = (double *)malloc(sizeof(double) * L * nkv);
    for (size_t i = 0; i < L * nkv; i++) { rk[i] = kc[i]; rv[i] = vc[i]; }
    for (int l = 0; l < L; l++) { k[l] = kc + l * nkv; v[l] = vc + l * nkv; }
    int64_t *tok = (int64_t *)malloc(sizeof(int64_t) * B * T); /* (T, B): each call's B tokens */
    for (int i = 0; i < B * T; i++) tok[i] = (int64_t)((urand() + 1.0) * 0.5 * V) % V;
    double *x = (double *)malloc(sizeof(double) * (10 * C + T)), *h = x + C, *qkv = h + C;
    double *y = qkv + 3 * C, *f = y + C, *s = f + 4 * C, *rl = (double *)malloc(sizeof(double) * B * V);
    char what[128];
    for (int t = 0; t < T; t++) {
        for (int b = 0; b < B; b++) {
            const int64_t tk = tok[t * B + b];
            for (int c = 0; c < C; c++) x[c] = (double)wte[tk * C + c] + wpe[(size_t)t * C + c];
            for (int l = 0; l < L; l++) {
                float *const *p = w + 12 * l;
                ref_layernorm(x, p[0], p[1], h, C);
                ref_linear(h, p[2], p[3], qkv, C, 3 * C);
                for (int hd = 0; hd < H; hd++) {
                    double *kh = rk + l * nkv + ((size_t)b * H + hd) * cap * D, *vh = rv + (kh - rk);
                    const double *q = qkv + hd * D;
                    double mx = -INFINITY, sum = 0.0;
                    for (int d = 0; d < D; d++) {
                        kh[(size_t)t * D + d] = qkv[C + hd * D + d];
                        vh[(size_t)t * D + d] = qkv[2 * C + hd * D + d];
                    }
                    for (int j = 0; j <= t; j++) {
                        s[j] = 0.0;
                        for (int d = 0; d < D; d++) s[j] += q[d] * kh[(size_t)j * D + d];
                        s[j] /= sqrt((double)D);
                        mx = s[j] > mx ? s[j] : mx;
                    }
                    for (int j = 0; j <= t; j++) sum += (s[j] = exp(s[j] - mx));
                    for (int d = 0; d < D; d++) {
                        double acc = 0.0;
                        for (int j = 0; j <= t; j++) acc += s[j] * vh[(size_t)j * D + d];
                        y[hd * D + d] = acc / sum;
                    }
                }
                ref_linear(y, p[4], p[5], h, C, C);
                for (int c = 0; c < C; c++) x[c] += h[c];
                ref_layernorm(x, p[6], p[7], h, C);
                ref_linear(h, p[8], p[9], f, C, 4 * C);
                for (int i = 0; i < 4 * C; i++)
                    f[i] = 0.5 * f[i] * (1.0 + tanh(0.7978845608028654 * (f[i] + 0.044715 * f[i] * f[i] * f[i])));
                ref_linear(f, p[10], p[11], h, 4 * C, C);
                for (int c = 0; c < C; c++) x[c] += h[c];
            }
            ref_layernorm(x, lnf_w, lnf_b, h, C);
            for (int j = 0; j < V; j++) {
                double acc = 0.0;
                for (int c = 0; c < C; c++) acc += h[c] * wte[(size_t)j * C + c];
                rl[(size_t)b * V + j] = acc;
            }
        }
        fo_decode_token(L, C, H, V, B, tok + t * B, t, wte, wpe, (const float *const *)w, lnf_w,
                        lnf_b, k, v, cap, 1, C, logits);
        snprintf(what, sizeof what, "decode_token[%s] L=%d C=%d H=%d V=%d B=%d cap=%d: logits, past=%d",
                 fo_isa(), L, C, H, V, B, cap, t);
        check(what, logits, rl, (size_t)B * V, 1e-4, ktol(C));
    }
    snprintf(what, sizeof what, "decode_token[%s] L=%d C=%d H=%d V=%d B=%d cap=%d T=%d: k cache",
             fo_isa(), L, C, H, V, B, cap, T);
    check(what, kc, rk, L * nkv, 1e-4, ktol(C));
    snprintf(what, sizeof what, "decode_token[%s] L=%d C=%d H=%d V=%d B=%d cap=%d T=%d: v cache",
             fo_isa(), L, C, H, V, B, cap, T);
    check(what, vc, rv, L * nkv, 1e-4, ktol(C));
    for (int i = 0; i < 12 * L; i++) free(w[i]);
    free(wte); free(wpe); free(lnf_w); free(lnf_b); free(logits); free(kc); free(vc);
    free(rk); free(rv); free(tok); free(x); free(rl);
}

static void check_all(void) {
    static const int dims[] = {1, 2, 3, 7, 15, 16, 17, 31, 33, 65, 130};
    const int nd = (int)(sizeof dims / sizeof dims[0]);
    for (int a = 0; a < nd; a++)
        for (int b = 0; b < nd; b += 2)
            for (int c = 0; c < nd; c += 3) {
                int t = (a + b + c) % 4;
                check_gemm(dims[a], dims[b], dims[c], t & 1, t >> 1, (a + c) % 2, (b + c) % 3 == 0);
            }
    check_gemm(1, 2304, 768, 0, 0, 0, 1);   /* generation: c_attn at batch 1 */
    check_gemm(16, 769, 300, 0, 0, 1, 1);   /* the small-M path at its limit, ragged N */
    check_gemm(1, 700, 777, 1, 0, 1, 1);    /* one row, a 2 MB weight: k split into chunks */
    check_gemm(257, 129, 383, 0, 0, 0, 1);  /* blocked, several k blocks */
    check_gemm(130, 70, 400, 1, 0, 0, 0);   /* X^T . dY */
    check_gemm(130, 70, 400, 1, 0, 0, 1);   /* ... with a bias: added once, over several k blocks */
    check_gemm(100, 90, 80, 0, 1, 1, 0);    /* dY . W^T */
    check_gemm(3, 77, 50, 0, 1, 0, 1);      /* the tied head, few rows: dot products */
    check_gemm(13, 1000, 300, 0, 1, 1, 1);  /* ... 5 to 16 rows: C^T = W . A^T, ragged N */
    check_gemm(768, 128, 384, 1, 0, 0, 0);  /* X^T . dY, threads split the columns */
    check_gemm(130, 600, 70, 1, 0, 0, 0);   /* ... and the rows (C taller than wide) */
    static const int lb[][3] = {{1, 1, 1}, {7, 17, 3}, {64, 33, 130}, {200, 130, 65}, {300, 40, 600}};
    for (int i = 0; i < 5; i++) check_linear_backward(lb[i][0], lb[i][1], lb[i][2]);
    check_embedding(1, 1, 1);
    check_embedding(5, 17, 300);
    check_embedding(260, 130, 1024);
    static const int ts[] = {1, 7, 64, 65, 130}, ds[] = {1, 8, 17, 64};
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++) check_attention(1 + (i + j) % 3, ts[i], ds[j]);
    static const long ns[] = {1, 15, 17, 513, 4099, 70001};
    for (int i = 0; i < 6; i++) check_gelu(ns[i], i % 2 ? 4.0 : 1.0);
    check_gelu(1000, 30.0);
    static const int ms[] = {1, 3, 97, 300}, cs[] = {1, 5, 16, 17, 129, 384};
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 6; j++) check_layernorm(ms[i], cs[j]);
    static const long sz1[] = {1}, sz2[] = {17, 3, 70001, 1, 4096, 129};
    check_optimizer(1, sz1, 1.0f);
    check_optimizer(6, sz2, 0.37f);
    check_cross_entropy(1, 1, 1.0);
    check_cross_entropy(7, 17, 3.0);
    check_cross_entropy(65, 260, 1.0);
    check_cross_entropy(3, 50257, 10.0);
    check_decode_token(1, 8, 2, 5, 1, 3, 3);    /* tiny */
    check_decode_token(1, 8, 2, 5, 3, 3, 4);    /* ... B > 1: a token per row */
    check_decode_token(2, 36, 3, 37, 1, 9, 11); /* D = 12, V = 37: no SIMD multiple; cap > T */
    check_decode_token(2, 36, 3, 37, 3, 9, 11);
    check_decode_token(1, 64, 4, 70, 2, 5, 5);  /* D = 16: whole vectors */
}

int main(void) {
    static const char *isas[] = {"amx", "avx512", "avx2", "generic"};
    int ran = 0;
    for (int i = 0; i < 4; i++) {
        if (fo_set_isa(isas[i]) != 0) continue;
        check_all();
        ran++;
    }
    fo_set_isa("auto");
    printf("fastops_check: kernels %s (%d ISA%s), %d threads: %d checks, %d failed\n", fo_isa(),
           ran, ran == 1 ? "" : "s", fo_max_threads(), n_checks, n_failed);
    return n_failed ? 1 : 0;
}

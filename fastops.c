/*
 * fastops.c -- the heavy math of llm.py in C: float32, row-major.
 *
 *   1. GEMM for the linear layers (forward Y = X.W + b, backward dX, dW, db)
 *   2. fused causal multi-head attention, forward and backward (FlashAttention
 *      style: the T x T matrix is never materialised)
 *   3. GELU and LayerNorm, forward and backward (fused: one pass where
 *      NumPy or CuPy would make several, each with its temporary array)
 *
 * The CPU code is plain C99 + OpenMP. The GEMM micro-kernel has AVX-512 and
 * AVX2+FMA versions written with intrinsics (and the larger products an AMX
 * path, for Xeons that have Intel's tile unit); each carries its own
 * __attribute__((target(...))) so the file compiles with plain -O3 and runs on
 * any x86-64 (the kernel is picked at run time from the CPU's features).
 * Other CPUs (ARM, ...) get a portable C micro-kernel the compiler vectorises
 * (-DFO_PORTABLE_ONLY forces that path on x86 too, to test it).
 *
 * Built by build_ext.py (cffi, API mode). The Python wrappers in llm.py check
 * shapes, dtypes and contiguity: nothing here validates pointers.
 *
 * The CUDA variant sits beside the CPU section, under #ifdef __CUDACC__ at
 * the end of this file: `python build_ext.py --cuda` compiles this same file
 * with nvcc (-x cu) into _fastops_cuda.so. It exports the same fo_* functions,
 * taking DEVICE pointers (plus fo_cuda_error / fo_cuda_sync).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FO_PORTABLE_ONLY) \
    && !defined(__CUDACC__)
#define FO_X86 1
#include <immintrin.h>
#else
#define FO_X86 0
#endif

/* ------------------------------------------------------------------------ */
/* Public API. build_ext.py hands the lines between the two API markers to   */
/* cffi as they are, so this is the one place the API is declared.          */
/* ------------------------------------------------------------------------ */
#ifdef __cplusplus /* nvcc compiles this file as C++: keep C names */
extern "C" {
#endif
/* API begin */
const char *fo_isa(void);
int fo_set_isa(const char *name);
int fo_max_threads(void);
double fo_fma_peak(long steps);
int fo_has_openmp(void);
int fo_out_of_memory(void);
void fo_sgemm(int M, int N, int K, const float *A, ptrdiff_t rsa, ptrdiff_t csa,
              const float *B, ptrdiff_t rsb, ptrdiff_t csb, float *C, ptrdiff_t ldc,
              int accumulate, const float *bias);
void fo_linear_forward(const float *x, const float *w, const float *b, float *y,
                       int M, int K, int N);
void fo_linear_backward(const float *dy, const float *x, const float *w, float *dx,
                        float *dw, float *db, int M, int K, int N);
void fo_colsum(const float *dy, float *db, int M, int N);
void fo_attention_forward(const float *q, const float *k, const float *v, float *y,
                          float *lse, int B, int H, int T, int D, ptrdiff_t sb, ptrdiff_t sh,
                          ptrdiff_t st, ptrdiff_t yb, ptrdiff_t yh, ptrdiff_t yt);
void fo_attention_backward(const float *dy, const float *q, const float *k,
                           const float *v, const float *y, const float *lse,
                           float *dq, float *dk, float *dv, int B, int H, int T, int D,
                           ptrdiff_t sb, ptrdiff_t sh, ptrdiff_t st, ptrdiff_t yb,
                           ptrdiff_t yh, ptrdiff_t yt);
void fo_attention_decode(const float *q, const float *k, const float *v, float *y, int B, int H,
                         int Tq, int Tk, int D, ptrdiff_t qb, ptrdiff_t qh, ptrdiff_t qt,
                         ptrdiff_t kb, ptrdiff_t kh, ptrdiff_t kt, ptrdiff_t yb, ptrdiff_t yh,
                         ptrdiff_t yt);
void fo_gelu_forward(const float *x, float *y, long n);
void fo_gelu_backward(const float *dy, const float *x, float *dx, long n);
void fo_layernorm_forward(const float *x, const float *w, const float *b, float *y,
                          float *mean, float *rstd, int M, int C, float eps);
void fo_layernorm_backward(const float *dy, const float *x, const float *w,
                           const float *mean, const float *rstd, float *dx, float *dw,
                           float *db, int M, int C);
double fo_sumsq(int n, float *const *x, const long *size);
void fo_adamw(int n, float *const *p, float *const *g, float *const *m, float *const *v,
              const long *size, const int *decay, float lr, float beta1, float beta2,
              float eps, float weight_decay, float c1, float c2, float gscale);
void fo_cross_entropy(const float *logits, const int64_t *targets, const float *weights,
                      float *loss, float *dlogits, float dscale, int M, int V);
void fo_embedding_backward(float *dwte, const int64_t *idx, const float *dx, long N, int C);
void fo_decode_token(int L, int C, int H, int V, int B, const int64_t *tokens, int past,
                     const float *wte, const float *wpe, const float *const *w,
                     const float *lnf_w, const float *lnf_b, float *const *k, float *const *v,
                     int cap, ptrdiff_t rsh, ptrdiff_t csh, float *logits);
/* API end */
#ifdef __cplusplus
}
#endif

/* GELU's constants, for both sections: gelu(x) = 0.5 x (1 + tanh(C (x + A x^3))) */
#define GELU_C 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_A 0.044715f
#define GELU_ZERO_BELOW -1e30f /* y = -0 there (see gelu_fwd_block) */

#ifndef __CUDACC__
/* ======================================================================== */
/* CPU section                                                              */
/* ======================================================================== */

/* The most threads a kernel runs on: its per-thread run counters and
 * partial sums are arrays of this many (gemm_blocked's below) */
#define MAX_RUNS 256
#ifdef _OPENMP
static int fo_nthreads(void) { int n = omp_get_max_threads(); return n < MAX_RUNS ? n : MAX_RUNS; }
static int fo_tid(void) { return omp_get_thread_num(); }
static int fo_team(void) { return omp_get_num_threads(); } /* threads in this parallel region */
int fo_has_openmp(void) { return 1; }
#else
static int fo_nthreads(void) { return 1; }
static int fo_tid(void) { return 0; }
static int fo_team(void) { return 1; }
int fo_has_openmp(void) { return 0; }
#endif
int fo_max_threads(void) { return fo_nthreads(); }
/* a thread count that only OpenMP's pragmas read (unused in a build without them) */
#define OMP_ONLY(n) (void)(n)

/* Helpers marked FO_INLINE are inlined into per-ISA copies of the attention
 * code (see "per-ISA attention" below), so their plain C loops get compiled
 * for AVX-512 / AVX2 there and for the baseline ISA elsewhere. */
#if defined(__GNUC__) || defined(__clang__)
#define FO_INLINE static inline __attribute__((always_inline))
#else
#define FO_INLINE static inline
#endif
#define FO_RESTRICT __restrict /* gcc, clang and MSVC: these arrays do not overlap */

static int imin(int a, int b) { return a < b ? a : b; }
static int imax(int a, int b) { return a > b ? a : b; }
static int ceil_div(int a, int b) { return (a + b - 1) / b; }

/* 64-byte aligned scratch memory (malloc + manual alignment: portable C99).
 * A failure is recorded: the kernel skips its work and fo_out_of_memory()
 * tells llm.py, which raises MemoryError (no crash, no garbage returned).
 * FO_MALLOC lets the tests build a fastops whose every allocation fails. */
#ifndef FO_MALLOC
#define FO_MALLOC malloc
#endif
static volatile int fo_oom;
int fo_out_of_memory(void) {
    int r = fo_oom;
    fo_oom = 0;
    return r;
}
static float *fo_alloc(size_t nfloats) {
    char *raw = (char *)FO_MALLOC(nfloats * sizeof(float) + 64 + sizeof(void *));
    if (!raw) {
        fo_oom = 1;
        return NULL;
    }
    uintptr_t p = ((uintptr_t)(raw + sizeof(void *)) + 63) & ~(uintptr_t)63;
    ((void **)p)[-1] = raw;
    return (float *)p;
}
static void fo_free(float *p) {
    if (p) free(((void **)p)[-1]);
}

/* ------------------------------------------------------------------------ */
/* GEMM micro-kernels.                                                       */
/*                                                                           */
/* A micro-kernel computes one MR x NR tile of C from a packed A micro-panel */
/* (kc steps of MR floats: a[p*MR + r]) and a packed B micro-panel (kc steps */
/* of NR floats: b[p*NR + j]). Only the top-left mr x nr part of the tile    */
/* is written (edges). Epilogue: C = acc (+ C if load_c) (+ bias[j] if bias)  */
/* ------------------------------------------------------------------------ */
typedef void (*ukern_fn)(int kc, const float *a, const float *b, float *c,
                         ptrdiff_t ldc, int mr, int nr, int load_c, const float *bias);
/* packing a micro-panel of A (mr rows x kc) or of B (kc x nr), per ISA */
typedef void (*pack_fn)(float *dst, const float *src, ptrdiff_t rs, ptrdiff_t cs, int n, int kc,
                        int width);
typedef struct {
    const char *name;
    int mr, nr;
    ukern_fn fn;
    pack_fn pack_a, pack_b;
    void (*pack_at)(float *dst, const float *A, ptrdiff_t csa, int mc, int kc, int MR);
} kern_t;

/* Portable micro-kernel: fixed-size loops the compiler can vectorise. */
#define GEN_MR 4
#define GEN_NR 16
static void ukern_generic(int kc, const float *a, const float *b, float *c,
                          ptrdiff_t ldc, int mr, int nr, int load_c, const float *bias) {
    float acc[GEN_MR][GEN_NR];
    memset(acc, 0, sizeof acc);
    for (int p = 0; p < kc; p++) {
        for (int r = 0; r < GEN_MR; r++) {
            float ar = a[p * GEN_MR + r];
            for (int j = 0; j < GEN_NR; j++) acc[r][j] += ar * b[p * GEN_NR + j];
        }
    }
    for (int r = 0; r < mr; r++) {
        float *cr = c + r * ldc;
        for (int j = 0; j < nr; j++) {
            float v = acc[r][j];
            if (load_c) v += cr[j];
            if (bias) v += bias[j];
            cr[j] = v;
        }
    }
}

#if FO_X86
/* acc[0..n) = zero, in registers: zeros the compiler can see it turned into
 * a memset of the array on the stack (rep stos, a fixed cost on every tile),
 * and that kept the array in memory as well */
#define ZERO_ACC(acc, n, zero)                                                            \
    do {                                                                                  \
        __typeof__((acc)[0]) z_ = (zero);                                                 \
        __asm__("" : "+v"(z_));                                                           \
        for (int i_ = 0; i_ < (n); i_++) (acc)[i_] = z_;                                  \
    } while (0)

/* AVX-512: tiles of MR rows x NV vectors of 16 columns, 24 zmm accumulators:
 * 12 x 32 (per k step 2 loads of B, 12 broadcasts of A, 24 FMAs) and, for
 * the blocked GEMM, 6 x 64 (4 loads, 6 broadcasts: fewer loads per FMA; its
 * 64 columns would waste work on attention's diagonal tiles, and its B
 * strip would not stay in L1 in gemm_cols). Each C element sums its k steps
 * in the same order in either tile: the same bits. */
#define A512_MR 12
#define A512_NR 32
#define W512_MR 6
#define W512_NR 64
/* the lanes of 16 that hold the first w of them: all, the first w, or none */
#define LANE_MASK16(w) ((w) >= 16 ? (__mmask16)0xFFFF : (w) > 0 ? (__mmask16)((1u << (w)) - 1) : (__mmask16)0)
/* C tile = acc (+ C if load_c) (+ bias): only its top-left mr x nr part,
 * the ragged right edge through lane masks; acc[r * nv + v] */
__attribute__((target("avx512f")))
static inline void store_tile_512(const __m512 *acc, int nv, float *c, ptrdiff_t ldc, int mr,
                                  int nr, int load_c, const float *bias) {
    __mmask16 m[4];
    __m512 bv[4];
    for (int v = 0; v < nv; v++) {
        m[v] = LANE_MASK16(nr - 16 * v);
        bv[v] = bias ? _mm512_maskz_loadu_ps(m[v], bias + 16 * v) : _mm512_setzero_ps();
    }
    for (int r = 0; r < mr; r++) {
        float *cr = c + r * ldc;
        for (int v = 0; v < nv; v++) {
            __m512 x = _mm512_add_ps(acc[r * nv + v], bv[v]);
            if (load_c) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m[v], cr + 16 * v));
            _mm512_mask_storeu_ps(cr + 16 * v, m[v], x);
        }
    }
}

/* Tiles of 4 rows or fewer (the last of 64, attention's tile height), A read
 * in place (row r, step p at a[r * lda + p * rstep]): the same sums for
 * those rows, without computing 12. */
__attribute__((target("avx512f"), noinline))
static void ukern_avx512_4(int kc, const float *a, ptrdiff_t lda, ptrdiff_t rstep, const float *b,
                           float *c, ptrdiff_t ldc, int mr, int nr, int load_c, const float *bias) {
    const float *ar[4];
    __m512 acc[8];
    for (int r = 0; r < 4; r++) {
        ar[r] = a + (r < mr ? r : mr - 1) * lda;
        acc[2 * r] = acc[2 * r + 1] = _mm512_setzero_ps();
    }
    for (int p = 0; p < kc; p++) {
        __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
        for (int r = 0; r < 4; r++) {
            __m512 x = _mm512_set1_ps(ar[r][p * rstep]);
            acc[2 * r] = _mm512_fmadd_ps(x, b0, acc[2 * r]);
            acc[2 * r + 1] = _mm512_fmadd_ps(x, b1, acc[2 * r + 1]);
        }
        b += A512_NR;
    }
    store_tile_512(acc, 2, c, ldc, mr, nr, load_c, bias);
}

/* The k loop of an MR x 16 NV tile, A_AT(r) the step's element of row r */
#define UKERN_512_LOOP(MR, NV, A_AT, NEXT_A)                                              \
    for (int p = 0; p < kc; p++) {                                                        \
        __m512 bv[NV];                                                                    \
        for (int v = 0; v < NV; v++) bv[v] = _mm512_load_ps(b + 16 * v);                  \
        for (int r = 0; r < MR; r++) {                                                    \
            __m512 x = _mm512_set1_ps(A_AT(r));                                           \
            for (int v = 0; v < NV; v++) acc[r * NV + v] = _mm512_fmadd_ps(x, bv[v], acc[r * NV + v]); \
        }                                                                                 \
        NEXT_A;                                                                           \
        b += 16 * NV;                                                                     \
    }
#define PACKED_AT(r) a[r]
#define ROWS_AT(r) ar[r][p]
/* a whole tile's row r, step p: row 4 q + s at a4[q] + s lda, the 12 rows'
 * addresses from three pointers and two strides (lda, 3 lda), as x86 forms
 * them in the load itself; with a pointer a row GCC ran out of registers and
 * moved pointers in and out of vector ones in the k loop (4% slower alone) */
#define STRIDED_AT(r) a4[(r) >> 2][((r) & 3) == 3 ? l3 : ((r) & 3) * l1]
#define STRIDED_NEXT                                                                      \
    do {                                                                                  \
        for (int q_ = 0; q_ < 3; q_++) a4[q_]++;                                          \
        __asm__("" : "+r"(l1), "+r"(l3)); /* kept opaque: not one pointer a row again */  \
    } while (0)
/* ukern_512_MRxNV: A packed (MR floats a step). ukern_512_MRxNV_rows: A read
 * in place, row by row (row-major A, row stride lda), where packing A costs
 * about as much as the product; rows past mr repeat row mr - 1 (computed,
 * not stored). aligned: where the k loop falls in the cache lines must not
 * move with unrelated code (that moved the products' speed by 2-3% here). */
#define DEFINE_UKERN_512(MR, NV)                                                          \
    __attribute__((target("avx512f"), aligned(64)))                                       \
    static void ukern_512_##MR##x##NV(int kc, const float *a, const float *b, float *c,   \
                                      ptrdiff_t ldc, int mr, int nr, int load_c,          \
                                      const float *bias) {                                \
        __m512 acc[MR * NV];                                                              \
        ZERO_ACC(acc, MR * NV, _mm512_setzero_ps());                                      \
        UKERN_512_LOOP(MR, NV, PACKED_AT, a += MR)                                        \
        store_tile_512(acc, NV, c, ldc, mr, nr, load_c, bias);                            \
    }                                                                                     \
    __attribute__((target("avx512f"), aligned(64)))                                       \
    static void ukern_512_##MR##x##NV##_rows(int kc, const float *a, ptrdiff_t lda,       \
                                             const float *b, float *c, ptrdiff_t ldc,     \
                                             int mr, int nr, int load_c, const float *bias) { \
        const float *ar[MR];                                                              \
        __m512 acc[MR * NV];                                                              \
        ZERO_ACC(acc, MR * NV, _mm512_setzero_ps());                                      \
        if (mr == MR) {                                                                   \
            const float *a4[3] = {a, a + (MR > 4) * 4 * lda, a + (MR > 8) * 8 * lda};     \
            ptrdiff_t l1 = lda, l3 = 3 * lda;                                             \
            UKERN_512_LOOP(MR, NV, STRIDED_AT, STRIDED_NEXT)                              \
        } else {                                                                          \
            for (int r = 0; r < MR; r++) ar[r] = a + (r < mr ? r : mr - 1) * lda;         \
            UKERN_512_LOOP(MR, NV, ROWS_AT, (void)0)                                      \
        }                                                                                 \
        store_tile_512(acc, NV, c, ldc, mr, nr, load_c, bias);                            \
    }
DEFINE_UKERN_512(12, 2) /* A512: 12 x 32 */
DEFINE_UKERN_512(6, 4)  /* W512: 6 x 64 */
/* ...and A^T read in place (X^T of the weight gradients: row r, step p at
 * a[r + p * lda], a step's 12 floats side by side in a row of X), a whole
 * tile (mr = 12): no pack of X, which each thread of gemm_cols made in full,
 * reading X from memory (in a training step it is cold) to write it again.
 * Each step reads a new row of X, lda apart: the row 16 steps on is
 * prefetched (its 12 floats can span two lines), because a hardware stride
 * prefetcher gives up past 2 KB (Intel's: X 1536 wide, 6 KB a row, ran at
 * 0.6x the other shapes without it) */
#define COLS_PF_AHEAD 16
#define COLS_NEXT_A                                                                       \
    do {                                                                                  \
        _mm_prefetch((const char *)(a + COLS_PF_AHEAD * lda), _MM_HINT_T0);               \
        _mm_prefetch((const char *)(a + COLS_PF_AHEAD * lda + 11), _MM_HINT_T0);          \
        a += lda;                                                                         \
    } while (0)
__attribute__((target("avx512f"), aligned(64)))
static void ukern_512_12x2_cols(int kc, const float *a, ptrdiff_t lda, const float *b, float *c,
                                ptrdiff_t ldc, int mr, int nr, int load_c, const float *bias) {
    __m512 acc[24];
    ZERO_ACC(acc, 24, _mm512_setzero_ps());
    UKERN_512_LOOP(12, 2, PACKED_AT, COLS_NEXT_A)
    store_tile_512(acc, 2, c, ldc, mr, nr, load_c, bias);
}

/* AVX2 + FMA: the classic 6 x 16 tile = 12 ymm accumulators. */
#define A256_MR 6
#define A256_NR 16
/* C rows = acc (+ C if load_c) (+ bias): mr rows, the ragged right edge
 * through lane masks */
__attribute__((target("avx2,fma")))
static inline void store_rows_256(const __m256 *acc0, const __m256 *acc1, float *c, ptrdiff_t ldc,
                                  int mr, int nr, int load_c, const float *bias) {
    /* maskload/maskstore take a vector of ints; lane j is on when j < nr */
    __m256i nrv = _mm256_set1_epi32(nr);
    __m256i m0 = _mm256_cmpgt_epi32(nrv, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i m1 = _mm256_cmpgt_epi32(nrv, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15));
    __m256 bias0 = _mm256_setzero_ps(), bias1 = _mm256_setzero_ps();
    if (bias) {
        bias0 = _mm256_maskload_ps(bias, m0);
        bias1 = _mm256_maskload_ps(bias + 8, m1);
    }
    for (int r = 0; r < mr; r++) {
        float *cr = c + r * ldc;
        __m256 v0 = _mm256_add_ps(acc0[r], bias0), v1 = _mm256_add_ps(acc1[r], bias1);
        if (nr == 16) { /* plain loads and stores: AMD's masked store is microcoded */
            if (load_c) {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cr));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cr + 8));
            }
            _mm256_storeu_ps(cr, v0);
            _mm256_storeu_ps(cr + 8, v1);
            continue;
        }
        if (load_c) {
            v0 = _mm256_add_ps(v0, _mm256_maskload_ps(cr, m0));
            v1 = _mm256_add_ps(v1, _mm256_maskload_ps(cr + 8, m1));
        }
        _mm256_maskstore_ps(cr, m0, v0);
        _mm256_maskstore_ps(cr + 8, m1, v1);
    }
}

__attribute__((target("avx2,fma")))
static void ukern_avx2(int kc, const float *a, const float *b, float *c,
                       ptrdiff_t ldc, int mr, int nr, int load_c, const float *bias) {
    __m256 acc0[A256_MR], acc1[A256_MR];
    ZERO_ACC(acc0, A256_MR, _mm256_setzero_ps());
    ZERO_ACC(acc1, A256_MR, _mm256_setzero_ps());
#pragma GCC unroll 4   /* 12 FMAs a k step: the loop's own work counts (+10% on Zen 3) */
    for (int p = 0; p < kc; p++) {
        __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
        for (int r = 0; r < A256_MR; r++) {
            __m256 ar = _mm256_set1_ps(a[r]);
            acc0[r] = _mm256_fmadd_ps(ar, b0, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(ar, b1, acc1[r]);
        }
        a += A256_MR;
        b += A256_NR;
    }
    store_rows_256(acc0, acc1, c, ldc, mr, nr, load_c, bias);
}

/* A read in place, as ukern_512_12x2_rows */
__attribute__((target("avx2,fma")))
static void ukern_avx2_rows(int kc, const float *a, ptrdiff_t lda, const float *b, float *c,
                            ptrdiff_t ldc, int mr, int nr, int load_c, const float *bias) {
    const float *ar[A256_MR];
    __m256 acc0[A256_MR], acc1[A256_MR];
    for (int r = 0; r < A256_MR; r++) ar[r] = a + (r < mr ? r : mr - 1) * lda;
    ZERO_ACC(acc0, A256_MR, _mm256_setzero_ps());
    ZERO_ACC(acc1, A256_MR, _mm256_setzero_ps());
#pragma GCC unroll 4
    for (int p = 0; p < kc; p++) {
        __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
        for (int r = 0; r < A256_MR; r++) {
            __m256 x = _mm256_set1_ps(ar[r][p]);
            acc0[r] = _mm256_fmadd_ps(x, b0, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(x, b1, acc1[r]);
        }
        b += A256_NR;
    }
    store_rows_256(acc0, acc1, c, ldc, mr, nr, load_c, bias);
}
#endif /* FO_X86 */

/* The transposed B panel: dst[p*NR + j] = B[p + j*csb]. Each row j of W
 * is read along p; written with stride NR, one float at a time. */
static void packbt_generic(float *dst, const float *B, ptrdiff_t csb, int nr, int kc, int NR) {
    for (int j = 0; j < NR; j++) {
        float *d = dst + j;
        if (j < nr) {
            const float *src = B + j * csb;
            for (int p = 0; p < kc; p++) d[p * NR] = src[p];
        } else {
            for (int p = 0; p < kc; p++) d[p * NR] = 0.0f;
        }
    }
}

#if FO_X86
/* columns [j0, j0 + w) of the panel from row p on, one float at a time:
 * what a register transpose leaves (the last rows, or a ragged edge) */
FO_INLINE void packbt_rest(float *dst, const float *B, ptrdiff_t csb, int nr, int NR, int j0, int w,
                           int p, int kc) {
    for (; p < kc; p++)
        for (int j = j0; j < j0 + w; j++) dst[(size_t)p * NR + j] = j < nr ? B[j * csb + p] : 0.0f;
}

/* The same with 8 x 8 (AVX2) or 16 x 16 (AVX-512) blocks transposed in
 * registers: each row of B^T read 8 or 16 floats at a time, each row of the
 * panel written whole. Past nr the panel is zero; past kc nothing is read. */
__attribute__((target("avx2,fma")))
static void packbt_avx2(float *dst, const float *B, ptrdiff_t csb, int nr, int kc, int NR) {
    for (int j0 = 0; j0 < NR; j0 += 8) {
        int p = 0;
        if (j0 + 8 <= nr) {
            for (; p + 8 <= kc; p += 8) {
                __m256 r[8], t[8];
                for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(B + (j0 + i) * csb + p);
                for (int i = 0; i < 8; i += 2) {
                    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
                    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
                }
                for (int i = 0; i < 8; i += 4)
                    for (int h = 0; h < 2; h++) {
                        r[i + h] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], 0x44);
                        r[i + h + 2] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], 0xEE);
                    }
                /* r[0..7] now hold, per 128-bit half, columns 0,2,1,3 of rows
                 * 0-3 (r[0..3]) and 4-7 (r[4..7]) */
                static const int order[4] = {0, 2, 1, 3};
                for (int c = 0; c < 4; c++) {
                    __m256 lo = r[order[c]], hi = r[4 + order[c]];
                    _mm256_storeu_ps(dst + (size_t)(p + c) * NR + j0,
                                     _mm256_permute2f128_ps(lo, hi, 0x20));
                    _mm256_storeu_ps(dst + (size_t)(p + c + 4) * NR + j0,
                                     _mm256_permute2f128_ps(lo, hi, 0x31));
                }
            }
        }
        packbt_rest(dst, B, csb, nr, NR, j0, 8, p, kc);
    }
}

__attribute__((target("avx512f")))
static void packbt_avx512(float *dst, const float *B, ptrdiff_t csb, int nr, int kc, int NR) {
    static const int order[4] = {0, 2, 1, 3};
    for (int j0 = 0; j0 < NR; j0 += 16) {
        int p = 0;
        if (j0 + 16 <= nr) {
            for (; p + 16 <= kc; p += 16) {
                __m512 r[16], t[16];
                for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(B + (j0 + i) * csb + p);
                for (int i = 0; i < 16; i += 2) {        /* rows paired, as in AVX2's */
                    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
                    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
                }
                for (int i = 0; i < 16; i += 4)
                    for (int h = 0; h < 2; h++) {
                        r[i + h] = _mm512_shuffle_ps(t[i + h], t[i + h + 2], 0x44);
                        r[i + h + 2] = _mm512_shuffle_ps(t[i + h], t[i + h + 2], 0xEE);
                    }
                /* r[4g + order[c]]: column c + 4L of rows 4g..4g+3 in 128-bit
                 * lane L; gather lane L of the four groups into one row */
                for (int c = 0; c < 4; c++) {
                    int o = order[c];
                    __m512 ta = _mm512_shuffle_f32x4(r[o], r[4 + o], 0x88);
                    __m512 tb = _mm512_shuffle_f32x4(r[o], r[4 + o], 0xDD);
                    __m512 tc = _mm512_shuffle_f32x4(r[8 + o], r[12 + o], 0x88);
                    __m512 td = _mm512_shuffle_f32x4(r[8 + o], r[12 + o], 0xDD);
                    float *d = dst + (size_t)(p + c) * NR + j0;
                    _mm512_storeu_ps(d, _mm512_shuffle_f32x4(ta, tc, 0x88));
                    _mm512_storeu_ps(d + 4 * NR, _mm512_shuffle_f32x4(tb, td, 0x88));
                    _mm512_storeu_ps(d + 8 * NR, _mm512_shuffle_f32x4(ta, tc, 0xDD));
                    _mm512_storeu_ps(d + 12 * NR, _mm512_shuffle_f32x4(tb, td, 0xDD));
                }
            }
        }
        packbt_rest(dst, B, csb, nr, NR, j0, 16, p, kc);
    }
}
#endif

/* ------------------------------------------------------------------------ */
/* Packing. A general (row stride, column stride) view lets one GEMM serve   */
/* X.W, dY.W^T and X^T.dY: the transposes are absorbed here, at O(n^2) cost. */
/* ------------------------------------------------------------------------ */

/* n floats: a copy of a tile's width (known size) is inlined, not a call to
 * memcpy for every 24 or 64 bytes of a packed panel */
FO_INLINE void copy_floats(float *d, const float *src, int n) {
    switch (n) {
    case 4: memcpy(d, src, 4 * sizeof(float)); break;
    case 6: memcpy(d, src, 6 * sizeof(float)); break;
    case 12: memcpy(d, src, 12 * sizeof(float)); break;
    case 16: memcpy(d, src, 16 * sizeof(float)); break;
    case 32: memcpy(d, src, 32 * sizeof(float)); break;
    case 64: memcpy(d, src, 64 * sizeof(float)); break;
    default: memcpy(d, src, (size_t)n * sizeof(float));
    }
}

/* A micro-panel: rows [0, mr) x k [0, kc) of A  ->  dst[p*MR + r], zero padded */
FO_INLINE void pack_a(float *dst, const float *A, ptrdiff_t rsa, ptrdiff_t csa,
                   int mr, int kc, int MR) {
    if (rsa == 1) { /* A^T case: each k step reads mr contiguous floats */
        for (int p = 0; p < kc; p++) {
            float *d = dst + p * MR;
            copy_floats(d, A + p * csa, mr);
            for (int r = mr; r < MR; r++) d[r] = 0.0f;
        }
    } else { /* row-major A: read each row along k, write with stride MR */
        for (int r = 0; r < MR; r++) {
            float *d = dst + r;
            if (r < mr) {
                const float *src = A + r * rsa;
                for (int p = 0; p < kc; p++) d[p * MR] = src[p * csa];
            } else {
                for (int p = 0; p < kc; p++) d[p * MR] = 0.0f;
            }
        }
    }
}

/* B micro-panel: k [0, kc) x columns [0, nr) of B  ->  dst[p*NR + j], zero padded */
FO_INLINE void pack_b(float *dst, const float *B, ptrdiff_t rsb, ptrdiff_t csb,
                   int nr, int kc, int NR) {
    if (csb == 1) { /* row-major B: copy nr contiguous floats per k step */
        for (int p = 0; p < kc; p++) {
            const float *src = B + p * rsb;
            float *d = dst + p * NR;
            copy_floats(d, src, nr);
            for (int j = nr; j < NR; j++) d[j] = 0.0f;
        }
    } else { /* B = W^T: read W's rows contiguously, scatter with stride NR */
        for (int j = 0; j < NR; j++) {
            float *d = dst + j;
            if (j < nr) {
                const float *src = B + j * csb;
                for (int p = 0; p < kc; p++) d[p * NR] = src[p * rsb];
            } else {
                for (int p = 0; p < kc; p++) d[p * NR] = 0.0f;
            }
        }
    }
}

/* A block of mc rows of A^T (rsa = 1: X^T, each k step a row of X) into
 * ceil(mc / MR) micro-panels of kc steps, one row of X after another:
 * read in order, not a few floats from each of kc rows per panel, which
 * waits on the cache at every row. */
FO_INLINE void pack_at_block(float *dst, const float *A, ptrdiff_t csa, int mc, int kc, int MR) {
    int mp = ceil_div(mc, MR);
    for (int p = 0; p < kc; p++) {
        const float *src = A + p * csa;
        for (int ip = 0; ip < mp; ip++) {
            float *d = dst + ((size_t)ip * kc + p) * MR;
            int mr = imin(MR, mc - ip * MR);
            copy_floats(d, src + ip * MR, mr);
            for (int r = mr; r < MR; r++) d[r] = 0.0f;
        }
    }
}

/* per-ISA copies of these (their copies in the ISA's widest moves); B = W^T
 * (rsb = 1) goes to packbt, blocks transposed in registers */
#define DEFINE_PACK(SUFFIX, TARGET)                                                          \
    TARGET static void pack_a##SUFFIX(float *dst, const float *A, ptrdiff_t rsa,             \
                                      ptrdiff_t csa, int mr, int kc, int MR) {               \
        pack_a(dst, A, rsa, csa, mr, kc, MR); }                                              \
    TARGET static void pack_b##SUFFIX(float *dst, const float *B, ptrdiff_t rsb,             \
                                      ptrdiff_t csb, int nr, int kc, int NR) {               \
        if (rsb == 1 && csb != 1) packbt##SUFFIX(dst, B, csb, nr, kc, NR);                   \
        else pack_b(dst, B, rsb, csb, nr, kc, NR); }                                         \
    TARGET static void pack_at##SUFFIX(float *dst, const float *A, ptrdiff_t csa, int mc,     \
                                       int kc, int MR) {                                     \
        pack_at_block(dst, A, csa, mc, kc, MR); }
DEFINE_PACK(_generic, )
#if FO_X86
DEFINE_PACK(_avx512, __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))))
DEFINE_PACK(_avx2, __attribute__((target("avx2,fma"))))
#endif

static const kern_t KERN_GENERIC = {"generic", GEN_MR, GEN_NR, ukern_generic, pack_a_generic,
                                    pack_b_generic, pack_at_generic};
#if FO_X86
static const kern_t KERN_AVX512 = {"avx512", A512_MR, A512_NR, ukern_512_12x2, pack_a_avx512,
                                   pack_b_avx512, pack_at_avx512};
static const kern_t KERN_W512 = {"avx512", W512_MR, W512_NR, ukern_512_6x4, pack_a_avx512,
                                 pack_b_avx512, pack_at_avx512};
static const kern_t KERN_AVX2 = {"avx2", A256_MR, A256_NR, ukern_avx2, pack_a_avx2, pack_b_avx2,
                                 pack_at_avx2};
#endif
static const kern_t *g_kern = NULL; /* chosen on first use */
static int g_amx = -1; /* products on AMX (below): 0 no, 1 where it pays, 2 all (tests), -1 not chosen yet */
#if FO_X86
static int amx_usable(void);
#endif

static const kern_t *best_kern(void) {
#if FO_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return &KERN_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &KERN_AVX2;
#endif
    return &KERN_GENERIC;
}
static const kern_t *kern(void) {
    if (!g_kern) g_kern = best_kern(); /* benign race: every thread writes the same */
    return g_kern;
}
static int use_amx(void) {
#if FO_X86
    if (g_amx < 0) g_amx = kern() == &KERN_AVX512 && amx_usable();
#else
    g_amx = 0;
#endif
    return g_amx;
}
const char *fo_isa(void) { return use_amx() ? "amx" : kern()->name; }

/* the micro-kernel that reads a row-major A in place, where this ISA has one */
typedef void (*rows_fn_t)(int kc, const float *a, ptrdiff_t lda, const float *b, float *c,
                          ptrdiff_t ldc, int mr, int nr, int load_c, const float *bias);
static rows_fn_t rows_kern(const kern_t *kn) {
#if FO_X86
    if (kn == &KERN_AVX512) return ukern_512_12x2_rows;
    if (kn == &KERN_W512) return ukern_512_6x4_rows;
    if (kn == &KERN_AVX2) return ukern_avx2_rows;
#endif
    (void)kn;
    return NULL;
}

/* the micro-kernel that reads A^T (X^T: rsa = 1) in place, where this ISA has one */
static rows_fn_t cols_kern(const kern_t *kn) {
#if FO_X86
    if (kn == &KERN_AVX512) return ukern_512_12x2_cols;
#endif
    (void)kn;
    return NULL;
}

/* the blocked GEMM's tile for this ISA and N columns: on AVX-512 the wide
 * one, unless its last panel wastes more columns (N = 260: 320, not 288) */
static const kern_t *blocked_kern(const kern_t *kn, int N) {
#if FO_X86
    if (kn == &KERN_AVX512 && ceil_div(N, W512_NR) * W512_NR <= ceil_div(N, A512_NR) * A512_NR)
        return &KERN_W512;
#endif
    (void)N;
    return kn;
}

/* Force a kernel ("amx", "avx512", "avx2", "generic", or "auto"): used by the
 * tests to check every path this CPU can run. Returns 0, or -1 if not
 * supported. ("amx": AVX-512, and every product that can on AMX; "auto"
 * puts only the larger ones there.) */
int fo_set_isa(const char *name) {
    const kern_t *kn = NULL;
    int amx = 0;
    if (!strcmp(name, "auto")) kn = best_kern(), amx = -1;
    if (!strcmp(name, "generic")) kn = &KERN_GENERIC;
#if FO_X86
    __builtin_cpu_init();
    if (!strcmp(name, "amx") && amx_usable()) kn = &KERN_AVX512, amx = 2;
    if (!strcmp(name, "avx512") && __builtin_cpu_supports("avx512f")) kn = &KERN_AVX512;
    if (!strcmp(name, "avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        kn = &KERN_AVX2;
#endif
    if (!kn) return -1;
    g_kern = kn, g_amx = amx;
    return 0;
}

/* The FMA peak of this ISA's vectors, measured rather than assumed (how many
 * FMA units, how wide, at what clock differ from CPU to CPU: AMD's Zen 4
 * runs a 512-bit FMA as two 256-bit halves): on every thread, 12 independent
 * chains of fused multiply-adds in registers (enough to keep two units busy
 * through their latency), `steps` long. Returns the flops done; bench.py
 * times the call. */
#define PEAK_CHAINS 12
#define DEFINE_PEAK(SUFFIX, TARGET, V, SET1, FMA)                                     \
    TARGET static double fma_chains##SUFFIX(long steps, float *sink) {                \
        V a[PEAK_CHAINS], b = SET1(0.999999f), c = SET1(1e-7f);                       \
        for (int i = 0; i < PEAK_CHAINS; i++) a[i] = SET1((float)i);                  \
        for (long t = 0; t < steps; t++)                                              \
            for (int i = 0; i < PEAK_CHAINS; i++) a[i] = FMA(a[i], b, c);             \
        float s = 0.0f, lane0; /* every chain feeds the sink, or it is dead code */   \
        for (int i = 0; i < PEAK_CHAINS; i++) {                                       \
            memcpy(&lane0, &a[i], sizeof lane0);                                      \
            s += lane0;                                                               \
        }                                                                             \
        *sink = s;                                                                    \
        return 2.0 * PEAK_CHAINS * (sizeof(V) / sizeof(float)) * (double)steps;      \
    }
typedef struct { float x[8]; } gen_vec; /* 12 of them fit NEON's 32 registers */
static gen_vec gen_set1(float v) { gen_vec r; for (int j = 0; j < 8; j++) r.x[j] = v; return r; }
static gen_vec gen_fma(gen_vec a, gen_vec b, gen_vec c) {
    for (int j = 0; j < 8; j++) a.x[j] = a.x[j] * b.x[j] + c.x[j];
    return a;
}
DEFINE_PEAK(_generic, , gen_vec, gen_set1, gen_fma)
#if FO_X86
DEFINE_PEAK(_avx512, __attribute__((target("avx512f"))), __m512, _mm512_set1_ps, _mm512_fmadd_ps)
DEFINE_PEAK(_avx2, __attribute__((target("avx2,fma"))), __m256, _mm256_set1_ps, _mm256_fmadd_ps)
#endif

static volatile float g_peak_sink; /* keeps the chains from being optimised away */

double fo_fma_peak(long steps) {
    const kern_t *kn = kern();
    double flops = 0.0;
    float sink = 0.0f;
#ifdef _OPENMP
#pragma omp parallel num_threads(fo_nthreads()) reduction(+ : flops, sink)
#endif
    {
        float s;
#if FO_X86
        if (kn == &KERN_AVX512) flops += fma_chains_avx512(steps, &s);
        else if (kn == &KERN_AVX2) flops += fma_chains_avx2(steps, &s);
        else
#endif
            flops += fma_chains_generic(steps, &s);
        sink += s;
    }
    g_peak_sink = sink;
    (void)kn;
    return flops;
}

/* Ask the caches for n floats from p, a cache line at a time, before they
 * are read (or written): rows that lie a page or more apart, which the
 * hardware prefetchers do not follow from one to the next. */
FO_INLINE void prefetch_row(const float *p, int n, int for_write) {
#if defined(__GNUC__) || defined(__clang__)
    for (int c = 0; c < n; c += 16) { /* one cache line */
        if (for_write) __builtin_prefetch(p + c, 1, 3);
        else __builtin_prefetch(p + c, 0, 3);
    }
#else
    (void)p, (void)n, (void)for_write;
#endif
}

/* C's tile (mr rows of nr), asked for before the micro-kernel sums it: an
 * activation or gradient just allocated is cold, and the tile's stores at
 * the kernel's end waited on memory (a training step's products, not those
 * timed alone, whose C stays in the caches from one call to the next) */
FO_INLINE void prefetch_tile(float *c, ptrdiff_t ldc, int mr, int nr) {
    for (int r = 0; r < mr; r++) prefetch_row(c + r * ldc, nr, 1);
}

/* ------------------------------------------------------------------------ */
/* GEMM:  C[M,N] = A[M,K] . B[K,N]  (+ C if accumulate) (+ bias[N] if bias)  */
/* with A[i,p] = A[i*rsa + p*csa] and B[p,j] = B[p*rsb + j*csb].             */
/*                                                                           */
/* Blocking (BLIS-like): K in blocks of kc, N in blocks of nc. A kc x nc     */
/* block of B is packed once, shared by all threads (it sits in L2); each    */
/* thread then takes (MR-row panel, column chunk) tasks, its own run of rows */
/* first (next_task), packs the MR x kc panel of A (stays in L1; or reads it */
/* in place) and sweeps the micro-kernel over the chunk.                     */
/* ------------------------------------------------------------------------ */
#ifndef KC_MAX
#define KC_MAX 384
#endif
#define B_BLOCK_FLOATS (160 * 1024) /* packed B block: 640 KB, fits L2 */

/* gemm_blocked's tasks go out as the element-wise kernels split rows (OpenMP's
 * static schedule): thread t first takes its own run, tasks [t n / nt, (t + 1)
 * n / nt), the rows it most likely wrote in the op before, from its own cache;
 * then it helps the others, from the front of their runs, so that a slower
 * core is not waited for. head[t * 16]: the next task of run t (one counter
 * per cache line), for up to MAX_RUNS threads (16 KB of stack). -> the next
 * task for thread t, or -1: none left. */
static void start_run(int *head, int n, int t, int nt) { head[t * 16] = (int)((long)n * t / nt); }
static int next_task(int *head, int n, int t, int nt) {
    for (int u = 0; u < nt; u++) {
        int v = (t + u) % nt, end = (int)((long)n * (v + 1) / nt), k;
#ifdef _OPENMP
#pragma omp atomic read
#endif
        k = head[v * 16];
        if (k >= end) continue; /* run v is done */
#ifdef _OPENMP
#pragma omp atomic capture
#endif
        k = head[v * 16]++;
        if (k < end) return k;
    }
    return -1;
}

static void gemm_blocked(const kern_t *kn, int M, int N, int K,
                         const float *A, ptrdiff_t rsa, ptrdiff_t csa,
                         const float *B, ptrdiff_t rsb, ptrdiff_t csb,
                         float *C, ptrdiff_t ldc, int accumulate, const float *bias,
                         int parallel) {
    const int MR = kn->mr, NR = kn->nr;
    /* equal-sized k blocks, so no tiny leftover block */
    int nkb = ceil_div(K, KC_MAX);
    int KC = ceil_div(K, nkb);
    int ncmax = imax(NR, (B_BLOCK_FLOATS / KC) / NR * NR);
    int nnb = ceil_div(N, ncmax);
    int NC = ceil_div(ceil_div(N, nnb), NR) * NR;

    float *bpack = fo_alloc((size_t)KC * NC);
    int nthreads = parallel ? fo_nthreads() : 1;
    int head[16 * MAX_RUNS];
    if (!bpack) return; /* out of memory: recorded by fo_alloc */

    int mpanels = ceil_div(M, MR);
    rows_fn_t rows_fn = csa == 1 ? rows_kern(kn) : NULL;  /* row-major A: read in place */
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        float *apack = fo_alloc((size_t)MR * KC);
        int nt = fo_team(), tid = fo_tid();
        for (int jc = 0; jc < N; jc += NC) {
            int nc = imin(NC, N - jc);
            int npanels = ceil_div(nc, NR);
            /* Split columns into chunks so that small-M problems still give
             * every thread work; each chunk is >= 4 panels when possible. */
            int nchunks = 1;
            while (mpanels * nchunks < 4 * nthreads && npanels / (nchunks * 2) >= 2)
                nchunks *= 2;
            int pchunk = ceil_div(npanels, nchunks);
            for (int pc = 0; pc < K; pc += KC) {
                int kc = imin(KC, K - pc);
                int first = (pc == 0), ntasks = mpanels * nchunks;
                start_run(head, ntasks, tid, nt); /* (seen after the barrier below) */
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
                for (int jp = 0; jp < npanels; jp++) {
                    int j = jp * NR;
                    kn->pack_b(bpack + (size_t)jp * NR * kc, B + pc * rsb + (jc + j) * csb,
                           rsb, csb, imin(NR, nc - j), kc, NR);
                }
                /* (implicit barrier: B block packed) */
                for (int task; (task = next_task(head, ntasks, tid, nt)) >= 0;) {
                    int ip = task / nchunks, ch = task % nchunks;
                    int i = ip * MR, mr = imin(MR, M - i);
                    int jp0 = ch * pchunk, jp1 = imin(npanels, jp0 + pchunk);
                    if (jp0 >= jp1 || !apack) continue;
                    if (rows_fn) {
                        /* meanwhile this thread's likely next panel of A (next in its run),
                         * a few rows per tile: its rows may come from memory (an activation
                         * just written), a row apart, each read by broadcasts */
                        int next = (ip + 1) * MR, per = ceil_div(MR, jp1 - jp0);
                        for (int jp = jp0; jp < jp1; jp++) {
                            int j = jp * NR;
                            for (int r = (jp - jp0) * per; ch == 0 && r < imin(MR, (jp - jp0 + 1) * per)
                                                           && next + r < M; r++)
                                prefetch_row(A + (next + r) * rsa + pc, kc, 0);
                            prefetch_tile(C + i * ldc + jc + j, ldc, mr, imin(NR, nc - j));
                            rows_fn(kc, A + i * rsa + pc, rsa, bpack + (size_t)jp * NR * kc,
                                    C + i * ldc + jc + j, ldc, mr, imin(NR, nc - j),
                                    accumulate || !first, (first && bias) ? bias + jc + j : NULL);
                        }
                        continue;
                    }
                    kn->pack_a(apack, A + i * rsa + pc * csa, rsa, csa, mr, kc, MR);
                    for (int jp = jp0; jp < jp1; jp++) {
                        int j = jp * NR;
                        prefetch_tile(C + i * ldc + jc + j, ldc, mr, imin(NR, nc - j));
                        kn->fn(kc, apack, bpack + (size_t)jp * NR * kc,
                               C + i * ldc + jc + j, ldc, mr, imin(NR, nc - j),
                               accumulate || !first, (first && bias) ? bias + jc + j : NULL);
                    }
                }
#ifdef _OPENMP
#pragma omp barrier /* before the B block is overwritten */
#endif
            }
        }
        fo_free(apack);
    }
    fo_free(bpack);
}

/* ------------------------------------------------------------------------ */
/* Small M (generation: one row per sequence): C[M,N] (+)= A[M,K] . B[K,N]   */
/* with B row-major (csb = 1), read in place. Packing B would copy the whole */
/* weight matrix to use each element M times; here each element is loaded   */
/* once per group of up to SM_R rows and goes straight into FMAs. A (small)  */
/* is packed transposed: at[k*MP + i], zero rows up to MP. Threads split the */
/* columns; each sweeps strips of SM_NR columns over k blocks of SM_KB rows  */
/* (the A block stays in L1), and prefetches the next strip's rows while it  */
/* computes this one's, so the strided walk down the weight matrix does not  */
/* wait on memory.                                                           */
/* ------------------------------------------------------------------------ */
#ifndef SM_MAX_M
#define SM_MAX_M 16
#endif
#ifndef SM_KB
#define SM_KB 32
#endif

typedef void (*smk_fn)(int kc, const float *at, int MP, const float *b, ptrdiff_t rsb,
                       int pf, float *c, ptrdiff_t ldc, int mr, int nr, int load_c,
                       const float *bias);

/* portable: R rows x 16 columns, plain loops the compiler vectorises */
#define SM_GEN_NR 16
#define SM_DEF_GENERIC(R)                                                                  \
    static void smk_gen_##R(int kc, const float *at, int MP, const float *b, ptrdiff_t rsb, \
                            int pf, float *c, ptrdiff_t ldc, int mr, int nr, int load_c,   \
                            const float *bias) {                                           \
        float acc[R][SM_GEN_NR];                                                           \
        float bt[SM_GEN_NR];                                                               \
        (void)pf;                                                                          \
        for (int r = 0; r < R; r++)                                                        \
            for (int j = 0; j < SM_GEN_NR; j++) acc[r][j] = 0.0f;                          \
        for (int p = 0; p < kc; p++) {                                                     \
            const float *bp = b + p * rsb;                                                 \
            if (nr == SM_GEN_NR)                                                           \
                for (int j = 0; j < SM_GEN_NR; j++) bt[j] = bp[j];                         \
            else                                                                           \
                for (int j = 0; j < SM_GEN_NR; j++) bt[j] = j < nr ? bp[j] : 0.0f;         \
            for (int r = 0; r < R; r++) {                                                  \
                float ar = at[p * MP + r];                                                 \
                for (int j = 0; j < SM_GEN_NR; j++) acc[r][j] += ar * bt[j];               \
            }                                                                              \
        }                                                                                  \
        for (int r = 0; r < mr; r++) {                                                     \
            float *cr = c + r * ldc;                                                       \
            for (int j = 0; j < nr; j++) {                                                 \
                float v = acc[r][j];                                                       \
                if (load_c) v += cr[j];                                                    \
                if (bias) v += bias[j];                                                    \
                cr[j] = v;                                                                 \
            }                                                                              \
        }                                                                                  \
    }
SM_DEF_GENERIC(1)
SM_DEF_GENERIC(2)
SM_DEF_GENERIC(4)

#if FO_X86
/* AVX-512: R rows x 48 columns (3 zmm per row). Per k step: 3 loads of B,
 * R broadcasts, 3R FMAs: for 8 rows 24 accumulators. gcc keeps them in
 * registers only as named vectors in a loop whose loads it can see through:
 * with masked loads for the right edge (their pointer might, to it, reach
 * them) it kept them on the stack and stored them at every k step. So the
 * loop has plain loads only, and the right edge reads its rows from a
 * zero-padded copy (never past a row of B). */
#define SM512_NR 48
#define SMK_512_LOOP(R)                                                                    \
    for (int p = 0; p < kc; p++) {                                                         \
        const float *bp = b + p * rsb;                                                     \
        if (pf) {                                                                          \
            _mm_prefetch((const char *)(bp + SM_KB * rsb), _MM_HINT_T1);                   \
            _mm_prefetch((const char *)(bp + SM_KB * rsb + 16), _MM_HINT_T1);              \
            _mm_prefetch((const char *)(bp + SM_KB * rsb + 32), _MM_HINT_T1);              \
        }                                                                                  \
        __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);                    \
        __m512 b2 = _mm512_loadu_ps(bp + 32);                                              \
        const float *ap = at + (size_t)p * MP; /* constant offsets: no index arithmetic */ \
        for (int r = 0; r < R; r++) {                                                      \
            __m512 ar = _mm512_set1_ps(ap[r]);                                             \
            if (R <= 2 && (p & 1)) { /* odd k apart: 6R chains of FMAs, not 3R */          \
                acc3[r] = _mm512_fmadd_ps(ar, b0, acc3[r]);                                \
                acc4[r] = _mm512_fmadd_ps(ar, b1, acc4[r]);                                \
                acc5[r] = _mm512_fmadd_ps(ar, b2, acc5[r]);                                \
            } else {                                                                       \
                acc0[r] = _mm512_fmadd_ps(ar, b0, acc0[r]);                                \
                acc1[r] = _mm512_fmadd_ps(ar, b1, acc1[r]);                                \
                acc2[r] = _mm512_fmadd_ps(ar, b2, acc2[r]);                                \
            }                                                                              \
        }                                                                                  \
    }
#define SM_DEF_AVX512(R)                                                                   \
    __attribute__((target("avx512f"))) static void smk_512_##R(                            \
        int kc, const float *at, int MP, const float *b, ptrdiff_t rsb, int pf, float *c,  \
        ptrdiff_t ldc, int mr, int nr, int load_c, const float *bias) {                    \
        __m512 acc0[R], acc1[R], acc2[R], acc3[R], acc4[R], acc5[R];                       \
        for (int r = 0; r < R; r++)                                                        \
            acc0[r] = acc1[r] = acc2[r] = acc3[r] = acc4[r] = acc5[r] = _mm512_setzero_ps(); \
        __mmask16 m0 = LANE_MASK16(nr), m1 = LANE_MASK16(nr - 16), m2 = LANE_MASK16(nr - 32); \
        float edge[SM_KB * SM512_NR]; /* the right edge's rows, zero-padded */             \
        if (nr < SM512_NR) {                                                               \
            for (int p = 0; p < kc; p++)                                                   \
                for (int j = 0; j < SM512_NR; j++) edge[p * SM512_NR + j] = j < nr ? b[p * rsb + j] : 0.0f; \
            b = edge, rsb = SM512_NR, pf = 0;                                              \
        }                                                                                  \
        SMK_512_LOOP(R)                                                                    \
        for (int r = 0; r < R && R <= 2; r++) {                                            \
            acc0[r] = _mm512_add_ps(acc0[r], acc3[r]);                                     \
            acc1[r] = _mm512_add_ps(acc1[r], acc4[r]);                                     \
            acc2[r] = _mm512_add_ps(acc2[r], acc5[r]);                                     \
        }                                                                                  \
        __m512 bias0 = _mm512_setzero_ps(), bias1 = bias0, bias2 = bias0;                  \
        if (bias) {                                                                        \
            bias0 = _mm512_maskz_loadu_ps(m0, bias);                                       \
            bias1 = _mm512_maskz_loadu_ps(m1, bias + 16);                                  \
            bias2 = _mm512_maskz_loadu_ps(m2, bias + 32);                                  \
        }                                                                                  \
        for (int r = 0; r < mr; r++) {                                                     \
            float *cr = c + r * ldc;                                                       \
            __m512 v0 = _mm512_add_ps(acc0[r], bias0), v1 = _mm512_add_ps(acc1[r], bias1); \
            __m512 v2 = _mm512_add_ps(acc2[r], bias2);                                     \
            if (load_c) {                                                                  \
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cr));                     \
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cr + 16));                \
                v2 = _mm512_add_ps(v2, _mm512_maskz_loadu_ps(m2, cr + 32));                \
            }                                                                              \
            _mm512_mask_storeu_ps(cr, m0, v0);                                             \
            _mm512_mask_storeu_ps(cr + 16, m1, v1);                                        \
            _mm512_mask_storeu_ps(cr + 32, m2, v2);                                        \
        }                                                                                  \
    }
SM_DEF_AVX512(1)
SM_DEF_AVX512(2)
SM_DEF_AVX512(4)
SM_DEF_AVX512(8)

/* AVX2: R rows x 16 columns (2 ymm per row) */
#define SM256_NR 16
#define SMK_256_LOOP(R, LOAD0, LOAD1)   /* as SMK_512_LOOP */                              \
    for (int p = 0; p < kc; p++) {                                                         \
        const float *bp = b + p * rsb;                                                     \
        if (pf) _mm_prefetch((const char *)(bp + SM256_NR), _MM_HINT_T0);                  \
        __m256 b0 = LOAD0, b1 = LOAD1;                                                     \
        const float *ap = at + (size_t)p * MP;                                             \
        for (int r = 0; r < R; r++) {                                                      \
            __m256 ar = _mm256_set1_ps(ap[r]);                                             \
            acc0[r] = _mm256_fmadd_ps(ar, b0, acc0[r]);                                    \
            acc1[r] = _mm256_fmadd_ps(ar, b1, acc1[r]);                                    \
        }                                                                                  \
    }
#define SM_DEF_AVX2(R)                                                                     \
    __attribute__((target("avx2,fma"))) static void smk_256_##R(                           \
        int kc, const float *at, int MP, const float *b, ptrdiff_t rsb, int pf, float *c,  \
        ptrdiff_t ldc, int mr, int nr, int load_c, const float *bias) {                    \
        __m256 acc0[R], acc1[R];                                                           \
        for (int r = 0; r < R; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();               \
        __m256i nrv = _mm256_set1_epi32(nr);                                               \
        __m256i m0 = _mm256_cmpgt_epi32(nrv, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));   \
        __m256i m1 = _mm256_cmpgt_epi32(nrv, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)); \
        if (nr == SM256_NR)                                                                \
            SMK_256_LOOP(R, _mm256_loadu_ps(bp), _mm256_loadu_ps(bp + 8))                  \
        else                                                                               \
            SMK_256_LOOP(R, _mm256_maskload_ps(bp, m0), _mm256_maskload_ps(bp + 8, m1))    \
        store_rows_256(acc0, acc1, c, ldc, mr, nr, load_c, bias);                          \
    }
SM_DEF_AVX2(1)
SM_DEF_AVX2(2)
SM_DEF_AVX2(4)
#endif /* FO_X86 */

/* The kernels for this ISA: nr columns per strip, kernels for 1, 2, 4 (and
 * 8) rows; a group of rows takes the smallest kernel that holds it. */
typedef struct {
    int nr, rmax;
    smk_fn k1, k2, k4, k8;
} smk_set;

static smk_set smk_pick(const kern_t *kn) {
    smk_set s = {SM_GEN_NR, 4, smk_gen_1, smk_gen_2, smk_gen_4, NULL};
#if FO_X86
    if (kn == &KERN_AVX512) { smk_set a = {SM512_NR, 8, smk_512_1, smk_512_2, smk_512_4, smk_512_8}; s = a; }
    if (kn == &KERN_AVX2) { smk_set a = {SM256_NR, 4, smk_256_1, smk_256_2, smk_256_4, NULL}; s = a; }
#else
    (void)kn;
#endif
    return s;
}

/* A group of mr rows takes the kernel for 1, 2, 4 or R rows, and it reads that many */
static int smk_rows(int mr, int R) { return mr <= 2 ? mr : mr <= 4 ? 4 : R; }

static void gemm_small_m(const kern_t *kn, int M, int N, int K,
                         const float *A, ptrdiff_t rsa, ptrdiff_t csa,
                         const float *B, ptrdiff_t rsb, float *C, ptrdiff_t ldc,
                         int accumulate, const float *bias, int parallel) {
    smk_set ks = smk_pick(kn);
    const int NR = ks.nr, R = ks.rmax, last = (M - 1) / R * R;
    const int MP = last + smk_rows(M - last, R); /* the rows the kernels read */
    float *at = fo_alloc((size_t)K * MP);
    if (!at) return; /* out of memory: recorded by fo_alloc */
    for (int p = 0; p < K; p++)
        for (int i = 0; i < MP; i++) at[(size_t)p * MP + i] = i < M ? A[i * rsa + p * csa] : 0.0f;
    int nstrips = ceil_div(N, NR);
    int nthreads = parallel ? imin(fo_nthreads(), nstrips) : 1;
    OMP_ONLY(nthreads);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        int nt = fo_team(), tid = fo_tid();
        int s0 = (int)((long)nstrips * tid / nt), s1 = (int)((long)nstrips * (tid + 1) / nt);
        for (int pc = 0; pc < K; pc += SM_KB) {
            int kc = imin(SM_KB, K - pc);
            for (int s = s0; s < s1; s++) {
                int j = s * NR, nr = imin(NR, N - j);
                int pf = 1; /* prefetch this strip's rows of the next k block (into L2) */
                for (int i = 0; i < M; i += R) {
                    int mr = imin(R, M - i);
                    int kr = smk_rows(mr, R);
                    smk_fn f = kr == 1 ? ks.k1 : kr == 2 ? ks.k2 : kr == 4 ? ks.k4 : ks.k8;
                    f(kc, at + (size_t)pc * MP + i, MP, B + (size_t)pc * rsb + j, rsb,
                      pf && i == 0, C + (size_t)i * ldc + j, ldc, mr, nr,
                      accumulate || pc > 0, (pc == 0 && bias) ? bias + j : NULL);
                }
            }
        }
    }
    fo_free(at);
}

/* A block of results computed apart, into C: C[i, j0 + jj] = (C's value if
 * accumulating) + out[i * si + jj * sj] + bias[j0 + jj], i < rows, jj < nj */
static void put_block(float *C, ptrdiff_t ldc, int rows, int j0, int nj, const float *out,
                      int si, int sj, int accumulate, const float *bias) {
    for (int i = 0; i < rows; i++) {
        float *c = C + (size_t)i * ldc + j0;
        for (int jj = 0; jj < nj; jj++)
            c[jj] = (accumulate ? c[jj] : 0.0f) + out[i * si + jj * sj] + (bias ? bias[j0 + jj] : 0.0f);
    }
}

#if FO_X86
/* Small M with B = W^T, W row-major [N, K] (the tied head's wte.T: rsb = 1):
 * C[i, j] = dot(A[i, :], W[j, :]), each row of W read once, contiguously,
 * for every group of 4 rows of A. A 4 x 4 block of dot products keeps 16
 * zmm accumulators; per 16 values of k: 4 loads of W, 4 of A, 16 FMAs. */
__attribute__((target("avx512f"))) static void smt_512(int K, const float *a, int Kp,
                                                       const float *w, ptrdiff_t ldw, int nj,
                                                       int pf, float *out) {
    __m512 acc[4][4];
    const float *wr[4];
    for (int jj = 0; jj < 4; jj++) {
        wr[jj] = w + (jj < nj ? jj : 0) * ldw; /* missing rows: repeat row 0, discarded */
        for (int ii = 0; ii < 4; ii++) acc[jj][ii] = _mm512_setzero_ps();
    }
    int p = 0;
    for (; p + 16 <= K; p += 16) {
        __m512 av[4];
        if (pf) /* the next 4 rows of W, while these are summed */
            for (int jj = 0; jj < 4; jj++) _mm_prefetch((const char *)(wr[jj] + 4 * ldw + p), _MM_HINT_T0);
        for (int ii = 0; ii < 4; ii++) av[ii] = _mm512_load_ps(a + (size_t)ii * Kp + p);
        for (int jj = 0; jj < 4; jj++) {
            __m512 wv = _mm512_loadu_ps(wr[jj] + p);
            for (int ii = 0; ii < 4; ii++) acc[jj][ii] = _mm512_fmadd_ps(wv, av[ii], acc[jj][ii]);
        }
    }
    if (p < K) { /* the tail: W masked (never past its row), A zero padded */
        __mmask16 m = (__mmask16)((1u << (K - p)) - 1);
        __m512 av[4];
        for (int ii = 0; ii < 4; ii++) av[ii] = _mm512_load_ps(a + (size_t)ii * Kp + p);
        for (int jj = 0; jj < 4; jj++) {
            __m512 wv = _mm512_maskz_loadu_ps(m, wr[jj] + p);
            for (int ii = 0; ii < 4; ii++) acc[jj][ii] = _mm512_fmadd_ps(wv, av[ii], acc[jj][ii]);
        }
    }
    for (int jj = 0; jj < 4; jj++)
        for (int ii = 0; ii < 4; ii++) out[jj * 4 + ii] = _mm512_reduce_add_ps(acc[jj][ii]);
}

static void gemm_small_m_t(int M, int N, int K, const float *A, ptrdiff_t rsa, ptrdiff_t csa,
                           const float *W, ptrdiff_t ldw, float *C, ptrdiff_t ldc,
                           int accumulate, const float *bias, int parallel) {
    int Kp = ceil_div(K, 16) * 16, MP = ceil_div(M, 4) * 4;
    float *at = fo_alloc((size_t)MP * Kp); /* A's rows, zero padded to 4 x 16 */
    if (!at) return; /* out of memory: recorded by fo_alloc */
    for (int i = 0; i < MP; i++)
        for (int p = 0; p < Kp; p++)
            at[(size_t)i * Kp + p] = (i < M && p < K) ? A[i * rsa + p * csa] : 0.0f;
    long nblocks = ceil_div(N, 4);
    int nthreads = parallel ? fo_nthreads() : 1;
    OMP_ONLY(nthreads);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
#endif
    for (long jb = 0; jb < nblocks; jb++) {
        int j = (int)jb * 4, nj = imin(4, N - j);
        float out[16];
        for (int i0 = 0; i0 < M; i0 += 4) {
            smt_512(K, at + (size_t)i0 * Kp, Kp, W + (size_t)j * ldw, ldw, nj, i0 == 0 && jb + 1 < nblocks, out);
            put_block(C + (size_t)i0 * ldc, ldc, imin(4, M - i0), j, nj, out, 1, 4, accumulate, bias);
        }
    }
    fo_free(at);
}

/* The same product for 5 to 16 rows, as C^T = W . A^T: the batch is a
 * vector's 16 lanes. A^T is packed [K][16] (zero lanes past M); per k, one
 * load of it and 16 broadcasts of W[j, k] (16 rows of W, each read along k)
 * into 16 accumulators: no horizontal sums, and A^T streams from L2 once
 * per 16 rows. The next 16 rows are prefetched meanwhile, two lines a k. */
__attribute__((target("avx512f"))) static void smtc_512(int K, const float *at, const float *w,
                                                        ptrdiff_t ldw, const char *pf,
                                                        size_t pfbytes, float *out) {
    __m512 acc[16];
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    /* row r of W at base[r / 3] + (r % 3) rows: six pointers and one stride,
     * so that each broadcast is one addressing mode, no arithmetic */
    const char *base[6];
    ptrdiff_t X = ldw * (ptrdiff_t)sizeof(float);
    for (int q = 0; q < 6; q++) base[q] = (const char *)w + 3 * q * X;
    for (int p = 0; p < K; p++) {
        size_t l0 = (size_t)p * 64, l1 = ((size_t)p + K) * 64;
        if (l0 < pfbytes) _mm_prefetch(pf + l0, _MM_HINT_T1);
        if (l1 < pfbytes) _mm_prefetch(pf + l1, _MM_HINT_T1);
        __m512 a = _mm512_load_ps(at + (size_t)p * 16);
        for (int r = 0; r < 16; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(*(const float *)(base[r / 3] + (r % 3) * X)), a, acc[r]);
        for (int q = 0; q < 6; q++) base[q] += sizeof(float);
    }
    for (int r = 0; r < 16; r++) _mm512_store_ps(out + r * 16, acc[r]);
}

static void gemm_small_m_tc(int M, int N, int K, const float *A, ptrdiff_t rsa, ptrdiff_t csa,
                            const float *W, ptrdiff_t ldw, float *C, ptrdiff_t ldc,
                            int accumulate, const float *bias, int parallel) {
    float *at = fo_alloc((size_t)K * 32), *last = at + (size_t)K * 16; /* A^T, the last rows */
    if (!at) return;
    for (int p = 0; p < K; p++)
        for (int i = 0; i < 16; i++) at[(size_t)p * 16 + i] = i < M ? A[i * rsa + p * csa] : 0.0f;
    long nblocks = ceil_div(N, 16);
    int nthreads = parallel ? fo_nthreads() : 1;
    OMP_ONLY(nthreads);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
#endif
    for (long jb = 0; jb < nblocks; jb++) {
        int j = (int)jb * 16, nj = imin(16, N - j);
        float out[16 * 16] __attribute__((aligned(64)));
        int next = imin(16, N - j - nj); /* rows of the next block, prefetched meanwhile */
        const float *w = W + (size_t)j * ldw;
        ptrdiff_t lw = ldw;
        if (nj < 16) { /* the last rows (one thread's), copied with zero rows after them */
            for (int r = 0; r < 16; r++)
                for (int p = 0; p < K; p++) last[(size_t)r * K + p] = r < nj ? w[(size_t)r * ldw + p] : 0.0f;
            w = last, lw = K;
        }
        smtc_512(K, at, w, lw, (const char *)(W + (size_t)(j + nj) * ldw),
                 next > 0 ? (size_t)next * ldw * sizeof(float) : 0, out);
        put_block(C, ldc, M, j, nj, out, 1, 16, accumulate, bias);
    }
    fo_free(at);
}
#endif /* FO_X86 */

/* ------------------------------------------------------------------------ */
/* One row against a row-major B [K, N] of 2 MB or more (generation at      */
/* batch 1): each element of B is used once, so the product runs at the     */
/* speed memory delivers B, and the best way to read it is whole rows in    */
/* order, the hardware prefetcher's easiest case. The k range is cut into   */
/* chunks of STREAM_KC rows, each one contiguous block of B; a thread adds  */
/* its chunks' rows, 4 at a time, into one partial row per chunk, and the   */
/* partials are summed in chunk order: the same bits for any thread count.  */
/* (From 2 rows on the strip kernels above are faster.)                     */
/* ------------------------------------------------------------------------ */
#define STREAM_KC 128
#define STREAM_MIN (1 << 19) /* B's floats: 2 MB, past a core's L2 */

/* y (N) = a[0:kc] . B[0:kc, :], a with stride csa */
FO_INLINE void stream_chunk(int kc, int N, const float *a, ptrdiff_t csa, const float *B,
                            ptrdiff_t rsb, float *FO_RESTRICT y) {
    for (int j = 0; j < N; j++) y[j] = 0.0f;
    int p = 0;
    for (; p + 4 <= kc; p += 4) {
        const float *b0 = B + p * rsb, *b1 = b0 + rsb, *b2 = b1 + rsb, *b3 = b2 + rsb;
        float a0 = a[p * csa], a1 = a[(p + 1) * csa], a2 = a[(p + 2) * csa], a3 = a[(p + 3) * csa];
        for (int j = 0; j < N; j++) y[j] += a0 * b0[j] + a1 * b1[j] + a2 * b2[j] + a3 * b3[j];
    }
    for (; p < kc; p++) { /* the chunk's last 1-3 rows */
        float ap = a[p * csa];
        const float *bp = B + p * rsb;
        for (int j = 0; j < N; j++) y[j] += ap * bp[j];
    }
}
typedef void (*stream_fn)(int, int, const float *, ptrdiff_t, const float *, ptrdiff_t, float *);
#define DEFINE_STREAM(SUFFIX, TARGET)                                                      \
    TARGET static void stream##SUFFIX(int kc, int N, const float *a, ptrdiff_t csa,         \
                                      const float *B, ptrdiff_t rsb, float *y) {            \
        stream_chunk(kc, N, a, csa, B, rsb, y); }
DEFINE_STREAM(_generic, )
#if FO_X86
DEFINE_STREAM(_avx512, __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))))
DEFINE_STREAM(_avx2, __attribute__((target("avx2,fma"))))
#endif

/* C (1 x N) (+)= A (1 x K) . B + bias */
static void gemm_stream(const kern_t *kn, int N, int K, const float *A, ptrdiff_t csa,
                        const float *B, ptrdiff_t rsb, float *C, int accumulate, const float *bias) {
    stream_fn f = stream_generic;
#if FO_X86
    if (kn == &KERN_AVX512) f = stream_avx512;
    if (kn == &KERN_AVX2) f = stream_avx2;
#else
    (void)kn;
#endif
    int nch = ceil_div(K, STREAM_KC), nb = ceil_div(N, 64);
    float *part = fo_alloc((size_t)nch * N);
    if (!part) return; /* out of memory: recorded by fo_alloc */
#ifdef _OPENMP
#pragma omp parallel
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int c = 0; c < nch; c++) {
            int k0 = c * STREAM_KC;
            f(imin(STREAM_KC, K - k0), N, A + k0 * csa, csa, B + (size_t)k0 * rsb, rsb,
              part + (size_t)c * N);
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int jb = 0; jb < nb; jb++) { /* C = the partials' sum, in chunk order */
            int j0 = jb * 64, j1 = imin(N, j0 + 64);
            float s[64];
            for (int j = j0; j < j1; j++) s[j - j0] = part[j];
            for (int c = 1; c < nch; c++)
                for (int j = j0; j < j1; j++) s[j - j0] += part[(size_t)c * N + j];
            put_block(C, 0, 1, j0, j1 - j0, s, 0, 1, accumulate, bias);
        }
    }
    fo_free(part);
}

/* ------------------------------------------------------------------------ */
/* The weight gradients (X^T.dY): A is an activation read across its rows,  */
/* so it is packed (or, as X^T, read in place by a kernel for it), and B    */
/* (dY) is as large as A. gemm_blocked would copy B into one block that     */
/* both threads pack and read, half of it from the other core. Here threads */
/* split the columns (or, when C is taller than wide, the rows: a fixed     */
/* share each) instead: each packs its own B strips (kc x NR, read from L1) */
/* and A blocks (MC x kc, in its L2), the other side in full. Columns go    */
/* out a k block at a time, each thread's run of panels first, then it     */
/* helps the others (a fixed half each left the faster core waiting at the */
/* end of every call). The k blocks are gemm_blocked's, taken in order, so  */
/* every tile sums in the same order, whichever thread: the same bits.     */
/* ------------------------------------------------------------------------ */
#ifndef MC_COLS
#define MC_COLS 384
#endif

/* sum[0..nr) = (first ? 0 : sum) + rows 0..kc of a packed B strip, in order */
static void add_rows(float *sum, int first, const float *b, int kc, int nr, int NR) {
    float acc[64];
    for (int c = 0; c < nr; c++) acc[c] = first ? 0.0f : sum[c];
    for (int p = 0; p < kc; p++)
        for (int c = 0; c < nr; c++) acc[c] += b[p * NR + c];
    for (int c = 0; c < nr; c++) sum[c] = acc[c];
}

/* whether gemm_cols gives every thread at least two micro-panels */
static int cols_fit(const kern_t *kn, int M, int N, int nthreads) {
    return M > N ? ceil_div(M, kn->mr) >= 2 * nthreads : ceil_div(N, kn->nr) >= 2 * nthreads;
}

static void gemm_cols(const kern_t *kn, int M, int N, int K,
                      const float *A, ptrdiff_t rsa, ptrdiff_t csa,
                      const float *B, ptrdiff_t rsb, ptrdiff_t csb,
                      float *C, ptrdiff_t ldc, int accumulate, const float *bias, int nthreads,
                      float *colsum) {
    OMP_ONLY(nthreads);
    const int MR = kn->mr, NR = kn->nr;
    int KC = ceil_div(K, ceil_div(K, KC_MAX));
    int MC = imin(ceil_div(M, MR), ceil_div(MC_COLS, MR)) * MR;
    int npanels = ceil_div(N, NR);
    int split_m = M > N; /* split the wider side: each thread packs all of the other operand */
    int head[2][16 * MAX_RUNS]; /* split columns: a k block's runs of panels, two blocks in turn */
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        int nt = fo_team(), tid = fo_tid(), blk = 0;
        int m0 = 0, m1 = M;
        if (split_m) {
            int mpanels = ceil_div(M, MR);
            m0 = imin(M, (int)((long)mpanels * tid / nt) * MR);
            m1 = imin(M, (int)((long)mpanels * (tid + 1) / nt) * MR);
        } else { /* each thread its own run of panels first, then helps the others */
            start_run(head[0], npanels, tid, nt);
#ifdef _OPENMP
#pragma omp barrier
#endif
        }
        rows_fn_t cols_fn = rsa == 1 ? cols_kern(kn) : NULL; /* (then A's block: one ragged tile) */
        float *ablock = fo_alloc((size_t)(cols_fn ? MR : MC) * KC), *bstrip = fo_alloc((size_t)KC * NR);
        int ok = ablock && bstrip;
        for (int ic = m0; ic < m1; ic += MC) { /* (the same blocks in every thread: barriers) */
            int mc = imin(MC, m1 - ic), mp = ceil_div(mc, MR);
            int inplace = cols_fn ? mc / MR : 0; /* tiles of A^T read in place: the whole ones */
            for (int pc = 0; pc < K; pc += KC) {
                int kc = imin(KC, K - pc), first = (pc == 0);
                if (!ok) /* (no scratch: no work, but every barrier) */
                    ;
                else if (cols_fn) {
                    if (inplace < mp) /* (a ragged last one packed) */
                        kn->pack_a(ablock, A + ic + inplace * MR + pc * csa, 1, csa, mc - inplace * MR,
                                   kc, MR);
                } else if (rsa == 1)
                    kn->pack_at(ablock, A + ic + pc * csa, csa, mc, kc, MR);
                else
                    for (int ip = 0; ip < mp; ip++)
                        kn->pack_a(ablock + (size_t)ip * MR * kc,
                                   A + (ptrdiff_t)(ic + ip * MR) * rsa + pc * csa, rsa, csa,
                                   imin(MR, mc - ip * MR), kc, MR);
                int *run = head[blk & 1];
                for (int jp = split_m ? 0 : next_task(run, npanels, tid, nt); ok && jp >= 0 && jp < npanels;
                     jp = split_m ? jp + 1 : next_task(run, npanels, tid, nt)) {
                    int j = jp * NR, nr = imin(NR, N - j);
                    kn->pack_b(bstrip, B + pc * rsb + j * csb, rsb, csb, nr, kc, NR);
                    if (colsum && ic == 0) /* B's column sums, row after row as fo_colsum */
                        add_rows(colsum + j, first, bstrip, kc, nr, NR);
                    for (int ip = 0; ip < mp; ip++) {
                        int i = ic + ip * MR;
                        prefetch_tile(C + (ptrdiff_t)i * ldc + j, ldc, imin(MR, M - i), nr);
                        if (ip < inplace)
                            cols_fn(kc, A + i + pc * csa, csa, bstrip, C + (ptrdiff_t)i * ldc + j, ldc, MR,
                                    nr, accumulate || !first, (first && bias) ? bias + j : NULL);
                        else
                            kn->fn(kc, ablock + (size_t)(ip - inplace) * MR * kc, bstrip,
                                   C + (ptrdiff_t)i * ldc + j, ldc, imin(MR, M - i), nr,
                                   accumulate || !first, (first && bias) ? bias + j : NULL);
                    }
                }
                if (!split_m) { /* a panel's k blocks in order, whichever thread takes each */
                    start_run(head[++blk & 1], npanels, tid, nt);
#ifdef _OPENMP
#pragma omp barrier
#endif
                }
            }
        }
        fo_free(ablock);
        fo_free(bstrip);
    }
}

/* ------------------------------------------------------------------------ */
/* AMX (Intel's tile unit, Xeons from Sapphire Rapids on): the larger       */
/* products, float32 in and out, to float32's accuracy, faster than on      */
/* AVX-512 (bench.py's section "AMX" compares them). A tile product         */
/* multiplies bfloat16 (a float's top 16 bits: 8 significant bits) and sums */
/* in float32. Each float is cut into three bfloat16, x = hi + mid + lo:    */
/* hi its top 8 bits, mid and lo the next 8 and 8, rounded to nearest (lo   */
/* takes what is left exactly): all 24 of a float's bits, so the sum is x   */
/* exactly. Of the nine products of a = a0+a1+a2 and b = b0+b1+b2 the six   */
/* down to 2^-16 of a.b are computed; each of the three left out (a1.b2,    */
/* a2.b1, a2.b2) is below 2^-23 of it, float32's own rounding (2^-24), and  */
/* of either sign. So a product differs from the AVX-512 one about as       */
/* float32 sums in two orders do, not in its accuracy (a test bounds both). */
/* (Tile units flush values below 2^-126, float32's smallest normal         */
/* number, to zero; a float's lo is that small only when the float is       */
/* below 2^-110.)                                                           */
/*                                                                          */
/* Tiles: A's rows 16 x 32 k (a piece of each), B's columns 16 x 32 k with  */
/* k in pairs (the tile unit's layout for B); C's 32 x 32 tile sums in four */
/* tile registers over up to 512 k. The wider side of C is split among the  */
/* threads (gemm_amx, below).                                               */
/* ------------------------------------------------------------------------ */
#if FO_X86 && defined(__linux__) && \
    (defined(__clang__) ? __clang_major__ >= 12 : (defined(__GNUC__) && __GNUC__ >= 11))
#define FO_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

/* the CPU has AMX-BF16 and Linux lets this process use the tile registers */
static int amx_usable(void) {
    static int ok = -1;
    if (ok < 0) {
        unsigned a, b, c, d;
        ok = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1) &&
             __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1) && /* AVX512-BF16 */
             __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    }
    return ok;
}

/* 32 floats, x0 then x1, -> hi, mid, lo: 32 bfloat16 each, in that order.
 * hi is x's top 16 bits (cut: it cannot round up past the largest float);
 * mid and lo rounded to nearest (even), so the parts left out are of either
 * sign. -> the lanes where x0 or x1 is not finite: then the product goes to
 * AVX-512 (inf . b would meet b's mid and lo, 0 for b = 1, and give NaN). */
#define AMX_ISA "avx512f,avx512bw,avx512bf16"
__attribute__((target(AMX_ISA)))
static inline __mmask16 amx_split(__m512 x0, __m512 x1, __m512i part[3]) {
    const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 h0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x0), top));
    __m512 h1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x1), top));
    __m512 r0 = _mm512_sub_ps(x0, h0), r1 = _mm512_sub_ps(x1, h1); /* exact; NaN if not finite */
    __mmask16 finite = _mm512_cmp_ps_mask(r0, r0, _CMP_ORD_Q) & _mm512_cmp_ps_mask(r1, r1, _CMP_ORD_Q);
    part[0] = (__m512i)_mm512_cvtne2ps_pbh(h1, h0); /* exact */
    part[1] = (__m512i)_mm512_cvtne2ps_pbh(r1, r0);
    __m512i m0 = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(part[1]));
    __m512i m1 = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(part[1], 1));
    r0 = _mm512_sub_ps(r0, _mm512_castsi512_ps(_mm512_slli_epi32(m0, 16)));
    r1 = _mm512_sub_ps(r1, _mm512_castsi512_ps(_mm512_slli_epi32(m1, 16)));
    part[2] = (__m512i)_mm512_cvtne2ps_pbh(r1, r0);
    return (__mmask16)~finite;
}

#define AMX_TILE 512 /* bfloat16 in a tile: 16 rows of 64 bytes */

/* the first n of 16 floats at p, the rest 0 (none read past them) */
__attribute__((target("avx512f")))
static inline __m512 amx_load16(const float *p, int n) {
    return _mm512_maskz_loadu_ps(LANE_MASK16(n), p);
}

/* rows [0, mr) x k [0, K) of A, zero-padded to 16 x Kp -> Kp / 32 k blocks
 * of three tiles: out[(kb * 3 + s) * AMX_TILE + r * 32 + k % 32]. Read in
 * place when its rows are rows in memory, else first copied into stage
 * (X^T: packed as a B panel of Kp columns, transposed in blocks).
 * -> whether a value was not finite. */
__attribute__((target(AMX_ISA)))
static int amx_pack_a(const kern_t *kn, uint16_t *out, float *stage, const float *A, ptrdiff_t rsa,
                      ptrdiff_t csa, int mr, int K, int Kp) {
    __mmask16 bad = 0;
    if (csa != 1) {
        kn->pack_b(stage, A, rsa, csa, K, mr, Kp);
        A = stage, rsa = Kp;
    }
    for (int kb = 0; kb < Kp / 32; kb++)
        for (int r = 0; r < 16; r++) {
            const float *row = A + r * rsa + kb * 32;
            int n = r < mr ? K - kb * 32 : 0;
            __m512i part[3];
            bad |= amx_split(amx_load16(row, n), amx_load16(row + 16, n - 16), part);
            for (int s = 0; s < 3; s++)
                _mm512_storeu_si512(out + (kb * 3 + s) * AMX_TILE + r * 32, part[s]);
        }
    return bad != 0;
}

/* k [0, K) x columns [0, nr) of B, zero-padded to Kp x 32 -> for each
 * 16-column half h, Kp / 32 k blocks of three tiles, k in pairs:
 * out[((h * nkb + kb) * 3 + s) * AMX_TILE + q * 32 + 2 j + (k & 1)], k % 32
 * = 2 q + (k & 1). Read in place when its rows are rows in memory, else
 * first packed into stage (kc x 32). With colsum, the columns' sums of the
 * K rows are added to it, row after row as fo_colsum adds them (the bias's
 * gradient while dY is cut). -> whether a value was not finite. */
__attribute__((target(AMX_ISA)))
static int amx_pack_b(const kern_t *kn, uint16_t *out, float *stage, const float *B,
                      ptrdiff_t rsb, ptrdiff_t csb, int nr, int K, int Kp, float *colsum) {
    int nkb = Kp / 32;
    __mmask16 bad = 0;
    if (csb != 1) { /* W^T: transposed in blocks */
        kn->pack_b(stage, B, rsb, csb, nr, K, 32);
        B = stage, rsb = 32;
    }
    /* rows k, k + 1 -> column j's pair at 2 j, 2 j + 1 */
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int h = 0; h < 2; h++) {
        int n = nr - 16 * h;
        __m512 sum = colsum ? amx_load16(colsum + 16 * h, n) : _mm512_setzero_ps();
        for (int kb = 0; kb < nkb; kb++)
            for (int q = 0; q < 16; q++) {
                int k = kb * 32 + 2 * q;
                const float *row = B + (ptrdiff_t)k * rsb + 16 * h;
                __m512 even = amx_load16(row, k < K ? n : 0), odd = amx_load16(row + rsb, k + 1 < K ? n : 0);
                __m512i part[3];
                bad |= amx_split(even, odd, part);
                for (int s = 0; s < 3; s++)
                    _mm512_storeu_si512(out + ((h * nkb + kb) * 3 + s) * AMX_TILE + q * 32,
                                        _mm512_permutexvar_epi16(pairs, part[s]));
                if (colsum) sum = _mm512_add_ps(_mm512_add_ps(sum, even), odd);
            }
        if (colsum) _mm512_mask_storeu_ps(colsum + 16 * h, LANE_MASK16(n), sum);
    }
    return bad != 0;
}

/* every tile register 16 rows x 64 bytes (static: the intrinsic's asm tells
 * the compiler of only a pointer's worth of the 64 bytes it reads) */
static const struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config = {1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};
__attribute__((target("amx-tile"))) static void amx_configure(void) { _tile_loadconfig(&amx_config); }

/* c (32 x 32, row stride 32) = two row tiles (a0: rows 0-15, a1: 16-31) .
 * two column tiles (b0, b1) over nkb k blocks. Tiles 0-3: C's quarters;
 * 4, 5: a piece of A's two row tiles; 6, 7: a piece of B's two column
 * tiles. Four independent products at a time; per k block the six terms,
 * smallest first, in an order that reloads 16 tiles, not 24. */
#define AMX_DP4(s, t)                                                                     \
    do {                                                                                  \
        if (s >= 0) { _tile_loadd(4, a0 + (s) * AMX_TILE, 64); _tile_loadd(5, a1 + (s) * AMX_TILE, 64); } \
        if (t >= 0) { _tile_loadd(6, b0 + (t) * AMX_TILE, 64); _tile_loadd(7, b1 + (t) * AMX_TILE, 64); } \
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);                                 \
        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);                                 \
    } while (0)
__attribute__((target("amx-tile,amx-bf16")))
static void amx_kernel(int nkb, const uint16_t *a0, const uint16_t *a1, const uint16_t *b0,
                       const uint16_t *b1, float *c) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int kb = 0; kb < nkb; kb++) {
        AMX_DP4(2, 0);  /* lo . hi (-1: the tile already loaded) */
        AMX_DP4(1, -1); /* mid . hi */
        AMX_DP4(-1, 1); /* mid . mid */
        AMX_DP4(0, 2);  /* hi . lo */
        AMX_DP4(-1, 1); /* hi . mid */
        AMX_DP4(-1, 0); /* hi . hi */
        a0 += 3 * AMX_TILE, a1 += 3 * AMX_TILE, b0 += 3 * AMX_TILE, b1 += 3 * AMX_TILE;
    }
    _tile_stored(0, c, 128);
    _tile_stored(1, c + 16, 128);
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
}

/* C's tile at c (mr x nr of it) = row tiles a0, a1 . column tiles b0, b1 (+ C) (+ bias),
 * its rows asked for first (prefetch_tile; here 4 KB of stores at the end). */
__attribute__((target("avx512f,amx-tile,amx-bf16,prfchw")))
static void amx_tile(int nkb, const uint16_t *a0, const uint16_t *a1, const uint16_t *b0,
                     const uint16_t *b1, float *c, ptrdiff_t ldc, int mr, int nr, int accumulate,
                     const float *bias) {
    float acc[32 * 32] __attribute__((aligned(64)));
    prefetch_tile(c, ldc, mr, nr);
    amx_kernel(nkb, a0, a1, b0, b1, acc);
    store_tile_512((const __m512 *)acc, 2, c, ldc, mr, nr, accumulate, bias);
}
__attribute__((target("amx-tile"))) static void amx_release(void) { _tile_release(); }

/* A product's operands, as gemm_amx cuts them (colsum: B's column sums, or NULL) */
typedef struct {
    const kern_t *kn;
    const float *A, *B;
    ptrdiff_t rsa, csa, rsb, csb;
    int M, N;
    float *colsum;
} amx_operands;

/* Pair x of one side (A's rows 32 x.., or B's columns) over k [p0, p0 + kc),
 * zero-padded to kp, into out: its two tiles kp / 32 * 3 tiles apart. B's
 * column sums go on from p0 > 0 (chunks in order). -> whether a value was
 * not finite. */
static int amx_cut(const amx_operands *o, int b_side, int x, int p0, int kc, int kp, uint16_t *out,
                   float *stage) {
    if (b_side) {
        int nr = imin(32, o->N - x * 32);
        float *sum = o->colsum ? o->colsum + x * 32 : NULL;
        if (sum && !p0) memset(sum, 0, nr * sizeof(float));
        return amx_pack_b(o->kn, out, stage, o->B + p0 * o->rsb + (ptrdiff_t)x * 32 * o->csb, o->rsb,
                          o->csb, nr, kc, kp, sum);
    }
    int bad = 0;
    for (int h = 0; h < 2; h++)
        bad |= amx_pack_a(o->kn, out + (size_t)h * (kp / 32) * 3 * AMX_TILE, stage,
                          o->A + (ptrdiff_t)(x * 32 + h * 16) * o->rsa + p0 * o->csa, o->rsa, o->csa,
                          imax(0, imin(16, o->M - x * 32 - h * 16)), kc, kp);
    return bad;
}

#define AMX_BLOCK (1 << 20) /* bytes of tiles a thread cuts and sweeps the other side over: L2 */
#define AMX_KB 16           /* k blocks of 32 per pass over C */
#define AMX_MIN 32          /* rows and columns of C from which AMX is used, */
#define AMX_MIN_K 320       /* and k: a tile's fixed costs (its 4 KB of C written) need
                             * 10 k blocks of work to hide behind (in a training step
                             * products with k = 192 were slower than on AVX-512) */

/* The wider side of C is split among the threads: each cuts its own tiles
 * of that side's operand (X.W: rows of X) a block at a time into its L2 as
 * it goes; the other operand (W), cut once before, is swept over them. So
 * the larger operand is read once and its tiles (1.5 times its bytes) never
 * go out to memory and back. Tile pairs: 32 rows or columns. C is written
 * (accumulate = 0); with colsum, B's column sums too (X^T.dY: the bias's
 * gradient). -> 0, or 1 if A or B holds a value that is not finite: then C
 * is not done (AVX-512 does it, with float32's infinities). */
static int gemm_amx(const kern_t *kn, int M, int N, int K, const float *A, ptrdiff_t rsa,
                    ptrdiff_t csa, const float *B, ptrdiff_t rsb, ptrdiff_t csb, float *C,
                    ptrdiff_t ldc, const float *bias, int nthreads, float *colsum) {
    OMP_ONLY(nthreads);
    const amx_operands ops = {kn, A, B, rsa, csa, rsb, csb, M, N, colsum};
    int Kp = ceil_div(K, 32) * 32, nkb = Kp / 32, rows = M >= N, bad = 0;
    int mp = ceil_div(M, 32), np = ceil_div(N, 32), nown = rows ? mp : np, nother = rows ? np : mp;
    size_t whole = (size_t)nkb * 3 * AMX_TILE, part = (size_t)imin(nkb, AMX_KB) * 3 * AMX_TILE;
    int block = imax(1, (int)(AMX_BLOCK / (2 * part * sizeof(uint16_t)))); /* pairs */
    uint16_t *other = (uint16_t *)fo_alloc((size_t)nother * whole); /* 2 tiles a pair: floats = halves */
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        int nt = fo_team(), tid = fo_tid();
        float *stage = fo_alloc((size_t)Kp * 32);
        int s0 = (int)((long)nown * tid / nt), s1 = (int)((long)nown * (tid + 1) / nt);
        uint16_t *own = (uint16_t *)fo_alloc((size_t)imax(1, imin(block, s1 - s0)) * part);
        int ok = stage && own && other;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int x = 0; x < nother; x++) /* the other side, whole */
            if (ok && amx_cut(&ops, rows, x, 0, K, Kp, other + 2 * x * whole, stage)) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
                bad = 1;
            }
        /* (implicit barrier: the other side cut) */
        int skip;
#ifdef _OPENMP
#pragma omp atomic read
#endif
        skip = bad;
        amx_configure();
        for (int b0 = s0; b0 < s1 && ok && !skip; b0 += block) {
            int b1 = imin(s1, b0 + block);
            for (int k0 = 0; k0 < nkb && !skip; k0 += AMX_KB) { /* C summed from the second on */
                int kb = imin(AMX_KB, nkb - k0), p0 = k0 * 32, kc = imin(K - p0, kb * 32);
                size_t ck = (size_t)kb * 3 * AMX_TILE, off = (size_t)k0 * 3 * AMX_TILE;
                int cut_bad = 0;
                for (int x = b0; x < b1; x++) /* this thread's block, this k range */
                    cut_bad |= amx_cut(&ops, !rows, x, p0, kc, kb * 32, own + 2 * (x - b0) * ck, stage);
                if (cut_bad) { /* this thread stops; the others finish their runs */
#ifdef _OPENMP
#pragma omp atomic write
#endif
                    bad = 1;
                    skip = 1;
                    continue;
                }
                for (int y = 0; y < nother; y++) {
                    const uint16_t *o = other + 2 * y * whole + off;
                    for (int x = b0; x < b1; x++) {
                        const uint16_t *w = own + 2 * (x - b0) * ck;
                        int i = 32 * (rows ? x : y), j = 32 * (rows ? y : x);
                        amx_tile(kb, rows ? w : o, rows ? w + ck : o + whole, rows ? o : w,
                                 rows ? o + whole : w + ck, C + (ptrdiff_t)i * ldc + j, ldc,
                                 imin(32, M - i), imin(32, N - j), k0 > 0,
                                 (bias && !k0) ? bias + j : NULL);
                    }
                }
            }
        }
        amx_release();
        fo_free((float *)own);
        fo_free(stage);
    }
    fo_free((float *)other);
    return bad;
}

/* whether C[M,N] = A[M,K] . B[K,N] goes to AMX */
static int amx_for(int M, int N, int K) {
    int amx = use_amx();
    return amx == 2 || (amx == 1 && M >= AMX_MIN && N >= AMX_MIN && K >= AMX_MIN_K);
}
#else
#define FO_AMX 0
#if FO_X86
static int amx_usable(void) { return 0; }
#endif
#endif

/* Below this many flops the OpenMP fork/join costs more than it saves. */
#define PAR_MIN_FLOPS (1 << 18)

void fo_sgemm(int M, int N, int K, const float *A, ptrdiff_t rsa, ptrdiff_t csa,
              const float *B, ptrdiff_t rsb, ptrdiff_t csb, float *C, ptrdiff_t ldc,
              int accumulate, const float *bias) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { /* empty sum: C = bias or C unchanged */
        if (!accumulate)
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++) C[i * ldc + j] = bias ? bias[j] : 0.0f;
        else if (bias)
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++) C[i * ldc + j] += bias[j];
        return;
    }
    double flops = 2.0 * M * N * K;
    if (M == 1 && csb == 1 && (double)K * N >= STREAM_MIN) {
        gemm_stream(kern(), N, K, A, csa, B, rsb, C, accumulate, bias);
        return;
    }
    if (M <= SM_MAX_M && csb == 1) {
        gemm_small_m(kern(), M, N, K, A, rsa, csa, B, rsb, C, ldc, accumulate, bias,
                     flops >= PAR_MIN_FLOPS);
        return;
    }
#if FO_X86
    if (M <= SM_MAX_M && rsb == 1 && kern() == &KERN_AVX512) {
        if (M > 4) /* the batch fills a vector's lanes enough */
            gemm_small_m_tc(M, N, K, A, rsa, csa, B, csb, C, ldc, accumulate, bias, flops >= PAR_MIN_FLOPS);
        else
            gemm_small_m_t(M, N, K, A, rsa, csa, B, csb, C, ldc, accumulate, bias,
                       flops >= PAR_MIN_FLOPS);
        return;
    }
#endif
    const kern_t *kn = kern();
    int nthreads = flops >= PAR_MIN_FLOPS ? fo_nthreads() : 1;
#if FO_AMX
    if (!accumulate && amx_for(M, N, K) &&
        !gemm_amx(kn, M, N, K, A, rsa, csa, B, rsb, csb, C, ldc, bias, nthreads, NULL))
        return;
#endif
    if (csa != 1 && cols_fit(kn, M, N, nthreads)) {  /* A packed: X^T.dY */
        gemm_cols(kn, M, N, K, A, rsa, csa, B, rsb, csb, C, ldc, accumulate, bias, nthreads, NULL);
        return;
    }
    gemm_blocked(blocked_kern(kn, N), M, N, K, A, rsa, csa, B, rsb, csb, C, ldc, accumulate, bias,
                 flops >= PAR_MIN_FLOPS);
}

/* y[M,N] = x[M,K] . w[K,N] + b[N]   (b may be NULL) */
void fo_linear_forward(const float *x, const float *w, const float *b, float *y,
                       int M, int K, int N) {
    fo_sgemm(M, N, K, x, K, 1, w, N, 1, y, N, 0, b);
}

/* db[N] = column sums of dy[M,N]. Each thread sums a strip of 64 columns
 * over all rows, so the inner loop runs along a row (vectorised). */
void fo_colsum(const float *dy, float *db, int M, int N) {
    int strips = ceil_div(N, 64);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if ((double)M * N > 65536)
#endif
    for (int s = 0; s < strips; s++) {
        int j0 = s * 64, j1 = imin(N, j0 + 64);
        float acc[64] = {0};
        for (int i = 0; i < M; i++) {
            const float *row = dy + (size_t)i * N;
            for (int j = j0; j < j1; j++) acc[j - j0] += row[j];
        }
        for (int j = j0; j < j1; j++) db[j] = acc[j - j0];
    }
}

/* Given dy[M,N] and the forward's x[M,K], w[K,N]:
 *   dx[M,K] = dy . w^T       (skipped if dx is NULL)
 *   dw[K,N] = x^T . dy       (OVERWRITTEN, not accumulated)
 *   db[N]   = column sums of dy   (skipped if db is NULL) */
void fo_linear_backward(const float *dy, const float *x, const float *w, float *dx,
                        float *dw, float *db, int M, int K, int N) {
    if (dx) fo_sgemm(M, K, N, dy, N, 1, w, 1, N, dx, K, 0, NULL);
    const kern_t *kn = kern();
    int nthreads = 2.0 * M * N * K >= PAR_MIN_FLOPS ? fo_nthreads() : 1;
#if FO_AMX /* db while cutting dy */
    if (amx_for(K, N, M) && !gemm_amx(kn, K, N, M, x, 1, K, dy, N, 1, dw, N, NULL, nthreads, db))
        return;
#endif
    if (K > SM_MAX_M && M > 0 && cols_fit(kn, K, N, nthreads)) { /* db while packing dy */
        gemm_cols(kn, K, N, M, x, 1, K, dy, N, 1, dw, N, 0, NULL, nthreads, db);
        return;
    }
    fo_sgemm(K, N, M, x, 1, K, dy, N, 1, dw, N, 0, NULL);
    if (db) fo_colsum(dy, db, M, N);
}

/* ------------------------------------------------------------------------ */
/* Attention                                                                */
/* ------------------------------------------------------------------------ */

/* expf for a row of values, written so the compiler vectorises it:
 * exp(x) = 2^n * e^r with n = round(x / ln 2), |r| <= ln2/2, e^r by a
 * degree-6 Taylor/minimax polynomial (rel. error ~2e-7). Inputs are
 * clamped to [-87, 88]; callers zero masked entries themselves. */
FO_INLINE void exp_inplace(float *x, int n) {
    for (int i = 0; i < n; i++) {
        float v = x[i];
        v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
        float t = v * 1.44269504088896341f;
        float fn = (t + 12582912.0f) - 12582912.0f; /* round to nearest */
        float r = v - fn * 0.693359375f;           /* ln2 = hi + lo, exact hi */
        r = r + fn * 2.12194440e-4f;
        float p = 1.0f / 720.0f;
        p = p * r + 1.0f / 120.0f;
        p = p * r + 1.0f / 24.0f;
        p = p * r + 1.0f / 6.0f;
        p = p * r + 0.5f;
        p = p * r + 1.0f;
        p = p * r + 1.0f;
        int32_t e = ((int32_t)fn + 127) << 23; /* 2^n as float bits */
        float s;
        memcpy(&s, &e, sizeof s);
        x[i] = p * s;
    }
}

/* A row's sum, max or dot product keeps 16 partial results, one per lane of
 * 16 values (so that it vectorises without -ffast-math, which would let the
 * compiler reorder the sum), folded in halves at the end (8 + 8, 4 + 4, ...):
 * 4 dependent steps, not 15. With gcc and clang they are a vector (their
 * vector extension) and stay in registers: as an array they went through
 * memory at every fold of a short row. Elsewhere (MSVC) an array, lane by
 * lane. The same sums in the same order either way. ACC16(s) declares them,
 * ACC_ADD(s, e) adds e, ACC_MAX(s, e) keeps the larger, e written with
 * LANES(p) for the 16 values at p. */
#if defined(__GNUC__) || defined(__clang__)
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int v16i __attribute__((vector_size(64)));
typedef int v8i __attribute__((vector_size(32)));
typedef int v4i __attribute__((vector_size(16)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias)); /* unaligned loads */
#define VSEL(T, IT, c, a, b) ((T)(((IT)(a) & (c)) | ((IT)(b) & ~(c)))) /* c ? a : b, lane by lane */
#define ACC16(s, init) v16f s = {init, init, init, init, init, init, init, init, \
                                 init, init, init, init, init, init, init, init}
#define LANES(p) (*(const v16u *)(p))
#define ACC_ADD(s, e) ((s) += (e))
#define ACC_MAX(s, e) do { v16f e_ = (e); (s) = VSEL(v16f, v16i, e_ > (s), e_, s); } while (0)
/* (vectors by pointer: passed by value they would change the ABI of the baseline copies) */
FO_INLINE float fold_sum16(const v16f *s) {
    v8f a, b;
    v4f c, d;
    memcpy(&a, s, 32); memcpy(&b, (const float *)s + 8, 32); a += b;
    memcpy(&c, &a, 16); memcpy(&d, (float *)&a + 4, 16); c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}
FO_INLINE float fold_max16(const v16f *m) {
    v8f a, b;
    v4f c, d;
    memcpy(&a, m, 32); memcpy(&b, (const float *)m + 8, 32); a = VSEL(v8f, v8i, b > a, b, a);
    memcpy(&c, &a, 16); memcpy(&d, (float *)&a + 4, 16); c = VSEL(v4f, v4i, d > c, d, c);
    float m0 = c[2] > c[0] ? c[2] : c[0], m1 = c[3] > c[1] ? c[3] : c[1];
    return m1 > m0 ? m1 : m0;
}
#define FOLD_SUM(s) fold_sum16(&(s))
#define FOLD_MAX(s) fold_max16(&(s))
#else
#define ACC16(s, init) float s[16] = {init, init, init, init, init, init, init, init, \
                                      init, init, init, init, init, init, init, init}
#define LANES(p) ((p)[i_])
#define ACC_ADD(s, e) do { for (int i_ = 0; i_ < 16; i_++) (s)[i_] += (e); } while (0)
#define ACC_MAX(s, e) do { for (int i_ = 0; i_ < 16; i_++) { float e_ = (e); \
                               (s)[i_] = e_ > (s)[i_] ? e_ : (s)[i_]; } } while (0)
FO_INLINE float fold_sum16(float *s) {
    for (int w = 8; w >= 1; w >>= 1)
        for (int i = 0; i < w; i++) s[i] += s[i + w];
    return s[0];
}
FO_INLINE float fold_max16(float *m) {
    for (int w = 8; w >= 1; w >>= 1)
        for (int i = 0; i < w; i++) m[i] = m[i + w] > m[i] ? m[i + w] : m[i];
    return m[0];
}
#define FOLD_SUM(s) fold_sum16(s)
#define FOLD_MAX(s) fold_max16(s)
#endif

FO_INLINE float row_max(const float *x, int n, float init) {
    ACC16(m, init);
    int c = 0;
    for (; c + 16 <= n; c += 16) ACC_MAX(m, LANES(x + c));
    for (; c < n; c++) m[0] = x[c] > m[0] ? x[c] : m[0];
    return FOLD_MAX(m);
}
FO_INLINE float row_dot(const float *x, const float *y, int n) {
    ACC16(s, 0.0f);
    int c = 0;
    for (; c + 16 <= n; c += 16) ACC_ADD(s, LANES(x + c) * LANES(y + c));
    for (; c < n; c++) s[0] += x[c] * y[c];
    return FOLD_SUM(s);
}
FO_INLINE float row_sum(const float *x, int n) {
    ACC16(s, 0.0f);
    int c = 0;
    for (; c + 16 <= n; c += 16) ACC_ADD(s, LANES(x + c));
    for (; c < n; c++) s[0] += x[c];
    return FOLD_SUM(s);
}

/* dst = src * s, n floats (restrict: so that it vectorises) */
FO_INLINE void scaled_copy(float *FO_RESTRICT dst, const float *FO_RESTRICT src, float s, int n) {
    for (int i = 0; i < n; i++) dst[i] = src[i] * s;
}

/* Single-threaded small GEMM for attention's tiles: C[M,N] (+)= A[M,K] . B[K,N],
 * A with general strides (packed here on per-thread scratch unless row-major,
 * or on AVX-512 a whole tile of a column-major one: the backward's P^T, dS^T),
 * B packed by pack_panels (below): panel jp at bp + jp * pstride.
 * diag, for attention's tiles on the diagonal (row r of the queries sees
 * keys c <= r): DIAG_COLS, C's columns past a panel's last row are left
 * (the softmax masks them); DIAG_K_TO_ROW, A's columns (k) past a panel's
 * last row are zero and not summed; DIAG_K_FROM_ROW, those before its first
 * row. Only masked entries and exact zeros are skipped: the same sums. */
enum { DIAG_NONE, DIAG_COLS, DIAG_K_TO_ROW, DIAG_K_FROM_ROW };

/* B's N columns in panels of NR, K rows each: panel jp at bp + jp * pstride,
 * its row k at + k * NR. Attention packs a head's keys, values and rows once
 * and hands each tile its panels (pstride the whole head's), not a copy a tile. */
FO_INLINE void pack_panels(const kern_t *kn, float *bp, size_t pstride, const float *B,
                           ptrdiff_t rsb, ptrdiff_t csb, int N, int K) {
    const int NR = kn->nr;
    for (int jp = 0; jp < ceil_div(N, NR); jp++)
        kn->pack_b(bp + jp * pstride, B + jp * NR * csb, rsb, csb, imin(NR, N - jp * NR), K, NR);
}

FO_INLINE void small_gemm(const kern_t *kn, int M, int N, int K,
                                 const float *A, ptrdiff_t rsa, ptrdiff_t csa,
                                 const float *bp, size_t pstride, float *C, ptrdiff_t ldc,
                                 int load_c, float *apack, int diag) {
    const int MR = kn->mr, NR = kn->nr;
    int npanels = ceil_div(N, NR);
    rows_fn_t rows_fn = csa == 1 ? rows_kern(kn) : NULL;  /* row-major A: read in place */
    rows_fn_t cols_fn = rsa == 1 ? cols_kern(kn) : NULL;  /* column-major A: so too */
    for (int i = 0; i < M; i += MR) {
        int mr = imin(MR, M - i);
        int np = diag == DIAG_COLS ? imin(npanels, ceil_div(i + mr, NR)) : npanels;
        int k0 = diag == DIAG_K_FROM_ROW ? imin(i, K) : 0;
        int k1 = diag == DIAG_K_TO_ROW ? imin(K, i + mr) : K;
        if (k1 == k0) { /* nothing to sum: C = 0, or C as it is */
            for (int r = 0; r < mr && !load_c; r++) memset(C + (i + r) * ldc, 0, sizeof(float) * N);
            continue;
        }
#if FO_X86
        if (mr <= 4 && kn == &KERN_AVX512) { /* a tile's last 4 rows (64 = 5 x 12 + 4) */
            for (int jp = 0; jp < np; jp++)
                ukern_avx512_4(k1 - k0, A + i * rsa + k0 * csa, rsa, csa,
                               bp + jp * pstride + (size_t)k0 * NR, C + i * ldc + jp * NR, ldc, mr,
                               imin(NR, N - jp * NR), load_c, NULL);
            continue;
        }
#endif
        if (rows_fn) {
            for (int jp = 0; jp < np; jp++)
                rows_fn(k1 - k0, A + i * rsa + k0, rsa, bp + jp * pstride + (size_t)k0 * NR,
                        C + i * ldc + jp * NR, ldc, mr, imin(NR, N - jp * NR), load_c, NULL);
            continue;
        }
        if (cols_fn && mr == MR) {
            for (int jp = 0; jp < np; jp++)
                cols_fn(k1 - k0, A + i + k0 * csa, csa, bp + jp * pstride + (size_t)k0 * NR,
                        C + i * ldc + jp * NR, ldc, mr, imin(NR, N - jp * NR), load_c, NULL);
            continue;
        }
        kn->pack_a(apack, A + i * rsa + k0 * csa, rsa, csa, mr, k1 - k0, MR);
        for (int jp = 0; jp < np; jp++)
            kn->fn(k1 - k0, apack, bp + jp * pstride + (size_t)k0 * NR, C + i * ldc + jp * NR, ldc,
                   mr, imin(NR, N - jp * NR), load_c, NULL);
    }
}

/* A head's rows lie a whole row of c_attn's output (or of y) apart, each on
 * its own 4 KB page, where the hardware prefetchers do not follow: loops
 * that copy them ask for the row PF_AHEAD ahead themselves (prefetch_row,
 * above gemm_blocked). */
#define PF_AHEAD 8

/* Block sizes: queries and keys are processed in tiles of BQ x BK (BK a
 * multiple of every kernel's NR, 16 or 32: a key block starts a panel). */
#define BQ 64
#define BK 64

/* scratch for small_gemm's A: packs of up to max(BQ,BK) x max(D,BK) */
static size_t pack_floats(int D) {
    int m = imax(imax(BQ, BK), D) + 32; /* + room for padding to MR / NR */
    return (size_t)m * m;
}

/* Forward for the query rows [i0, i0+nq) of one head.
 * Online softmax: per row keep the running max m, the running sum l of
 * exp(s - m) and the unnormalised output acc; rescale when m grows. */
FO_INLINE void attn_fwd_block(const kern_t *kn, const float *Q, float *Y, float *LSE, int T, int D,
                           ptrdiff_t ld, ptrdiff_t ldy, int i0, float scale, float *S,
                           float *acc, float *mrow, float *lrow, float *apack, const float *kt,
                           const float *vp) {
    const int NR = kn->nr;
    int nq = imin(BQ, T - i0);
    for (int r = 0; r < nq; r++) { mrow[r] = -INFINITY; lrow[r] = 0.0f; }
    int jend = i0 + nq; /* causal: keys < jend only */
    for (int j0 = 0; j0 < jend; j0 += BK) {
        int nk = imin(BK, jend - j0);
        /* S = Q_i . K_j^T  (nq x nk), K_j^T from the head's panels */
        int diag = j0 == i0; /* the tile on the diagonal: half of it masked */
        small_gemm(kn, nq, nk, D, Q + i0 * ld, ld, 1, kt + (size_t)(j0 / NR) * D * NR,
                   (size_t)D * NR, S, BK, 0, apack, diag ? DIAG_COLS : DIAG_NONE);
        /* the softmax's running max, sum and rescale, in two sweeps over the
         * rows: a row's chain of dependent steps is long, and rows side by
         * side in one sweep overlap */
        float mx[BQ];
        for (int r = 0; r < nq; r++) {
            float *s = S + r * BK;
            int valid = imin(nk, i0 + r - j0 + 1); /* keys j0..i only */
            if (valid <= 0) continue;
            for (int c = 0; c < valid; c++) s[c] *= scale;
            mx[r] = row_max(s, valid, mrow[r]);
        }
        for (int r = 0; r < nq; r++) {
            float *s = S + r * BK;
            int valid = imin(nk, i0 + r - j0 + 1);
            if (valid <= 0) { /* whole tile is in this row's future */
                memset(s, 0, sizeof(float) * nk);
                continue;
            }
            for (int c = 0; c < valid; c++) s[c] -= mx[r];
            exp_inplace(s, valid);
            float sum = row_sum(s, valid);
            for (int c = valid; c < nk; c++) s[c] = 0.0f;
            float alpha = expf(mrow[r] - mx[r]); /* 0 on the first tile (m = -inf) */
            lrow[r] = lrow[r] * alpha + sum;
            mrow[r] = mx[r];
            float *a = acc + r * D;
            for (int d = 0; d < D && j0 > 0; d++) a[d] *= alpha;
        }
        /* acc += P . V_j (acc = P . V_0 first: no zeroing before) */
        small_gemm(kn, nq, D, nk, S, BK, 1, vp + (size_t)j0 * NR, (size_t)T * NR, acc, D, j0 > 0,
                   apack, diag ? DIAG_K_TO_ROW : DIAG_NONE);
    }
    for (int r = 0; r < nq; r++) {
        if (r + PF_AHEAD < nq) prefetch_row(Y + (i0 + r + PF_AHEAD) * ldy, D, 1);
        scaled_copy(Y + (i0 + r) * ldy, acc + r * D, 1.0f / lrow[r], D);
        LSE[i0 + r] = mrow[r] + logf(lrow[r]);
    }
}

/* Backward for the key rows [j0, j0+nk) of one head: accumulates dK_j, dV_j
 * over every query block that can see them, and adds dS.K_j into dQ.
 *   P  = exp(S*scale - lse)           (recomputed, never stored)
 *   dV_j += P^T . dY_i
 *   dP = dY_i . V_j^T
 *   dS = P * (dP - Di) * scale        with Di = rowsum(dY_i * Y_i)
 *   dK_j += dS^T . Q_i,   dQ_i += dS . K_j
 * The B operands come packed once for the task (bwd_panels), not a tile. */
typedef struct { /* a backward task's operands in panels (pack_panels), rows r0 on */
    float *kt, *vt;       /* K^T, V^T: panels of NR keys, D x NR each */
    float *kr, *qr, *dyr; /* K, Q, dY: panels of NR of the D columns, T x NR each */
    int r0;
    int dq_fresh;         /* dQ not yet written: key block 0 stores its share */
} bwd_panels;

FO_INLINE void attn_bwd_block(const kern_t *kn, const float *Q, const float *dY,
                           const float *LSE, const float *Di, float *dQ, float *dK, float *dV,
                           int T, int D, ptrdiff_t ld, ptrdiff_t ldy, ptrdiff_t ldk, ptrdiff_t ldq,
                           int j0, float scale, float *P, float *dP, float *apack,
                           const bwd_panels *bp) {
    const int NR = kn->nr;
    int nk = imin(BK, T - j0);
    const float *ktj = bp->kt + (size_t)(j0 - bp->r0) / NR * D * NR;
    const float *vtj = bp->vt + (size_t)(j0 - bp->r0) / NR * D * NR;
    const float *krj = bp->kr + (size_t)(j0 - bp->r0) * NR;
    size_t rs = (size_t)T * NR; /* a row panel's stride */
    int first_q = (j0 / BQ) * BQ, dq_add = !(bp->dq_fresh && j0 == 0);
    for (int i0 = first_q; i0 < T; i0 += BQ) { /* (the first stores dK_j, dV_j: no zeroing) */
        int nq = imin(BQ, T - i0);
        const float *Qi = Q + i0 * ld, *dYi = dY + i0 * ldy;
        int diag = i0 == j0 ? DIAG_COLS : DIAG_NONE; /* the tile on the diagonal */
        small_gemm(kn, nq, nk, D, Qi, ld, 1, ktj, (size_t)D * NR, P, BK, 0, apack, diag);
        small_gemm(kn, nq, nk, D, dYi, ldy, 1, vtj, (size_t)D * NR, dP, BK, 0, apack, diag);
        for (int r = 0; r < nq; r++) {
            float *p = P + r * BK, *dp = dP + r * BK;
            int valid = imin(nk, i0 + r - j0 + 1);
            if (valid < 0) valid = 0;
            float l = LSE[i0 + r], di = Di[i0 + r];
            for (int c = 0; c < valid; c++) p[c] = p[c] * scale - l;
            exp_inplace(p, valid);
            for (int c = 0; c < valid; c++) dp[c] = p[c] * (dp[c] - di) * scale;
            for (int c = valid; c < nk; c++) p[c] = dp[c] = 0.0f; /* masked, maybe never computed */
        }
        /* dV_j += P^T . dY_i   (P^T read through strides) */
        small_gemm(kn, nk, D, nq, P, 1, BK, bp->dyr + (size_t)(i0 - bp->r0) * NR, rs,
                   dV + j0 * ldk, ldk, i0 > first_q, apack, diag ? DIAG_K_FROM_ROW : DIAG_NONE);
        /* dK_j += dS^T . Q_i */
        small_gemm(kn, nk, D, nq, dP, 1, BK, bp->qr + (size_t)(i0 - bp->r0) * NR, rs,
                   dK + j0 * ldk, ldk, i0 > first_q, apack, diag ? DIAG_K_FROM_ROW : DIAG_NONE);
        /* dQ_i += dS . K_j */
        small_gemm(kn, nq, D, nk, dP, BK, 1, krj, rs, dQ + i0 * ldq, ldq, dq_add, apack,
                   diag ? DIAG_K_TO_ROW : DIAG_NONE);
    }
}

/* rows [r0, r1) of D floats, ld apart, to or from packed rows (D apart) */
static void gather_rows(float *dst, const float *src, int r0, int r1, int D, ptrdiff_t ld) {
    for (int r = r0; r < r1; r++) {
        if (r + PF_AHEAD < r1) prefetch_row(src + (r + PF_AHEAD) * ld, D, 0);
        copy_floats(dst + (size_t)r * D, src + r * ld, D);
    }
}
static void scatter_rows(float *dst, ptrdiff_t ld, const float *src, int r0, int r1, int D) {
    for (int r = r0; r < r1; r++) {
        if (r + PF_AHEAD < r1) prefetch_row(dst + (r + PF_AHEAD) * ld, D, 1);
        copy_floats(dst + r * ld, src + (size_t)r * D, D);
    }
}

/* ---- per-ISA attention: the block functions above, inlined into copies
 * compiled for AVX-512 and AVX2 so that their element-wise loops (exp,
 * scaling, max, sum, packing) use the wide vectors too. */
#define FWD_ARGS const kern_t *kn, const float *Q, float *Y, float *LSE, int T, int D, \
    ptrdiff_t ld, ptrdiff_t ldy, int i0, float scale, float *S, float *acc, float *mrow, \
    float *lrow, float *apack, const float *kt, const float *vp
#define FWD_CALL kn, Q, Y, LSE, T, D, ld, ldy, i0, scale, S, acc, mrow, lrow, apack, kt, vp
#define BWD_ARGS const kern_t *kn, const float *Q, const float *dY, const float *LSE, \
    const float *Di, float *dQ, float *dK, float *dV, int T, int D, ptrdiff_t ld, ptrdiff_t ldy, \
    ptrdiff_t ldk, ptrdiff_t ldq, int j0, float scale, float *P, float *dP, float *apack, \
    const bwd_panels *bp
#define BWD_CALL kn, Q, dY, LSE, Di, dQ, dK, dV, T, D, ld, ldy, ldk, ldq, j0, scale, P, dP, apack, bp
/* One new position (generation) against a KV cache: the scores of its n
 * visible keys (rows kt apart), their softmax, the weighted sum of values. */
#define DEC_ARGS const float *qr, const float *k, const float *v, ptrdiff_t kt, int n, int D, \
                 float scale, float *s, float *yr
#define DEC_CALL qr, k, v, kt, n, D, scale, s, yr
FO_INLINE void attn_decode_row(DEC_ARGS) {
    for (int j = 0; j < n; j++) s[j] = row_dot(qr, k + j * kt, D) * scale;
    float m = row_max(s, n, -INFINITY);
    for (int j = 0; j < n; j++) s[j] -= m;
    exp_inplace(s, n);
    float r = 1.0f / row_sum(s, n);
    for (int c = 0; c < D; c++) yr[c] = 0.0f;
    for (int j = 0; j < n; j++) {
        const float *vr = v + j * kt;
        float p = s[j] * r;
        for (int c = 0; c < D; c++) yr[c] += p * vr[c];
    }
}
typedef void (*attn_dec_fn)(DEC_ARGS);
typedef void (*attn_fwd_fn)(FWD_ARGS);
typedef void (*attn_bwd_fn)(BWD_ARGS);
typedef void (*attn_di_fn)(const float *dy, const float *y, ptrdiff_t ldy, float *Di, int T, int D);
#define DEFINE_ATTN(SUFFIX, TARGET) \
    TARGET static void attn_fwd##SUFFIX(FWD_ARGS) { attn_fwd_block(FWD_CALL); } \
    TARGET static void attn_bwd##SUFFIX(BWD_ARGS) { attn_bwd_block(BWD_CALL); } \
    TARGET static void attn_di##SUFFIX(const float *dy, const float *y, ptrdiff_t ldy, float *Di, \
                                       int T, int D) {                                        \
        for (int t = 0; t < T; t++) Di[t] = row_dot(dy + t * ldy, y + t * ldy, D); } \
    TARGET static void attn_dec##SUFFIX(DEC_ARGS) { attn_decode_row(DEC_CALL); }
DEFINE_ATTN(_generic, )
#if FO_X86
DEFINE_ATTN(_avx512, __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))))
DEFINE_ATTN(_avx2, __attribute__((target("avx2,fma"))))
#endif

static attn_dec_fn attn_dec_pick(const kern_t *kn) {
#if FO_X86
    if (kn == &KERN_AVX512) return attn_dec_avx512;
    if (kn == &KERN_AVX2) return attn_dec_avx2;
#endif
    (void)kn;
    return attn_dec_generic;
}

static void attn_pick(const kern_t *kn, attn_fwd_fn *fwd, attn_bwd_fn *bwd, attn_di_fn *di) {
    *fwd = attn_fwd_generic;
    *bwd = attn_bwd_generic;
    *di = attn_di_generic;
#if FO_X86
    if (kn == &KERN_AVX512) { *fwd = attn_fwd_avx512; *bwd = attn_bwd_avx512; *di = attn_di_avx512; }
    if (kn == &KERN_AVX2) { *fwd = attn_fwd_avx2; *bwd = attn_bwd_avx2; *di = attn_di_avx2; }
#endif
    (void)kn;
}

/* Generation: q (B, H, Tq, D) are the last Tq of the Tk positions whose keys
 * and values k, v (B, H, Tk, D) the KV cache holds; query i sees keys
 * 0..Tk-Tq+i. Strides in floats: q (qb, qh, qt), k and v (kb, kh, kt), y
 * (yb, yh, yt); each row of D contiguous. No backward: nothing is kept. */
void fo_attention_decode(const float *q, const float *k, const float *v, float *y, int B, int H,
                         int Tq, int Tk, int D, ptrdiff_t qb, ptrdiff_t qh, ptrdiff_t qt,
                         ptrdiff_t kb, ptrdiff_t kh, ptrdiff_t kt, ptrdiff_t yb, ptrdiff_t yh,
                         ptrdiff_t yt) {
    attn_dec_fn row = attn_dec_pick(kern());
    long rows = (long)B * H * Tq;
    float scale = 1.0f / sqrtf((float)D);
#ifdef _OPENMP
#pragma omp parallel if (rows > 1 && (double)rows * Tk * D > 1e5)
#endif
    {
        float *s = fo_alloc((size_t)Tk);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (long r = 0; r < rows; r++) {
            int b = (int)(r / ((long)H * Tq)), h = (int)(r / Tq % H), i = (int)(r % Tq);
            if (s)
                row(q + b * qb + h * qh + i * qt, k + b * kb + h * kh, v + b * kb + h * kh, kt,
                    Tk - Tq + i + 1, D, scale, s, y + b * yb + h * yh + i * yt);
        }
        fo_free(s);
    }
}

/* q, k, v and their gradients dq, dk, dv are (B, H, T, D) with element
 * strides (sb, sh, st, 1); y and dy with (yb, yh, yt, 1): the heads are read
 * where the model keeps them (side by side in each row of c_attn's output),
 * y is written side by side in rows, as c_proj reads it, and dq, dk, dv
 * where c_attn's backward reads them, not copied to (B, H, T, D) and back. */
void fo_attention_forward(const float *q, const float *k, const float *v, float *y,
                          float *lse, int B, int H, int T, int D, ptrdiff_t sb, ptrdiff_t sh,
                          ptrdiff_t st, ptrdiff_t yb, ptrdiff_t yh, ptrdiff_t yt) {
    const kern_t *kn = kern();
    attn_fwd_fn fwd_block;
    attn_bwd_fn bwd_block;
    attn_di_fn di_rows;
    attn_pick(kn, &fwd_block, &bwd_block, &di_rows);
    int BH = B * H, nqb = ceil_div(T, BQ);
    float scale = 1.0f / sqrtf((float)D);
    /* Tasks = heads, each gathering its rows once; with few heads (B*H
     * under 4 per thread), (head, query block), the costliest (last) blocks
     * first so that the dynamic schedule ends balanced. */
    int split = BH < 4 * fo_nthreads();
    long ntasks = (long)BH * (split ? nqb : 1);
    int gather = st != D; /* q not packed: each task gathers its queries */
    int head[16 * MAX_RUNS];
#ifdef _OPENMP
#pragma omp parallel num_threads(fo_nthreads()) if (ntasks > 1 && (double)BH * T * T * D > 1e5)
#endif
    {
        float *S = fo_alloc((size_t)BQ * BK), *acc = fo_alloc((size_t)BQ * D);
        float *mrow = fo_alloc(BQ), *lrow = fo_alloc(BQ);
        /* a head's keys (K^T) and values in panels, packed once for all its query blocks */
        const int NR = kn->nr;
        size_t ktf = (size_t)ceil_div(T, NR) * D * NR, vpf = (size_t)ceil_div(D, NR) * T * NR;
        float *apack = fo_alloc(pack_floats(D)), *kt = fo_alloc(ktf + vpf), *vp = kt ? kt + ktf : NULL;
        /* a head's queries, gathered: read in place by the tiles from rows a
         * whole c_attn row apart, they share a few cache sets and evict each
         * other (the keys and values are only packed, straight from there) */
        float *hq = gather ? fo_alloc((size_t)T * D) : NULL;
        int ok = S && acc && mrow && lrow && apack && kt && (!gather || hq);
        /* whole heads: each thread its own run first (a batch row's heads
         * read and write the rows the products around split to it); split
         * heads: one run for all, costliest first (as a dynamic schedule) */
        int nt = fo_team(), tid = fo_tid();
        int runs = split ? 1 : nt;
        if (tid < runs) start_run(head, (int)ntasks, tid, runs);
#ifdef _OPENMP
#pragma omp barrier
#endif
        for (long t; (t = next_task(head, (int)ntasks, split ? 0 : tid, runs)) >= 0;) {
            int bh = (int)(t % BH), ib1 = split ? nqb - 1 - (int)(t / BH) : nqb - 1;
            int ib0 = split ? ib1 : 0; /* the task's query blocks */
            ptrdiff_t off = (bh / H) * sb + (bh % H) * sh, yoff = (bh / H) * yb + (bh % H) * yh;
            int i1 = imin(T, (ib1 + 1) * BQ);
            if (!ok) continue;
            const float *qh = q + off; /* the head's queries, or their copy */
            ptrdiff_t ldh = st;
            if (gather) {
                gather_rows(hq, q + off, ib0 * BQ, i1, D, st);
                qh = hq, ldh = D;
            }
            pack_panels(kn, kt, (size_t)D * NR, k + off, 1, st, i1, D); /* K^T: D x i1 */
            pack_panels(kn, vp, (size_t)T * NR, v + off, st, 1, D, i1); /* V: i1 x D */
            for (int ib = ib0; ib <= ib1; ib++)
                fwd_block(kn, qh, y + yoff, lse + (size_t)bh * T, T, D, ldh, yt, ib * BQ,
                          scale, S, acc, mrow, lrow, apack, kt, vp);
        }
        fo_free(hq);
        fo_free(S); fo_free(acc); fo_free(mrow); fo_free(lrow);
        fo_free(apack); fo_free(kt);
    }
}

/* A backward task's panels: keys r0..r0+rk (K^T, V^T, K's rows), queries r0..T (Q, dY) */
static void pack_task(const kern_t *kn, bwd_panels *bp, const float *q, ptrdiff_t ldq,
                      const float *k, const float *v, ptrdiff_t ld, const float *dy, ptrdiff_t ldy,
                      int r0, int rk, int T, int D) {
    size_t ks = (size_t)D * kn->nr, rs = (size_t)T * kn->nr;
    pack_panels(kn, bp->kt, ks, k + r0 * ld, 1, ld, rk, D);
    pack_panels(kn, bp->vt, ks, v + r0 * ld, 1, ld, rk, D);
    pack_panels(kn, bp->kr, rs, k + r0 * ld, ld, 1, D, rk);
    pack_panels(kn, bp->qr, rs, q + r0 * ldq, ldq, 1, D, T - r0);
    pack_panels(kn, bp->dyr, rs, dy + r0 * ldy, ldy, 1, D, T - r0);
}

void fo_attention_backward(const float *dy, const float *q, const float *k,
                           const float *v, const float *y, const float *lse,
                           float *dq, float *dk, float *dv, int B, int H, int T, int D,
                           ptrdiff_t sb, ptrdiff_t sh, ptrdiff_t st, ptrdiff_t yb,
                           ptrdiff_t yh, ptrdiff_t yt) {
    const kern_t *kn = kern();
    attn_fwd_fn fwd_block;
    attn_bwd_fn bwd_block;
    attn_di_fn di_rows;
    attn_pick(kn, &fwd_block, &bwd_block, &di_rows);
    int BH = B * H, nkb = ceil_div(T, BK);
    float scale = 1.0f / sqrtf((float)D);
    size_t n = (size_t)BH * T * D;
    int nthreads = fo_nthreads();
    if ((double)BH * T * T * D <= 1e5) nthreads = 1;
    /* With enough heads, one task = one head and dQ is written directly.
     * With few heads (e.g. B*H = 1 at T = 2048) tasks are (head, key block)
     * and each thread accumulates dQ in a private copy ((B*H, T, D), packed),
     * summed at the end: extra memory = nthreads * |q| (still linear in T). */
    int split = nthreads > 1 && BH < 4 * nthreads;
    int gather = !split && (st != D || yt != D); /* each head's q and dy, as forward (not split) */
    int per_head = split ? nkb : 1;
    float *Di = fo_alloc((size_t)BH * T);
    float *dqpriv = split ? fo_alloc(n * nthreads) : NULL;
    if (!Di || (split && !dqpriv)) { fo_free(Di); fo_free(dqpriv); return; }
    long ntasks = (long)BH * per_head;
    int head[16 * MAX_RUNS];
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        int nt = fo_team(), tid = fo_tid();
        if (!split) start_run(head, (int)ntasks, tid, nt); /* (seen after Di's barrier) */
        float *P = fo_alloc((size_t)BQ * BK), *dP = fo_alloc((size_t)BQ * BK);
        const int NR = kn->nr;
        size_t ktf = (size_t)ceil_div(T, NR) * D * NR, rowf = (size_t)ceil_div(D, NR) * T * NR;
        float *apack = fo_alloc(pack_floats(D)), *pk = fo_alloc(2 * ktf + 3 * rowf);
        bwd_panels bp = {pk, pk + ktf, pk + 2 * ktf, pk + 2 * ktf + rowf, pk + 2 * ktf + 2 * rowf, 0,
                         !split}; /* (split: each thread's dQ copy, zeroed, gets some key blocks) */
        float *h = gather ? fo_alloc((size_t)5 * T * D) : NULL; /* q dy dq dk dv */
        int ok = P && dP && apack && pk && (!gather || h);
        float *dqt = split ? dqpriv + n * fo_tid() : dq;
        /* Di = rowsum(dY * Y) (a barrier after it); split: each thread's dQ copy zeroed */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int bh = 0; bh < BH; bh++) {
            ptrdiff_t o = (bh / H) * yb + (bh % H) * yh;
            di_rows(dy + o, y + o, yt, Di + (size_t)bh * T, T, D);
        }
        if (split) memset(dqt, 0, sizeof(float) * n);
        /* Split: tasks in turn to the threads, not to whichever is free:
         * which key blocks a thread adds into its private dQ, and so the
         * order of the final sum, must not depend on timing (the same bits
         * every run). Whole heads: a run of them each (a batch row's, as
         * forward), then help the others (a head's sums are its own). */
        for (long t = split ? tid : next_task(head, (int)ntasks, tid, nt); t >= 0 && t < ntasks;
             t = split ? t + nt : next_task(head, (int)ntasks, tid, nt)) {
            /* key block 0 sees every query: do the big ones first */
            int bh = (int)(t % BH), jb_first = (int)(t / BH);
            int jb_last = split ? jb_first : nkb - 1;
            ptrdiff_t off = (bh / H) * sb + (bh % H) * sh, yoff = (bh / H) * yb + (bh % H) * yh;
            float *dqh = split ? dqt + (size_t)bh * T * D : dq + off;
            if (!ok) continue;
            /* the task's keys (blocks jb_first..jb_last) and the queries that see them */
            int r0 = jb_first * BK, rk = imin(T, (jb_last + 1) * BK) - r0;
            bp.r0 = r0;
            if (!gather) {
                pack_task(kn, &bp, q + off, st, k + off, v + off, st, dy + yoff, yt, r0, rk, T, D);
                for (int jb = jb_first; jb <= jb_last; jb++)
                    bwd_block(kn, q + off, dy + yoff, lse + (size_t)bh * T,
                              Di + (size_t)bh * T, dqh, dk + off, dv + off, T, D, st, yt, st,
                              split ? D : st, jb * BK, scale, P, dP, apack, &bp);
                continue;
            }
            /* the whole head (one task, not split): Q and dY, read in place by the
             * tiles, gathered; K and V only packed, from where they are */
            float *g[5];
            for (int i = 0; i < 5; i++) g[i] = h + (size_t)i * T * D;
            gather_rows(g[0], q + off, 0, T, D, st);
            gather_rows(g[1], dy + yoff, 0, T, D, yt);
            pack_task(kn, &bp, g[0], D, k + off, v + off, st, g[1], D, 0, T, T, D);
            for (int jb = 0; jb < nkb; jb++)
                bwd_block(kn, g[0], g[1], lse + (size_t)bh * T, Di + (size_t)bh * T,
                          g[2], g[3], g[4], T, D, D, D, D, D, jb * BK, scale, P, dP, apack, &bp);
            scatter_rows(dq + off, st, g[2], 0, T, D);
            scatter_rows(dk + off, st, g[3], 0, T, D);
            scatter_rows(dv + off, st, g[4], 0, T, D);
        }
        if (split) {
            /* sum the team's private dQ copies (each zeroed by its thread) */
#ifdef _OPENMP
#pragma omp barrier
#pragma omp for schedule(static)
#endif
            for (long row = 0; row < (long)BH * T; row++) {
                int bh = (int)(row / T), t = (int)(row % T);
                float *d = dq + (bh / H) * sb + (bh % H) * sh + t * st;
                for (int c = 0; c < D; c++) {
                    float s = 0.0f;
                    for (int th = 0; th < nt; th++) s += dqpriv[n * th + row * D + c];
                    d[c] = s;
                }
            }
        }
        fo_free(P); fo_free(dP); fo_free(apack); fo_free(pk); fo_free(h);
    }
    fo_free(Di);
    fo_free(dqpriv);
}

/* ------------------------------------------------------------------------ */
/* GELU (GPT-2's tanh approximation) and LayerNorm                          */
/* ------------------------------------------------------------------------ */

/* gelu(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).
 * With e = exp(2u) and s = 2 / (e + 1): 1 - tanh(u) = s and 1 + tanh(u) = e s,
 * both without cancellation (so 1 - tanh^2 = s e s stays accurate where tanh
 * is near +-1). exp_inplace clamps 2u to [-87, 88], where tanh is already
 * +-1 in float32, so large |x| cannot overflow; but then y = x e^-87, not
 * the -0 it rounds to, and below x = -1e30 that is more than 1e-8 (-4.9 at
 * -3e38): there y is -0, GELU_ZERO_BELOW. The element-wise loops work
 * on chunks of GELU_CHUNK values, the exps of a chunk in a stack buffer, so
 * that every loop vectorises. */
#define GELU_CHUNK 512

FO_INLINE void gelu_exp_chunk(const float *x, float *e, int n) {
    for (int i = 0; i < n; i++) {
        float v = x[i];
        e[i] = 2.0f * GELU_C * (v + GELU_A * (v * v * v));
    }
    exp_inplace(e, n);
}

FO_INLINE void gelu_fwd_block(const float *x, float *y, int n) {
    float e[GELU_CHUNK];
    gelu_exp_chunk(x, e, n);
    for (int i = 0; i < n; i++) {
        float s = 2.0f / (e[i] + 1.0f);
        y[i] = x[i] < GELU_ZERO_BELOW ? -0.0f : 0.5f * x[i] * (e[i] * s);
    }
}

/* d gelu / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2) */
FO_INLINE void gelu_bwd_block(const float *dy, const float *x, float *dx, int n) {
    float e[GELU_CHUNK];
    gelu_exp_chunk(x, e, n);
    for (int i = 0; i < n; i++) {
        /* the second term is 0 in float32 for |x| > 20: clamp x there so
         * that x^2 cannot overflow (inf * 0 = nan) */
        float v = x[i] < -20.0f ? -20.0f : (x[i] > 20.0f ? 20.0f : x[i]);
        float s = 2.0f / (e[i] + 1.0f), onept = e[i] * s;
        float du = GELU_C * (1.0f + 3.0f * GELU_A * (v * v));
        dx[i] = dy[i] * (0.5f * onept + 0.5f * v * (s * onept) * du);
    }
}

/* LayerNorm of one row of C values: mean and rstd saved for the backward. */
FO_INLINE void ln_fwd_row(const float *x, const float *w, const float *b, float *y,
                          float *mean, float *rstd, int C, float eps) {
    float m = row_sum(x, C) / (float)C;
    ACC16(s, 0.0f);
    int c = 0;
    for (; c + 16 <= C; c += 16) ACC_ADD(s, (LANES(x + c) - m) * (LANES(x + c) - m));
    for (; c < C; c++) { float d = x[c] - m; s[0] += d * d; }
    float r = 1.0f / sqrtf(FOLD_SUM(s) / (float)C + eps);
    for (c = 0; c < C; c++) y[c] = (x[c] - m) * r * w[c] + b[c];
    *mean = m;
    *rstd = r;
}

/* Backward of one row: dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)),
 * dxhat = dy w; adds dy xhat to dw and dy to db. xhat is recomputed where it
 * is used rather than kept: two passes over the row, each vectorised. */
FO_INLINE void ln_bwd_row(const float *FO_RESTRICT dy, const float *FO_RESTRICT x,
                          const float *FO_RESTRICT w, float mean, float rstd,
                          float *FO_RESTRICT dx, float *FO_RESTRICT dw, float *FO_RESTRICT db,
                          int C) {
    ACC16(s1, 0.0f);
    ACC16(s2, 0.0f);
    int c = 0;
    for (; c + 16 <= C; c += 16)     /* one sum a loop: two at once defeat gcc's vectoriser */
        ACC_ADD(s1, LANES(dy + c) * LANES(w + c));
    for (; c < C; c++) s1[0] += dy[c] * w[c];
    for (c = 0; c + 16 <= C; c += 16)
        ACC_ADD(s2, LANES(dy + c) * LANES(w + c) * ((LANES(x + c) - mean) * rstd));
    for (; c < C; c++) s2[0] += dy[c] * w[c] * ((x[c] - mean) * rstd);
    float m1 = FOLD_SUM(s1) / (float)C, m2 = FOLD_SUM(s2) / (float)C;
    for (c = 0; c < C; c++) {
        float xh = (x[c] - mean) * rstd;
        dx[c] = rstd * (dy[c] * w[c] - m1 - xh * m2);
        dw[c] += dy[c] * xh;
        db[c] += dy[c];
    }
}

/* per-ISA copies, as for attention */
#define DEFINE_ELEMWISE(SUFFIX, TARGET) \
    TARGET static void gelu_fwd##SUFFIX(const float *x, float *y, int n) { gelu_fwd_block(x, y, n); } \
    TARGET static void gelu_bwd##SUFFIX(const float *dy, const float *x, float *dx, int n) { \
        gelu_bwd_block(dy, x, dx, n); } \
    TARGET static void ln_fwd##SUFFIX(const float *x, const float *w, const float *b, float *y, \
                                      float *mean, float *rstd, int M, int C, float eps) { \
        for (int r = 0; r < M; r++) \
            ln_fwd_row(x + (size_t)r * C, w, b, y + (size_t)r * C, mean + r, rstd + r, C, eps); } \
    TARGET static void ln_bwd##SUFFIX(const float *dy, const float *x, const float *w, \
                                      const float *mean, const float *rstd, float *dx, float *dw, \
                                      float *db, int M, int C) { \
        for (int r = 0; r < M; r++) \
            ln_bwd_row(dy + (size_t)r * C, x + (size_t)r * C, w, mean[r], rstd[r], \
                       dx + (size_t)r * C, dw, db, C); }
DEFINE_ELEMWISE(_generic, )
#if FO_X86
DEFINE_ELEMWISE(_avx512, __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))))
DEFINE_ELEMWISE(_avx2, __attribute__((target("avx2,fma"))))
#endif

typedef struct {
    void (*gelu_fwd)(const float *, float *, int);
    void (*gelu_bwd)(const float *, const float *, float *, int);
    void (*ln_fwd)(const float *, const float *, const float *, float *, float *, float *, int,
                   int, float);
    void (*ln_bwd)(const float *, const float *, const float *, const float *, const float *,
                   float *, float *, float *, int, int);
} elem_t;

static elem_t elem_pick(void) {
    elem_t e = {gelu_fwd_generic, gelu_bwd_generic, ln_fwd_generic, ln_bwd_generic};
#if FO_X86
    const kern_t *kn = kern();
    if (kn == &KERN_AVX512) {
        elem_t a = {gelu_fwd_avx512, gelu_bwd_avx512, ln_fwd_avx512, ln_bwd_avx512};
        e = a;
    }
    if (kn == &KERN_AVX2) {
        elem_t a = {gelu_fwd_avx2, gelu_bwd_avx2, ln_fwd_avx2, ln_bwd_avx2};
        e = a;
    }
#endif
    return e;
}

/* y[n] = gelu(x[n]) */
void fo_gelu_forward(const float *x, float *y, long n) {
    elem_t e = elem_pick();
    long nchunks = (n + GELU_CHUNK - 1) / GELU_CHUNK;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n > 65536)
#endif
    for (long ch = 0; ch < nchunks; ch++) {
        long i = ch * GELU_CHUNK;
        e.gelu_fwd(x + i, y + i, (int)(n - i < GELU_CHUNK ? n - i : GELU_CHUNK));
    }
}

/* dx[n] = dy[n] * gelu'(x[n]) */
void fo_gelu_backward(const float *dy, const float *x, float *dx, long n) {
    elem_t e = elem_pick();
    long nchunks = (n + GELU_CHUNK - 1) / GELU_CHUNK;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n > 65536)
#endif
    for (long ch = 0; ch < nchunks; ch++) {
        long i = ch * GELU_CHUNK;
        e.gelu_bwd(dy + i, x + i, dx + i, (int)(n - i < GELU_CHUNK ? n - i : GELU_CHUNK));
    }
}

/* y[M,C] = (x - mean) * rstd * w + b per row; mean[M], rstd[M] saved */
void fo_layernorm_forward(const float *x, const float *w, const float *b, float *y,
                          float *mean, float *rstd, int M, int C, float eps) {
    elem_t e = elem_pick();
    int nth = (double)M * C > 65536 ? fo_nthreads() : 1;
    OMP_ONLY(nth);
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int nt = fo_team(), tid = fo_tid();
        int r0 = (int)((long)M * tid / nt), r1 = (int)((long)M * (tid + 1) / nt);
        e.ln_fwd(x + (size_t)r0 * C, w, b, y + (size_t)r0 * C, mean + r0, rstd + r0, r1 - r0,
                 C, eps);
    }
}

/* Given dy[M,C] and the forward's x, w, mean, rstd: dx[M,C], and dw[C], db[C]
 * (OVERWRITTEN). Each thread sums its rows' dw, db privately; then added up. */
void fo_layernorm_backward(const float *dy, const float *x, const float *w,
                           const float *mean, const float *rstd, float *dx, float *dw,
                           float *db, int M, int C) {
    elem_t e = elem_pick();
    int nth = (double)M * C > 65536 ? fo_nthreads() : 1;
    float *priv = fo_alloc((size_t)2 * C * nth);
    if (!priv) return;
    memset(priv, 0, sizeof(float) * 2 * C * nth); /* all: OpenMP may give fewer threads */
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int nt = fo_team(), tid = fo_tid();
        float *pw = priv + (size_t)2 * C * tid, *pb = pw + C;
        int r0 = (int)((long)M * tid / nt), r1 = (int)((long)M * (tid + 1) / nt);
        e.ln_bwd(dy + (size_t)r0 * C, x + (size_t)r0 * C, w, mean + r0, rstd + r0,
                 dx + (size_t)r0 * C, pw, pb, r1 - r0, C);
    }
    for (int c = 0; c < C; c++) {
        float sw = 0.0f, sb = 0.0f;
        for (int t = 0; t < nth; t++) {
            sw += priv[(size_t)2 * C * t + c];
            sb += priv[(size_t)2 * C * t + C + c];
        }
        dw[c] = sw;
        db[c] = sb;
    }
    fo_free(priv);
}

/* ------------------------------------------------------------------------ */
/* The optimizer: global gradient norm and AdamW over all parameters, each  */
/* one C call. The n arrays are seen as one range of elements, split evenly */
/* between the threads, so small and large arrays alike are spread.         */
/* ------------------------------------------------------------------------ */

/* Calls body(a, i0, i1) for the part [i0, i1) of array a that falls in this
 * thread's share [lo, hi) of all the elements. */
#define FO_FOR_SHARE(n, size, lo, hi, body)                                      \
    do {                                                                         \
        long base_ = 0;                                                          \
        for (int a = 0; a < (n) && base_ < (hi); base_ += (size)[a], a++) {      \
            long i0 = (lo) > base_ ? (lo) - base_ : 0;                           \
            long i1 = (hi) - base_ < (size)[a] ? (hi) - base_ : (size)[a];       \
            if (i0 < i1) body;                                                   \
        }                                                                        \
    } while (0)

FO_INLINE double sumsq_block(const float *x, long n) {
    double total = 0.0;
    for (long c = 0; c < n; c += 4096) { /* float lanes per 4096, then double */
        long e = n - c < 4096 ? n - c : 4096;
        float s[16] = {0};
        long i = 0;
        for (; i + 16 <= e; i += 16)
            for (int l = 0; l < 16; l++) s[l] += x[c + i + l] * x[c + i + l];
        for (; i < e; i++) s[0] += x[c + i] * x[c + i];
        double t = 0.0;
        for (int l = 0; l < 16; l++) t += s[l];
        if (!(t <= 1e300)) { /* a square past float's range (or a NaN): this chunk in double */
            t = 0.0;
            for (i = 0; i < e; i++) t += (double)x[c + i] * x[c + i];
        }
        total += t;
    }
    return total;
}

/* m = b1 m + (1-b1) g,  v = b2 v + (1-b2) g^2  (g = gscale * grad),
 * p *= 1 - lr wd (matrices only),  p -= (lr / c1) m / (sqrt(v / c2) + eps):
 * llm.AdamW.step, in float32, in the same order. */
FO_INLINE void adamw_block(float *p, const float *g, float *m, float *v, long n, float b1,
                           float b2, float eps, float decay, float step, float c2, float gscale) {
    const float ob1 = 1.0f - b1, ob2 = 1.0f - b2;
    for (long i = 0; i < n; i++) {
        float gi = g[i] * gscale;
        float mi = m[i] * b1 + ob1 * gi;
        float vi = v[i] * b2 + ob2 * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step * mi / (sqrtf(vi / c2) + eps);
    }
}

#define DEFINE_OPTIM(SUFFIX, TARGET)                                                        \
    TARGET static double sumsq##SUFFIX(const float *x, long n) { return sumsq_block(x, n); } \
    TARGET static void adamw##SUFFIX(float *p, const float *g, float *m, float *v, long n,  \
                                     float b1, float b2, float eps, float decay, float step, \
                                     float c2, float gscale) {                               \
        adamw_block(p, g, m, v, n, b1, b2, eps, decay, step, c2, gscale); }
DEFINE_OPTIM(_generic, )
#if FO_X86
DEFINE_OPTIM(_avx512, __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))))
DEFINE_OPTIM(_avx2, __attribute__((target("avx2,fma"))))
#endif

typedef double (*sumsq_fn)(const float *, long);
typedef void (*adamw_fn)(float *, const float *, float *, float *, long, float, float, float,
                         float, float, float, float);

static void optim_pick(sumsq_fn *s, adamw_fn *a) {
    *s = sumsq_generic;
    *a = adamw_generic;
#if FO_X86
    const kern_t *kn = kern();
    if (kn == &KERN_AVX512) { *s = sumsq_avx512; *a = adamw_avx512; }
    if (kn == &KERN_AVX2) { *s = sumsq_avx2; *a = adamw_avx2; }
#endif
}

static long total_size(int n, const long *size) {
    long t = 0;
    for (int a = 0; a < n; a++) t += size[a];
    return t;
}

/* sum over the n arrays of x^2, in double */
double fo_sumsq(int n, float *const *x, const long *size) {
    sumsq_fn sq;
    adamw_fn aw;
    optim_pick(&sq, &aw);
    long total = total_size(n, size);
    int nth = total > 65536 ? fo_nthreads() : 1;
    double part[MAX_RUNS] = {0};
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int nt = fo_team(), tid = fo_tid();
        long lo = total * tid / nt, hi = total * (tid + 1) / nt;
        double s = 0.0;
        FO_FOR_SHARE(n, size, lo, hi, s += sq(x[a] + i0, i1 - i0));
        part[tid] = s;
    }
    double s = 0.0;
    for (int t = 0; t < nth; t++) s += part[t]; /* fixed order: deterministic */
    return s;
}

/* One AdamW step over n parameter arrays (p, m, v updated in place);
 * decay[a] says whether array a is weight-decayed; gscale multiplies every
 * gradient (the clipping factor; 1 for none). c1, c2: bias corrections. */
void fo_adamw(int n, float *const *p, float *const *g, float *const *m, float *const *v,
              const long *size, const int *decay, float lr, float beta1, float beta2,
              float eps, float weight_decay, float c1, float c2, float gscale) {
    sumsq_fn sq;
    adamw_fn aw;
    optim_pick(&sq, &aw);
    long total = total_size(n, size);
    int nth = total > 32768 ? fo_nthreads() : 1;
    OMP_ONLY(nth);
    float step = lr / c1, shrink = 1.0f - lr * weight_decay;
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int nt = fo_team(), tid = fo_tid();
        long lo = total * tid / nt, hi = total * (tid + 1) / nt;
        FO_FOR_SHARE(n, size, lo, hi,
                     aw(p[a] + i0, g[a] + i0, m[a] + i0, v[a] + i0, i1 - i0, beta1, beta2, eps,
                        decay[a] ? shrink : 1.0f, step, c2, gscale));
    }
}

/* ------------------------------------------------------------------------ */
/* Softmax with cross-entropy, fused: one row of logits is read once, and   */
/* the gradient is written in the same pass (the loss's gradient is known   */
/* before the backward starts: d loss / d logits = softmax - onehot).       */
/* ------------------------------------------------------------------------ */
FO_INLINE void ce_row(const float *x, int64_t target, float w, float *loss, float *d, int V,
                      float dscale) {
    float mx = row_max(x, V, -INFINITY);
    for (int c = 0; c < V; c++) d[c] = x[c] - mx;
    exp_inplace(d, V);
    float sum = row_sum(d, V);
    *loss = logf(sum) - (x[target] - mx);          /* -log softmax(x)[target] */
    float g = w * dscale, s = g / sum;
    for (int c = 0; c < V; c++) d[c] *= s;
    d[target] -= g;
}

#define DEFINE_CE(SUFFIX, TARGET)                                                           \
    TARGET static void ce_rows##SUFFIX(const float *x, const int64_t *t, const float *w,    \
                                       float *loss, float *d, int M, int V, float dscale) { \
        for (int r = 0; r < M; r++)                                                         \
            ce_row(x + (size_t)r * V, t[r], w ? w[r] : 1.0f, loss + r, d + (size_t)r * V,   \
                   V, dscale); }
DEFINE_CE(_generic, )
#if FO_X86
DEFINE_CE(_avx512, __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))))
DEFINE_CE(_avx2, __attribute__((target("avx2,fma"))))
#endif

/* logits[M,V], targets[M] in 0..V-1 (checked by the caller), weights[M] or
 * NULL (all 1): loss[r] = -log softmax(logits[r])[targets[r]], and
 * dlogits[r] = (softmax(logits[r]) - onehot(targets[r])) * weights[r] * dscale. */
void fo_cross_entropy(const float *logits, const int64_t *targets, const float *weights,
                      float *loss, float *dlogits, float dscale, int M, int V) {
    void (*rows)(const float *, const int64_t *, const float *, float *, float *, int, int,
                 float) = ce_rows_generic;
#if FO_X86
    const kern_t *kn = kern();
    if (kn == &KERN_AVX512) rows = ce_rows_avx512;
    if (kn == &KERN_AVX2) rows = ce_rows_avx2;
#endif
    int nth = (double)M * V > 65536 ? fo_nthreads() : 1;
    OMP_ONLY(nth);
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int nt = fo_team(), tid = fo_tid();
        int r0 = (int)((long)M * tid / nt), r1 = (int)((long)M * (tid + 1) / nt);
        rows(logits + (size_t)r0 * V, targets + r0, weights ? weights + r0 : NULL, loss + r0,
             dlogits + (size_t)r0 * V, r1 - r0, V, dscale);
    }
}

/* ------------------------------------------------------------------------ */
/* The token embedding's backward: dwte[idx[n]] += dx[n] for n = 0, 1, ...   */
/* in that order, as NumPy's add.at (the same sums: the same bits), each     */
/* thread on its own columns, so repeated tokens never race.                 */
/* ------------------------------------------------------------------------ */
FO_INLINE void add_row(float *FO_RESTRICT acc, const float *FO_RESTRICT d, int n) {
    for (int j = 0; j < n; j++) acc[j] += d[j];
}

#define DEFINE_EMB(SUFFIX, TARGET)                                                            \
    TARGET static void emb_cols##SUFFIX(float *dwte, const int64_t *idx, const float *dx,     \
                                        long N, int C, int j0, int j1) {                      \
        for (long n = 0; n < N; n++)                                                          \
            add_row(dwte + (size_t)idx[n] * C + j0, dx + (size_t)n * C + j0, j1 - j0); }
DEFINE_EMB(_generic, )
#if FO_X86
DEFINE_EMB(_avx512, __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))))
DEFINE_EMB(_avx2, __attribute__((target("avx2,fma"))))
#endif

/* dwte[V,C] (accumulated into), idx[N] in 0..V-1 (checked by the caller), dx[N,C] */
void fo_embedding_backward(float *dwte, const int64_t *idx, const float *dx, long N, int C) {
    void (*cols)(float *, const int64_t *, const float *, long, int, int, int) = emb_cols_generic;
#if FO_X86
    const kern_t *kn = kern();
    if (kn == &KERN_AVX512) cols = emb_cols_avx512;
    if (kn == &KERN_AVX2) cols = emb_cols_avx2;
#endif
    int strips = ceil_div(C, 16); /* 16 columns: a cache line of each row */
    int nth = (double)N * C > 65536 ? imin(fo_nthreads(), strips) : 1;
    OMP_ONLY(nth);
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int nt = fo_team(), tid = fo_tid();
        int j0 = imin(C, (int)((long)strips * tid / nt) * 16);
        int j1 = imin(C, (int)((long)strips * (tid + 1) / nt) * 16);
        if (j0 < j1) cols(dwte, idx, dx, N, C, j0, j1);
    }
}

/* ------------------------------------------------------------------------ */
/* Generation: a new token of each of B rows through the whole model in one */
/* call. A token's work is ~100 small calls; from Python each costs several */
/* times its own time at batch 1 (the products stream the weights through  */
/* the caches and evict the interpreter's state in between). Here the       */
/* kernels above run in the order GPT.hidden and next_logits call them, on  */
/* the same operands: the same logits (B, V), bit for bit. w: per layer the */
/* 12 arrays of param_shapes, in its order; k, v: per layer the KV cache's  */
/* (B, H, cap, D), where position `past` (the new tokens') is written;      */
/* (rsh, csh): wte^T's strides as fo_linear_forward takes them.             */
/* ------------------------------------------------------------------------ */
void fo_decode_token(int L, int C, int H, int V, int B, const int64_t *tokens, int past,
                     const float *wte, const float *wpe, const float *const *w,
                     const float *lnf_w, const float *lnf_b, float *const *k, float *const *v,
                     int cap, ptrdiff_t rsh, ptrdiff_t csh, float *logits) {
    int D = C / H;
    size_t BC = (size_t)B * C;
    float *x = fo_alloc(15 * BC + 2 * (size_t)B);
    if (!x) return; /* out of memory: recorded by fo_alloc */
    float *h = x + BC, *qkv = h + BC, *y = qkv + 3 * BC, *y2 = y + BC, *f = y2 + BC, *g = f + 4 * BC;
    float *mean = g + 4 * BC, *rstd = mean + B;
    for (int b = 0; b < B; b++)
        for (int c = 0; c < C; c++) x[b * C + c] = wte[tokens[b] * C + c] + wpe[(size_t)past * C + c];
    for (int l = 0; l < L; l++) {
        const float *const *p = w + 12 * l;
        /* x + attn(ln_1(x)) */
        fo_layernorm_forward(x, p[0], p[1], h, mean, rstd, B, C, 1e-5f);
        fo_linear_forward(h, p[2], p[3], qkv, B, C, 3 * C);
        for (int b = 0; b < B; b++) /* the new position's keys and values, into the cache */
            for (int hd = 0; hd < H; hd++) {
                size_t at = (((size_t)b * H + hd) * cap + past) * D;
                memcpy(k[l] + at, qkv + (size_t)b * 3 * C + C + hd * D, sizeof(float) * D);
                memcpy(v[l] + at, qkv + (size_t)b * 3 * C + 2 * C + hd * D, sizeof(float) * D);
            }
        fo_attention_decode(qkv, k[l], v[l], y, B, H, 1, past + 1, D, 3 * C, D, 3 * C,
                            (ptrdiff_t)H * cap * D, (ptrdiff_t)cap * D, D, C, D, C);
        fo_linear_forward(y, p[4], p[5], y2, B, C, C);
        for (size_t i = 0; i < BC; i++) x[i] += y2[i];
        /* x + mlp(ln_2(x)) */
        fo_layernorm_forward(x, p[6], p[7], h, mean, rstd, B, C, 1e-5f);
        fo_linear_forward(h, p[8], p[9], f, B, C, 4 * C);
        fo_gelu_forward(f, g, 4 * (long)BC);
        fo_linear_forward(g, p[10], p[11], y2, B, 4 * C, C);
        for (size_t i = 0; i < BC; i++) x[i] += y2[i];
    }
    fo_layernorm_forward(x, lnf_w, lnf_b, h, mean, rstd, B, C, 1e-5f);
    fo_sgemm(B, V, C, h, C, 1, wte, rsh, csh, logits, V, 0, NULL); /* the head: h wte^T */
    fo_free(x);
}

#endif /* !__CUDACC__ : end of CPU section */

#ifdef __CUDACC__
/* ======================================================================== */
/* CUDA section: the same fo_* functions on DEVICE pointers                 */
/* ======================================================================== */
/* Built by `python build_ext.py --cuda` (nvcc -x cu) into _fastops_cuda.so,
 * loaded by llm.py with cffi's ABI mode. Every kernel runs on the legacy
 * default stream (CuPy's default), so it is ordered with CuPy's own work.
 * Launch errors are recorded, not printed: fo_cuda_error() returns (and
 * clears) the first one, fo_cuda_sync() waits for the GPU and does the same.
 * Plain fp32 CUDA cores, no cuBLAS and no tensor cores: the GEMM is a
 * classic shared-memory tiled kernel, the attention FlashAttention-style
 * (one thread per query row, online softmax, lse kept for the backward),
 * GELU one thread per element, LayerNorm one warp per row. */
#include <cuda_runtime.h>
#include <stdio.h>

#define LOG2E 1.44269504088896341f
#define LN2 0.69314718055994531f

static char fo_err_msg[512], fo_err_out[512];

static void fo_check(const char *where) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess && !fo_err_msg[0])
        snprintf(fo_err_msg, sizeof fo_err_msg, "%s: %s", where, cudaGetErrorString(e));
}
static void fo_fail(const char *msg) {
    if (!fo_err_msg[0]) snprintf(fo_err_msg, sizeof fo_err_msg, "%s", msg);
}

extern "C" const char *fo_cuda_error(void) {
    if (!fo_err_msg[0]) return NULL;
    memcpy(fo_err_out, fo_err_msg, sizeof fo_err_out);
    fo_err_msg[0] = 0;
    return fo_err_out;
}
extern "C" const char *fo_cuda_sync(void) {
    cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess && !fo_err_msg[0])
        snprintf(fo_err_msg, sizeof fo_err_msg, "fo_cuda_sync: %s", cudaGetErrorString(e));
    return fo_cuda_error();
}
extern "C" const char *fo_isa(void) { return "cuda"; }

static int cdiv(int a, int b) { return (a + b - 1) / b; }

/* ---- GEMM: C[M,N] (+)= A[M,K] . B[K,N] (+ bias), general strides ---------- */
/* A block computes a 128 x 128 tile of C with 256 threads, 8 x 8 outputs
 * each (rows ty*4+r and 64+ty*4+r, columns likewise: float4 reads of the
 * shared tiles without bank conflicts). K advances 8 at a time. Loads follow
 * whichever stride is 1, so a transposed operand is read coalesced too. */
#define GBM 128
#define GBN 128
#define GBK 8

__global__ __launch_bounds__(256) void sgemm_kernel(
    int M, int N, int K, const float *__restrict__ A, ptrdiff_t rsa, ptrdiff_t csa,
    const float *__restrict__ B, ptrdiff_t rsb, ptrdiff_t csb, float *C, ptrdiff_t ldc,
    int accumulate, const float *__restrict__ bias) {
    __shared__ __align__(16) float As[GBK][GBM + 4];
    __shared__ __align__(16) float Bs[GBK][GBN + 4];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int i0 = blockIdx.y * GBM, j0 = blockIdx.x * GBN;
    float acc[8][8];
#pragma unroll
    for (int r = 0; r < 8; r++)
#pragma unroll
        for (int c = 0; c < 8; c++) acc[r][c] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += GBK) {
#pragma unroll
        for (int e = tid; e < GBM * GBK; e += 256) {
            int i, k;
            if (csa == 1) { i = e / GBK; k = e % GBK; } else { k = e / GBM; i = e % GBM; }
            int gi = i0 + i, gk = k0 + k;
            As[k][i] = (gi < M && gk < K) ? A[gi * rsa + gk * csa] : 0.0f;
        }
#pragma unroll
        for (int e = tid; e < GBN * GBK; e += 256) {
            int j, k;
            if (csb == 1) { k = e / GBN; j = e % GBN; } else { j = e / GBK; k = e % GBK; }
            int gj = j0 + j, gk = k0 + k;
            Bs[k][j] = (gj < N && gk < K) ? B[gk * rsb + gj * csb] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < GBK; k++) {
            float4 a0 = *(const float4 *)&As[k][ty * 4], a1 = *(const float4 *)&As[k][64 + ty * 4];
            float4 b0 = *(const float4 *)&Bs[k][tx * 4], b1 = *(const float4 *)&Bs[k][64 + tx * 4];
            float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int r = 0; r < 8; r++)
#pragma unroll
                for (int c = 0; c < 8; c++) acc[r][c] += a[r] * b[c];
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 8; r++) {
        int gi = i0 + (r < 4 ? ty * 4 + r : 64 + ty * 4 + r - 4);
        if (gi >= M) continue;
#pragma unroll
        for (int c = 0; c < 8; c++) {
            int gj = j0 + (c < 4 ? tx * 4 + c : 64 + tx * 4 + c - 4);
            if (gj >= N) continue;
            float v = acc[r][c];
            float *dst = C + gi * ldc + gj;
            if (accumulate) v += *dst;
            if (bias) v += bias[gj];
            *dst = v;
        }
    }
}

extern "C" void fo_sgemm(int M, int N, int K, const float *A, ptrdiff_t rsa, ptrdiff_t csa,
                         const float *B, ptrdiff_t rsb, ptrdiff_t csb, float *C, ptrdiff_t ldc,
                         int accumulate, const float *bias) {
    if (M <= 0 || N <= 0) return;
    dim3 grid(cdiv(N, GBN), cdiv(M, GBM));
    if (grid.y > 65535) { fo_fail("fo_sgemm: M too large"); return; }
    sgemm_kernel<<<grid, 256>>>(M, N, K, A, rsa, csa, B, rsb, csb, C, ldc, accumulate, bias);
    fo_check("fo_sgemm");
}

/* y[M,N] = x[M,K] . w[K,N] + b[N]   (b may be NULL) */
extern "C" void fo_linear_forward(const float *x, const float *w, const float *b, float *y,
                                  int M, int K, int N) {
    fo_sgemm(M, N, K, x, K, 1, w, N, 1, y, N, 0, b);
}

/* db[N] = column sums of dy[M,N]: 32 columns x 32 row-strided partial sums
 * per block, then a sum over the 32 partials (fixed order: deterministic). */
__global__ void colsum_kernel(const float *__restrict__ dy, float *db, int M, int N) {
    __shared__ float part[32][33];
    int j = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (j < N)
        for (int i = threadIdx.y; i < M; i += 32) s += dy[(size_t)i * N + j];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < N) {
        float t = 0.0f;
        for (int r = 0; r < 32; r++) t += part[r][threadIdx.x];
        db[j] = t;
    }
}

extern "C" void fo_colsum(const float *dy, float *db, int M, int N) {
    if (N <= 0) return;
    colsum_kernel<<<cdiv(N, 32), dim3(32, 32)>>>(dy, db, M, N);
    fo_check("fo_colsum");
}

/* dx = dy . w^T (skipped if dx is NULL), dw = x^T . dy, db = colsum(dy) (if db) */
extern "C" void fo_linear_backward(const float *dy, const float *x, const float *w, float *dx,
                                   float *dw, float *db, int M, int K, int N) {
    if (dx) fo_sgemm(M, K, N, dy, N, 1, w, 1, N, dx, K, 0, NULL);
    fo_sgemm(K, N, M, x, 1, K, dy, N, 1, dw, N, 0, NULL);
    if (db) fo_colsum(dy, db, M, N);
}

/* ---- attention ------------------------------------------------------------ */
/* q, k, v, y, dy: (B*H, T, D) row-major; lse: (B*H, T). Head sizes up to 128
 * (DM = 32, 64 or 128 at compile time, rows zero-padded to DM). Scores are
 * kept in base 2 (q pre-scaled by scale*log2 e) so exp2f does the exps. */
#define AQ 64 /* query rows (forward, dQ) or key rows (dK, dV) per block */

/* rows [r0, r0+ROWS) of a (T, D) matrix into S (row stride ST), zero-padded */
template <int ROWS, int ST, int DM>
__device__ __forceinline__ void load_rows(float *S, const float *__restrict__ src, int r0,
                                          int T, int D, int half_stride) {
    for (int e = threadIdx.x; e < ROWS * DM; e += blockDim.x) {
        int r = e / DM, d = e % DM;
        /* half_stride > 0: the two halves of a row sit half_stride apart */
        int col = half_stride ? (d / (DM / 2)) * half_stride + d % (DM / 2) : d;
        S[r * ST + col] = (r0 + r < T && d < D) ? src[(size_t)(r0 + r) * D + d] : 0.0f;
    }
}

template <int N>
__device__ __forceinline__ float dotv(const float (&a)[N], const float *b) {
    const float4 *b4 = (const float4 *)b;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma unroll
    for (int d = 0; d < N / 4; d++) {
        float4 x = b4[d];
        s0 += a[4 * d] * x.x; s1 += a[4 * d + 1] * x.y;
        s2 += a[4 * d + 2] * x.z; s3 += a[4 * d + 3] * x.w;
    }
    return (s0 + s1) + (s2 + s3);
}

template <int N>
__device__ __forceinline__ void axpyv(float (&acc)[N], float p, const float *b) {
    const float4 *b4 = (const float4 *)b;
#pragma unroll
    for (int d = 0; d < N / 4; d++) {
        float4 x = b4[d];
        acc[4 * d] += p * x.x; acc[4 * d + 1] += p * x.y;
        acc[4 * d + 2] += p * x.z; acc[4 * d + 3] += p * x.w;
    }
}

/* Forward: block = (query block, head), thread = query row i. Keys j <= i in
 * tiles of TK rows in shared memory; online softmax in chunks of 16 keys:
 * running max m, running sum l of 2^(s - m), unnormalised output acc. */
template <int DM>
__global__ __launch_bounds__(AQ) void attn_fwd_kernel(
    const float *__restrict__ q, const float *__restrict__ k, const float *__restrict__ v,
    float *y, float *lse, int T, int D, float scale2) {
    const int TK = DM <= 64 ? 64 : 32;
    __shared__ __align__(16) float Ks[TK * DM], Vs[TK * DM];
    const int qb = gridDim.x - 1 - blockIdx.x; /* the costliest blocks first */
    const size_t off = (size_t)blockIdx.y * T * D;
    q += off; k += off; v += off; y += off; lse += (size_t)blockIdx.y * T;
    const int i = qb * AQ + threadIdx.x;
    const bool live = i < T;
    float qr[DM], acc[DM];
#pragma unroll
    for (int d = 0; d < DM; d++) {
        qr[d] = (live && d < D) ? q[(size_t)i * D + d] * scale2 : 0.0f;
        acc[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const int kend = min(T, qb * AQ + AQ);
    for (int j0 = 0; j0 < kend; j0 += TK) {
        __syncthreads();
        load_rows<TK, DM, DM>(Ks, k, j0, T, D, 0);
        load_rows<TK, DM, DM>(Vs, v, j0, T, D, 0);
        __syncthreads();
        const int nvalid = live ? min(TK, i - j0 + 1) : 0;
        for (int c = 0; c < nvalid; c += 16) {
            float s[16], cm = m;
#pragma unroll
            for (int u = 0; u < 16; u++) {
                s[u] = -INFINITY;
                if (c + u < nvalid) {
                    s[u] = dotv<DM>(qr, Ks + (c + u) * DM);
                    cm = fmaxf(cm, s[u]);
                }
            }
            const float alpha = exp2f(m - cm); /* 0 on the first chunk (m = -inf) */
            l *= alpha;
#pragma unroll
            for (int d = 0; d < DM; d++) acc[d] *= alpha;
            m = cm;
#pragma unroll
            for (int u = 0; u < 16; u++) {
                if (c + u < nvalid) {
                    const float p = exp2f(s[u] - m);
                    l += p;
                    axpyv<DM>(acc, p, Vs + (c + u) * DM);
                }
            }
        }
    }
    if (live) {
        const float inv = 1.0f / l;
#pragma unroll
        for (int d = 0; d < DM; d++)
            if (d < D) y[(size_t)i * D + d] = acc[d] * inv;
        lse[i] = m * LN2 + logf(l);
    }
}

/* Backward, part 1: block = (query block, head), thread = query row i.
 *   Di = rowsum(dY_i * Y_i)   (written to Di for part 2)
 *   P_ij = exp(S_ij - lse_i), dP_ij = dY_i . V_j, dS_ij = P_ij (dP_ij - Di) scale
 *   dQ_i = sum_j dS_ij K_j                                                    */
template <int DM>
__global__ __launch_bounds__(AQ) void attn_bwd_dq_kernel(
    const float *__restrict__ dy, const float *__restrict__ q, const float *__restrict__ k,
    const float *__restrict__ v, const float *__restrict__ y, const float *__restrict__ lse,
    float *dq, float *Di, int T, int D, float scale2, float scale) {
    const int TK = DM <= 64 ? 64 : 32;
    __shared__ __align__(16) float Ks[TK * DM], Vs[TK * DM];
    const int qb = gridDim.x - 1 - blockIdx.x;
    const size_t off = (size_t)blockIdx.y * T * D;
    dy += off; q += off; k += off; v += off; y += off; dq += off;
    lse += (size_t)blockIdx.y * T; Di += (size_t)blockIdx.y * T;
    const int i = qb * AQ + threadIdx.x;
    const bool live = i < T;
    float qr[DM], dyr[DM], dqr[DM], di = 0.0f;
#pragma unroll
    for (int d = 0; d < DM; d++) {
        const bool in = live && d < D;
        qr[d] = in ? q[(size_t)i * D + d] * scale2 : 0.0f;
        dyr[d] = in ? dy[(size_t)i * D + d] : 0.0f;
        di += in ? dyr[d] * y[(size_t)i * D + d] : 0.0f;
        dqr[d] = 0.0f;
    }
    if (live) Di[i] = di;
    const float l2 = live ? lse[i] * LOG2E : 0.0f;
    const int kend = min(T, qb * AQ + AQ);
    for (int j0 = 0; j0 < kend; j0 += TK) {
        __syncthreads();
        load_rows<TK, DM, DM>(Ks, k, j0, T, D, 0);
        load_rows<TK, DM, DM>(Vs, v, j0, T, D, 0);
        __syncthreads();
        const int nvalid = live ? min(TK, i - j0 + 1) : 0;
        for (int jj = 0; jj < nvalid; jj++) {
            const float p = exp2f(dotv<DM>(qr, Ks + jj * DM) - l2);
            const float dp = dotv<DM>(dyr, Vs + jj * DM);
            axpyv<DM>(dqr, p * (dp - di), Ks + jj * DM);
        }
    }
    if (live) {
#pragma unroll
        for (int d = 0; d < DM; d++)
            if (d < D) dq[(size_t)i * D + d] = dqr[d] * scale;
    }
}

/* Backward, part 2: block = (key block, head), two threads per key row j,
 * each holding half of the head dimension (k_j, v_j, dK_j, dV_j in
 * registers); dot products are completed with one shuffle. Query rows i >= j
 * stream through shared memory (each row's halves padded apart: no bank
 * conflicts between the two lanes of a pair).
 *   dV_j = sum_i P_ij dY_i,   dK_j = sum_i dS_ij Q_i                        */
template <int DM>
__global__ __launch_bounds__(2 * AQ) void attn_bwd_dkdv_kernel(
    const float *__restrict__ dy, const float *__restrict__ q, const float *__restrict__ k,
    const float *__restrict__ v, const float *__restrict__ lse, const float *__restrict__ Di,
    float *dk, float *dv, int T, int D, float scale2, float scale) {
    const int HD = DM / 2, HS = HD + 4, TQ = DM <= 64 ? 64 : 32;
    __shared__ __align__(16) float Qs[TQ * 2 * HS], dYs[TQ * 2 * HS];
    __shared__ float L2s[TQ], Ds[TQ];
    const int kb = blockIdx.x; /* key block 0 sees every query: it starts first */
    const size_t off = (size_t)blockIdx.y * T * D;
    dy += off; q += off; k += off; v += off; dk += off; dv += off;
    lse += (size_t)blockIdx.y * T; Di += (size_t)blockIdx.y * T;
    const int j = kb * AQ + (threadIdx.x >> 1), h = threadIdx.x & 1;
    const bool live = j < T;
    float kr[HD], vr[HD], dkr[HD], dvr[HD];
#pragma unroll
    for (int d = 0; d < HD; d++) {
        const int dd = h * HD + d;
        const bool in = live && dd < D;
        kr[d] = in ? k[(size_t)j * D + dd] * scale2 : 0.0f;
        vr[d] = in ? v[(size_t)j * D + dd] : 0.0f;
        dkr[d] = dvr[d] = 0.0f;
    }
    for (int i0 = kb * AQ; i0 < T; i0 += TQ) {
        __syncthreads();
        load_rows<TQ, 2 * HS, DM>(Qs, q, i0, T, D, HS);
        load_rows<TQ, 2 * HS, DM>(dYs, dy, i0, T, D, HS);
        for (int r = threadIdx.x; r < TQ; r += blockDim.x) {
            const bool in = i0 + r < T;
            L2s[r] = in ? lse[i0 + r] * LOG2E : 0.0f;
            Ds[r] = in ? Di[i0 + r] : 0.0f;
        }
        __syncthreads();
        for (int ii = 0; ii < TQ; ii++) {
            const int i = i0 + ii;
            const float *qrow = Qs + ii * 2 * HS + h * HS, *dyrow = dYs + ii * 2 * HS + h * HS;
            float s = dotv<HD>(kr, qrow);
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            float dp = dotv<HD>(vr, dyrow);
            dp += __shfl_xor_sync(0xffffffffu, dp, 1);
            const float p = (live && i >= j && i < T) ? exp2f(s - L2s[ii]) : 0.0f;
            axpyv<HD>(dvr, p, dyrow);
            axpyv<HD>(dkr, p * (dp - Ds[ii]), qrow);
        }
    }
    if (live) {
#pragma unroll
        for (int d = 0; d < HD; d++) {
            const int dd = h * HD + d;
            if (dd < D) {
                dk[(size_t)j * D + dd] = dkr[d] * scale;
                dv[(size_t)j * D + dd] = dvr[d];
            }
        }
    }
}

static int attn_dm(int BH, int T, int D, const char *where) {
    if (BH > 65535) { fo_fail("attention: B*H > 65535 is not supported"); return 0; }
    if (D <= 32) return 32;
    if (D <= 64) return 64;
    if (D <= 128) return 128;
    char msg[128];
    snprintf(msg, sizeof msg, "%s: head size %d > 128 is not supported", where, D);
    fo_fail(msg);
    (void)T;
    return 0;
}

/* the GPU kernels read and write heads packed, (B, H, T, D): llm.py passes them so */
static int attn_packed(int H, int T, int D, ptrdiff_t sb, ptrdiff_t sh, ptrdiff_t st,
                       ptrdiff_t yb, ptrdiff_t yh, ptrdiff_t yt, const char *where) {
    ptrdiff_t packed[3] = {(ptrdiff_t)H * T * D, (ptrdiff_t)T * D, D};
    if (sb == packed[0] && sh == packed[1] && st == packed[2] && yb == packed[0] &&
        yh == packed[1] && yt == packed[2])
        return 1;
    char msg[128];
    snprintf(msg, sizeof msg, "%s: heads must be packed (B, H, T, D) on the GPU", where);
    fo_fail(msg);
    return 0;
}

extern "C" void fo_attention_forward(const float *q, const float *k, const float *v, float *y,
                                     float *lse, int B, int H, int T, int D, ptrdiff_t sb,
                                     ptrdiff_t sh, ptrdiff_t st, ptrdiff_t yb, ptrdiff_t yh,
                                     ptrdiff_t yt) {
    int BH = B * H;
    if (BH <= 0 || T <= 0) return;
    if (!attn_packed(H, T, D, sb, sh, st, yb, yh, yt, "fo_attention_forward")) return;
    int dm = attn_dm(BH, T, D, "fo_attention_forward");
    dim3 grid(cdiv(T, AQ), BH);
    float scale2 = LOG2E / sqrtf((float)D);
    if (dm == 32) attn_fwd_kernel<32><<<grid, AQ>>>(q, k, v, y, lse, T, D, scale2);
    if (dm == 64) attn_fwd_kernel<64><<<grid, AQ>>>(q, k, v, y, lse, T, D, scale2);
    if (dm == 128) attn_fwd_kernel<128><<<grid, AQ>>>(q, k, v, y, lse, T, D, scale2);
    fo_check("fo_attention_forward");
}

/* scratch for Di (B*H*T floats), grown when needed, kept between calls */
static float *fo_scratch;
static size_t fo_scratch_n;

extern "C" void fo_attention_backward(const float *dy, const float *q, const float *k,
                                      const float *v, const float *y, const float *lse,
                                      float *dq, float *dk, float *dv, int B, int H, int T,
                                      int D, ptrdiff_t sb, ptrdiff_t sh, ptrdiff_t st,
                                      ptrdiff_t yb, ptrdiff_t yh, ptrdiff_t yt) {
    int BH = B * H;
    if (BH <= 0 || T <= 0) return;
    if (!attn_packed(H, T, D, sb, sh, st, yb, yh, yt, "fo_attention_backward")) return;
    int dm = attn_dm(BH, T, D, "fo_attention_backward");
    size_t n = (size_t)BH * T;
    if (n > fo_scratch_n) {
        cudaFree(fo_scratch);
        fo_scratch = NULL;
        fo_scratch_n = 0;
        if (cudaMalloc((void **)&fo_scratch, n * sizeof(float)) != cudaSuccess) {
            fo_check("fo_attention_backward (scratch)");
            fo_fail("fo_attention_backward: out of GPU memory for scratch");
            return;
        }
        fo_scratch_n = n;
    }
    dim3 grid(cdiv(T, AQ), BH);
    float scale = 1.0f / sqrtf((float)D), scale2 = LOG2E * scale;
    float *Di = fo_scratch;
#define FO_BWD(DMV)                                                                          \
    if (dm == DMV) {                                                                         \
        attn_bwd_dq_kernel<DMV><<<grid, AQ>>>(dy, q, k, v, y, lse, dq, Di, T, D, scale2, scale); \
        attn_bwd_dkdv_kernel<DMV><<<grid, 2 * AQ>>>(dy, q, k, v, lse, Di, dk, dv, T, D, scale2, \
                                                    scale);                                  \
    }
    FO_BWD(32)
    FO_BWD(64)
    FO_BWD(128)
#undef FO_BWD
    fo_check("fo_attention_backward");
}

/* ---- GELU and LayerNorm ------------------------------------------------------ */
/* The CPU section's formulas (see there). GELU: one thread per element.
 * LayerNorm: one warp per row, its sums completed with xor-shuffles (every
 * lane ends with the same total, in a fixed order); the backward's dw, db
 * are column sums done as fo_colsum does them (deterministic). */
#define LN_ROWS 8                  /* rows (warps) per 256-thread block */

__device__ __forceinline__ float gelu_e(float v) { /* exp(2u), clamped as on the CPU */
    return expf(fminf(fmaxf(2.0f * GELU_C * (v + GELU_A * (v * v * v)), -87.0f), 88.0f));
}

__global__ void gelu_fwd_kernel(const float *__restrict__ x, float *y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float e = gelu_e(x[i]), s = 2.0f / (e + 1.0f);
        y[i] = x[i] < GELU_ZERO_BELOW ? -0.0f : 0.5f * x[i] * (e * s);
    }
}

__global__ void gelu_bwd_kernel(const float *__restrict__ dy, const float *__restrict__ x,
                                float *dx, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float v = fminf(fmaxf(x[i], -20.0f), 20.0f);
        const float e = gelu_e(x[i]), s = 2.0f / (e + 1.0f), onept = e * s;
        const float du = GELU_C * (1.0f + 3.0f * GELU_A * (v * v));
        dx[i] = dy[i] * (0.5f * onept + 0.5f * v * (s * onept) * du);
    }
}

static int elem_blocks(long n) { return (int)(n / 256 + 1 < 8192 ? n / 256 + 1 : 8192); }

extern "C" void fo_gelu_forward(const float *x, float *y, long n) {
    if (n <= 0) return;
    gelu_fwd_kernel<<<elem_blocks(n), 256>>>(x, y, n);
    fo_check("fo_gelu_forward");
}

extern "C" void fo_gelu_backward(const float *dy, const float *x, float *dx, long n) {
    if (n <= 0) return;
    gelu_bwd_kernel<<<elem_blocks(n), 256>>>(dy, x, dx, n);
    fo_check("fo_gelu_backward");
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__global__ __launch_bounds__(32 * LN_ROWS) void ln_fwd_kernel(
    const float *__restrict__ x, const float *__restrict__ w, const float *__restrict__ b,
    float *y, float *mean, float *rstd, int M, int C, float eps) {
    const int r = blockIdx.x * LN_ROWS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= M) return;                                /* the whole warp: same row */
    x += (size_t)r * C; y += (size_t)r * C;
    float s = 0.0f;
    for (int c = lane; c < C; c += 32) s += x[c];
    const float m = warp_sum(s) / (float)C;
    s = 0.0f;
    for (int c = lane; c < C; c += 32) s += (x[c] - m) * (x[c] - m);
    const float rs = 1.0f / sqrtf(warp_sum(s) / (float)C + eps);
    for (int c = lane; c < C; c += 32) y[c] = (x[c] - m) * rs * w[c] + b[c];
    if (lane == 0) { mean[r] = m; rstd[r] = rs; }
}

/* dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dy w */
__global__ __launch_bounds__(32 * LN_ROWS) void ln_bwd_dx_kernel(
    const float *__restrict__ dy, const float *__restrict__ x, const float *__restrict__ w,
    const float *__restrict__ mean, const float *__restrict__ rstd, float *dx, int M, int C) {
    const int r = blockIdx.x * LN_ROWS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= M) return;
    dy += (size_t)r * C; x += (size_t)r * C; dx += (size_t)r * C;
    const float m = mean[r], rs = rstd[r];
    float s1 = 0.0f, s2 = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const float g = dy[c] * w[c];
        s1 += g;
        s2 += g * (x[c] - m) * rs;
    }
    const float m1 = warp_sum(s1) / (float)C, m2 = warp_sum(s2) / (float)C;
    for (int c = lane; c < C; c += 32) dx[c] = rs * (dy[c] * w[c] - m1 - (x[c] - m) * rs * m2);
}

/* dw = column sums of dy xhat, db = column sums of dy (as colsum_kernel) */
__global__ void ln_bwd_dwdb_kernel(const float *__restrict__ dy, const float *__restrict__ x,
                                   const float *__restrict__ mean, const float *__restrict__ rstd,
                                   float *dw, float *db, int M, int C) {
    __shared__ float pw[32][33], pb[32][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float sw = 0.0f, sb = 0.0f;
    if (c < C)
        for (int r = threadIdx.y; r < M; r += 32) {
            const float g = dy[(size_t)r * C + c];
            sw += g * (x[(size_t)r * C + c] - mean[r]) * rstd[r];
            sb += g;
        }
    pw[threadIdx.y][threadIdx.x] = sw;
    pb[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float tw = 0.0f, tb = 0.0f;
        for (int k = 0; k < 32; k++) { tw += pw[k][threadIdx.x]; tb += pb[k][threadIdx.x]; }
        dw[c] = tw;
        db[c] = tb;
    }
}

extern "C" void fo_layernorm_forward(const float *x, const float *w, const float *b, float *y,
                                     float *mean, float *rstd, int M, int C, float eps) {
    if (M <= 0 || C <= 0) return;
    ln_fwd_kernel<<<cdiv(M, LN_ROWS), 32 * LN_ROWS>>>(x, w, b, y, mean, rstd, M, C, eps);
    fo_check("fo_layernorm_forward");
}

extern "C" void fo_layernorm_backward(const float *dy, const float *x, const float *w,
                                      const float *mean, const float *rstd, float *dx, float *dw,
                                      float *db, int M, int C) {
    if (C <= 0) return;
    if (M > 0) ln_bwd_dx_kernel<<<cdiv(M, LN_ROWS), 32 * LN_ROWS>>>(dy, x, w, mean, rstd, dx, M, C);
    ln_bwd_dwdb_kernel<<<cdiv(C, 32), dim3(32, 32)>>>(dy, x, mean, rstd, dw, db, M, C);
    fo_check("fo_layernorm_backward");
}

#endif /* __CUDACC__ : end of CUDA section */

/* cblas_sgemm for MLX that sends matrix-vector products to cblas_sgemv, and everything else to the BLAS.
 *
 * MLX's CPU matmul calls cblas_sgemm for every product, one call per batch element. Decoding one token at a time
 * makes many of them matrix-vector shaped: each (question, head) cross-attention score row is [1 x 64] x
 * [64 x 405]. OpenBLAS 0.3.21's sgemm first copies ("packs") both operands, so such a call reads and writes the
 * whole matrix before its one pass of arithmetic; its sgemv reads the matrix once. OpenBLAS 0.3.28+ forwards these
 * calls itself, but only on ARM64, POWER and RISC-V. fastpath.py compiles this file and preloads it before the BLAS;
 * each call it does not forward goes on to the next cblas_sgemm in the lookup order (the BLAS's own).
 *
 * It also lets MLX use a BLAS whose names carry a prefix, such as the pip package scipy-openblas32
 * (`scipy_cblas_sgemm`): the re-exec sets RAGMLX_BLAS_PREFIX, and this library, the only `cblas_sgemm` MLX then
 * finds before its bundled reference BLAS, calls the prefixed functions. RAGMLX_GEMV_FORWARD=0 sends every call
 * to sgemm (fastpath.py leaves this library out then, unless the BLAS is a prefixed one that needs it).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float, float *,
                         int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

static sgemm_fn next_sgemm;
static sgemv_fn next_sgemv;

/* The BLAS to forward to, for a process that loads this library with dlopen rather than LD_PRELOAD (then the
 * BLAS is not "next" in this library's lookup scope). fastpath.py also looks for this name to tell this library
 * from the BLAS behind it. */
void ragmlx_gemv_forward_to(sgemm_fn sgemm, sgemv_fn sgemv) {
    next_sgemv = sgemv;
    next_sgemm = sgemm;
}

static void look_up(void) { /* two threads may both look up: they store the same addresses */
    const char *prefix = getenv("RAGMLX_BLAS_PREFIX"), *gemv = getenv("RAGMLX_GEMV_FORWARD");
    char name[64];
    snprintf(name, sizeof name, "%scblas_sgemv", prefix ? prefix : "");
    next_sgemv = gemv && strcmp(gemv, "0") == 0 ? NULL : (sgemv_fn)dlsym(RTLD_NEXT, name);
    snprintf(name, sizeof name, "%scblas_sgemm", prefix ? prefix : "");
    next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, name);
}

/* The sgemm calls go on to (NULL when there is none), and whether matrix-vector shapes go to sgemv: fastpath.py
 * names the library behind this one from the first, and says whether products are forwarded from the second. */
void *ragmlx_gemv_forward_target(void) {
    if (!next_sgemm) look_up();
    return (void *)next_sgemm;
}

int ragmlx_gemv_forward_routes(void) {
    if (!next_sgemm) look_up();
    return next_sgemv != NULL;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    if (!next_sgemm) {
        look_up();
        if (!next_sgemm) {
            fputs("gemv_forward: no BLAS after it in LD_PRELOAD (cblas_sgemm not found)\n", stderr);
            abort();
        }
    }
    if (order != ROW_MAJOR || !next_sgemv || k < 1 || (m != 1 && n != 1) || m < 1 || n < 1) {
        next_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    if (beta == 0.0f) { /* BLAS never reads C when beta is 0, and MLX's output buffer may hold anything (NaN) */
        if (m == 1)
            memset(c, 0, sizeof(float) * (size_t)n);
        else
            for (int i = 0; i < m; i++) c[(size_t)i * ldc] = 0.0f;
    }
    if (m == 1) { /* row vector c[n] = a[k] op(B)[k x n]: c = op(B)^T a */
        int inc_a = trans_a == NO_TRANS ? 1 : lda;
        if (trans_b == NO_TRANS) /* B stored [k x n] */
            next_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
        else /* B stored [n x k] */
            next_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
    } else { /* column vector c[m] = op(A)[m x k] b[k] */
        int inc_b = trans_b == NO_TRANS ? ldb : 1;
        if (trans_a == NO_TRANS) /* A stored [m x k] */
            next_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_b, beta, c, ldc);
        else /* A stored [k x m] */
            next_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_b, beta, c, ldc);
    }
}

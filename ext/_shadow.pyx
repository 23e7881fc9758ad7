# cython: boundscheck=False, wraparound=False, cdivision=True
"""Shadow-mask statistics of a block of images in one pass over the pixels: which pixels are valid on
most images, their median over the block (negative values counted as 0), and the median of those
over bins of bin_ x bin_ pixels (valid pixels only; 0 where a bin has none).  numpy's way needs float
copies of every image and two partitions; on a Pilatus 6M block this was most of the integration time.
The numpy twin is pyflm.shoebox.shadow_stats_numpy."""
import numpy as np
cimport numpy as cnp
from libc.stdlib cimport malloc, free

cnp.import_array()

cdef extern from *:
    """
    /* SSE2's minsd and maxsd: no branch (gcc made the conditional expressions a branch) */
    #include <emmintrin.h>
    #include <string.h>
    #include <math.h>
    static inline double pyflm_min(double a, double b) {
        return _mm_cvtsd_f64(_mm_min_sd(_mm_set_sd(a), _mm_set_sd(b))); }
    static inline double pyflm_max(double a, double b) {
        return _mm_cvtsd_f64(_mm_max_sd(_mm_set_sd(a), _mm_set_sd(b))); }
    """
    double pyflm_min(double a, double b) nogil
    double pyflm_max(double a, double b) nogil

cdef extern from *:
    """
    /* A block of five images (the default BLOCK): validity and median of each pixel in one vectorised
       pass over the rows, the median of 5 from min/max alone (the larger of the pairs' minima and the
       smaller of their maxima bracket it with the fifth value). */
    #include <immintrin.h>
    /* AVX2 where the CPU has it (set_simd(0) for SSE2 alone, as tests compare): four pixels an
       instruction, the same min/max and compares, so the same bits; the pixels it leaves to SSE2 */
    static int pyflm_sh_simd = -1, pyflm_sh_cpu = -1;
    static inline int pyflm_sh_avx2(void) {
        if (pyflm_sh_cpu < 0) { __builtin_cpu_init(); pyflm_sh_cpu = __builtin_cpu_supports("avx2") ? 1 : 0; }
        return pyflm_sh_cpu && pyflm_sh_simd != 0;
    }
    static int pyflm_sh_set_simd(int level) { int old = pyflm_sh_simd; pyflm_sh_simd = level; return old; }
    #define PYFLM_MED5_AVX2(NAME, T, LOAD4) \
    __attribute__((target("avx2"))) static Py_ssize_t NAME(Py_ssize_t n, const T *p0, const T *p1, \
                     const T *p2, const T *p3, const T *p4, double nullpix, unsigned char *valid, double *med) { \
        const __m256d zero = _mm256_setzero_pd(), nul = _mm256_set1_pd(nullpix), one = _mm256_set1_pd(1.0); \
        const __m256d three = _mm256_set1_pd(3.0); \
        Py_ssize_t k = 0; \
        for (; k + 4 <= n; k += 4) { \
            __m256d a = LOAD4(p0 + k), b = LOAD4(p1 + k), c = LOAD4(p2 + k), d = LOAD4(p3 + k); \
            __m256d e = LOAD4(p4 + k); \
            __m256d nv = _mm256_add_pd(_mm256_add_pd(_mm256_and_pd(_mm256_cmp_pd(a, nul, _CMP_GT_OQ), one), \
                                                     _mm256_and_pd(_mm256_cmp_pd(b, nul, _CMP_GT_OQ), one)), \
                          _mm256_add_pd(_mm256_add_pd(_mm256_and_pd(_mm256_cmp_pd(c, nul, _CMP_GT_OQ), one), \
                                                      _mm256_and_pd(_mm256_cmp_pd(d, nul, _CMP_GT_OQ), one)), \
                                        _mm256_and_pd(_mm256_cmp_pd(e, nul, _CMP_GT_OQ), one))); \
            a = _mm256_max_pd(a, zero); b = _mm256_max_pd(b, zero); c = _mm256_max_pd(c, zero); \
            d = _mm256_max_pd(d, zero); e = _mm256_max_pd(e, zero); \
            __m256d f = _mm256_max_pd(_mm256_min_pd(a, b), _mm256_min_pd(c, d)); \
            __m256d g = _mm256_min_pd(_mm256_max_pd(a, b), _mm256_max_pd(c, d)); \
            __m256d m = _mm256_max_pd(_mm256_min_pd(e, f), _mm256_min_pd(_mm256_max_pd(e, f), g)); \
            __m256d ok = _mm256_cmp_pd(nv, three, _CMP_GE_OQ); \
            _mm256_storeu_pd(med + k, _mm256_and_pd(m, ok)); \
            int bits = _mm256_movemask_pd(ok); \
            valid[k] = bits & 1; \
            valid[k + 1] = (bits >> 1) & 1; \
            valid[k + 2] = (bits >> 2) & 1; \
            valid[k + 3] = (bits >> 3) & 1; \
        } \
        return k; \
    }
    #define PYFLM_LOAD4_I32(p) _mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(p)))
    #define PYFLM_LOAD4_F32(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
    #define PYFLM_LOAD4_F64(p) _mm256_loadu_pd(p)
    PYFLM_MED5_AVX2(pyflm_med5_i32_4, int, PYFLM_LOAD4_I32)
    PYFLM_MED5_AVX2(pyflm_med5_f32_4, float, PYFLM_LOAD4_F32)
    PYFLM_MED5_AVX2(pyflm_med5_f64_4, double, PYFLM_LOAD4_F64)
    #define PYFLM_MED5(NAME, T, LOAD2) \
    static void NAME(Py_ssize_t n, const T *p0, const T *p1, const T *p2, const T *p3, const T *p4, \
                     double nullpix, unsigned char *valid, double *med) { \
        const __m128d zero = _mm_setzero_pd(), nul = _mm_set1_pd(nullpix), one = _mm_set1_pd(1.0); \
        const __m128d three = _mm_set1_pd(3.0); \
        Py_ssize_t k = pyflm_sh_avx2() ? NAME##_4(n, p0, p1, p2, p3, p4, nullpix, valid, med) : 0; \
        for (; k + 2 <= n; k += 2) { \
            __m128d a = LOAD2(p0 + k), b = LOAD2(p1 + k), c = LOAD2(p2 + k), d = LOAD2(p3 + k); \
            __m128d e = LOAD2(p4 + k); \
            __m128d nv = _mm_add_pd(_mm_add_pd(_mm_and_pd(_mm_cmpgt_pd(a, nul), one), \
                                               _mm_and_pd(_mm_cmpgt_pd(b, nul), one)), \
                          _mm_add_pd(_mm_add_pd(_mm_and_pd(_mm_cmpgt_pd(c, nul), one), \
                                                _mm_and_pd(_mm_cmpgt_pd(d, nul), one)), \
                                     _mm_and_pd(_mm_cmpgt_pd(e, nul), one))); \
            a = _mm_max_pd(a, zero); b = _mm_max_pd(b, zero); c = _mm_max_pd(c, zero); \
            d = _mm_max_pd(d, zero); e = _mm_max_pd(e, zero); \
            __m128d f = _mm_max_pd(_mm_min_pd(a, b), _mm_min_pd(c, d)); \
            __m128d g = _mm_min_pd(_mm_max_pd(a, b), _mm_max_pd(c, d)); \
            __m128d m = _mm_max_pd(_mm_min_pd(e, f), _mm_min_pd(_mm_max_pd(e, f), g)); \
            __m128d ok = _mm_cmpge_pd(nv, three); \
            _mm_storeu_pd(med + k, _mm_and_pd(m, ok)); \
            int bits = _mm_movemask_pd(ok); \
            valid[k] = bits & 1; \
            valid[k + 1] = (bits >> 1) & 1; \
        } \
        for (; k < n; k++) { \
            double v[5] = {p0[k], p1[k], p2[k], p3[k], p4[k]}; \
            int nv = 0; \
            for (int t = 0; t < 5; t++) { nv += v[t] > nullpix; v[t] = pyflm_max(v[t], 0.0); } \
            double f = pyflm_max(pyflm_min(v[0], v[1]), pyflm_min(v[2], v[3])); \
            double g = pyflm_min(pyflm_max(v[0], v[1]), pyflm_max(v[2], v[3])); \
            double m = pyflm_max(pyflm_min(v[4], f), pyflm_min(pyflm_max(v[4], f), g)); \
            valid[k] = nv >= 3; \
            med[k] = nv >= 3 ? m : 0.0; \
        } \
    }
    #define PYFLM_LOAD_I32(p) _mm_cvtepi32_pd(_mm_loadl_epi64((const __m128i *)(p)))
    #define PYFLM_LOAD_F32(p) _mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(p))))
    #define PYFLM_LOAD_F64(p) _mm_loadu_pd(p)
    PYFLM_MED5(pyflm_med5_i32, int, PYFLM_LOAD_I32)
    PYFLM_MED5(pyflm_med5_f32, float, PYFLM_LOAD_F32)
    PYFLM_MED5(pyflm_med5_f64, double, PYFLM_LOAD_F64)
    """
    int pyflm_sh_set_simd(int level) nogil
    void pyflm_med5_i32(Py_ssize_t n, const int *p0, const int *p1, const int *p2, const int *p3,
                        const int *p4, double nullpix, unsigned char *valid, double *med) nogil
    void pyflm_med5_f32(Py_ssize_t n, const float *p0, const float *p1, const float *p2, const float *p3,
                        const float *p4, double nullpix, unsigned char *valid, double *med) nogil
    void pyflm_med5_f64(Py_ssize_t n, const double *p0, const double *p1, const double *p2,
                        const double *p3, const double *p4, double nullpix, unsigned char *valid,
                        double *med) nogil

cdef extern from *:
    """
    /* Any other block size up to PYFLM_KMAX images (a block's last few images, cell refinement's
       3-image segments, another BLOCK): the same validity and median as the general scalar path, the k
       values sorted by the same odd-even transposition network of min/max on four (AVX2) or two (SSE2)
       pixels at once; a sorted list is the same whatever sorts it, so the medians are the same bits.
       K a constant in each case of the switch, so the network is unrolled into registers. */
    #define PYFLM_KMAX 16
    #define PYFLM_MEDK_BODY(VEC, W, LOAD, SET1, ZERO, ADD, AND, MAX, MIN, GT, DIV, STORE, MASK) \
        const VEC zero = ZERO(), nul = SET1(nullpix), one = SET1(1.0), half = SET1(0.5 * K), two = SET1(2.0); \
        VEC v[PYFLM_KMAX]; \
        Py_ssize_t i = 0; \
        for (; i + W <= n; i += W) { \
            VEC nv = zero; \
            for (int t = 0; t < K; t++) { \
                VEC a = LOAD(p[t] + i); \
                nv = ADD(nv, AND(GT(a, nul), one)); \
                v[t] = MAX(a, zero); \
            } \
            for (int u = 0; u < K; u++) \
                for (int t = u & 1; t < K - 1; t += 2) { \
                    VEC x = v[t], y = v[t + 1]; \
                    v[t] = MIN(x, y); \
                    v[t + 1] = MAX(x, y); \
                } \
            VEC m = (K & 1) ? v[K / 2] : DIV(ADD(v[K / 2 - 1], v[K / 2]), two); \
            VEC ok = GT(nv, half); \
            STORE(med + i, AND(m, ok)); \
            int bits = MASK(ok); \
            for (int t = 0; t < W; t++) valid[i + t] = (bits >> t) & 1; \
        } \
        return i;
    #define PYFLM_GT4(a, b) _mm256_cmp_pd(a, b, _CMP_GT_OQ)
    #define PYFLM_MEDK_AVX2(NAME, T, LOAD4) \
    static inline __attribute__((always_inline, target("avx2"))) Py_ssize_t NAME##_k(Py_ssize_t n, const int K, \
            const T **p, double nullpix, unsigned char *valid, double *med) { \
        PYFLM_MEDK_BODY(__m256d, 4, LOAD4, _mm256_set1_pd, _mm256_setzero_pd, _mm256_add_pd, _mm256_and_pd, \
                        _mm256_max_pd, _mm256_min_pd, PYFLM_GT4, _mm256_div_pd, _mm256_storeu_pd, \
                        _mm256_movemask_pd) \
    } \
    __attribute__((target("avx2"))) static Py_ssize_t NAME(Py_ssize_t n, int k, const T **p, double nullpix, \
                                                          unsigned char *valid, double *med) { \
        switch (k) { \
        case 1: return NAME##_k(n, 1, p, nullpix, valid, med); \
        case 2: return NAME##_k(n, 2, p, nullpix, valid, med); \
        case 3: return NAME##_k(n, 3, p, nullpix, valid, med); \
        case 4: return NAME##_k(n, 4, p, nullpix, valid, med); \
        case 6: return NAME##_k(n, 6, p, nullpix, valid, med); \
        case 7: return NAME##_k(n, 7, p, nullpix, valid, med); \
        case 8: return NAME##_k(n, 8, p, nullpix, valid, med); \
        default: return NAME##_k(n, k, p, nullpix, valid, med); \
        } \
    }
    #define PYFLM_MEDK(NAME, T, LOAD2) \
    static inline __attribute__((always_inline)) Py_ssize_t NAME##_k(Py_ssize_t n, const int K, const T **p, \
            double nullpix, unsigned char *valid, double *med) { \
        PYFLM_MEDK_BODY(__m128d, 2, LOAD2, _mm_set1_pd, _mm_setzero_pd, _mm_add_pd, _mm_and_pd, _mm_max_pd, \
                        _mm_min_pd, _mm_cmpgt_pd, _mm_div_pd, _mm_storeu_pd, _mm_movemask_pd) \
    } \
    /* the pixels the AVX2 pass left (all of them without AVX2) two at a time, the last as the scalar path */ \
    static void NAME(Py_ssize_t n, int k, const T **p, double nullpix, unsigned char *valid, double *med) { \
        Py_ssize_t i = pyflm_sh_avx2() ? NAME##_4(n, k, p, nullpix, valid, med) : 0, j; \
        const T *q[PYFLM_KMAX]; \
        for (int t = 0; t < k; t++) q[t] = p[t] + i; \
        switch (k) { \
        case 1: j = NAME##_k(n - i, 1, q, nullpix, valid + i, med + i); break; \
        case 2: j = NAME##_k(n - i, 2, q, nullpix, valid + i, med + i); break; \
        case 3: j = NAME##_k(n - i, 3, q, nullpix, valid + i, med + i); break; \
        case 4: j = NAME##_k(n - i, 4, q, nullpix, valid + i, med + i); break; \
        default: j = NAME##_k(n - i, k, q, nullpix, valid + i, med + i); \
        } \
        for (i += j; i < n; i++) { \
            double v[PYFLM_KMAX]; \
            int nv = 0; \
            for (int t = 0; t < k; t++) { double x = p[t][i]; nv += x > nullpix; v[t] = x > 0 ? x : 0.0; } \
            for (int u = 0; u < k; u++) \
                for (int t = u & 1; t < k - 1; t += 2) { \
                    double x = v[t], y = v[t + 1]; v[t] = pyflm_min(x, y); v[t + 1] = pyflm_max(x, y); } \
            valid[i] = 2 * nv > k; \
            med[i] = 2 * nv > k ? ((k & 1) ? v[k / 2] : (v[k / 2 - 1] + v[k / 2]) / 2.0) : 0.0; \
        } \
    }
    PYFLM_MEDK_AVX2(pyflm_medk_i32_4, int, PYFLM_LOAD4_I32)
    PYFLM_MEDK_AVX2(pyflm_medk_f32_4, float, PYFLM_LOAD4_F32)
    PYFLM_MEDK_AVX2(pyflm_medk_f64_4, double, PYFLM_LOAD4_F64)
    PYFLM_MEDK(pyflm_medk_i32, int, PYFLM_LOAD_I32)
    PYFLM_MEDK(pyflm_medk_f32, float, PYFLM_LOAD_F32)
    PYFLM_MEDK(pyflm_medk_f64, double, PYFLM_LOAD_F64)
    """
    void pyflm_medk_i32(Py_ssize_t n, int k, const int **p, double nullpix, unsigned char *valid,
                        double *med) nogil
    void pyflm_medk_f32(Py_ssize_t n, int k, const float **p, double nullpix, unsigned char *valid,
                        double *med) nogil
    void pyflm_medk_f64(Py_ssize_t n, int k, const double **p, double nullpix, unsigned char *valid,
                        double *med) nogil


def set_simd(int level):
    """0: SSE2 alone, -1: AVX2 where the CPU has it (the default); the level before."""
    return pyflm_sh_set_simd(level)


ctypedef fused pix_t:
    cnp.int32_t
    float
    double


cdef inline double _median_sorted(double *v, int n) noexcept nogil:
    if n % 2:
        return v[n // 2]
    return (v[n // 2 - 1] + v[n // 2]) / 2.0


DEF KMAX = 16          # block sizes the vectorised median takes (PYFLM_KMAX); larger ones the loop below
DEF HALVES = 512       # counts of levels 0, 0.5, ... 255.5 (bins' medians, median5's)


cdef double _select(double *v, int n, int k) noexcept nogil:
    """The k-th smallest of v[0:n] (v is reordered): quickselect, exact as sorting."""
    cdef int lo = 0, hi = n - 1, i, j
    cdef double piv, t
    while lo < hi:
        piv = v[(lo + hi) // 2]
        i = lo
        j = hi
        while i <= j:
            while v[i] < piv:
                i += 1
            while v[j] > piv:
                j -= 1
            if i <= j:
                t = v[i]
                v[i] = v[j]
                v[j] = t
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return v[k]
    return v[k]


cdef double _median(double *v, int n) noexcept nogil:
    cdef double hi = _select(v, n, n // 2), lo
    cdef int t
    if n % 2:
        return hi
    lo = v[0]                     # the largest of those below the upper middle
    for t in range(1, n // 2):
        if v[t] > lo:
            lo = v[t]
    return (lo + hi) / 2.0


cdef void _stats_bins(pix_t **st, Py_ssize_t k, Py_ssize_t ns, Py_ssize_t nf, double nullpix, int bin_,
                      Py_ssize_t bi, Py_ssize_t nbc, unsigned char *V, double *M, double *C, double *buf,
                      double *bb, int *hist) noexcept nogil:
    """block_stats of the pixel rows of the bi-th row of bins: validity and median into V and M (laid out
    from that row of bins' first pixel row, nf a row) and the bins' medians into C[0:nbc]; hist (HALVES) is all 0
    on entry and exit."""
    cdef Py_ssize_t i, j, t, u, bj, n, off
    cdef int nv
    cdef double x, y
    cdef Py_ssize_t r0 = bi * bin_, r1 = min(r0 + bin_, ns)
    cdef int small, top, h, cum, lo_rank, hi_rank
    cdef double lo_v, hi_v
    cdef pix_t *rows[KMAX]
    # the pixels of this row of bins first, while they are in the cache for their bins' medians
    if k == 5:
        if pix_t is cnp.int32_t:
            pyflm_med5_i32((r1 - r0) * nf, <const int *>st[0] + r0 * nf, <const int *>st[1] + r0 * nf,
                           <const int *>st[2] + r0 * nf, <const int *>st[3] + r0 * nf,
                           <const int *>st[4] + r0 * nf, nullpix, V, M)
        elif pix_t is float:
            pyflm_med5_f32((r1 - r0) * nf, st[0] + r0 * nf, st[1] + r0 * nf, st[2] + r0 * nf,
                           st[3] + r0 * nf, st[4] + r0 * nf, nullpix, V, M)
        else:
            pyflm_med5_f64((r1 - r0) * nf, st[0] + r0 * nf, st[1] + r0 * nf, st[2] + r0 * nf,
                           st[3] + r0 * nf, st[4] + r0 * nf, nullpix, V, M)
    elif k <= KMAX:
        for t in range(k):
            rows[t] = st[t] + r0 * nf
        if pix_t is cnp.int32_t:
            pyflm_medk_i32((r1 - r0) * nf, <int>k, <const int **>rows, nullpix, V, M)
        elif pix_t is float:
            pyflm_medk_f32((r1 - r0) * nf, <int>k, <const float **>rows, nullpix, V, M)
        else:
            pyflm_medk_f64((r1 - r0) * nf, <int>k, <const double **>rows, nullpix, V, M)
    for i in range(r0 if k > KMAX else r1, r1):
        for j in range(nf):
            off = i * nf + j
            nv = 0
            for t in range(k):
                x = st[t][off]
                nv += x > nullpix
                buf[t] = x if x > 0 else 0.0
            # odd-even transposition sort of the k values: branch-free compare-exchanges (the
            # values' order is random, so an insertion sort's branches were mispredicted at every pixel)
            for u in range(k):
                for t in range(u % 2, k - 1, 2):
                    x = buf[t]
                    y = buf[t + 1]
                    buf[t] = pyflm_min(x, y)
                    buf[t + 1] = pyflm_max(x, y)
            off = (i - r0) * nf + j
            if 2 * nv > k:
                V[off] = 1
                M[off] = _median_sorted(buf, <int>k)
            else:
                V[off] = 0
                M[off] = 0.0
    for bj in range(nbc):
        n = 0
        small = 1
        top = 0
        for i in range(r1 - r0):
            for j in range(bj * bin_, min((bj + 1) * bin_, nf)):
                if V[i * nf + j]:
                    x = M[i * nf + j]
                    bb[n] = x
                    n += 1
                    # medians of counts are mostly small whole numbers (halves over an even block):
                    # counted in halves, not sorted
                    y = 2.0 * x
                    if small and y < HALVES and y == <int>y:
                        hist[<int>y] += 1
                        if <int>y > top:
                            top = <int>y
                    else:
                        small = 0
        if n == 0:
            C[bj] = 0.0
        elif small:
            # the values of rank (n-1)//2 and n//2 (0-based) from the counts: the sorted middle
            lo_rank = (n - 1) // 2
            hi_rank = n // 2
            cum = 0
            lo_v = hi_v = -1.0
            for h in range(top + 1):
                cum += hist[h]
                if lo_v < 0 and cum > lo_rank:
                    lo_v = h / 2.0
                if cum > hi_rank:
                    hi_v = h / 2.0
                    break
            C[bj] = (lo_v + hi_v) / 2.0 if n % 2 == 0 else hi_v
        else:
            C[bj] = _median(bb, <int>n)
        for h in range(top + 1):
            hist[h] = 0


cdef void _stats(pix_t **st, Py_ssize_t k, Py_ssize_t ns, Py_ssize_t nf, double nullpix, int bin_,
                 unsigned char[:, ::1] V, double[:, ::1] M, double[:, ::1] C) noexcept nogil:
    cdef double *buf = <double *>malloc(k * sizeof(double))
    cdef double *bb = <double *>malloc(bin_ * bin_ * sizeof(double))
    cdef int hist[HALVES]
    cdef Py_ssize_t bi
    cdef int h
    for h in range(HALVES):
        hist[h] = 0
    for bi in range(C.shape[0]):
        _stats_bins(st, k, ns, nf, nullpix, bin_, bi, C.shape[1], &V[bi * bin_, 0], &M[bi * bin_, 0],
                    &C[bi, 0], buf, bb, hist)
    free(buf)
    free(bb)


def block_stats(images, double nullpix=-1.0, int bin_=8):
    """(valid bool (ns, nf), median float64 (ns, nf), coarse float64 (ceil(ns/bin_), ceil(nf/bin_)))."""
    dt = images[0].dtype
    if dt not in (np.int32, np.float32, np.float64) or any(d.dtype != dt for d in images):
        dt = np.float64
    # each image as it is (no stacked copy of the block): pointers to their pixels
    arrs = [np.ascontiguousarray(d, dt) for d in images]
    cdef Py_ssize_t k = len(arrs), ns = arrs[0].shape[0], nf = arrs[0].shape[1], t
    if any(a.shape != (ns, nf) for a in arrs):
        raise ValueError("the images of a block differ in size")
    valid = np.empty((ns, nf), np.uint8)
    med = np.empty((ns, nf), np.float64)
    coarse = np.empty(((ns + bin_ - 1) // bin_, (nf + bin_ - 1) // bin_), np.float64)
    cdef unsigned char[:, ::1] V = valid
    cdef double[:, ::1] M = med
    cdef double[:, ::1] C = coarse
    cdef void **ptr = <void **>malloc(k * sizeof(void *))
    cdef cnp.ndarray a
    for t in range(k):
        a = arrs[t]
        ptr[t] = cnp.PyArray_DATA(a)
    try:
        if dt == np.int32:
            with nogil:
                _stats(<cnp.int32_t **>ptr, k, ns, nf, nullpix, bin_, V, M, C)
        elif dt == np.float32:
            with nogil:
                _stats(<float **>ptr, k, ns, nf, nullpix, bin_, V, M, C)
        else:
            with nogil:
                _stats(<double **>ptr, k, ns, nf, nullpix, bin_, V, M, C)
    finally:
        free(ptr)
    return valid.view(np.bool_), med, coarse


cdef extern from *:
    """
    /* One row of shadow_test: valid, level >= min_level, more than 4.5 of the 3 x 3 valid, and the
       3 x 3 sum of medians over the valid count below ratio x level; 1 in hit[j] where all hold.  Two
       pixels per SSE2 instruction; the level is constant along a bin's columns. */
    /* the places of the row's hits, eight bytes at a time (hits are rare) */
    static Py_ssize_t pyflm_collect(Py_ssize_t nf, const unsigned char *hit, Py_ssize_t base,
                                    Py_ssize_t *hits, Py_ssize_t n) {
        Py_ssize_t j = 0;
        for (; j + 8 <= nf; j += 8) {
            unsigned long long w;
            memcpy(&w, hit + j, 8);
            if (!w) continue;
            for (Py_ssize_t t = j; t < j + 8; t++) if (hit[t]) hits[n++] = base + t;
        }
        for (; j < nf; j++) if (hit[j]) hits[n++] = base + j;
        return n;
    }
    /* sums along a row of 3 (its ends repeated), of the medians and of the valid flags */
    static void pyflm_row_sums(Py_ssize_t nf, const double *m, const unsigned char *v, double *rm, double *rv) {
        if (nf == 1) { rm[0] = (m[0] + m[0]) + m[0]; rv[0] = ((double)v[0] + v[0]) + v[0]; return; }
        rm[0] = (m[0] + m[0]) + m[1];
        rv[0] = ((double)v[0] + (double)v[0]) + (double)v[1];
        for (Py_ssize_t j = 1; j + 1 < nf; j++) {
            rm[j] = (m[j - 1] + m[j]) + m[j + 1];
            rv[j] = ((double)v[j - 1] + (double)v[j]) + (double)v[j + 1];
        }
        rm[nf - 1] = (m[nf - 2] + m[nf - 1]) + m[nf - 1];
        rv[nf - 1] = ((double)v[nf - 2] + (double)v[nf - 1]) + (double)v[nf - 1];
    }
    static void pyflm_shadow_row(Py_ssize_t nf, int bin_, const unsigned char *valid, const double *lrow,
                                 const double *m0, const double *m1, const double *m2,
                                 const double *v0, const double *v1, const double *v2,
                                 double ratio, double min_level, unsigned char *hit) {
        const __m128d half9 = _mm_set1_pd(4.5);
        for (Py_ssize_t j0 = 0; j0 < nf; j0 += bin_) {
            Py_ssize_t j1 = j0 + bin_ < nf ? j0 + bin_ : nf, j = j0;
            double lv = lrow[j0 / bin_];
            if (!(lv >= min_level)) {
                for (; j < j1; j++) hit[j] = 0;
                continue;
            }
            const __m128d lim = _mm_set1_pd(ratio * lv);
            /* the division only where the test might hold: num >= lim.den.(1 + 2^-45) (rounded) means
               num / den >= lim (1 + 2^-51) exactly, so its rounded quotient is not below lim either;
               shadows are rare, and divpd had been half of shadow_test's time (lim > 0 only) */
            const __m128d limk = _mm_set1_pd(ratio * lv > 0 ? ratio * lv * (1.0 + 0x1p-45) : INFINITY);
            for (; j + 2 <= j1; j += 2) {
                __m128d den = _mm_add_pd(_mm_add_pd(_mm_loadu_pd(v0 + j), _mm_loadu_pd(v1 + j)),
                                         _mm_loadu_pd(v2 + j));
                __m128d num = _mm_add_pd(_mm_add_pd(_mm_loadu_pd(m0 + j), _mm_loadu_pd(m1 + j)),
                                         _mm_loadu_pd(m2 + j));
                __m128d ok = _mm_and_pd(_mm_cmpgt_pd(den, half9), _mm_cmplt_pd(num, _mm_mul_pd(limk, den)));
                if (_mm_movemask_pd(ok))
                    ok = _mm_and_pd(_mm_cmpgt_pd(den, half9), _mm_cmplt_pd(_mm_div_pd(num, den), lim));
                int bits = _mm_movemask_pd(ok);
                hit[j] = (bits & 1) && valid[j];
                hit[j + 1] = ((bits >> 1) & 1) && valid[j + 1];
            }
            for (; j < j1; j++) {
                double den = (v0[j] + v1[j]) + v2[j], num = (m0[j] + m1[j]) + m2[j];
                hit[j] = valid[j] && den > 4.5 && num / den < ratio * lv;
            }
        }
    }
    """
    Py_ssize_t pyflm_collect(Py_ssize_t nf, const unsigned char *hit, Py_ssize_t base, Py_ssize_t *hits,
                             Py_ssize_t n) nogil
    void pyflm_row_sums(Py_ssize_t nf, const double *m, const unsigned char *v, double *rm, double *rv) nogil
    void pyflm_shadow_row(Py_ssize_t nf, int bin_, const unsigned char *valid, const double *lrow,
                          const double *m0, const double *m1, const double *m2, const double *v0,
                          const double *v1, const double *v2, double ratio, double min_level,
                          unsigned char *hit) nogil


cdef inline void _row_sums(const double[:, ::1] med, const unsigned char[:, ::1] valid, Py_ssize_t r,
                           Py_ssize_t nf, double *rm, double *rv) noexcept nogil:
    pyflm_row_sums(nf, &med[r, 0], &valid[r, 0], rm, rv)


cdef void _grow(Py_ssize_t *hits, Py_ssize_t n, Py_ssize_t ns, Py_ssize_t nf, int grow,
                unsigned char[:, ::1] O) noexcept nogil:
    cdef Py_ssize_t a, b, i, j, ii, jj
    for a in range(n):
        i = hits[a] // nf
        j = hits[a] % nf
        for ii in range(max(i - grow, 0), min(i + grow, ns - 1) + 1):
            b = grow - (ii - i if ii > i else i - ii)
            for jj in range(max(j - b, 0), min(j + b, nf - 1) + 1):
                O[ii, jj] = 1


def shadow_test(const unsigned char[:, ::1] valid, const double[:, ::1] med, const double[:, ::1] level,
                int bin_, double ratio, double min_level, int grow):
    """The shadow from block_stats' results and the smoothed coarse level (pyflm.shoebox.shadow_mask's
    twin shadow_test_numpy): valid pixels whose 3 x 3 mean of valid medians (image edges repeated) is
    below ratio x level where level >= min_level, more than half of the 3 x 3 valid; grown by `grow`
    pixels (a diamond: binary_dilation by a cross, `grow` times)."""
    cdef Py_ssize_t ns = med.shape[0], nf = med.shape[1], i, j, a, b, ii, jj, n = 0, r, jb
    cdef double lv, num, den
    cdef const double *lrow
    cdef double *m0
    cdef double *m1
    cdef double *m2
    cdef double *v0
    cdef double *v1
    cdef double *v2
    out = np.zeros((ns, nf), np.uint8)
    cdef unsigned char[:, ::1] O = out
    cdef Py_ssize_t *hits = <Py_ssize_t *>malloc(ns * nf * sizeof(Py_ssize_t))
    # sums along rows of 3 (edges repeated) of the last three rows, kept in a ring: each row's are
    # formed once and serve the three rows of output they touch
    cdef double *RM = <double *>malloc(3 * nf * sizeof(double))
    cdef double *RV = <double *>malloc(3 * nf * sizeof(double))
    cdef unsigned char *hrow = <unsigned char *>malloc(nf)
    with nogil:
        for r in range(min(2, ns)):
            _row_sums(med, valid, r, nf, RM + (r % 3) * nf, RV + (r % 3) * nf)
        for i in range(ns):
            if i + 1 < ns and i >= 1:
                _row_sums(med, valid, i + 1, nf, RM + ((i + 1) % 3) * nf, RV + ((i + 1) % 3) * nf)
            a = (i - 1 if i > 0 else 0) % 3
            b = (i + 1 if i + 1 < ns else ns - 1) % 3
            m0, m1, m2 = RM + a * nf, RM + (i % 3) * nf, RM + b * nf
            v0, v1, v2 = RV + a * nf, RV + (i % 3) * nf, RV + b * nf
            lrow = &level[i // bin_, 0]
            # row sums, then the column of them: the twin's order of additions
            pyflm_shadow_row(nf, bin_, &valid[i, 0], lrow, m0, m1, m2, v0, v1, v2, ratio, min_level, hrow)
            n = pyflm_collect(nf, hrow, i * nf, hits, n)
        _grow(hits, n, ns, nf, grow, O)
    free(hits)
    free(RM)
    free(RV)
    free(hrow)
    return out.view(np.bool_)


cdef int _pad_row(const double *c, Py_ssize_t nc, double *P, int *H) noexcept nogil:
    """median5's padded row of bins: c's nc levels with two repeated at each end into P (nc + 4), and
    in H as counts of halves (-1: not one); 1 if all are such counts."""
    cdef Py_ssize_t jj
    cdef int ok = 1
    cdef double x2
    for jj in range(nc + 4):
        P[jj] = c[min(max(jj - 2, 0), nc - 1)]
        x2 = 2.0 * P[jj]
        if x2 >= 0 and x2 < HALVES and x2 == <int>x2:
            H[jj] = <int>x2
        else:
            H[jj] = -1
            ok = 0
    return ok


cdef void _median5_row(const double **P, const int **H, int counts, Py_ssize_t nc, double *out,
                       int *hist) noexcept nogil:
    """median5's row of bins from the five padded rows about it (_pad_row's P and H, edge rows
    repeated); counts: all five are counts of halves (then slid, else selected); hist all 0 on entry
    and exit."""
    cdef Py_ssize_t j, a, b
    cdef int k, h, cum
    cdef double buf[25]
    if counts:
        for a in range(5):
            for b in range(5):
                hist[H[a][b]] += 1
        for j in range(nc):
            if j:
                for a in range(5):
                    hist[H[a][j - 1]] -= 1
                    hist[H[a][j + 4]] += 1
            cum = 0
            h = 0
            while True:
                cum += hist[h]
                if cum > 12:
                    break
                h += 1
            out[j] = h / 2.0
        for a in range(5):
            for b in range(nc - 1, nc + 4):
                hist[H[a][b]] -= 1
    else:
        for j in range(nc):
            k = 0
            for a in range(5):
                for b in range(5):
                    buf[k] = P[a][j + b]
                    k += 1
            out[j] = _select(buf, 25, 12)



cdef void _median5_at(const double *P, const int *H, const unsigned char *row_ok, Py_ssize_t i,
                      Py_ssize_t nb, Py_ssize_t nc, double *out, int *hist) noexcept nogil:
    """median5's row i of bins from the padded rows (_pad_row's P, H and row_ok) of all nb rows of bins,
    the edge rows repeated."""
    cdef const double *P5[5]
    cdef const int *H5[5]
    cdef int counts = 1
    cdef Py_ssize_t a, r
    for a in range(5):
        r = min(max(i - 2 + a, 0), nb - 1)
        P5[a] = P + r * (nc + 4)
        H5[a] = H + r * (nc + 4)
        counts = counts and row_ok[r]
    _median5_row(P5, H5, counts, nc, out, hist)

def median5(const double[:, ::1] coarse):
    """scipy.ndimage.median_filter(coarse, 5, mode="nearest") (its twin in pyflm.shoebox.shadow_mask):
    each bin's median over the 5 x 5 bins about it, the edges repeated; exact (a selection, or counts).

    The bins' levels are medians of counts, mostly whole or half numbers below HALVES / 2: along a row
    of bins whose 5 x 5 windows hold only those, the window's counts of each value are kept as it slides
    (five values out, five in) and the 13th smallest read off them; other rows select (5x faster on the
    sim sweep's blocks than selecting everywhere)."""
    cdef Py_ssize_t nb = coarse.shape[0], nc = coarse.shape[1], i, a, r
    cdef int hist[HALVES]
    cdef int h
    out = np.empty((nb, nc), np.float64)
    if nb == 0 or nc == 0:
        return out
    cdef double[:, ::1] O = out
    cdef double *P = <double *>malloc(nb * (nc + 4) * sizeof(double))
    cdef int *H = <int *>malloc(nb * (nc + 4) * sizeof(int))
    cdef unsigned char *row_ok = <unsigned char *>malloc(nb)
    with nogil:
        for h in range(HALVES):
            hist[h] = 0
        for r in range(nb):
            row_ok[r] = _pad_row(&coarse[r, 0], nc, P + r * (nc + 4), H + r * (nc + 4))
        for i in range(nb):
            _median5_at(P, H, row_ok, i, nb, nc, &O[i, 0], hist)
    free(P)
    free(H)
    free(row_ok)
    return out


ctypedef fused ring_t:
    unsigned char
    double


cdef inline ring_t *_ring_row(ring_t *ring, Py_ssize_t r, int bin_, Py_ssize_t nf) noexcept nogil:
    """Pixel row r's place in a ring of four rows of bins."""
    return ring + (((r // bin_) % 4) * bin_ + r % bin_) * nf


cdef Py_ssize_t _block(pix_t **st, Py_ssize_t k, Py_ssize_t ns, Py_ssize_t nf, double nullpix, int bin_,
                       double ratio, double min_level, Py_ssize_t *hits) noexcept nogil:
    """shadow_block's test, streamed: rows of bins' statistics into a ring of four (a row of bins' test
    needs the level of the 5 x 5 bins about it, so the statistics run two rows of bins ahead, and the
    row above for the 3 x 3 sums), each level row from the five padded coarse rows about it; the
    places of the shadow's pixels (before growing) into hits, their number returned."""
    cdef Py_ssize_t nbr = (ns + bin_ - 1) // bin_, nbc = (nf + bin_ - 1) // bin_, slot = bin_ * nf
    cdef Py_ssize_t bi, nxt = 0, need, a, r, i, n = 0
    cdef int h
    cdef int hist[HALVES]
    cdef int hist5[HALVES]
    cdef unsigned char *Vr = <unsigned char *>malloc(4 * slot)
    cdef double *Mr = <double *>malloc(4 * slot * sizeof(double))
    cdef double *C = <double *>malloc(nbc * sizeof(double))
    cdef double *P = <double *>malloc(nbr * (nbc + 4) * sizeof(double))
    cdef int *H = <int *>malloc(nbr * (nbc + 4) * sizeof(int))
    cdef unsigned char *row_ok = <unsigned char *>malloc(nbr)
    cdef double *lrow = <double *>malloc(nbc * sizeof(double))
    cdef double *buf = <double *>malloc(k * sizeof(double))
    cdef double *bb = <double *>malloc(bin_ * bin_ * sizeof(double))
    # sums along rows of 3 of the last three rows, in a ring (as shadow_test)
    cdef double *RM = <double *>malloc(3 * nf * sizeof(double))
    cdef double *RV = <double *>malloc(3 * nf * sizeof(double))
    cdef unsigned char *hrow = <unsigned char *>malloc(nf)
    for h in range(HALVES):
        hist[h] = 0
    for h in range(HALVES):
        hist5[h] = 0
    for bi in range(nbr):
        need = min(bi + 2, nbr - 1)
        while nxt <= need:
            _stats_bins(st, k, ns, nf, nullpix, bin_, nxt, nbc, Vr + (nxt % 4) * slot, Mr + (nxt % 4) * slot,
                        C, buf, bb, hist)
            row_ok[nxt] = _pad_row(C, nbc, P + nxt * (nbc + 4), H + nxt * (nbc + 4))
            nxt += 1
        _median5_at(P, H, row_ok, bi, nbr, nbc, lrow, hist5)
        if bi == 0:
            for r in range(min(2, ns)):
                pyflm_row_sums(nf, _ring_row(Mr, r, bin_, nf), _ring_row(Vr, r, bin_, nf),
                               RM + (r % 3) * nf, RV + (r % 3) * nf)
        for i in range(bi * bin_, min((bi + 1) * bin_, ns)):
            if i + 1 < ns and i >= 1:
                pyflm_row_sums(nf, _ring_row(Mr, i + 1, bin_, nf), _ring_row(Vr, i + 1, bin_, nf),
                               RM + ((i + 1) % 3) * nf, RV + ((i + 1) % 3) * nf)
            a = (i - 1 if i > 0 else 0) % 3
            r = (i + 1 if i + 1 < ns else ns - 1) % 3
            pyflm_shadow_row(nf, bin_, _ring_row(Vr, i, bin_, nf), lrow, RM + a * nf, RM + (i % 3) * nf,
                             RM + r * nf, RV + a * nf, RV + (i % 3) * nf, RV + r * nf, ratio, min_level, hrow)
            n = pyflm_collect(nf, hrow, i * nf, hits, n)
    free(Vr)
    free(Mr)
    free(C)
    free(P)
    free(H)
    free(row_ok)
    free(lrow)
    free(buf)
    free(bb)
    free(RM)
    free(RV)
    free(hrow)
    return n


def shadow_block(images, double nullpix=-1.0, int bin_=8, double ratio=0.25, double min_level=0.5,
                 int grow=2):
    """shadow_mask of a block in one streaming pass: block_stats, median5 and shadow_test's mask (the
    same to the bit) without the block's arrays of medians and validity, which shadow_test read back
    from memory (8 MB of medians a sim block); their rows of bins pass through a ring in the cache."""
    dt = images[0].dtype
    if dt not in (np.int32, np.float32, np.float64) or any(d.dtype != dt for d in images):
        dt = np.float64
    arrs = [np.ascontiguousarray(d, dt) for d in images]
    cdef Py_ssize_t k = len(arrs), ns = arrs[0].shape[0], nf = arrs[0].shape[1], t, n = 0
    if any(a.shape != (ns, nf) for a in arrs):
        raise ValueError("the images of a block differ in size")
    out = np.zeros((ns, nf), np.uint8)
    if ns == 0 or nf == 0:
        return out.view(np.bool_)
    cdef unsigned char[:, ::1] O = out
    cdef void **ptr = <void **>malloc(k * sizeof(void *))
    cdef Py_ssize_t *hits = <Py_ssize_t *>malloc(ns * nf * sizeof(Py_ssize_t))
    cdef cnp.ndarray a
    for t in range(k):
        a = arrs[t]
        ptr[t] = cnp.PyArray_DATA(a)
    cdef int code = 0 if dt == np.int32 else 1 if dt == np.float32 else 2
    try:
        with nogil:
            if code == 0:
                n = _block(<cnp.int32_t **>ptr, k, ns, nf, nullpix, bin_, ratio, min_level, hits)
            elif code == 1:
                n = _block(<float **>ptr, k, ns, nf, nullpix, bin_, ratio, min_level, hits)
            else:
                n = _block(<double **>ptr, k, ns, nf, nullpix, bin_, ratio, min_level, hits)
            _grow(hits, n, ns, nf, grow, O)
    finally:
        free(ptr)
        free(hits)
    return out.view(np.bool_)

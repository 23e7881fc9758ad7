# cython: boundscheck=False, wraparound=False, cdivision=True
"""Integration kernel: per reflection, one pass over its box's pixels straight from the image (no
shoebox arrays): validity, background plane with outlier rejection, summation intensity, centroid
(measure); the strong ones' net peaks added into the fine-grid profile sums (add_profile_sums);
profile-fitted intensity against its region's standard profile (fit_profiles).

The numpy twin is pyflm.shoebox (extract_boxes, _valid, _bg_valid, fit_background_numpy, summation,
profile_sums, profiles_at, fit_profiles); tests/test_integrate_kernel.py holds them equal on the sim
sweep's images.  numpy built (n, 17, 17) float arrays per step and ~40 passes over them per image;
this reads each pixel once per step."""
import numpy as np
cimport numpy as cnp
from libc.math cimport sqrt, fabs, floor, NAN
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memset

cnp.import_array()

ctypedef fused pix_t:
    cnp.int32_t
    cnp.uint16_t
    float
    double


include "solve3.pxi"


cdef inline Py_ssize_t _clip(Py_ssize_t v, Py_ssize_t hi) noexcept nogil:
    return 0 if v < 0 else (hi if v > hi else v)


cdef inline long long _corner(double p, int half) noexcept nogil:
    """floor(p) - half, as numpy's floor(...).astype(int64) - half (a non-finite p: far off the image)."""
    if not (p == p) or p > 1e15 or p < -1e15:
        return -(<long long>1 << 40)
    return <long long>floor(p) - half


cdef extern from *:
    """
    /* The background plane's inner loops, written so the compiler vectorises them (2 pixels per SSE2
       instruction; the reductions are allowed to reorder by -fopenmp-simd): sums over the pixels in use
       (u = 1 or 0), and the rejection test (|c - plane| <= cut sigma, no division).  For counts every
       sum is exact in any order, so they equal the twin's to the last bit. */
    #include <emmintrin.h>
    static inline double pyflm_hsum(__m128d v) {
        return _mm_cvtsd_f64(v) + _mm_cvtsd_f64(_mm_unpackhi_pd(v, v));
    }
    /* d > 0 ? d : 0 by maxsd (gcc kept the branch, which the signs of weak spots' net counts defeat) */
    static inline double pyflm_pos(double d) {
        return _mm_cvtsd_f64(_mm_max_sd(_mm_set_sd(d), _mm_setzero_pd()));
    }
    /* The first plane fit's nine sums (1, x, y, xx, xy, yy, c, x.c, y.c) with every gathered pixel in
       use (2 pixels per SSE2 instruction).  Those of the coordinates alone are exact sums of whole or
       half-integer products, so they equal any other order's (the rim's less the pixels left out). */
    static void pyflm_data_sums(int n, const double *x, const double *y, const double *c, double *s) {
        __m128d sc = _mm_setzero_pd(), sxc = sc, syc = sc, sx = sc, sy = sc, sxx = sc, sxy = sc, syy = sc;
        int k = 0;
        for (; k + 2 <= n; k += 2) {
            __m128d X = _mm_loadu_pd(x + k), Y = _mm_loadu_pd(y + k), C = _mm_loadu_pd(c + k);
            sc = _mm_add_pd(sc, C); sxc = _mm_add_pd(sxc, _mm_mul_pd(X, C));
            syc = _mm_add_pd(syc, _mm_mul_pd(Y, C));
            sx = _mm_add_pd(sx, X); sy = _mm_add_pd(sy, Y); sxx = _mm_add_pd(sxx, _mm_mul_pd(X, X));
            sxy = _mm_add_pd(sxy, _mm_mul_pd(X, Y)); syy = _mm_add_pd(syy, _mm_mul_pd(Y, Y));
        }
        s[0] = n; s[1] = pyflm_hsum(sx); s[2] = pyflm_hsum(sy); s[3] = pyflm_hsum(sxx);
        s[4] = pyflm_hsum(sxy); s[5] = pyflm_hsum(syy);
        s[6] = pyflm_hsum(sc); s[7] = pyflm_hsum(sxc); s[8] = pyflm_hsum(syc);
        for (; k < n; k++) {
            s[1] += x[k]; s[2] += y[k]; s[3] += x[k] * x[k]; s[4] += x[k] * y[k]; s[5] += y[k] * y[k];
            s[6] += c[k]; s[7] += x[k] * c[k]; s[8] += y[k] * c[k];
        }
    }
    /* The rejection test (|c - plane| <= cut sigma, no division), and the plane sums s (1, x, y, xx, xy, yy, c, xc, yc) brought up to date by the pixels
       whose use changed, instead of summing every pixel again: few change after the first fit.  For
       counts the sums are exact whatever the order, so they equal a new sum to the bit. */
    static void pyflm_flip(int k, double d, const double *x, const double *y, const double *c, double *s) {
        double xw = d * x[k], yw = d * y[k];
        s[0] += d; s[1] += xw; s[2] += yw; s[3] += xw * x[k]; s[4] += xw * y[k]; s[5] += yw * y[k];
        s[6] += d * c[k]; s[7] += xw * c[k]; s[8] += yw * c[k];
    }
    /* One rejection pass with this plane.  With ssq given, also the squared residuals in sigma units of
       the pixels kept, and their number (*count): the last pass's sums are the fit's rms, with no pass
       of its own. */
    /* (from pixel k on, the squared residuals' two lanes ss, nu and `changed` carried in: the whole
       pass from 0, and pyflm_reject4's pixels after its last four) */
    static inline __attribute__((always_inline)) int pyflm_reject_from(int k, int n, const double *x,
            const double *y, const double *c, double *u, double c0, double c1, double c2, double gain,
            double fl, double cut2, double *s, double *ssq, double *count, __m128d ss, __m128d nu,
            int changed) {
        const __m128d C0 = _mm_set1_pd(c0), C1 = _mm_set1_pd(c1), C2 = _mm_set1_pd(c2);
        const __m128d G = _mm_set1_pd(gain), FL = _mm_set1_pd(fl), K = _mm_set1_pd(cut2), ONE = _mm_set1_pd(1.0);
        int mm;
        for (; k + 2 <= n; k += 2) {
            __m128d pl = _mm_add_pd(_mm_add_pd(C0, _mm_mul_pd(C1, _mm_loadu_pd(x + k))),
                                    _mm_mul_pd(C2, _mm_loadu_pd(y + k)));
            __m128d d = _mm_sub_pd(_mm_loadu_pd(c + k), pl);
            __m128d v = _mm_mul_pd(_mm_max_pd(pl, FL), G);
            __m128d keep = _mm_and_pd(_mm_cmple_pd(_mm_mul_pd(d, d), _mm_mul_pd(K, v)), ONE);
            if (ssq) {
                ss = _mm_add_pd(ss, _mm_mul_pd(keep, _mm_div_pd(_mm_mul_pd(d, d), v)));
                nu = _mm_add_pd(nu, keep);
            }
            mm = _mm_movemask_pd(_mm_cmpneq_pd(keep, _mm_loadu_pd(u + k)));
            if (mm) {
                double kv[2];
                _mm_storeu_pd(kv, keep);
                if (mm & 1) { pyflm_flip(k, kv[0] - u[k], x, y, c, s); u[k] = kv[0]; }
                if (mm & 2) { pyflm_flip(k + 1, kv[1] - u[k + 1], x, y, c, s); u[k + 1] = kv[1]; }
                changed = 1;
            }
        }
        double t = pyflm_hsum(ss), m = pyflm_hsum(nu);
        for (; k < n; k++) {
            double pl = c0 + c1 * x[k] + c2 * y[k];
            double d = c[k] - pl;
            double v = (pl > fl ? pl : fl) * gain;
            double keep = (d * d <= cut2 * v) ? 1.0 : 0.0;
            if (keep != u[k]) { pyflm_flip(k, keep - u[k], x, y, c, s); u[k] = keep; changed = 1; }
            if (ssq) {
                t += u[k] * (d * d / v);
                m += u[k];
            }
        }
        if (ssq) {
            *ssq = t;
            *count = m;
        }
        return changed;
    }
    static inline __attribute__((always_inline)) int pyflm_reject_(int n, const double *x, const double *y, const double *c, double *u,
                                   double c0, double c1, double c2, double gain, double fl, double cut2, double *s,
                                   double *ssq, double *count) {
        return pyflm_reject_from(0, n, x, y, c, u, c0, c1, c2, gain, fl, cut2, s, ssq, count, _mm_setzero_pd(),
                                 _mm_setzero_pd(), 0);
    }
    /* the profile fit's sums over the pixels in use: a = sum P^2/v, b = sum P.net/v, v = gain.(bg + I.P) */
    /* (from pixel k on, the two lanes' sums sa, sb carried in: the whole sum from 0, and
       pyflm_fit_sums4's pixels after its last four) */
    static inline __attribute__((always_inline)) void pyflm_fit_sums_from(int k, int n, const double *P,
            const double *PL, const double *NET, const double *U, double Iv, double gain, double *a,
            double *b, __m128d sa, __m128d sb) {
        const __m128d IV = _mm_set1_pd(Iv), G = _mm_set1_pd(gain), HALF = _mm_set1_pd(0.5);
        for (; k + 2 <= n; k += 2) {
            __m128d p = _mm_loadu_pd(P + k);
            __m128d v = _mm_add_pd(_mm_loadu_pd(PL + k), _mm_mul_pd(IV, p));
            v = _mm_mul_pd(G, _mm_max_pd(v, HALF));
            __m128d w = _mm_div_pd(_mm_loadu_pd(U + k), v);
            sa = _mm_add_pd(sa, _mm_mul_pd(_mm_mul_pd(p, p), w));
            sb = _mm_add_pd(sb, _mm_mul_pd(_mm_mul_pd(p, _mm_loadu_pd(NET + k)), w));
        }
        double ra = pyflm_hsum(sa), rb = pyflm_hsum(sb);
        for (; k < n; k++) {
            double v = PL[k] + Iv * P[k];
            v = gain * (v > 0.5 ? v : 0.5);
            double w = U[k] / v;
            ra += P[k] * P[k] * w;
            rb += P[k] * NET[k] * w;
        }
        *a = ra;
        *b = rb;
    }
    static void pyflm_fit_sums(int n, const double *P, const double *PL, const double *NET,
                               const double *U, double Iv, double gain, double *a, double *b) {
        pyflm_fit_sums_from(0, n, P, PL, NET, U, Iv, gain, a, b, _mm_setzero_pd(), _mm_setzero_pd());
    }
    """
    void pyflm_fit_sums(int n, const double *P, const double *PL, const double *NET, const double *U,
                        double Iv, double gain, double *a, double *b) nogil
    void pyflm_data_sums(int n, const double *x, const double *y, const double *c, double *s) nogil
    double pyflm_pos(double d) nogil


DEF PREFETCH_AHEAD = 6

cdef extern from *:
    """
    /* whole rows are asked for with locality 1 (prefetcht2: into L2, not L1): eight rows ahead of three
       images and a mask are ~125 KB, and brought into L1 (32 KB) they pushed out the rows of the boxes
       being read; measure 7.2-8.0 -> 5.3-6.1 ms, the fit 2.1 -> 1.7 ms per sim image */
    #define pyflm_pf_row(a) __builtin_prefetch((a), 0, 1)
    """
    void __builtin_prefetch(const void *addr) nogil
    void pyflm_pf_row(const void *addr) nogil


DEF ROWS_AHEAD = 8


cdef extern from *:
    """
    /* One image row of the background candidates, formed once for every box over it (a dense image's
       boxes read each row's pixels of three images and four masks ~17 times, one pixel at a time, each
       read waiting on the cache): the sum of the pixel's counts on the nimg images, (a + b) + c as the
       twin's np.mean adds them, where each is above nullpix and none of the masks m0..m3 marks it; NaN
       elsewhere.  Two pixels per SSE2 instruction, the rows read in order. */
    #include <math.h>
    #include <string.h>
    #define PYFLM_BGPAIR(LOAD2, K, OK) { \
            __m128d ok = _mm_castsi128_pd(OK), s = LOAD2(a + (K)); \
            ok = _mm_and_pd(ok, _mm_cmpgt_pd(s, nul)); \
            if (nimg > 1) { __m128d u_ = LOAD2(b + (K)); ok = _mm_and_pd(ok, _mm_cmpgt_pd(u_, nul)); \
                            s = _mm_add_pd(s, u_); } \
            if (nimg > 2) { __m128d u_ = LOAD2(c + (K)); ok = _mm_and_pd(ok, _mm_cmpgt_pd(u_, nul)); \
                            s = _mm_add_pd(s, u_); } \
            _mm_storeu_pd(out + (K), _mm_or_pd(_mm_and_pd(ok, s), _mm_andnot_pd(ok, nan))); }
    /* 16 pixels' bytes of the four masks ORed: 0xff where none marks the pixel (SSE2 and AVX2 rows) */
    static inline __attribute__((always_inline)) __m128i pyflm_unmasked16(const unsigned char *m0,
            const unsigned char *m1, const unsigned char *m2, const unsigned char *m3) {
        __m128i w = _mm_or_si128(_mm_or_si128(_mm_loadu_si128((const __m128i *)m0), _mm_loadu_si128((const __m128i *)m1)),
                                 _mm_or_si128(_mm_loadu_si128((const __m128i *)m2), _mm_loadu_si128((const __m128i *)m3)));
        return _mm_cmpeq_epi8(w, _mm_setzero_si128());
    }
    #define PYFLM_BGROW(NAME, T, LOAD2) \
    static void NAME(Py_ssize_t nf, int nimg, const T *a, const T *b, const T *c, \
                     const unsigned char *m0, const unsigned char *m1, const unsigned char *m2, \
                     const unsigned char *m3, double nullpix, double *out) { \
        const __m128d nul = _mm_set1_pd(nullpix), nan = _mm_set1_pd(NAN); \
        Py_ssize_t j = 0; \
        /* 16 pixels at a time: the four masks' bytes ORed, tested, and widened to the pairs' lanes */ \
        for (; j + 16 <= nf; j += 16) { \
            __m128i z = pyflm_unmasked16(m0 + j, m1 + j, m2 + j, m3 + j); \
            __m128i zl = _mm_unpacklo_epi8(z, z), zh = _mm_unpackhi_epi8(z, z); \
            __m128i q[4] = {_mm_unpacklo_epi16(zl, zl), _mm_unpackhi_epi16(zl, zl), \
                            _mm_unpacklo_epi16(zh, zh), _mm_unpackhi_epi16(zh, zh)}; \
            for (int t = 0; t < 4; t++) { \
                PYFLM_BGPAIR(LOAD2, j + 4 * t, _mm_unpacklo_epi32(q[t], q[t])) \
                PYFLM_BGPAIR(LOAD2, j + 4 * t + 2, _mm_unpackhi_epi32(q[t], q[t])) \
            } \
        } \
        for (; j + 2 <= nf; j += 2) { \
            unsigned short w0, w1, w2, w3; \
            memcpy(&w0, m0 + j, 2); memcpy(&w1, m1 + j, 2); memcpy(&w2, m2 + j, 2); memcpy(&w3, m3 + j, 2); \
            unsigned w = (unsigned)(w0 | w1 | w2 | w3); \
            PYFLM_BGPAIR(LOAD2, j, _mm_set_epi64x(-(long long)((w >> 8) == 0), -(long long)((w & 0xff) == 0))) \
        } \
        for (; j < nf; j++) { \
            double s = (double)a[j]; \
            int ok = s > nullpix && !(m0[j] | m1[j] | m2[j] | m3[j]); \
            if (nimg > 1) { double t = (double)b[j]; ok = ok && t > nullpix; s = s + t; } \
            if (nimg > 2) { double t = (double)c[j]; ok = ok && t > nullpix; s = s + t; } \
            out[j] = ok ? s : NAN; \
        } \
    }
    #define PYFLM_BG_I32(p) _mm_cvtepi32_pd(_mm_loadl_epi64((const __m128i *)(p)))
    static inline __m128d pyflm_bg_u16(const unsigned short *p) {
        int v; memcpy(&v, p, 4);
        return _mm_cvtepi32_pd(_mm_unpacklo_epi16(_mm_cvtsi32_si128(v), _mm_setzero_si128()));
    }
    #define PYFLM_BG_F32(p) _mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(p))))
    #define PYFLM_BG_F64(p) _mm_loadu_pd(p)
    PYFLM_BGROW(pyflm_bgrow_i32, int, PYFLM_BG_I32)
    PYFLM_BGROW(pyflm_bgrow_u16, unsigned short, pyflm_bg_u16)
    PYFLM_BGROW(pyflm_bgrow_f32, float, PYFLM_BG_F32)
    PYFLM_BGROW(pyflm_bgrow_f64, double, PYFLM_BG_F64)
    /* The same rows with AVX2 where the processor has it (4 pixels an instruction; chosen at run time,
       the module built for SSE2): the same operations on each pixel, so the same numbers.
       pyflm_simd: -1 as the processor allows, 0 SSE2 only (the tests run both). */
    #include <immintrin.h>
    static int pyflm_simd = -1, pyflm_cpu_avx2 = -1;
    static inline int pyflm_avx2(void) {
        if (pyflm_cpu_avx2 < 0) { __builtin_cpu_init(); pyflm_cpu_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0; }
        return pyflm_cpu_avx2 && pyflm_simd != 0;
    }
    static int pyflm_set_simd(int level) { int old = pyflm_simd; pyflm_simd = level; return old; }
    #define PYFLM_BGQUAD(LOAD4, K, OK) { \
            __m256d ok = _mm256_castsi256_pd(OK), s = LOAD4(a + (K)); \
            ok = _mm256_and_pd(ok, _mm256_cmp_pd(s, nul, _CMP_GT_OQ)); \
            if (nimg > 1) { __m256d u_ = LOAD4(b + (K)); ok = _mm256_and_pd(ok, _mm256_cmp_pd(u_, nul, _CMP_GT_OQ)); \
                            s = _mm256_add_pd(s, u_); } \
            if (nimg > 2) { __m256d u_ = LOAD4(c + (K)); ok = _mm256_and_pd(ok, _mm256_cmp_pd(u_, nul, _CMP_GT_OQ)); \
                            s = _mm256_add_pd(s, u_); } \
            _mm256_storeu_pd(out + (K), _mm256_blendv_pd(nan, s, ok)); }
    #define PYFLM_BGROW_AVX2(NAME, SSE2, T, LOAD4) \
    __attribute__((target("avx2"))) static void NAME(Py_ssize_t nf, int nimg, const T *a, const T *b, \
            const T *c, const unsigned char *m0, const unsigned char *m1, const unsigned char *m2, \
            const unsigned char *m3, double nullpix, double *out) { \
        const __m256d nul = _mm256_set1_pd(nullpix), nan = _mm256_set1_pd(NAN); \
        Py_ssize_t j = 0; \
        for (; j + 16 <= nf; j += 16) { \
            __m128i z = pyflm_unmasked16(m0 + j, m1 + j, m2 + j, m3 + j); \
            PYFLM_BGQUAD(LOAD4, j, _mm256_cvtepi8_epi64(z)) \
            PYFLM_BGQUAD(LOAD4, j + 4, _mm256_cvtepi8_epi64(_mm_srli_si128(z, 4))) \
            PYFLM_BGQUAD(LOAD4, j + 8, _mm256_cvtepi8_epi64(_mm_srli_si128(z, 8))) \
            PYFLM_BGQUAD(LOAD4, j + 12, _mm256_cvtepi8_epi64(_mm_srli_si128(z, 12))) \
        } \
        if (j < nf) SSE2(nf - j, nimg, a + j, b + j, c + j, m0 + j, m1 + j, m2 + j, m3 + j, nullpix, out + j); \
    }
    #define PYFLM_BG4_I32(p) _mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(p)))
    #define PYFLM_BG4_U16(p) _mm256_cvtepi32_pd(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(p))))
    #define PYFLM_BG4_F32(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
    #define PYFLM_BG4_F64(p) _mm256_loadu_pd(p)
    PYFLM_BGROW_AVX2(pyflm_bgrow4_i32, pyflm_bgrow_i32, int, PYFLM_BG4_I32)
    PYFLM_BGROW_AVX2(pyflm_bgrow4_u16, pyflm_bgrow_u16, unsigned short, PYFLM_BG4_U16)
    PYFLM_BGROW_AVX2(pyflm_bgrow4_f32, pyflm_bgrow_f32, float, PYFLM_BG4_F32)
    PYFLM_BGROW_AVX2(pyflm_bgrow4_f64, pyflm_bgrow_f64, double, PYFLM_BG4_F64)
    /* the eight as one entry for the kernels: kind 0 int32, 1 uint16, 2 float32, 3 float64; avx2 as
       pyflm_avx2() said */
    #define PYFLM_BGROW_CALL(F4, F, T) \
        if (avx2) F4(nf, nimg, (const T *)a, (const T *)b, (const T *)c, m0, m1, m2, m3, nullpix, out); \
        else F(nf, nimg, (const T *)a, (const T *)b, (const T *)c, m0, m1, m2, m3, nullpix, out);
    static void pyflm_bgrow_any(int kind, int avx2, Py_ssize_t nf, int nimg, const void *a, const void *b,
            const void *c, const unsigned char *m0, const unsigned char *m1, const unsigned char *m2,
            const unsigned char *m3, double nullpix, double *out) {
        switch (kind) {
        case 0: PYFLM_BGROW_CALL(pyflm_bgrow4_i32, pyflm_bgrow_i32, int) break;
        case 1: PYFLM_BGROW_CALL(pyflm_bgrow4_u16, pyflm_bgrow_u16, unsigned short) break;
        case 2: PYFLM_BGROW_CALL(pyflm_bgrow4_f32, pyflm_bgrow_f32, float) break;
        default: PYFLM_BGROW_CALL(pyflm_bgrow4_f64, pyflm_bgrow_f64, double) break;
        }
    }
    /* v[0:n] / k, each correctly rounded (the same as one at a time) */
    __attribute__((target("avx2"))) static void pyflm_div4(int n, double *v, double k) {
        const __m256d K = _mm256_set1_pd(k);
        int j = 0;
        for (; j + 4 <= n; j += 4) _mm256_storeu_pd(v + j, _mm256_div_pd(_mm256_loadu_pd(v + j), K));
        for (; j < n; j++) v[j] = v[j] / k;
    }
    static void pyflm_div(int n, double *v, double k) {
        if (pyflm_avx2()) { pyflm_div4(n, v, k); return; }
        const __m128d K = _mm_set1_pd(k);
        int j = 0;
        for (; j + 2 <= n; j += 2) _mm_storeu_pd(v + j, _mm_div_pd(_mm_loadu_pd(v + j), K));
        for (; j < n; j++) v[j] = v[j] / k;
    }
    /* pyflm_fit_sums with AVX2: four pixels' weights an instruction (the divisions), their products
       added to SSE2's two lane sums two at a time, in SSE2's order, so the same bits */
    __attribute__((target("avx2"))) static void pyflm_fit_sums4(int n, const double *P, const double *PL,
            const double *NET, const double *U, double Iv, double gain, double *a, double *b) {
        const __m256d IV = _mm256_set1_pd(Iv), G = _mm256_set1_pd(gain), HALF = _mm256_set1_pd(0.5);
        __m128d sa = _mm_setzero_pd(), sb = sa;
        int k = 0;
        for (; k + 4 <= n; k += 4) {
            __m256d p = _mm256_loadu_pd(P + k);
            __m256d v = _mm256_add_pd(_mm256_loadu_pd(PL + k), _mm256_mul_pd(IV, p));
            v = _mm256_mul_pd(G, _mm256_max_pd(v, HALF));
            __m256d w = _mm256_div_pd(_mm256_loadu_pd(U + k), v);
            __m256d ta = _mm256_mul_pd(_mm256_mul_pd(p, p), w);
            __m256d tb = _mm256_mul_pd(_mm256_mul_pd(p, _mm256_loadu_pd(NET + k)), w);
            sa = _mm_add_pd(_mm_add_pd(sa, _mm256_castpd256_pd128(ta)), _mm256_extractf128_pd(ta, 1));
            sb = _mm_add_pd(_mm_add_pd(sb, _mm256_castpd256_pd128(tb)), _mm256_extractf128_pd(tb, 1));
        }
        pyflm_fit_sums_from(k, n, P, PL, NET, U, Iv, gain, a, b, sa, sb);     /* the rest as SSE2 does */
    }
    """
    int pyflm_avx2() nogil
    int pyflm_set_simd(int level) nogil
    void pyflm_div(int n, double *v, double k) nogil
    void pyflm_fit_sums4(int n, const double *P, const double *PL, const double *NET, const double *U,
                         double Iv, double gain, double *a, double *b) nogil
    void pyflm_bgrow_any(int kind, int avx2, Py_ssize_t nf, int nimg, const void *a, const void *b,
                         const void *c, const unsigned char *m0, const unsigned char *m1,
                         const unsigned char *m2, const unsigned char *m3, double nullpix, double *out) nogil


cdef extern from *:
    """
    /* Four pixels' rejection test (kept: 1.0, else 0.0) against the plane c0 + c1 x + c2 y, with the
       kept ones' squared residuals in sigma units added into SSE2's two lanes in SSE2's order (pixels
       k, k + 1, then k + 2, k + 3) when want_ssq */
    static inline __m256d pyflm_keep4(__m256d X, __m256d Y, __m256d Cc, __m256d C0, __m256d C1, __m256d C2,
            __m256d G, __m256d FL, __m256d K, __m256d ONE, int want_ssq, __m128d *ss, __m128d *nu)
            __attribute__((target("avx2"), always_inline));
    static inline __m256d pyflm_keep4(__m256d X, __m256d Y, __m256d Cc, __m256d C0, __m256d C1, __m256d C2,
            __m256d G, __m256d FL, __m256d K, __m256d ONE, int want_ssq, __m128d *ss, __m128d *nu) {
        __m256d pl = _mm256_add_pd(_mm256_add_pd(C0, _mm256_mul_pd(C1, X)), _mm256_mul_pd(C2, Y));
        __m256d d = _mm256_sub_pd(Cc, pl);
        __m256d v = _mm256_mul_pd(_mm256_max_pd(pl, FL), G);
        __m256d d2 = _mm256_mul_pd(d, d);
        __m256d keep = _mm256_and_pd(_mm256_cmp_pd(d2, _mm256_mul_pd(K, v), _CMP_LE_OS), ONE);
        if (want_ssq) {
            __m256d t = _mm256_mul_pd(keep, _mm256_div_pd(d2, v));
            *ss = _mm_add_pd(*ss, _mm256_castpd256_pd128(t));
            *ss = _mm_add_pd(*ss, _mm256_extractf128_pd(t, 1));
            *nu = _mm_add_pd(*nu, _mm256_castpd256_pd128(keep));
            *nu = _mm_add_pd(*nu, _mm256_extractf128_pd(keep, 1));
        }
        return keep;
    }
    /* The exact pass (pyflm_reject4's exact): every one of the plane's sums is exact in any order (counts,
       or several images' summed counts, times the box's integer or half-integer coordinates): a vector
       of four pixels with a change of use adds its changes into nine vector sums, those into s at the
       pass's end.  A strong spot's rim flips ~10 pixels a pass, each one a mispredicted branch and a
       call: 60 % of pass 1's measurement on the sim sweep.  The same use, squared residuals and sums to
       the bit as pixel by pixel (the residuals in the same lanes). */
    static inline double pyflm_hsum4(__m256d v) __attribute__((target("avx2")));
    static inline double pyflm_hsum4(__m256d v) {
        return pyflm_hsum(_mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1)));
    }
    /* pyflm_reject with AVX2 (4 pixels an instruction): the same test on each pixel, the squared
       residuals in SSE2's lanes and order, so the same numbers.  exact: a vector's changes of use added
       into nine vector sums, added to s at the end; else the sums brought up to date pixel by pixel in
       their order */
    __attribute__((target("avx2"))) static inline int pyflm_reject4(int exact, int n, const double *x,
            const double *y, const double *c, double *u, double c0, double c1, double c2, double gain,
            double fl, double cut2, double *s, double *ssq, double *count) {
        const __m256d C0 = _mm256_set1_pd(c0), C1 = _mm256_set1_pd(c1), C2 = _mm256_set1_pd(c2);
        const __m256d G = _mm256_set1_pd(gain), FL = _mm256_set1_pd(fl), K = _mm256_set1_pd(cut2), ONE = _mm256_set1_pd(1.0);
        __m128d ss = _mm_setzero_pd(), nu = ss;
        __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0,
                a8 = a0;
        int k = 0, changed = 0;
        for (; k + 4 <= n; k += 4) {
            __m256d X = _mm256_loadu_pd(x + k), Y = _mm256_loadu_pd(y + k), Cc = _mm256_loadu_pd(c + k);
            __m256d keep = pyflm_keep4(X, Y, Cc, C0, C1, C2, G, FL, K, ONE, ssq != NULL, &ss, &nu);
            __m256d U = _mm256_loadu_pd(u + k);
            int mm = _mm256_movemask_pd(_mm256_cmp_pd(keep, U, _CMP_NEQ_UQ));
            if (!mm)
                continue;
            changed = 1;
            _mm256_storeu_pd(u + k, keep);
            if (exact) {
                /* (only a vector with a change of use: pass 2's boxes, their neighbours' peaks kept
                   out, change few; the four lanes at once, not one branch and call a pixel) */
                __m256d dl = _mm256_sub_pd(keep, U);
                __m256d dx = _mm256_mul_pd(dl, X), dy = _mm256_mul_pd(dl, Y);
                a0 = _mm256_add_pd(a0, dl); a1 = _mm256_add_pd(a1, dx); a2 = _mm256_add_pd(a2, dy);
                a3 = _mm256_add_pd(a3, _mm256_mul_pd(dx, X)); a4 = _mm256_add_pd(a4, _mm256_mul_pd(dx, Y));
                a5 = _mm256_add_pd(a5, _mm256_mul_pd(dy, Y)); a6 = _mm256_add_pd(a6, _mm256_mul_pd(dl, Cc));
                a7 = _mm256_add_pd(a7, _mm256_mul_pd(dx, Cc)); a8 = _mm256_add_pd(a8, _mm256_mul_pd(dy, Cc));
            } else {
                double kv[4], uv[4];
                _mm256_storeu_pd(kv, keep);
                _mm256_storeu_pd(uv, U);
                for (int t = 0; t < 4; t++)
                    if (mm & (1 << t)) pyflm_flip(k + t, kv[t] - uv[t], x, y, c, s);
            }
        }
        if (exact) {
            s[0] += pyflm_hsum4(a0); s[1] += pyflm_hsum4(a1); s[2] += pyflm_hsum4(a2);
            s[3] += pyflm_hsum4(a3); s[4] += pyflm_hsum4(a4); s[5] += pyflm_hsum4(a5);
            s[6] += pyflm_hsum4(a6); s[7] += pyflm_hsum4(a7); s[8] += pyflm_hsum4(a8);
        }
        /* the rest as pyflm_reject_ does, its lanes carried on */
        return pyflm_reject_from(k, n, x, y, c, u, c0, c1, c2, gain, fl, cut2, s, ssq, count, ss, nu, changed);
    }
    /* One rejection pass: the plane's variance gain.max(plane, fl); exact as pyflm_reject4 (without
       AVX2 pixel by pixel, whose sums are then the same bits) */
    static int pyflm_reject_simd(int exact, int n, const double *x, const double *y, const double *c,
                                 double *u, double c0, double c1, double c2, double gain, double fl,
                                 double cut2, double *s, double *ssq, double *count) {
        if (pyflm_avx2()) return pyflm_reject4(exact, n, x, y, c, u, c0, c1, c2, gain, fl, cut2, s, ssq, count);
        return pyflm_reject_(n, x, y, c, u, c0, c1, c2, gain, fl, cut2, s, ssq, count);
    }
    """
    int pyflm_reject_simd(int exact, int n, const double *x, const double *y, const double *c, double *u,
                          double c0, double c1, double c2, double gain, double fl, double cut2, double *s,
                          double *ssq, double *count) nogil

cdef extern from *:
    """
    /* One box row's background candidates from a formed row (NaN: not one) appended to the fit's lists,
       four at a time with AVX2: the four gathered, the candidates among them moved to the front of the
       vector (a permutation from their mask) and stored, the lists' length moved on by their number.
       The scalar loop's stores had a dependency on the count from one pixel to the next. The same
       lists in the same order (the places beyond the length are not read). */
    static __m256i pyflm_pack_perm[16];
    /* (built once at the module's import, where the CPU has AVX2) */
    __attribute__((target("avx2"))) static void pyflm_pack_init(void) {
        for (int m = 0; m < 16; m++) {
            int idx[8], n = 0;
            for (int l = 0; l < 4; l++)
                if (m & (1 << l)) { idx[2 * n] = 2 * l; idx[2 * n + 1] = 2 * l + 1; n++; }
            for (; n < 4; n++) { idx[2 * n] = 0; idx[2 * n + 1] = 1; }
            pyflm_pack_perm[m] = _mm256_setr_epi32(idx[0], idx[1], idx[2], idx[3], idx[4], idx[5], idx[6], idx[7]);
        }
    }
    /* pixel by pixel: every one written, the count moved on where it is a candidate (no branch on the
       rim's runs of masked pixels, neighbours' peaks, which were mispredicted) */
    static inline int pyflm_gather_rim1(int q, int q1, const double *rowp, const int *bg_j,
            const double *gx, const double *gy, double *bx, double *by, double *bc, double *bu, int nb) {
        for (; q < q1; q++) {
            double c = rowp[bg_j[q]];
            bx[nb] = gx[q]; by[nb] = gy[q]; bc[nb] = c; bu[nb] = 1.0;
            nb += c == c;
        }
        return nb;
    }
    __attribute__((target("avx2"))) static int pyflm_gather_rim4(int q, int q1, const double *rowp,
            const int *bg_j, const double *gx, const double *gy, double *bx, double *by, double *bc,
            double *bu, int nb) {
        const __m256d ONE = _mm256_set1_pd(1.0);
        for (; q + 4 <= q1; q += 4) {
            /* (four neighbouring pixels, as a rim row's segments mostly are, by one load) */
            __m256d c = bg_j[q + 3] - bg_j[q] == 3 ? _mm256_loadu_pd(rowp + bg_j[q])
                        : _mm256_i32gather_pd(rowp, _mm_loadu_si128((const __m128i *)(bg_j + q)), 8);
            int m = _mm256_movemask_pd(_mm256_cmp_pd(c, c, _CMP_ORD_Q));
            __m256i pm = pyflm_pack_perm[m];
            _mm256_storeu_pd(bc + nb, _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(c), pm)));
            _mm256_storeu_pd(bx + nb, _mm256_castps_pd(_mm256_permutevar8x32_ps(
                _mm256_castpd_ps(_mm256_loadu_pd(gx + q)), pm)));
            _mm256_storeu_pd(by + nb, _mm256_castps_pd(_mm256_permutevar8x32_ps(
                _mm256_castpd_ps(_mm256_loadu_pd(gy + q)), pm)));
            _mm256_storeu_pd(bu + nb, ONE);
            nb += __builtin_popcount(m);
        }
        return pyflm_gather_rim1(q, q1, rowp, bg_j, gx, gy, bx, by, bc, bu, nb);
    }
    static int pyflm_gather_rim(int avx2, int q, int q1, const double *rowp, const int *bg_j,
            const double *gx, const double *gy, double *bx, double *by, double *bc, double *bu, int nb) {
        if (avx2) return pyflm_gather_rim4(q, q1, rowp, bg_j, gx, gy, bx, by, bc, bu, nb);
        return pyflm_gather_rim1(q, q1, rowp, bg_j, gx, gy, bx, by, bc, bu, nb);
    }
    static int pyflm_cpu_has_avx2(void) { __builtin_cpu_init(); return __builtin_cpu_supports("avx2"); }
    """
    void pyflm_pack_init() nogil
    int pyflm_cpu_has_avx2() nogil
    int pyflm_gather_rim(int avx2, int q, int q1, const double *rowp, const int *bg_j, const double *gx,
                         const double *gy, double *bx, double *by, double *bc, double *bu, int nb) nogil

if pyflm_cpu_has_avx2():
    pyflm_pack_init()


cdef inline void _bg_row(pix_t[:, ::1] data, pix_t[:, ::1] nb0, pix_t[:, ::1] nb1, int nimg, Py_ssize_t r,
                         const unsigned char **mk, const Py_ssize_t *mstep, double nullpix,
                         double *out, int avx2) noexcept nogil:
    """Row r of the background candidates (pyflm_bgrow) into out; mk, mstep: the four masks' first rows
    and row steps (0: a row of zeros standing in for a mask not given)."""
    cdef Py_ssize_t nf = data.shape[1]
    cdef const unsigned char *m0 = mk[0] + r * mstep[0]
    cdef const unsigned char *m1 = mk[1] + r * mstep[1]
    cdef const unsigned char *m2 = mk[2] + r * mstep[2]
    cdef const unsigned char *m3 = mk[3] + r * mstep[3]
    cdef int kind = 3
    if pix_t is cnp.int32_t:
        kind = 0
    elif pix_t is cnp.uint16_t:
        kind = 1
    elif pix_t is float:
        kind = 2
    pyflm_bgrow_any(kind, avx2, nf, nimg, &data[r, 0], &nb0[r, 0], &nb1[r, 0], m0, m1, m2, m3, nullpix, out)


cdef inline Py_ssize_t _prefetch_rows(const void *a, const void *b, const void *c, const void *d,
                                      Py_ssize_t row, Py_ssize_t cs, int nxs, Py_ssize_t ns,
                                      Py_ssize_t row_bytes, Py_ssize_t mrow_bytes) noexcept nogil:
    """Ask for whole image rows, in order, for a box whose first row is cs: from `row` (the next not yet
    asked for; from cs if that is further on) up to ROWS_AHEAD rows past the box.  The boxes come in
    the order of the image's rows at scattered columns, so each box's rows were cache misses one after
    the other (most of measure's time); whole rows in order are a stream the memory system keeps up
    with.  a, b, c: images (NULL: none), d: a byte mask (NULL: none).  Returns the next row to ask for."""
    cdef Py_ssize_t k, upto = cs + nxs + ROWS_AHEAD
    if cs > row:
        row = cs if cs < ns else ns
    if upto > ns:
        upto = ns
    while row < upto:
        k = 0
        while k < row_bytes:
            if a != NULL:
                pyflm_pf_row(<const char *>a + row * row_bytes + k)
            if b != NULL:
                pyflm_pf_row(<const char *>b + row * row_bytes + k)
            if c != NULL:
                pyflm_pf_row(<const char *>c + row * row_bytes + k)
            k += 64
        if d != NULL:
            k = 0
            while k < mrow_bytes:
                pyflm_pf_row(<const char *>d + row * mrow_bytes + k)
                k += 64
        row += 1
    return row


cdef inline void _load_px(pix_t[:, ::1] data, long long cs, long long cf, int nxs, int nys,
                          pix_t *box) noexcept nogil:
    """A box's pixels, clipped to the image (as numpy's twin): a neighbouring image's, for a box off
    the image."""
    cdef Py_ssize_t ns = data.shape[0], nf = data.shape[1], i, j
    for i in range(nxs):
        for j in range(nys):
            box[i * nys + j] = data[_clip(<Py_ssize_t>(cs + i), ns - 1), _clip(<Py_ssize_t>(cf + j), nf - 1)]


cdef inline void _load_mask(const unsigned char[:, ::1] m, long long cs, long long cf, int nxs, int nys,
                            unsigned char *box) noexcept nogil:
    """A box's mask bytes, clipped to the image (_load_px's for a mask)."""
    cdef Py_ssize_t ns = m.shape[0], nf = m.shape[1], i, j
    for i in range(nxs):
        for j in range(nys):
            box[i * nys + j] = m[_clip(<Py_ssize_t>(cs + i), ns - 1), _clip(<Py_ssize_t>(cf + j), nf - 1)]


cdef inline void _plane_and_sum(int nb, double *bx, double *by, double *bc, double *bu, int n_iter,
                                double cut2, int nc, double *pi, double *pj, double *pc,
                                unsigned char *pv, double x0, double y0, double gain, double k_bg,
                                const double *first, double *cf3, double *res, int exact) noexcept nogil:
    """Background plane over the candidates (least squares, rejecting those > cutoff sigma) and the
    summation over the valid peak pixels: res = rms, n_bg, I, sigma, n_peak, and the centroid's
    sums (total, along slow, along fast) of the positive net counts.  first: the first fit's nine sums
    (every candidate in use), which the caller has."""
    cdef int it, nnew, npk = 0, k
    cdef double[3][3] M
    cdef double[3] rhs
    cdef double[9] sums
    cdef double ss = 0.0, w = 0.0, pl, d, I = 0.0, spl = 0.0, sc_pk = 0.0, tot = 0.0, wi = 0.0, wj = 0.0, nbg, var
    for k in range(9):
        sums[k] = first[k]
    for it in range(n_iter + 1):
        cf3[0] = cf3[1] = cf3[2] = 0.0
        if sums[0] >= 6:
            M[0][0] = sums[0]
            M[0][1] = sums[1]
            M[0][2] = sums[2]
            M[1][0] = sums[1]
            M[1][1] = sums[3] + 1e-3     # the twin's small ridge
            M[1][2] = sums[4]
            M[2][0] = sums[2]
            M[2][1] = sums[4]
            M[2][2] = sums[5] + 1e-3
            rhs[0] = sums[6]
            rhs[1] = sums[7]
            rhs[2] = sums[8]
            if not _solve3(M, rhs, cf3):
                cf3[0] = cf3[1] = cf3[2] = 0.0
        if not pyflm_reject_simd(exact, nb, bx, by, bc, bu, cf3[0], cf3[1], cf3[2], gain, k_bg, cut2, sums,
                                 &ss, &w):
            break
    if k_bg != 1.0:         # the plane of the images' sum, as the plane of their mean (one image's)
        cf3[0] = cf3[0] / k_bg
        cf3[1] = cf3[1] / k_bg
        cf3[2] = cf3[2] / k_bg
    # the twin's rms is over the final mask with the last plane's residuals: the last pass's sums
    nnew = <int>w
    res[0] = sqrt(ss / (nnew if nnew > 1 else 1))
    res[1] = nnew
    for k in range(nc):
        if pv[k]:
            pl = cf3[0] + cf3[1] * pi[k] + cf3[2] * pj[k]
            d = pc[k] - pl
            I += d
            spl += pl
            sc_pk += pc[k]
            npk += 1
            # the positive net counts, with no branch (their signs are noise for weak spots, and the
            # branch was mispredicted): adding 0 leaves the sums as they were, to the bit
            d = pyflm_pos(d)
            tot += d
            wi += d * (pi[k] + (x0 + 0.5))      # (i - x0) + (x0 + 0.5): i + 0.5 exactly
            wj += d * (pj[k] + (y0 + 0.5))
    nbg = nnew * k_bg if nnew * k_bg > 1 else 1
    var = gain * (sc_pk if sc_pk > 0 else 0.0)
    d = spl / (npk if npk > 1 else 1)
    var += <double>npk * npk * gain * (d if d > 0.5 else 0.5) / nbg
    res[2] = I
    res[3] = sqrt(var if var > 1e-12 else 1e-12)
    res[4] = npk
    res[5] = tot
    res[6] = wi
    res[7] = wj


cdef inline int _append(int nb, double x, double y, double c, double *bx, double *by, double *bc,
                        double *bu) noexcept nogil:
    """A background candidate c at (x, y) appended to the plane fit's lists (in use); their new length."""
    bx[nb] = x
    by[nb] = y
    bc[nb] = c
    bu[nb] = 1.0
    return nb + 1


cdef inline int _gather_on(int n_bg_all, const Py_ssize_t *bg_o, const double *bg_x, const double *bg_y,
                           const pix_t *d0, const unsigned char *mc, unsigned char bits, double nullpix,
                           double *bx, double *by, double *bc, double *bu) noexcept nogil:
    """The background candidates of one image's box that are in use (mask bits `bits` clear, counts
    above nullpix), gathered for the plane fit; returns their number.  d0, mc: the pixels and mask bits at
    the box's corner (in the image, or in a copy of a box off it), bg_o the candidates' offsets from it.  (Written branch-free, every candidate stored and the count advanced by its test,
    it took more time: the stores' places then wait for each pixel's load.)"""
    cdef int q, nb = 0
    cdef Py_ssize_t o
    cdef double c
    for q in range(n_bg_all):
        o = bg_o[q]
        c = <double>d0[o]
        if (c > nullpix) & ((mc[o] & bits) == 0):
            nb = _append(nb, bg_x[q], bg_y[q], c, bx, by, bc, bu)
    return nb


cdef void _combine(const unsigned char[:, ::1] mask, int use_mask, const unsigned char[:, ::1] bgx,
                   int use_bgx, const unsigned char[:, ::1] bgx2, int use_bgx2,
                   const unsigned char[:, ::1] bgx3, int use_bgx3, Py_ssize_t npx, unsigned char *cm) noexcept nogil:
    """The mask bits of every pixel of the image (those masks not given are 0); bg_exclude may come as
    up to three masks (a block's images' peaks), whose union is bit 2."""
    cdef Py_ssize_t k
    cdef const unsigned char *m = &mask[0, 0]
    cdef const unsigned char *x = &bgx[0, 0]
    cdef const unsigned char *x2 = &bgx2[0, 0]
    cdef const unsigned char *x3 = &bgx3[0, 0]
    # two passes over the image at most (pass 2 gives all four masks: one pass each had been five)
    if use_mask and use_bgx:
        for k in range(npx):
            cm[k] = m[k] | (x[k] << 1)
    elif use_mask:
        for k in range(npx):
            cm[k] = m[k]
    elif use_bgx:
        for k in range(npx):
            cm[k] = x[k] << 1
    else:
        memset(cm, 0, npx)
    if use_bgx2 and use_bgx3:
        for k in range(npx):
            cm[k] |= (x2[k] | x3[k]) << 1
    elif use_bgx2:
        for k in range(npx):
            cm[k] |= x2[k] << 1
    elif use_bgx3:
        for k in range(npx):
            cm[k] |= x3[k] << 1


cdef inline void _load_cm(pix_t[:, ::1] data, const unsigned char *cm, long long cs, long long cf, int nxs,
                          int nys, pix_t *box, unsigned char *mb) noexcept nogil:
    """A box's pixels and mask bits, clipped to the image (as numpy's twin): for a box off the image."""
    cdef Py_ssize_t ns = data.shape[0], nf = data.shape[1], i, j, si, fj
    for i in range(nxs):
        si = _clip(<Py_ssize_t>(cs + i), ns - 1)
        for j in range(nys):
            fj = _clip(<Py_ssize_t>(cf + j), nf - 1)
            box[i * nys + j] = data[si, fj]
            mb[i * nys + j] = cm[si * nf + fj]


cdef inline void _peak_pixels(const pix_t *d0, const Py_ssize_t *po, int n, const unsigned char *mk,
                              unsigned char bit, double nullpix, double overload, double *pc,
                              unsigned char *pv, int *badpk, int *over, int *nshad, int *ndead) noexcept nogil:
    """A box's peak pixels (offsets po from d0) into pc, and whether each is usable into pv (above
    nullpix and, with mk, not marked by mk's `bit`); a bad one sets badpk and counts as shadowed
    (masked) or dead (at or below nullpix); one at or above overload sets over."""
    cdef int q
    cdef Py_ssize_t o
    cdef double c
    for q in range(n):
        o = po[q]
        c = <double>d0[o]
        pc[q] = c
        pv[q] = (c > nullpix) and not (mk != NULL and (mk[o] & bit))
        if not pv[q]:
            badpk[0] = 1
            if c > nullpix:
                nshad[0] += 1
            else:
                ndead[0] += 1
        if c >= overload:
            over[0] = 1


cdef void _measure(pix_t[:, ::1] data, const double[::1] fast, const double[::1] slow,
                   int nxs, int nys, const unsigned char[:, ::1] peak, const unsigned char[:, ::1] bgm,
                   const unsigned char[:, ::1] mask, int use_mask,
                   const unsigned char[:, ::1] bgx, int use_bgx, const unsigned char[:, ::1] bgx2,
                   int use_bgx2, const unsigned char[:, ::1] bgx3, int use_bgx3, pix_t[:, ::1] nb0,
                   pix_t[:, ::1] nb1, int n_nb,
                   const cnp.int64_t[::1] order, double gain, double overload, double nullpix, int n_iter,
                   double cutoff, double[::1] I_o, double[::1] S_o, double[:, ::1] C_o, double[::1] R_o,
                   cnp.int32_t[::1] NP_o, cnp.int32_t[::1] NB_o, double[::1] SO_o, double[::1] FO_o,
                   long long[::1] CS_o, long long[::1] CF_o, unsigned char[:, ::1] FL_o,
                   cnp.int32_t[:, ::1] DS_o, int dense) noexcept nogil:
    cdef Py_ssize_t n = fast.shape[0], ns = data.shape[0], nf = data.shape[1]
    cdef Py_ssize_t b, i, j, k, q
    cdef int npix = nxs * nys, nb, nc, it, changed, nnew, npk, badpk, over, n_pk_all = 0, n_bg_all = 0
    cdef int ndead, nshad
    cdef int on
    cdef Py_ssize_t base, o
    cdef const pix_t *d0
    cdef const pix_t *e0 = NULL
    cdef const pix_t *e1 = NULL
    cdef const unsigned char *mc
    cdef long long cs, cf
    cdef double x0 = (nxs - 1) / 2.0, y0 = (nys - 1) / 2.0
    cdef double c, x, y, pl, d, r2, ss, cut2 = (cutoff + 1e-9) * (cutoff + 1e-9)
    cdef double sw, sx, sy, sxx, sxy, syy, sc, sxc, syc, I, spl, sc_pk, var, nbg, w, tot, wi, wj
    cdef double[3] cf3
    cdef double[8] res
    # a box off the image: its pixels (and its neighbours') and mask bits copied, clipped, read as in place
    cdef pix_t *box = <pix_t *>malloc(npix * sizeof(pix_t))
    cdef pix_t *box0 = <pix_t *>malloc(npix * sizeof(pix_t))
    cdef pix_t *box1 = <pix_t *>malloc(npix * sizeof(pix_t))
    cdef unsigned char *mb = <unsigned char *>malloc(npix)
    cdef const Py_ssize_t *po
    cdef const Py_ssize_t *bo
    # the 3-D background over k = 1 + n_nb images: the plane is fitted to the sum of their counts (the
    # mean's plane times k), its variance gain.max(plane, k) (k^2 times the mean's gain.max(plane/k, 1)/k);
    # for counts every one of its sums is a whole number, exact in any order (pyflm_reject4's exact
    # pass); a float image's are not
    cdef double k_bg = 1 + n_nb
    cdef int exact = pix_t is cnp.int32_t or pix_t is cnp.uint16_t
    # the box's peak and background pixels (offsets into the box)
    cdef int *pk_k = <int *>malloc(npix * sizeof(int))
    cdef int *bg_k = <int *>malloc(npix * sizeof(int))
    cdef double c0 = 0.0, c1 = 0.0
    # a fit's first sums (pyflm_data_sums)
    cdef double[9] first
    cdef double *bg_x = <double *>malloc(npix * sizeof(double))
    cdef double *bg_y = <double *>malloc(npix * sizeof(double))
    # per box: the candidate background pixels (x, y, counts, in use) and the peak pixels
    cdef double *bx = <double *>malloc(npix * sizeof(double))
    cdef double *by = <double *>malloc(npix * sizeof(double))
    cdef double *bc = <double *>malloc(npix * sizeof(double))
    cdef double *bu = <double *>malloc(npix * sizeof(double))
    cdef double *pi = <double *>malloc(npix * sizeof(double))
    cdef double *pj = <double *>malloc(npix * sizeof(double))
    cdef double *pc = <double *>malloc(npix * sizeof(double))
    cdef unsigned char *pv = <unsigned char *>malloc(npix)
    for i in range(nxs):
        for j in range(nys):
            if peak[i, j]:
                pk_k[n_pk_all] = i * nys + j
                pi[n_pk_all] = i - x0
                pj[n_pk_all] = j - y0
                n_pk_all += 1
            elif bgm[i, j]:
                bg_k[n_bg_all] = i * nys + j
                bg_x[n_bg_all] = i - x0
                bg_y[n_bg_all] = j - y0
                n_bg_all += 1
    # the same pixels' offsets in the image from a box's corner, and the three masks as the bits of one
    # image (1 mask, 2 bg_exclude), read once per pixel
    cdef Py_ssize_t *pk_o = <Py_ssize_t *>malloc(npix * sizeof(Py_ssize_t))
    cdef Py_ssize_t *bg_o = <Py_ssize_t *>malloc(npix * sizeof(Py_ssize_t))
    cdef Py_ssize_t *pk_b = <Py_ssize_t *>malloc(npix * sizeof(Py_ssize_t))     # and in a box's copy
    cdef Py_ssize_t *bg_b = <Py_ssize_t *>malloc(npix * sizeof(Py_ssize_t))
    for q in range(n_pk_all):
        pk_o[q] = (pk_k[q] // nys) * nf + pk_k[q] % nys
        pk_b[q] = pk_k[q]
    for q in range(n_bg_all):
        bg_o[q] = (bg_k[q] // nys) * nf + bg_k[q] % nys
        bg_b[q] = bg_k[q]
    # dense: the background candidates' rows formed once (_bg_row) into a ring of R rows, kept while
    # boxes still reach them; the rim read row by row (rim_row: where each box row's rim pixels start)
    cdef int *rim_row = <int *>malloc((nxs + 1) * sizeof(int))
    cdef int *bg_j = <int *>malloc(npix * sizeof(int))
    cdef Py_ssize_t R = 1, ring_lo = 0, ring_hi = 0, lo, hi, r
    while R < 2 * nxs:
        R *= 2
    cdef double *ring = NULL
    cdef const double *rowp
    cdef unsigned char *zrow = NULL
    cdef const unsigned char *mk[4]
    cdef Py_ssize_t mstep[4]
    cdef const unsigned char *mm = NULL
    cdef unsigned char *cm = NULL
    cdef int avx2 = pyflm_avx2()
    cdef int no_masks = not (use_mask or use_bgx or use_bgx2 or use_bgx3)
    if dense:
        for i in range(nxs + 1):
            rim_row[i] = n_bg_all
        for q in range(n_bg_all - 1, -1, -1):
            rim_row[bg_k[q] // nys] = <int>q
            bg_j[q] = bg_k[q] % nys
        for i in range(nxs - 1, -1, -1):
            if rim_row[i] > rim_row[i + 1]:
                rim_row[i] = rim_row[i + 1]
        ring = <double *>malloc(R * nf * sizeof(double))
        zrow = <unsigned char *>calloc(nf, 1)
        mk[0] = &mask[0, 0] if use_mask else zrow
        mk[1] = &bgx[0, 0] if use_bgx else zrow
        mk[2] = &bgx2[0, 0] if use_bgx2 else zrow
        mk[3] = &bgx3[0, 0] if use_bgx3 else zrow
        mstep[0] = nf if use_mask else 0
        mstep[1] = nf if use_bgx else 0
        mstep[2] = nf if use_bgx2 else 0
        mstep[3] = nf if use_bgx3 else 0
    elif no_masks:
        # nothing masked (refinement's measurements): the boxes' mask bits read from one box's rows of
        # zeros, not from an image of them made, streamed ahead and read for every box (1 byte a pixel)
        cm = <unsigned char *>calloc(nxs * nf, 1)
    else:
        cm = <unsigned char *>malloc(ns * nf)
        _combine(mask, use_mask, bgx, use_bgx, bgx2, use_bgx2, bgx3, use_bgx3, ns * nf, cm)
    d0 = &data[0, 0]
    mc = cm
    cdef Py_ssize_t pf_row = 0, row_bytes = nf * sizeof(pix_t)
    cdef const void *pf_b = <const void *>&nb0[0, 0] if n_nb >= 1 else NULL
    cdef const void *pf_c = <const void *>&nb1[0, 0] if n_nb >= 2 else NULL
    cdef Py_ssize_t qq, bn
    for qq in range(n):
        b = order[qq]        # the boxes in the image's row order; each one's results at its own place
        if qq + PREFETCH_AHEAD < n:
            # a coming box's position and result places, in the list's order: cache misses (as the fit's)
            bn = order[qq + PREFETCH_AHEAD]
            __builtin_prefetch(&slow[bn])
            __builtin_prefetch(&fast[bn])
            __builtin_prefetch(&C_o[bn, 0])
            __builtin_prefetch(&FL_o[bn, 0])
            __builtin_prefetch(&I_o[bn])
            __builtin_prefetch(&SO_o[bn])
        cs = _corner(slow[b], nxs // 2)
        cf = _corner(fast[b], nys // 2)
        CS_o[b] = cs
        CF_o[b] = cf
        on = (cs >= 0) and (cf >= 0) and (cs + nxs <= ns) and (cf + nys <= nf)
        FL_o[b, 0] = on
        nb = 0
        badpk = 0
        over = 0
        ndead = 0
        nshad = 0
        if dense:
            # the box's rows of background candidates formed, if they are not yet in the ring
            lo = _clip(<Py_ssize_t>cs, ns - 1)
            hi = _clip(<Py_ssize_t>(cs + nxs - 1), ns - 1) + 1
            if lo < ring_lo or lo > ring_hi:      # out of row order, or past the rows formed: start again
                ring_lo = ring_hi = lo
            while ring_hi < hi:
                _bg_row(data, nb0, nb1, 1 + n_nb, ring_hi, mk, mstep, nullpix, ring + (ring_hi & (R - 1)) * nf,
                        avx2)
                ring_hi += 1
            if ring_hi - ring_lo > R:
                ring_lo = ring_hi - R
            if on:
                base = cs * nf + cf
                d0 = &data[0, 0] + base
                if use_mask:
                    mm = &mask[0, 0] + base
                po = pk_o
            else:
                _load_px(data, cs, cf, nxs, nys, box)
                if use_mask:
                    _load_mask(mask, cs, cf, nxs, nys, mb)
                d0, mm, po = box, mb, pk_b
            _peak_pixels(d0, po, n_pk_all, mm if use_mask else NULL, 0xff, nullpix, overload, pc, pv,
                         &badpk, &over, &nshad, &ndead)
            for i in range(nxs):
                if on:
                    nb = pyflm_gather_rim(avx2, rim_row[i], rim_row[i + 1], ring + ((cs + i) & (R - 1)) * nf + cf,
                                          bg_j, bg_x, bg_y, bx, by, bc, bu, nb)
                else:
                    rowp = ring + (_clip(<Py_ssize_t>(cs + i), ns - 1) & (R - 1)) * nf
                    for q in range(rim_row[i], rim_row[i + 1]):
                        c = rowp[_clip(<Py_ssize_t>(cf + bg_j[q]), nf - 1)]
                        if c == c:
                            nb = _append(nb, bg_x[q], bg_y[q], c, bx, by, bc, bu)
        else:
            pf_row = _prefetch_rows(&data[0, 0], pf_b, pf_c, NULL if no_masks else cm, pf_row, cs, nxs, ns,
                                    row_bytes, nf)
            if on:
                # the box on the image (nearly all): its pixels read where they are, through the offsets of
                # the peak and rim pixels from the box's corner (no copy of the box, no mask bits per pixel)
                base = cs * nf + cf
                d0 = &data[0, 0] + base
                mc = cm if no_masks else cm + base
                if n_nb >= 1:
                    e0 = &nb0[0, 0] + base
                if n_nb >= 2:
                    e1 = &nb1[0, 0] + base
                po, bo = pk_o, bg_o
            else:
                if no_masks:
                    _load_px(data, cs, cf, nxs, nys, box)
                    memset(mb, 0, npix)
                else:
                    _load_cm(data, cm, cs, cf, nxs, nys, box, mb)
                d0, mc = box, mb
                if n_nb >= 1:
                    _load_px(nb0, cs, cf, nxs, nys, box0)
                    e0 = box0
                if n_nb >= 2:
                    _load_px(nb1, cs, cf, nxs, nys, box1)
                    e1 = box1
                po, bo = pk_b, bg_b
            _peak_pixels(d0, po, n_pk_all, mc, 1, nullpix, overload, pc, pv, &badpk, &over, &nshad, &ndead)
            # a candidate is above nullpix on every image, outside the mask and bg_exclude: one test of all
            if n_nb == 2:
                for q in range(n_bg_all):
                    o = bo[q]
                    c = <double>d0[o]
                    c0 = <double>e0[o]
                    c1 = <double>e1[o]
                    if (c > nullpix) & (c0 > nullpix) & (c1 > nullpix) & ((mc[o] & 3) == 0):
                        nb = _append(nb, bg_x[q], bg_y[q], (c + c0) + c1, bx, by, bc, bu)
            elif n_nb == 1:
                for q in range(n_bg_all):
                    o = bo[q]
                    c = <double>d0[o]
                    c0 = <double>e0[o]
                    if (c > nullpix) & (c0 > nullpix) & ((mc[o] & 3) == 0):
                        nb = _append(nb, bg_x[q], bg_y[q], c + c0, bx, by, bc, bu)
            else:
                nb = _gather_on(n_bg_all, bo, bg_x, bg_y, d0, mc, 3, nullpix, bx, by, bc, bu)
        nc = n_pk_all
        if overload <= 0:          # the twin tests the box with zeros outside the peak
            over = 1
        FL_o[b, 1] = badpk
        FL_o[b, 2] = over
        DS_o[b, 0] = ndead
        DS_o[b, 1] = nshad
        pyflm_data_sums(nb, bx, by, bc, first)
        _plane_and_sum(nb, bx, by, bc, bu, n_iter, cut2, nc, pi, pj, pc, pv, x0, y0, gain, k_bg,
                       first, cf3, res, exact)
        C_o[b, 0] = cf3[0]
        C_o[b, 1] = cf3[1]
        C_o[b, 2] = cf3[2]
        R_o[b] = res[0]
        NB_o[b] = <int>res[1]
        I_o[b] = res[2]
        S_o[b] = res[3]
        NP_o[b] = <int>res[4]
        tot = res[5] if res[5] >= 1e-9 else 1e-9
        SO_o[b] = cs + res[6] / tot
        FO_o[b] = cf + res[7] / tot
    free(box)
    free(box0)
    free(box1)
    free(mb)
    free(pk_k)
    free(bg_k)
    free(pk_o)
    free(bg_o)
    free(pk_b)
    free(bg_b)
    free(cm)
    free(ring)
    free(zrow)
    free(rim_row)
    free(bg_j)
    free(bg_x)
    free(bg_y)
    free(bx)
    free(by)
    free(bc)
    free(bu)
    free(pi)
    free(pj)
    free(pc)
    free(pv)



cdef void _profile_sums(pix_t[:, ::1] data, const double[::1] fast, const double[::1] slow,
                        const double[:, ::1] coef, const double[::1] I, const cnp.int64_t[::1] reg,
                        const cnp.int64_t[::1] which, int nxs, int nys, const unsigned char[:, ::1] peak,
                        int sub, double[:, :, ::1] sums, double[:, :, ::1] weights) noexcept nogil:
    cdef Py_ssize_t ns = data.shape[0], nf = data.shape[1], FS = sums.shape[1], FF = sums.shape[2]
    cdef Py_ssize_t q, b, i, j, r, s0, f0
    cdef long long cs, cf
    cdef double x0 = (nxs - 1) / 2.0, y0 = (nys - 1) / 2.0
    cdef double ds, df, ts, tf, ws, wf, v, pl, tot
    for q in range(which.shape[0]):
        b = which[q]
        r = reg[b]
        cs = _corner(slow[b], nxs // 2)
        cf = _corner(fast[b], nys // 2)
        ds = slow[b] - floor(slow[b]) - 0.5
        df = fast[b] - floor(fast[b]) - 0.5
        tot = I[b]
        for i in range(nxs):
            ts = ((i - nxs // 2) - ds + (nxs // 2 + 1)) * sub
            s0 = <Py_ssize_t>floor(ts)
            ws = ts - s0
            if s0 < 0 or s0 + 1 >= FS:
                continue
            for j in range(nys):
                if not peak[i, j]:
                    continue
                tf = ((j - nys // 2) - df + (nys // 2 + 1)) * sub
                f0 = <Py_ssize_t>floor(tf)
                wf = tf - f0
                if f0 < 0 or f0 + 1 >= FF:
                    continue
                pl = coef[b, 0] + coef[b, 1] * (i - x0) + coef[b, 2] * (j - y0)
                v = <double>data[_clip(<Py_ssize_t>(cs + i), ns - 1), _clip(<Py_ssize_t>(cf + j), nf - 1)] - pl
                sums[r, s0, f0] += (1 - ws) * (1 - wf) * v
                weights[r, s0, f0] += (1 - ws) * (1 - wf) * tot
                sums[r, s0, f0 + 1] += (1 - ws) * wf * v
                weights[r, s0, f0 + 1] += (1 - ws) * wf * tot
                sums[r, s0 + 1, f0] += ws * (1 - wf) * v
                weights[r, s0 + 1, f0] += ws * (1 - wf) * tot
                sums[r, s0 + 1, f0 + 1] += ws * wf * v
                weights[r, s0 + 1, f0 + 1] += ws * wf * tot


cdef void _fit(pix_t[:, ::1] data, const double[::1] fast, const double[::1] slow,
               const double[:, ::1] coef, const double[::1] I_start, const cnp.int64_t[::1] reg,
               const double[:, :, ::1] fine, int sub, int nxs, int nys, const unsigned char[:, ::1] peak,
               const unsigned char[:, ::1] mask, int use_mask, double gain, double overload,
               double nullpix, int n_iter, const cnp.int64_t[::1] order, double[::1] I_o,
               double[::1] S_o, double[::1] D_o, int want_dead) noexcept nogil:
    cdef Py_ssize_t n = fast.shape[0], ns = data.shape[0], nf = data.shape[1]
    cdef Py_ssize_t FS = fine.shape[1], FF = fine.shape[2]
    cdef Py_ssize_t b, i, j, k, r, s0, f0, si, fj, q, off
    cdef int npix = nxs * nys, nc = 0, it, on, avx2 = pyflm_avx2()
    cdef long long cs, cf
    cdef double x0 = (nxs - 1) / 2.0, y0 = (nys - 1) / 2.0
    cdef double ds, df, ts, tf, ws, wf, p, c, pl, tot, I, bb, a = 0.0, dead
    cdef const double *fr
    cdef double *P = <double *>malloc(npix * sizeof(double))
    cdef double *NET = <double *>malloc(npix * sizeof(double))
    cdef double *PL = <double *>malloc(npix * sizeof(double))
    cdef double *U = <double *>malloc(npix * sizeof(double))
    # the peak's pixels (row, column) and, per box, each row's and column's place on the fine grid
    cdef int *pi = <int *>malloc(npix * sizeof(int))
    cdef int *pj = <int *>malloc(npix * sizeof(int))
    cdef Py_ssize_t *S0 = <Py_ssize_t *>malloc(nxs * sizeof(Py_ssize_t))
    cdef Py_ssize_t *F0 = <Py_ssize_t *>malloc(nys * sizeof(Py_ssize_t))
    cdef double *WS = <double *>malloc(nxs * sizeof(double))
    cdef double *WF = <double *>malloc(nys * sizeof(double))
    for i in range(nxs):
        for j in range(nys):
            if peak[i, j]:
                pi[nc] = i
                pj[nc] = j
                nc += 1
    cdef Py_ssize_t qq, bn
    # the image's (and mask's) rows streamed in ahead of the boxes, as measure: asking only for each coming
    # box's rows left the pixel loads waiting on the cache (43 % of the fit's time)
    cdef Py_ssize_t pf_row = 0, row_bytes = nf * sizeof(pix_t)
    cdef const void *pf_m = <const void *>&mask[0, 0] if use_mask else NULL
    for qq in range(n):
        b = order[qq]
        if qq + PREFETCH_AHEAD < n:
            # the boxes come in the image's row order, their fields in the list's: a coming box's
            # plane and position were cache misses (the plane's load ~10 % of the fit's time)
            bn = order[qq + PREFETCH_AHEAD]
            __builtin_prefetch(&coef[bn, 0])
            __builtin_prefetch(&slow[bn])
            __builtin_prefetch(&fast[bn])
            __builtin_prefetch(&reg[bn])
            __builtin_prefetch(&I_start[bn])
        r = reg[b]
        cs = _corner(slow[b], nxs // 2)
        cf = _corner(fast[b], nys // 2)
        pf_row = _prefetch_rows(&data[0, 0], NULL, NULL, pf_m, pf_row, cs, nxs, ns, row_bytes, nf)
        on = cs >= 0 and cf >= 0 and cs + nxs <= ns and cf + nys <= nf
        ds = slow[b] - floor(slow[b]) - 0.5
        df = fast[b] - floor(fast[b]) - 0.5
        for i in range(nxs):
            ts = ((i - nxs // 2) - ds + (nxs // 2 + 1)) * sub
            s0 = <Py_ssize_t>floor(ts)
            s0 = 0 if s0 < 0 else (FS - 2 if s0 > FS - 2 else s0)
            S0[i] = s0
            WS[i] = ts - s0
        for j in range(nys):
            tf = ((j - nys // 2) - df + (nys // 2 + 1)) * sub
            f0 = <Py_ssize_t>floor(tf)
            f0 = 0 if f0 < 0 else (FF - 2 if f0 > FF - 2 else f0)
            F0[j] = f0
            WF[j] = tf - f0
        tot = 0.0
        dead = 0.0
        for q in range(nc):
            i = pi[q]
            j = pj[q]
            ws = WS[i]
            wf = WF[j]
            # the standard profile read off the fine grid at this pixel's offset from the centre
            fr = &fine[r, S0[i], F0[j]]
            p = (1 - ws) * (1 - wf) * fr[0]
            p += (1 - ws) * wf * fr[1]
            p += ws * (1 - wf) * fr[FF]
            p += ws * wf * fr[FF + 1]
            tot += p
            if on:
                si = cs + i
                fj = cf + j
            else:
                si = _clip(<Py_ssize_t>(cs + i), ns - 1)
                fj = _clip(<Py_ssize_t>(cf + j), nf - 1)
            c = <double>data[si, fj]
            pl = coef[b, 0] + coef[b, 1] * (i - x0) + coef[b, 2] * (j - y0)
            P[q] = p
            PL[q] = pl
            NET[q] = c - pl
            # an invalid or overloaded pixel is left out; the profile fills it in
            U[q] = 1.0 if ((c > nullpix) and not (use_mask and mask[si, fj]) and (c < overload)) else 0.0
            if c <= nullpix:
                dead += p
        if want_dead:      # the profile's share on dead pixels (NaN: no profile), for dead-pixel mending
            D_o[b] = dead / tot if tot > 0 else NAN
        if not tot > 0:
            tot = 1.0
        pyflm_div(nc, P, tot)
        I = I_start[b] if I_start[b] > 0 else 0.0
        for it in range(n_iter + 1):
            if avx2:
                pyflm_fit_sums4(nc, P, PL, NET, U, I, gain, &a, &bb)
            else:
                pyflm_fit_sums(nc, P, PL, NET, U, I, gain, &a, &bb)
            if it == n_iter:
                break
            I = bb / (a if a > 1e-30 else 1e-30)
            if it == n_iter - 1:       # the variance is from the last estimate, not below zero
                I_o[b] = I
                I = I if I > 0 else 0.0
        if n_iter == 0:
            I_o[b] = I
        S_o[b] = 1.0 / sqrt(a if a > 1e-30 else 1e-30)
    free(P)
    free(NET)
    free(PL)
    free(U)
    free(pi)
    free(pj)
    free(S0)
    free(F0)
    free(WS)
    free(WF)


_ONE = np.zeros((1, 1), np.uint8)
# boxes' pixels over the image's at which measure forms the rows of background candidates once (pass 1's
# single images without masks broke even at ~0.34 of the image; pass 2's three images and four masks,
# 0.6 of it, took 3.85 ms for the box by box reads' 4.5 on the sim sweep)
DENSE_COVER = 0.4


# The kernels on an image of any pixel type: each wrapper's fused `data` argument makes Cython pick the
# kernel's specialisation from the array's dtype at run time (one dispatch, not a branch per type).

def _run_measure(pix_t[:, ::1] data, pix_t[:, ::1] nb0, pix_t[:, ::1] nb1, const double[::1] F,
                 const double[::1] S, int nxs, int nys, const unsigned char[:, ::1] pk,
                 const unsigned char[:, ::1] bg, const unsigned char[:, ::1] m, int um,
                 const unsigned char[:, ::1] x, int ux, const unsigned char[:, ::1] x2, int ux2,
                 const unsigned char[:, ::1] x3, int ux3, int n_nb,
                 const cnp.int64_t[::1] OD, double gain, double overload, double nullpix, int n_iter,
                 double cutoff, double[::1] I_o, double[::1] S_o, double[:, ::1] C_o, double[::1] R_o,
                 cnp.int32_t[::1] NP, cnp.int32_t[::1] NB, double[::1] SO, double[::1] FO,
                 long long[::1] CS, long long[::1] CF, unsigned char[:, ::1] FL, cnp.int32_t[:, ::1] DS,
                 int dense):
    with nogil:
        _measure(data, F, S, nxs, nys, pk, bg, m, um, x, ux, x2, ux2, x3, ux3, nb0, nb1, n_nb, OD, gain,
                 overload, nullpix, n_iter, cutoff, I_o, S_o, C_o, R_o, NP, NB, SO, FO, CS, CF, FL, DS, dense)


def _run_profile_sums(pix_t[:, ::1] data, const double[::1] F, const double[::1] S,
                      const double[:, ::1] C, const double[::1] T, const cnp.int64_t[::1] R,
                      const cnp.int64_t[::1] W, int nxs, int nys, const unsigned char[:, ::1] pk, int sub,
                      double[:, :, ::1] SU, double[:, :, ::1] WE):
    with nogil:
        _profile_sums(data, F, S, C, T, R, W, nxs, nys, pk, sub, SU, WE)


def _run_fit(pix_t[:, ::1] data, const double[::1] F, const double[::1] S, const double[:, ::1] C,
             const double[::1] T, const cnp.int64_t[::1] R, const double[:, :, ::1] FI, int sub, int nxs,
             int nys, const unsigned char[:, ::1] pk, const unsigned char[:, ::1] m, int um, double gain,
             double overload, double nullpix, int n_iter, const cnp.int64_t[::1] OD, double[::1] I_o,
             double[::1] S_o, double[::1] D_o, int want_dead):
    with nogil:
        _fit(data, F, S, C, T, R, FI, sub, nxs, nys, pk, m, um, gain, overload, nullpix, n_iter, OD, I_o, S_o,
             D_o, want_dead)


def _run_quick(pix_t[:, ::1] data, const double[::1] F, const double[::1] S, int nxs, int nys,
               const unsigned char[:, ::1] pk, const unsigned char[:, ::1] bg, double nullpix,
               const cnp.int64_t[::1] od, double[:, ::1] O):
    with nogil:
        _quick(data, F, S, nxs, nys, pk, bg, nullpix, od, O)


def _set_simd(int level):
    """-1: the kernels use AVX2 where the processor has it; 0: SSE2 only (the same numbers: the tests
    compare the two).  Returns the previous setting."""
    return pyflm_set_simd(level)


def _uses_avx2():
    return bool(pyflm_avx2())


def _image(data):
    """The image as one of the kernel's pixel types (C-contiguous)."""
    if data.dtype not in (np.int32, np.uint16, np.float32, np.float64):
        data = np.asarray(data, np.float64)
    return np.ascontiguousarray(data)


def _mask(m, shape=None):
    """A mask as the kernels read it (and whether there is one); one of another size than the image
    (shape) is refused: the kernels read it at the image's offsets."""
    if m is None:
        return _ONE, 0
    m = np.ascontiguousarray(m, bool).view(np.uint8)
    if shape is not None and m.shape != tuple(shape):
        raise ValueError(f"a mask of {m.shape} for an image of {tuple(shape)}")
    return m, 1


def _order(order, n):
    """A permutation of range(n) to take the boxes in (None: as given)."""
    if order is None:
        return np.arange(n, dtype=np.int64)
    od = np.ascontiguousarray(order, np.int64)
    if od.shape != (n,) or (n and (od.min() < 0 or od.max() >= n)):
        raise ValueError("order must be a permutation of the reflections")
    return od


def _u8(m):
    return np.ascontiguousarray(m, bool).view(np.uint8)


def measure(data, fast, slow, raster, peak, bg_mask, mask=None, bg_exclude=None, double gain=1.0,
            double overload=1e9, double nullpix=-1.0, int n_iter=3, double cutoff=3.0, bg_images=(),
            order=None, dense=None):
    """Measure reflections at (fast, slow) on one image: a dict of arrays I, SIGI, coef (n, 3), rms,
    n_peak, n_bg, slow_obs, fast_obs, cs, cf (box origins), on, bad_peak, over (bool).  bg_images: up
    to two neighbouring images whose pixels join the background (pyflm.shoebox.measure_numpy).
    order: the order to take the boxes in (a permutation;
    the image's rows keep its rows in the cache), each one's results still at its own place.
    dense: form each image row's background candidates once for all its boxes (True), or read each box's
    from the images and masks (False); None: by how much of the image the boxes cover.  The same results."""
    nbs = list(bg_images)
    if len(nbs) > 2:
        raise ValueError("at most two neighbouring images join a background")
    data = _image(data)
    nbs = [_image(d) for d in nbs]
    if any(d.dtype != data.dtype for d in nbs):
        data, nbs = np.asarray(data, np.float64), [np.asarray(d, np.float64) for d in nbs]
    if any(d.shape != data.shape for d in nbs):
        raise ValueError("the neighbouring images differ in size")
    cdef int n_nb = len(nbs)
    nbs = nbs + [data] * (2 - n_nb)
    cdef const double[::1] F = np.ascontiguousarray(fast, np.float64)
    cdef const double[::1] S = np.ascontiguousarray(slow, np.float64)
    cdef Py_ssize_t n = F.shape[0]
    cdef int nxs = raster[0], nys = raster[1]
    cdef const unsigned char[:, ::1] pk = _u8(peak)
    cdef const unsigned char[:, ::1] bg = _u8(bg_mask)
    m_, um_ = _mask(mask, data.shape)
    # bg_exclude: one mask, or a few (up to three) whose union it is (the block's images' peaks)
    xs = list(bg_exclude) if isinstance(bg_exclude, (list, tuple)) else [bg_exclude]
    if len(xs) > 3:
        raise ValueError("at most three masks make bg_exclude")
    xs = [_mask(v, data.shape) for v in xs] + [(_ONE, 0)] * (3 - len(xs))
    cdef const unsigned char[:, ::1] m = m_
    cdef const unsigned char[:, ::1] x = xs[0][0]
    cdef const unsigned char[:, ::1] x2 = xs[1][0]
    cdef const unsigned char[:, ::1] x3 = xs[2][0]
    cdef int um = um_, ux = xs[0][1], ux2 = xs[1][1], ux3 = xs[2][1]
    out = {"I": np.empty(n), "SIGI": np.empty(n), "coef": np.empty((n, 3)), "rms": np.empty(n),
           "n_peak": np.empty(n, np.int32), "n_bg": np.empty(n, np.int32), "slow_obs": np.empty(n),
           "fast_obs": np.empty(n), "cs": np.empty(n, np.int64), "cf": np.empty(n, np.int64)}
    fl = np.zeros((n, 3), np.uint8)
    cdef const cnp.int64_t[::1] OD = _order(order, n)
    # peak pixels dead (<= nullpix) and shadowed (masked): which reflections dead-pixel mending may mend
    out["n_dead_shadowed"] = np.zeros((n, 2), np.int32)
    cdef cnp.int32_t[:, ::1] DS = out["n_dead_shadowed"]
    cdef double[::1] I_o = out["I"], S_o = out["SIGI"], R_o = out["rms"], SO = out["slow_obs"]
    cdef double[::1] FO = out["fast_obs"]
    cdef double[:, ::1] C_o = out["coef"]
    cdef cnp.int32_t[::1] NP = out["n_peak"], NB = out["n_bg"]
    cdef long long[::1] CS = out["cs"], CF = out["cf"]
    cdef unsigned char[:, ::1] FL = fl
    if dense is None:
        dense = n * nxs * nys >= DENSE_COVER * data.shape[0] * data.shape[1]
    _run_measure(data, nbs[0], nbs[1], F, S, nxs, nys, pk, bg, m, um, x, ux, x2, ux2, x3, ux3, n_nb, OD,
                 gain, overload, nullpix, n_iter, cutoff, I_o, S_o, C_o, R_o, NP, NB, SO, FO, CS, CF, FL, DS,
                 1 if dense else 0)
    out["on"], out["bad_peak"], out["over"] = (fl[:, k].view(np.bool_) for k in range(3))
    return out


def add_profile_sums(data, fast, slow, coef, I, regions, which, raster, peak, int sub, sums, weights):
    """Add the net peaks of reflections `which` (indices; all their peak pixels valid) into sums and
    weights (nreg, FS, FF), as pyflm.shoebox.profile_sums does with np.add.at."""
    data = _image(data)
    cdef const double[::1] F = np.ascontiguousarray(fast, np.float64)
    cdef const double[::1] S = np.ascontiguousarray(slow, np.float64)
    cdef const double[:, ::1] C = np.ascontiguousarray(coef, np.float64)
    cdef const double[::1] T = np.ascontiguousarray(I, np.float64)
    cdef const cnp.int64_t[::1] R = np.ascontiguousarray(regions, np.int64)
    cdef const cnp.int64_t[::1] W = np.ascontiguousarray(which, np.int64)
    cdef const unsigned char[:, ::1] pk = _u8(peak)
    cdef double[:, :, ::1] SU = sums
    cdef double[:, :, ::1] WE = weights
    cdef int nxs = raster[0], nys = raster[1]
    _run_profile_sums(data, F, S, C, T, R, W, nxs, nys, pk, sub, SU, WE)

def fit_profiles(data, fast, slow, coef, I_start, regions, fine, int sub, raster, peak, mask=None,
                 double gain=1.0, double overload=1e9, double nullpix=-1.0, int n_iter=3, order=None,
                 dead=False):
    """Profile-fitted intensities and sigmas (as pyflm.shoebox.profiles_at + fit_profiles); order: the
    order to take the boxes in, as measure's.  dead=True: also each profile's share on the box's dead
    peak pixels (<= nullpix; NaN where the profile is 0 there), as pyflm.shoebox._mend_dead_pixels
    reads it off profiles_at."""
    data = _image(data)
    cdef const double[::1] F = np.ascontiguousarray(fast, np.float64)
    cdef const double[::1] S = np.ascontiguousarray(slow, np.float64)
    cdef const double[:, ::1] C = np.ascontiguousarray(coef, np.float64)
    cdef const double[::1] T = np.ascontiguousarray(I_start, np.float64)
    cdef const cnp.int64_t[::1] R = np.ascontiguousarray(regions, np.int64)
    cdef const double[:, :, ::1] FI = np.ascontiguousarray(fine, np.float64)
    cdef const unsigned char[:, ::1] pk = _u8(peak)
    m_, um_ = _mask(mask, data.shape)
    cdef const unsigned char[:, ::1] m = m_
    cdef int um = um_
    cdef int nxs = raster[0], nys = raster[1]
    Ia, Sa = np.empty(F.shape[0]), np.empty(F.shape[0])
    Da = np.empty(F.shape[0] if dead else 1)
    cdef double[::1] I_o = Ia, S_o = Sa, D_o = Da
    cdef const cnp.int64_t[::1] OD = _order(order, F.shape[0])
    _run_fit(data, F, S, C, T, R, FI, sub, nxs, nys, pk, m, um, gain, overload, nullpix, n_iter, OD, I_o, S_o,
             D_o, 1 if dead else 0)
    return (Ia, Sa, Da) if dead else (Ia, Sa)


def foreground_mask(shape, fast, slow, int ps, int pf):
    """pyflm.shoebox.foreground_mask: the pixels inside a ps x pf peak about any of the positions
    (non-finite ones have none), marked rectangle by rectangle instead of through index arrays."""
    cdef const double[::1] F = np.ascontiguousarray(fast, np.float64)
    cdef const double[::1] S = np.ascontiguousarray(slow, np.float64)
    cdef Py_ssize_t ns = shape[0], nf = shape[1], b, i, j, i0, i1, j0, j1
    cdef long long s0, f0
    out = np.zeros((ns, nf), np.uint8)
    cdef unsigned char[:, ::1] O = out
    with nogil:
        for b in range(F.shape[0]):
            if not (S[b] - S[b] == 0 and F[b] - F[b] == 0):       # NaN or infinite
                continue
            s0 = _corner(S[b], ps // 2)
            f0 = _corner(F[b], pf // 2)
            i0 = s0 if s0 > 0 else 0
            j0 = f0 if f0 > 0 else 0
            i1 = s0 + ps if s0 + ps < ns else ns
            j1 = f0 + pf if f0 + pf < nf else nf
            for i in range(i0, i1):
                for j in range(j0, j1):
                    O[i, j] = 1
    return out.view(np.bool_)


cdef inline double _run_sum(const pix_t *row, int a, int b, double nullpix, double acc, int *n) noexcept nogil:
    """acc plus the pixels row[a:b] above nullpix, added in order (so a box's sum is the same to the bit
    however its runs fall); their number is added to n."""
    cdef int j, m = 0
    cdef double c
    for j in range(a, b):
        c = <double>row[j]
        if c > nullpix:
            acc += c
            m += 1
    n[0] += m
    return acc


cdef void _quick(pix_t[:, ::1] data, const double[::1] fast, const double[::1] slow, int nxs, int nys,
                 const unsigned char[:, ::1] peak, const unsigned char[:, ::1] bgm, double nullpix,
                 const cnp.int64_t[::1] order, double[:, ::1] out) noexcept nogil:
    """The boxes in `order` (the image's rows: neighbouring boxes share cache lines and pages; the
    predictions come in any order).  A box on the image is read as runs of peak or rim pixels along
    its rows (no mask per pixel); each sum still takes its pixels in the order of the rows."""
    cdef Py_ssize_t n = fast.shape[0], ns = data.shape[0], nf = data.shape[1], b, i, j, si, q, r
    cdef long long cs, cf
    cdef double c, pk, rim
    cdef int npk, nrim, nrun = 0, kind
    cdef bint on
    cdef const pix_t *row
    # the runs: row, first and one-past-last column, 1 peak / 2 rim
    cdef int *ri = <int *>malloc(nxs * nys * sizeof(int))
    cdef int *r0 = <int *>malloc(nxs * nys * sizeof(int))
    cdef int *r1 = <int *>malloc(nxs * nys * sizeof(int))
    cdef int *rk = <int *>malloc(nxs * nys * sizeof(int))
    for i in range(nxs):
        j = 0
        while j < nys:
            kind = 1 if peak[i, j] else (2 if bgm[i, j] else 0)
            si = j
            while j < nys and (1 if peak[i, j] else (2 if bgm[i, j] else 0)) == kind:
                j += 1
            if kind:
                ri[nrun] = i
                r0[nrun] = si
                r1[nrun] = j
                rk[nrun] = kind
                nrun += 1
    cdef Py_ssize_t pf_row = 0, row_bytes = nf * sizeof(pix_t)
    for q in range(n):
        b = order[q]
        cs = _corner(slow[b], nxs // 2)
        cf = _corner(fast[b], nys // 2)
        # whole rows ahead, in order, as measure's sparse path: the image is seldom still in the cache
        # (the block's other images were decoded and read since), and each box's rows asked for one box
        # ahead were misses the memory system served one by one (sim block, cold image 1.3 us a box)
        pf_row = _prefetch_rows(&data[0, 0], NULL, NULL, NULL, pf_row, cs, nxs, ns, row_bytes, 0)
        on = cs >= 0 and cf >= 0 and cs + nxs <= ns and cf + nys <= nf
        pk = rim = 0.0
        npk = nrim = 0
        if on:
            for r in range(nrun):
                row = &data[cs + ri[r], cf]
                if rk[r] == 1:
                    pk = _run_sum(row, r0[r], r1[r], nullpix, pk, &npk)
                else:
                    rim = _run_sum(row, r0[r], r1[r], nullpix, rim, &nrim)
        else:
            for i in range(nxs):
                si = _clip(<Py_ssize_t>(cs + i), ns - 1)
                for j in range(nys):
                    c = <double>data[si, _clip(<Py_ssize_t>(cf + j), nf - 1)]
                    if not c > nullpix:
                        continue
                    if peak[i, j]:
                        pk += c
                        npk += 1
                    elif bgm[i, j]:
                        rim += c
                        nrim += 1
        out[b, 0] = pk
        out[b, 1] = npk
        out[b, 2] = rim
        out[b, 3] = nrim
    free(ri)
    free(r0)
    free(r1)
    free(rk)


def quick_sums(data, fast, slow, raster, peak, bg_mask, double nullpix=-1.0):
    """Per box (clipped to the image, as extract_boxes): the sums of the valid (> nullpix) peak pixels'
    counts, their number, the valid rim pixels' counts and their number (n, 4): refinement's quick look
    at which reflections are worth measuring (pyflm.shoebox.quick_sums_numpy is the twin)."""
    data = _image(data)
    cdef const double[::1] F = np.ascontiguousarray(fast, np.float64)
    cdef const double[::1] S = np.ascontiguousarray(slow, np.float64)
    cdef const unsigned char[:, ::1] pk = _u8(peak)
    cdef const unsigned char[:, ::1] bg = _u8(bg_mask)
    cdef int nxs = raster[0], nys = raster[1]
    res = np.zeros((F.shape[0], 4))
    cdef double[:, ::1] O = res
    cdef const cnp.int64_t[::1] od = np.lexsort((F, S))
    _run_quick(data, F, S, nxs, nys, pk, bg, nullpix, od, O)
    return res

# cython: boundscheck=False, wraparound=False, cdivision=True
"""Shadow-mask statistics of a block of images in one pass over the pixels: which pixels are valid on
most images, their median over the block (negative values counted as 0), and the median of those
over bins of bin_ x bin_ pixels (valid pixels only; 0 where a bin has none).  numpy's way needs float
copies of every image and two partitions; on a Pilatus 6M block this was most of the integration time.
The numpy twin is pyflm.shoebox.shadow_stats_numpy."""
import numpy as np
cimport numpy as cnp
from libc.stdlib cimport malloc, free, qsort

cnp.import_array()

ctypedef fused pix_t:
    cnp.int32_t
    float
    double


cdef int _cmp(const void *a, const void *b) noexcept nogil:
    cdef double x = (<double *>a)[0], y = (<double *>b)[0]
    return (x > y) - (x < y)


cdef inline double _median_sorted(double *v, int n) noexcept nogil:
    if n % 2:
        return v[n // 2]
    return (v[n // 2 - 1] + v[n // 2]) / 2.0


cdef void _stats(pix_t[:, :, ::1] st, double nullpix, int bin_, unsigned char[:, ::1] V,
                 double[:, ::1] M, double[:, ::1] C) noexcept nogil:
    cdef Py_ssize_t k = st.shape[0], ns = st.shape[1], nf = st.shape[2]
    cdef Py_ssize_t i, j, t, u, bi, bj, n
    cdef int nv
    cdef double x
    cdef double *buf = <double *>malloc(k * sizeof(double))
    cdef double *bb = <double *>malloc(bin_ * bin_ * sizeof(double))
    for i in range(ns):
        for j in range(nf):
            nv = 0
            for t in range(k):
                x = st[t, i, j]
                if x > nullpix:
                    nv += 1
                x = x if x > 0 else 0.0
                # insertion sort of the k values of this pixel
                u = t
                while u > 0 and buf[u - 1] > x:
                    buf[u] = buf[u - 1]
                    u -= 1
                buf[u] = x
            if 2 * nv > k:
                V[i, j] = 1
                M[i, j] = _median_sorted(buf, <int>k)
            else:
                V[i, j] = 0
                M[i, j] = 0.0
    for bi in range(C.shape[0]):
        for bj in range(C.shape[1]):
            n = 0
            for i in range(bi * bin_, min((bi + 1) * bin_, ns)):
                for j in range(bj * bin_, min((bj + 1) * bin_, nf)):
                    if V[i, j]:
                        bb[n] = M[i, j]
                        n += 1
            if n == 0:
                C[bi, bj] = 0.0
            else:
                qsort(bb, n, sizeof(double), _cmp)
                C[bi, bj] = _median_sorted(bb, <int>n)
    free(buf)
    free(bb)


def block_stats(images, double nullpix=-1.0, int bin_=8):
    """(valid bool (ns, nf), median float64 (ns, nf), coarse float64 (ceil(ns/bin_), ceil(nf/bin_)))."""
    dt = images[0].dtype
    if dt not in (np.int32, np.float32, np.float64) or any(d.dtype != dt for d in images):
        dt = np.float64
    st = np.ascontiguousarray(np.stack([np.asarray(d, dt) for d in images]))
    ns, nf = st.shape[1], st.shape[2]
    valid = np.empty((ns, nf), np.uint8)
    med = np.empty((ns, nf), np.float64)
    coarse = np.empty((-(-ns // bin_), -(-nf // bin_)), np.float64)
    cdef unsigned char[:, ::1] V = valid
    cdef double[:, ::1] M = med
    cdef double[:, ::1] C = coarse
    cdef cnp.int32_t[:, :, ::1] si
    cdef float[:, :, ::1] sf
    cdef double[:, :, ::1] sd
    if dt == np.int32:
        si = st
        with nogil:
            _stats(si, nullpix, bin_, V, M, C)
    elif dt == np.float32:
        sf = st
        with nogil:
            _stats(sf, nullpix, bin_, V, M, C)
    else:
        sd = st
        with nogil:
            _stats(sd, nullpix, bin_, V, M, C)
    return valid.view(np.bool_), med, coarse

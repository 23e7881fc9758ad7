# The 3 x 3 solve of a background plane's normal equations, shared by the background and
# integration kernels (included by both: one copy of the elimination).
cdef int _solve3(double[3][3] M, double[3] r, double[3] out) noexcept nogil:
    """Gaussian elimination with partial pivoting; 0 when singular."""
    cdef int i, j, k, p
    cdef double t, f
    for k in range(3):
        p = k
        for i in range(k + 1, 3):
            if fabs(M[i][k]) > fabs(M[p][k]):
                p = i
        if M[p][k] == 0.0:
            return 0
        if p != k:
            for j in range(3):
                t = M[k][j]
                M[k][j] = M[p][j]
                M[p][j] = t
            t = r[k]
            r[k] = r[p]
            r[p] = t
        for i in range(k + 1, 3):
            f = M[i][k] / M[k][k]
            for j in range(k, 3):
                M[i][j] -= f * M[k][j]
            r[i] -= f * r[k]
    for i in range(2, -1, -1):
        t = r[i]
        for j in range(i + 1, 3):
            t -= M[i][j] * out[j]
        out[i] = t / M[i][i]
    return 1

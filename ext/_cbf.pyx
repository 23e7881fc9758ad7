# cython: boundscheck=False, wraparound=False, cdivision=True
"""CBF byte-offset decoding (the Pilatus/Eiger miniCBF compression) into int32 pixels.

The twin is fabio's decoder (fabio.compression.decByteOffset, its Cython and its numpy versions); the
tests hold the two bit-identical on every CBF of the shared data and on streams with every escape.
Each pixel is the previous one plus a delta: one signed byte, or after the byte 0x80 a little-endian
int16, or after 0x80 0x8000 an int32.  Runs of eight plain bytes (no 0x80 among them, which one test on
a 64-bit word finds) are added without a branch per byte: fabio's loop tests every byte."""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int8_t, int16_t, int32_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

cnp.import_array()


cdef extern from *:
    """
    /* 1 if any byte of w is 0x80: the bytes of w ^ 0x80.. that are zero */
    static inline int pyflm_has_0x80(unsigned long long w) {
        unsigned long long x = w ^ 0x8080808080808080ULL;
        return ((x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL) != 0;
    }
    """
    int pyflm_has_0x80(unsigned long long w) nogil


def dec_cbf32(const unsigned char[::1] stream, Py_ssize_t size):
    """The `size` int32 pixels of a byte-offset stream, or None where fabio's result could differ from
    a plain reading of the stream (a stream with fewer pixels, an escape running past its end, a 64-bit
    delta): the caller then asks fabio.  A longer stream's extra pixels are left, as fabio leaves them."""
    out = np.empty(size, np.int32)           # every pixel is written (a short stream returns None)
    cdef int32_t[::1] O = out
    cdef Py_ssize_t n = stream.shape[0], i = 0, j = 0, k
    cdef uint32_t last = 0           # int32 arithmetic that wraps, as fabio's C int does in practice
    cdef const unsigned char *s = &stream[0] if n > 0 else NULL
    cdef unsigned long long w
    cdef int16_t d16
    cdef int32_t d32
    cdef int bad = 0
    with nogil:
        while i < n and j < size:
            if i + 8 <= n and j + 8 <= size:
                memcpy(&w, s + i, 8)
                if not pyflm_has_0x80(w):
                    for k in range(8):
                        last += <uint32_t>(<int32_t>(<int8_t>s[i + k]))
                        O[j + k] = <int32_t>last
                    i += 8
                    j += 8
                    continue
            if s[i] != 0x80:
                last += <uint32_t>(<int32_t>(<int8_t>s[i]))
                i += 1
            elif i + 3 <= n and not (s[i + 1] == 0x00 and s[i + 2] == 0x80):
                memcpy(&d16, s + i + 1, 2)       # little-endian hosts (x86, arm64)
                last += <uint32_t>(<int32_t>d16)
                i += 3
            elif i + 7 <= n and not (s[i + 3] == 0x00 and s[i + 4] == 0x00 and s[i + 5] == 0x00
                                     and s[i + 6] == 0x80):
                memcpy(&d32, s + i + 3, 4)
                last += <uint32_t>d32
                i += 7
            else:                                # a 64-bit delta or an escape cut off by the end
                bad = 1
                break
            O[j] = <int32_t>last
            j += 1
    if bad or j < size:          # a short stream: fabio's own handling (it returns fewer pixels)
        return None
    return out

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

    /* A run of plain 8-byte words (no 0x80) from s, at most lim bytes, into o: each word's eight
       deltas widened, their running sums formed in the register (three shifted adds within the
       halves, the low half's total added to the high), and the pixel before them added; that pixel
       moves on by the word's total, one add a word (the scalar loop's chain was eight).  The bytes
       done (whole words) returned; *last is their last pixel.  The same int32 sums, wrapping alike. */
    #include <immintrin.h>
    static int pyflm_cbf_cpu = -1, pyflm_cbf_simd = -1;
    static int pyflm_cbf_avx2(void) {
        if (pyflm_cbf_cpu < 0) { __builtin_cpu_init(); pyflm_cbf_cpu = __builtin_cpu_supports("avx2") ? 1 : 0; }
        return pyflm_cbf_cpu && pyflm_cbf_simd != 0;
    }
    static int pyflm_cbf_set_simd(int level) { int old = pyflm_cbf_simd; pyflm_cbf_simd = level; return old; }
    __attribute__((target("avx2"))) static Py_ssize_t pyflm_plain_run(const unsigned char *s, Py_ssize_t lim,
                                                                     int *o, unsigned int *last) {
        Py_ssize_t k = 0;
        __m256i acc = _mm256_set1_epi32((int)*last);
        const __m256i three = _mm256_set1_epi32(3), seven = _mm256_set1_epi32(7);
        for (; k + 8 <= lim; k += 8) {
            unsigned long long w;
            memcpy(&w, s + k, 8);
            if (pyflm_has_0x80(w)) break;
            __m256i d = _mm256_cvtepi8_epi32(_mm_cvtsi64_si128((long long)w));
            d = _mm256_add_epi32(d, _mm256_slli_si256(d, 4));
            d = _mm256_add_epi32(d, _mm256_slli_si256(d, 8));
            d = _mm256_add_epi32(d, _mm256_blend_epi32(_mm256_setzero_si256(),
                                                       _mm256_permutevar8x32_epi32(d, three), 0xF0));
            _mm256_storeu_si256((__m256i *)(o + k), _mm256_add_epi32(d, acc));
            acc = _mm256_add_epi32(acc, _mm256_permutevar8x32_epi32(d, seven));
        }
        *last = (unsigned int)_mm256_cvtsi256_si32(acc);
        return k;
    }
    """
    int pyflm_has_0x80(unsigned long long w) nogil
    int pyflm_cbf_avx2() nogil
    int pyflm_cbf_set_simd(int level) nogil
    Py_ssize_t pyflm_plain_run(const unsigned char *s, Py_ssize_t lim, int *o, unsigned int *last) nogil


def set_simd(int level):
    """dec_cbf32's runs of plain words: 0 the scalar loop alone, -1 AVX2 where the CPU has it (the
    default; the same pixels, as tests compare); the setting before."""
    return pyflm_cbf_set_simd(level)


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
    cdef int bad = 0, simd = pyflm_cbf_avx2()
    with nogil:
        while i < n and j < size:
            if simd and i + 8 <= n and j + 8 <= size:
                k = pyflm_plain_run(s + i, min(n - i, size - j), <int *>&O[j], <unsigned int *>&last)
                i += k
                j += k
                if k:
                    continue
            elif i + 8 <= n and j + 8 <= size:
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


cdef extern from *:
    """
    /* MD5 (RFC 1321) of up to eight buffers at once, a buffer in each 32-bit lane of a 256-bit register
       through the 64 steps: one buffer's MD5 is a chain of dependent steps (hashlib's ~1.4 ms a sim
       image's 1 MB), the lanes' chains run side by side.  The blocks every buffer has go through the
       lanes; each one's remaining blocks and its padding then one by one.  AVX-512VL's ternary logic
       and rotation where the CPU has them (the step's function and rotation one instruction each:
       5 images 2.3x hashlib's time), else AVX2's (1.6x). */
    #include <immintrin.h>
    static const uint32_t pyflm_md5_k[64] = {
        0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
        0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
        0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
        0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
        0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
        0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
        0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
        0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391};
    static const int pyflm_md5_r[64] = {
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22,
        5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20,
        4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23,
        6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21};

    /* one 64-byte block into the state s (little-endian words, as the x86 and arm64 hosts') */
    static void pyflm_md5_block(uint32_t s[4], const unsigned char *p) {
        uint32_t m[16], a = s[0], b = s[1], c = s[2], d = s[3];
        memcpy(m, p, 64);
        for (int i = 0; i < 64; i++) {
            uint32_t f;
            int g;
            if (i < 16) { f = d ^ (b & (c ^ d)); g = i; }
            else if (i < 32) { f = c ^ (d & (b ^ c)); g = (5 * i + 1) & 15; }
            else if (i < 48) { f = b ^ c ^ d; g = (3 * i + 5) & 15; }
            else { f = c ^ (b | ~d); g = (7 * i) & 15; }
            uint32_t t = a + f + pyflm_md5_k[i] + m[g];
            a = d; d = c; c = b;
            b = b + ((t << pyflm_md5_r[i]) | (t >> (32 - pyflm_md5_r[i])));
        }
        s[0] += a; s[1] += b; s[2] += c; s[3] += d;
    }

    /* a buffer's blocks after the first `done` bytes, and the padding (0x80, zeros, the length in bits) */
    static void pyflm_md5_finish(uint32_t s[4], const unsigned char *p, size_t n, size_t done) {
        unsigned char last[128];
        for (; done + 64 <= n; done += 64) pyflm_md5_block(s, p + done);
        size_t r = n - done, tail = r < 56 ? 64 : 128;
        uint64_t bits = (uint64_t)n * 8;
        memset(last, 0, sizeof last);
        memcpy(last, p + done, r);
        last[r] = 0x80;
        memcpy(last + tail - 8, &bits, 8);
        pyflm_md5_block(s, last);
        if (tail == 128) pyflm_md5_block(s, last + 64);
    }

    /* nblk blocks of the buffers p[0..7] through the lanes' states st (lane l of st[w]: buffer l's word w);
       each half block's 8 x 8 words transposed so that a register holds one word of every buffer */
    #define PYFLM_MD5X8(NAME, TARGET, FF, GG, HH, II, ROTL) \
    __attribute__((target(TARGET))) static void NAME(__m256i st[4], const unsigned char *const p[8], \
                                                     size_t nblk) { \
        __m256i m[16]; \
        for (size_t blk = 0; blk < nblk; blk++) { \
            for (int h = 0; h < 2; h++) { \
                __m256i r[8], t[8], u[8]; \
                for (int l = 0; l < 8; l++) \
                    r[l] = _mm256_loadu_si256((const __m256i *)(p[l] + 64 * blk + 32 * h)); \
                for (int l = 0; l < 8; l += 2) { \
                    t[l] = _mm256_unpacklo_epi32(r[l], r[l + 1]); \
                    t[l + 1] = _mm256_unpackhi_epi32(r[l], r[l + 1]); \
                } \
                for (int l = 0; l < 8; l += 4) { \
                    u[l] = _mm256_unpacklo_epi64(t[l], t[l + 2]); \
                    u[l + 1] = _mm256_unpackhi_epi64(t[l], t[l + 2]); \
                    u[l + 2] = _mm256_unpacklo_epi64(t[l + 1], t[l + 3]); \
                    u[l + 3] = _mm256_unpackhi_epi64(t[l + 1], t[l + 3]); \
                } \
                for (int w = 0; w < 4; w++) { \
                    m[8 * h + w] = _mm256_permute2x128_si256(u[w], u[w + 4], 0x20); \
                    m[8 * h + w + 4] = _mm256_permute2x128_si256(u[w], u[w + 4], 0x31); \
                } \
            } \
            __m256i a = st[0], b = st[1], c = st[2], d = st[3]; \
            /* (unrolled: the rotations and the words' places constants) */ \
            _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) PYFLM_MD5_STEP(FF, i, i, ROTL) \
            _Pragma("GCC unroll 16") for (int i = 16; i < 32; i++) PYFLM_MD5_STEP(GG, (5 * i + 1) & 15, i, ROTL) \
            _Pragma("GCC unroll 16") for (int i = 32; i < 48; i++) PYFLM_MD5_STEP(HH, (3 * i + 5) & 15, i, ROTL) \
            _Pragma("GCC unroll 16") for (int i = 48; i < 64; i++) PYFLM_MD5_STEP(II, (7 * i) & 15, i, ROTL) \
            st[0] = _mm256_add_epi32(st[0], a); \
            st[1] = _mm256_add_epi32(st[1], b); \
            st[2] = _mm256_add_epi32(st[2], c); \
            st[3] = _mm256_add_epi32(st[3], d); \
        } \
    }
    #define PYFLM_MD5_STEP(F, G, I, ROTL) { \
        __m256i t = _mm256_add_epi32(_mm256_add_epi32(a, F), \
                                     _mm256_add_epi32(_mm256_set1_epi32((int)pyflm_md5_k[I]), m[G])); \
        a = d; d = c; c = b; b = _mm256_add_epi32(b, ROTL(t, pyflm_md5_r[I])); }
    #define PYFLM_ROTL2(x, r) _mm256_or_si256(_mm256_slli_epi32(x, r), _mm256_srli_epi32(x, 32 - (r)))
    #define PYFLM_ONES _mm256_set1_epi32(-1)
    PYFLM_MD5X8(pyflm_md5x8_avx2, "avx2",
                _mm256_xor_si256(d, _mm256_and_si256(b, _mm256_xor_si256(c, d))),
                _mm256_xor_si256(c, _mm256_and_si256(d, _mm256_xor_si256(b, c))),
                _mm256_xor_si256(_mm256_xor_si256(b, c), d),
                _mm256_xor_si256(c, _mm256_or_si256(b, _mm256_xor_si256(d, PYFLM_ONES))), PYFLM_ROTL2)
    /* (the same functions as ternary logic's truth tables of b, c, d) */
    PYFLM_MD5X8(pyflm_md5x8_avx512, "avx2,avx512f,avx512vl",
                _mm256_ternarylogic_epi32(b, c, d, 0xca), _mm256_ternarylogic_epi32(b, c, d, 0xe4),
                _mm256_ternarylogic_epi32(b, c, d, 0x96), _mm256_ternarylogic_epi32(b, c, d, 0x39),
                _mm256_rol_epi32)

    static int pyflm_md5_simd = -1, pyflm_md5_cpu = -1;
    /* the lanes' level: 2 AVX-512VL, 1 AVX2, 0 none (capped by md5_set_simd, as tests compare) */
    static int pyflm_md5_level(void) {
        if (pyflm_md5_cpu < 0) {
            __builtin_cpu_init();
            pyflm_md5_cpu = __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512f") ? 2 :
                            __builtin_cpu_supports("avx2") ? 1 : 0;
        }
        return pyflm_md5_simd >= 0 && pyflm_md5_simd < pyflm_md5_cpu ? pyflm_md5_simd : pyflm_md5_cpu;
    }
    static int pyflm_md5_set_simd(int level) { int old = pyflm_md5_simd; pyflm_md5_simd = level; return old; }

    /* the digests (16 bytes each, into out) of k (1..8) buffers p[l] of n[l] bytes at the given level (>= 1) */
    __attribute__((target("avx2"))) static void pyflm_md5x8(int level, int k, const unsigned char *const *p, const size_t *n,
                            unsigned char *out) {
        const unsigned char *q[8];
        size_t common = (size_t)-1;
        uint32_t s[4][8];
        __m256i st[4];
        for (int l = 0; l < k; l++) if (n[l] / 64 < common) common = n[l] / 64;
        for (int l = 0; l < 8; l++) q[l] = l < k ? p[l] : p[0];     /* a spare lane hashes buffer 0 again */
        st[0] = _mm256_set1_epi32(0x67452301);
        st[1] = _mm256_set1_epi32((int)0xefcdab89);
        st[2] = _mm256_set1_epi32((int)0x98badcfe);
        st[3] = _mm256_set1_epi32(0x10325476);
        if (level >= 2) pyflm_md5x8_avx512(st, q, common);
        else pyflm_md5x8_avx2(st, q, common);
        for (int w = 0; w < 4; w++) _mm256_storeu_si256((__m256i *)s[w], st[w]);
        for (int l = 0; l < k; l++) {
            uint32_t one[4] = {s[0][l], s[1][l], s[2][l], s[3][l]};
            pyflm_md5_finish(one, p[l], n[l], 64 * common);
            memcpy(out + 16 * l, one, 16);
        }
    }
    """
    int pyflm_md5_level() nogil
    int pyflm_md5_set_simd(int level) nogil
    void pyflm_md5x8(int level, int k, const unsigned char *const *p, const size_t *n, unsigned char *out) nogil


def md5_set_simd(int level):
    """md5_many's lanes: 2 AVX-512VL, 1 AVX2, 0 none (md5_many then gives None), -1 the CPU's best
    (the default); the setting before."""
    return pyflm_md5_set_simd(level)


def md5_many(buffers):
    """The MD5 digests (16 bytes each, hashlib's) of a list of byte buffers, eight at a time in SIMD
    lanes; None where the CPU has neither AVX2 nor AVX-512VL (the caller hashes with hashlib)."""
    cdef int level = pyflm_md5_level(), k, l
    cdef Py_ssize_t at
    cdef const unsigned char *p[8]
    cdef size_t n[8]
    cdef unsigned char out[128]
    cdef const unsigned char[::1] v
    if level < 1:
        return None
    views = [memoryview(b).cast("B") for b in buffers]
    digests = []
    for at in range(0, len(views), 8):
        group = views[at:at + 8]
        k = len(group)
        for l in range(k):
            v = group[l]
            p[l] = &v[0] if v.shape[0] else <const unsigned char *>out     # (an empty one reads nothing)
            n[l] = v.shape[0]
        with nogil:
            pyflm_md5x8(level, k, p, n, out)
        digests.extend((<char *>out)[16 * l:16 * l + 16] for l in range(k))
    return digests

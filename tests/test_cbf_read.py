"""CBF reading hashes the pixel data once (fabio's own MD5 check is skipped: it only logs): the array is
fabio's, and one flipped bit in the data is still refused."""
import fabio
import numpy as np
import pytest

from pyflm import images
from pyflm.errors import ImageError
from conftest import SIM


def test_a_cbf_reads_as_fabio_reads_it():
    path = str(SIM / "sim_0007.cbf")
    data, hdr = images.read_image(path)
    ref = fabio.open(path).data
    assert data.dtype == ref.dtype and np.array_equal(data, ref) and (hdr.n_fast, hdr.n_slow) == (981, 1043)


def test_one_flipped_bit_in_the_pixel_data_is_refused(tmp_path):
    raw = bytearray((SIM / "sim_0007.cbf").read_bytes())
    raw[len(raw) // 2] ^= 0x10
    bad = tmp_path / "flip_0001.cbf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="checksum does not match"):
        images.read_image(str(bad))


def _decoders():
    from fabio.compression import compression
    from pyflm._ext import _cbf
    return _cbf, compression


@pytest.fixture(params=[-1, 0], ids=["avx2", "scalar"])
def cbf_simd(request):
    """dec_cbf32's runs of plain words in AVX2 (where the CPU has it) and in the scalar loop."""
    from pyflm._ext import _cbf
    old = _cbf.set_simd(request.param)
    yield request.param
    _cbf.set_simd(old)


def test_every_sim_image_decodes_to_fabios_pixels_to_the_bit(cbf_simd):
    """pyflm's byte-offset kernel (ext/_cbf.pyx) against fabio's decoder on all 60 images."""
    _cbf, compression = _decoders()
    for path in sorted(SIM.glob("sim_*.cbf")):
        raw = fabio.cbfimage.CbfImage().read(str(path), only_raw=True)
        ref = compression.decByteOffset_cython(raw, 981 * 1043, "int32")
        ours = _cbf.dec_cbf32(memoryview(raw).cast("B"), 981 * 1043)
        assert ours is not None and ours.dtype == ref.dtype and np.array_equal(ours, ref), path.name


def test_streams_with_every_escape_decode_as_fabio_decodes_them(cbf_simd):
    """Deltas of every size (8, 16 and 32 bits, the escapes' own boundary values), a stream shorter and
    longer than the image, and the cases the kernel leaves to fabio (a 64-bit delta, a cut escape)."""
    _cbf, compression = _decoders()
    rng = np.random.default_rng(3)
    steps = np.concatenate([rng.integers(-127, 128, 5000), [127, -127, 128, -128, 32767, -32767, 32768,
                            -32768, 2 ** 31 - 1 - 40000, -(2 ** 31) + 40000],
                            rng.integers(-40000, 40000, 3000), rng.integers(-3, 4, 20000)])
    values = np.cumsum(steps).astype(np.int32)
    stream = compression.compByteOffset(values)
    for size in (len(values), len(values) - 17):
        ref = compression.decByteOffset_cython(stream, size, "int32")
        ours = _cbf.dec_cbf32(memoryview(stream).cast("B"), size)
        assert np.array_equal(ours, ref) and ours.dtype == ref.dtype
    # a stream short of the image's pixels goes to fabio (which gives fewer pixels; the read refuses it)
    assert _cbf.dec_cbf32(memoryview(stream).cast("B"), len(values) + 9) is None
    # fabio's numpy decoder (which decodes the whole stream, whatever the size) agrees too
    assert np.array_equal(_cbf.dec_cbf32(memoryview(stream).cast("B"), len(values)),
                          compression.decByteOffset_numpy(stream, len(values), "int32"))
    assert _cbf.dec_cbf32(memoryview(stream[:-2]).cast("B"), len(values)) is None or \
        stream[-3:-2] != b"\x80"                       # a cut escape goes to fabio
    big = b"\x80\x00\x80\x00\x00\x00\x80" + (5).to_bytes(8, "little", signed=True)
    assert _cbf.dec_cbf32(memoryview(big).cast("B"), 1) is None      # a 64-bit delta goes to fabio
    a, _ = images.read_image(str(SIM / "sim_0031.cbf"))
    assert np.array_equal(a, fabio.open(str(SIM / "sim_0031.cbf")).data)


def test_pixels_alone_are_read_images_pixels_and_a_bad_file_still_fails_as_it(tmp_path):
    """read_pixels (integration's read: the binary section alone) gives read_image's array for every sim
    image, and leaves to read_image whatever is not a plain byte-offset miniCBF or is wrong: a flipped
    bit (the same checksum error), a short file, sizes that disagree, another element type."""
    for path in sorted(SIM.glob("sim_*.cbf")):
        ours = images._plain_cbf_pixels(str(path))
        ref = images.read_image(str(path))[0]
        assert ours is not None and ours.dtype == ref.dtype and ours.shape == ref.shape, path.name
        assert np.array_equal(ours, ref) and ours.flags.c_contiguous, path.name
    raw = (SIM / "sim_0007.cbf").read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x10
    at = raw.find(b"\x0c\x1a\x04\xd5")
    bad = {"flip_0001.cbf": bytes(flipped), "short_0001.cbf": raw[:at + 1000],
           "count_0001.cbf": raw.replace(b"X-Binary-Number-of-Elements: 1023183",
                                         b"X-Binary-Number-of-Elements: 1023184"),
           "type_0001.cbf": raw.replace(b'"signed 32-bit integer"', b'"unsigned 16-bit integer"')}
    for name, content in bad.items():
        p = tmp_path / name
        p.write_bytes(content)
        assert images._plain_cbf_pixels(str(p)) is None, name
        try:
            expected = ("read", images.read_image(str(p))[0])
        except ImageError as e:
            expected = ("error", str(e))
        try:
            got = ("read", images.read_pixels(str(p)))
        except ImageError as e:
            got = ("error", str(e))
        assert got[0] == expected[0], name
        assert got[1] == expected[1] if got[0] == "error" else np.array_equal(got[1], expected[1]), name
    with pytest.raises(ImageError, match="checksum does not match"):
        images.read_pixels(str(tmp_path / "flip_0001.cbf"))


@pytest.mark.parametrize("level", [2, 1])
def test_md5_lanes_give_hashlibs_digests(level):
    """md5_many (a buffer in each SIMD lane, AVX-512VL's or AVX2's) gives hashlib's digests for buffers
    of every length about the block and padding boundaries, unequal lengths side by side, more than
    eight (two groups), one alone, and the sim images' binary sections."""
    import hashlib
    from pyflm._ext import _cbf
    old = _cbf.md5_set_simd(level)
    try:
        rng = np.random.default_rng(5)
        lengths = [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 4096, 100_003]
        bufs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]
        sims = [(SIM / f"sim_{i:04d}.cbf").read_bytes() for i in (1, 2, 3)]
        for group in (bufs, bufs[:1], bufs[-3:], sims, [memoryview(s)[100:] for s in sims]):
            got = _cbf.md5_many(group)
            if got is None:
                pytest.skip("this CPU has no such lanes")
            assert got == [hashlib.md5(b).digest() for b in group]
    finally:
        _cbf.md5_set_simd(old)
    _cbf.md5_set_simd(0)
    try:
        assert _cbf.md5_many(bufs) is None          # none: the caller's hashlib
        assert images._md5_digests(bufs) == [hashlib.md5(b).digest() for b in bufs]
    finally:
        _cbf.md5_set_simd(old)


def test_pixels_read_together_are_each_ones_read_pixels(tmp_path):
    """read_pixels_many (a block's images, their checksums at once) gives each path's read_pixels: the
    same array, or the same error for a flipped bit, a short file, a missing one, another format."""
    raw = (SIM / "sim_0007.cbf").read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x10
    at = raw.find(b"\x0c\x1a\x04\xd5")
    (tmp_path / "flip_0001.cbf").write_bytes(bytes(flipped))
    (tmp_path / "short_0001.cbf").write_bytes(raw[:at + 1000])
    (tmp_path / "type_0001.cbf").write_bytes(raw.replace(b'"signed 32-bit integer"',
                                                         b'"unsigned 16-bit integer"'))
    paths = [str(SIM / f"sim_{i:04d}.cbf") for i in (1, 2)] + \
        [str(tmp_path / n) for n in ("flip_0001.cbf", "short_0001.cbf", "type_0001.cbf", "none_0001.cbf")] + \
        [str(SIM / "sim_0003.cbf")]
    got = images.read_pixels_many(paths)
    assert len(got) == len(paths)
    for p, g in zip(paths, got):
        try:
            expected = images.read_pixels(p)
        except Exception as e:
            assert type(g) is type(e) and str(g) == str(e), p
            continue
        assert isinstance(g, np.ndarray) and g.dtype == expected.dtype and np.array_equal(g, expected), p
    assert sum(isinstance(g, np.ndarray) for g in got) >= 3

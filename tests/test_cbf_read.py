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
